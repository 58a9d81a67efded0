//! The projection conformance suite: checkpoints ([`CheckpointStore`]) and the
//! [`ProjectionRunner`] on a backend, as generic async checks that panic on a violation.
//!
//! Each check takes a fresh, empty store that is both the event store and the checkpoint
//! store. Instantiate them all with [`crate::projection_conformance_tests!`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;

use super::HANG_GUARD;
use super::conformance::ConformanceEvent;
use crate::{
    AppendRequest, CheckpointStore, Error, EventData, EventMetadata, EventPayload, EventStore,
    EventType, ExpectedVersion, GlobalPosition, LogQuery, OnFailure, ParkedEvent, Projection,
    ProjectionErrorPolicy, ProjectionFilter, ProjectionName, ProjectionRunner, RecordedEvent,
    StoredEvent, StreamAppend, StreamId,
};

fn stream(name: &str) -> StreamId {
    StreamId::try_new(name).expect("valid")
}

fn added(value: i64) -> EventData {
    EventData::from_event(&ConformanceEvent::Added { value }, EventMetadata::default())
        .expect("serializes")
}

async fn append(store: &impl EventStore, s: &StreamId, events: Vec<EventData>) {
    store
        .append(AppendRequest::single(
            s.clone(),
            ExpectedVersion::Any,
            events,
        ))
        .await
        .expect("append");
}

async fn log(store: &impl EventStore) -> Vec<RecordedEvent> {
    store
        .read_all(&LogQuery::new().with_limit(1_000_000))
        .await
        .expect("read_all")
}

/// What the test projection has seen, shared with the test.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Seen {
    /// Positions in the order applied.
    pub positions: Vec<GlobalPosition>,
    /// Sum of `Added` values per stream.
    pub sums: HashMap<StreamId, i64>,
}

/// Sums `Added` values per stream; fails on chosen values; reports progress.
#[derive(Debug)]
pub struct SummingProjection {
    name: String,
    filter: ProjectionFilter,
    seen: Arc<Mutex<Seen>>,
    /// Values whose `apply` fails, with how many more times each fails.
    failures: Arc<Mutex<HashMap<i64, u32>>>,
    progress: watch::Sender<usize>,
}

impl SummingProjection {
    /// A projection named `name` over streams starting with `prefix`.
    pub fn new(name: &str, prefix: &str) -> Self {
        SummingProjection {
            name: name.to_owned(),
            filter: ProjectionFilter::all()
                .with_stream_prefix(prefix)
                .with_event_types(["Added"])
                .expect("valid"),
            seen: Arc::default(),
            failures: Arc::default(),
            progress: watch::Sender::new(0),
        }
    }

    /// Makes `apply` fail `times` times for the event with `value`.
    pub fn failing_on(self, value: i64, times: u32) -> Self {
        self.failures.lock().insert(value, times);
        self
    }

    /// What it has seen so far.
    pub fn seen(&self) -> Arc<Mutex<Seen>> {
        self.seen.clone()
    }

    /// Events applied so far, as a watch.
    pub fn progress(&self) -> watch::Receiver<usize> {
        self.progress.subscribe()
    }
}

/// The failure the test projection reports.
#[derive(Debug, thiserror::Error)]
#[error("refusing value {0}")]
pub struct Refused(i64);

impl Projection for SummingProjection {
    type Event = ConformanceEvent;
    type Error = Refused;

    fn name(&self) -> &str {
        &self.name
    }

    fn filter(&self) -> ProjectionFilter {
        self.filter.clone()
    }

    async fn apply(&mut self, event: &StoredEvent<ConformanceEvent>) -> Result<(), Refused> {
        let ConformanceEvent::Added { value } = event.payload else {
            return Ok(());
        };
        {
            let mut failures = self.failures.lock();
            if let Some(left) = failures.get_mut(&value)
                && *left > 0
            {
                *left -= 1;
                return Err(Refused(value));
            }
        }
        let count = {
            let mut seen = self.seen.lock();
            if let Some(last) = seen.positions.last() {
                assert!(
                    event.global_position > *last,
                    "event {} delivered after {}",
                    event.global_position,
                    last
                );
            }
            seen.positions.push(event.global_position);
            *seen.sums.entry(event.stream_id.clone()).or_default() += value;
            seen.positions.len()
        };
        self.progress.send_replace(count);
        Ok(())
    }

