//! NATS JetStream transport for EventCore's distribution layer
//! ([`eventcore::distributed`]): [`NatsPublisher`] and [`NatsSubscriber`] implement
//! [`EventPublisher`] and [`EventSubscriber`] and pass the public transport conformance
//! suite.
//!
//! # At the broker
//!
//! - Each publishing service's publication is **one JetStream stream**,
//!   `<prefix>-<service>`, capturing the subjects of the topics it declared,
//!   `<prefix>.<topic>.>`. JetStream refuses a subject captured by two streams, so a
//!   topic belongs to one service ([`TransportError::TopicOwnedByAnother`]).
//! - An event is one message on `<prefix>.<topic>.<slot>.<stream>`: the source stream's
//!   slot ([`eventcore::distributed::slot_of`], 0 to 63, for split subscriptions) and
//!   its id escaped into one token (letters, digits, `-` and `_` kept, every other byte
//!   `~XX`),
//!   with the envelope as the body (JSON) and the event id as `Nats-Msg-Id`; headers
//!   repeat its identity, type, source stream, version, position and W3C trace context
//!   for tools (`nats stream view`).
//! - Publishes are pipelined and **chained**: each carries `Nats-Expected-Last-Sequence`
//!   (and `Nats-Expected-Stream`), so after a lost message every later one is refused
//!   and the stream never holds a gap or a reordering; the publisher learns where the
//!   stream ends ([`EventPublisher::last_published`]) from the stream itself, never from
//!   its own memory, because JetStream acknowledges before it syncs to disk. Every
//!   publish acknowledgement is awaited.
//! - A subscription is a durable pull consumer per publishing stream, named
//!   `<service>~<name>` (`<service>~<name>~<index>of<count>` for a partition of a split
//!   subscription, filtering the subjects of its slots), with explicit acks, `max_ack_pending` 1 (a redelivery can then
//!   never overtake a newer message) and no `max_deliver` (the subscription runner
//!   counts deliveries and parks; the broker never drops a message on its own). A handle
//!   pulls only while its caller waits in [`Subscription::next`], keeps what it received
//!   its own (progress acknowledgements) while it lives, and hands it back (a negative
//!   acknowledgement) when asked for the next event without an acknowledgement or when
//!   dropped.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use eventcore::distributed::ServiceId;
//! use eventcore_nats::{NatsConfig, NatsTransport};
//!
//! let client = async_nats::connect("nats://127.0.0.1:4222").await?;
//! let transport = NatsTransport::new(client, NatsConfig::default());
//! let publisher = Arc::new(transport.publisher(ServiceId::try_new("orders")?));
//! let subscriber = Arc::new(transport.subscriber());
//! # let _ = (publisher, subscriber);
//! # Ok(())
//! # }
//! ```

mod publisher;
mod registry;
mod subject;
mod subscriber;

use std::time::Duration;

use async_nats::jetstream;
use eventcore::distributed::TransportError;

pub use publisher::NatsPublisher;
pub use registry::{DEFAULT_DISCOVERY_WINDOW, NatsServiceRegistry};
pub use subscriber::NatsSubscriber;

#[doc(no_inline)]
pub use eventcore::distributed::{EventPublisher, EventSubscriber, Subscription};

use subject::Names;

/// A configuration this transport refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidNatsConfig {
    /// The prefix is not 1 to 32 ASCII letters, digits or `_` (no `-`: it separates
    /// the prefix from the service in stream names).
    #[error("invalid subject prefix `{0}`: 1 to 32 ASCII letters, digits or `_`")]
    Prefix(String),
    /// A stream needs at least one replica, and JetStream allows at most five.
    #[error("invalid replica count {0}: 1 to 5")]
    Replicas(usize),
    /// A duration that must be positive is zero.
    #[error("`{0}` must be longer than zero")]
    ZeroDuration(&'static str),
    /// The publish window is zero or larger than [`NatsConfig::MAX_PUBLISH_WINDOW`].
    #[error(
        "the publish window must hold 1 to {} messages",
        NatsConfig::MAX_PUBLISH_WINDOW
    )]
    PublishWindow,
}

/// Where JetStream keeps the publication streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Storage {
    /// On disk (the default): survives a server restart.
    #[default]
    File,
    /// In memory: lost when the server stops (tests, caches).
    Memory,
}

