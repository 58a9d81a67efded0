//! Federation. The router, without a broker: every refused rule set, the routing
//! matrix (matching, non-matching, several targets, several rules), the transformations
//! (rename, redact and remove on nested objects, arrays and missing fields, a user
//! function), derived ids, the origin and hop record, loops and the hop limit. Then the
//! running hub on the in-memory broker and on a real NATS server: routing end to end
//! with the hub's position advancing over unmatched events, a crash between consume
//! and forward (no duplicate at the target), a loop through two hubs, a poison
//! transformation parked while the rest flows and re-driven, and one active hub per
//! name.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use eventcore::distributed::federation::{
    EventPattern, FEDERATION_METADATA_KEY, FederationError, FederationHub, Forwarding, Router,
    Routing, RoutingRules, TransformFunctions,
};
use eventcore::distributed::{
    DistributedEvent, EventPublisher, EventSubscriber, PublicationPolicy, PublicationRule,
    PublisherRunner, ServiceId, Subscription, SubscriptionName, SubscriptionSpec, Topic,
};
use eventcore::{
    AppendRequest, CorrelationId, Error, EventData, EventMetadata, EventPayload, EventStore,
    EventType, ExpectedVersion, GlobalPosition, LogQuery, OnFailure, ProjectionErrorPolicy,
    RecordedEvent, StreamId, StreamVersion, TraceContext,
};
use eventcore_memory::{InMemoryBroker, InMemoryEventStore, InMemoryLeaderElection};
use serde_json::json;

fn service(name: &str) -> ServiceId {
    ServiceId::try_new(name).expect("valid")
}

/// The hub `federation`: consumes `users` (user-events) and `orders` (order-events);
/// forwards to `billing` and `crm`.
fn rules(routes: serde_json::Value) -> RoutingRules {
    serde_json::from_value(json!({
        "hub": "federation",
        "sources": [
            { "service": "users", "topics": ["user-events"] },
            { "service": "orders", "topics": ["order-events"] }
        ],
        "targets": [
            { "service": "billing", "topic": "federated-billing" },
            { "service": "crm", "topic": "federated-crm" }
        ],
        "transformations": {
            "user_to_customer": [{ "rename_type": { "from": "User", "to": "Customer" } }],
            "anonymize_pii": [
                { "redact": { "pointers": ["/email", "/contacts/*/phone"] } },
                { "remove": { "pointers": ["/address/street"] } }
            ],
            "to_v2": [{ "apply": { "function": "to_v2" } }]
        },
        "routes": routes
    }))
    .expect("rules deserialize")
}

fn functions() -> TransformFunctions {
    TransformFunctions::new().with("to_v2", |_event, shaped: Forwarding| {
        let value: serde_json::Value = shaped.payload.deserialize_as()?;
        if value.get("poison").is_some() {
            return Err("this payload cannot be mapped".into());
        }
        assert!(value.get("panic").is_none(), "boom");
        let mapped = json!({ "v": 2, "was": value });
        Ok(Forwarding::new(
            EventType::try_new(format!("{}V2", shaped.event_type))?,
            EventPayload::from_json(mapped.to_string())?,
        ))
    })
}

fn router(routes: serde_json::Value) -> Router {
    Router::new(rules(routes), functions()).expect("valid rules")
}

