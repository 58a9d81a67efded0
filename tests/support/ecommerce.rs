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
    IdempotencyKey, LogQuery, ParkedEvent, ProjectionErrorPolicy, RecordedEvent, StreamId,
    StreamsSnapshot,
};
use eventcore_examples::distributed_ecommerce::contracts::{Address, OrderLine};
use eventcore_examples::distributed_ecommerce::order::OrderStatus;
use eventcore_examples::distributed_ecommerce::payment::FakeGateway;
use eventcore_examples::distributed_ecommerce::scenarios::check_correlation;
use eventcore_examples::distributed_ecommerce::shipping::ShipmentStatus;
use eventcore_examples::distributed_ecommerce::shop::{PAYMENT_TIMEOUT, Shop};
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
    Shop::new(
        stores.0,
        stores.1,
        ManualClock::new(start_time()),
        Arc::new(FakeGateway::default()),
        ProjectionErrorPolicy::new().with_max_attempts(1),
    )
    .expect("the services start")
}

/// How the store "crashes" when the operation that crashes is an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashMode {
    /// The append that crashes is not written.
    BeforeCommit,
    /// The append that crashes is written, but its answer is lost.
    AfterCommit,
}

/// An event store and checkpoint store that work for `crash_at` operations (reads,
/// appends, checkpoint loads and saves alike), then crash on the next one and refuse
/// everything afterwards, like a process that died.
pub struct CrashingStore {
    events: Arc<dyn EventStore>,
    checkpoints: Arc<dyn CheckpointStore>,
    crash_at: u64,
    mode: CrashMode,
    operations: AtomicU64,
    crashed: AtomicBool,
}

impl std::fmt::Debug for CrashingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrashingStore")
            .field("crash_at", &self.crash_at)
            .field("mode", &self.mode)
            .field("operations", &self.operations)
            .field("crashed", &self.crashed)
            .finish_non_exhaustive()
    }
}

impl CrashingStore {
    /// Stores over `stores` crashing at operation number `crash_at` (0 for the first).
    pub fn new(stores: &Stores, crash_at: u64, mode: CrashMode) -> Self {
        CrashingStore {
            events: Arc::clone(&stores.0),
            checkpoints: Arc::clone(&stores.1),
            crash_at,
            mode,
            operations: AtomicU64::new(0),
            crashed: AtomicBool::new(false),
        }
    }

    /// Operations attempted so far.
    pub fn operations(&self) -> u64 {
        self.operations.load(Ordering::SeqCst)
    }

    /// Whether it crashed.
    pub fn crashed(&self) -> bool {
        self.crashed.load(Ordering::SeqCst)
    }

    /// Counts one operation: `Err` if the process is dead or dies now.
    fn operate(&self) -> eventcore::Result<()> {
        match self.step() {
            Step::Alive => Ok(()),
            Step::Dies | Step::Dead => Err(dead()),
        }
    }

    fn step(&self) -> Step {
        if self.crashed() {
            return Step::Dead;
        }
        if self.operations.fetch_add(1, Ordering::SeqCst) == self.crash_at {
            self.crashed.store(true, Ordering::SeqCst);
            return Step::Dies;
        }
        Step::Alive
    }
}

enum Step {
    Alive,
    /// This operation is the one the process dies in.
    Dies,
    Dead,
}

fn dead() -> Error {
    Error::permanent_backend("the process crashed", None)
}

#[async_trait]
impl EventStore for CrashingStore {
    async fn read_streams(&self, streams: &[StreamId]) -> eventcore::Result<StreamsSnapshot> {
        self.operate()?;
        self.events.read_streams(streams).await
    }

    async fn append(&self, request: AppendRequest) -> eventcore::Result<AppendOutcome> {
        match self.step() {
            Step::Alive => self.events.append(request).await,
            // Died with this append in flight: it may have committed.
            Step::Dies if self.mode == CrashMode::AfterCommit => {
                let _ = self.events.append(request).await;
                Err(dead())
            }
            Step::Dies | Step::Dead => Err(dead()),
        }
    }