/// How the transport names and configures what it creates at the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsConfig {
    prefix: String,
    replicas: usize,
    storage: Storage,
    duplicate_window: Duration,
    ack_wait: Duration,
    pull_expiry: Duration,
    publish_window: usize,
}

impl Default for NatsConfig {
    /// Prefix `eventcore`, one replica on file storage, a dedup window of 2 minutes
    /// (JetStream's), an acknowledgement wait of 30 s, pulls renewed every 5 s, and up
    /// to 1,024 publishes in flight.
    fn default() -> Self {
        NatsConfig {
            prefix: "eventcore".to_owned(),
            replicas: 1,
            storage: Storage::File,
            duplicate_window: Duration::from_secs(120),
            ack_wait: Duration::from_secs(30),
            pull_expiry: Duration::from_secs(5),
            publish_window: Self::MAX_PUBLISH_WINDOW,
        }
    }
}

impl NatsConfig {
    /// The first token of every subject and of every stream name (default
    /// `eventcore`): deployments sharing a server stay apart under different prefixes.
    ///
    /// # Errors
    ///
    /// [`InvalidNatsConfig::Prefix`] unless 1 to 32 ASCII letters, digits or `_`; `-`
    /// is refused because it separates the prefix from the service in stream names
    /// (prefix `a-b` and service `c` would share service `b-c`'s stream under `a`).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Result<Self, InvalidNatsConfig> {
        let prefix = prefix.into();
        let valid = (1..=32).contains(&prefix.len())
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid {
            return Err(InvalidNatsConfig::Prefix(prefix));
        }
        self.prefix = prefix;
        Ok(self)
    }

    /// Replicas of each publication stream (default 1; 3 on a cluster).
    ///
    /// # Errors
    ///
    /// [`InvalidNatsConfig::Replicas`] outside 1 to 5.
    pub fn with_replicas(mut self, replicas: usize) -> Result<Self, InvalidNatsConfig> {
        if !(1..=5).contains(&replicas) {
            return Err(InvalidNatsConfig::Replicas(replicas));
        }
        self.replicas = replicas;
        Ok(self)
    }

    /// Where the streams are kept (default [`Storage::File`]).
    pub fn with_storage(mut self, storage: Storage) -> Self {
        self.storage = storage;
        self
    }

    /// The streams' dedup window (default 2 minutes). An optimisation only: order and
    /// completeness never depend on it.
    ///
    /// # Errors
    ///
    /// [`InvalidNatsConfig::ZeroDuration`] for zero.
    pub fn with_duplicate_window(mut self, window: Duration) -> Result<Self, InvalidNatsConfig> {
        self.duplicate_window = positive(window, "duplicate_window")?;
        Ok(self)
    }

    /// How long a delivery may stay unacknowledged before the broker delivers it again
    /// (default 30 s): how long a crashed subscriber's event waits before another
    /// instance gets it. A handler slower than this sees its event handled twice at once
    /// (harmless: the effect is idempotent), so keep it above the slowest handling.
    ///
    /// # Errors
    ///
    /// [`InvalidNatsConfig::ZeroDuration`] for zero.
    pub fn with_ack_wait(mut self, ack_wait: Duration) -> Result<Self, InvalidNatsConfig> {
        self.ack_wait = positive(ack_wait, "ack_wait")?;
        Ok(self)
    }

    /// How long one pull request waits at the broker before it is renewed (default
    /// 5 s). Not a polling interval: a message is delivered as soon as it is there.
    ///
    /// # Errors
    ///
    /// [`InvalidNatsConfig::ZeroDuration`] for zero.
    pub fn with_pull_expiry(mut self, expiry: Duration) -> Result<Self, InvalidNatsConfig> {
        self.pull_expiry = positive(expiry, "pull_expiry")?;
        Ok(self)
    }

    /// The largest publish window: a fifth of the acknowledgements async-nats keeps in
    /// flight per JetStream context by default (5,000). Publishers sharing a context
    /// beyond that bound wait for room, taking their answers meanwhile.
    pub const MAX_PUBLISH_WINDOW: usize = 1_024;

    /// How many publishes a publisher keeps in flight before it awaits their
    /// acknowledgements (default and most [`NatsConfig::MAX_PUBLISH_WINDOW`]; W6 in
    /// `docs/performance.md` measured 256 against it).
    ///
    /// # Errors
    ///
    /// [`InvalidNatsConfig::PublishWindow`] for zero or more than the maximum.
    pub fn with_publish_window(mut self, window: usize) -> Result<Self, InvalidNatsConfig> {
        if window == 0 || window > Self::MAX_PUBLISH_WINDOW {
            return Err(InvalidNatsConfig::PublishWindow);
        }
        self.publish_window = window;
        Ok(self)
    }

    /// The subject prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The subject an event of `stream` published under `topic` goes to:
    /// `<prefix>.<topic>.<slot>.<escaped stream id>` (see `docs/distributed.md`), for
    /// tools that read or watch the broker.
    pub fn subject(
        &self,
        topic: &eventcore::distributed::Topic,
        stream: &eventcore::StreamId,
    ) -> String {
        Names::new(&self.prefix).subject(topic, stream)
    }

    /// The name of the JetStream stream holding `service`'s publication.
    pub fn stream_name(&self, service: &eventcore::distributed::ServiceId) -> String {
        Names::new(&self.prefix).stream(service)
    }
}

