//! 8 tasks × 2,000 random transfers among 20 accounts on the in-memory store (two
//! executors, one of which forgets its states and starts from snapshots): money is
//! conserved, versions are contiguous, the log holds every event exactly once.

use std::sync::Arc;

use eventcore::{CommandExecutor, EventStore, RetryPolicy};
use eventcore_memory::InMemoryEventStore;
use eventcore_tests::bank::{audit, open_accounts, random_transfers};

const ACCOUNTS: usize = 20;
const INITIAL: i64 = 1_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_transfers_conserve_money() {
    // Executions over the same account take turns (the default).
    transfers_conserve_money(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_random_transfers_conserve_money() {
    // They race, and the losers conflict and retry.
    transfers_conserve_money(false).await;
}

async fn transfers_conserve_money(take_turns: bool) {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let executor = CommandExecutor::from_shared(store.clone())
        .with_retry_policy(RetryPolicy::new().with_max_attempts(1_000))
        .with_stream_queue(take_turns);
    // A second writer that keeps two states at most: it forgets nearly every state,
    // and starts again from the snapshots both executors take (every 5 events), which
    // the other one keeps making stale.
    let forgetful = CommandExecutor::from_shared(store.clone())
        .with_retry_policy(RetryPolicy::new().with_max_attempts(1_000))
        .with_stream_queue(take_turns)
        .with_state_cache_capacity(2);
    open_accounts(&executor, ACCOUNTS, INITIAL).await;

    let run = random_transfers(&[executor, forgetful], 4, 2_000, ACCOUNTS).await;

    assert_eq!(run.done + run.refused, 8 * 2_000);
    assert!(run.done > 0);
    let audit = audit(&*store, ACCOUNTS).await;
    assert_eq!(
        audit.total,
        ACCOUNTS as i64 * INITIAL,
        "money was created or lost"
    );
    assert_eq!(audit.events, ACCOUNTS + 2 * run.done);
    println!("{run:?}");
}
