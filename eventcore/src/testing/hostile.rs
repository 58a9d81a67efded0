//! The hostile-input section of the conformance suite: the rule at the door
//! ([`crate::limits`]) holds on every backend, and whatever is accepted reads back
//! unchanged.
//!
//! Every check takes a fresh, empty store. Instantiated with the rest of the suite by
//! [`crate::event_store_conformance_tests!`]. Each refusal is checked to have written
//! nothing.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::limits::{
    MAX_APPEND_BYTES, MAX_EVENTS_PER_APPEND, MAX_JSON_DEPTH, MAX_METADATA_BYTES, MAX_PAYLOAD_BYTES,
    MAX_STREAMS_PER_APPEND,
};
use crate::{
    AppendLimit, AppendRequest, Error, EventData, EventMetadata, EventPayload, EventStore,
    EventType, ExpectedVersion, JsonProblem, LogQuery, RecordedEvent, StreamAppend, StreamId,
    StreamVersion,
};

fn stream(name: &str) -> StreamId {
    StreamId::try_new(name).expect("test stream ids are valid")
}

fn raw(json: &str) -> EventData {
    EventData::new(
        EventType::try_new("Raw").expect("valid"),
        EventPayload::from_json(json).expect("the payload meets the rule"),
        EventMetadata::default(),
    )
}

fn with_metadata(metadata: EventMetadata) -> EventData {
    EventData::new(
        EventType::try_new("Raw").expect("valid"),
        EventPayload::from_json("{}").expect("valid"),
        metadata,
    )
}