/// Event `n` of `stream`, published by `from`.
fn source_event(
    from: &str,
    stream: &str,
    version: u64,
    event_type: &str,
    payload: serde_json::Value,
) -> DistributedEvent {
    let metadata = EventMetadata::new(CorrelationId::new())
        .with_actor("alice")
        .with_custom("tenant", "t-1")
        .with_trace_context(
            TraceContext::new("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
                .expect("valid"),
        );
    let recorded = RecordedEvent::new(
        eventcore::EventId::new(),
        StreamId::try_new(stream).expect("valid"),
        StreamVersion::new(version),
        GlobalPosition::new(version),
        EventType::try_new(event_type).expect("valid"),
        EventPayload::from_json(payload.to_string()).expect("valid"),
        Arc::new(metadata),
        chrono::Utc::now(),
    );
    DistributedEvent::from_recorded(&recorded, &service(from), chrono::Utc::now())
        .expect("readable")
}

fn forwarded(routing: Routing) -> Vec<eventcore::distributed::federation::Forwarded> {
    match routing {
        Routing::Forward(copies) => copies,
        other => panic!("expected copies, got {other:?}"),
    }
}

#[test]
fn refused_rule_sets_are_typed_errors() {
    let route = |source: &str, pattern: &str, targets: &[&str], transformation: Option<&str>| {
        let mut rule = json!({
            "source_service": source, "event_pattern": pattern, "target_services": targets
        });
        if let Some(t) = transformation {
            rule["transformation"] = json!(t);
        }
        rule
    };
    let refused =
        |routes: serde_json::Value| Router::new(rules(routes), functions()).expect_err("refused");
    assert!(matches!(
        refused(json!([route("payments", "*", &["billing"], None)])),
        FederationError::UnknownService {
            rule: 0,
            role: "source",
            ..
        }
    ));
    assert!(matches!(
        refused(json!([route("users", "*", &["billing", "shipping"], None)])),
        FederationError::UnknownService {
            rule: 0,
            role: "target",
            ..
        }
    ));
    assert!(matches!(
        refused(json!([route("users", "*", &[], None)])),
        FederationError::EmptyTargets { rule: 0 }
    ));
    assert!(matches!(
        refused(json!([route("users", "*", &["crm"], Some("nope"))])),
        FederationError::UnknownTransformation { rule: 0, .. }
    ));
    assert!(matches!(
        refused(json!([
            route("users", "User*", &["crm"], None),
            route("orders", "User*", &["crm"], None),
            route("users", "User*", &["billing", "crm"], None)
        ])),
        FederationError::DuplicateRule {
            rule: 2,
            same_as: 0,
            ..
        }
    ));
    assert!(matches!(
        refused(json!([route("users", "*", &["crm", "crm"], None)])),
        FederationError::Duplicate { .. }
    ));
    assert!(matches!(
        refused(json!([])),
        FederationError::InvalidRules { .. }
    ));
    // Overlapping patterns are duplicates too: `*` and `User*`, `User*` and an exact
    // `UserRegistered`, `User*` and `UserReg*`.
    for (a, b) in [
        ("*", "User*"),
        ("User*", "UserRegistered"),
        ("UserReg*", "User*"),
    ] {
        assert!(
            matches!(
                refused(json!([
                    route("users", a, &["crm"], None),
                    route("users", b, &["crm"], None)
                ])),
                FederationError::DuplicateRule {
                    rule: 1,
                    same_as: 0,
                    ..
                }
            ),
            "{a} and {b}"
        );
    }
    // Disjoint patterns, or the same events to other targets, are not.
    Router::new(
        rules(json!([
            route("users", "User*", &["crm"], None),
            route("users", "Profile*", &["crm"], None),
            route("users", "User*", &["billing"], None)
        ])),
        functions(),
    )
    .expect("disjoint rules");
    // Same source and pattern with another transformation is not a duplicate.
    Router::new(
        rules(json!([
            route("users", "User*", &["crm"], None),
            route("users", "User*", &["crm"], Some("anonymize_pii"))
        ])),
        functions(),
    )
    .expect("two shapes of the same events");

    // Patterns: only `*`, exact and `Prefix*`, refused when deserialized.
    for bad in ["*Registered", "User*Registered", "**", "", "a*b*"] {
        assert!(EventPattern::try_new(bad).is_err(), "{bad:?}");
        let mut raw = serde_json::to_value(rules(json!([route("users", "*", &["crm"], None)])))
            .expect("serializes");
        raw["routes"][0]["event_pattern"] = json!(bad);
        assert!(
            serde_json::from_value::<RoutingRules>(raw).is_err(),
            "{bad:?}"
        );
    }

    // A function no one registered; a bad pointer; the hub as its own source.
    let mut raw =
        serde_json::to_value(rules(json!([route("users", "*", &["crm"], Some("to_v2"))])))
            .expect("serializes");
    assert!(matches!(
        Router::new(
            serde_json::from_value(raw.clone()).expect("rules"),
            TransformFunctions::new()
        ),
        Err(FederationError::UnknownFunction { .. })
    ));
    raw["transformations"]["anonymize_pii"][0]["redact"]["pointers"] = json!(["email"]);
    assert!(matches!(
        Router::new(
            serde_json::from_value(raw.clone()).expect("rules"),
            functions()
        ),
        Err(FederationError::InvalidStep { step: 0, .. })
    ));
    let mut raw = serde_json::to_value(rules(json!([route("users", "*", &["crm"], None)])))
        .expect("serializes");
    raw["sources"][0]["service"] = json!("federation");
    raw["routes"][0]["source_service"] = json!("federation");
    assert!(matches!(
        Router::new(
            serde_json::from_value(raw.clone()).expect("rules"),
            functions()
        ),
        Err(FederationError::HubInRules { role: "source", .. })
    ));
    // The hub as a target, a target topic it consumes, services and topics listed
    // twice, a hop limit of 0, a source without topics, a rename of nothing, a
    // rename to a name no type can start with.
    let base = serde_json::to_value(rules(json!([route("users", "*", &["crm"], None)])))
        .expect("serializes");
    let broken = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut raw = base.clone();
        edit(&mut raw);
        Router::new(serde_json::from_value(raw).expect("rules"), functions()).expect_err("refused")
    };
    assert!(matches!(
        broken(&|r| r["targets"][0]["service"] = json!("federation")),
        FederationError::HubInRules { role: "target", .. }
    ));
    assert!(matches!(
        broken(&|r| r["targets"][0]["topic"] = json!("user-events")),
        FederationError::HubInRules { .. }
    ));
    assert!(matches!(
        broken(&|r| r["sources"][1]["service"] = json!("users")),
        FederationError::Duplicate { .. }
    ));
    assert!(matches!(
        broken(&|r| r["sources"][1]["topics"] = json!(["user-events"])),
        FederationError::Duplicate { .. }
    ));
    assert!(matches!(
        broken(&|r| r["targets"][1]["topic"] = json!("federated-billing")),
        FederationError::Duplicate { .. }
    ));
    assert!(matches!(
        broken(&|r| r["hop_limit"] = json!(0)),
        FederationError::InvalidRules { .. }
    ));
    assert!(matches!(
        broken(&|r| r["sources"][1]["topics"] = json!([])),
        FederationError::InvalidRules { .. }
    ));
    assert!(matches!(
        broken(&|r| r["transformations"]["user_to_customer"][0]["rename_type"]["from"] = json!("")),
        FederationError::InvalidStep { step: 0, .. }
    ));
    assert!(matches!(
        broken(
            &|r| r["transformations"]["user_to_customer"][0]["rename_type"]["to"] = json!("\u{7}")
        ),
        FederationError::InvalidStep { step: 0, .. }
    ));
    // Unknown fields are refused, not ignored.
    raw["routes"][0]["targets"] = json!(["crm"]);
    assert!(serde_json::from_value::<RoutingRules>(raw).is_err());
}

/// The derived id of the pinned event's copy for billing under rule 0.
const PINNED_BILLING_ID: &str = "b1e4e232-fad8-5eee-bd94-036a893a48f1";

