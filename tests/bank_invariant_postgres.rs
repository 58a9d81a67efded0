//! Three executors on two pools (as processes would), one of them starting from
//! snapshots, 6 tasks each, 5,760 random transfers (at least 5,000 written) among 20
//! accounts on PostgreSQL: money is conserved, versions are contiguous, the log read
//! back holds every event exactly once.

use eventcore::{CommandExecutor, RetryPolicy};
use eventcore_tests::bank::{audit, open_accounts, random_transfers};
use eventcore_tests::postgres::{fresh_schema, store_in};

const ACCOUNTS: usize = 20;
const INITIAL: i64 = 100_000;
const TASKS_PER_EXECUTOR: usize = 6;
const TRANSFERS_PER_TASK: usize = 320;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "set DATABASE_URL (scripts/test provisions one) to run the PostgreSQL tests"
)]
async fn random_transfers_from_two_pools_conserve_money() {
    let schema = fresh_schema();
    let (one, two) = (store_in(&schema).await, store_in(&schema).await);
    let policy = RetryPolicy::new().with_max_attempts(1_000);
    // One instance's tasks take turns on a stream, the other's race each other: both
    // meet the other instance only at the append. The second also brings its kept
    // states forward from the log (the feed suggests, the append proves).
    let executors = [
        CommandExecutor::new(one.clone()).with_retry_policy(policy.clone()),
        CommandExecutor::new(two.clone())
            .with_retry_policy(policy.clone())
            .with_stream_queue(false)
            .with_log_feed(true),
        // The third keeps two states at most: it starts nearly every command from a
        // snapshot (taken every 5 events by all three), which the others keep making
        // stale.
        CommandExecutor::new(two)
            .with_retry_policy(policy)
            .with_state_cache_capacity(2),
    ];
    open_accounts(&executors[0], ACCOUNTS, INITIAL).await;

    let run = random_transfers(&executors, TASKS_PER_EXECUTOR, TRANSFERS_PER_TASK, ACCOUNTS).await;

    assert_eq!(
        run.done + run.refused,
        3 * TASKS_PER_EXECUTOR * TRANSFERS_PER_TASK
    );
    assert!(
        run.done >= 5_000,
        "at least 5,000 transfers must go through: {run:?}"
    );
    let audit = audit(&one, ACCOUNTS).await;
    assert_eq!(
        audit.total,
        ACCOUNTS as i64 * INITIAL,
        "money was created or lost"
    );
    assert_eq!(audit.events, ACCOUNTS + 2 * run.done);
    println!("{run:?}");
}
