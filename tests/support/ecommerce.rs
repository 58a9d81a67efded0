//! The distributed e-commerce scenarios as tests against every store, and crash-resume:
//! the services stopped at a random point mid-saga and started again.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use async_trait::async_trait;
use chrono::{TimeZone, Utc};
use eventcore::saga::{ManualClock, SagaPhase};
use eventcore::{
    AppendOutcome, AppendRequest, CheckpointStore, Error, EventStore, GlobalPosition,
    IdempotencyKey, LogQuery, ProjectionErrorPolicy, RecordedEvent, StreamId, StreamsSnapshot,
};
use eventcore_examples::distributed_ecommerce::contracts::{Address, OrderLine};
use eventcore_examples::distributed_ecommerce::order::OrderStatus;
use eventcore_examples::distributed_ecommerce::payment::FakeGateway;
use eventcore_examples::distributed_ecommerce::scenarios::check_correlation;
use eventcore_examples::distributed_ecommerce::shipping::ShipmentStatus;
use eventcore_examples::distributed_ecommerce::shop::Shop;
use eventcore_memory::InMemoryEventStore;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// An event store and the checkpoint store beside it.
pub type Stores = (Arc<dyn EventStore>, Arc<dyn CheckpointStore>);

/// A fresh in-memory store.
pub async fn memory_stores() -> Stores {
    let store = InMemoryEventStore::new();
    (Arc::new(store.clone()), Arc::new(store))
}

/// A fresh PostgreSQL store (its own schema).
pub async fn postgres_stores() -> Stores {
    let store = crate::postgres::fresh_store().await;
    (Arc::new(store.clone()), Arc::new(store))
}

/// The services over `stores`, on a clock standing at a fixed time, stopping at the
/// first failure of an event (no retries: a crash is a crash).
pub fn shop(stores: Stores) -> Shop {
    let start = Utc
        .with_ymd_and_hms(2026, 11, 22, 9, 0, 0)
        .single()
        .expect("a valid time");
    Shop::new(
        stores.0,
        stores.1,
        ManualClock::new(start),
        Arc::new(FakeGateway::default()),
        ProjectionErrorPolicy::new().with_max_attempts(1),
    )
    .expect("the services start")
}

/// How the store "crashes".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashMode {
    /// The append that crashes is not written.
    BeforeCommit,
    /// The append that crashes is written, but its answer is lost.
    AfterCommit,
}

/// A store that works for `crash_at` appends, then crashes on the next one and refuses
/// everything afterwards, like a process that died.
pub struct CrashingStore {
    inner: Arc<dyn EventStore>,
    crash_at: u64,
    mode: CrashMode,
    appends: AtomicU64,
    crashed: AtomicBool,
}

impl CrashingStore {
    /// A store over `inner` crashing at append number `crash_at` (0 for the first).
    pub fn new(inner: Arc<dyn EventStore>, crash_at: u64, mode: CrashMode) -> Self {
        CrashingStore {
            inner,
            crash_at,
            mode,
            appends: AtomicU64::new(0),
            crashed: AtomicBool::new(false),
        }
    }

    /// Appends attempted so far.
    pub fn appends(&self) -> u64 {
        self.appends.load(Ordering::SeqCst)
    }

    /// Whether it crashed.
    pub fn crashed(&self) -> bool {
        self.crashed.load(Ordering::SeqCst)
    }

    fn alive(&self) -> eventcore::Result<()> {
        if self.crashed() {
            return Err(dead());
        }
        Ok(())
    }
}

fn dead() -> Error {
    Error::backend("the process crashed", false, None)
}

#[async_trait]
impl EventStore for CrashingStore {
    async fn read_streams(&self, streams: &[StreamId]) -> eventcore::Result<StreamsSnapshot> {
        self.alive()?;
        self.inner.read_streams(streams).await
    }

    async fn append(&self, request: AppendRequest) -> eventcore::Result<AppendOutcome> {
        self.alive()?;
        let number = self.appends.fetch_add(1, Ordering::SeqCst);
        if number != self.crash_at {
            return self.inner.append(request).await;
        }
        self.crashed.store(true, Ordering::SeqCst);
        if self.mode == CrashMode::AfterCommit {
            let _ = self.inner.append(request).await;
        }
        Err(dead())
    }

    async fn read_all(&self, query: &LogQuery) -> eventcore::Result<Vec<RecordedEvent>> {
        self.alive()?;
        self.inner.read_all(query).await
    }

    async fn head_position(&self) -> eventcore::Result<Option<GlobalPosition>> {
        self.alive()?;
        self.inner.head_position().await
    }

    async fn wait_for_events(&self, after: Option<GlobalPosition>) -> eventcore::Result<()> {
        self.alive()?;
        self.inner.wait_for_events(after).await
    }

