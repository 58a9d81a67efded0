use eventcore::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Event)]
enum Account {
    #[event(rename = "Opened")]
    Opened,
    #[event(name = Deposited)]
    Deposited,
}

#[derive(Serialize, Deserialize, Event)]
#[event(upcast(from = "Old"))]
#[event(payload = "tagged")]
enum Versioned {
    Current,
}

fn main() {}
