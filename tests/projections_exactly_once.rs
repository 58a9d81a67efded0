//! Exactly-once projections into PostgreSQL: the read model and the checkpoint commit
//! together, so killing the runner anywhere, any number of times, or running two at once,
//! never applies an event twice or loses one.

use std::collections::HashMap;
use std::time::Duration;

use eventcore::testing::conformance::ConformanceEvent;
use eventcore::{
    AppendRequest, EventData, EventMetadata, EventStore, ExpectedVersion, LogQuery, StoredEvent,
    StreamAppend, StreamId,
};
use eventcore_postgres::sqlx::{self, PgConnection};
use eventcore_postgres::{
    PostgresEventStore, TransactionalProjection, TransactionalProjectionRunner,
};
use eventcore_tests::postgres::fresh_store;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;

const HANG_GUARD: Duration = Duration::from_secs(120);
const STREAMS: usize = 10;
const EVENTS: usize = 2_000;
const BATCH: usize = 50;

/// Per stream: the sum of values and the number of events, in a table of the store's
/// schema.
struct Balances {
    table: String,
    applied: usize,
    progress: watch::Sender<usize>,
    /// Values whose `apply` fails every time.
    refuse: Option<i64>,
}

impl Balances {
    fn new(store: &PostgresEventStore) -> (Self, watch::Receiver<usize>) {
        let (progress, watch) = watch::channel(0);
        let projection = Balances {
            table: format!("\"{}\".balances", store.schema()),
            applied: 0,
            progress,
            refuse: None,
        };
        (projection, watch)
    }
}

impl TransactionalProjection for Balances {
    type Event = ConformanceEvent;
    type Error = sqlx::Error;

    fn name(&self) -> &str {
        "balances"
    }

    async fn apply(
        &mut self,
        tx: &mut PgConnection,
        event: &StoredEvent<ConformanceEvent>,
    ) -> Result<(), sqlx::Error> {
        let ConformanceEvent::Added { value } = event.payload else {
            return Ok(());
        };
        // The write happens before the failure: the savepoint must undo it.
        sqlx::query(&format!(
            "INSERT INTO {} AS b (stream_id, total, events) VALUES ($1, $2, 1)
             ON CONFLICT (stream_id) DO UPDATE SET total = b.total + EXCLUDED.total, events = b.events + 1",
            self.table
        ))
        .bind(event.stream_id.as_str())
        .bind(value)
        .execute(&mut *tx)
        .await?;
        if self.refuse == Some(value) {
            return Err(sqlx::Error::Protocol(format!("refusing {value}")));
        }
        self.applied += 1;
        self.progress.send_replace(self.applied);
        Ok(())
    }

    async fn reset(&mut self, tx: &mut PgConnection) -> Result<(), sqlx::Error> {
        sqlx::query(&format!("DELETE FROM {}", self.table))
            .execute(tx)
            .await?;
        Ok(())
    }
}

async fn setup() -> PostgresEventStore {
    let store = fresh_store().await;
    sqlx::query(&format!(
        "CREATE TABLE \"{}\".balances (stream_id text PRIMARY KEY, total bigint NOT NULL, events bigint NOT NULL)",
        store.schema()
    ))
    .execute(store.pool())
    .await
    .expect("read model table");
    let mut rng = StdRng::seed_from_u64(7);
    for chunk in 0..EVENTS / 100 {
        let mut request = AppendRequest::new();
        let mut by_stream: HashMap<usize, Vec<EventData>> = HashMap::new();
        for i in 0..100 {
            let value = rng.random_range(-50..=100) + (chunk * 100 + i) as i64 % 3;
            by_stream
                .entry(rng.random_range(0..STREAMS))
                .or_default()
                .push(
                    EventData::from_event(
                        &ConformanceEvent::Added { value },
                        EventMetadata::default(),
                    )
                    .expect("serializes"),
                );
        }
        for (stream, events) in by_stream {
            let id = StreamId::try_new(format!("acc-{stream}")).expect("valid");
            request = request.with_stream(StreamAppend::new(id, ExpectedVersion::Any, events));
        }
        store.append(request).await.expect("append");
    }
    store
}

/// What a rebuild from scratch gives: folded straight from the log.
async fn expected(store: &PostgresEventStore) -> HashMap<String, (i64, i64)> {
    let mut expected: HashMap<String, (i64, i64)> = HashMap::new();
    for event in store
        .read_all(&LogQuery::new().with_limit(1_000_000))
        .await
        .expect("read")
    {
        if let ConformanceEvent::Added { value } =
            event.decode::<ConformanceEvent>().expect("decode").payload
        {
            let entry = expected
                .entry(event.stream_id.as_str().to_owned())
                .or_default();
            entry.0 += value;
            entry.1 += 1;
        }
    }
    expected
}

