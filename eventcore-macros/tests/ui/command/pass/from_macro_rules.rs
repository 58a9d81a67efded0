// The derive works on structs a `macro_rules!` produces (hygiene of generated code).
use eventcore::{Command, CommandStreams, StreamId};

macro_rules! command {
    ($name:ident) => {
        #[derive(Command)]
        struct $name {
            #[stream]
            target: StreamId,
            #[stream]
            others: Vec<StreamId>,
        }
    };
}

command!(Generated);

fn main() {
    let command = Generated {
        target: StreamId::from_static("a"),
        others: vec![StreamId::from_static("b")],
    };
    assert_eq!(command.read_streams().len(), 2);
}
