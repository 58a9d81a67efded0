//! Routing rules as data, and the [`Router`] they are checked and compiled into.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::edit::{self, Op, Pointer};
use super::{DEFAULT_HOP_LIMIT, FEDERATION_METADATA_KEY, FederationError};
use crate::distributed::envelope::DistributedEvent;
use crate::distributed::names::{ServiceId, SubscriptionName, Topic};
use crate::distributed::policy::{PublicationPolicy, PublicationRule};
use crate::distributed::transport::SubscriptionSpec;
use crate::error::{BoxError, error_chain, truncate_for_error};
use crate::event::{EventData, EventPayload};
use crate::names::{EventType, MAX_NAME_LEN, StreamId};
use crate::types::{CausationId, EventId};

/// Which event types a rule matches: `*` (every type), an exact type name, or
/// `Prefix*` (every type starting with `Prefix`). Anything else (`*Created`, `A*B`,
/// `**`, an empty pattern) is refused when it is built or deserialized.
///
/// ```
/// use eventcore::distributed::federation::EventPattern;
///
/// let users = EventPattern::try_new("User*")?;
/// assert!(users.matches("UserRegistered"));
/// assert!(!users.matches("OrderPlaced"));
/// assert!(EventPattern::try_new("*Registered").is_err());
/// # Ok::<(), eventcore::distributed::federation::FederationError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EventPattern {
    text: String,
    kind: PatternKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum PatternKind {
    Any,
    Exact,
    Prefix(usize),
}

impl EventPattern {
    /// Parses `*`, an exact type name or `Prefix*`.
    ///
    /// # Errors
    ///
    /// [`FederationError::InvalidPattern`] for anything else, and for an exact name or
    /// prefix that is not a valid event type name.
    pub fn try_new(pattern: &str) -> Result<Self, FederationError> {
        let refuse = |reason| FederationError::InvalidPattern {
            pattern: truncate_for_error(pattern),
            reason,
        };
        let kind = if pattern == "*" {
            PatternKind::Any
        } else if let Some(prefix) = pattern.strip_suffix('*') {
            if prefix.contains('*') {
                return Err(refuse("`*` may only end a pattern, once"));
            }
            EventType::try_new(prefix)
                .map_err(|_| refuse("the prefix is not the start of a valid type name"))?;
            PatternKind::Prefix(prefix.len())
        } else if pattern.contains('*') {
            return Err(refuse(
                "`*` may only end a pattern (`Prefix*`) or be the whole pattern",
            ));
        } else {
            EventType::try_new(pattern).map_err(|_| refuse("not a valid event type name"))?;
            PatternKind::Exact
        };
        Ok(EventPattern {
            text: pattern.to_owned(),
            kind,
        })
    }

    /// Whether `event_type` matches.
    pub fn matches(&self, event_type: &str) -> bool {
        match self.kind {
            PatternKind::Any => true,
            PatternKind::Exact => self.text == event_type,
            PatternKind::Prefix(len) => event_type.starts_with(&self.text[..len]),
        }
    }

    /// Whether some event type matches both.
    pub fn overlaps(&self, other: &EventPattern) -> bool {
        match (&self.kind, &other.kind) {
            (PatternKind::Any, _) | (_, PatternKind::Any) => true,
            (PatternKind::Exact, PatternKind::Exact) => self.text == other.text,
            (PatternKind::Exact, PatternKind::Prefix(_)) => other.matches(&self.text),
            (PatternKind::Prefix(_), PatternKind::Exact) => self.matches(&other.text),
            (PatternKind::Prefix(a), PatternKind::Prefix(b)) => {
                let (a, b) = (&self.text[..*a], &other.text[..*b]);
                a.starts_with(b) || b.starts_with(a)
            }
        }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for EventPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for EventPattern {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for EventPattern {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        EventPattern::try_new(&text).map_err(serde::de::Error::custom)
    }
}

/// A service whose topics the hub consumes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationSource {
    /// The publishing service.
    pub service: ServiceId,
    /// Its topics the hub subscribes to.
    pub topics: Vec<Topic>,
}

/// A service the hub forwards to, and the hub's topic it subscribes to for that.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationTarget {
    /// The receiving service.
    pub service: ServiceId,
    /// The topic (owned by the hub) the hub publishes its events to.
    pub topic: Topic,
}

