//! The transport conformance checks (features `testing` and `distributed`): what every
//! [`EventPublisher`]/[`EventSubscriber`] pair must do, alone and under the runners, as
//! generic async functions over a [`TransportHarness`].
//! [`crate::transport_conformance_tests!`] instantiates each as a `#[test]`; a unit test
//! checks that the macro names every check of these files.
//!
//! - `transport_conformance/broker.rs`: the transport itself. The envelope arrives
//!   intact and in the publication's order; a republished event is held once; nothing
//!   is stored out of order, and a publisher handle behind the publication is refused
//!   instead of leaving a gap; `last_published` is where the publication ends; a topic
//!   belongs to one service; an unacknowledged delivery comes again, to another handle
//!   when its handle is dropped; one event is in flight per subscription; a
//!   subscription resumes after its last acknowledgement and receives its topics only;
//!   a split subscription's partitions receive their own streams, in order, at once, and
//!   are split one way; a subscription's backlog is what it has not acknowledged.
//! - `transport_conformance/publisher.rs`: the [`crate::distributed::PublisherRunner`]
//!   on the transport. Only public events, in log order; a restarted publisher, a crash
//!   between publish and checkpoint, a publish failing inside a batch and a broker that
//!   lost acknowledged events all end with the publication complete, in order, each
//!   event once.
//! - `transport_conformance/subscriber.rs`: the
//!   [`crate::distributed::SubscriptionRunner`] on the transport. A redelivered event
//!   changes nothing; a failing event is parked and holds its source stream while others
//!   flow; an event that kills its handler is parked after the delivery limit; two
//!   instances apply each event once in source-stream order, and so do the runners of a
//!   split subscription; a hold racing a re-drive strands nothing; a broker that lost
//!   events makes nothing happen twice.
//!
//! The runner checks need a store per service; any backend does (the harness says
//! which): they check the transport, the store conformance suites check the stores.

mod broker;
mod publisher;
mod subscriber;

pub use broker::*;
pub use publisher::*;
pub use subscriber::*;

use std::sync::Arc;

use async_trait::async_trait;

use crate::distributed::{
    Delivery, DistributedEvent, EventPublisher, EventSubscriber, Publication, ServiceId,
    SubscriptionName, SubscriptionSpec, Topic,
};
use crate::event::{EventPayload, RecordedEvent};
use crate::metadata::EventMetadata;
use crate::names::{EventType, StreamId};
use crate::trace::TraceContext;
use crate::types::{CorrelationId, EventId, GlobalPosition, StreamVersion};
use crate::{CheckpointStore, EventStore};

/// A fresh, isolated transport for one conformance check: what a transport's test
/// provides (the in-memory broker; a NATS server with names no other check uses).
#[async_trait]
pub trait TransportHarness: Send + Sync + 'static {
    /// The store of one service in the runner checks.
    type Store: EventStore + CheckpointStore + Clone;

    /// A publisher of `service`'s publication. Each call returns a new handle, as a new
    /// process of the service would have.
    async fn publisher(&self, service: &ServiceId) -> Arc<dyn EventPublisher>;

    /// A subscriber.
    async fn subscriber(&self) -> Arc<dyn EventSubscriber>;

    /// A fresh, empty store for one service.
    async fn store(&self) -> Self::Store;

    /// A broker crash and restart in which `service`'s publication loses its last
    /// `messages` messages, acknowledged though they were (a broker that acknowledges
    /// before it syncs to disk, as JetStream does by default); subscriptions' positions
    /// past what was lost move back to its end, and every delivery in flight comes
    /// again.
    async fn lose_last_messages(&self, service: &ServiceId, messages: usize);
}

pub(crate) fn service(name: &str) -> ServiceId {
    ServiceId::try_new(name).expect("valid service id")
}

pub(crate) fn topic(name: &str) -> Topic {
    Topic::try_new(name).expect("valid topic")
}

pub(crate) fn spec(subscriber: &str, name: &str, topics: &[&str]) -> SubscriptionSpec {
    SubscriptionSpec::new(
        service(subscriber),
        SubscriptionName::try_new(name).expect("valid name"),
        topics.iter().map(|t| topic(t)),
    )
}

/// The `n`-th event (position `n`) of `stream`, published by `from`.
pub(crate) fn event(
    from: &ServiceId,
    stream: &str,
    version: u64,
    position: u64,
) -> DistributedEvent {
    let metadata = EventMetadata::new(CorrelationId::new())
        .with_actor("conformance")
        .with_custom("n", position)
        .with_trace_context(
            TraceContext::new("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
                .expect("valid"),
        );
    let recorded = RecordedEvent::new(
        EventId::new(),
        StreamId::try_new(stream).expect("valid stream"),
        StreamVersion::new(version),
        GlobalPosition::new(position),
        EventType::try_new("Happened").expect("valid type"),
        EventPayload::from_json(format!(r#"{{ "n" : {position}, "text": "é\u00e9" }}"#))
            .expect("valid payload"),
        Arc::new(metadata),
        chrono::Utc::now(),
    );
    DistributedEvent::from_recorded(&recorded, from, chrono::Utc::now()).expect("readable")
}

/// Publishes `count` events of `from` under `topic`, alternating two streams; returns
/// them in order.
pub(crate) async fn publish_some(
    publisher: &dyn EventPublisher,
    topic_name: &str,
    first_position: u64,
    count: u64,
) -> Vec<DistributedEvent> {
    let events: Vec<DistributedEvent> = (0..count)
        .map(|i| {
            let position = first_position + i;
            let stream = if position.is_multiple_of(2) {
                "even"
            } else {
                "odd"
            };
            event(publisher.service(), stream, position / 2 + 1, position)
        })
        .collect();
    let batch: Vec<Publication> = events
        .iter()
        .map(|e| Publication::new(topic(topic_name), e.clone()))
        .collect();
    publisher.publish(&batch).await.expect("publishes");
    events
}

pub(crate) async fn next_and_ack(
    subscription: &mut dyn crate::distributed::Subscription,
) -> Delivery {
    let delivery = subscription.next().await.expect("delivers");
    subscription.ack(&delivery).await.expect("acknowledges");
    delivery
}
