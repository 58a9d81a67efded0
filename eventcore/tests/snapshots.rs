//! Snapshots against the in-memory store, beyond the conformance suite: a snapshot
//! store that fails never fails a command, a state that does not survive its JSON is
//! not snapshotted, and snapshots of states folded from two streams, or from one of
//! two, are keyed and proved per folded stream.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use eventcore::{
    AppendOutcome, AppendRequest, Command, CommandExecutor, CommandLogic, CommandResult, EventData,
    EventMetadata, EventStore, ExpectedVersion, GlobalPosition, IdempotencyKey, LogQuery,
    ReadStreams, RecordedEvent, Snapshot, SnapshotKey, SnapshotStore, SnapshotVersion, Snapshots,
    StateCache, StoredEvent, StreamId, StreamResolver, StreamVersion, StreamWrite, StreamsSnapshot,
};
use eventcore_memory::InMemoryEventStore;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, eventcore::Event)]
enum Counted {
    Added { value: i64 },
}

fn stream(name: &str) -> StreamId {
    StreamId::try_new(name).expect("valid")
}

async fn add(store: &dyn EventStore, stream: &StreamId, values: &[i64]) -> AppendOutcome {
    let events = values
        .iter()
        .map(|value| {
            EventData::from_event(&Counted::Added { value: *value }, EventMetadata::default())
                .expect("serializes")
        })
        .collect();
    store
        .append(AppendRequest::single(
            stream.clone(),
            ExpectedVersion::Any,
            events,
        ))
        .await
        .expect("append")
}

/// Sums `from` and `to` by stream (or `from` alone, with `only_from`), and refuses
/// unless the sums are what it expects: a decision on the wrong state is an error.
#[derive(Command)]
struct Check {
    #[stream]
    from: StreamId,
    #[stream]
    to: StreamId,
    expect_from: i64,
    expect_to: Option<i64>,
    only_from: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Sums {
    by_stream: std::collections::BTreeMap<String, i64>,
}

impl CommandLogic for Check {
    type State = Sums;
    type Event = Counted;

    fn apply(&self, state: &mut Sums, event: &StoredEvent<Counted>) {
        let Counted::Added { value } = event.payload;
        *state
            .by_stream
            .entry(event.stream_id.as_str().to_owned())
            .or_default() += value;
    }

