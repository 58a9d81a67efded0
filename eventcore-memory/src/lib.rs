//! The in-memory [`EventStore`] for EventCore: the default for examples and for users'
//! tests, and exactly as strict as the database backends.
//!
//! It passes the same conformance suite as every other backend: the same version
//! conflicts (read-only participants included), the same atomicity, the same global
//! order with the prefix property, the same idempotency keys, the same typed errors.
//! Nothing is persisted; dropping the last clone drops the events.
//!
//! With the feature `distributed`, the crate also has `InMemoryBroker`: the in-process
//! transport of `eventcore::distributed` between services, as strict as a real broker
//! where the transport contract is concerned and deterministic in tests.
//!
//! Its operations complete at once, so that tasks issuing them back to back still take
//! turns, each one spends a unit of the calling task's Tokio budget and yields when the
//! budget is spent, as a socket would. Outside a Tokio runtime there is no budget and
//! nothing yields; an executor that blocks a Tokio worker thread on them (a
//! `futures::executor::block_on` inside a Tokio task) can wait forever for a wake-up
//! that thread would have to deliver, as it would on any Tokio resource.
//!
//! # Examples
//!
//! ```
//! use eventcore::{AppendRequest, EventData, EventMetadata, EventPayload, EventStore,
//!     EventType, ExpectedVersion, StreamId};
//! use eventcore_memory::InMemoryEventStore;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> eventcore::Result<()> {
//! let store = InMemoryEventStore::new();
//! let stream = StreamId::try_new("greetings")?;
//! let event = EventData::new(
//!     EventType::try_new("Greeted")?,
//!     EventPayload::from_json(r#"{"name":"Ada"}"#)?,
//!     EventMetadata::default(),
//! );
//! store
//!     .append(AppendRequest::single(stream.clone(), ExpectedVersion::NoStream, vec![event]))
//!     .await?;
//! let read = store.read_streams(&[stream.clone()]).await?;
//! assert_eq!(read.version_of(&stream).value(), 1);
//! # Ok(())
//! # }
//! ```
//!
//! # Concurrency
//!
//! Each stream has its own lock; the global log has one more. An append locks its
//! streams in a fixed order (by id) and then the log, checks every expectation, assigns
//! positions and publishes the events to the streams and the log before releasing
//! anything, so the log is always a contiguous prefix and readers of several streams see
//! an append entirely or not at all. Reading streams never touches the log lock. No lock
//! is ever held across an `.await`.

#[cfg(feature = "distributed")]
mod broker;
mod chunked;
mod election;
#[cfg(feature = "distributed")]
mod registry;

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{SubsecRound, Utc};
use dashmap::DashMap;
use eventcore::{
    AppendOutcome, AppendRequest, AppendedEvent, CheckpointStore, Error, EventStore,
    GlobalPosition, IdempotencyKey, LogQuery, LogRead, ParkedEvent, ProjectionName, RecordedEvent,
    Result, Snapshot, SnapshotKey, SnapshotStore, StreamConflict, StreamId, StreamVersion,
    StreamsSnapshot, check_checkpoint_position,
};
use parking_lot::RwLock;
use tokio::sync::watch;

#[cfg(feature = "distributed")]
pub use crate::broker::{InMemoryBroker, InMemoryPublisher};
use crate::chunked::{ChunkedVec, IdIndex};
pub use crate::election::InMemoryLeaderElection;
#[cfg(feature = "distributed")]
pub use crate::registry::InMemoryServiceRegistry;

/// An event store that keeps everything in memory. Cheap to clone; clones share events.
#[derive(Clone)]
pub struct InMemoryEventStore {
    inner: Arc<Inner>,
}

struct Inner {
    streams: DashMap<StreamId, Arc<RwLock<ChunkedVec<RecordedEvent>>>>,
    log: RwLock<Log>,
    /// The head position, published after every append so waiting readers wake up.
    head: watch::Sender<u64>,
    checkpoints: parking_lot::Mutex<Checkpoints>,
    snapshots: parking_lot::Mutex<HashMap<SnapshotKey, Snapshot>>,
}

#[derive(Default)]
struct Checkpoints {
    positions: HashMap<String, GlobalPosition>,
    parked: Vec<ParkedEvent>,
}

#[derive(Default)]
struct Log {
    /// Event at position `p` is at index `p - 1`: positions are contiguous here.
    events: ChunkedVec<RecordedEvent>,
    idempotency: HashMap<IdempotencyKey, AppendOutcome>,
    /// Where each stored event id is in `events`: ids are unique across the store.
    ids: IdIndex,
}

