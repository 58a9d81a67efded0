//! Two services with separate stores exchange events through the in-memory broker,
//! with crashes injected at every step of publication and subscription: billing ends
//! with exactly one effect per order event, in order. On two in-memory stores and on
//! two PostgreSQL schemas.

use std::sync::Arc;

use eventcore::{CheckpointStore, EventStore};
use eventcore_memory::InMemoryEventStore;
use eventcore_tests::two_services::run_with_crashes;

/// Orders per run; `EVENTCORE_E2E_ORDERS` runs longer on demand.
fn order_count() -> usize {
    std::env::var("EVENTCORE_E2E_ORDERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

#[tokio::test]
async fn memory_stores_every_effect_once_whatever_crashes() {
    let mut total = 0;
    for seed in 0..4 {
        let orders = InMemoryEventStore::new();
        let billing = InMemoryEventStore::new();
        let crashes = run_with_crashes(
            Arc::new(orders.clone()) as Arc<dyn EventStore>,
            Arc::new(orders) as Arc<dyn CheckpointStore>,
            Arc::new(billing),
            order_count(),
            seed,
        )
        .await;
        println!("seed {seed}: {crashes:?}");
        assert!(
            crashes.before_effect > 0 && crashes.after_effect > 0,
            "{crashes:?}"
        );
        assert!(
            crashes.broker_lost_tail > 0 && crashes.publish_failed > 0,
            "{crashes:?}"
        );
        total += crashes.total();
    }
    println!("crashes injected: {total}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "set DATABASE_URL (scripts/test provisions one) to run the PostgreSQL tests"
)]
async fn postgres_schemas_every_effect_once_whatever_crashes() {
    let orders = eventcore_tests::postgres::fresh_store().await;
    let billing = eventcore_tests::postgres::fresh_store().await;
    let crashes = run_with_crashes(
        Arc::new(orders.clone()) as Arc<dyn EventStore>,
        Arc::new(orders) as Arc<dyn CheckpointStore>,
        Arc::new(billing),
        order_count() / 3,
        7,
    )
    .await;
    println!("postgres: {crashes:?}");
    assert!(
        crashes.before_effect > 0 && crashes.after_effect > 0,
        "{crashes:?}"
    );
}