#[test]
fn the_routing_matrix() {
    let router = router(json!([
        { "source_service": "users", "event_pattern": "User*", "target_services": ["billing", "crm"] },
        { "source_service": "users", "event_pattern": "UserDeleted", "target_services": ["crm"],
          "transformation": "user_to_customer" },
        { "source_service": "orders", "event_pattern": "*", "target_services": ["billing"] }
    ]));
    let registered = source_event("users", "user-1", 1, "UserRegistered", json!({"n": 1}));
    let copies = forwarded(router.route(&registered).expect("routes"));
    let targets: Vec<(usize, &str)> = copies.iter().map(|c| (c.rule, c.target.as_str())).collect();
    assert_eq!(targets, [(0, "billing"), (0, "crm")]);
    assert_eq!(copies[0].stream.as_str(), "federated/billing/users/user-1");
    assert_eq!(copies[1].stream.as_str(), "federated/crm/users/user-1");

    // Two rules match: once per rule and target, in rule order.
    let deleted = source_event("users", "user-1", 2, "UserDeleted", json!({}));
    let copies = forwarded(router.route(&deleted).expect("routes"));
    let shaped: Vec<(usize, &str, &str)> = copies
        .iter()
        .map(|c| (c.rule, c.target.as_str(), c.event.event_type.as_str()))
        .collect();
    assert_eq!(
        shaped,
        [
            (0, "billing", "UserDeleted"),
            (0, "crm", "UserDeleted"),
            (1, "crm", "CustomerDeleted")
        ]
    );
    let mut ids: Vec<_> = copies.iter().map(|c| c.event.event_id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "an id per (event, rule, target)");

    // Not matching: another service's type, a type the pattern does not cover.
    assert_eq!(
        router
            .route(&source_event(
                "users",
                "user-1",
                3,
                "ProfileViewed",
                json!({})
            ))
            .expect("routes"),
        Routing::Unmatched
    );
    assert_eq!(
        router
            .route(&source_event(
                "payments",
                "p-1",
                1,
                "UserRegistered",
                json!({})
            ))
            .expect("routes"),
        Routing::Unmatched
    );
    let placed = forwarded(
        router
            .route(&source_event(
                "orders",
                "order-9",
                1,
                "OrderPlaced",
                json!({}),
            ))
            .expect("routes"),
    );
    assert_eq!(placed.len(), 1);
    assert_eq!(placed[0].target.as_str(), "billing");

    // Ids are derived: the same event routes to the same ids every time, and so does
    // the same rule in another position; another event to other ids.
    let again = forwarded(router.route(&registered).expect("routes"));
    let first = forwarded(router.route(&registered).expect("routes"));
    assert_eq!(
        again.iter().map(|c| c.event.event_id).collect::<Vec<_>>(),
        first.iter().map(|c| c.event.event_id).collect::<Vec<_>>()
    );
    // The derivation is the wire format of the ids: pinned.
    let pinned = source_event("users", "user-1", 1, "UserRegistered", json!({}));
    let mut pinned_event = pinned.clone();
    pinned_event.event_id = eventcore::EventId::from_uuid(
        uuid::Uuid::parse_str("018f0000-0000-7000-8000-000000000001").expect("a uuid"),
    );
    let pinned_copies = forwarded(router.route(&pinned_event).expect("routes"));
    assert_eq!(
        pinned_copies[0].event.event_id.to_string(),
        PINNED_BILLING_ID,
        "the id of (federation, users, that event, rule 0, billing)"
    );
    let reordered = Router::new(
        rules(json!([
            { "source_service": "orders", "event_pattern": "*", "target_services": ["billing"] },
            { "source_service": "users", "event_pattern": "User*", "target_services": ["billing", "crm"] }
        ])),
        functions(),
    )
    .expect("valid");
    let moved = forwarded(reordered.route(&registered).expect("routes"));
    assert_eq!(
        moved.iter().map(|c| c.event.event_id).collect::<Vec<_>>(),
        first.iter().map(|c| c.event.event_id).collect::<Vec<_>>()
    );
}

#[test]
fn a_forwarded_event_keeps_its_correlation_and_trace_and_records_its_origin() {
    let router = router(json!([
        { "source_service": "users", "event_pattern": "*", "target_services": ["crm"] }
    ]));
    let event = source_event("users", "user-7", 4, "UserRegistered", json!({"n": 1}));
    let copy = forwarded(router.route(&event).expect("routes")).remove(0);
    let metadata = &copy.event.metadata;
    assert_eq!(metadata.correlation_id, event.metadata.correlation_id);
    assert_eq!(metadata.causation_id, Some(event.event_id.into()));
    assert_eq!(metadata.trace_context, event.trace_context);
    assert_eq!(metadata.actor.as_deref(), Some("alice"));
    assert_eq!(metadata.custom["tenant"], json!("t-1"));
    assert_eq!(
        metadata.custom[FEDERATION_METADATA_KEY],
        json!({
            "origin": {
                "service": "users",
                "stream": "user-7",
                "event_id": event.event_id,
                "event_type": "UserRegistered"
            },
            "hops": ["federation"],
            "forwarded_id": copy.event.event_id
        })
    );
    assert_eq!(
        copy.event.payload.as_str(),
        event.payload.as_str(),
        "no transformation: as written"
    );
}