impl InMemoryEventStore {
    /// An empty store.
    pub fn new() -> Self {
        InMemoryEventStore {
            inner: Arc::new(Inner {
                // Many small shards: growing one rehashes a small part of the streams,
                // not a large one while appends to it wait.
                streams: DashMap::with_shard_amount(256),
                log: RwLock::new(Log::default()),
                head: watch::Sender::new(0),
                checkpoints: parking_lot::Mutex::new(Checkpoints::default()),
                snapshots: parking_lot::Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The number of events stored.
    pub fn len(&self) -> usize {
        self.inner.log.read().events.len()
    }

    /// Whether no event is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn stream_handle(&self, stream: &StreamId) -> Arc<RwLock<ChunkedVec<RecordedEvent>>> {
        // The map guard is dropped at the end of this statement: it is never held while
        // a stream lock is taken, so map shards and stream locks cannot deadlock.
        self.inner
            .streams
            .entry(stream.clone())
            .or_default()
            .value()
            .clone()
    }

    /// One consistent snapshot of `streams`, each from the event after index
    /// `skip(stream)` (its version read before), with their current versions.
    fn read(&self, streams: &[StreamId], skip: impl Fn(&StreamId) -> usize) -> StreamsSnapshot {
        let mut ids: Vec<&StreamId> = streams.iter().collect();
        ids.sort();
        ids.dedup();
        // Locks are taken in id order, like appends take them, so a multi-stream append
        // is seen entirely or not at all. A stream missing from the map is not locked; if
        // one appears while we hold the others, an append may have created it after we
        // looked, so start over rather than return a torn snapshot.
        loop {
            let handles: Vec<Option<Arc<RwLock<ChunkedVec<RecordedEvent>>>>> = ids
                .iter()
                .map(|id| self.inner.streams.get(*id).map(|h| h.value().clone()))
                .collect();
            let guards: Vec<_> = handles
                .iter()
                .map(|handle| handle.as_ref().map(|h| h.read()))
                .collect();
            let appeared = ids
                .iter()
                .zip(&guards)
                .any(|(id, guard)| guard.is_none() && self.inner.streams.contains_key(*id));
            if appeared {
                continue;
            }
            let mut snapshot = StreamsSnapshot::default();
            for (id, guard) in ids.iter().zip(&guards) {
                let len = guard.as_deref().map_or(0, ChunkedVec::len);
                snapshot
                    .versions
                    .push(((*id).clone(), StreamVersion::new(len as u64)));
                if let Some(events) = guard.as_deref() {
                    snapshot.events.extend(events.iter_from(skip(id)).cloned());
                }
            }
            drop(guards);
            if ids.len() > 1 {
                snapshot.events.sort_unstable_by_key(|e| e.global_position);
            }
            // Report versions in the caller's order.
            let mut versions = Vec::with_capacity(snapshot.versions.len());
            for stream in streams {
                if versions.iter().all(|(id, _)| id != stream) {
                    versions.push((stream.clone(), snapshot.version_of(stream)));
                }
            }
            snapshot.versions = versions;
            return snapshot;
        }
    }
}

impl Default for InMemoryEventStore {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for InMemoryEventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryEventStore")
            .field("events", &self.len())
            .field("streams", &self.inner.streams.len())
            .finish()
    }
}

#[async_trait]
impl EventStore for InMemoryEventStore {
    async fn read_streams(&self, streams: &[StreamId]) -> Result<StreamsSnapshot> {
        // Every operation completes at once, so a task issuing them back to back would
        // never give its worker thread back: each one spends a unit of the task's Tokio
        // budget, as a socket or a channel would, and yields once it is spent. (Without
        // it, eight such tasks on two workers kept others waiting for up to a second.)
        tokio::task::coop::consume_budget().await;
        Ok(self.read(streams, |_| 0))
    }

    async fn read_streams_after(
        &self,
        streams: &[(StreamId, StreamVersion)],
    ) -> Result<StreamsSnapshot> {
        tokio::task::coop::consume_budget().await;
        let ids: Vec<StreamId> = streams.iter().map(|(id, _)| id.clone()).collect();
        Ok(self.read(&ids, |id| {
            streams
                .iter()
                .find(|(stream, _)| stream == id)
                .map_or(0, |(_, after)| {
                    usize::try_from(after.value()).unwrap_or(usize::MAX)
                })
        }))
    }

    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome> {
        tokio::task::coop::consume_budget().await;
        request.validate()?;
        let span = tracing::debug_span!(
            "eventcore.memory.append",
            streams = request.streams.len(),
            events = request.event_count()
        );
        let _entered = span.enter();

        let handles: Vec<_> = request
            .streams
            .iter()
            .map(|s| self.stream_handle(&s.stream_id))
            .collect();
        let mut order: Vec<usize> = (0..handles.len()).collect();
        order.sort_by(|a, b| {
            request.streams[*a]
                .stream_id
                .cmp(&request.streams[*b].stream_id)
        });
        let mut guards: Vec<Option<parking_lot::RwLockWriteGuard<'_, ChunkedVec<RecordedEvent>>>> =
            (0..handles.len()).map(|_| None).collect();
        for index in order {
            guards[index] = Some(handles[index].write());
        }
        let mut guards: Vec<_> = guards.into_iter().flatten().collect();
        let mut log = self.inner.log.write();

        // The key is checked before any version: a retried request whose first try
        // succeeded must get its outcome back, not a conflict with itself.
        if let Some(key) = &request.idempotency_key
            && let Some(outcome) = log.idempotency.get(key)
        {
            return Ok(outcome.clone().into_deduplicated());
        }

        let conflicts: Vec<StreamConflict> = request
            .streams
            .iter()
            .zip(&guards)
            .filter_map(|(stream, events)| {
                let actual = StreamVersion::new(events.len() as u64);
                (!stream.expected_version.is_satisfied_by(actual)).then(|| StreamConflict {
                    stream: stream.stream_id.clone(),
                    expected: stream.expected_version,
                    actual,
                })
            })
            .collect();
        if !conflicts.is_empty() {
            return Err(Error::VersionConflict { conflicts });
        }

        // Event ids are unique. A request whose events are all stored already repeats an
        // append that committed: its outcome is the answer, nothing is written again.
        let stored: Vec<usize> = request
            .streams
            .iter()
            .flat_map(|s| &s.events)
            .filter_map(|e| log.ids.get(&e.event_id))
            .collect();
        if !stored.is_empty() {
            if stored.len() != request.event_count() {
                return Err(Error::InvalidAppend {
                    reason: "some of these event ids are already stored".to_owned(),
                });
            }
            let mut events: Vec<AppendedEvent> = stored
                .iter()
                .filter_map(|&index| log.events.get(index))
                .map(|e| {
                    AppendedEvent::new(
                        e.event_id,
                        e.stream_id.clone(),
                        e.stream_version,
                        e.global_position,
                    )
                    .with_recorded_at(e.recorded_at)
                })
                .collect();
            events.sort_by_key(|e| e.global_position);
            return Ok(AppendOutcome::written(events).into_deduplicated());
        }

        // Whole microseconds, as PostgreSQL records them: both stores give back the same.
        let recorded_at = Utc::now().trunc_subsecs(6);
        let mut appended = Vec::with_capacity(request.event_count());
        let AppendRequest {
            streams,
            idempotency_key,
        } = request;
        for (stream, events) in streams.into_iter().zip(guards.iter_mut()) {
            for data in stream.events {
                let version = StreamVersion::new(events.len() as u64 + 1);
                let position = GlobalPosition::new(log.events.len() as u64 + 1);
                let recorded = RecordedEvent::new(
                    data.event_id,
                    stream.stream_id.clone(),
                    version,
                    position,
                    data.event_type,
                    data.payload,
                    Arc::new(data.metadata),
                    recorded_at,
                );
                appended.push(
                    AppendedEvent::new(data.event_id, stream.stream_id.clone(), version, position)
                        .with_recorded_at(recorded_at),
                );
                events.push(recorded.clone());
                let index = log.events.len();
                log.ids.insert(data.event_id, index);
                log.events.push(recorded);
            }
        }
        let outcome = AppendOutcome::written(appended);
        if let Some(key) = idempotency_key {
            log.idempotency.insert(key, outcome.clone());
        }
        let head = log.events.len() as u64;
        drop(log);
        drop(guards);
        self.inner.head.send_if_modified(|current| {
            let moved = head > *current;
            if moved {
                *current = head;
            }
            moved
        });
        Ok(outcome)
    }

    async fn read_all(&self, query: &LogQuery) -> Result<Vec<RecordedEvent>> {
        Ok(self.read_log(query).await?.events)
    }

    async fn read_log(&self, query: &LogQuery) -> Result<LogRead> {
        tokio::task::coop::consume_budget().await;
        let log = self.inner.log.read();
        let start = query
            .after()
            .map_or(0, |p| usize::try_from(p.value()).unwrap_or(usize::MAX));
        let events: Vec<RecordedEvent> = log
            .events
            .iter_from(start)
            .filter(|event| query.matches(event))
            .take(query.limit())
            .cloned()
            .collect();
        // Under the same lock: the whole log up to its end was looked at.
        let head = log.events.len() as u64;
        Ok(LogRead::new(
            query,
            events,
            (head > 0).then(|| GlobalPosition::new(head)),
        ))
    }

    async fn head_position(&self) -> Result<Option<GlobalPosition>> {
        let head = self.inner.log.read().events.len() as u64;
        Ok((head > 0).then(|| GlobalPosition::new(head)))
    }

    async fn wait_for_events(&self, after: Option<GlobalPosition>) -> Result<()> {
        let after = after.map_or(0, GlobalPosition::value);
        let mut head = self.inner.head.subscribe();
        head.wait_for(|head| *head > after)
            .await
            .map(|_| ())
            .map_err(|_| Error::permanent_backend("the in-memory store was dropped", None))
    }

    async fn idempotent_outcome(&self, key: &IdempotencyKey) -> Result<Option<AppendOutcome>> {
        tokio::task::coop::consume_budget().await;
        Ok(self
            .inner
            .log
            .read()
            .idempotency
            .get(key)
            .map(|outcome| outcome.clone().into_deduplicated()))
    }

    fn snapshots(&self) -> Option<&dyn SnapshotStore> {
        Some(self)
    }
}

/// The in-memory store keeps snapshots of command states too, with the same rules as
/// every backend: of two snapshots of one key, the one folded further stays.
#[async_trait]
impl SnapshotStore for InMemoryEventStore {
    async fn load_snapshot(&self, key: &SnapshotKey) -> Result<Option<Snapshot>> {
        tokio::task::coop::consume_budget().await;
        Ok(self.inner.snapshots.lock().get(key).cloned())
    }

    async fn save_snapshot(&self, snapshot: &Snapshot) -> Result<bool> {
        tokio::task::coop::consume_budget().await;
        let mut snapshots = self.inner.snapshots.lock();
        match snapshots.get(snapshot.key()) {
            Some(kept) if !snapshot.is_further_than(kept) => Ok(false),
            _ => {
                snapshots.insert(snapshot.key().clone(), snapshot.clone());
                Ok(true)
            }
        }
    }

    async fn delete_snapshot(&self, snapshot: &Snapshot) -> Result<bool> {
        let mut snapshots = self.inner.snapshots.lock();
        let same = snapshots.get(snapshot.key()).is_some_and(|kept| {
            kept.last_position() == snapshot.last_position()
                && kept.taken_at() == snapshot.taken_at()
        });
        if same {
            snapshots.remove(snapshot.key());
        }
        Ok(same)
    }

    async fn delete_snapshots(&self, name: &str) -> Result<u64> {
        let mut snapshots = self.inner.snapshots.lock();
        let before = snapshots.len();
        snapshots.retain(|key, _| key.name() != name);
        Ok(u64::try_from(before - snapshots.len()).unwrap_or(u64::MAX))
    }
}

/// The in-memory store keeps projection checkpoints too, with the same rules as every
/// backend: a checkpoint never moves backwards, positions no backend stores are refused.
#[async_trait]
impl CheckpointStore for InMemoryEventStore {
    async fn load_checkpoint(&self, projection: &ProjectionName) -> Result<Option<GlobalPosition>> {
        Ok(self
            .inner
            .checkpoints
            .lock()
            .positions
            .get(projection.as_str())
            .copied())
    }

    async fn save_checkpoint(
        &self,
        projection: &ProjectionName,
        position: GlobalPosition,
    ) -> Result<()> {
        check_checkpoint_position(position)?;
        let mut checkpoints = self.inner.checkpoints.lock();
        let entry = checkpoints
            .positions
            .entry(projection.as_str().to_owned())
            .or_insert(position);
        *entry = (*entry).max(position);
        Ok(())
    }

    async fn reset_checkpoint(&self, projection: &ProjectionName) -> Result<()> {
        let mut checkpoints = self.inner.checkpoints.lock();
        checkpoints.positions.remove(projection.as_str());
        checkpoints.parked.retain(|p| p.projection != *projection);
        Ok(())
    }

    async fn park(&self, parked: ParkedEvent) -> Result<()> {
        let parked = parked.checked()?;
        let mut checkpoints = self.inner.checkpoints.lock();
        let duplicate = checkpoints
            .parked
            .iter()
            .any(|p| p.projection == parked.projection && p.event_id == parked.event_id);
        if !duplicate {
            checkpoints.parked.push(parked);
        }
        Ok(())
    }

    async fn parked(&self, projection: &ProjectionName) -> Result<Vec<ParkedEvent>> {
        let mut parked: Vec<ParkedEvent> = self
            .inner
            .checkpoints
            .lock()
            .parked
            .iter()
            .filter(|p| p.projection == *projection)
            .cloned()
            .collect();
        parked.sort_by_key(|p| p.global_position);
        Ok(parked)
    }
}
