//! Property tests of the validators at the door: they never panic on any input, accept
//! exactly what their rule says, and what they accept survives a round trip.
//!
//! Bounded for CI (`PROPTEST_CASES`, 256 by default).

use crate::limits::MAX_JSON_DEPTH;
use crate::{
    EventMetadata, EventPayload, EventType, JsonProblem, LogQuery, StreamId, StreamVersion,
};
use proptest::prelude::*;
use serde_json::{Map, Number, Value};

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

/// What `StreamId` and `EventType` promise: 1 to 255 bytes, no control character.
fn is_valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && !name.chars().any(char::is_control)
}

fn name_like() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9/-]{0,20}",
        "[A-Za-z]{0,6}\\*[a-z]{0,3}",
        any::<String>(),
        "[a-z]{250,260}",
        "[a-z]{0,4}[\\x00-\\x1f\u{7f}-\u{9f}][a-z]{0,4}",
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![4 => "[a-z ]{0,8}", 2 => any::<String>(), 1 => "[a-z]{0,2}\\x00"]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |v| v.is_finite())
            .prop_map(|v| Value::Number(Number::from_f64(v).expect("finite"))),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 32, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((text(), inner), 0..5)
                .prop_map(|entries| Value::Object(entries.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn wrap(mut value: Value, depth: usize) -> Value {
    for _ in 0..depth {
        value = Value::Array(vec![value]);
    }
    value
}

fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn has_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

/// Fragments that make up JSON-ish text, so arbitrary concatenations hit the parser's
/// interesting paths (escapes, numbers, nesting, truncation) far more often than
/// uniformly random strings.
fn jsonish() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        Just("{".to_owned()),
        Just("}".to_owned()),
        Just("[".to_owned()),
        Just("]".to_owned()),
        Just(",".to_owned()),
        Just(":".to_owned()),
        Just("\"a\"".to_owned()),
        Just("\"\\ud800\"".to_owned()),
        Just("\"\\u0000\"".to_owned()),
        Just("\"\\\\u0000\"".to_owned()),
        Just("1e400".to_owned()),
        Just("-0".to_owned()),
        Just("null".to_owned()),
        "-?[0-9]{1,5}(\\.[0-9]{1,5})?([eE][+-]?[0-9]{1,3})?",
        any::<String>(),
    ];
    prop::collection::vec(token, 0..24).prop_map(|tokens| tokens.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn stream_ids_and_type_names_accept_exactly_their_rule(name in name_like()) {
        let valid = is_valid_name(&name);
        let id = StreamId::try_new(name.as_str());
        prop_assert_eq!(id.is_ok(), valid);
        if let Ok(id) = &id {
            prop_assert_eq!(id.as_str(), name.as_str());
            let json = serde_json::to_string(id).expect("serializes");
            let back: StreamId = serde_json::from_str(&json).expect("deserializes");
            prop_assert_eq!(&back, id);
        } else {
            let json = serde_json::to_string(&name).expect("serializes");
            prop_assert!(serde_json::from_str::<StreamId>(&json).is_err());
        }
        prop_assert_eq!(EventType::try_new(name.as_str()).is_ok(), valid);
        prop_assert_eq!(crate::IdempotencyKey::try_new(name.as_str()).is_ok(), valid);
    }

    #[test]
    fn from_json_never_panics_and_accepts_only_readable_json(text in jsonish()) {
        match EventPayload::from_json(text.as_str()) {
            Ok(payload) => {
                prop_assert_eq!(payload.as_str(), text.as_str());
                let value: Value = serde_json::from_str(&text).expect("accepted text parses");
                prop_assert!(depth(&value) <= MAX_JSON_DEPTH);
                prop_assert!(!has_nul(&value));
                prop_assert!(EventPayload::from_stored_json(text.as_str()).is_ok());
            }
            Err(crate::Error::InvalidPayload { .. }) => {}
            Err(other) => prop_assert!(false, "untyped refusal {other:?}"),
        }
    }

    #[test]
    fn serialized_values_are_accepted_exactly_within_the_rule(
        value in json_value(),
        extra in 0usize..70,
    ) {
        let value = wrap(value, extra);
        let expected_ok = depth(&value) <= MAX_JSON_DEPTH && !has_nul(&value);
        let serialized = EventPayload::serialize(&value, "V");
        let parsed = EventPayload::from_json(value.to_string());
        prop_assert_eq!(serialized.is_ok(), expected_ok, "{:?}", serialized);
        prop_assert_eq!(parsed.is_ok(), expected_ok, "{:?}", parsed);
        if let Err(crate::Error::InvalidPayload { problem }) = &serialized {
            let expected = matches!(
                problem,
                JsonProblem::TooDeep { .. } | JsonProblem::NulCharacter
            );
            prop_assert!(expected, "{:?}", problem);
        }
        if let Ok(payload) = serialized {
            let back: Value = serde_json::from_str(payload.as_str()).expect("reads back");
            // Exact float parsing: the text of the value read back is the text written.
            prop_assert_eq!(back.to_string(), payload.as_str());
        }
    }

    #[test]
    fn metadata_decoding_never_panics_and_round_trips(
        text in jsonish(),
        actor in proptest::option::of(text()),
        custom in prop::collection::vec((text(), json_value()), 0..4),
    ) {
        let _ = serde_json::from_str::<EventMetadata>(&text);
        let mut metadata = EventMetadata::default();
        if let Some(actor) = actor {
            metadata = metadata.with_actor(actor);
        }
        for (key, value) in custom {
            metadata = metadata.with_custom(key, value);
        }
        let json = serde_json::to_string(&metadata).expect("serializes");
        let back: EventMetadata = serde_json::from_str(&json).expect("decodes");
        prop_assert_eq!(serde_json::to_string(&back).expect("serializes"), json);
        prop_assert_eq!(back, metadata);
    }

    #[test]
    fn log_queries_accept_valid_exact_type_names_and_any_prefix(
        types in prop::collection::vec(name_like(), 0..4),
        prefix in name_like(),
        after in any::<u64>(),
        limit in any::<usize>(),
    ) {
        // Valid names are accepted, except those holding `*`: a filter selects exact
        // names, and what reads as a pattern is refused (Error::EventTypePattern).
        let all_valid = types.iter().all(|t| is_valid_name(t) && !t.contains('*'));
        let query = LogQuery::new().with_after(crate::GlobalPosition::new(after))
            .with_limit(limit)
            .with_stream_prefix(prefix.as_str())
            .with_event_types(&types);
        prop_assert_eq!(query.is_ok(), all_valid);
        if types.iter().all(|t| is_valid_name(t)) && !all_valid {
            prop_assert!(
                matches!(query, Err(crate::Error::EventTypePattern { .. })),
                "a valid name holding `*` is refused as a pattern"
            );
        }
        if let Ok(query) = query {
            prop_assert_eq!(query.stream_prefix(), Some(prefix.as_str()));
            prop_assert_eq!(query.limit(), limit);
        }
        prop_assert!(StreamVersion::new(after).next().value() >= after);
    }
}