/// `depth` nested arrays around `1`.
fn nested(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

fn nested_value(depth: usize) -> Value {
    let mut value = json!(1);
    for _ in 0..depth {
        value = Value::Array(vec![value]);
    }
    value
}

async fn append_one(store: &impl EventStore, s: &StreamId, event: EventData) -> crate::Result<()> {
    store
        .append(AppendRequest::single(
            s.clone(),
            ExpectedVersion::Any,
            vec![event],
        ))
        .await
        .map(|_| ())
}

async fn read_back(store: &impl EventStore, s: &StreamId) -> Vec<RecordedEvent> {
    let snapshot = store
        .read_streams(std::slice::from_ref(s))
        .await
        .expect("read");
    for event in &snapshot.events {
        assert!(event.damage().is_none(), "accepted events read back whole");
    }
    snapshot.events
}

async fn assert_nothing_stored(store: &impl EventStore) {
    let all = store.read_all(&LogQuery::new()).await.expect("read all");
    assert!(
        all.is_empty(),
        "a refused append wrote {} events",
        all.len()
    );
}

fn problem(result: &crate::Result<impl std::fmt::Debug>) -> JsonProblem {
    match result {
        Err(Error::InvalidPayload { problem } | Error::InvalidMetadata { problem }) => {
            problem.clone()
        }
        other => panic!("expected a refused payload or metadata, got {other:?}"),
    }
}

/// Nesting up to [`MAX_JSON_DEPTH`] is stored and read back; one level more is refused,
/// in payloads (however they are made) and in metadata (whose own object and `custom`
/// map take two levels), so no stream can hold an event a reader cannot decode.
pub async fn nesting_beyond_the_limit_is_refused_everywhere(store: impl EventStore) {
    let s = stream("deep");
    let deepest = nested(MAX_JSON_DEPTH);
    append_one(&store, &s, raw(&deepest))
        .await
        .expect("at the limit");
    let events = read_back(&store, &s).await;
    assert_eq!(events[0].payload.as_str(), deepest);
    let decoded: Value = serde_json::from_str(events[0].payload.as_str()).expect("decodes");
    assert_eq!(decoded, nested_value(MAX_JSON_DEPTH));

    let too_deep = TooDeep {
        max: MAX_JSON_DEPTH,
    };
    assert_eq!(
        problem(&EventPayload::from_json(nested(MAX_JSON_DEPTH + 1))),
        too_deep.problem()
    );
    assert_eq!(
        problem(&EventPayload::serialize(
            &nested_value(MAX_JSON_DEPTH + 1),
            "Raw"
        )),
        too_deep.problem()
    );
    assert_eq!(
        problem(&EventPayload::from_json(nested(50_000))),
        too_deep.problem()
    );

    let at_limit = EventMetadata::default().with_custom("trace", nested_value(MAX_JSON_DEPTH - 2));
    append_one(&store, &s, with_metadata(at_limit.clone()))
        .await
        .expect("metadata at the limit");
    let events = read_back(&store, &s).await;
    assert_eq!(*events[1].metadata, at_limit);
    let before = store.read_all(&LogQuery::new()).await.expect("read");
    for depth in [MAX_JSON_DEPTH - 1, 130, 10_000] {
        let deep = EventMetadata::default().with_custom("trace", nested_value(depth));
        let refused = append_one(&store, &s, with_metadata(deep)).await;
        assert_eq!(problem(&refused), too_deep.problem(), "depth {depth}");
    }
    let after = store.read_all(&LogQuery::new()).await.expect("read");
    assert_eq!(before, after, "refused appends wrote nothing");
}

struct TooDeep {
    max: usize,
}

impl TooDeep {
    fn problem(&self) -> JsonProblem {
        JsonProblem::TooDeep { max: self.max }
    }
}

/// Doubles that serde_json mis-parses without exact float parsing, extremes, and
/// negative zero: every finite `f64` comes back bit for bit, in payloads and metadata.
pub async fn every_finite_float_reads_back_bit_for_bit(store: impl EventStore) {
    #[derive(Serialize, Deserialize)]
    struct Readings {
        values: Vec<f64>,
    }
    let mut values = vec![
        115.624_840_844_657_13,
        f64::MAX,
        f64::MIN,
        f64::MIN_POSITIVE,
        f64::EPSILON,
        5e-324,
        -0.0,
        0.0,
        1e16,
        1e300,
        0.1 + 0.2,
        2.225_073_858_507_201_4e-308,
    ];
    // Random bit patterns, fixed seed (xorshift): a few thousand ordinary doubles.
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    while values.len() < 3_000 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let value = f64::from_bits(state);
        if value.is_finite() {
            values.push(value);
        }
    }
    let s = stream("floats");
    for chunk in values.chunks(500) {
        let readings = Readings {
            values: chunk.to_vec(),
        };
        let mut metadata = EventMetadata::default();
        for (i, value) in chunk.iter().take(50).enumerate() {
            metadata = metadata.with_custom(format!("v{i}"), *value);
        }
        let event = EventData::new(
            EventType::try_new("Readings").expect("valid"),
            EventPayload::serialize(&readings, "Readings").expect("finite floats serialize"),
            metadata,
        );
        append_one(&store, &s, event).await.expect("stored");
    }
    let events = read_back(&store, &s).await;
    let mut read = Vec::new();
    for event in &events {
        let decoded: Readings = serde_json::from_str(event.payload.as_str()).expect("decodes");
        for (i, value) in decoded.values.iter().take(50).enumerate() {
            let stored = event.metadata.custom[&format!("v{i}")]
                .as_f64()
                .expect("a number");
            assert_eq!(
                stored.to_bits(),
                value.to_bits(),
                "metadata float {value:e} changed to {stored:e}"
            );
        }
        read.extend(decoded.values);
    }
    assert_eq!(read.len(), values.len());
    for (written, read) in values.iter().zip(&read) {
        assert_eq!(
            written.to_bits(),
            read.to_bits(),
            "payload float {written:e} changed to {read:e}"
        );
    }
}

