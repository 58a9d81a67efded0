use eventcore::Event;
use serde::{Deserialize, Serialize};

#[derive(Event)]
union Bits {
    a: u32,
    b: f32,
}

#[derive(Serialize, Deserialize, Event)]
enum Nothing {}

fn main() {}
