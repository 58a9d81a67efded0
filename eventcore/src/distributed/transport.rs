//! The transport contract: what a broker integration implements. The semantics each
//! method must keep are stated on it; `transport_conformance_tests!` checks them.

use async_trait::async_trait;

use super::envelope::DistributedEvent;
use super::names::{ServiceId, SubscriptionName, Topic};
use super::partition::{InvalidPartition, Partition};
use crate::error::BoxError;
use crate::types::GlobalPosition;

/// A transport (broker) failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The broker could not be reached, did not answer in time, or lost the connection;
    /// the same operation may succeed later.
    #[error("the broker is unavailable: {message}")]
    Unavailable {
        /// What failed, for humans.
        message: String,
        /// The client's own error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// The broker refused a publish that would have broken the order of the service's
    /// publication (it expected another event next, for example after an earlier
    /// publish was lost). The publisher asks the broker where its publication ends and
    /// publishes again from there.
    #[error("the broker refused a publish out of order: {message}")]
    OutOfOrder {
        /// What the broker expected, for humans.
        message: String,
    },
    /// The topic belongs to another service's publication.
    #[error("topic `{topic}` is published by service `{owner}`, not by `{service}`")]
    TopicOwnedByAnother {
        /// The topic.
        topic: Topic,
        /// The service that publishes it.
        owner: ServiceId,
        /// The service that tried to.
        service: ServiceId,
    },
    /// The broker refused the operation for good (permissions, a message it cannot
    /// store, a configuration that does not fit); repeating it will not help.
    #[error("the broker refused the operation: {message}")]
    Rejected {
        /// What was refused, for humans.
        message: String,
        /// The client's own error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// A message at the broker is not a published event (it does not decode as a
    /// [`DistributedEvent`]). It is not skipped: the subscription stops at it.
    #[error("message {sequence} of `{service}`'s publication is not an event: {message}")]
    Undecodable {
        /// The publishing service.
        service: ServiceId,
        /// The broker's sequence number of the message.
        sequence: u64,
        /// Why, for humans.
        message: String,
    },
}

impl TransportError {
    /// Whether the same operation may succeed if tried again (after reconciling, for
    /// [`TransportError::OutOfOrder`]).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            TransportError::Unavailable { .. } | TransportError::OutOfOrder { .. }
        )
    }

    /// An [`TransportError::Unavailable`] error.
    pub fn unavailable(message: impl Into<String>, source: Option<BoxError>) -> Self {
        TransportError::Unavailable {
            message: message.into(),
            source,
        }
    }

    /// A [`TransportError::Rejected`] error.
    pub fn rejected(message: impl Into<String>, source: Option<BoxError>) -> Self {
        TransportError::Rejected {
            message: message.into(),
            source,
        }
    }
}

/// One event to publish, and the topic it is published under.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Publication {
    /// The topic (of the publishing service).
    pub topic: Topic,
    /// The event.
    pub event: DistributedEvent,
}

impl Publication {
    /// `event` under `topic`.
    pub fn new(topic: Topic, event: DistributedEvent) -> Self {
        Publication { topic, event }
    }
}

