// A StreamWrite is tied to the command that built it: one command cannot return a write
// built from another command's ReadStreams.
use eventcore::{
    Command, CommandLogic, CommandResult, ReadStreams, StoredEvent, StreamId, StreamResolver,
    StreamWrite,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Touched;

impl eventcore::Event for Touched {
    fn event_type(&self) -> &'static str {
        "Touched"
    }
}

#[derive(Command)]
struct Other {
    #[stream]
    stream: StreamId,
}

#[derive(Command)]
struct Mine {
    #[stream]
    stream: StreamId,
}

fn foreign_write(
    streams: &ReadStreams<OtherStreamSet>,
    id: StreamId,
) -> StreamWrite<OtherStreamSet, Touched> {
    StreamWrite::new(streams, id, Touched).unwrap()
}

impl CommandLogic for Mine {
    type State = ();
    type Event = Touched;

    fn apply(&self, _state: &mut (), _event: &StoredEvent<Touched>) {}

    fn handle(
        &self,
        read_streams: ReadStreams<Self::StreamSet>,
        _state: (),
        _resolver: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, Touched>>> {
        Ok(vec![foreign_write(&read_streams, self.stream.clone())])
    }
}

fn main() {}
