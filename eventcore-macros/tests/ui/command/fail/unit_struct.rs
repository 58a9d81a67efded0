use eventcore::Command;

#[derive(Command)]
struct Ping;

fn main() {}
