use eventcore::{
    Command, CommandLogic, CommandResult, CommandStreams, ReadStreams, StoredEvent, StreamId,
    StreamResolver, StreamWrite,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
enum Moved {
    Out(u64),
    In(u64),
}

impl eventcore::Event for Moved {
    fn event_type(&self) -> &'static str {
        match self {
            Moved::Out(_) => "Out",
            Moved::In(_) => "In",
        }
    }
}

#[derive(Command)]
struct Transfer {
    #[stream]
    from: StreamId,
    /// Doc comments and other attributes on stream fields are fine.
    #[stream]
    #[allow(dead_code)]
    to: StreamId,
    amount: u64,
}

impl CommandLogic for Transfer {
    type State = ();
    type Event = Moved;

    fn apply(&self, _state: &mut (), _event: &StoredEvent<Moved>) {}

    fn handle(
        &self,
        read_streams: ReadStreams<Self::StreamSet>,
        _state: (),
        _resolver: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, Moved>>> {
        Ok(vec![
            StreamWrite::new(&read_streams, self.from.clone(), Moved::Out(self.amount))?,
            StreamWrite::new(&read_streams, self.to.clone(), Moved::In(self.amount))?,
        ])
    }
}

fn main() {
    let (a, b) = (StreamId::from_static("a"), StreamId::from_static("b"));
    let command = Transfer {
        from: a.clone(),
        to: b.clone(),
        amount: 1,
    };
    assert_eq!(command.read_streams(), vec![a, b]);
}
