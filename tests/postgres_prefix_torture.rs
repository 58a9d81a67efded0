//! The prefix property under load, across processes: several writer processes append
//! multi-stream batches while a test trigger holds each append open for a random moment
//! after it drew its positions (so commits land out of position order) and rolls some
//! back; three followers (a raw `read_all` loop, a `ProjectionRunner` with a filter, a
//! `TransactionalProjectionRunner`) follow live. At the end every follower must have
//! seen exactly the committed log: every event once, in order, nothing left behind.
//!
//! Bounded for CI (`EVENTCORE_TORTURE_SECONDS`, 15 by default); run longer on demand:
//! `EVENTCORE_TORTURE_SECONDS=300 cargo test -p eventcore-tests --test postgres_prefix_torture`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use eventcore::{
    AppendRequest, CheckpointStore, Error, EventData, EventMetadata, EventStore, ExpectedVersion,
    GlobalPosition, LogQuery, Projection, ProjectionFilter, ProjectionRunner, RecordedEvent,
    StoredEvent, StreamAppend, StreamId,
};
use eventcore_postgres::sqlx::{self, PgConnection};
use eventcore_postgres::{
    PostgresEventStore, SchemaName, TransactionalProjection, TransactionalProjectionRunner,
};
use eventcore_tests::bank::BankEvent;
use eventcore_tests::postgres::{config, fresh_schema, store_in};
use rand::Rng;
use tokio::sync::watch;

const WRITER_SCHEMA: &str = "EVENTCORE_TORTURE_WRITER_SCHEMA";
const WRITER_SECONDS: &str = "EVENTCORE_TORTURE_WRITER_SECONDS";
const PROCESSES: usize = 3;
const TASKS_PER_PROCESS: usize = 4;
const STREAMS: usize = 24;
/// The streams that single-event appends at an exact version contend on.
const HOT_STREAMS: usize = 4;
/// A failure detector for the followers' last stretch, not a synchronisation.
const HANG_GUARD: Duration = Duration::from_secs(180);

fn seconds() -> u64 {
    std::env::var("EVENTCORE_TORTURE_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15)
}

fn stream(i: usize) -> StreamId {
    let group = if i.is_multiple_of(2) { "even" } else { "odd" };
    StreamId::try_new(format!("{group}-{i}")).expect("valid")
}

/// One writer process: appends random multi-stream batches, and single events at an
/// exact version to a few hot streams, for the given time and
/// prints what each append answered (`torture: ACK`, `FAIL` or `UNKNOWN`, then the
/// event ids).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a writer process of the torture test below, started by it"]
async fn writer_process() {
    let schema = SchemaName::try_new(std::env::var(WRITER_SCHEMA).expect("schema")).expect("valid");
    let seconds: u64 = std::env::var(WRITER_SECONDS)
        .expect("seconds")
        .parse()
        .expect("number");
    let store = PostgresEventStore::connect_with(
        config(&schema).with_max_connections(TASKS_PER_PROCESS as u32 + 2),
    )
    .await
    .expect("connect");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..TASKS_PER_PROCESS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut lines = Vec::new();
            while tokio::time::Instant::now() < deadline {
                // Half the appends are one event to one of a few hot streams at the
                // version just read: the one-statement path (sql/append_one.sql), which
                // queues for its stream's lock under contention and, with the trigger
                // below, often rolls back or conflicts.
                if rand::rng().random_bool(0.5) {
                    let hot = stream(rand::rng().random_range(0..HOT_STREAMS));
                    let Ok(snapshot) = store.read_streams(std::slice::from_ref(&hot)).await else {
                        continue;
                    };
                    let event = EventData::from_event(
                        &BankEvent::Deposited { amount: 1 },
                        EventMetadata::default(),
                    )
                    .expect("serializes");
                    let id = event.event_id.to_string();
                    let request = AppendRequest::single(
                        hot.clone(),
                        ExpectedVersion::Exact(snapshot.version_of(&hot)),
                        vec![event],
                    );
                    let verdict = match store.append(request).await {
                        Ok(_) => "ACK",
                        Err(Error::OutcomeUnknown { .. }) => "UNKNOWN",
                        Err(_) => "FAIL",
                    };
                    lines.push(format!("torture: {verdict} {id}"));
                    continue;
                }
                let mut request = AppendRequest::new();
                let mut ids = Vec::new();
                let mut chosen = HashSet::new();
                let n_streams = rand::rng().random_range(1..=3);
                while chosen.len() < n_streams {
                    chosen.insert(rand::rng().random_range(0..STREAMS));
                }
                for s in chosen {
                    let n_events = rand::rng().random_range(1..=3);
                    let events: Vec<EventData> = (0..n_events)
                        .map(|_| {
                            EventData::from_event(
                                &BankEvent::Deposited { amount: 1 },
                                EventMetadata::default(),
                            )
                            .expect("serializes")
                        })
                        .collect();
                    ids.extend(events.iter().map(|e| e.event_id.to_string()));
                    request = request.with_stream(StreamAppend::new(
                        stream(s),
                        ExpectedVersion::Any,
                        events,
                    ));
                }
                let verdict = match store.append(request).await {
                    Ok(_) => "ACK",
                    Err(Error::OutcomeUnknown { .. }) => "UNKNOWN",
                    Err(_) => "FAIL",
                };
                lines.push(format!("torture: {verdict} {}", ids.join(" ")));
            }
            lines
        }));
    }
    for task in tasks {
        for line in task.await.expect("writer task") {
            println!("{line}");
        }
    }
}

