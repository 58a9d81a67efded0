use eventcore::Event;
use serde::{Deserialize, Serialize};

// Every problem is reported at once, each where it was written.
#[derive(Serialize, Deserialize, Event)]
enum Account {
    #[event(name = "")]
    Opened,
    #[event(name = "Line\nBreak")]
    Deposited,
    #[event(alias = "Closed")]
    Withdrawn,
    Closed,
    #[event(name = "Opened", name = "Twice")]
    Reopened,
}

#[derive(Serialize, Deserialize, Event)]
#[event(upcast(from = "Current", with = |v: u8| Versioned::Current { v }))]
enum Versioned {
    Current { v: u8 },
}

fn main() {}