#[test]
fn transformations_on_nested_objects_arrays_and_missing_fields() {
    let router = router(json!([
        { "source_service": "users", "event_pattern": "User*", "target_services": ["crm"],
          "transformation": "anonymize_pii" },
        { "source_service": "orders", "event_pattern": "*", "target_services": ["crm"],
          "transformation": "to_v2" }
    ]));
    let payload = r#"{"id":12345678901234567890123,"email":"a@b.c","contacts":[{"phone":"1","kind":"home"},{"kind":"none"},{"phone":"2"}],"address":{"street":"Main 1","city":"Oslo"}}"#;
    let mut event = source_event("users", "user-1", 1, "UserRegistered", json!({}));
    event.payload = EventPayload::from_json(payload).expect("valid");
    let copy = forwarded(router.route(&event).expect("routes")).remove(0);
    assert_eq!(
        copy.event.payload.as_str(),
        r#"{"id":12345678901234567890123,"email":"[redacted]","contacts":[{"phone":"[redacted]","kind":"home"},{"kind":"none"},{"phone":"[redacted]"}],"address":{"city":"Oslo"}}"#,
        "redacted and removed; the rest, the big integer included, as written"
    );
    // Nothing to redact: the payload is kept as written.
    let mut bare = source_event("users", "user-2", 1, "UserRenamed", json!({}));
    bare.payload = EventPayload::from_json(r#"{ "name" : "x" }"#).expect("valid");
    let copy = forwarded(router.route(&bare).expect("routes")).remove(0);
    assert_eq!(copy.event.payload.as_str(), r#"{ "name" : "x" }"#);

    // A user function maps the shape; one that fails is a typed error naming the event.
    let placed = source_event("orders", "order-1", 1, "OrderPlaced", json!({"total": 5}));
    let copy = forwarded(router.route(&placed).expect("routes")).remove(0);
    assert_eq!(copy.event.event_type.as_str(), "OrderPlacedV2");
    assert_eq!(
        copy.event
            .payload
            .deserialize_as::<serde_json::Value>()
            .expect("json"),
        json!({"v": 2, "was": {"total": 5}})
    );
    let poison = source_event(
        "orders",
        "order-2",
        1,
        "OrderPlaced",
        json!({"poison": true}),
    );
    match router.route(&poison) {
        Err(FederationError::TransformFailed {
            transformation,
            event_id,
            reason,
        }) => {
            assert_eq!(transformation, "to_v2");
            assert_eq!(event_id, poison.event_id);
            assert!(reason.contains("cannot be mapped"), "{reason}");
        }
        other => panic!("expected a failed transformation, got {other:?}"),
    }
}

#[test]
fn an_event_that_crossed_this_hub_or_the_hop_limit_is_not_forwarded() {
    let router = router(json!([
        { "source_service": "users", "event_pattern": "*", "target_services": ["crm"] }
    ]));
    // An event a hub forwarded: its record names it.
    let with_hops = |hops: Vec<&str>| {
        let mut event = source_event("users", "user-1", 1, "UserRegistered", json!({}));
        event.metadata.custom.insert(
            FEDERATION_METADATA_KEY.to_owned(),
            json!({
                "origin": { "service": "shop", "stream": "s", "event_id": eventcore::EventId::new(),
                            "event_type": "X" },
                "hops": hops,
                "forwarded_id": event.event_id
            }),
        );
        event
    };
    assert_eq!(
        router
            .route(&with_hops(vec!["other", "federation"]))
            .expect("routes"),
        Routing::Loop
    );
    let hops = vec!["h1", "h2", "h3", "h4", "h5", "h6", "h7", "h8"];
    assert_eq!(
        router.route(&with_hops(hops)).expect("routes"),
        Routing::HopLimit
    );
    // Under the limit: forwarded, the first origin kept, this hub added.
    let copy = forwarded(router.route(&with_hops(vec!["h1"])).expect("routes")).remove(0);
    let record = &copy.event.metadata.custom[FEDERATION_METADATA_KEY];
    assert_eq!(record["origin"]["service"], json!("shop"));
    assert_eq!(record["hops"], json!(["h1", "federation"]));
    // A new event that inherited a forwarded one's record (a reaction to it, its
    // custom metadata passed on) is a new origin, not a loop: it is forwarded, and its
    // record starts again from it.
    let mut reaction = with_hops(vec!["federation"]);
    reaction.event_id = eventcore::EventId::new();
    let copy = forwarded(router.route(&reaction).expect("routes")).remove(0);
    let record = &copy.event.metadata.custom[FEDERATION_METADATA_KEY];
    assert_eq!(record["origin"]["event_id"], json!(reaction.event_id));
    assert_eq!(record["hops"], json!(["federation"]));
    // So is an event with a malformed record (written by hand): logged, not parked.
    let mut bad = source_event("users", "user-1", 1, "UserRegistered", json!({}));
    bad.metadata.custom.insert(
        FEDERATION_METADATA_KEY.to_owned(),
        json!({"hops": "federation"}),
    );
    assert_eq!(forwarded(router.route(&bad).expect("routes")).len(), 1);
}

#[test]
fn filters_refuse_patterns_the_router_takes() {
    assert!(matches!(
        eventcore::ProjectionFilter::all().with_event_types(["User*"]),
        Err(Error::EventTypePattern { .. })
    ));
    assert!(
        EventPattern::try_new("User*")
            .expect("a pattern")
            .matches("UserRegistered")
    );
}

// ---------------------------------------------------------------------------------------
// The running hub.

/// A broker the hub tests run on.
trait Broker: Send + Sync + 'static {
    fn publisher(&self, service: &ServiceId) -> Arc<dyn EventPublisher>;
    fn subscriber(&self) -> Arc<dyn EventSubscriber>;
}

impl Broker for InMemoryBroker {
    fn publisher(&self, service: &ServiceId) -> Arc<dyn EventPublisher> {
        Arc::new(InMemoryBroker::publisher(self, service.clone()))
    }
    fn subscriber(&self) -> Arc<dyn EventSubscriber> {
        Arc::new(self.clone())
    }
}

impl Broker for eventcore_nats::NatsTransport {
    fn publisher(&self, service: &ServiceId) -> Arc<dyn EventPublisher> {
        Arc::new(eventcore_nats::NatsTransport::publisher(
            self,
            service.clone(),
        ))
    }
    fn subscriber(&self) -> Arc<dyn EventSubscriber> {
        Arc::new(eventcore_nats::NatsTransport::subscriber(self))
    }
}

/// A source service: its store, and its publisher of `<topic>` (streams `<prefix>`).
struct Source {
    store: InMemoryEventStore,
    runner: PublisherRunner,
}

impl Source {
    async fn new(broker: &dyn Broker, name: &str, topic: &str, prefix: &str) -> Source {
        let store = InMemoryEventStore::new();
        let policy =
            PublicationPolicy::new([PublicationRule::new(Topic::try_new(topic).expect("valid"))
                .with_stream_prefix(prefix)])
            .expect("valid");
        let runner = PublisherRunner::new(
            Arc::new(store.clone()),
            Arc::new(store.clone()),
            broker.publisher(&service(name)),
            policy,
        )
        .expect("valid runner");
        Source { store, runner }
    }

    /// Appends one event and publishes it.
    async fn emit(&mut self, stream: &str, event_type: &str, payload: serde_json::Value) {
        let data = EventData::new(
            EventType::try_new(event_type).expect("valid"),
            EventPayload::from_json(payload.to_string()).expect("valid"),
            EventMetadata::new(CorrelationId::new()),
        );
        self.store
            .append(AppendRequest::single(
                StreamId::try_new(stream).expect("valid"),
                ExpectedVersion::Any,
                vec![data],
            ))
            .await
            .expect("appends");
        self.runner.publish_available().await.expect("publishes");
    }
}

/// The hub of `rules` on `broker` with its own store (returned), its topics and its
/// sources' declared.
async fn hub_on(
    broker: &dyn Broker,
    rules: RoutingRules,
    functions: TransformFunctions,
) -> (FederationHub, InMemoryEventStore) {
    let store = InMemoryEventStore::new();
    (
        hub_with_store(broker, rules, functions, &store).await,
        store,
    )
}

/// The hub of `rules` on `broker` with `store` (an instance after a restart).
async fn hub_with_store<S>(
    broker: &dyn Broker,
    rules: RoutingRules,
    functions: TransformFunctions,
    store: &S,
) -> FederationHub
where
    S: EventStore + eventcore::CheckpointStore + Clone + 'static,
{
    // The sources' topics exist once their publishers started; these have.
    for source in &rules.sources {
        broker
            .publisher(&source.service)
            .declare_topics(&source.topics)
            .await
            .expect("declares");
    }
    let topics: Vec<Topic> = rules.targets.iter().map(|t| t.topic.clone()).collect();
    let publisher = broker.publisher(&rules.hub);
    publisher.declare_topics(&topics).await.expect("declares");
    let router = Router::new(rules, functions).expect("valid rules");
    FederationHub::new(
        router,
        Arc::new(store.clone()),
        Arc::new(store.clone()),
        broker.subscriber(),
        publisher,
    )
    .expect("a hub")
    .with_error_policy(
        ProjectionErrorPolicy::new()
            .with_max_attempts(1)
            .with_on_failure(OnFailure::Park),
    )
}

/// A reader of the hub's topic for `target`.
async fn reader(
    broker: &dyn Broker,
    target: &str,
    topic: &str,
) -> (Box<dyn Subscription>, SubscriptionSpec) {
    let spec = SubscriptionSpec::new(
        service(target),
        SubscriptionName::try_new("reader").expect("valid"),
        [Topic::try_new(topic).expect("valid")],
    );
    let subscription = broker
        .subscriber()
        .subscribe(&spec)
        .await
        .expect("subscribes");
    (subscription, spec)
}

/// The next `n` events of `subscription`, acknowledged.
async fn receive(subscription: &mut dyn Subscription, n: usize) -> Vec<DistributedEvent> {
    let mut got = Vec::with_capacity(n);
    for _ in 0..n {
        let delivery = subscription.next().await.expect("delivers");
        subscription.ack(&delivery).await.expect("acknowledges");
        got.push(delivery.event);
    }
    got
}

/// (origin stream, type) of forwarded events.
fn origins(events: &[DistributedEvent]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|e| {
            let record = &e.metadata.custom[FEDERATION_METADATA_KEY];
            (
                record["origin"]["stream"]
                    .as_str()
                    .expect("an origin")
                    .to_owned(),
                e.event_type.as_str().to_owned(),
            )
        })
        .collect()
}