/// One step of a transformation, as data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Transform {
    /// Renames an event type starting with `from`: that start becomes `to`
    /// (`UserRegistered` → `CustomerRegistered` for `User` → `Customer`); other types
    /// are left as they are.
    RenameType {
        /// The start of the names to rename.
        from: String,
        /// What it becomes.
        to: String,
    },
    /// Replaces the values at these JSON pointers (RFC 6901; a token `*` is every
    /// member or element) with `with` (default `"[redacted]"`); a pointer reaching
    /// nothing changes nothing. Everything else of the payload is kept as written.
    Redact {
        /// Where.
        pointers: Vec<String>,
        /// The replacement value.
        #[serde(default = "redacted")]
        with: serde_json::Value,
    },
    /// Removes the values at these JSON pointers (members from their objects, elements
    /// from their arrays).
    Remove {
        /// Where.
        pointers: Vec<String>,
    },
    /// Applies the function registered under this name in the [`TransformFunctions`].
    Apply {
        /// Its name.
        function: String,
    },
}

fn redacted() -> serde_json::Value {
    serde_json::Value::String("[redacted]".to_owned())
}

/// One routing rule: events of `source_service` whose type matches `event_pattern`
/// go to every one of `target_services`, through `transformation` if it names one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingRule {
    /// The service the events come from.
    pub source_service: ServiceId,
    /// Which of its event types.
    pub event_pattern: EventPattern,
    /// Where they go.
    pub target_services: Vec<ServiceId>,
    /// The transformation applied on the way (a key of
    /// [`RoutingRules::transformations`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transformation: Option<String>,
}

/// A hub's whole configuration, as data (load it from a file with any serde format).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingRules {
    /// The hub's own service id: the publisher of what it forwards.
    pub hub: ServiceId,
    /// The services (and topics) it consumes.
    pub sources: Vec<FederationSource>,
    /// The services it forwards to.
    pub targets: Vec<FederationTarget>,
    /// Named transformations: steps applied in order.
    #[serde(default)]
    pub transformations: BTreeMap<String, Vec<Transform>>,
    /// The rules, in order: an event matching several is forwarded once per rule and
    /// target, in this order.
    pub routes: Vec<RoutingRule>,
    /// How many hubs an event may have crossed before this one still forwards it
    /// (default [`DEFAULT_HOP_LIMIT`]).
    #[serde(default = "default_hop_limit")]
    pub hop_limit: u32,
}

fn default_hop_limit() -> u32 {
    DEFAULT_HOP_LIMIT
}

/// What a transformation works on: the forwarded event's type and payload.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Forwarding {
    /// The type name it will be stored and published under.
    pub event_type: EventType,
    /// Its payload.
    pub payload: EventPayload,
}

impl Forwarding {
    /// A forwarded type and payload (what a function returns).
    pub fn new(event_type: EventType, payload: EventPayload) -> Self {
        Forwarding {
            event_type,
            payload,
        }
    }
}

type TransformFn =
    dyn Fn(&DistributedEvent, Forwarding) -> Result<Forwarding, BoxError> + Send + Sync;

/// Your own transformations, by name, for [`Transform::Apply`]: map one shape to
/// another (decode the payload into your type, build the target's).
#[derive(Clone, Default)]
pub struct TransformFunctions {
    functions: BTreeMap<String, Arc<TransformFn>>,
}

impl fmt::Debug for TransformFunctions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.functions.keys()).finish()
    }
}

impl TransformFunctions {
    /// None.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `function` under `name` (replacing one registered under it before). It
    /// gets the source event and what the earlier steps made of it; an error parks
    /// the event.
    pub fn with<F>(mut self, name: impl Into<String>, function: F) -> Self
    where
        F: Fn(&DistributedEvent, Forwarding) -> Result<Forwarding, BoxError>
            + Send
            + Sync
            + 'static,
    {
        self.functions.insert(name.into(), Arc::new(function));
        self
    }
}