    fn handle(
        &self,
        read: ReadStreams<Self::StreamSet>,
        state: Sums,
        _: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, Counted>>> {
        let sum = |s: &StreamId| state.by_stream.get(s.as_str()).copied().unwrap_or(0);
        eventcore::require!(
            sum(&self.from) == self.expect_from,
            "from: {} != {}",
            sum(&self.from),
            self.expect_from
        );
        if let Some(expect_to) = self.expect_to {
            eventcore::require!(
                sum(&self.to) == expect_to,
                "to: {} != {expect_to}",
                sum(&self.to)
            );
        }
        Ok(vec![
            StreamWrite::new(&read, self.from.clone(), Counted::Added { value: 0 })?,
            StreamWrite::new(&read, self.to.clone(), Counted::Added { value: 0 })?,
        ])
    }

    fn state_cache(&self) -> StateCache<Sums> {
        let cache = StateCache::for_command::<Self>().with_snapshots(Snapshots::every(1));
        if self.only_from {
            cache.folded_from([self.from.clone()])
        } else {
            cache
        }
    }
}

fn check_key(streams: &[&StreamId]) -> SnapshotKey {
    SnapshotKey::new(
        format!(
            "{} {}",
            std::any::type_name::<Check>(),
            std::any::type_name::<Sums>()
        ),
        streams.iter().map(|s| (*s).clone()).collect(),
        1,
    )
    .expect("key")
}

#[tokio::test]
async fn a_state_folded_from_two_streams_is_snapshotted_and_proved_per_stream() {
    let store = InMemoryEventStore::new();
    let (a, b) = (stream("two-a"), stream("two-b"));
    add(&store, &a, &[1, 2, 3]).await;
    add(&store, &b, &[10]).await;
    let check = |expect_from, expect_to| Check {
        from: a.clone(),
        to: b.clone(),
        expect_from,
        expect_to: Some(expect_to),
        only_from: false,
    };
    let executor = CommandExecutor::new(store.clone());
    executor
        .execute(&check(6, 10))
        .await
        .expect("decides on the read");
    executor.flush_snapshots().await;
    let taken = store
        .load_snapshot(&check_key(&[&a, &b]))
        .await
        .expect("load")
        .expect("taken");
    // After its own write: a at 4, b at 2.
    assert_eq!(
        taken
            .versions()
            .iter()
            .map(|v| v.version.value())
            .collect::<Vec<_>>(),
        [4, 2]
    );

    // Planted: the same point in both streams, other sums. A fresh executor that decides
    // on 100 and 200 used it; then b moves, and the next fresh one folds that too.
    let mut state = Sums::default();
    state.by_stream.insert(a.as_str().to_owned(), 100);
    state.by_stream.insert(b.as_str().to_owned(), 200);
    let planted = Snapshot::new(
        taken.key().clone(),
        taken.versions().to_vec(),
        taken.last_position(),
        serde_json::to_vec(&state).expect("encodes"),
        chrono::Utc::now(),
    )
    .expect("valid");
    store
        .delete_snapshot(&taken)
        .await
        .expect("delete")
        .then_some(())
        .expect("it was the one kept");
    assert!(store.save_snapshot(&planted).await.expect("save"));
    add(&store, &b, &[5]).await;
    CommandExecutor::new(store.clone())
        .execute(&check(100, 205))
        .await
        .expect("decides on the planted snapshot and b's new event");

    // A snapshot naming another event in b (the second stream) is not used.
    let read = store
        .read_streams(&[a.clone(), b.clone()])
        .await
        .expect("read");
    let last_a = read.events.iter().rfind(|e| e.stream_id == a).expect("a");
    let wrong = Snapshot::new(
        taken.key().clone(),
        vec![
            SnapshotVersion {
                version: last_a.stream_version,
                event_id: Some(last_a.event_id),
            },
            SnapshotVersion {
                version: read.version_of(&b),
                event_id: Some(eventcore::EventId::new()),
            },
        ],
        Some(read.events.last().expect("events").global_position),
        serde_json::to_vec(&state).expect("encodes"),
        chrono::Utc::now(),
    )
    .expect("valid");
    store
        .delete_snapshots(taken.key().name())
        .await
        .expect("delete");
    assert!(store.save_snapshot(&wrong).await.expect("save"));
    CommandExecutor::new(store.clone())
        .execute(&check(6, 15))
        .await
        .expect("decides on the streams read whole");
}

#[tokio::test]
async fn a_state_folded_from_one_of_two_streams_is_snapshotted_under_that_stream() {
    let store = InMemoryEventStore::new();
    let (a, b) = (stream("one-a"), stream("one-b"));
    add(&store, &a, &[4, 4]).await;
    add(&store, &b, &[1]).await;
    let check = |expect_from| Check {
        from: a.clone(),
        to: b.clone(),
        expect_from,
        expect_to: None,
        only_from: true,
    };
    let executor = CommandExecutor::new(store.clone());
    executor.execute(&check(8)).await.expect("executes");
    executor.flush_snapshots().await;
    assert!(
        store
            .load_snapshot(&check_key(&[&a, &b]))
            .await
            .expect("load")
            .is_none(),
        "keyed by the folded stream only"
    );
    let taken = store
        .load_snapshot(&check_key(&[&a]))
        .await
        .expect("load")
        .expect("taken");
    assert_eq!(taken.versions()[0].version, StreamVersion::new(3));
    // b moves: a fresh executor starts from the snapshot of a and reads b's version.
    add(&store, &b, &[7]).await;
    add(&store, &a, &[1]).await;
    CommandExecutor::new(store.clone())
        .execute(&check(9))
        .await
        .expect("executes");
}

/// A store whose snapshots always fail.
struct FailingSnapshots {
    inner: InMemoryEventStore,
    calls: AtomicUsize,
}

#[async_trait]
impl SnapshotStore for FailingSnapshots {
    async fn load_snapshot(&self, _: &SnapshotKey) -> eventcore::Result<Option<Snapshot>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Err(eventcore::Error::retryable_backend(
            "snapshots are down",
            None,
        ))
    }