async fn read_model(store: &PostgresEventStore) -> HashMap<String, (i64, i64)> {
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(&format!(
        "SELECT stream_id, total, events FROM \"{}\".balances",
        store.schema()
    ))
    .fetch_all(store.pool())
    .await
    .expect("read model");
    rows.into_iter().map(|(s, t, e)| (s, (t, e))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "set DATABASE_URL (scripts/test provisions one) to run the PostgreSQL tests"
)]
async fn killing_the_runner_anywhere_many_times_leaves_the_read_model_equal_to_a_rebuild() {
    let store = setup().await;
    let mut rng = StdRng::seed_from_u64(2026);
    let mut kills = 0;
    for _ in 0..30 {
        let (projection, mut progress) = Balances::new(&store);
        let mut runner =
            TransactionalProjectionRunner::new(store.clone(), projection).with_batch_size(BATCH);
        // Kill after a random number of events of this run: mostly mid-batch, with the
        // batch's transaction open.
        let kill_after = rng.random_range(1..=BATCH * 3);
        let mut task = tokio::spawn(async move { runner.catch_up().await });
        let killed = tokio::time::timeout(HANG_GUARD, async {
            tokio::select! {
                _ = progress.wait_for(|n| *n >= kill_after) => true,
                finished = &mut task => {
                    finished.expect("task").expect("run");
                    false
                }
            }
        })
        .await
        .expect("a run kills or finishes within the hang guard");
        if killed {
            task.abort();
            let _ = task.await;
            kills += 1;
        }
    }
    assert!(
        kills >= 10,
        "many runs must have been killed mid-way ({kills})"
    );
    let (projection, _) = Balances::new(&store);
    TransactionalProjectionRunner::new(store.clone(), projection)
        .with_batch_size(BATCH)
        .catch_up()
        .await
        .expect("final run");
    let expected = expected(&store).await;
    assert_eq!(
        expected.values().map(|(_, n)| n).sum::<i64>(),
        EVENTS as i64
    );
    assert_eq!(
        read_model(&store).await,
        expected,
        "each event applied exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "set DATABASE_URL (scripts/test provisions one) to run the PostgreSQL tests"
)]
async fn two_transactional_runners_at_once_apply_each_event_once() {
    let store = setup().await;
    let runs: Vec<_> = (0..2)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let (projection, _) = Balances::new(&store);
                TransactionalProjectionRunner::new(store, projection)
                    .with_batch_size(BATCH)
                    .catch_up()
                    .await
                    .expect("run")
            })
        })
        .collect();
    let mut applied = 0;
    for run in runs {
        applied += tokio::time::timeout(HANG_GUARD, run)
            .await
            .expect("finishes")
            .expect("task")
            .applied;
    }
    assert_eq!(
        applied, EVENTS as u64,
        "together they applied each event once"
    );
    assert_eq!(read_model(&store).await, expected(&store).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "set DATABASE_URL (scripts/test provisions one) to run the PostgreSQL tests"
)]
async fn a_failing_event_stops_or_is_parked_without_leaving_a_trace_in_the_read_model() {
    use eventcore::{CheckpointStore, Error, OnFailure, ProjectionErrorPolicy};
    let store = setup().await;
    let log = store
        .read_all(&LogQuery::new().with_limit(1_000_000))
        .await
        .expect("read");
    // Every event with the value 97 fails; `index` is the first of them.
    let (index, refused) = log
        .iter()
        .enumerate()
        .find_map(
            |(i, e)| match e.decode::<ConformanceEvent>().expect("decode").payload {
                ConformanceEvent::Added { value } if value == 97 => Some((i, value)),
                _ => None,
            },
        )
        .expect("some event has the value 97");
    let policy = |on_failure| {
        ProjectionErrorPolicy::new()
            .with_max_attempts(2)
            .with_initial_delay(Duration::ZERO)
            .with_on_failure(on_failure)
    };

    let (mut projection, _) = Balances::new(&store);
    projection.refuse = Some(refused);
    let error = TransactionalProjectionRunner::new(store.clone(), projection)
        .with_batch_size(BATCH)
        .with_error_policy(policy(OnFailure::Stop))
        .catch_up()
        .await
        .expect_err("stops");
    assert!(
        matches!(error, Error::ProjectionFailed { position, .. } if position == log[index].global_position),
        "{error:?}"
    );
    let checkpoint = store
        .load_checkpoint(&eventcore::ProjectionName::from_static("balances"))
        .await
        .expect("load");
    assert_eq!(
        checkpoint,
        index.checked_sub(1).map(|i| log[i].global_position)
    );
    let applied: i64 = read_model(&store).await.values().map(|(_, n)| n).sum();
    assert_eq!(
        applied, index as i64,
        "everything before the failed event, nothing of it"
    );

    let (mut projection, _) = Balances::new(&store);
    projection.refuse = Some(refused);
    let summary = TransactionalProjectionRunner::new(store.clone(), projection)
        .with_batch_size(BATCH)
        .with_error_policy(policy(OnFailure::Park))
        .catch_up()
        .await
        .expect("parks and goes on");
    let parked = store
        .parked(&eventcore::ProjectionName::from_static("balances"))
        .await
        .expect("parked");
    assert!(
        parked
            .iter()
            .any(|p| p.global_position == log[index].global_position)
    );
    assert_eq!(summary.parked as usize, parked.len());
    let refused_count = log
        .iter()
        .filter(|e| {
            matches!(e.decode::<ConformanceEvent>().expect("decode").payload,
                ConformanceEvent::Added { value } if value == refused)
        })
        .count();
    let applied: i64 = read_model(&store).await.values().map(|(_, n)| n).sum();
    assert_eq!(
        applied as usize,
        EVENTS - refused_count,
        "parked events left no trace"
    );

    // A rebuild empties the read model and replays everything (now without refusals).
    let (projection, _) = Balances::new(&store);
    let summary = TransactionalProjectionRunner::new(store.clone(), projection)
        .with_batch_size(BATCH)
        .rebuild()
        .await
        .expect("rebuild");
    assert_eq!(summary.applied as usize, EVENTS);
    assert!(
        store
            .parked(&eventcore::ProjectionName::from_static("balances"))
            .await
            .expect("parked")
            .is_empty()
    );
    assert_eq!(read_model(&store).await, expected(&store).await);
}
