//! Every variant shape, names, aliases, a struct event and `payload = "whole"`.
use eventcore::{Event, EventType};
use serde::{Deserialize, Serialize};

#[derive(Debug, PartialEq, Serialize, Deserialize, Event)]
enum Account {
    Opened { owner: String },
    #[event(name = "AccountDeposited", alias = "Deposited", alias = "MoneyIn")]
    Deposited { amount: u64 },
    Renamed(String),
    Moved(u32, u32),
    Closed,
}

#[derive(Debug, PartialEq, Serialize, Deserialize, Event)]
#[event(name = "UserRegistered")]
struct Registered {
    user: String,
}

#[derive(Debug, PartialEq, Serialize, Deserialize, Event)]
struct Tick;

#[derive(Debug, PartialEq, Serialize, Deserialize, Event)]
#[event(payload = "whole")]
#[serde(tag = "type")]
enum Legacy {
    Happened { at: u64 },
}

fn main() {
    let payload = Account::Closed.encode().unwrap();
    let name = EventType::try_new("MoneyIn").unwrap();
    assert!(Account::decode(&name, &eventcore::EventPayload::from_json(r#"{"amount":1}"#).unwrap()).is_ok());
    assert_eq!(payload.as_str(), "{}");
    assert_eq!(Registered { user: "u".into() }.event_type(), "UserRegistered");
    assert_eq!(Tick.event_type(), "Tick");
    assert_eq!(Legacy::Happened { at: 1 }.encode().unwrap().as_str(), r#"{"type":"Happened","at":1}"#);
}
