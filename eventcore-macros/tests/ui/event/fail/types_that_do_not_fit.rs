use eventcore::Event;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct NotAnEvent;

// The compiler, not the macro, finds these; the errors point at the type and the
// function where they were written.
#[derive(Serialize, Deserialize, Event)]
#[event(upcast(from = "Old", with = wrong_output))]
enum Shop {
    #[event(transparent)]
    Plain(NotAnEvent),
}

fn wrong_output(_: serde_json::Value) -> String {
    String::new()
}

fn main() {}
