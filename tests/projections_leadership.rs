//! One active runner per projection name: fail-over when the leader goes away, on the
//! in-memory election and across two PostgreSQL pools.

use std::sync::Arc;
use std::time::Duration;

use eventcore::testing::projection_conformance::SummingProjection;
use eventcore::{
    AppendRequest, CheckpointStore, EventData, EventMetadata, EventStore, ExpectedVersion,
    LeaderElection, LogQuery, ProjectionRunner, StreamId, testing::conformance::ConformanceEvent,
};
use eventcore_memory::{InMemoryEventStore, InMemoryLeaderElection};
use eventcore_postgres::sqlx;
use eventcore_postgres::{PostgresEventStore, PostgresLeaderElection};
use eventcore_tests::postgres::{fresh_schema, store_in};
use tokio::sync::{oneshot, watch};

const HANG_GUARD: Duration = Duration::from_secs(120);

fn added(value: i64) -> EventData {
    EventData::from_event(&ConformanceEvent::Added { value }, EventMetadata::default())
        .expect("serializes")
}

async fn append(store: &dyn EventStore, values: impl IntoIterator<Item = i64>) {
    let stream = StreamId::try_new("acc-1").expect("valid");
    store
        .append(AppendRequest::single(
            stream,
            ExpectedVersion::Any,
            values.into_iter().map(added).collect(),
        ))
        .await
        .expect("append");
}

async fn wait_until(progress: &mut watch::Receiver<usize>, count: usize) {
    tokio::time::timeout(HANG_GUARD, progress.wait_for(|n| *n >= count))
        .await
        .expect("progress within the hang guard")
        .expect("progress");
}

struct Candidate {
    metrics: eventcore::ProjectionMetrics,
    progress: watch::Receiver<usize>,
    seen: Arc<parking_lot::Mutex<eventcore::testing::projection_conformance::Seen>>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<eventcore::Result<eventcore::RunSummary>>,
}

fn candidate(
    events: Arc<dyn EventStore>,
    checkpoints: Arc<dyn CheckpointStore>,
    election: Arc<dyn LeaderElection>,
) -> Candidate {
    let projection = SummingProjection::new("leader-view", "acc-");
    let (progress, seen) = (projection.progress(), projection.seen());
    let (stop, stopped) = oneshot::channel::<()>();
    let mut runner = ProjectionRunner::new(projection, events, checkpoints);
    let metrics = runner.metrics();
    let task = tokio::spawn(async move {
        runner
            .run_as_leader(&*election, async {
                let _ = stopped.await;
            })
            .await
    });
    Candidate {
        metrics,
        progress,
        seen,
        stop,
        task,
    }
}

