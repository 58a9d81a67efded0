use eventcore::{Command, StreamId};

// Every bad field is reported in one build.
#[derive(Command)]
struct Deposit {
    #[stream(unexpected)]
    account: StreamId,
    #[stream = "other"]
    other: StreamId,
    #[stream]
    #[stream]
    third: StreamId,
}

fn main() {}