/// Records positions as a follower applies them.
#[derive(Clone)]
struct Seen {
    name: &'static str,
    filter: ProjectionFilter,
    positions: Arc<parking_lot::Mutex<Vec<u64>>>,
    count: watch::Sender<usize>,
}

impl Seen {
    fn new(name: &'static str, filter: ProjectionFilter) -> Self {
        Seen {
            name,
            filter,
            positions: Arc::default(),
            count: watch::Sender::new(0),
        }
    }

    fn record(&self, position: GlobalPosition) {
        let mut positions = self.positions.lock();
        positions.push(position.value());
        self.count.send_replace(positions.len());
    }
}

impl Projection for Seen {
    type Event = BankEvent;
    type Error = std::convert::Infallible;

    fn name(&self) -> &str {
        self.name
    }

    fn filter(&self) -> ProjectionFilter {
        self.filter.clone()
    }

    async fn apply(&mut self, event: &StoredEvent<BankEvent>) -> Result<(), Self::Error> {
        self.record(event.global_position);
        Ok(())
    }
}

impl TransactionalProjection for Seen {
    type Event = BankEvent;
    type Error = sqlx::Error;

    fn name(&self) -> &str {
        self.name
    }

    fn filter(&self) -> ProjectionFilter {
        self.filter.clone()
    }

    async fn apply(
        &mut self,
        _tx: &mut PgConnection,
        event: &StoredEvent<BankEvent>,
    ) -> Result<(), sqlx::Error> {
        self.record(event.global_position);
        Ok(())
    }
}