/// Checks the fail-over story once the first candidate leads and has applied 10 events:
/// the second stays idle, takes over after `kill`, continues after the checkpoint.
async fn fail_over(
    store: Arc<dyn EventStore>,
    first: Candidate,
    second: Candidate,
    second_waiting: impl std::future::Future<Output = ()>,
    kill: impl std::future::Future<Output = ()>,
) {
    let (mut first, mut second) = (first, second);
    wait_until(&mut first.progress, 10).await;
    append(&*store, 11..=15).await;
    wait_until(&mut first.progress, 15).await;
    assert_eq!(*second.progress.borrow(), 0, "only the leader applies");
    // Delivery is at-least-once: what the old leader applied after its last saved
    // checkpoint would be applied again by the next. Kill it once it has saved.
    let fifteenth = store.read_all(&LogQuery::new()).await.expect("read")[14].global_position;
    tokio::time::timeout(HANG_GUARD, async {
        while first.metrics.checkpoint() < fifteenth.value() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("checkpoint saved within the hang guard");

    // The second candidate must be queued for the leadership before the leader dies,
    // or the old leader could re-acquire first.
    tokio::time::timeout(HANG_GUARD, second_waiting)
        .await
        .expect("the second candidate queues within the hang guard");
    kill.await;
    // Observed, not timed: the old leader has noticed its loss (it stops applying) and
    // the new one is elected.
    tokio::time::timeout(HANG_GUARD, async {
        while first.metrics.is_leader() || !second.metrics.is_leader() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("fail-over within the hang guard");
    append(&*store, 16..=20).await;
    wait_until(&mut second.progress, 5).await;
    let all = store.read_all(&LogQuery::new()).await.expect("read");
    let second_seen = second.seen.lock().positions.clone();
    assert_eq!(
        second_seen,
        all[15..]
            .iter()
            .map(|e| e.global_position)
            .collect::<Vec<_>>(),
        "the new leader continues after the old leader's checkpoint"
    );
    assert_eq!(
        first.seen.lock().positions.len(),
        15,
        "the old leader stopped applying"
    );

    let _ = second.stop.send(());
    let _ = first.stop.send(());
    for task in [second.task, first.task] {
        tokio::time::timeout(HANG_GUARD, task)
            .await
            .expect("runner stops")
            .expect("task")
            .expect("run");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_in_memory_leader_that_is_revoked_hands_over_to_the_next_runner() {
    let store = InMemoryEventStore::new();
    let election = InMemoryLeaderElection::new();
    append(&store, 1..=10).await;
    let events: Arc<dyn EventStore> = Arc::new(store.clone());
    let checkpoints: Arc<dyn CheckpointStore> = Arc::new(store.clone());
    let first = candidate(
        events.clone(),
        checkpoints.clone(),
        Arc::new(election.clone()),
    );
    let mut first_progress = first.progress.clone();
    wait_until(&mut first_progress, 10).await;
    let second = candidate(events.clone(), checkpoints, Arc::new(election.clone()));
    let waiting = {
        let election = election.clone();
        async move {
            while election.candidates("leader-view") == 0 {
                tokio::task::yield_now().await;
            }
        }
    };
    let kill = {
        let election = election.clone();
        async move {
            assert!(election.revoke("leader-view"));
        }
    };
    fail_over(events, first, second, waiting, kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "set DATABASE_URL (scripts/test provisions one) to run the PostgreSQL tests"
)]
async fn a_postgres_leader_whose_connection_dies_hands_over_to_a_runner_on_another_pool() {
    let schema = fresh_schema();
    let (one, two): (PostgresEventStore, PostgresEventStore) =
        (store_in(&schema).await, store_in(&schema).await);
    append(&one, 1..=10).await;
    let election = |store: &PostgresEventStore| -> Arc<dyn LeaderElection> {
        Arc::new(PostgresLeaderElection::new(store).with_check_interval(Duration::from_millis(50)))
    };
    let first = candidate(Arc::new(one.clone()), Arc::new(one.clone()), election(&one));
    let mut first_progress = first.progress.clone();
    wait_until(&mut first_progress, 10).await;
    let second = candidate(Arc::new(two.clone()), Arc::new(two.clone()), election(&two));
    // The election lock's key: (hash of the schema, hash of the name), as oids.
    const LOCK: &str = "locktype = 'advisory' AND objsubid = 2
        AND classid::bigint = (hashtext('eventcore.leader.' || $1)::bigint + 4294967296) % 4294967296
        AND objid::bigint = (hashtext('leader-view')::bigint + 4294967296) % 4294967296";
    let waiting = {
        let pool = one.pool().clone();
        let schema_name = schema.to_string();
        async move {
            loop {
                let (queued,): (i64,) = sqlx::query_as(&format!(
                    "SELECT count(*) FROM pg_locks WHERE {LOCK} AND NOT granted"
                ))
                .bind(&schema_name)
                .fetch_one(&pool)
                .await
                .expect("pg_locks");
                if queued > 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    let kill = {
        let pool = one.pool().clone();
        let schema_name = schema.to_string();
        async move {
            // The leader is the session holding the granted election lock.
            let terminated: Vec<(bool,)> = sqlx::query_as(&format!(
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE {LOCK} AND granted"
            ))
            .bind(schema_name)
            .fetch_all(&pool)
            .await
            .expect("terminate the leader's connection");
            assert_eq!(terminated.len(), 1, "exactly one leader");
        }
    };
    fail_over(Arc::new(one), first, second, waiting, kill).await;
}