/// The types forwarded per origin stream, in the order received.
fn per_stream(events: &[DistributedEvent]) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut streams = std::collections::BTreeMap::<String, Vec<String>>::new();
    for (stream, event_type) in origins(events) {
        streams.entry(stream).or_default().push(event_type);
    }
    streams
}

/// What the broker still holds for `spec`: nothing, once every copy was read once.
async fn assert_drained(broker: &dyn Broker, spec: &SubscriptionSpec) {
    let backlog = broker
        .subscriber()
        .backlog(spec)
        .await
        .expect("answers")
        .expect("exists");
    assert_eq!(
        backlog.events, 0,
        "{}: nothing more (no duplicate)",
        spec.name
    );
}

/// How many copies the hub's store holds.
async fn copies_held(store: &impl EventStore) -> usize {
    store
        .read_all(&LogQuery::new().with_stream_prefix("federated/"))
        .await
        .expect("reads")
        .len()
}

/// Runs `hub` in a task until the returned stop is sent.
fn spawn_hub(
    mut hub: FederationHub,
) -> (
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<FederationHub>,
) {
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        hub.run(async move {
            let _ = stopped.wait_for(|s| *s).await;
        })
        .await
        .expect("the hub ran");
        hub
    });
    (stop, task)
}

async fn routes_end_to_end_and_advances_over_unmatched_events(broker: &dyn Broker) {
    let mut users = Source::new(broker, "users", "user-events", "user-").await;
    let mut orders = Source::new(broker, "orders", "order-events", "order-").await;
    users
        .emit(
            "user-1",
            "UserRegistered",
            json!({"email": "a@b.c", "name": "A"}),
        )
        .await;
    orders.emit("order-0", "OrderShipped", json!({})).await;
    let rules = rules(json!([
        { "source_service": "users", "event_pattern": "User*", "target_services": ["billing"] },
        { "source_service": "users", "event_pattern": "User*", "target_services": ["crm"],
          "transformation": "anonymize_pii" },
        { "source_service": "orders", "event_pattern": "OrderPlaced", "target_services": ["billing"] }
    ]));
    let (hub, hub_store) = hub_on(broker, rules, functions()).await;
    let spec = hub.router().subscription_spec();
    let (mut billing, billing_spec) = reader(broker, "billing", "federated-billing").await;
    let (mut crm, crm_spec) = reader(broker, "crm", "federated-crm").await;
    let (stop, task) = spawn_hub(hub);
    for n in 0..20 {
        users.emit("user-1", "ProfileViewed", json!({"n": n})).await;
    }
    users
        .emit("user-2", "UserRegistered", json!({"email": "c@d.e"}))
        .await;
    orders
        .emit("order-1", "OrderPlaced", json!({"total": 3}))
        .await;
    users.emit("user-1", "UserDeleted", json!({})).await;

    // Order holds per source stream (across sources it is the broker's to choose).
    let billed = receive(&mut *billing, 4).await;
    assert_eq!(
        per_stream(&billed),
        [
            ("order-1", vec!["OrderPlaced"]),
            ("user-1", vec!["UserRegistered", "UserDeleted"]),
            ("user-2", vec!["UserRegistered"]),
        ]
        .into_iter()
        .map(|(s, t)| (s.to_owned(), t.into_iter().map(str::to_owned).collect()))
        .collect()
    );
    assert!(billed.iter().all(|e| e.service_id.as_str() == "federation"));
    let registered = billed
        .iter()
        .find(|e| e.stream_id.as_str() == "federated/billing/users/user-1")
        .expect("user-1's copies");
    assert_eq!(registered.event_type.as_str(), "UserRegistered");
    assert_eq!(
        registered
            .payload
            .deserialize_as::<serde_json::Value>()
            .expect("json"),
        json!({"email": "a@b.c", "name": "A"})
    );
    // Each copy's causation is its origin event, and it keeps the origin's correlation.
    let sources: Vec<eventcore::RecordedEvent> = users
        .store
        .read_all(&LogQuery::new())
        .await
        .expect("reads")
        .into_iter()
        .chain(
            orders
                .store
                .read_all(&LogQuery::new())
                .await
                .expect("reads"),
        )
        .collect();
    let caused_by_its_origin = |copies: &[DistributedEvent]| {
        for copy in copies {
            let origin = &copy.metadata.custom[FEDERATION_METADATA_KEY]["origin"]["event_id"];
            let source = sources
                .iter()
                .find(|e| json!(e.event_id) == *origin)
                .expect("the origin is a source event");
            assert_eq!(copy.metadata.causation_id, Some(source.event_id.into()));
            assert_eq!(copy.metadata.correlation_id, source.metadata.correlation_id);
        }
    };
    caused_by_its_origin(&billed);
    let known = receive(&mut *crm, 3).await;
    assert_eq!(
        origins(&known),
        [
            ("user-1".to_owned(), "UserRegistered".to_owned()),
            ("user-2".to_owned(), "UserRegistered".to_owned()),
            ("user-1".to_owned(), "UserDeleted".to_owned()),
        ],
        "one source: its publication's order"
    );
    caused_by_its_origin(&known);
    assert_eq!(
        known[0]
            .payload
            .deserialize_as::<serde_json::Value>()
            .expect("json"),
        json!({"email": "[redacted]", "name": "A"})
    );
    stop.send(true).expect("running");
    task.await.expect("joins");
    // The hub's position passed the 21 unmatched events too.
    assert_drained(broker, &spec).await;
    assert_drained(broker, &billing_spec).await;
    assert_drained(broker, &crm_spec).await;
    assert_eq!(copies_held(&hub_store).await, 7);
}