/// NaN and the infinities have no JSON form (serde_json writes `null`, which would never
/// decode back into an `f64`): refused when serializing, wherever they sit.
pub async fn non_finite_floats_are_refused(store: impl EventStore) {
    #[derive(Serialize)]
    struct Sample {
        label: Option<String>,
        values: Vec<f32>,
        reading: f64,
    }
    for (values, reading) in [
        (vec![1.0], f64::NAN),
        (vec![1.0], f64::INFINITY),
        (vec![f32::NEG_INFINITY], 1.0),
    ] {
        let sample = Sample {
            label: None,
            values,
            reading,
        };
        assert_eq!(
            problem(&EventPayload::serialize(&sample, "Sample")),
            JsonProblem::NotFinite
        );
    }
    let fine = Sample {
        label: None,
        values: vec![0.5],
        reading: -1.5,
    };
    let payload = EventPayload::serialize(&fine, "Sample").expect("finite");
    assert_eq!(
        payload.as_str(),
        r#"{"label":null,"values":[0.5],"reading":-1.5}"#
    );
    for text in ["NaN", "Infinity", "-Infinity", "[1e400]", "-1e400"] {
        assert!(
            matches!(
                problem(&EventPayload::from_json(text)),
                JsonProblem::NotJson { .. }
            ),
            "{text}"
        );
    }
    assert_nothing_stored(&store).await;
}

/// The text of a payload is stored as given: number spellings (`1E2` stays a float,
/// `-0.0` keeps its sign, integers beyond 64 bits keep every digit), key order and
/// whitespace. Every backend returns the same bytes, so a user type decodes alike on
/// all of them (an untagged enum picks the same variant).
pub async fn payload_text_reads_back_byte_for_byte(store: impl EventStore) {
    let texts = [
        r#"{"b":1,"a":2,"c":{"z":[],"y":{}}}"#,
        "1E2",
        "1e16",
        "-0.0",
        "-0",
        "18446744073709551615",
        "-9223372036854775808",
        "123456789012345678901234567890",
        "1.7976931348623157e308",
        "1e-20000",
        "0.30000000000000004",
        "{ \"spaced\" :\t[ 1 , 2 ]\n}",
        r#""\u00e9 \ud83d\ude00 \" \\ \/""#,
        r#"["é", "日本", "\u2028"]"#,
    ];
    let s = stream("texts");
    for text in texts {
        append_one(&store, &s, raw(text)).await.expect("stored");
    }
    let events = read_back(&store, &s).await;
    let read: Vec<&str> = events.iter().map(|e| e.payload.as_str()).collect();
    assert_eq!(read, texts);

    #[derive(Debug, PartialEq, Deserialize)]
    #[serde(untagged)]
    enum Number {
        Int(u64),
        Float(f64),
    }
    let hundred: Number = serde_json::from_str(events[1].payload.as_str()).expect("decodes");
    assert_eq!(
        hundred,
        Number::Float(100.0),
        "`1E2` is a float, as written"
    );
    let zero: f64 = serde_json::from_str(events[3].payload.as_str()).expect("decodes");
    assert!(zero == 0.0 && zero.is_sign_negative(), "negative zero");
    let big: u128 = serde_json::from_str(events[7].payload.as_str()).expect("decodes");
    assert_eq!(big, 123_456_789_012_345_678_901_234_567_890);
}