    async fn idempotent_outcome(
        &self,
        key: &IdempotencyKey,
    ) -> eventcore::Result<Option<AppendOutcome>> {
        self.alive()?;
        self.inner.idempotent_outcome(key).await
    }
}

/// How the order of a crash-resume run should end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Paid, shipped, completed.
    Completed,
    /// The card is declined: released and cancelled, nothing charged.
    Declined,
    /// Shipping is refused after the payment: refunded, released, cancelled.
    ShippingRefused,
}

const LINES: [(&str, u32); 2] = [("lamp", 2), ("rug", 1)];

/// Stocks the products and places the order whose saga will end as `ending`.
async fn place(shop: &Shop, ending: Ending) -> eventcore::CorrelationId {
    for (sku, _) in LINES {
        shop.add_stock(sku, 5).await.expect("stock added");
    }
    let lines = LINES
        .iter()
        .map(|(sku, quantity)| OrderLine {
            sku: (*sku).to_owned(),
            quantity: *quantity,
            unit_price: 1_000,
        })
        .collect();
    let card = match ending {
        Ending::Declined => "4000-x-decline",
        _ => "4242-x",
    };
    let country = match ending {
        Ending::ShippingRefused => "AQ",
        _ => "DE",
    };
    let address = Address {
        street: "1 Main Street".to_owned(),
        city: "Somewhere".to_owned(),
        country: country.to_owned(),
    };
    shop.place_order("X-1", "xan", lines, card, address)
        .await
        .expect("order placed")
}

/// The appends the services make for `ending` when nothing crashes.
pub async fn appends_without_crash<F, Fut>(stores: F, ending: Ending) -> u64
where
    F: Fn() -> Fut,
    Fut: Future<Output = Stores>,
{
    let base = shop(stores().await);
    place(&base, ending).await;
    let counting = Arc::new(CrashingStore::new(
        Arc::clone(base.executor().store()),
        u64::MAX,
        CrashMode::BeforeCommit,
    ));
    let mut services = base
        .with_store(Arc::clone(&counting) as Arc<dyn EventStore>)
        .expect("services");
    services.settle().await.expect("settles");
    check_ending(&services, ending).await;
    counting.appends()
}

/// Runs the order's saga with the services crashing at append `crash_at`, starts them
/// again, and checks the order ends as it should: one charge at most, one reservation
/// per item, each compensation once.
pub async fn crash_and_resume(stores: Stores, ending: Ending, crash_at: u64, mode: CrashMode) {
    let base = shop(stores);
    let correlation = place(&base, ending).await;
    let crashing = Arc::new(CrashingStore::new(
        Arc::clone(base.executor().store()),
        crash_at,
        mode,
    ));
    let mut doomed = base
        .with_store(Arc::clone(&crashing) as Arc<dyn EventStore>)
        .expect("services");
    let first = doomed.settle().await;
    assert!(crashing.crashed(), "append {crash_at} was never reached");
    assert!(first.is_err(), "the services did not notice the crash");
    drop(doomed);

    let mut restarted = base.restart().expect("services restart");
    restarted
        .settle()
        .await
        .expect("the restarted services settle");
    check_ending(&restarted, ending).await;
    check_correlation(&restarted, "crash-resume", "X-1", correlation)
        .await
        .expect("correlation carried");
}

/// The final state `ending` must leave, across the services.
pub async fn check_ending(shop: &Shop, ending: Ending) {
    let saga = shop.saga("X-1").await.expect("saga");
    let order = shop.order_status("X-1").await.expect("order");
    let payments = shop.payment_events("X-1").await.expect("payments");
    let charges = shop.gateway().charges_for("X-1");
    for (sku, quantity) in LINES {
        let stock = shop.stock(sku).await.expect("stock");
        assert_eq!(
            stock.reservations.get("X-1"),
            Some(&1),
            "{sku}: one reservation"
        );
        let held = if ending == Ending::Completed {
            i64::from(quantity)
        } else {
            0
        };
        assert_eq!(stock.held.get("X-1"), Some(&held), "{sku}: held");
        assert_eq!(stock.available, 5 - held, "{sku}: available");
    }
    let released = shop
        .log()
        .await
        .expect("log")
        .iter()
        .filter(|e| e.event_type.as_str() == "StockReleased")
        .count();
    match ending {
        Ending::Completed => {
            assert_eq!(saga.phase(), SagaPhase::Completed);
            assert_eq!(order, OrderStatus::Completed);
            assert_eq!(payments, ["PaymentRequested", "PaymentCaptured"]);
            assert_eq!(charges, 1, "charged once");
            assert_eq!(released, 0);
            assert_eq!(
                shop.shipment_status("X-1").await.expect("shipment"),
                ShipmentStatus::Created
            );
        }
        Ending::Declined => {
            assert_eq!(saga.phase(), SagaPhase::Aborted);
            assert_eq!(order, OrderStatus::Cancelled);
            assert_eq!(payments, ["PaymentRequested", "PaymentDeclined"]);
            assert_eq!(charges, 0, "never charged");
            assert_eq!(released, LINES.len(), "each product released once");
        }
        Ending::ShippingRefused => {
            assert_eq!(saga.phase(), SagaPhase::Aborted);
            assert_eq!(order, OrderStatus::Cancelled);
            assert_eq!(
                payments,
                ["PaymentRequested", "PaymentCaptured", "PaymentRefunded"]
            );
            assert_eq!(charges, 1, "charged once, refunded once");
            assert_eq!(released, LINES.len(), "each product released once");
            assert_eq!(
                shop.shipment_status("X-1").await.expect("shipment"),
                ShipmentStatus::None
            );
        }
    }
}

