use eventcore::{Command, StreamId};

#[derive(Command)]
enum Deposit {
    Small { account: StreamId },
}

fn main() {}