async fn a_crash_between_consume_and_forward_makes_no_duplicate<S>(
    broker: &dyn Broker,
    hub_store: S,
) where
    S: EventStore + eventcore::CheckpointStore + Clone + 'static,
{
    let mut users = Source::new(broker, "users", "user-events", "user-").await;
    users.emit("user-1", "UserRegistered", json!({})).await;
    users.emit("user-1", "UserRenamed", json!({})).await;
    users.emit("user-2", "UserRegistered", json!({})).await;
    let rules = || {
        rules(json!([
            { "source_service": "users", "event_pattern": "*", "target_services": ["billing", "crm"] }
        ]))
    };
    let mut first = hub_with_store(broker, rules(), functions(), &hub_store).await;
    let spec = first.router().subscription_spec();
    let (mut billing, billing_spec) = reader(broker, "billing", "federated-billing").await;

    // Routed and published, then the process dies before acknowledging.
    let mut handle = broker
        .subscriber()
        .subscribe(&spec)
        .await
        .expect("subscribes");
    let delivery = handle.next().await.expect("delivers");
    first.process(&delivery).await.expect("routes");
    first.publish_available().await.expect("publishes");
    drop(handle);
    drop(first);

    // A new instance on the same store: the first event comes again and writes
    // nothing; the second is routed, then the process dies before publishing.
    let mut second = hub_with_store(broker, rules(), functions(), &hub_store).await;
    let second = {
        let mut handle = broker
            .subscriber()
            .subscribe(&spec)
            .await
            .expect("subscribes");
        let again = handle.next().await.expect("delivers");
        assert_eq!(again.event.event_id, delivery.event.event_id);
        assert!(again.attempt > 1, "a redelivery");
        second.process(&again).await.expect("routes");
        handle.ack(&again).await.expect("acknowledges");
        let next = handle.next().await.expect("delivers");
        second.process(&next).await.expect("routes");
        second
    };
    drop(second);
    assert_eq!(
        copies_held(&hub_store).await,
        4,
        "two events, two targets, once each"
    );

    // A third instance on the same store finishes the work.
    let third = hub_with_store(broker, rules(), functions(), &hub_store).await;
    let (stop, task) = spawn_hub(third);
    let billed = receive(&mut *billing, 3).await;
    assert_eq!(
        origins(&billed),
        [
            ("user-1".to_owned(), "UserRegistered".to_owned()),
            ("user-1".to_owned(), "UserRenamed".to_owned()),
            ("user-2".to_owned(), "UserRegistered".to_owned()),
        ]
    );
    stop.send(true).expect("running");
    task.await.expect("joins");
    assert_drained(broker, &billing_spec).await;
    assert_drained(broker, &spec).await;
    assert_eq!(copies_held(&hub_store).await, 6);
}