fn positive(duration: Duration, name: &'static str) -> Result<Duration, InvalidNatsConfig> {
    if duration.is_zero() {
        Err(InvalidNatsConfig::ZeroDuration(name))
    } else {
        Ok(duration)
    }
}

/// A connection to a NATS server with JetStream, and the configuration of what this
/// transport creates there: the factory of [`NatsPublisher`]s and [`NatsSubscriber`]s.
#[derive(Debug, Clone)]
pub struct NatsTransport {
    context: jetstream::Context,
    config: NatsConfig,
}

impl NatsTransport {
    /// The transport over `client` (connected with `async_nats::connect` or its
    /// `ConnectOptions`, which also set reconnection and TLS).
    pub fn new(client: async_nats::Client, config: NatsConfig) -> Self {
        NatsTransport {
            context: jetstream::new(client),
            config,
        }
    }

    /// The transport over a JetStream context built by the application (its API
    /// prefix or domain, request timeout, or bound on publishes in flight:
    /// `async_nats::jetstream::ContextBuilder`). Publishers sharing a context share that
    /// bound; each takes its answers while it waits for room, so none waits for good.
    /// The context must wait for room (`backpressure_on_inflight(true)`, async-nats'
    /// default): without it a publish beyond the bound fails, retryably.
    pub fn with_context(context: jetstream::Context, config: NatsConfig) -> Self {
        NatsTransport { context, config }
    }

    /// The publisher of `service`'s publication. Each call returns a new handle with
    /// its own view of where the publication ends.
    pub fn publisher(&self, service: eventcore::distributed::ServiceId) -> NatsPublisher {
        NatsPublisher::new(self.context.clone(), self.config.clone(), service)
    }

    /// A subscriber.
    pub fn subscriber(&self) -> NatsSubscriber {
        NatsSubscriber::new(self.context.clone(), self.config.clone())
    }

    /// The JetStream context (for tools and tests).
    pub fn context(&self) -> &jetstream::Context {
        &self.context
    }

    /// The configuration.
    pub fn config(&self) -> &NatsConfig {
        &self.config
    }
}

/// A broker failure as a [`TransportError`]: retryable unless the broker refused the
/// request itself.
fn unavailable(
    what: &str,
    error: impl std::error::Error + Send + Sync + 'static,
) -> TransportError {
    TransportError::unavailable(format!("{what}: {error}"), Some(Box::new(error)))
}

fn rejected(what: &str, error: impl std::error::Error + Send + Sync + 'static) -> TransportError {
    TransportError::rejected(format!("{what}: {error}"), Some(Box::new(error)))
}

/// A JetStream API error: the server's 5xx answers (no cluster leader yet, a peer
/// offline, an internal error) are worth retrying; its 4xx answers are refusals.
fn api_error(what: &str, api: &jetstream::Error) -> TransportError {
    let message = format!("{what}: {api}");
    if api.code() >= 500 {
        TransportError::unavailable(message, Some(Box::new(api.clone())))
    } else {
        TransportError::rejected(message, Some(Box::new(api.clone())))
    }
}