    async fn save_snapshot(&self, _: &Snapshot) -> eventcore::Result<bool> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Err(eventcore::Error::retryable_backend(
            "snapshots are down",
            None,
        ))
    }

    async fn delete_snapshot(&self, _: &Snapshot) -> eventcore::Result<bool> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Err(eventcore::Error::retryable_backend(
            "snapshots are down",
            None,
        ))
    }

    async fn delete_snapshots(&self, _: &str) -> eventcore::Result<u64> {
        Err(eventcore::Error::retryable_backend(
            "snapshots are down",
            None,
        ))
    }
}

#[async_trait]
impl EventStore for FailingSnapshots {
    async fn read_streams(&self, streams: &[StreamId]) -> eventcore::Result<StreamsSnapshot> {
        self.inner.read_streams(streams).await
    }

    async fn read_streams_after(
        &self,
        streams: &[(StreamId, StreamVersion)],
    ) -> eventcore::Result<StreamsSnapshot> {
        self.inner.read_streams_after(streams).await
    }

    async fn append(&self, request: AppendRequest) -> eventcore::Result<AppendOutcome> {
        self.inner.append(request).await
    }

    async fn read_all(&self, query: &LogQuery) -> eventcore::Result<Vec<RecordedEvent>> {
        self.inner.read_all(query).await
    }

    async fn head_position(&self) -> eventcore::Result<Option<GlobalPosition>> {
        self.inner.head_position().await
    }

    async fn wait_for_events(&self, after: Option<GlobalPosition>) -> eventcore::Result<()> {
        self.inner.wait_for_events(after).await
    }

    async fn idempotent_outcome(
        &self,
        key: &IdempotencyKey,
    ) -> eventcore::Result<Option<AppendOutcome>> {
        self.inner.idempotent_outcome(key).await
    }

    fn snapshots(&self) -> Option<&dyn SnapshotStore> {
        Some(self)
    }
}

#[tokio::test]
async fn a_snapshot_store_that_fails_never_fails_a_command() {
    let store = Arc::new(FailingSnapshots {
        inner: InMemoryEventStore::new(),
        calls: AtomicUsize::new(0),
    });
    let (a, b) = (stream("failing-a"), stream("failing-b"));
    add(&*store, &a, &[2, 3]).await;
    let check = |expect_from| Check {
        from: a.clone(),
        to: b.clone(),
        expect_from,
        expect_to: Some(0),
        only_from: false,
    };
    for expect_from in [5, 5, 5] {
        // Fresh each time: a load (failing), a read, a save (failing) after it.
        let executor = CommandExecutor::from_shared(store.clone());
        executor
            .execute(&check(expect_from))
            .await
            .expect("executes");
        executor
            .execute(&check(expect_from))
            .await
            .expect("executes again");
        executor.flush_snapshots().await;
    }
    assert!(
        store.calls.load(Ordering::SeqCst) >= 6,
        "the snapshot store was asked: {}",
        store.calls.load(Ordering::SeqCst)
    );
}

/// Its state encodes a NaN as `null`, which does not decode into an `f64`.
#[derive(Command)]
struct Ratio {
    #[stream]
    stream: StreamId,
    write: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct RatioState {
    ratio: f64,
}

impl CommandLogic for Ratio {
    type State = RatioState;
    type Event = Counted;

    // The last value, or NaN for a 0.
    fn apply(&self, state: &mut RatioState, event: &StoredEvent<Counted>) {
        let Counted::Added { value } = event.payload;
        state.ratio = if value == 0 { f64::NAN } else { value as f64 };
    }