async fn a_loop_through_two_hubs_is_cut(broker: &dyn Broker) {
    let mut users = Source::new(broker, "users", "user-events", "user-").await;
    users.emit("user-1", "UserRegistered", json!({})).await;
    let hub_rules =
        |hub: &str, other: &str, sources: serde_json::Value, routes: serde_json::Value| {
            serde_json::from_value::<RoutingRules>(json!({
                "hub": hub,
                "sources": sources,
                "targets": [{ "service": other, "topic": format!("{hub}-to-{other}") }],
                "routes": routes
            }))
            .expect("rules")
        };
    // a forwards users' events and b's to b; b forwards a's back to a.
    let (mut a, a_store) = hub_on(
        broker,
        hub_rules(
            "hub-a",
            "hub-b",
            json!([
                { "service": "users", "topics": ["user-events"] },
                { "service": "hub-b", "topics": ["hub-b-to-hub-a"] }
            ]),
            json!([
                { "source_service": "users", "event_pattern": "*", "target_services": ["hub-b"] },
                { "source_service": "hub-b", "event_pattern": "*", "target_services": ["hub-b"] }
            ]),
        ),
        TransformFunctions::new(),
    )
    .await;
    let (mut b, b_store) = hub_on(
        broker,
        hub_rules(
            "hub-b",
            "hub-a",
            json!([{ "service": "hub-a", "topics": ["hub-a-to-hub-b"] }]),
            json!([
                { "source_service": "hub-a", "event_pattern": "*", "target_services": ["hub-a"] }
            ]),
        ),
        TransformFunctions::new(),
    )
    .await;
    let a_spec = a.router().subscription_spec();
    let mut a_in = broker
        .subscriber()
        .subscribe(&a_spec)
        .await
        .expect("subscribes");
    let mut b_in = broker
        .subscriber()
        .subscribe(&b.router().subscription_spec())
        .await
        .expect("subscribes");

    let original = a_in.next().await.expect("delivers");
    a.process(&original).await.expect("routes");
    a_in.ack(&original).await.expect("acknowledges");
    a.publish_available().await.expect("publishes");
    let from_a = b_in.next().await.expect("delivers");
    b.process(&from_a).await.expect("routes");
    b_in.ack(&from_a).await.expect("acknowledges");
    b.publish_available().await.expect("publishes");
    // Back at a, with a in its hops: not forwarded again.
    let back = a_in.next().await.expect("delivers");
    assert_eq!(back.event.service_id.as_str(), "hub-b");
    assert_eq!(
        back.event.metadata.custom[FEDERATION_METADATA_KEY]["hops"],
        json!(["hub-a", "hub-b"])
    );
    assert_eq!(
        a.router().route(&back.event).expect("routes"),
        Routing::Loop
    );
    a.process(&back).await.expect("handled");
    a_in.ack(&back).await.expect("acknowledges");
    assert_eq!(a.publish_available().await.expect("publishes").published, 0);
    assert_eq!(
        copies_held(&a_store).await,
        1,
        "a forwarded the original once"
    );
    assert_eq!(copies_held(&b_store).await, 1);
    drop(a_in);
    assert_drained(broker, &a_spec).await;
}

async fn a_poison_transformation_is_parked_while_the_rest_flows(broker: &dyn Broker) {
    let fixed = Arc::new(AtomicBool::new(false));
    let switch = Arc::clone(&fixed);
    let functions = TransformFunctions::new().with("to_v2", move |_event, shaped: Forwarding| {
        let value: serde_json::Value = shaped.payload.deserialize_as()?;
        if value.get("poison").is_some() && !switch.load(Ordering::SeqCst) {
            return Err("this payload cannot be mapped".into());
        }
        Ok(Forwarding::new(
            EventType::try_new(format!("{}V2", shaped.event_type))?,
            EventPayload::from_json(json!({ "v": 2, "was": value }).to_string())?,
        ))
    });
    let mut orders = Source::new(broker, "orders", "order-events", "order-").await;
    orders
        .emit("order-1", "OrderPlaced", json!({"poison": true}))
        .await;
    orders.emit("order-1", "OrderUpdated", json!({})).await;
    orders.emit("order-2", "OrderPlaced", json!({})).await;
    let (hub, _) = hub_on(
        broker,
        rules(json!([
            { "source_service": "orders", "event_pattern": "*", "target_services": ["billing"],
              "transformation": "to_v2" }
        ])),
        functions,
    )
    .await;
    let (mut billing, billing_spec) = reader(broker, "billing", "federated-billing").await;
    let (stop, task) = spawn_hub(hub);
    // The other stream flows past the parked event.
    let flowed = receive(&mut *billing, 1).await;
    assert_eq!(
        origins(&flowed),
        [("order-2".to_owned(), "OrderPlacedV2".to_owned())]
    );
    stop.send(true).expect("running");
    let mut hub = task.await.expect("joins");
    let parked = hub.parked().await.expect("reads");
    assert_eq!(
        parked.len(),
        2,
        "the poison and the event held behind it: {parked:?}"
    );
    assert!(
        parked[0]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("cannot be mapped")),
        "{parked:?}"
    );
    assert_eq!(parked[1].error, None, "held, not failed");

    fixed.store(true, Ordering::SeqCst);
    let redriven = hub
        .redrive(
            &service("orders"),
            &StreamId::try_new("order-1").expect("valid"),
        )
        .await
        .expect("re-drives");
    assert_eq!(redriven, 2);
    hub.publish_available().await.expect("publishes");
    let later = receive(&mut *billing, 2).await;
    assert_eq!(
        origins(&later),
        [
            ("order-1".to_owned(), "OrderPlacedV2".to_owned()),
            ("order-1".to_owned(), "OrderUpdatedV2".to_owned()),
        ]
    );
    assert!(hub.parked().await.expect("reads").is_empty());
    assert_drained(broker, &billing_spec).await;
}