/// A checked step.
#[derive(Clone)]
enum Step {
    Rename {
        from: String,
        to: String,
    },
    Redact {
        pointers: Vec<Pointer>,
        with: String,
    },
    Remove {
        pointers: Vec<Pointer>,
    },
    Apply {
        function: Arc<TransformFn>,
    },
}

/// A checked rule.
#[derive(Clone)]
struct Route {
    index: usize,
    /// The rule's source, pattern and transformation as JSON: its identity in derived
    /// event ids, so reordering the rules changes no id.
    key: String,
    source: ServiceId,
    pattern: EventPattern,
    targets: Vec<ServiceId>,
    transformation: Option<(String, Arc<[Step]>)>,
}

/// The routing rules, checked: what a [`super::FederationHub`] routes with. Pure, so
/// a rule set can be tested without a broker ([`Router::route`]).
#[derive(Clone)]
pub struct Router {
    hub: ServiceId,
    topics: Vec<Topic>,
    targets: BTreeMap<ServiceId, Topic>,
    routes: Vec<Route>,
    hop_limit: u32,
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field("hub", &self.hub)
            .field("topics", &self.topics)
            .field("targets", &self.targets)
            .field("routes", &self.routes.len())
            .field("hop_limit", &self.hop_limit)
            .finish()
    }
}

/// What the router makes of one source event.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Routing {
    /// Forwarded: one event per (matching rule, target), in rule order.
    Forward(Vec<Forwarded>),
    /// No rule matches it.
    Unmatched,
    /// This hub forwarded it before (it came back through other hubs): not again.
    Loop,
    /// It crossed as many hubs as the hop limit allows.
    HopLimit,
}

/// One event to forward.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Forwarded {
    /// The index of the rule that matched.
    pub rule: usize,
    /// The target service.
    pub target: ServiceId,
    /// The hub's stream it is written to (`federated/<target>/<source>/<stream>`).
    pub stream: StreamId,
    /// The event, with its derived id.
    pub event: EventData,
}

/// The origin and hop record in a forwarded event's metadata. It belongs to the copy
/// whose id it names: a service reacting to a forwarded event may pass its custom
/// metadata on to its own new events (`Dispatcher::inherit_metadata` does), and those
/// are new origins, not the forwarded event coming back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Record {
    origin: Origin,
    hops: Vec<ServiceId>,
    forwarded_id: EventId,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Origin {
    service: ServiceId,
    stream: StreamId,
    event_id: EventId,
    event_type: EventType,
}

/// The namespace of derived event ids (a fixed random UUID).
const ID_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6f1c_2a8e_95d4_4b7a_a3e0_5c1d_7e92_b4f3);