    async fn read_all(&self, query: &LogQuery) -> eventcore::Result<Vec<RecordedEvent>> {
        self.operate()?;
        self.events.read_all(query).await
    }

    async fn head_position(&self) -> eventcore::Result<Option<GlobalPosition>> {
        self.operate()?;
        self.events.head_position().await
    }

    async fn wait_for_events(&self, after: Option<GlobalPosition>) -> eventcore::Result<()> {
        self.operate()?;
        self.events.wait_for_events(after).await
    }

    async fn idempotent_outcome(
        &self,
        key: &IdempotencyKey,
    ) -> eventcore::Result<Option<AppendOutcome>> {
        self.operate()?;
        self.events.idempotent_outcome(key).await
    }
}

#[async_trait]
impl CheckpointStore for CrashingStore {
    async fn load_checkpoint(
        &self,
        projection: &eventcore::ProjectionName,
    ) -> eventcore::Result<Option<GlobalPosition>> {
        self.operate()?;
        self.checkpoints.load_checkpoint(projection).await
    }

    async fn save_checkpoint(
        &self,
        projection: &eventcore::ProjectionName,
        position: GlobalPosition,
    ) -> eventcore::Result<()> {
        self.operate()?;
        self.checkpoints.save_checkpoint(projection, position).await
    }

    async fn reset_checkpoint(
        &self,
        projection: &eventcore::ProjectionName,
    ) -> eventcore::Result<()> {
        self.operate()?;
        self.checkpoints.reset_checkpoint(projection).await
    }

    async fn park(&self, parked: ParkedEvent) -> eventcore::Result<()> {
        self.operate()?;
        self.checkpoints.park(parked).await
    }

    async fn parked(
        &self,
        projection: &eventcore::ProjectionName,
    ) -> eventcore::Result<Vec<ParkedEvent>> {
        self.operate()?;
        self.checkpoints.parked(projection).await
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
    /// The gateway never answers: the deadline passes, voided, released, cancelled.
    TimedOut,
}

impl Ending {
    /// Every ending.
    pub const ALL: [Ending; 4] = [
        Ending::Completed,
        Ending::Declined,
        Ending::ShippingRefused,
        Ending::TimedOut,
    ];
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
        Ending::TimedOut => "4000-x-hang",
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

/// Runs the services to the end of the order: settle, let the payment deadline pass,
/// settle again. Stops at the first failure.
async fn run_to_the_end(shop: &mut Shop) -> eventcore::Result<()> {
    shop.settle().await?;
    shop.clock().set(deadline_passed());
    shop.settle().await?;
    Ok(())
}

/// A time past the payment deadline of an order placed at the shop's start time.
fn deadline_passed() -> chrono::DateTime<Utc> {
    start_time()
        + chrono::Duration::from_std(PAYMENT_TIMEOUT).expect("fits")
        + chrono::Duration::seconds(1)
}

fn start_time() -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 22, 9, 0, 0)
        .single()
        .expect("a valid time")
}

/// The operations the services make for `ending` when nothing crashes.
pub async fn operations_without_crash<F, Fut>(stores: F, ending: Ending) -> u64
where
    F: Fn() -> Fut,
    Fut: Future<Output = Stores>,
{
    let stores = stores().await;
    let base = shop(stores.clone());
    place(&base, ending).await;
    let counting = Arc::new(CrashingStore::new(
        &stores,
        u64::MAX,
        CrashMode::BeforeCommit,
    ));
    let mut services = base
        .with_stores(Arc::clone(&counting) as _, Arc::clone(&counting) as _)
        .expect("services");
    run_to_the_end(&mut services).await.expect("settles");
    let operations = counting.operations();
    check_ending(&services, ending).await;
    operations
}

