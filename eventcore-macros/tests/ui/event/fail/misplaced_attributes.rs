use eventcore::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
#[event(name = "Account", transparent)]
enum Account {
    #[event(transparent)]
    Opened { owner: String },
    #[event(transparent, name = "Inner")]
    Nested(Inner),
    #[event(upcast(from = "Old", with = inner_v1))]
    Current,
}

#[derive(Serialize, Deserialize, Event)]
#[event(payload = "whole")]
struct Inner;

fn inner_v1(_: u8) -> Account {
    Account::Current
}

fn main() {}

#[derive(Serialize, Deserialize, Event)]
enum PerVariant {
    #[event(payload = "whole")]
    Opened {
        #[event(name = "owner")]
        owner: String,
    },
}

#[derive(Serialize, Deserialize, Event)]
struct Fielded {
    #[event(alias = "x")]
    x: u8,
}