impl Router {
    /// Checks `rules` (with `functions` for their [`Transform::Apply`] steps).
    ///
    /// # Errors
    ///
    /// A [`FederationError`] naming the first problem found.
    pub fn new(
        rules: RoutingRules,
        functions: TransformFunctions,
    ) -> Result<Self, FederationError> {
        let hub = rules.hub;
        if rules.hop_limit == 0 {
            return Err(FederationError::invalid_rules(
                "a hop limit of 0 forwards nothing",
            ));
        }
        if rules.routes.is_empty() {
            return Err(FederationError::invalid_rules("there is no route"));
        }
        let mut sources = BTreeSet::new();
        let mut topics: Vec<Topic> = Vec::new();
        for source in &rules.sources {
            if source.service == hub {
                return Err(FederationError::HubInRules {
                    hub,
                    role: "source",
                });
            }
            if !sources.insert(source.service.clone()) {
                return Err(duplicate("source", source.service.as_str()));
            }
            if source.topics.is_empty() {
                return Err(FederationError::invalid_rules(format!(
                    "source `{}` lists no topic",
                    source.service
                )));
            }
            for topic in &source.topics {
                if topics.contains(topic) {
                    return Err(duplicate("source topic", topic.as_str()));
                }
                topics.push(topic.clone());
            }
        }
        let mut targets = BTreeMap::new();
        for target in &rules.targets {
            if target.service == hub {
                return Err(FederationError::HubInRules {
                    hub,
                    role: "target",
                });
            }
            if topics.contains(&target.topic) {
                return Err(FederationError::HubInRules {
                    hub,
                    role: "source of its own target topic",
                });
            }
            if targets.values().any(|t| t == &target.topic) {
                return Err(duplicate("target topic", target.topic.as_str()));
            }
            if targets
                .insert(target.service.clone(), target.topic.clone())
                .is_some()
            {
                return Err(duplicate("target", target.service.as_str()));
            }
        }
        let mut transformations: BTreeMap<String, Arc<[Step]>> = BTreeMap::new();
        for (name, steps) in &rules.transformations {
            let steps = steps
                .iter()
                .enumerate()
                .map(|(n, step)| compile_step(name, n, step, &functions))
                .collect::<Result<Vec<_>, _>>()?;
            transformations.insert(name.clone(), steps.into());
        }
        let mut routes: Vec<Route> = Vec::with_capacity(rules.routes.len());
        for (index, rule) in rules.routes.iter().enumerate() {
            if !sources.contains(&rule.source_service) {
                return Err(FederationError::UnknownService {
                    rule: index,
                    role: "source",
                    service: rule.source_service.clone(),
                });
            }
            if rule.target_services.is_empty() {
                return Err(FederationError::EmptyTargets { rule: index });
            }
            let mut seen = BTreeSet::new();
            for target in &rule.target_services {
                if !targets.contains_key(target) {
                    return Err(FederationError::UnknownService {
                        rule: index,
                        role: "target",
                        service: target.clone(),
                    });
                }
                if !seen.insert(target) {
                    return Err(duplicate(
                        &format!("target of rule {index}"),
                        target.as_str(),
                    ));
                }
            }
            let transformation = match &rule.transformation {
                None => None,
                Some(name) => Some((
                    name.clone(),
                    transformations.get(name).cloned().ok_or_else(|| {
                        FederationError::UnknownTransformation {
                            rule: index,
                            name: name.clone(),
                        }
                    })?,
                )),
            };
            for earlier in &routes {
                let same = earlier.source == rule.source_service
                    && earlier.pattern.overlaps(&rule.event_pattern)
                    && earlier.transformation.as_ref().map(|(n, _)| n)
                        == rule.transformation.as_ref();
                if let Some(target) = rule
                    .target_services
                    .iter()
                    .find(|t| same && earlier.targets.contains(t))
                {
                    return Err(FederationError::DuplicateRule {
                        rule: index,
                        same_as: earlier.index,
                        target: target.clone(),
                    });
                }
            }
            routes.push(Route {
                index,
                // Without the targets: each (rule, target) pair is unique (the duplicate
                // check), and a target added to a rule leaves the others' ids as they were.
                key: serde_json::to_string(&(
                    &rule.source_service,
                    &rule.event_pattern,
                    &rule.transformation,
                ))
                .unwrap_or_default(),
                source: rule.source_service.clone(),
                pattern: rule.event_pattern.clone(),
                targets: rule.target_services.clone(),
                transformation,
            });
        }
        Ok(Router {
            hub,
            topics,
            targets,
            routes,
            hop_limit: rules.hop_limit,
        })
    }

    /// The hub's service id.
    pub fn hub(&self) -> &ServiceId {
        &self.hub
    }

    /// The hub's subscription: every source topic, as subscription `federation` of the
    /// hub.
    pub fn subscription_spec(&self) -> SubscriptionSpec {
        SubscriptionSpec::new(
            self.hub.clone(),
            SubscriptionName::try_new("federation").expect("a valid name"),
            self.topics.iter().cloned(),
        )
    }

    /// The hub's publication: each target's streams to its topic.
    ///
    /// # Errors
    ///
    /// What [`PublicationPolicy::new`] refuses (nothing, for checked rules).
    pub fn publication_policy(&self) -> crate::Result<PublicationPolicy> {
        PublicationPolicy::new(self.targets.iter().map(|(service, topic)| {
            PublicationRule::new(topic.clone()).with_stream_prefix(format!("federated/{service}/"))
        }))
    }