/// `runs` crash-resume runs with random endings, crash points and modes from `seed`.
pub async fn crash_resume_seeds<F, Fut>(stores: F, seed: u64, runs: u32)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Stores>,
{
    let endings = [Ending::Completed, Ending::Declined, Ending::ShippingRefused];
    let mut appends = Vec::new();
    for ending in endings {
        appends.push(appends_without_crash(&stores, ending).await);
    }
    let mut rng = StdRng::seed_from_u64(seed);
    for run in 0..runs {
        let which = rng.random_range(0..endings.len());
        let crash_at = rng.random_range(0..appends[which]);
        let mode = if rng.random_bool(0.5) {
            CrashMode::BeforeCommit
        } else {
            CrashMode::AfterCommit
        };
        eprintln!(
            "run {run}: {:?}, crash at append {crash_at} of {}, {mode:?}",
            endings[which], appends[which]
        );
        crash_and_resume(stores().await, endings[which], crash_at, mode).await;
    }
}

/// Generates the scenario and crash-resume tests for one backend.
#[macro_export]
macro_rules! ecommerce_tests {
    ($stores:path, $runs:expr $(, #[$attr:meta])*) => {
        use eventcore_examples::distributed_ecommerce::scenarios::{self, Narrative};

        async fn fresh() -> eventcore_examples::distributed_ecommerce::shop::Shop {
            $crate::ecommerce::shop($stores().await)
        }

        $crate::ecommerce_tests!(@scenario [$($attr),*]
            a_order_completes, b_insufficient_inventory, c_payment_declined,
            d_shipping_fails, e_duplicate_payment_event, f_race_for_the_last_unit,
            g_payment_times_out);

        $(#[$attr])*
        #[tokio::test]
        async fn all_scenarios_in_one_store_then_the_view() {
            let mut shop = fresh().await;
            let mut out = Narrative::quiet();
            scenarios::run_all(&mut shop, &mut out).await.expect("every scenario holds");
            let view = shop.view().await.expect("view");
            let row = |id: &str| {
                let order = &view.orders[id];
                (order.status, order.stock, order.payment, order.shipping)
            };
            assert_eq!(view.orders.len(), 8);
            assert_eq!(row("A-1"), ("completed", "reserved", "captured", "shipped"));
            assert_eq!(row("B-1"), ("cancelled", "-", "-", "-"));
            assert_eq!(row("C-1"), ("cancelled", "released", "declined", "-"));
            assert_eq!(row("D-1"), ("cancelled", "released", "refunded", "-"));
            assert_eq!(row("E-1"), ("completed", "reserved", "captured", "shipped"));
            let won = ("completed", "reserved", "captured", "shipped");
            let lost = ("cancelled", "-", "-", "-");
            assert!(
                (row("F-1") == won && row("F-2") == lost) || (row("F-1") == lost && row("F-2") == won),
                "F-1 {:?}, F-2 {:?}", row("F-1"), row("F-2")
            );
            assert_eq!(row("G-1"), ("cancelled", "released", "refunded", "-"));
            assert!(out.lines().iter().any(|l| l.contains("PaymentRefunded -> StockReleased -> OrderCancelled")));
        }

        $(#[$attr])*
        #[tokio::test(flavor = "current_thread")]
        async fn crash_resume_at_random_points() {
            $crate::ecommerce::crash_resume_seeds($stores, 0x5EED, $runs).await;
        }
    };
    (@scenario [$($attr:meta),*] $name:ident $(, $rest:ident)*) => {
        $(#[$attr])*
        #[tokio::test]
        async fn $name() {
            let mut shop = fresh().await;
            let mut out = Narrative::quiet();
            scenarios::$name(&mut shop, &mut out).await.expect("the scenario holds");
        }

        $crate::ecommerce_tests!(@scenario [$($attr),*] $($rest),*);
    };
    (@scenario [$($attr:meta),*]) => {};
}
