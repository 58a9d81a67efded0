//! `#[derive(Event)]`: what is stored for each shape of event, that it decodes back by
//! its stored type name, and what happens to names it does not know, old names and old
//! shapes.

use std::collections::BTreeMap;

use eventcore::{DecodeError, Error, Event, EventPayload, EventType, RawEvent};
use serde::{Deserialize, Serialize};

fn name(value: &str) -> EventType {
    EventType::try_new(value).expect("valid name")
}

fn json(value: &str) -> EventPayload {
    EventPayload::from_json(value).expect("valid JSON")
}

/// Encodes, checks the stored form, decodes by the stored name and checks the value.
fn round_trip<E: Event + PartialEq + std::fmt::Debug>(event: E, stored_type: &str, stored: &str) {
    assert_eq!(event.event_type(), stored_type);
    let payload = event.encode().expect("encodes");
    assert_eq!(payload.as_str(), stored);
    let decoded = E::decode(&name(stored_type), &payload).expect("decodes");
    assert_eq!(decoded, event);
    assert!(E::decodes(stored_type));
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
enum Account {
    Opened {
        owner: String,
    },
    #[event(name = "AccountDeposited")]
    Deposited {
        amount: u64,
    },
    Renamed(String),
    Moved(u32, u32),
    Closed,
}

#[test]
fn every_variant_shape_stores_its_content_under_its_type_name() {
    round_trip(
        Account::Opened {
            owner: "ada".into(),
        },
        "Opened",
        r#"{"owner":"ada"}"#,
    );
    round_trip(
        Account::Deposited { amount: 5 },
        "AccountDeposited",
        r#"{"amount":5}"#,
    );
    round_trip(Account::Renamed("bob".into()), "Renamed", r#""bob""#);
    round_trip(Account::Moved(1, 2), "Moved", "[1,2]");
    round_trip(Account::Closed, "Closed", "{}");
}

#[test]
fn the_stored_name_decides_not_the_payload() {
    // The same payload under two names decodes into two different variants: no trial
    // decoding, no variant order.
    #[derive(Debug, PartialEq, Serialize, Deserialize, Event)]
    enum Twins {
        Credited { amount: u64 },
        Debited { amount: u64 },
    }
    let payload = json(r#"{"amount":3}"#);
    assert_eq!(
        Twins::decode(&name("Debited"), &payload).expect("decodes"),
        Twins::Debited { amount: 3 }
    );
    assert_eq!(
        Twins::decode(&name("Credited"), &payload).expect("decodes"),
        Twins::Credited { amount: 3 }
    );
}

#[test]
fn a_name_the_type_does_not_know_is_an_error_naming_it() {
    let error = Account::decode(&name("Deposited"), &json(r#"{"amount":5}"#))
        .expect_err("`Deposited` is stored as `AccountDeposited`");
    match &error {
        DecodeError::UnknownType {
            event_type,
            rust_type,
        } => {
            assert_eq!(event_type, "Deposited");
            assert!(rust_type.ends_with("Account"), "{rust_type}");
        }
        other => panic!("expected UnknownType, got {other:?}"),
    }
    assert!(error.to_string().contains("`Deposited`"), "{error}");
    assert!(!Account::decodes("Deposited"));
}

#[test]
fn a_payload_that_does_not_fit_its_variant_is_a_payload_error() {
    let error = Account::decode(&name("AccountDeposited"), &json(r#"{"amount":"five"}"#))
        .expect_err("a string is not a u64");
    assert!(matches!(error, DecodeError::Payload(_)), "{error:?}");
    // Trailing garbage cannot reach a payload (the rule at the door), and a payload of
    // the wrong kind for a unit variant's `{}` is passed over like an unknown field.
    assert_eq!(
        Account::decode(&name("Closed"), &json(r#"{"reason":"moved away"}"#)).expect("decodes"),
        Account::Closed
    );
}

#[test]
fn serde_renames_and_field_attributes_keep_working() {
    #[derive(Debug, PartialEq, Serialize, Deserialize, Event)]
    #[serde(rename_all = "snake_case")]
    enum Shipment {
        #[serde(rename_all = "camelCase")]
        ParcelSent {
            tracking_code: String,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            note: Option<String>,
        },
        #[serde(rename = "lost!")]
        ParcelLost,
    }
    round_trip(
        Shipment::ParcelSent {
            tracking_code: "T1".into(),
            note: None,
        },
        "ParcelSent",
        r#"{"trackingCode":"T1"}"#,
    );
    round_trip(Shipment::ParcelLost, "ParcelLost", "{}");
    // A field added with a default reads old payloads.
    assert_eq!(
        Shipment::decode(&name("ParcelSent"), &json(r#"{"trackingCode":"T2"}"#)).expect("decodes"),
        Shipment::ParcelSent {
            tracking_code: "T2".into(),
            note: None
        }
    );
}

#[test]
fn flattened_fields_are_stored_in_the_content() {
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Audit {
        by: String,
    }
    #[derive(Debug, PartialEq, Serialize, Deserialize, Event)]
    enum Note {
        Written {
            text: String,
            #[serde(flatten)]
            audit: Audit,
        },
    }
    round_trip(
        Note::Written {
            text: "hi".into(),
            audit: Audit { by: "ada".into() },
        },
        "Written",
        r#"{"text":"hi","by":"ada"}"#,
    );
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
enum Orders {
    OrderPlaced { order: String },
    OrderCancelled { order: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
enum Stock {
    #[event(name = "StockReserved", alias = "Reserved")]
    Reserved { sku: String, quantity: u32 },
}

/// An enum over two other event enums, with a variant of its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
enum Shop {
    #[event(transparent)]
    Orders(Orders),
    #[event(transparent)]
    Stock(Stock),
    AuditNoted {
        text: String,
    },
}

#[test]
fn an_enum_of_event_enums_stores_and_decodes_each_as_its_own_enum_does() {
    let placed = Shop::Orders(Orders::OrderPlaced { order: "o1".into() });
    round_trip(placed, "OrderPlaced", r#"{"order":"o1"}"#);
    round_trip(
        Shop::Stock(Stock::Reserved {
            sku: "apple".into(),
            quantity: 2,
        }),
        "StockReserved",
        r#"{"sku":"apple","quantity":2}"#,
    );
    round_trip(
        Shop::AuditNoted { text: "x".into() },
        "AuditNoted",
        r#"{"text":"x"}"#,
    );
    // An event stored by the Orders enum decodes through Shop, and the other way.
    let cancelled = Orders::OrderCancelled { order: "o2".into() };
    let payload = cancelled.encode().expect("encodes");
    assert_eq!(
        Shop::decode(&name("OrderCancelled"), &payload).expect("decodes"),
        Shop::Orders(cancelled.clone())
    );
    // An alias of a nested enum is known to the outer one too.
    assert_eq!(
        Shop::decode(&name("Reserved"), &json(r#"{"sku":"pear","quantity":1}"#)).expect("decodes"),
        Shop::Stock(Stock::Reserved {
            sku: "pear".into(),
            quantity: 1
        })
    );
    assert!(!Shop::decodes("Refunded"));
    assert!(matches!(
        Shop::decode(&name("Refunded"), &json("{}")),
        Err(DecodeError::UnknownType { .. })
    ));
}

#[test]
fn an_alias_reads_events_stored_under_an_old_name_and_new_ones_get_the_new_name() {
    let old = json(r#"{"sku":"apple","quantity":2}"#);
    let decoded = Stock::decode(&name("Reserved"), &old).expect("the alias decodes");
    assert_eq!(decoded.event_type(), "StockReserved");
}

/// The first shape of `Deposited`: whole units, stored as `"Deposited"`.
#[derive(Deserialize)]
struct DepositedV1 {
    amount: u64,
}

fn deposited_v1(old: DepositedV1) -> Ledger {
    Ledger::Deposited {
        cents: old.amount * 100,
        currency: "EUR".into(),
    }
}

fn withdrawn_v1(old: serde_json::Value) -> Result<Ledger, String> {
    match old["amount"].as_u64() {
        Some(amount) => Ok(Ledger::Withdrawn {
            cents: amount * 100,
        }),
        None => Err(format!("no whole amount in {old}")),
    }
}

#[derive(Debug, PartialEq, Serialize, Deserialize, Event)]
#[event(upcast(from = "Deposited", with = deposited_v1))]
#[event(upcast(from = "Withdrawn", with = withdrawn_v1))]
#[event(upcast(from = "Fee", with = |old: BTreeMap<String, u64>| Ledger::Withdrawn { cents: old["cents"] }))]
enum Ledger {
    #[event(name = "Deposited.v2")]
    Deposited { cents: u64, currency: String },
    #[event(name = "Withdrawn.v2")]
    Withdrawn { cents: u64 },
}

#[test]
fn old_shapes_are_upcast_by_their_stored_name() {
    assert_eq!(
        Ledger::decode(&name("Deposited"), &json(r#"{"amount":3}"#)).expect("upcast"),
        Ledger::Deposited {
            cents: 300,
            currency: "EUR".into()
        }
    );
    // New events are stored under the new name, in the new shape.
    round_trip(
        Ledger::Deposited {
            cents: 5,
            currency: "USD".into(),
        },
        "Deposited.v2",
        r#"{"cents":5,"currency":"USD"}"#,
    );
    assert_eq!(
        Ledger::decode(&name("Withdrawn"), &json(r#"{"amount":2}"#)).expect("upcast"),
        Ledger::Withdrawn { cents: 200 }
    );
    assert_eq!(
        Ledger::decode(&name("Fee"), &json(r#"{"cents":7}"#)).expect("a closure upcasts"),
        Ledger::Withdrawn { cents: 7 }
    );
    assert!(Ledger::decodes("Deposited") && Ledger::decodes("Fee"));
}

#[test]
fn an_upcaster_that_refuses_is_an_error_naming_the_old_type() {
    let error = Ledger::decode(&name("Withdrawn"), &json(r#"{"amount":"lots"}"#))
        .expect_err("the upcaster refuses");
    match &error {
        DecodeError::Upcast { event_type, source } => {
            assert_eq!(event_type, "Withdrawn");
            assert!(source.to_string().contains("no whole amount"), "{source}");
        }
        other => panic!("expected Upcast, got {other:?}"),
    }
    // An old payload that does not fit the old shape is a payload error.
    assert!(matches!(
        Ledger::decode(&name("Deposited"), &json(r#"{"amount":-1}"#)),
        Err(DecodeError::Payload(_))
    ));
}

#[derive(Debug, PartialEq, Serialize, Deserialize, Event)]
#[event(name = "UserRegistered", alias = "SignedUp")]
struct UserRegistered {
    user_id: String,
}

#[derive(Debug, PartialEq, Serialize, Deserialize, Event)]
struct Tick;

#[test]
fn a_struct_is_one_event_type_stored_whole() {
    round_trip(
        UserRegistered {
            user_id: "u1".into(),
        },
        "UserRegistered",
        r#"{"user_id":"u1"}"#,
    );
    assert!(UserRegistered::decodes("SignedUp"));
    assert!(matches!(
        UserRegistered::decode(&name("UserDeleted"), &json("{}")),
        Err(DecodeError::UnknownType { .. })
    ));
    round_trip(Tick, "Tick", "null");
}

#[derive(Debug, PartialEq, Serialize, Deserialize, Event)]
enum Recorded<T> {
    Value { value: T },
}

#[test]
fn a_generic_enum_derives_with_serde_s_bounds() {
    round_trip(Recorded::Value { value: 7_u8 }, "Value", r#"{"value":7}"#);
    round_trip(
        Recorded::Value {
            value: "x".to_owned(),
        },
        "Value",
        r#"{"value":"x"}"#,
    );
}

#[test]
fn a_raw_event_keeps_its_name_and_bytes_and_decodes_into_a_typed_one() {
    let raw = RawEvent::new(name("OrderPlaced"), json(r#"{ "order" : "o9" }"#));
    assert_eq!(raw.event_type(), "OrderPlaced");
    assert_eq!(
        raw.encode().expect("encodes").as_str(),
        r#"{ "order" : "o9" }"#
    );
    assert_eq!(
        raw.decode_as::<Shop>().expect("decodes"),
        Shop::Orders(Orders::OrderPlaced { order: "o9".into() })
    );
    let again = <RawEvent as Event>::decode(&name("Anything"), &json("[1]")).expect("any name");
    assert_eq!(again.event_type(), "Anything");
    // Serde form: the payload embedded as the JSON it is.
    let text = serde_json::to_string(&raw).expect("serializes");
    assert_eq!(
        text,
        r#"{"event_type":"OrderPlaced","payload":{ "order" : "o9" }}"#
    );
    let back: RawEvent = serde_json::from_str(&text).expect("deserializes");
    assert_eq!(back, raw);
}

#[test]
fn a_stored_event_is_decoded_by_its_type_name_with_the_stream_in_the_error() {
    use eventcore::{
        AppendRequest, EventData, EventMetadata, EventStore, ExpectedVersion, StreamId,
    };
    let store = eventcore_memory::InMemoryEventStore::new();
    let stream = StreamId::try_new("account-1").expect("valid");
    let events = [
        EventData::from_event(&Account::Deposited { amount: 1 }, EventMetadata::default())
            .expect("encodes"),
        EventData::new(name("Refunded"), json("{}"), EventMetadata::default()),
    ];
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let recorded = runtime.block_on(async {
        store
            .append(AppendRequest::single(
                stream.clone(),
                ExpectedVersion::NoStream,
                events.to_vec(),
            ))
            .await
            .expect("appends");
        store
            .read_streams(std::slice::from_ref(&stream))
            .await
            .expect("reads")
            .events
    });
    assert_eq!(
        recorded[0].decode::<Account>().expect("decodes").payload,
        Account::Deposited { amount: 1 }
    );
    match recorded[1].decode::<Account>() {
        Err(Error::Deserialization {
            stream: s,
            version,
            event_type,
            source: DecodeError::UnknownType { .. },
        }) => {
            assert_eq!(s, stream);
            assert_eq!(version.value(), 2);
            assert_eq!(event_type, "Refunded");
        }
        other => panic!("expected Deserialization(UnknownType), got {other:?}"),
    }
    let message = eventcore::error_chain(&recorded[1].decode::<Account>().expect_err("unknown"));
    assert!(
        message.contains("`Refunded`") && message.contains("account-1"),
        "{message}"
    );
}

/// What a hand-written impl stored before the derive existed: the whole enum, serde's
/// tag inside the payload.
#[derive(Debug, PartialEq, Serialize, Deserialize, Event)]
#[event(payload = "whole")]
enum Legacy {
    Deposited {
        amount: u64,
    },
    #[event(name = "LegacyClosed")]
    Closed,
}

#[test]
fn payload_whole_keeps_reading_and_writing_what_hand_written_impls_stored() {
    round_trip(
        Legacy::Deposited { amount: 5 },
        "Deposited",
        r#"{"Deposited":{"amount":5}}"#,
    );
    round_trip(Legacy::Closed, "LegacyClosed", r#""Closed""#);
    // The stored name is still checked first: a payload that would fit is refused under
    // a name the enum does not have.
    assert!(matches!(
        Legacy::decode(&name("Withdrawn"), &json(r#"{"Deposited":{"amount":5}}"#)),
        Err(DecodeError::UnknownType { .. })
    ));
}

#[test]
// serde's own derive warns that the second `ioerror` is unreachable by name.
#[allow(unreachable_patterns)]
fn serde_aliases_and_shared_serde_names_do_not_move_a_variant() {
    // serde lists aliases among its variant names, and lets two variants share one:
    // the derive names variants by position, so neither shifts or merges them.
    #[derive(Debug, PartialEq, Serialize, Deserialize, Event)]
    enum Aliased {
        #[serde(alias = "Old")]
        Opened {
            id: u32,
        },
        Closed,
    }
    round_trip(Aliased::Opened { id: 1 }, "Opened", r#"{"id":1}"#);
    round_trip(Aliased::Closed, "Closed", "{}");

    #[derive(Debug, PartialEq, Serialize, Deserialize, Event)]
    #[serde(rename_all = "lowercase")]
    enum Clashing {
        IoError(u32),
        IOError(u32),
    }
    round_trip(Clashing::IoError(1), "IoError", "1");
    round_trip(Clashing::IOError(2), "IOError", "2");
}

#[test]
fn a_raw_identifier_is_stored_under_its_plain_name() {
    #[derive(Debug, PartialEq, Serialize, Deserialize, Event)]
    enum Keywords {
        r#Match { score: u8 },
    }
    #[derive(Debug, PartialEq, Serialize, Deserialize, Event)]
    #[allow(non_camel_case_types)]
    struct r#type;
    round_trip(Keywords::r#Match { score: 1 }, "Match", r#"{"score":1}"#);
    round_trip(r#type, "type", "null");
}

#[test]
fn payload_whole_refuses_a_payload_whose_tag_disagrees_with_the_stored_name() {
    #[derive(Debug, PartialEq, Serialize, Deserialize, Event)]
    #[event(payload = "whole")]
    #[serde(tag = "kind")]
    enum Tagged {
        Credited { amount: u64 },
        Debited { amount: u64 },
    }
    round_trip(
        Tagged::Debited { amount: 2 },
        "Debited",
        r#"{"kind":"Debited","amount":2}"#,
    );
    let error = Tagged::decode(&name("Debited"), &json(r#"{"kind":"Credited","amount":2}"#))
        .expect_err("the stored name says Debited, the payload Credited");
    assert!(matches!(error, DecodeError::Payload(_)), "{error:?}");
    assert!(error.to_string().contains("payload"), "{error}");
    assert!(
        eventcore::error_chain(&error).contains("`Credited`"),
        "{}",
        eventcore::error_chain(&error)
    );
}