macro_rules! hub_tests {
    ($module:ident, $broker:expr $(, #[$attr:meta])*) => {
        mod $module {
            #[tokio::test]
            $(#[$attr])*
            async fn routes_end_to_end_and_advances_over_unmatched_events() {
                super::routes_end_to_end_and_advances_over_unmatched_events(&$broker).await;
            }

            #[tokio::test]
            $(#[$attr])*
            async fn a_crash_between_consume_and_forward_makes_no_duplicate() {
                super::a_crash_between_consume_and_forward_makes_no_duplicate(
                    &$broker,
                    super::InMemoryEventStore::new(),
                )
                .await;
            }

            #[tokio::test]
            $(#[$attr])*
            async fn a_loop_through_two_hubs_is_cut() {
                super::a_loop_through_two_hubs_is_cut(&$broker).await;
            }

            #[tokio::test]
            $(#[$attr])*
            async fn a_poison_transformation_is_parked_while_the_rest_flows() {
                super::a_poison_transformation_is_parked_while_the_rest_flows(&$broker).await;
            }
        }
    };
}

hub_tests!(memory, super::InMemoryBroker::new());
hub_tests!(
    nats,
    eventcore_tests::nats::fresh_transport().await,
    #[cfg_attr(
        not(nats_tests),
        ignore = "needs a NATS server: set NATS_URL (scripts/test starts one)"
    )]
);

/// Rules whose one route counts, per instance, the events it routes.
fn counting(calls: &Arc<std::sync::atomic::AtomicUsize>) -> (RoutingRules, TransformFunctions) {
    let mut rules = rules(json!([
        { "source_service": "users", "event_pattern": "*", "target_services": ["crm"],
          "transformation": "counted" }
    ]));
    rules.transformations.insert(
        "counted".to_owned(),
        vec![eventcore::distributed::federation::Transform::Apply {
            function: "count".to_owned(),
        }],
    );
    let calls = Arc::clone(calls);
    let functions = functions().with("count", move |_event, shaped| {
        calls.fetch_add(1, Ordering::SeqCst);
        Ok(shaped)
    });
    (rules, functions)
}

/// The hub's store on PostgreSQL: the key and the derived ids hold there too.
#[tokio::test]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs PostgreSQL: set DATABASE_URL (scripts/test starts one)"
)]
async fn on_postgres_a_crash_between_consume_and_forward_makes_no_duplicate() {
    a_crash_between_consume_and_forward_makes_no_duplicate(
        &InMemoryBroker::new(),
        eventcore_tests::postgres::fresh_store().await,
    )
    .await;
}

#[tokio::test]
async fn one_hub_of_a_name_is_active_at_a_time() {
    use std::sync::atomic::AtomicUsize;
    let broker = InMemoryBroker::new();
    let election = Arc::new(InMemoryLeaderElection::new());
    let mut users = Source::new(&broker, "users", "user-events", "user-").await;
    let (first_calls, second_calls) =
        (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (rules, functions) = counting(&first_calls);
    let (first, hub_store) = hub_on(&broker, rules, functions).await;
    let (rules, functions) = counting(&second_calls);
    let second = hub_with_store(&broker, rules, functions, &hub_store).await;
    let (mut crm, crm_spec) = reader(&broker, "crm", "federated-crm").await;
    let run_as_leader = |mut hub: FederationHub| {
        let election = Arc::clone(&election);
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            hub.run_as_leader(&*election, async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await
            .expect("ran");
        });
        (stop, task)
    };
    let (stop_first, first_task) = run_as_leader(first);
    users.emit("user-1", "UserRegistered", json!({})).await;
    assert_eq!(receive(&mut *crm, 1).await.len(), 1);
    assert!(election.is_held("federation-federation"), "the first leads");
    // A second instance on the same store waits while the first leads.
    let (stop_second, second_task) = run_as_leader(second);
    users.emit("user-1", "UserRenamed", json!({})).await;
    assert_eq!(receive(&mut *crm, 1).await.len(), 1);
    assert_eq!(first_calls.load(Ordering::SeqCst), 2);
    assert_eq!(
        second_calls.load(Ordering::SeqCst),
        0,
        "the second stayed idle"
    );
    // The first stops: only the second can route now.
    stop_first.send(true).expect("running");
    first_task.await.expect("joins");
    users.emit("user-2", "UserRegistered", json!({})).await;
    assert_eq!(
        origins(&receive(&mut *crm, 1).await),
        [("user-2".to_owned(), "UserRegistered".to_owned())]
    );
    assert_eq!(second_calls.load(Ordering::SeqCst), 1);
    // The second loses its leadership (its connection died): it stops, is elected
    // again (the only candidate) and goes on.
    assert!(election.revoke("federation-federation"));
    users.emit("user-2", "UserRenamed", json!({})).await;
    assert_eq!(
        origins(&receive(&mut *crm, 1).await),
        [("user-2".to_owned(), "UserRenamed".to_owned())]
    );
    assert_eq!(
        first_calls.load(Ordering::SeqCst),
        2,
        "the stopped first did nothing more"
    );
    stop_second.send(true).expect("running");
    second_task.await.expect("joins");
    assert_drained(&broker, &crm_spec).await;
    assert_eq!(copies_held(&hub_store).await, 4);
}

#[test]
fn what_the_hub_does_with_each_event_is_counted_once() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
            .block_on(async {
                let broker = InMemoryBroker::new();
                let mut users = Source::new(&broker, "users", "user-events", "user-").await;
                users.emit("user-1", "UserRegistered", json!({})).await;
                users.emit("user-1", "ProfileViewed", json!({})).await;
                let (mut hub, _) = hub_on(
                    &broker,
                    rules(json!([
                        { "source_service": "users", "event_pattern": "User*",
                          "target_services": ["billing", "crm"] }
                    ])),
                    functions(),
                )
                .await;
                let spec = hub.router().subscription_spec();
                let mut handle = broker.subscribe(&spec).await.expect("subscribes");
                let first = handle.next().await.expect("delivers");
                hub.process(&first).await.expect("routes");
                // Lost acknowledgement: the redelivery writes and counts nothing.
                drop(handle);
                let mut handle = broker.subscribe(&spec).await.expect("subscribes");
                let again = handle.next().await.expect("delivers");
                hub.process(&again).await.expect("routes");
                handle.ack(&again).await.expect("acknowledges");
                let second = handle.next().await.expect("delivers");
                hub.process(&second).await.expect("routes");
                handle.ack(&second).await.expect("acknowledges");
            });
    });
    // One snapshot: reading the debugging recorder resets what it read.
    let snapshot = snapshotter.snapshot().into_vec();
    let counted = |name: &str, pairs: &[(&str, &str)]| {
        snapshot.iter().find_map(|(key, _, _, value)| {
            let key = key.key();
            let matches = key.name() == name
                && key.labels().count() == pairs.len()
                && pairs
                    .iter()
                    .all(|(k, v)| key.labels().any(|l| l.key() == *k && l.value() == *v));
            match (matches, value) {
                (true, DebugValue::Counter(n)) => Some(*n),
                _ => None,
            }
        })
    };
    let events = eventcore::metrics::FEDERATION_EVENTS_TOTAL;
    let forwarded = eventcore::metrics::FEDERATION_FORWARDED_TOTAL;
    assert_eq!(
        counted(events, &[("hub", "federation"), ("outcome", "forwarded")]),
        Some(1)
    );
    assert_eq!(
        counted(events, &[("hub", "federation"), ("outcome", "unmatched")]),
        Some(1)
    );
    assert_eq!(
        counted(forwarded, &[("hub", "federation"), ("target", "billing")]),
        Some(1)
    );
    assert_eq!(
        counted(forwarded, &[("hub", "federation"), ("target", "crm")]),
        Some(1)
    );
}
