//! Event federation: a hub that consumes the topics of source services and republishes
//! the events its [`RoutingRules`] match to topics of target services, transformed on
//! the way (type names renamed, personal data redacted, shapes mapped by your own
//! functions).
//!
//! The hub is a service of its own with its own store, built from the parts the rest
//! of the distribution layer is made of, and keeps their guarantees:
//!
//! - it consumes through a [`crate::distributed::SubscriptionRunner`]: each source
//!   event is routed **once** (an idempotency key per source event, committed with what
//!   it writes), a transformation that fails **parks** the event (visible in
//!   [`FederationHub::parked`], re-driven with [`FederationHub::redrive`]) and holds
//!   only its source stream, and an event no rule matches is acknowledged like any
//!   other, so the hub's position always advances;
//! - what it routes is written to its own store, one stream per (target, source
//!   stream), all the targets of one source event in one atomic append, under ids
//!   derived from (hub, source event, rule, target): per-source-stream order holds at
//!   every target, and a redelivery never makes a second copy;
//! - a [`crate::distributed::PublisherRunner`] publishes that store (the outbox) to one
//!   topic per target, completely, in order, deduplicated by those ids;
//! - every forwarded event keeps the original's correlation id and trace context, has
//!   the original event as its causation, and carries an origin and hop record
//!   (`eventcore.federation` in its custom metadata, naming the copy it belongs to, so a
//!   new event that inherited it from a forwarded one is a new origin): a hub never
//!   forwards an event it forwarded before (a loop through other hubs), nor one that
//!   already crossed [`RoutingRules::hop_limit`] hubs; custom metadata is forwarded as
//!   it is (transformations edit the payload only);
//! - [`FederationHub::run_as_leader`] keeps one active hub per name across processes.
//!
//! Rules are data (serde), checked when the [`Router`] is built: unknown services or
//! transformations, rules without targets, duplicate rules (same source and
//! transformation, overlapping patterns, a shared target), patterns other than `*`, an
//! exact name or `Prefix*`, and a hub that would consume its own output (its id among
//! its sources or targets, a target topic among its source topics) are typed
//! [`FederationError`]s.
//!
//! ```
//! use eventcore::distributed::federation::{Router, RoutingRules, TransformFunctions};
//!
//! let rules: RoutingRules = serde_json::from_str(r#"{
//!     "hub": "federation",
//!     "sources": [{ "service": "users", "topics": ["user-events"] }],
//!     "targets": [{ "service": "billing", "topic": "federated-billing" }],
//!     "transformations": {
//!         "user_to_customer": [{ "rename_type": { "from": "User", "to": "Customer" } }],
//!         "anonymize_pii": [{ "redact": { "pointers": ["/email", "/addresses/*/street"] } }]
//!     },
//!     "routes": [{
//!         "source_service": "users",
//!         "event_pattern": "User*",
//!         "target_services": ["billing"],
//!         "transformation": "user_to_customer"
//!     }]
//! }"#)?;
//! let router = Router::new(rules, TransformFunctions::new())?;
//! assert_eq!(router.hub().as_str(), "federation");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod edit;
mod hub;
mod rules;

pub use self::hub::FederationHub;
pub use self::rules::{
    EventPattern, FederationSource, FederationTarget, Forwarded, Forwarding, Router, Routing,
    RoutingRule, RoutingRules, Transform, TransformFunctions,
};

use super::names::ServiceId;
use crate::types::EventId;

/// The metadata key of the origin and hop record of a forwarded event.
pub const FEDERATION_METADATA_KEY: &str = "eventcore.federation";

/// The hop limit when the rules do not set one.
pub const DEFAULT_HOP_LIMIT: u32 = 8;

/// Routing rules that cannot be used, or a transformation that failed on an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FederationError {
    /// An event pattern other than `*`, an exact type name or `Prefix*`.
    #[error("invalid event pattern {pattern:?}: {reason}")]
    InvalidPattern {
        /// The refused pattern (cut to 300 bytes).
        pattern: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A rule names a service that is not among the hub's sources (or targets).
    #[error("rule {rule} names {role} service `{service}`, which is not among the hub's {role}s")]
    UnknownService {
        /// The rule's index in `routes`.
        rule: usize,
        /// `source` or `target`.
        role: &'static str,
        /// The service.
        service: ServiceId,
    },
    /// A rule names a transformation the rules do not define.
    #[error("rule {rule} names transformation `{name}`, which the rules do not define")]
    UnknownTransformation {
        /// The rule's index in `routes`.
        rule: usize,
        /// The name.
        name: String,
    },
    /// A transformation applies a function no one registered in the
    /// [`TransformFunctions`].
    #[error(
        "transformation `{transformation}` applies function `{function}`, which is not registered"
    )]
    UnknownFunction {
        /// The transformation.
        transformation: String,
        /// The function's name.
        function: String,
    },
    /// A rule with no target service.
    #[error("rule {rule} has no target service")]
    EmptyTargets {
        /// The rule's index in `routes`.
        rule: usize,
    },
    /// Two rules that would forward the same events the same way to the same target
    /// (same source and transformation, patterns some type matches both).
    #[error(
        "rule {rule} repeats rule {same_as} (same source, pattern and transformation, for target `{target}`)"
    )]
    DuplicateRule {
        /// The later rule's index.
        rule: usize,
        /// The earlier rule's index.
        same_as: usize,
        /// A target both name.
        target: ServiceId,
    },
    /// A service, target or topic listed twice.
    #[error("{what} `{name}` is listed twice")]
    Duplicate {
        /// What is listed twice (`source`, `target`, `target topic`, `target of rule 2`).
        what: String,
        /// Its name.
        name: String,
    },
    /// The hub among its own sources or targets, or a target topic among its source
    /// topics: it would consume what it publishes.
    #[error("the hub `{hub}` cannot be its own {role}: it would consume what it publishes")]
    HubInRules {
        /// The hub.
        hub: ServiceId,
        /// `source` or `target`.
        role: &'static str,
    },
    /// Rules with no route, a source with no topic, or a hop limit of 0.
    #[error("invalid routing rules: {reason}")]
    InvalidRules {
        /// What is wrong.
        reason: String,
    },
    /// A transformation step that cannot be used (an invalid JSON pointer, an empty
    /// name to rename, a replacement that is not a valid type name).
    #[error("transformation `{transformation}`, step {step}: {reason}")]
    InvalidStep {
        /// The transformation.
        transformation: String,
        /// The step's index.
        step: usize,
        /// What is wrong.
        reason: String,
    },
    /// The hub's publisher publishes another service's publication.
    #[error("the publisher given to hub `{hub}` publishes `{publisher}`")]
    WrongPublisher {
        /// The hub.
        hub: ServiceId,
        /// The publisher's service.
        publisher: ServiceId,
    },
    /// A transformation failed on an event (the event is parked).
    #[error("transformation `{transformation}` failed on event {event_id}: {reason}")]
    TransformFailed {
        /// The transformation.
        transformation: String,
        /// The source event.
        event_id: EventId,
        /// What failed.
        reason: String,
    },
}

impl FederationError {
    pub(crate) fn invalid_rules(reason: impl Into<String>) -> Self {
        FederationError::InvalidRules {
            reason: reason.into(),
        }
    }
}

impl From<FederationError> for crate::Error {
    fn from(error: FederationError) -> Self {
        crate::Error::Federation(error)
    }
}