    fn handle(
        &self,
        read: ReadStreams<Self::StreamSet>,
        _: RatioState,
        _: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, Counted>>> {
        Ok(vec![StreamWrite::new(
            &read,
            self.stream.clone(),
            Counted::Added { value: self.write },
        )?])
    }

    fn state_cache(&self) -> StateCache<RatioState> {
        StateCache::for_command::<Self>().with_snapshots(Snapshots::every(1))
    }
}

#[tokio::test]
async fn a_state_whose_json_does_not_decode_back_is_not_snapshotted() {
    let store = InMemoryEventStore::new();
    let (nan, fine) = (stream("ratio-nan"), stream("ratio-fine"));
    add(&store, &nan, &[0]).await;
    add(&store, &fine, &[2]).await;
    let executor = CommandExecutor::new(store.clone());
    // Snapshots every event: after each read and each own write. `nan`'s state is NaN
    // throughout, `fine`'s never. (Waiting for the saves after each command: at most
    // two are under way at once, and a save that finds none free waits for the next
    // fold.)
    for _ in 0..2 {
        executor
            .execute(&Ratio {
                stream: nan.clone(),
                write: 0,
            })
            .await
            .expect("a state that cannot be snapshotted does not fail the command");
        executor.flush_snapshots().await;
        executor
            .execute(&Ratio {
                stream: fine.clone(),
                write: 3,
            })
            .await
            .expect("executes");
        executor.flush_snapshots().await;
    }
    let key = |s: &StreamId| {
        SnapshotKey::new(
            format!(
                "{} {}",
                std::any::type_name::<Ratio>(),
                std::any::type_name::<RatioState>()
            ),
            vec![s.clone()],
            1,
        )
        .expect("key")
    };
    let of_fine = store.load_snapshot(&key(&fine)).await.expect("load");
    assert!(
        of_fine.is_some_and(|s| s.versions()[0].version.value() >= 2),
        "a state that survives its JSON is snapshotted"
    );
    assert_eq!(
        store.load_snapshot(&key(&nan)).await.expect("load"),
        None,
        "a NaN state, encoded as null, would never decode: not saved"
    );
}

/// What a snapshot taken while a commit was not yet visible looks like (PostgreSQL can
/// show a later position before an earlier one): it names a's event at position 3 and
/// b's first at 1, while b's second, at position 2, is not in it. In global order that
/// event comes before a snapshot's newest: folding it after would reorder the fold, so
/// the snapshot is not used.
#[tokio::test]
async fn a_snapshot_that_missed_an_earlier_commit_is_not_used() {
    let store = InMemoryEventStore::new();
    let (a, b) = (stream("late-a"), stream("late-b"));
    let b1 = add(&store, &b, &[1]).await.events[0].clone();
    add(&store, &b, &[2]).await;
    let a1 = add(&store, &a, &[4]).await.events[0].clone();
    assert!(b1.global_position < a1.global_position);
    let mut state = Sums::default();
    state.by_stream.insert(a.as_str().to_owned(), 100);
    state.by_stream.insert(b.as_str().to_owned(), 200);
    let planted = Snapshot::new(
        check_key(&[&a, &b]),
        vec![
            SnapshotVersion {
                version: a1.stream_version,
                event_id: Some(a1.event_id),
            },
            SnapshotVersion {
                version: b1.stream_version,
                event_id: Some(b1.event_id),
            },
        ],
        Some(a1.global_position),
        serde_json::to_vec(&state).expect("encodes"),
        chrono::Utc::now(),
    )
    .expect("valid");
    assert!(store.save_snapshot(&planted).await.expect("save"));
    CommandExecutor::new(store.clone())
        .execute(&Check {
            from: a.clone(),
            to: b.clone(),
            expect_from: 4,
            expect_to: Some(3),
            only_from: false,
        })
        .await
        .expect("decides on the streams read whole");
}
