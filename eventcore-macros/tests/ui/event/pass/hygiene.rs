//! Items a user may have in scope with the names the generated code uses for its own
//! bindings, and an upcaster named like one of them.
#![allow(non_upper_case_globals)]

use eventcore::Event;
use serde::{Deserialize, Serialize};

const event_type: u8 = 1;
const payload: u8 = 2;
const name: u8 = 3;
const event: u8 = 4;

fn upcast_payload(old: u8) -> Account {
    Account::Opened { n: old }
}

#[derive(Debug, Serialize, Deserialize, Event)]
enum Inner {
    Happened,
}

#[derive(Debug, Serialize, Deserialize, Event)]
#[event(upcast(from = "Old", with = upcast_payload))]
enum Account {
    Opened { n: u8 },
    #[event(transparent)]
    Nested(Inner),
}

#[derive(Debug, Serialize, Deserialize, Event)]
struct Single {
    n: u8,
}

fn main() {
    let _ = (event_type, payload, name, event);
    assert!(Account::decodes("Old") && Account::decodes("Happened"));
    assert_eq!(Single { n: 1 }.event_type(), "Single");
}