/// Runs the order's saga with the services crashing at operation `crash_at`, starts them
/// again from the store, and checks the order ends as it should: one charge at most, one
/// reservation per item, each compensation once.
pub async fn crash_and_resume(stores: Stores, ending: Ending, crash_at: u64, mode: CrashMode) {
    let base = shop(stores.clone());
    let correlation = place(&base, ending).await;
    let crashing = Arc::new(CrashingStore::new(&stores, crash_at, mode));
    let mut doomed = base
        .with_stores(Arc::clone(&crashing) as _, Arc::clone(&crashing) as _)
        .expect("services");
    let first = run_to_the_end(&mut doomed).await;
    assert!(
        crashing.crashed(),
        "operation {crash_at} was never reached ({} made)",
        crashing.operations()
    );
    assert!(first.is_err(), "the services did not notice the crash");
    drop(doomed);

    let mut restarted = base.restart().expect("services restart");
    run_to_the_end(&mut restarted)
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
    let log = shop.log().await.expect("log");
    let count = |event_type: &str| {
        log.iter()
            .filter(|e| e.event_type.as_str() == event_type)
            .count()
    };
    let compensated = ending != Ending::Completed;
    assert_eq!(
        count("StockReleased"),
        if compensated { LINES.len() } else { 0 },
        "each product released once"
    );
    assert_eq!(
        count("OrderCancelled"),
        usize::from(compensated),
        "cancelled once"
    );
    assert_eq!(
        count("ShipmentCreated"),
        usize::from(ending == Ending::Completed)
    );
    assert_eq!(count("eventcore.SagaStarted"), 1, "one saga");
    match ending {
        Ending::Completed => {
            assert_eq!(saga.phase(), SagaPhase::Completed);
            assert_eq!(order, OrderStatus::Completed);
            assert_eq!(payments, ["PaymentRequested", "PaymentCaptured"]);
            assert_eq!(charges, 1, "charged once");
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
        }
        Ending::ShippingRefused => {
            assert_eq!(saga.phase(), SagaPhase::Aborted);
            assert_eq!(order, OrderStatus::Cancelled);
            assert_eq!(
                payments,
                ["PaymentRequested", "PaymentCaptured", "PaymentRefunded"]
            );
            assert_eq!(charges, 1, "charged once, refunded once");
            assert_eq!(
                shop.shipment_status("X-1").await.expect("shipment"),
                ShipmentStatus::None
            );
        }
        Ending::TimedOut => {
            assert_eq!(saga.phase(), SagaPhase::Aborted);
            assert_eq!(order, OrderStatus::Cancelled);
            assert_eq!(payments, ["PaymentRequested", "PaymentVoided"]);
            assert_eq!(charges, 0, "never charged");
            assert_eq!(count("eventcore.SagaStepTimedOut"), 1, "timed out once");
        }
    }
}

/// `runs` crash-resume runs with random endings, crash points and modes from `seed`.
pub async fn crash_resume_seeds<F, Fut>(stores: F, seed: u64, runs: u32)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Stores>,
{
    let mut operations = Vec::new();
    for ending in Ending::ALL {
        operations.push(operations_without_crash(&stores, ending).await);
    }
    let mut rng = StdRng::seed_from_u64(seed);
    for run in 0..runs {
        let which = rng.random_range(0..Ending::ALL.len());
        let crash_at = rng.random_range(0..operations[which]);
        let mode = if rng.random_bool(0.5) {
            CrashMode::BeforeCommit
        } else {
            CrashMode::AfterCommit
        };
        eprintln!(
            "run {run}: {:?}, crash at operation {crash_at} of {}, {mode:?}",
            Ending::ALL[which],
            operations[which]
        );
        crash_and_resume(stores().await, Ending::ALL[which], crash_at, mode).await;
    }
}

