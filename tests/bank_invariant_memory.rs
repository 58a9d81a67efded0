//! 8 tasks × 2,000 random transfers among 20 accounts on the in-memory store: money is
//! conserved, versions are contiguous, the log holds every event exactly once.

use std::sync::Arc;

use eventcore::{CommandExecutor, Error, EventStore, RetryPolicy};
use eventcore_memory::InMemoryEventStore;
use eventcore_tests::bank::{Open, Transfer, account, audit};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const ACCOUNTS: usize = 20;
const TASKS: u64 = 8;
const TRANSFERS: usize = 2_000;
const INITIAL: i64 = 1_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_transfers_conserve_money() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let executor = CommandExecutor::from_shared(store.clone())
        .with_retry_policy(RetryPolicy::new().with_max_attempts(1_000));
    for n in 0..ACCOUNTS {
        executor
            .execute(&Open {
                account: account(n),
                initial: INITIAL,
            })
            .await
            .expect("open");
    }

    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let executor = executor.clone();
            tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(task);
                let (mut done, mut refused, mut retries) = (0usize, 0usize, 0u32);
                for _ in 0..TRANSFERS {
                    let from = rng.random_range(0..ACCOUNTS);
                    let to = (from + rng.random_range(1..ACCOUNTS)) % ACCOUNTS;
                    let command = Transfer {
                        from: account(from),
                        to: account(to),
                        amount: rng.random_range(1..=300),
                    };
                    match executor.execute(&command).await {
                        Ok(result) => {
                            done += 1;
                            retries += result.attempts - 1;
                        }
                        Err(Error::BusinessRuleViolation(reason)) => {
                            assert_eq!(reason, "insufficient funds");
                            refused += 1;
                        }
                        Err(other) => panic!("unexpected error: {other}"),
                    }
                }
                (done, refused, retries)
            })
        })
        .collect();
    let (mut done, mut refused, mut retries) = (0, 0, 0);
    for task in tasks {
        let (d, r, t) = task.await.expect("task");
        done += d;
        refused += r;
        retries += t;
    }

    assert_eq!(done + refused, TASKS as usize * TRANSFERS);
    assert!(done > 0);
    let audit = audit(&*store, ACCOUNTS).await;
    assert_eq!(
        audit.total,
        ACCOUNTS as i64 * INITIAL,
        "money was created or lost"
    );
    assert_eq!(audit.events, ACCOUNTS + 2 * done);
    println!("{done} transfers, {refused} refused for funds, {retries} retries");
}