    async fn reset(&mut self) -> Result<(), Refused> {
        *self.seen.lock() = Seen::default();
        Ok(())
    }
}

fn runner<S>(store: &S, projection: SummingProjection) -> ProjectionRunner<SummingProjection>
where
    S: EventStore + CheckpointStore + Clone,
{
    ProjectionRunner::new(projection, Arc::new(store.clone()), Arc::new(store.clone()))
}

fn fast(on_failure: OnFailure, attempts: u32) -> ProjectionErrorPolicy {
    ProjectionErrorPolicy::new()
        .with_max_attempts(attempts)
        .with_initial_delay(Duration::ZERO)
        .with_on_failure(on_failure)
}

/// A projection that never saved a checkpoint loads none.
pub async fn a_missing_checkpoint_loads_as_none<S: EventStore + CheckpointStore + Clone>(store: S) {
    assert_eq!(
        store
            .load_checkpoint(&ProjectionName::from_static("never-ran"))
            .await
            .expect("load"),
        None
    );
    assert!(
        store
            .parked(&ProjectionName::from_static("never-ran"))
            .await
            .expect("parked")
            .is_empty()
    );
}

/// A saved checkpoint loads back, per projection name, independently.
pub async fn checkpoints_load_back_per_projection<S: EventStore + CheckpointStore + Clone>(
    store: S,
) {
    store
        .save_checkpoint(
            &ProjectionName::from_static("orders"),
            GlobalPosition::new(7),
        )
        .await
        .expect("save");
    store
        .save_checkpoint(
            &ProjectionName::from_static("orders-view"),
            GlobalPosition::new(3),
        )
        .await
        .expect("save");
    assert_eq!(
        store
            .load_checkpoint(&ProjectionName::from_static("orders"))
            .await
            .expect("load"),
        Some(GlobalPosition::new(7))
    );
    assert_eq!(
        store
            .load_checkpoint(&ProjectionName::from_static("orders-view"))
            .await
            .expect("load"),
        Some(GlobalPosition::new(3))
    );
    assert_eq!(
        store
            .load_checkpoint(&ProjectionName::from_static("order"))
            .await
            .expect("load"),
        None
    );
}

/// A checkpoint never moves backwards; a reset forgets it and the parked events.
pub async fn a_checkpoint_never_moves_backwards_until_reset<
    S: EventStore + CheckpointStore + Clone,
>(
    store: S,
) {
    store
        .save_checkpoint(&ProjectionName::from_static("p"), GlobalPosition::new(10))
        .await
        .expect("save");
    store
        .save_checkpoint(&ProjectionName::from_static("p"), GlobalPosition::new(4))
        .await
        .expect("save lower");
    assert_eq!(
        store
            .load_checkpoint(&ProjectionName::from_static("p"))
            .await
            .expect("load"),
        Some(GlobalPosition::new(10))
    );
    store
        .save_checkpoint(&ProjectionName::from_static("p"), GlobalPosition::new(12))
        .await
        .expect("save higher");
    assert_eq!(
        store
            .load_checkpoint(&ProjectionName::from_static("p"))
            .await
            .expect("load"),
        Some(GlobalPosition::new(12))
    );

    append(&store, &stream("x"), vec![added(1)]).await;
    let event = log(&store).await.remove(0);
    store
        .park(ParkedEvent::new(
            &ProjectionName::from_static("p"),
            &event,
            "boom",
        ))
        .await
        .expect("park");
    store
        .reset_checkpoint(&ProjectionName::from_static("p"))
        .await
        .expect("reset");
    assert_eq!(
        store
            .load_checkpoint(&ProjectionName::from_static("p"))
            .await
            .expect("load"),
        None
    );
    assert!(
        store
            .parked(&ProjectionName::from_static("p"))
            .await
            .expect("parked")
            .is_empty()
    );
    store
        .save_checkpoint(&ProjectionName::from_static("p"), GlobalPosition::new(2))
        .await
        .expect("save after reset");
    assert_eq!(
        store
            .load_checkpoint(&ProjectionName::from_static("p"))
            .await
            .expect("load"),
        Some(GlobalPosition::new(2))
    );
}