    /// The topic the hub publishes `target`'s events to.
    pub fn target_topic(&self, target: &ServiceId) -> Option<&Topic> {
        self.targets.get(target)
    }

    /// Routes one source event.
    ///
    /// # Errors
    ///
    /// [`FederationError::TransformFailed`] when a transformation fails on it (or its
    /// origin record is malformed): the hub parks it.
    pub fn route(&self, event: &DistributedEvent) -> Result<Routing, FederationError> {
        let failed = |transformation: &str, reason: String| FederationError::TransformFailed {
            transformation: transformation.to_owned(),
            event_id: event.event_id,
            reason,
        };
        let record = match event.metadata.custom.get(FEDERATION_METADATA_KEY) {
            None => None,
            Some(value) => match serde_json::from_value::<Record>(value.clone()) {
                // The record of this very event: it was forwarded by a hub.
                Ok(record) if record.forwarded_id == event.event_id => Some(record),
                // Inherited by a new event (or written by hand): a new origin.
                Ok(_) => None,
                Err(error) => {
                    tracing::warn!(
                        hub = %self.hub,
                        event_id = %event.event_id,
                        %error,
                        "ignoring a malformed federation record: the event is a new origin"
                    );
                    None
                }
            },
        };
        if let Some(record) = &record {
            if record.hops.contains(&self.hub) {
                return Ok(Routing::Loop);
            }
            if record.hops.len() >= self.hop_limit as usize {
                return Ok(Routing::HopLimit);
            }
        }
        let mut forwarded = Vec::new();
        for route in &self.routes {
            if route.source != event.service_id || !route.pattern.matches(event.event_type.as_str())
            {
                continue;
            }
            let mut shaped = Forwarding::new(event.event_type.clone(), event.payload.clone());
            if let Some((name, steps)) = &route.transformation {
                for step in steps.iter() {
                    shaped =
                        apply_step(step, event, shaped).map_err(|reason| failed(name, reason))?;
                }
            }
            let mut record = record.clone().unwrap_or_else(|| Record {
                origin: Origin {
                    service: event.service_id.clone(),
                    stream: event.stream_id.clone(),
                    event_id: event.event_id,
                    event_type: event.event_type.clone(),
                },
                hops: Vec::new(),
                forwarded_id: event.event_id,
            });
            record.hops.push(self.hub.clone());
            let mut metadata = event.metadata.clone();
            metadata.causation_id = Some(CausationId::from(event.event_id));
            metadata.trace_context = event.trace_context.clone();
            for target in &route.targets {
                let id = EventId::from_uuid(uuid::Uuid::new_v5(
                    &ID_NAMESPACE,
                    format!(
                        "{}\n{}\n{}\n{}\n{}",
                        self.hub, event.service_id, event.event_id, route.key, target
                    )
                    .as_bytes(),
                ));
                record.forwarded_id = id;
                let mut metadata = metadata.clone();
                metadata.custom.insert(
                    FEDERATION_METADATA_KEY.to_owned(),
                    serde_json::to_value(&record)
                        .map_err(|e| failed(FEDERATION_METADATA_KEY, e.to_string()))?,
                );
                let mut data =
                    EventData::new(shaped.event_type.clone(), shaped.payload.clone(), metadata);
                data.event_id = id;
                forwarded.push(Forwarded {
                    rule: route.index,
                    target: target.clone(),
                    stream: hub_stream(target, &event.service_id, &event.stream_id),
                    event: data,
                });
            }
        }
        Ok(if forwarded.is_empty() {
            Routing::Unmatched
        } else {
            Routing::Forward(forwarded)
        })
    }
}

fn duplicate(what: &str, name: &str) -> FederationError {
    FederationError::Duplicate {
        what: what.to_owned(),
        name: name.to_owned(),
    }
}

