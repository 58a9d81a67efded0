use eventcore::Command;

#[derive(Command)]
union Deposit {
    amount: u64,
    cents: u32,
}

fn main() {}