/// A key twice in one object means different values to different decoders (and to
/// PostgreSQL's `jsonb`): refused from text and from `Serialize` output alike.
pub async fn duplicate_keys_are_refused(store: impl EventStore) {
    for text in [
        r#"{"a":1,"a":2}"#,
        r#"{"x":{"a":1,"b":2,"a":3}}"#,
        r#"{"a":1,"\u0061":2}"#,
    ] {
        assert_eq!(
            problem(&EventPayload::from_json(text)),
            JsonProblem::DuplicateKey { key: "a".into() },
            "{text}"
        );
    }
    #[derive(Serialize)]
    struct Clashing {
        a: u8,
        #[serde(flatten)]
        rest: std::collections::BTreeMap<String, u8>,
    }
    let clashing = Clashing {
        a: 1,
        rest: [("a".to_owned(), 2)].into(),
    };
    assert_eq!(
        problem(&EventPayload::serialize(&clashing, "Clashing")),
        JsonProblem::DuplicateKey { key: "a".into() }
    );
    // The same key in different objects is fine.
    let s = stream("keys");
    append_one(&store, &s, raw(r#"{"a":{"a":1},"b":[{"a":2},{"a":3}]}"#))
        .await
        .expect("stored");
    assert_eq!(read_back(&store, &s).await.len(), 1);
}

/// Text no backend keeps as given: NUL characters and lone surrogates, in payload
/// strings and keys, and in metadata; refused before anything is written.
pub async fn nul_characters_and_lone_surrogates_are_refused(store: impl EventStore) {
    for text in [r#""a\u0000""#, r#"{"k\u0000":1}"#] {
        assert_eq!(
            problem(&EventPayload::from_json(text)),
            JsonProblem::NulCharacter,
            "{text}"
        );
    }
    for text in [r#""\ud800""#, r#""\udfff x""#, r#"{"\ud83d":1}"#] {
        assert!(
            matches!(
                problem(&EventPayload::from_json(text)),
                JsonProblem::NotJson { .. }
            ),
            "{text}"
        );
    }
    let s = stream("nul");
    let key = EventMetadata::default().with_custom("k\0", 1);
    assert_eq!(
        problem(&append_one(&store, &s, with_metadata(key)).await),
        JsonProblem::NulCharacter
    );
    let nested = EventMetadata::default().with_custom("k", json!({"a": [{"b\0": 1}]}));
    assert_eq!(
        problem(&append_one(&store, &s, with_metadata(nested)).await),
        JsonProblem::NulCharacter
    );
    assert_nothing_stored(&store).await;
}

/// Sizes: a payload over [`MAX_PAYLOAD_BYTES`], metadata over [`MAX_METADATA_BYTES`],
/// an append over [`MAX_APPEND_BYTES`] are refused with the limit they hit; a payload
/// just under the limit is stored and read back whole.
pub async fn oversized_payloads_metadata_and_appends_are_refused(store: impl EventStore) {
    let text_of = |len: usize| format!("\"{}\"", "x".repeat(len - 2));
    let largest = text_of(MAX_PAYLOAD_BYTES);
    assert_eq!(
        problem(&EventPayload::from_json(text_of(MAX_PAYLOAD_BYTES + 1))),
        JsonProblem::TooLarge {
            len: MAX_PAYLOAD_BYTES + 1,
            max: MAX_PAYLOAD_BYTES
        }
    );
    assert!(matches!(
        problem(&EventPayload::serialize(
            &"x".repeat(MAX_PAYLOAD_BYTES),
            "Big"
        )),
        JsonProblem::TooLarge { .. }
    ));
    let metadata = EventMetadata::default().with_custom("blob", "y".repeat(MAX_METADATA_BYTES));
    let s = stream("sizes");
    assert!(matches!(
        problem(&append_one(&store, &s, with_metadata(metadata)).await),
        JsonProblem::TooLarge { max, .. } if max == MAX_METADATA_BYTES
    ));
    let count = MAX_APPEND_BYTES / MAX_PAYLOAD_BYTES + 1;
    let events: Vec<EventData> = (0..count).map(|_| raw(&largest)).collect();
    let refused = store
        .append(AppendRequest::single(
            s.clone(),
            ExpectedVersion::Any,
            events,
        ))
        .await;
    assert!(
        matches!(
            refused,
            Err(Error::AppendTooLarge {
                limit: AppendLimit::Bytes,
                max: MAX_APPEND_BYTES,
                ..
            })
        ),
        "{refused:?}"
    );
    assert_nothing_stored(&store).await;

    append_one(&store, &s, raw(&largest))
        .await
        .expect("a payload at the limit is stored");
    let events = read_back(&store, &s).await;
    assert_eq!(events[0].payload.len(), MAX_PAYLOAD_BYTES);
    assert!(events[0].payload.as_str() == largest);
}

/// Too many streams or events in one append are refused before anything is written
/// (PostgreSQL would run out of lock slots and fail the same way every time); the
/// largest allowed append of streams goes through.
pub async fn appends_over_the_stream_and_event_limits_are_refused(store: impl EventStore) {
    let streams = |n: usize| {
        (0..n).fold(AppendRequest::new(), |request, i| {
            request.with_stream(StreamAppend::new(
                stream(&format!("many-{i}")),
                ExpectedVersion::NoStream,
                vec![raw("1")],
            ))
        })
    };
    for n in [MAX_STREAMS_PER_APPEND + 1, 25_000] {
        let refused = store.append(streams(n)).await;
        assert!(
            matches!(
                refused,
                Err(Error::AppendTooLarge {
                    limit: AppendLimit::Streams,
                    actual,
                    max: MAX_STREAMS_PER_APPEND,
                }) if actual == n
            ),
            "{n} streams: {refused:?}"
        );
    }
    let events: Vec<EventData> = (0..=MAX_EVENTS_PER_APPEND).map(|_| raw("0")).collect();
    let refused = store
        .append(AppendRequest::single(
            stream("many-events"),
            ExpectedVersion::Any,
            events,
        ))
        .await;
    assert!(
        matches!(
            refused,
            Err(Error::AppendTooLarge {
                limit: AppendLimit::Events,
                ..
            })
        ),
        "{refused:?}"
    );
    assert_nothing_stored(&store).await;

    let outcome = store
        .append(streams(MAX_STREAMS_PER_APPEND))
        .await
        .expect("the largest allowed append");
    assert_eq!(outcome.events.len(), MAX_STREAMS_PER_APPEND);
}

/// An expected version no stream can be at (above `i64::MAX`, up to `u64::MAX`) is a
/// version conflict naming the expectation as given, on every backend and append path.
pub async fn expected_versions_beyond_any_stream_conflict(store: impl EventStore) {
    let s = stream("far");
    append_one(&store, &s, raw("1")).await.expect("stored");
    for far in [1u64 << 63, u64::MAX, i64::MAX as u64] {
        let expected = ExpectedVersion::Exact(StreamVersion::new(far));
        let single = store
            .append(AppendRequest::single(s.clone(), expected, vec![raw("2")]))
            .await;
        let multi = store
            .append(
                AppendRequest::single(s.clone(), expected, vec![raw("2")]).with_stream(
                    StreamAppend::check_only(stream("other"), ExpectedVersion::Any),
                ),
            )
            .await;
        for refused in [single, multi] {
            let conflicts = refused
                .as_ref()
                .err()
                .and_then(Error::version_conflicts)
                .unwrap_or_else(|| panic!("expected a conflict for {far}, got {refused:?}"));
            assert_eq!(conflicts.len(), 1);
            assert_eq!(conflicts[0].expected, expected);
            assert_eq!(conflicts[0].actual, StreamVersion::new(1));
        }
    }
    assert_eq!(read_back(&store, &s).await.len(), 1);
}

/// A stream prefix no stream id can start with (a NUL or another control character,
/// more than 255 bytes) selects nothing; it is not an error on any backend.
pub async fn impossible_stream_prefixes_select_nothing(store: impl EventStore) {
    append_one(&store, &stream("pre-1"), raw("1"))
        .await
        .expect("stored");
    for prefix in ["pre\0", "\0", "pre-\u{1}", "pre\n", &"p".repeat(300)] {
        let query = LogQuery::new().with_stream_prefix(prefix);
        let events = store.read_all(&query).await.expect("read");
        assert!(events.is_empty(), "{prefix:?} selected {events:?}");
        store.read_log(&query).await.expect("read_log");
    }
    let all = LogQuery::new().with_stream_prefix("pre-");
    assert_eq!(store.read_all(&all).await.expect("read").len(), 1);
}