/// The publishing half of a transport, for one service ([`EventPublisher::service`]).
///
/// A service's publication is **one ordered log at the broker**, in the order of the
/// source store's global log; topics are parts of it, and a topic belongs to exactly one
/// service. An implementation must keep that log a gap-free prefix of what was
/// published: an event is never stored after a later one, and never stored when an
/// earlier one of the same publication was lost. The event id is the broker's dedup id.
#[async_trait]
pub trait EventPublisher: Send + Sync + 'static {
    /// The service whose publication this is.
    fn service(&self) -> &ServiceId;

    /// Makes `topics` parts of this service's publication at the broker, creating what
    /// the broker needs for them; idempotent, and safe from two processes at once.
    /// Subscriptions to a topic can be opened once it is declared. The publisher runner
    /// declares its policy's topics whenever it starts.
    ///
    /// # Errors
    ///
    /// [`TransportError::TopicOwnedByAnother`] when another service publishes a topic;
    /// other [`TransportError`]s.
    async fn declare_topics(&self, topics: &[Topic]) -> Result<(), TransportError>;

    /// Publishes `batch`, in its order (source positions increasing), and returns once
    /// the broker acknowledged every event of it. Publishes may be pipelined, but what
    /// the broker stores is always a prefix of the batch, in order; an event the broker
    /// already holds (same event id) is acknowledged again without being stored twice.
    ///
    /// # Errors
    ///
    /// A [`TransportError`]; after any error, some prefix of the batch may be stored:
    /// ask [`EventPublisher::last_published`] before publishing again.
    async fn publish(&self, batch: &[Publication]) -> Result<(), TransportError>;

    /// The source position of the last event the broker holds of this service's
    /// publication (what survived, not what was acknowledged: a broker may lose
    /// acknowledged writes in a crash), `None` when it holds none.
    ///
    /// # Errors
    ///
    /// A [`TransportError`].
    async fn last_published(&self) -> Result<Option<GlobalPosition>, TransportError>;
}

/// What a subscription is: whose, called what, over which topics, and which partition
/// of it a handle receives.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscriptionSpec {
    /// The subscribing service.
    pub service: ServiceId,
    /// The subscription's name within that service.
    pub name: SubscriptionName,
    /// The topics it receives (of one or several publishing services).
    pub topics: Vec<Topic>,
    /// The part of the subscription's source streams this spec receives
    /// ([`Partition::WHOLE`] unless split with [`SubscriptionSpec::split`]).
    pub partition: Partition,
}

impl SubscriptionSpec {
    /// Subscription `name` of `service` to `topics`.
    pub fn new(
        service: ServiceId,
        name: SubscriptionName,
        topics: impl IntoIterator<Item = Topic>,
    ) -> Self {
        let mut topics: Vec<Topic> = topics.into_iter().collect();
        topics.sort();
        topics.dedup();
        SubscriptionSpec {
            service,
            name,
            topics,
            partition: Partition::WHOLE,
        }
    }

    /// The same subscription, partition `partition` of it.
    pub fn with_partition(mut self, partition: Partition) -> Self {
        self.partition = partition;
        self
    }

    /// The subscription split `count` ways: one spec per partition, in index order.
    /// Run one [`crate::distributed::SubscriptionRunner`] on each (in one process or
    /// spread over instances): each source stream's events are handled in order by the
    /// runner of its partition, and the partitions go on at once, `count` events in
    /// flight. A subscription keeps the count it was first opened with (see
    /// [`Partition`]).
    ///
    /// # Errors
    ///
    /// [`InvalidPartition::Count`] unless `count` is a power of two up to
    /// [`super::partition::SLOTS`].
    pub fn split(&self, count: u32) -> Result<Vec<SubscriptionSpec>, InvalidPartition> {
        Ok(Partition::all(count)?
            .into_iter()
            .map(|partition| self.clone().with_partition(partition))
            .collect())
    }
}

/// One delivery of a published event to a subscription.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Delivery {
    /// The event.
    pub event: DistributedEvent,
    /// The topic it was published under.
    pub topic: Topic,
    /// The broker's sequence number of the event in its service's publication.
    pub sequence: u64,
    /// How many times it was delivered to this subscription, this time included (1 the
    /// first time).
    pub attempt: u32,
    /// Whether this is a first delivery that directly follows the last delivery this
    /// handle acknowledged of the same publishing service, with no delivery of that
    /// service's events to any handle (of the same partition) in between: nothing of
    /// that service was handled anywhere else since. The subscription runner then skips re-reading its inbox
    /// (only another instance's handling could have parked one of that service's
    /// streams). `false` whenever the transport cannot tell, which is always safe.
    pub consecutive: bool,
}

impl Delivery {
    /// A delivery (for transports); not [`Delivery::consecutive`].
    pub fn new(event: DistributedEvent, topic: Topic, sequence: u64, attempt: u32) -> Self {
        Delivery {
            event,
            topic,
            sequence,
            attempt,
            consecutive: false,
        }
    }