/// Parked events are kept once each, in position order, per projection.
pub async fn parked_events_are_kept_once_in_position_order<
    S: EventStore + CheckpointStore + Clone,
>(
    store: S,
) {
    append(&store, &stream("x"), vec![added(1), added(2), added(3)]).await;
    let events = log(&store).await;
    for event in [&events[2], &events[0], &events[2]] {
        store
            .park(ParkedEvent::new(
                &ProjectionName::from_static("p"),
                event,
                "bad",
            ))
            .await
            .expect("park");
    }
    store
        .park(ParkedEvent::new(
            &ProjectionName::from_static("other"),
            &events[1],
            "bad",
        ))
        .await
        .expect("park");
    let parked = store
        .parked(&ProjectionName::from_static("p"))
        .await
        .expect("parked");
    let positions: Vec<_> = parked.iter().map(|p| p.global_position).collect();
    assert_eq!(
        positions,
        vec![events[0].global_position, events[2].global_position]
    );
    assert_eq!(parked[0].event_id, events[0].event_id);
    assert_eq!(parked[0].stream_id, events[0].stream_id);
    assert_eq!(parked[0].event_type, "Added");
    assert_eq!(parked[0].error, "bad");
    assert_eq!(
        store
            .parked(&ProjectionName::from_static("other"))
            .await
            .expect("parked")
            .len(),
        1
    );
}

/// Invalid projection names never reach a backend: [`ProjectionName`] refuses them, and a
/// runner given one fails every operation with a typed error before it reads or writes
/// anything (the events stay unapplied, no checkpoint is stored under a valid name).
pub async fn invalid_projection_names_are_refused<S: EventStore + CheckpointStore + Clone>(
    store: S,
) {
    append(&store, &stream("sum-1"), vec![added(1), added(2)]).await;
    for bad in ["", "tab\tname"] {
        assert!(ProjectionName::try_new(bad).is_err(), "{bad:?}");
        let projection = SummingProjection::new(bad, "sum-");
        let seen = projection.seen();
        let mut runner = runner(&store, projection);
        let run = runner.run(std::future::pending()).await;
        for result in [runner.catch_up().await, runner.rebuild().await, run] {
            assert!(
                matches!(result, Err(Error::InvalidProjectionName(_))),
                "{bad:?}: {result:?}"
            );
        }
        assert!(seen.lock().positions.is_empty(), "{bad:?}: applied events");
    }
}

/// The runner catches up in batches, applies every matching event once in order, and
/// saves the checkpoint; a new runner resumes after it.
pub async fn the_runner_catches_up_and_resumes_from_its_checkpoint<
    S: EventStore + CheckpointStore + Clone,
>(
    store: S,
) {
    let (a, b) = (stream("acc-a"), stream("acc-b"));
    append(&store, &a, (1..=12).map(added).collect()).await;
    append(&store, &b, (1..=13).map(added).collect()).await;
    let projection = SummingProjection::new("sums", "acc-");
    let seen = projection.seen();
    let mut first = runner(&store, projection).with_batch_size(10);
    let summary = first.catch_up().await.expect("catch up");
    assert_eq!(summary.applied, 25);
    let last = log(&store).await.last().map(|e| e.global_position);
    assert_eq!(summary.checkpoint, last);
    assert_eq!(
        store
            .load_checkpoint(&ProjectionName::from_static("sums"))
            .await
            .expect("load"),
        last
    );
    assert_eq!(seen.lock().sums[&a], 78);
    assert_eq!(seen.lock().sums[&b], 91);
    assert_eq!(first.metrics().lag(), 0);

    append(&store, &a, vec![added(100)]).await;
    let resumed = SummingProjection::new("sums", "acc-");
    let resumed_seen = resumed.seen();
    let summary = runner(&store, resumed).catch_up().await.expect("resume");
    assert_eq!(summary.applied, 1, "only what came after the checkpoint");
    assert_eq!(resumed_seen.lock().sums[&a], 100);
}

