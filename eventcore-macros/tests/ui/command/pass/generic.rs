use std::fmt::Debug;
use std::marker::PhantomData;

use eventcore::{
    Command, CommandLogic, CommandResult, CommandStreams, ReadStreams, StoredEvent, StreamId,
    StreamResolver, StreamWrite,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Recorded<T> {
    value: T,
}

impl<T: Serialize + DeserializeOwned + Send + Sync + 'static> eventcore::Event for Recorded<T> {
    fn event_type(&self) -> &'static str {
        "Recorded"
    }
}

// Generic parameters, a lifetime-free where clause, and no `Send + Sync` bound written
// by the user: the derive states it for the impl.
#[derive(Command)]
struct Record<T, M = ()>
where
    T: Clone,
{
    #[stream]
    target: StreamId,
    value: T,
    marker: PhantomData<M>,
}

impl<T, M> CommandLogic for Record<T, M>
where
    T: Clone + Debug + Serialize + DeserializeOwned + Send + Sync + 'static,
    M: Send + Sync,
{
    type State = Vec<T>;
    type Event = Recorded<T>;

    fn apply(&self, state: &mut Vec<T>, event: &StoredEvent<Recorded<T>>) {
        state.push(event.payload.value.clone());
    }

    fn handle(
        &self,
        read_streams: ReadStreams<Self::StreamSet>,
        _state: Vec<T>,
        _resolver: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, Recorded<T>>>> {
        Ok(vec![StreamWrite::new(
            &read_streams,
            self.target.clone(),
            Recorded {
                value: self.value.clone(),
            },
        )?])
    }
}

fn main() {
    let command: Record<String> = Record {
        target: StreamId::from_static("t"),
        value: "v".to_owned(),
        marker: PhantomData,
    };
    assert_eq!(command.read_streams().len(), 1);
}
