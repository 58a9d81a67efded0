use eventcore::{
    Command, CommandLogic, CommandResult, CommandStreams, ReadStreams, StoredEvent, StreamId,
    StreamResolver, StreamWrite,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
pub struct Deposited {
    amount: u64,
}

impl eventcore::Event for Deposited {
    fn event_type(&self) -> &'static str {
        "Deposited"
    }
}

#[derive(Command)]
pub struct Deposit {
    #[stream]
    account: StreamId,
    amount: u64,
}

impl CommandLogic for Deposit {
    type State = u64;
    type Event = Deposited;

    fn apply(&self, state: &mut u64, event: &StoredEvent<Deposited>) {
        *state += event.payload.amount;
    }

    fn handle(
        &self,
        read_streams: ReadStreams<Self::StreamSet>,
        _state: u64,
        _resolver: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, Deposited>>> {
        Ok(vec![StreamWrite::new(
            &read_streams,
            self.account.clone(),
            Deposited { amount: self.amount },
        )?])
    }
}

// The marker type is public like the command and nameable.
pub fn marker() -> DepositStreamSet {
    DepositStreamSet
}

fn main() {
    let account = StreamId::from_static("account-1");
    let command = Deposit {
        account: account.clone(),
        amount: 5,
    };
    assert_eq!(command.read_streams(), vec![account]);
    let _ = marker();
}