/// A compensation that ran before its step's forward action (a stalled saga instance)
/// leaves a mark that makes the late forward action change nothing.
pub async fn late_forward_actions_after_compensation_change_nothing(stores: Stores) {
    use eventcore_examples::distributed_ecommerce::inventory::{ReleaseStock, ReserveStock};
    use eventcore_examples::distributed_ecommerce::payment::{ProcessPayment, RefundPayment};
    use eventcore_examples::distributed_ecommerce::shipping::{CancelShipment, CreateShipment};

    let base = shop(stores);
    place(&base, Ending::Completed).await;
    let executor = base.executor();
    let lines: Vec<OrderLine> = LINES
        .iter()
        .map(|(sku, quantity)| OrderLine {
            sku: (*sku).to_owned(),
            quantity: *quantity,
            unit_price: 1_000,
        })
        .collect();

    executor
        .execute(&RefundPayment::new("X-1").expect("valid"))
        .await
        .expect("voided");
    let late = executor
        .execute(&ProcessPayment::new("X-1", 5_000, "4242-x").expect("valid"))
        .await
        .expect("no-op");
    assert!(
        late.events_written.is_empty(),
        "a voided payment was requested"
    );

    executor
        .execute(&ReleaseStock::new("X-1", &lines).expect("valid"))
        .await
        .expect("closed");
    let late = executor
        .execute(&ReserveStock::new("X-1", &lines).expect("valid"))
        .await;
    assert!(
        matches!(late, Err(Error::BusinessRuleViolation(ref reason)) if reason.contains("released")),
        "a released reservation was made: {late:?}"
    );
    for (sku, _) in LINES {
        assert_eq!(base.stock(sku).await.expect("stock").available, 5);
    }

    executor
        .execute(&CancelShipment::new("X-1").expect("valid"))
        .await
        .expect("stopped");
    let address = Address {
        street: "1 Main Street".to_owned(),
        city: "Somewhere".to_owned(),
        country: "DE".to_owned(),
    };
    let late = executor
        .execute(&CreateShipment::new("X-1", &address).expect("valid"))
        .await;
    assert!(
        matches!(late, Err(Error::BusinessRuleViolation(_))),
        "{late:?}"
    );
}

/// Order ids and skus that would make stream ids too long, or contain control
/// characters, are refused by `CreateOrder` before anything is written.
pub async fn bad_order_input_is_refused(stores: Stores) {
    let base = shop(stores);
    let line = |sku: &str| OrderLine {
        sku: sku.to_owned(),
        quantity: 1,
        unit_price: 100,
    };
    let address = Address {
        street: "1 Main Street".to_owned(),
        city: "Somewhere".to_owned(),
        country: "DE".to_owned(),
    };
    let long = "o".repeat(240);
    for (order, sku) in [
        (long.as_str(), "lamp"),
        ("ok-1", "bad\nsku"),
        ("ok-2", "a/b"),
        ("", "lamp"),
    ] {
        let placed = base
            .place_order(order, "xan", vec![line(sku)], "4242-x", address.clone())
            .await;
        assert!(
            matches!(
                placed,
                Err(Error::BusinessRuleViolation(_)) | Err(Error::InvalidStreamId(_))
            ),
            "{order:?}/{sku:?}: {placed:?}"
        );
    }
    assert_eq!(
        base.executor().store().head_position().await.expect("head"),
        None
    );
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
            an_order_goes_through_every_service, an_order_short_of_stock_reserves_and_charges_nothing, a_declined_card_releases_the_stock,
            a_refused_shipment_refunds_releases_and_cancels, a_payment_answer_delivered_twice_charges_once, two_orders_racing_for_the_last_unit_sell_it_once,
            a_payment_that_never_answers_is_compensated_at_the_deadline,
            a_gateway_outage_opens_the_circuit_and_the_deadline_compensates);

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
            assert_eq!(view.orders.len(), 13);
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
            for id in ["H-1", "H-2", "H-3", "H-4"] {
                assert_eq!(row(id), ("cancelled", "released", "voided", "-"), "{id}");
            }
            assert_eq!(row("H-5"), ("completed", "reserved", "captured", "shipped"));
            assert!(out.lines().iter().any(|l| l.contains("PaymentRefunded -> StockReleased -> OrderCancelled")));
        }

        $(#[$attr])*
        #[tokio::test]
        async fn late_forward_actions_after_compensation_change_nothing() {
            $crate::ecommerce::late_forward_actions_after_compensation_change_nothing($stores().await).await;
        }

        $(#[$attr])*
        #[tokio::test]
        async fn bad_order_input_is_refused() {
            $crate::ecommerce::bad_order_input_is_refused($stores().await).await;
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