    /// Marks the delivery [`Delivery::consecutive`] (for transports): only when it is a
    /// first delivery and the transport knows that no handle received an event of the
    /// same service since this handle's last acknowledgement.
    pub fn with_consecutive(mut self, consecutive: bool) -> Self {
        self.consecutive = consecutive && self.attempt == 1;
        self
    }
}

/// The subscribing half of a transport.
#[async_trait]
pub trait EventSubscriber: Send + Sync + 'static {
    /// Opens the durable subscription `spec` (creating it at the start of every topic's
    /// publication when it does not exist yet). Several handles may be open on one
    /// subscription at once, in one process or several (instances of a service): they
    /// share its position, and each event is in flight to one handle at a time.
    ///
    /// A split subscription ([`SubscriptionSpec::partition`]) is one durable
    /// subscription per partition, each with its own position and its own event in
    /// flight, receiving only the events of the source streams its partition contains
    /// ([`Partition::contains`]); everything above holds per partition.
    ///
    /// # Errors
    ///
    /// A [`TransportError`]: the broker cannot be reached, or a topic is not declared
    /// yet by its publisher ([`TransportError::Unavailable`]: it exists once the
    /// publishing service has started), or the subscription exists with other topics
    /// or split another way ([`TransportError::Rejected`]).
    async fn subscribe(
        &self,
        spec: &SubscriptionSpec,
    ) -> Result<Box<dyn Subscription>, TransportError>;

    /// What the durable subscription `spec` (one partition of it, when split) has still
    /// to consume, as the broker sees it: the events held for it that it has not
    /// acknowledged (the one in flight included), and the oldest of them. `None` when
    /// the subscription does not exist yet (no handle ever opened it). It opens
    /// nothing and changes nothing: a health check calls it.
    ///
    /// # Errors
    ///
    /// A [`TransportError`]: the broker cannot be reached, or a topic is not declared
    /// yet by its publisher ([`TransportError::Unavailable`]).
    async fn backlog(&self, spec: &SubscriptionSpec) -> Result<Option<Backlog>, TransportError>;
}

/// What a durable subscription has still to consume ([`EventSubscriber::backlog`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Backlog {
    /// Events held for it that it has not acknowledged, delivered or not.
    pub events: u64,
    /// When the source store recorded the oldest of them (its
    /// [`DistributedEvent::occurred_at`], on the publishing service's clock); `None`
    /// when there are none.
    pub oldest_occurred_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl Backlog {
    /// A backlog of `events`, the oldest recorded at `oldest_occurred_at` (for
    /// transports).
    pub fn new(events: u64, oldest_occurred_at: Option<chrono::DateTime<chrono::Utc>>) -> Self {
        Backlog {
            events,
            oldest_occurred_at,
        }
    }

    /// Adds `other`'s (another source's) events; the oldest of both stays.
    pub fn merge(self, other: Backlog) -> Backlog {
        let oldest = match (self.oldest_occurred_at, other.oldest_occurred_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Backlog::new(self.events.saturating_add(other.events), oldest)
    }
}

/// An open handle on a durable subscription.
///
/// Events come **in the order of each publishing service's publication** and **one at a
/// time**: after [`Subscription::next`] returned a delivery, the subscription delivers
/// nothing newer until that one is acknowledged ([`Subscription::ack`]). Calling `next`
/// again without acknowledging, or dropping the handle (a crash), makes the broker
/// deliver the same event again (to this handle or another), with `attempt` one higher.
/// Delivery is at-least-once: an event whose acknowledgement was lost is delivered again.
#[async_trait]
pub trait Subscription: Send {
    /// The next delivery: the unacknowledged one again, if there is one, or the next
    /// event; waits until there is one.
    ///
    /// # Errors
    ///
    /// A [`TransportError`].
    async fn next(&mut self) -> Result<Delivery, TransportError>;

    /// Acknowledges `delivery`: the subscription's position moves past it, for good.
    ///
    /// # Errors
    ///
    /// A [`TransportError`]; the delivery may then come again.
    async fn ack(&mut self, delivery: &Delivery) -> Result<(), TransportError>;
}