async fn read_everything(store: &PostgresEventStore) -> Vec<RecordedEvent> {
    let mut all = Vec::new();
    loop {
        let after = all.last().map(|e: &RecordedEvent| e.global_position);
        let batch = store
            .read_all(&LogQuery::new().with_after(after).with_limit(5_000))
            .await
            .expect("read");
        if batch.is_empty() {
            return all;
        }
        all.extend(batch);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs PostgreSQL: set DATABASE_URL (scripts/test provisions one)"
)]
async fn followers_see_every_committed_event_once_in_order_under_reordered_commits() {
    let schema = fresh_schema();
    let store = store_in(&schema).await;
    // Holds each append open for up to 4 ms after it drew its positions, and rolls
    // one in twenty back: commits land out of position order, with gaps.
    for sql in [
        format!(
            "CREATE FUNCTION \"{schema}\".test_reorder() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 PERFORM pg_sleep(random() * 0.004);
                 IF random() < 0.05 THEN
                     RAISE EXCEPTION 'rolled back by the torture trigger';
                 END IF;
                 RETURN NULL;
             END $$"
        ),
        format!(
            "CREATE TRIGGER test_reorder AFTER INSERT ON \"{schema}\".events
             FOR EACH STATEMENT EXECUTE FUNCTION \"{schema}\".test_reorder()"
        ),
    ] {
        sqlx::query(&sql)
            .execute(store.pool())
            .await
            .expect("trigger");
    }

    // Followers.
    let (stop, stopped) = watch::channel(false);
    let raw = Arc::new(parking_lot::Mutex::new(Vec::<u64>::new()));
    let raw_count = watch::Sender::new(0_usize);
    let raw_task = {
        let (store, raw, raw_count, mut stopped) = (
            store.clone(),
            raw.clone(),
            raw_count.clone(),
            stopped.clone(),
        );
        tokio::spawn(async move {
            let mut after = None;
            loop {
                let batch = store
                    .read_all(&LogQuery::new().with_after(after).with_limit(37))
                    .await
                    .expect("read");
                if let Some(last) = batch.last() {
                    after = Some(last.global_position);
                    let mut seen = raw.lock();
                    seen.extend(batch.iter().map(|e| e.global_position.value()));
                    raw_count.send_replace(seen.len());
                    continue;
                }
                tokio::select! {
                    waited = store.wait_for_events(after) => waited.expect("wait"),
                    _ = stopped.wait_for(|s| *s) => return,
                }
            }
        })
    };
    let filtered = Seen::new(
        "odd_streams",
        ProjectionFilter::all().with_stream_prefix("odd-"),
    );
    let runner_task = {
        let mut runner = ProjectionRunner::new(
            filtered.clone(),
            Arc::new(store.clone()) as Arc<dyn EventStore>,
            Arc::new(store.clone()) as Arc<dyn CheckpointStore>,
        )
        .with_batch_size(29);
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            runner
                .run(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
                .expect("runner")
        })
    };
    let transactional = Seen::new("everything_tx", ProjectionFilter::all());
    let tx_task = {
        let mut runner = TransactionalProjectionRunner::new(store.clone(), transactional.clone())
            .with_batch_size(31);
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            runner
                .run(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
                .expect("transactional runner")
        })
    };
    drop(stopped);

    // Writers, each a process of its own.
    let exe = std::env::current_exe().expect("test binary");
    let mut writers = Vec::new();
    for _ in 0..PROCESSES {
        let child = tokio::process::Command::new(&exe)
            .args([
                "--ignored",
                "--exact",
                "writer_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(WRITER_SCHEMA, schema.as_str())
            .env(WRITER_SECONDS, seconds().to_string())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn a writer");
        writers.push(child);
    }
    let mut acked = HashSet::new();
    let mut failed = HashSet::new();
    let mut unknown = 0;
    for writer in writers {
        let output = writer.wait_with_output().await.expect("writer");
        assert!(
            output.status.success(),
            "a writer failed: {:?}",
            output.status
        );
        // libtest prints its own words around the test's output, sometimes on the same
        // line: the writer's lines start at their marker.
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let Some(at) = line.find("torture: ") else {
                continue;
            };
            let mut words = line[at + "torture: ".len()..].split_whitespace();
            let target = match words.next() {
                Some("ACK") => &mut acked,
                Some("FAIL") => &mut failed,
                Some("UNKNOWN") => {
                    unknown += 1;
                    continue;
                }
                _ => continue,
            };
            target.extend(words.map(str::to_owned));
        }
    }
    assert!(
        acked.len() > 100,
        "the writers wrote too little to test anything: {}",
        acked.len()
    );
    assert!(!failed.is_empty(), "the trigger rolled nothing back");
    assert_eq!(unknown, 0, "no connection was lost");

    // Every writer has exited: nothing is in flight, everything committed is visible.
    let log = read_everything(&store).await;
    let ids: HashSet<String> = log.iter().map(|e| e.event_id.to_string()).collect();
    assert_eq!(ids.len(), log.len(), "an event id twice in the log");
    assert!(
        acked.iter().all(|id| ids.contains(id)),
        "an acknowledged event is missing"
    );
    assert!(
        failed.iter().all(|id| !ids.contains(id)),
        "a rolled-back event is stored"
    );
    assert_eq!(
        ids.len(),
        acked.len(),
        "events nobody acknowledged are stored"
    );
    let positions: Vec<u64> = log.iter().map(|e| e.global_position.value()).collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "positions not increasing"
    );
    let mut versions: HashMap<&StreamId, u64> = HashMap::new();
    for event in &log {
        let version = versions.entry(&event.stream_id).or_default();
        *version += 1;
        assert_eq!(
            event.stream_version.value(),
            *version,
            "versions not contiguous in position order"
        );
    }
    let odd: Vec<u64> = log
        .iter()
        .filter(|e| e.stream_id.as_str().starts_with("odd-"))
        .map(|e| e.global_position.value())
        .collect();

    // Every follower converges on exactly that, then stops.
    async fn converge(count: &watch::Sender<usize>, target: usize, what: &str) {
        let mut watch = count.subscribe();
        tokio::time::timeout(HANG_GUARD, watch.wait_for(|n| *n >= target))
            .await
            .unwrap_or_else(|_| panic!("{what} stalled at {} of {target}", *count.borrow()))
            .expect("follower alive");
    }
    converge(&raw_count, positions.len(), "the raw reader").await;
    converge(&filtered.count, odd.len(), "the filtered runner").await;
    converge(
        &transactional.count,
        positions.len(),
        "the transactional runner",
    )
    .await;
    stop.send_replace(true);
    raw_task.await.expect("raw reader");
    runner_task.await.expect("runner");
    tx_task.await.expect("transactional runner");
    assert_eq!(*raw.lock(), positions, "the raw reader");
    assert_eq!(*filtered.positions.lock(), odd, "the filtered runner");
    assert_eq!(
        *transactional.positions.lock(),
        positions,
        "the transactional runner"
    );
}