/// The hub's stream for `target`'s copies of source stream `stream` of `source`:
/// `federated/<target>/<source>/<stream>`, or, when that is too long for a stream id,
/// `federated/<target>/<source>#<uuid>` with a UUID derived from the source stream.
fn hub_stream(target: &ServiceId, source: &ServiceId, stream: &StreamId) -> StreamId {
    let readable = format!("federated/{target}/{source}/{stream}");
    if readable.len() <= MAX_NAME_LEN
        && let Ok(id) = StreamId::try_new(readable)
    {
        return id;
    }
    let derived = uuid::Uuid::new_v5(&ID_NAMESPACE, stream.as_str().as_bytes());
    // `#` is in no service id, so this is no readable id of another stream; service ids
    // are at most 64 bytes of ASCII, so it always fits.
    StreamId::try_new(format!("federated/{target}/{source}#{derived}"))
        .expect("a derived stream id is valid")
}

fn compile_step(
    transformation: &str,
    index: usize,
    step: &Transform,
    functions: &TransformFunctions,
) -> Result<Step, FederationError> {
    let invalid = |reason: String| FederationError::InvalidStep {
        transformation: transformation.to_owned(),
        step: index,
        reason,
    };
    let pointers = |pointers: &[String]| {
        if pointers.is_empty() {
            return Err(invalid("it lists no JSON pointer".to_owned()));
        }
        pointers
            .iter()
            .map(|p| Pointer::parse(p).map_err(&invalid))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(match step {
        Transform::RenameType { from, to } => {
            if from.is_empty() {
                return Err(invalid(
                    "`from` is empty (it would rename every type)".to_owned(),
                ));
            }
            if !to.is_empty() {
                EventType::try_new(to.as_str())
                    .map_err(|e| invalid(format!("`to` cannot start a type name: {e}")))?;
            }
            Step::Rename {
                from: from.clone(),
                to: to.clone(),
            }
        }
        Transform::Redact { pointers: p, with } => {
            let with = serde_json::to_string(with).map_err(|e| invalid(e.to_string()))?;
            EventPayload::from_json(with.as_str())
                .map_err(|e| invalid(format!("the replacement is refused: {e}")))?;
            Step::Redact {
                pointers: pointers(p)?,
                with,
            }
        }
        Transform::Remove { pointers: p } => Step::Remove {
            pointers: pointers(p)?,
        },
        Transform::Apply { function } => Step::Apply {
            function: functions.functions.get(function).cloned().ok_or_else(|| {
                FederationError::UnknownFunction {
                    transformation: transformation.to_owned(),
                    function: function.clone(),
                }
            })?,
        },
    })
}

fn apply_step(
    step: &Step,
    event: &DistributedEvent,
    shaped: Forwarding,
) -> Result<Forwarding, String> {
    match step {
        Step::Rename { from, to } => {
            let Some(rest) = shaped.event_type.as_str().strip_prefix(from.as_str()) else {
                return Ok(shaped);
            };
            let renamed = EventType::try_new(format!("{to}{rest}"))
                .map_err(|e| format!("the renamed type is invalid: {e}"))?;
            Ok(Forwarding::new(renamed, shaped.payload))
        }
        Step::Redact { pointers, with } => edit_payload(shaped, pointers, Op::Replace(with)),
        Step::Remove { pointers } => edit_payload(shaped, pointers, Op::Remove),
        // A panic in your function is a failed transformation (the event is parked),
        // not the end of the hub.
        Step::Apply { function } => {
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| function(event, shaped)))
            {
                Ok(result) => result.map_err(|error| error_chain(&*error)),
                Err(panic) => Err(format!(
                    "the function panicked: {}",
                    panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "(no message)".to_owned())
                )),
            }
        }
    }
}

fn edit_payload(
    shaped: Forwarding,
    pointers: &[Pointer],
    op: Op<'_>,
) -> Result<Forwarding, String> {
    let mut text: Option<String> = None;
    for pointer in pointers {
        let current = text.as_deref().unwrap_or(shaped.payload.as_str());
        if let Some(edited) = edit::apply(current, pointer, op).map_err(|e| e.to_string())? {
            text = Some(edited);
        }
    }
    match text {
        None => Ok(shaped),
        Some(text) => {
            let payload = EventPayload::from_json(text)
                .map_err(|e| format!("the edited payload is refused: {e}"))?;
            Ok(Forwarding::new(shaped.event_type, payload))
        }
    }
}
