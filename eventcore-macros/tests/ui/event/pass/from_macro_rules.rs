//! The derive works on items a `macro_rules!` writes, and a hand-written impl (the
//! `&'static str` signature of before) still compiles beside it.
use eventcore::Event;
use serde::{Deserialize, Serialize};

macro_rules! event_enum {
    ($name:ident { $($variant:ident),* }) => {
        #[derive(Debug, Serialize, Deserialize, Event)]
        enum $name { $($variant { n: u32 }),* }
    };
}

event_enum!(Counter { Up, Down });

#[derive(Debug, Serialize, Deserialize)]
enum ByHand {
    Happened,
}

impl Event for ByHand {
    fn event_type(&self) -> &'static str {
        "Happened"
    }
}

fn main() {
    assert_eq!(Counter::Up { n: 1 }.event_type(), "Up");
    assert_eq!(Counter::Down { n: 1 }.event_type(), "Down");
    assert_eq!(ByHand::Happened.event_type(), "Happened");
}
