//! One fold-and-handle round, and the append request built from what it decided.

use crate::command::{CommandLogic, ReadStreams, StreamResolver, StreamWrite};
use crate::error::{Error, Result};
use crate::event::{EventData, StoredEvent};
use crate::metadata::EventMetadata;
use crate::store::{AppendRequest, StreamAppend, StreamsSnapshot};
use crate::types::{ExpectedVersion, StreamId};

/// What one fold-and-handle round decided.
pub(crate) struct Decision<C: CommandLogic> {
    pub(crate) writes: Vec<StreamWrite<C::StreamSet, C::Event>>,
    /// Streams `handle` asked for that were not read yet.
    pub(crate) more_streams: Vec<StreamId>,
}

/// Folds `events` (already in global order) into a fresh state and calls `handle`.
/// Shared by the executor and the test harness so both run the very same logic.
pub(crate) fn decide<C: CommandLogic>(
    command: &C,
    streams: &[StreamId],
    events: &[StoredEvent<C::Event>],
) -> Result<Decision<C>> {
    let mut state = C::State::default();
    // A state declared as folded from some streams only sees their events, cached or
    // not, so turning the cache off never changes a decision.
    let only = command.state_cache().ops.and_then(|ops| ops.only);
    for event in events {
        if only
            .as_ref()
            .is_none_or(|only| only.contains(&event.stream_id))
        {
            command.apply(&mut state, event);
        }
    }
    decide_from(command, streams, state)
}

/// Calls `handle` on a state already folded from `streams`.
pub(super) fn decide_from<C: CommandLogic>(
    command: &C,
    streams: &[StreamId],
    state: C::State,
) -> Result<Decision<C>> {
    let mut resolver = StreamResolver::new();
    let writes = command.handle(ReadStreams::new(streams.to_vec()), state, &mut resolver)?;
    let more_streams = resolver
        .into_requested()
        .into_iter()
        .filter(|stream| !streams.contains(stream))
        .collect();
    Ok(Decision {
        writes,
        more_streams,
    })
}

/// Groups the writes by stream. Streams that were written come first, in the order the
/// command first wrote to each (that is the order of their global positions); the
/// streams only read follow, each checked at the version read.
pub(super) fn build_request<S, E: crate::Event>(
    streams: &[StreamId],
    snapshot: &StreamsSnapshot,
    writes: Vec<StreamWrite<S, E>>,
    metadata: &EventMetadata,
) -> Result<AppendRequest> {
    let mut written: Vec<StreamAppend> = Vec::new();
    for write in writes {
        let (stream_id, event) = write.into_parts();
        if !streams.contains(&stream_id) {
            return Err(Error::UndeclaredStream { stream: stream_id });
        }
        let data = EventData::from_event(&event, metadata.clone())?;
        match written.iter_mut().find(|s| s.stream_id == stream_id) {
            Some(entry) => entry.events.push(data),
            None => {
                let expected = ExpectedVersion::Exact(snapshot.version_of(&stream_id));
                written.push(StreamAppend::new(stream_id, expected, vec![data]));
            }
        }
    }
    for stream in streams {
        if !written.iter().any(|s| &s.stream_id == stream) {
            written.push(StreamAppend::check_only(
                stream.clone(),
                ExpectedVersion::Exact(snapshot.version_of(stream)),
            ));
        }
    }
    Ok(AppendRequest {
        streams: written,
        idempotency_key: None,
    })
}
