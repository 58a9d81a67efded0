//! Events across services (feature `distributed`): each service owns its event store,
//! and facts cross service boundaries only as published events.
//!
//! - A [`PublisherRunner`] follows the service's own global log (the store is the
//!   outbox: no second write) and publishes the events its [`PublicationPolicy`] makes
//!   public, as [`DistributedEvent`]s, through an [`EventPublisher`], in order and
//!   complete at the broker after any crash.
//! - An [`EventSubscriber`] gives another service a durable [`Subscription`] to topics:
//!   at-least-once delivery, in each publishing service's order, one event in flight
//!   at a time; a [`SubscriptionRunner`] hands each event to an [`EventHandler`] and
//!   gives its commands an exactly-once effect ([`ProjectionHandler`] runs a
//!   cross-service projection on one).
//! - Transports implement [`EventPublisher`] and [`EventSubscriber`]:
//!   `eventcore_memory::InMemoryBroker` in process (the default for examples and tests),
//!   `eventcore-nats` on NATS JetStream. The semantics are stated on the traits and
//!   checked, where a test can reach them without injecting faults into the broker, by
//!   the public transport conformance suite.
//!
//! The design, and what each guarantee rests on, is ADR 0010 in `docs/adr/`.

mod envelope;
pub mod federation;
mod names;
mod partition;
mod policy;
mod projection;
mod publisher;
pub mod registry;
mod subscriber;
mod transport;

pub use self::envelope::DistributedEvent;
pub use self::names::{
    InvalidDistributedName, MAX_TOKEN_LEN, NameKind, ServiceId, SubscriptionName, Topic,
};
pub use self::partition::{InvalidPartition, Partition, SLOTS, slot_of};
pub use self::policy::{PublicationPolicy, PublicationRule};
pub use self::projection::ProjectionHandler;
pub use self::publisher::{PublishSummary, PublisherMetrics, PublisherRunner};
pub use self::registry::{
    RegisteredService, RegistryError, ServiceInstance, ServiceRegistration, ServiceRegistry,
};
pub use self::subscriber::{EventHandler, ParkedDelivery, Processed, SubscriptionRunner};
pub use self::transport::{
    Backlog, Delivery, EventPublisher, EventSubscriber, Publication, Subscription,
    SubscriptionSpec, TransportError,
};
