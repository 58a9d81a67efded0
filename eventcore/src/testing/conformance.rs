//! The backend conformance suite: what every [`EventStore`] must do, as generic async
//! checks that panic on a violation. One specification, grouped by topic:
//!
//! - `conformance/read.rs`: reads by stream return what was written, per stream,
//!   merged in global order, and after known versions; nothing is ever dropped, not
//!   even an event the reader cannot decode.
//! - `conformance/append.rs`: every stream of a request, written or only checked, is
//!   checked at its expected version; one failed check fails the whole append.
//! - `conformance/log.rs`: positions increase in commit and request order; pages resume
//!   after a position, filters select before the limit, a read says how far it looked,
//!   the head follows the last event, and a waiting reader wakes.
//! - `conformance/idempotency.rs`: a repeated request (same key, or same event ids)
//!   writes nothing and answers with the first outcome; a failed append consumes no key.
//! - `conformance/validation.rs`: requests no backend may accept are refused before
//!   anything is written.
//! - `conformance/concurrency.rs`: racing writers get one winner per version; a live
//!   reader sees every event once, in order (the prefix property); multi-stream appends
//!   are seen whole or not at all.
//! - `conformance/snapshots.rs`: snapshots of command states read back exactly, under
//!   exactly their key, the furthest one kept; the executor starts from one only when
//!   its streams prove it.
//!
//! Each check takes a fresh, empty store. Instantiate them all with
//! [`crate::event_store_conformance_tests!`]; a unit test checks that the macro names
//! every check of these files. Hostile inputs have their own section ([`super::hostile`]).

mod append;
mod concurrency;
mod idempotency;
mod log;
mod read;
mod snapshots;
mod validation;

pub use append::*;
pub use concurrency::*;
pub use idempotency::*;
pub use log::*;
pub use read::*;
pub use snapshots::*;
pub use validation::*;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{
    AppendOutcome, AppendRequest, CorrelationId, Error, Event, EventData, EventId, EventMetadata,
    EventPayload, EventStore, EventType, ExpectedVersion, GlobalPosition, IdempotencyKey, LogQuery,
    RecordedEvent, StreamAppend, StreamId, StreamVersion,
};

/// The event type the checks write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ConformanceEvent {
    /// A number.
    Added {
        /// The number.
        value: i64,
    },
    /// A text.
    Noted {
        /// The text.
        text: String,
    },
}

impl Event for ConformanceEvent {
    fn event_type(&self) -> &'static str {
        match self {
            ConformanceEvent::Added { .. } => "Added",
            ConformanceEvent::Noted { .. } => "Noted",
        }
    }
}

use super::HANG_GUARD;

/// How long a wait that must not complete is watched before concluding it is pending.
/// A correct store never completes it, whatever the time; a store that wrongly returns at
/// once fails well within it.
pub(crate) const PENDING_WINDOW: Duration = Duration::from_millis(200);

fn stream(name: &str) -> StreamId {
    StreamId::try_new(name).expect("test stream ids are valid")
}

fn added(value: i64) -> EventData {
    EventData::from_event(&ConformanceEvent::Added { value }, EventMetadata::default())
        .expect("test events serialize")
}

fn noted(text: &str) -> EventData {
    EventData::from_event(
        &ConformanceEvent::Noted {
            text: text.to_owned(),
        },
        EventMetadata::default(),
    )
    .expect("test events serialize")
}

fn version(v: u64) -> StreamVersion {
    StreamVersion::new(v)
}

async fn append_to(
    store: &impl EventStore,
    stream_id: &StreamId,
    expected: ExpectedVersion,
    events: Vec<EventData>,
) -> crate::Result<AppendOutcome> {
    store
        .append(AppendRequest::single(stream_id.clone(), expected, events))
        .await
}

async fn read(
    store: &impl EventStore,
    stream_id: &StreamId,
) -> (Vec<RecordedEvent>, StreamVersion) {
    let snapshot = store
        .read_streams(std::slice::from_ref(stream_id))
        .await
        .expect("read_streams failed");
    let version = snapshot.version_of(stream_id);
    (snapshot.events, version)
}

async fn read_everything(store: &impl EventStore) -> Vec<RecordedEvent> {
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let batch = store
            .read_all(&LogQuery::new().with_after(after).with_limit(1_000))
            .await
            .expect("read_all failed");
        let Some(last) = batch.last() else {
            return all;
        };
        after = Some(last.global_position);
        all.extend(batch);
    }
}

fn values(events: &[RecordedEvent]) -> Vec<i64> {
    events
        .iter()
        .map(
            |e| match e.decode::<ConformanceEvent>().expect("decodes").payload {
                ConformanceEvent::Added { value } => value,
                ConformanceEvent::Noted { .. } => i64::MIN,
            },
        )
        .collect()
}

fn assert_conflict(
    result: crate::Result<AppendOutcome>,
    expected: &[(StreamId, ExpectedVersion, u64)],
) {
    match result {
        Err(Error::VersionConflict { conflicts }) => {
            let got: Vec<(StreamId, ExpectedVersion, u64)> = conflicts
                .into_iter()
                .map(|c| (c.stream, c.expected, c.actual.value()))
                .collect();
            let mut got_sorted = got.clone();
            got_sorted.sort_by(|a, b| a.0.cmp(&b.0));
            let mut want = expected.to_vec();
            want.sort_by(|a, b| a.0.cmp(&b.0));
            assert_eq!(got_sorted, want, "conflict entries");
        }
        other => panic!("expected a VersionConflict, got {other:?}"),
    }
}
