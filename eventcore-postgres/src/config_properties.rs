//! Property tests of the configuration parsers: schema names and connection URLs never
//! panic, accept exactly their rule, and a URL can never smuggle a NUL (which would
//! inject startup parameters). No server is needed.

use crate::{PostgresConfig, SchemaName};
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

fn schema_rule(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && (bytes[0].is_ascii_lowercase() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_')
        && !name.starts_with("pg_")
        && name != "information_schema"
}

fn url_part() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9_]{0,10}",
        "[a-z]{0,3}%[0-9a-fA-F]{2}[a-z]{0,3}",
        "[a-z]{0,3}%00[a-z]{0,3}",
        any::<String>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn schema_names_accept_exactly_their_rule(
        name in prop_oneof![
            "[a-z_][a-z0-9_]{0,70}",
            "pg_[a-z_]{0,10}",
            Just("information_schema".to_owned()),
            any::<String>(),
        ]
    ) {
        let parsed = SchemaName::try_new(name.as_str());
        prop_assert_eq!(parsed.is_ok(), schema_rule(&name));
        if let Ok(schema) = parsed {
            prop_assert_eq!(schema.as_str(), name.as_str());
        }
    }

    #[test]
    fn urls_never_panic_and_never_carry_a_nul(
        user in url_part(),
        database in url_part(),
        query in url_part(),
        raw in any::<String>(),
    ) {
        let _ = PostgresConfig::from_url(&raw);
        let url = format!("postgres://{user}@127.0.0.1:5432/{database}?application_name={query}");
        let nul = url.contains('\0') || url.to_ascii_lowercase().contains("%00");
        match PostgresConfig::from_url(&url) {
            Ok(_) => prop_assert!(!nul, "{url} was accepted"),
            Err(crate::Error::InvalidUrl { .. }) => {}
            Err(other) => prop_assert!(false, "untyped refusal {other:?}"),
        }
    }
}
