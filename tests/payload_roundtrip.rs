//! Property: arbitrary JSON-shaped payloads and metadata, written through the in-memory
//! store and PostgreSQL, read back identically from both: the same payload bytes (which
//! are the bytes written), the same metadata, to the bit for floats, and the same
//! refusals for what the rule at the door turns away.
//!
//! Bounded for CI (`PROPTEST_CASES`, 96 by default); run longer on demand:
//! `PROPTEST_CASES=5000 cargo test -p eventcore-tests --test workspace payload_roundtrip::`.

use std::sync::OnceLock;

use eventcore::{
    AppendRequest, EventData, EventMetadata, EventPayload, EventStore, EventType, ExpectedVersion,
    RecordedEvent, StreamId,
};
use eventcore_memory::InMemoryEventStore;
use eventcore_postgres::PostgresEventStore;
use eventcore_tests::postgres::fresh_store;
use proptest::prelude::*;
use serde_json::{Map, Number, Value};

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(96)
}

/// Any finite double, by bit pattern (so subnormals, extremes and negative zero come up).
fn finite_f64() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<u64>().prop_map(f64::from_bits),
        Just(-0.0),
        Just(f64::MAX),
        Just(f64::MIN_POSITIVE),
        Just(5e-324),
        any::<f64>(),
    ]
    .prop_filter("finite", |v| v.is_finite())
}

/// Strings with the characters that trouble stores: quotes, backslashes, controls,
/// non-BMP, U+2028, and (rarely) NUL.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => "[a-z0-9 ]{0,12}",
        4 => any::<String>(),
        2 => "[\"\\\\/\\x01-\\x1f\u{7f}-\u{9f}\u{2028}\u{1F600}é]{0,6}",
        1 => "[a-z]{0,3}\\x00[a-z]{0,3}",
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        finite_f64().prop_map(|v| Value::Number(Number::from_f64(v).expect("finite"))),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(6, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((text(), inner), 0..6)
                .prop_map(|entries| Value::Object(entries.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Payload text: a serialized value, or a number spelled any way JSON allows, or a value
/// nested around the depth limit.
fn payload_text() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => json_value().prop_map(|v| v.to_string()),
        2 => "-?(0|[1-9][0-9]{0,25})(\\.[0-9]{1,25})?([eE][+-]?[0-9]{1,4})?",
        1 => (60usize..70).prop_map(|d| format!("{}0{}", "[".repeat(d), "]".repeat(d))),
        1 => ("[a-c]{1,2}", "[a-c]{1,2}")
            .prop_map(|(a, b)| format!("{{\"{a}\":1, \"{b}\" : [2]}}")),
    ]
}

fn metadata() -> impl Strategy<Value = EventMetadata> {
    (
        proptest::option::of(text()),
        prop::collection::vec((text(), json_value()), 0..4),
    )
        .prop_map(|(actor, custom)| {
            let mut metadata = EventMetadata::default();
            if let Some(actor) = actor {
                metadata = metadata.with_actor(actor);
            }
            for (key, value) in custom {
                metadata = metadata.with_custom(key, value);
            }
            metadata
        })
}

struct Stores {
    runtime: tokio::runtime::Runtime,
    memory: InMemoryEventStore,
    postgres: PostgresEventStore,
}

fn stores() -> &'static Stores {
    static STORES: OnceLock<Stores> = OnceLock::new();
    STORES.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let postgres = runtime.block_on(fresh_store());
        Stores {
            runtime,
            memory: InMemoryEventStore::new(),
            postgres,
        }
    })
}

/// What a store made of one append: refused (with which error), or the event read back.
#[derive(Debug)]
enum Outcome {
    Refused(String),
    Stored(RecordedEvent),
}

async fn write_and_read(store: &impl EventStore, data: EventData) -> Outcome {
    let stream = StreamId::try_new(format!("p-{}", uuid::Uuid::now_v7())).expect("valid");
    let appended = store
        .append(AppendRequest::single(
            stream.clone(),
            ExpectedVersion::NoStream,
            vec![data],
        ))
        .await;
    if let Err(error) = appended {
        return Outcome::Refused(format!("{error:?}"));
    }
    let mut snapshot = store
        .read_streams(std::slice::from_ref(&stream))
        .await
        .expect("read");
    assert_eq!(snapshot.events.len(), 1);
    Outcome::Stored(snapshot.events.remove(0))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    #[cfg_attr(
        not(postgres_tests),
        ignore = "needs PostgreSQL: set DATABASE_URL (scripts/test provisions one)"
    )]
    fn both_stores_give_back_what_they_accept(text in payload_text(), metadata in metadata()) {
        let payload = match EventPayload::from_json(text.as_str()) {
            Ok(payload) => payload,
            Err(_) => {
                // Refused at the door, before any store; nothing to compare.
                return Ok(());
            }
        };
        prop_assert_eq!(payload.as_str(), text.as_str());
        let data = EventData::new(
            EventType::try_new("Arbitrary").expect("valid"),
            payload,
            metadata.clone(),
        );
        let stores = stores();
        let (memory, postgres) = stores.runtime.block_on(async {
            (
                write_and_read(&stores.memory, data.clone()).await,
                write_and_read(&stores.postgres, data).await,
            )
        });
        match (memory, postgres) {
            (Outcome::Refused(a), Outcome::Refused(b)) => prop_assert_eq!(a, b),
            (Outcome::Stored(a), Outcome::Stored(b)) => {
                prop_assert!(a.damage().is_none() && b.damage().is_none());
                prop_assert_eq!(a.payload.as_str(), text.as_str());
                prop_assert_eq!(b.payload.as_str(), text.as_str());
                prop_assert_eq!(&*a.metadata, &metadata);
                prop_assert_eq!(&*b.metadata, &metadata);
                // Value equality calls -0.0 and 0.0 equal; the JSON text does not.
                let written = serde_json::to_string(&metadata).expect("serializes");
                prop_assert_eq!(serde_json::to_string(&*a.metadata).expect("serializes"), written.clone());
                prop_assert_eq!(serde_json::to_string(&*b.metadata).expect("serializes"), written);
                let va: Result<Value, _> = serde_json::from_str(a.payload.as_str());
                let vb: Result<Value, _> = serde_json::from_str(b.payload.as_str());
                prop_assert_eq!(va.ok(), vb.ok());
            }
            (memory, postgres) => {
                prop_assert!(false, "the stores disagree: memory {:?}, postgres {:?}", memory, postgres);
            }
        }
    }
}