/// Events outside the filter (other streams, other types, even ones that would not
/// decode) are skipped by the filter, never by a failing decode.
pub async fn the_filter_skips_other_events_before_decoding<
    S: EventStore + CheckpointStore + Clone,
>(
    store: S,
) {
    let foreign = EventData::new(
        EventType::try_new("Shipped").expect("valid"),
        EventPayload::from_json(r#"{"carrier":"x"}"#).expect("json"),
        EventMetadata::default(),
    );
    store
        .append(
            AppendRequest::new()
                .with_stream(StreamAppend::new(
                    stream("acc-1"),
                    ExpectedVersion::Any,
                    vec![added(5), foreign.clone()],
                ))
                .with_stream(StreamAppend::new(
                    stream("ship-1"),
                    ExpectedVersion::Any,
                    vec![foreign.with_event_id(crate::EventId::new()), added(9)],
                )),
        )
        .await
        .expect("append");
    let projection = SummingProjection::new("filtered", "acc-");
    let seen = projection.seen();
    let summary = runner(&store, projection)
        .with_error_policy(fast(OnFailure::Stop, 1))
        .catch_up()
        .await
        .expect("no decode failure");
    assert_eq!(summary.applied, 1);
    assert_eq!(seen.lock().sums.get(&stream("acc-1")), Some(&5));
    assert_eq!(seen.lock().sums.get(&stream("ship-1")), None);
}

/// A failing `apply` is retried; after the last attempt the runner stops with a typed
/// error naming the event, and the checkpoint stays just before it. Once the cause is
/// gone, the next run starts at that event.
pub async fn a_failing_event_stops_the_runner_with_the_checkpoint_before_it<
    S: EventStore + CheckpointStore + Clone,
>(
    store: S,
) {
    let s = stream("acc-s");
    append(&store, &s, (11..=15).map(added).collect()).await;
    let events = log(&store).await;
    // Fails twice: retried within the attempts, applied once.
    let transient = SummingProjection::new("transient", "acc-").failing_on(12, 2);
    let seen = transient.seen();
    runner(&store, transient)
        .with_error_policy(fast(OnFailure::Stop, 3))
        .catch_up()
        .await
        .expect("retries absorb a transient failure");
    assert_eq!(seen.lock().positions.len(), 5);

    let stubborn = SummingProjection::new("stubborn", "acc-").failing_on(13, 10);
    let seen = stubborn.seen();
    let error = runner(&store, stubborn)
        .with_error_policy(fast(OnFailure::Stop, 3))
        .catch_up()
        .await
        .expect_err("must stop");
    match error {
        Error::ProjectionFailed {
            projection,
            stream: at,
            version,
            position,
            message,
            source,
        } => {
            assert_eq!(projection, "stubborn");
            let source = source.expect("the apply error is the source");
            assert!(source.to_string().contains("13"), "{source}");
            assert_eq!(at, s);
            assert_eq!(version.value(), 3);
            assert_eq!(position, events[2].global_position);
            assert!(message.contains("13"), "{message}");
        }
        other => panic!("expected ProjectionFailed, got {other:?}"),
    }
    assert_eq!(
        store
            .load_checkpoint(&ProjectionName::from_static("stubborn"))
            .await
            .expect("load"),
        Some(events[1].global_position),
        "the checkpoint must not pass the failed event"
    );
    assert_eq!(seen.lock().positions.len(), 2);

    // The cause is fixed: a new run resumes at the failed event.
    let fixed = SummingProjection::new("stubborn", "acc-");
    let seen = fixed.seen();
    let summary = runner(&store, fixed).catch_up().await.expect("resumes");
    assert_eq!(summary.applied, 3);
    assert_eq!(
        seen.lock().positions.first(),
        Some(&events[2].global_position)
    );
}

/// With the park policy, an event that keeps failing, or does not decode, is parked and
/// the runner goes on; nothing is skipped silently.
pub async fn failing_and_undecodable_events_are_parked_when_the_policy_says_so<
    S: EventStore + CheckpointStore + Clone,
>(
    store: S,
) {
    let s = stream("acc-p");
    let odd = EventData::new(
        EventType::try_new("Added").expect("valid"),
        EventPayload::from_json(r#"{"Added":{"value":"not a number"}}"#).expect("json"),
        EventMetadata::default(),
    );
    append(&store, &s, vec![added(1), odd, added(2), added(3)]).await;
    let events = log(&store).await;
    let projection = SummingProjection::new("parking", "acc-").failing_on(2, 100);
    let seen = projection.seen();
    let mut runner = runner(&store, projection).with_error_policy(fast(OnFailure::Park, 2));
    let summary = runner.catch_up().await.expect("parks and continues");
    assert_eq!((summary.applied, summary.parked), (2, 2));
    assert_eq!(runner.metrics().parked(), 2);
    assert_eq!(seen.lock().sums[&s], 4);
    let parked = store
        .parked(&ProjectionName::from_static("parking"))
        .await
        .expect("parked");
    let positions: Vec<_> = parked.iter().map(|p| p.global_position).collect();
    assert_eq!(
        positions,
        vec![events[1].global_position, events[2].global_position]
    );
    assert_eq!(
        store
            .load_checkpoint(&ProjectionName::from_static("parking"))
            .await
            .expect("load"),
        Some(events[3].global_position)
    );

    // The same undecodable event under the stop policy stops the runner, naming it.
    let strict = SummingProjection::new("strict", "acc-");
    let error = ProjectionRunner::new(strict, Arc::new(store.clone()), Arc::new(store.clone()))
        .with_error_policy(fast(OnFailure::Stop, 1))
        .catch_up()
        .await
        .expect_err("stops");
    assert!(
        matches!(error, Error::ProjectionFailed { position, .. } if position == events[1].global_position)
    );
}

/// A rebuild forgets the checkpoint and the read model and replays from the start.
pub async fn a_rebuild_replays_from_the_start<S: EventStore + CheckpointStore + Clone>(store: S) {
    let s = stream("acc-r");
    append(&store, &s, (1..=5).map(added).collect()).await;
    let projection = SummingProjection::new("rebuilt", "acc-");
    let seen = projection.seen();
    let mut runner = runner(&store, projection);
    runner.catch_up().await.expect("first");
    let before = seen.lock().clone();
    let summary = runner.rebuild().await.expect("rebuild");
    assert_eq!(summary.applied, 5);
    assert_eq!(*seen.lock(), before, "the same read model, built again");
}

/// Writers append concurrently while a runner follows the log live; at the end the read
/// model's per-stream sums equal what the store holds, every event arrived once, in
/// position order (the projection asserts it as it goes), and shutdown saved the
/// checkpoint of everything applied.
pub async fn a_live_runner_sees_every_event_once_in_order<
    S: EventStore + CheckpointStore + Clone,
>(
    store: S,
) {
    const WRITERS: usize = 6;
    const APPENDS: i64 = 40;
    let projection = SummingProjection::new("live", "acc-");
    let seen = projection.seen();
    let mut progress = projection.progress();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let live = {
        let mut runner = runner(&store, projection).with_batch_size(25);
        tokio::spawn(async move {
            let summary = runner
                .run(async {
                    let _ = stopped.await;
                })
                .await;
            (summary, runner.metrics())
        })
    };
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 1..=APPENDS {
                    let (x, y) = (
                        stream(&format!("acc-{}", (w + i as usize) % 4)),
                        stream(&format!("acc-{}", w % 3 + 4)),
                    );
                    store
                        .append(
                            AppendRequest::new()
                                .with_stream(StreamAppend::new(
                                    x,
                                    ExpectedVersion::Any,
                                    vec![added(i)],
                                ))
                                .with_stream(StreamAppend::new(
                                    y,
                                    ExpectedVersion::Any,
                                    vec![added(-i)],
                                )),
                        )
                        .await
                        .expect("append");
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("writer");
    }
    let total = WRITERS * APPENDS as usize * 2;
    tokio::time::timeout(HANG_GUARD, progress.wait_for(|n| *n >= total))
        .await
        .expect("the live runner must see every event")
        .expect("progress");
    let _ = stop.send(());
    let (summary, metrics) = tokio::time::timeout(HANG_GUARD, live)
        .await
        .expect("the runner stops on shutdown")
        .expect("task");
    let summary = summary.expect("run");

    let all = log(&store).await;
    let mut sums: HashMap<StreamId, i64> = HashMap::new();
    for event in &all {
        if let ConformanceEvent::Added { value } =
            event.decode::<ConformanceEvent>().expect("decode").payload
        {
            *sums.entry(event.stream_id.clone()).or_default() += value;
        }
    }
    let seen = seen.lock().clone();
    assert_eq!(seen.positions.len(), all.len(), "each event exactly once");
    assert_eq!(
        seen.positions,
        all.iter().map(|e| e.global_position).collect::<Vec<_>>()
    );
    assert_eq!(seen.sums, sums);
    let last = all.last().map(|e| e.global_position);
    assert_eq!(summary.checkpoint, last);
    assert_eq!(
        store
            .load_checkpoint(&ProjectionName::from_static("live"))
            .await
            .expect("load"),
        last
    );
    assert_eq!(metrics.processed(), total as u64);
}

/// Counts the log reads of a store.
struct CountingReads<S> {
    inner: S,
    reads: Arc<std::sync::atomic::AtomicUsize>,
}

#[async_trait::async_trait]
impl<S: EventStore> EventStore for CountingReads<S> {
    async fn read_streams(&self, streams: &[StreamId]) -> crate::Result<crate::StreamsSnapshot> {
        self.inner.read_streams(streams).await
    }

    async fn append(&self, request: AppendRequest) -> crate::Result<crate::AppendOutcome> {
        self.inner.append(request).await
    }

    async fn read_all(&self, query: &LogQuery) -> crate::Result<Vec<RecordedEvent>> {
        self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.read_all(query).await
    }

    async fn head_position(&self) -> crate::Result<Option<GlobalPosition>> {
        self.inner.head_position().await
    }

    async fn wait_for_events(&self, after: Option<GlobalPosition>) -> crate::Result<()> {
        self.inner.wait_for_events(after).await
    }

    async fn idempotent_outcome(
        &self,
        key: &crate::IdempotencyKey,
    ) -> crate::Result<Option<crate::AppendOutcome>> {
        self.inner.idempotent_outcome(key).await
    }
}

/// A live runner whose filter does not want the newest events waits for more instead
/// of reading the log again and again.
pub async fn a_live_runner_waits_when_the_log_ends_in_unwanted_events<
    S: EventStore + CheckpointStore + Clone,
>(
    store: S,
) {
    append(&store, &stream("acc-w"), (1..=3).map(added).collect()).await;
    append(&store, &stream("other-w"), (1..=5).map(added).collect()).await;
    let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counting = CountingReads {
        inner: store.clone(),
        reads: reads.clone(),
    };
    let projection = SummingProjection::new("waiting", "acc-");
    let mut progress = projection.progress();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut runner = ProjectionRunner::new(projection, Arc::new(counting), Arc::new(store.clone()));
    let live = tokio::spawn(async move {
        runner
            .run(async {
                let _ = stopped.await;
            })
            .await
    });
    tokio::time::timeout(HANG_GUARD, progress.wait_for(|n| *n >= 3))
        .await
        .expect("applies what it wants")
        .expect("progress");
    let before = reads.load(std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(super::conformance::PENDING_WINDOW).await;
    let during = reads.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert!(
        during <= 2,
        "the runner read the log {during} times while nothing new came"
    );
    // It still wakes for what it wants.
    append(&store, &stream("acc-w"), vec![added(10)]).await;
    tokio::time::timeout(HANG_GUARD, progress.wait_for(|n| *n >= 4))
        .await
        .expect("wakes for a wanted event")
        .expect("progress");
    let _ = stop.send(());
    live.await.expect("task").expect("run");
}

/// Checkpoint positions no backend stores are refused alike: 0 (positions start at 1)
/// and anything above [`crate::limits::MAX_POSITION`]; the highest storable one loads
/// back as saved.
pub async fn checkpoints_no_backend_can_store_are_refused<
    S: EventStore + CheckpointStore + Clone,
>(
    store: S,
) {
    let max = crate::limits::MAX_POSITION;
    for bad in [0, max + 1, u64::MAX] {
        let refused = store
            .save_checkpoint(
                &ProjectionName::from_static("edge"),
                GlobalPosition::new(bad),
            )
            .await;
        assert!(
            matches!(refused, Err(Error::InvalidPosition { value, .. }) if value == bad),
            "{bad}: {refused:?}"
        );
        assert_eq!(
            store
                .load_checkpoint(&ProjectionName::from_static("edge"))
                .await
                .expect("load"),
            None
        );
    }
    store
        .save_checkpoint(
            &ProjectionName::from_static("edge"),
            GlobalPosition::new(max),
        )
        .await
        .expect("the highest storable position");
    assert_eq!(
        store
            .load_checkpoint(&ProjectionName::from_static("edge"))
            .await
            .expect("load"),
        Some(GlobalPosition::new(max))
    );
}

/// A parked record is stored the same on every backend: NUL characters in its text
/// replaced, its time cut to whole microseconds; times outside years 1 to 9999 and
/// positions or versions above [`crate::limits::MAX_POSITION`] refused. The cause of
/// an undecodable event (serde's reason) is kept in the record.
pub async fn parked_records_are_stored_alike_and_keep_their_cause<
    S: EventStore + CheckpointStore + Clone,
>(
    store: S,
) {
    use chrono::{TimeZone, Utc};
    let s = stream("parked-edge");
    append(&store, &s, vec![added(1)]).await;
    let event = log(&store).await.remove(0);
    let at = Utc
        .timestamp_opt(1_700_000_000, 123_456_789)
        .single()
        .expect("valid time");
    let record = |error: &str, event_type: &str, at| {
        ParkedEvent::from_parts(
            ProjectionName::from_static("edge"),
            event.event_id,
            event.stream_id.clone(),
            event.stream_version,
            event.global_position,
            event_type.to_owned(),
            error.to_owned(),
            at,
        )
    };
    store
        .park(record("bad\0input", "Ty\0pe", at))
        .await
        .expect("park");
    let parked = store
        .parked(&ProjectionName::from_static("edge"))
        .await
        .expect("parked");
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].error, "bad\u{fffd}input");
    assert_eq!(parked[0].event_type, "Ty\u{fffd}pe");
    assert_eq!(parked[0].parked_at.timestamp_subsec_nanos(), 123_456_000);

    for year in [-5000, 0, 10_000, 200_000] {
        let far = Utc
            .with_ymd_and_hms(year, 1, 1, 0, 0, 0)
            .single()
            .expect("chrono holds it");
        let refused = store.park(record("x", "T", far)).await;
        assert!(
            matches!(refused, Err(Error::InvalidParkedEvent { .. })),
            "{year}: {refused:?}"
        );
    }
    let mut beyond = record("x", "T", at);
    beyond.global_position = GlobalPosition::new(u64::MAX);
    assert!(matches!(
        store.park(beyond).await,
        Err(Error::InvalidPosition { .. })
    ));
    let mut beyond = record("x", "T", at);
    beyond.stream_version = crate::StreamVersion::new(crate::limits::MAX_POSITION + 1);
    assert!(matches!(
        store.park(beyond).await,
        Err(Error::InvalidPosition { .. })
    ));
    assert_eq!(
        store
            .parked(&ProjectionName::from_static("edge"))
            .await
            .expect("parked")
            .len(),
        1
    );

    // An event that does not decode is parked with serde's reason, not only "cannot
    // deserialize".
    let odd = EventData::new(
        EventType::try_new("Added").expect("valid"),
        EventPayload::from_json(r#"{"Added":{"value":"seven"}}"#).expect("valid JSON"),
        EventMetadata::default(),
    );
    append(&store, &stream("acc-odd"), vec![odd]).await;
    let summing = SummingProjection::new("cause", "acc-");
    runner(&store, summing)
        .with_error_policy(fast(OnFailure::Park, 1))
        .catch_up()
        .await
        .expect("parks and goes on");
    let parked = store
        .parked(&ProjectionName::from_static("cause"))
        .await
        .expect("parked");
    assert_eq!(parked.len(), 1);
    assert!(
        parked[0].error.contains("cannot deserialize") && parked[0].error.contains("invalid type"),
        "{}",
        parked[0].error
    );
}
