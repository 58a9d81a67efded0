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
use eventcore_examples::distributed_ecommerce::contracts::{
    Address, InventoryEvent, OrderLine, ServiceName, reservation_stream, shipment_stream,
};
use eventcore_examples::distributed_ecommerce::order::OrderStatus;
use eventcore_examples::distributed_ecommerce::payment::FakeGateway;
use eventcore_examples::distributed_ecommerce::scenarios::check_correlation;
use eventcore_examples::distributed_ecommerce::shipping::ShipmentStatus;
use eventcore_examples::distributed_ecommerce::shop::{
    Broker, Environment, PAYMENT_TIMEOUT, Shop, Stores,
};
use eventcore_memory::{InMemoryBroker, InMemoryEventStore};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

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

/// The five services, each over a store made by `stores`, on an in-memory broker and a
/// clock standing at a fixed time, stopping at the first failure of an event (no
/// retries: a crash is a crash).
pub async fn shop<F, Fut>(stores: F) -> Shop
where
    F: Fn() -> Fut,
    Fut: Future<Output = Stores>,
{
    let mut each = Vec::new();
    for _ in ServiceName::ALL {
        each.push(stores().await);
    }
    let env = Environment {
        clock: ManualClock::new(start_time()),
        gateway: Arc::new(FakeGateway::default()),
        policy: ProjectionErrorPolicy::new().with_max_attempts(1),
    };
    Shop::start(each, Broker::in_memory(&InMemoryBroker::new()), env)
        .await
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

/// The life of a process: it works for `crash_at` operations of any of the stores it
/// uses, then crashes on the next one and refuses everything afterwards.
#[derive(Debug)]
pub struct CrashSwitch {
    crash_at: u64,
    mode: CrashMode,
    operations: AtomicU64,
    crashed: AtomicBool,
}

impl CrashSwitch {
    /// A process that dies at operation number `crash_at` (0 for the first).
    pub fn new(crash_at: u64, mode: CrashMode) -> Arc<Self> {
        Arc::new(CrashSwitch {
            crash_at,
            mode,
            operations: AtomicU64::new(0),
            crashed: AtomicBool::new(false),
        })
    }

    /// Operations attempted so far.
    pub fn operations(&self) -> u64 {
        self.operations.load(Ordering::SeqCst)
    }

    /// Whether it crashed.
    pub fn crashed(&self) -> bool {
        self.crashed.load(Ordering::SeqCst)
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

/// An event store and checkpoint store of a process that crashes ([`CrashSwitch`]):
/// reads, appends, checkpoint loads and saves alike count as operations.
pub struct CrashingStore {
    events: Arc<dyn EventStore>,
    checkpoints: Arc<dyn CheckpointStore>,
    switch: Arc<CrashSwitch>,
}

impl std::fmt::Debug for CrashingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrashingStore")
            .field("switch", &self.switch)
            .finish_non_exhaustive()
    }
}

impl CrashingStore {
    /// Stores over `stores` living and dying with `switch`.
    pub fn new(stores: &Stores, switch: &Arc<CrashSwitch>) -> Self {
        CrashingStore {
            events: Arc::clone(&stores.0),
            checkpoints: Arc::clone(&stores.1),
            switch: Arc::clone(switch),
        }
    }

    /// Counts one operation: `Err` if the process is dead or dies now.
    fn operate(&self) -> eventcore::Result<()> {
        match self.switch.step() {
            Step::Alive => Ok(()),
            Step::Dies | Step::Dead => Err(dead()),
        }
    }

    fn step(&self) -> Step {
        self.switch.step()
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
            Step::Dies if self.switch.mode == CrashMode::AfterCommit => {
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

/// Registers the customer, stocks the products and places the order whose saga will end
/// as `ending`.
async fn place(shop: &mut Shop, ending: Ending) -> eventcore::CorrelationId {
    shop.register_user("xan", "Xan", "xan@example.com")
        .await
        .expect("registered");
    shop.settle().await.expect("the profile is made");
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

/// Every service restarted over its store wrapped to live and die with `switch` (the
/// services of one process); returns the stores as they were.
async fn crashing(shop: &mut Shop, switch: &Arc<CrashSwitch>) -> Vec<Stores> {
    let original = shop.stores().to_vec();
    for name in ServiceName::ALL {
        let wrapped = Arc::new(CrashingStore::new(&original[name.index()], switch));
        shop.use_stores(name, (Arc::clone(&wrapped) as _, wrapped as _))
            .await
            .expect("services");
    }
    original
}

/// Every service restarted over `stores`.
async fn restart_over(shop: &mut Shop, stores: Vec<Stores>) {
    for name in ServiceName::ALL {
        shop.use_stores(name, stores[name.index()].clone())
            .await
            .expect("the services restart");
    }
}

/// The operations the services make for `ending` when nothing crashes.
pub async fn operations_without_crash<F, Fut>(stores: F, ending: Ending) -> u64
where
    F: Fn() -> Fut,
    Fut: Future<Output = Stores>,
{
    let mut base = shop(&stores).await;
    place(&mut base, ending).await;
    let counting = CrashSwitch::new(u64::MAX, CrashMode::BeforeCommit);
    crashing(&mut base, &counting).await;
    let opened = counting.operations();
    run_to_the_end(&mut base).await.expect("settles");
    let operations = counting.operations() - opened;
    check_ending(&base, ending).await;
    operations
}

/// Runs the order's saga with the services (all five, as in one process) crashing at
/// operation `crash_at` of any of their stores, starts them again from their stores,
/// and checks the order ends as it should: one charge at most, one reservation per item,
/// each compensation once.
pub async fn crash_and_resume<F, Fut>(stores: F, ending: Ending, crash_at: u64, mode: CrashMode)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Stores>,
{
    let mut base = shop(&stores).await;
    let correlation = place(&mut base, ending).await;
    let switch = CrashSwitch::new(u64::MAX, mode);
    let original = crashing(&mut base, &switch).await;
    // Counted from here: starting the services made operations too.
    let switch_at = switch.operations() + crash_at;
    let switch = CrashSwitch::new(switch_at, mode);
    let _ = crashing(&mut base, &switch).await;
    let first = run_to_the_end(&mut base).await;
    assert!(
        switch.crashed(),
        "operation {crash_at} was never reached ({} made)",
        switch.operations()
    );
    assert!(first.is_err(), "the services did not notice the crash");

    restart_over(&mut base, original).await;
    run_to_the_end(&mut base)
        .await
        .expect("the restarted services settle");
    check_ending(&base, ending).await;
    check_correlation(&base, "crash-resume", "X-1", correlation)
        .await
        .expect("correlation carried");
}

/// How often `event_type` is in `service`'s store.
async fn count(shop: &Shop, service: ServiceName, event_type: &str) -> usize {
    shop.service(service)
        .log()
        .await
        .expect("log")
        .iter()
        .filter(|e| e.event_type.as_str() == event_type)
        .count()
}

/// The final state `ending` must leave, across the services' stores.
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
    let answers = shop
        .service(ServiceName::Inventory)
        .stream(&reservation_stream("X-1").expect("valid"))
        .await
        .expect("answers");
    assert_eq!(answers.len(), 1, "one answer to the reservation request");
    let compensated = ending != Ending::Completed;
    assert_eq!(
        count(shop, ServiceName::Inventory, "StockReleased").await,
        if compensated { LINES.len() } else { 0 },
        "each product released once"
    );
    assert_eq!(
        count(shop, ServiceName::Order, "OrderCancelled").await,
        usize::from(compensated),
        "cancelled once"
    );
    assert_eq!(
        count(shop, ServiceName::Shipping, "ShipmentCreated").await,
        usize::from(ending == Ending::Completed)
    );
    assert_eq!(
        count(shop, ServiceName::Order, "eventcore.SagaStarted").await,
        1,
        "one saga"
    );
    assert_eq!(
        count(shop, ServiceName::Order, "CustomerProfileCreated").await,
        1,
        "one customer profile"
    );
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
                ShipmentStatus::Refused
            );
        }
        Ending::TimedOut => {
            assert_eq!(saga.phase(), SagaPhase::Aborted);
            assert_eq!(order, OrderStatus::Cancelled);
            assert_eq!(payments, ["PaymentRequested", "PaymentVoided"]);
            assert_eq!(charges, 0, "never charged");
            assert_eq!(
                count(shop, ServiceName::Order, "eventcore.SagaStepTimedOut").await,
                1,
                "timed out once"
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
        crash_and_resume(&stores, Ending::ALL[which], crash_at, mode).await;
    }
}

/// A compensation that ran before its step's forward action (a stalled saga instance)
/// leaves a mark that makes the late forward action change nothing, or answer a
/// refusal.
pub async fn late_forward_actions_after_compensation_change_nothing<F, Fut>(stores: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Stores>,
{
    use eventcore_examples::distributed_ecommerce::inventory::{ReleaseStock, ReserveStock};
    use eventcore_examples::distributed_ecommerce::payment::{ProcessPayment, RefundPayment};
    use eventcore_examples::distributed_ecommerce::shipping::{CancelShipment, CreateShipment};

    let mut base = shop(stores).await;
    place(&mut base, Ending::Completed).await;
    let payment = base.service(ServiceName::Payment).executor();
    let inventory = base.service(ServiceName::Inventory).executor();
    let shipping = base.service(ServiceName::Shipping).executor();
    let lines: Vec<OrderLine> = LINES
        .iter()
        .map(|(sku, quantity)| OrderLine {
            sku: (*sku).to_owned(),
            quantity: *quantity,
            unit_price: 1_000,
        })
        .collect();

    payment
        .execute(&RefundPayment::new("X-1").expect("valid"))
        .await
        .expect("voided");
    let late = payment
        .execute(&ProcessPayment::new("X-1", 5_000, "4242-x").expect("valid"))
        .await
        .expect("no-op");
    assert!(
        late.events_written.is_empty(),
        "a voided payment was requested"
    );

    inventory
        .execute(&ReleaseStock::new("X-1", &lines).expect("valid"))
        .await
        .expect("closed");
    inventory
        .execute(&ReserveStock::new("X-1", &lines).expect("valid"))
        .await
        .expect("answered");
    let answers = base
        .service(ServiceName::Inventory)
        .stream(&reservation_stream("X-1").expect("valid"))
        .await
        .expect("answers");
    let refused = answers
        .iter()
        .map(|e| e.decode::<InventoryEvent>().expect("decodes").payload)
        .collect::<Vec<_>>();
    assert!(
        matches!(refused.as_slice(), [InventoryEvent::StockReservationRefused { reason, .. }] if reason.contains("released")),
        "a released reservation was made: {refused:?}"
    );
    for (sku, _) in LINES {
        assert_eq!(base.stock(sku).await.expect("stock").available, 5);
    }

    shipping
        .execute(&CancelShipment::new("X-1").expect("valid"))
        .await
        .expect("stopped");
    let address = Address {
        street: "1 Main Street".to_owned(),
        city: "Somewhere".to_owned(),
        country: "DE".to_owned(),
    };
    shipping
        .execute(&CreateShipment::new("X-1", &address).expect("valid"))
        .await
        .expect("answered");
    let shipment = base
        .service(ServiceName::Shipping)
        .stream(&shipment_stream("X-1").expect("valid"))
        .await
        .expect("shipment");
    let types: Vec<&str> = shipment.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, ["ShipmentCancelled", "ShipmentRefused"]);
}

/// Order ids, customers and skus that would make stream ids too long, or contain
/// control characters, and orders of customers the Order service does not know, are
/// refused by `CreateOrder` before anything is written.
pub async fn bad_order_input_is_refused<F, Fut>(stores: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Stores>,
{
    let mut base = shop(stores).await;
    base.register_user("xan", "Xan", "xan@example.com")
        .await
        .expect("registered");
    base.settle().await.expect("the profile is made");
    let head = base
        .service(ServiceName::Order)
        .store()
        .head_position()
        .await
        .expect("head");
    assert!(head.is_some(), "the profile was made");
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
    for (order, customer, sku) in [
        (long.as_str(), "xan", "lamp"),
        ("ok-1", "xan", "bad\nsku"),
        ("ok-2", "xan", "a/b"),
        ("", "xan", "lamp"),
        ("ok-3", "nobody", "lamp"),
        ("ok-4", "bad customer", "lamp"),
    ] {
        let placed = base
            .place_order(order, customer, vec![line(sku)], "4242-x", address.clone())
            .await;
        assert!(
            matches!(
                placed,
                Err(Error::BusinessRuleViolation(_)) | Err(Error::InvalidStreamId(_))
            ),
            "{order:?}/{customer:?}/{sku:?}: {placed:?}"
        );
    }
    assert_eq!(
        base.service(ServiceName::Order)
            .store()
            .head_position()
            .await
            .expect("head"),
        head
    );
}

/// Generates the scenario and crash-resume tests for one backend.
#[macro_export]
macro_rules! ecommerce_tests {
    ($stores:path, $runs:expr $(, #[$attr:meta])*) => {
        use eventcore_examples::distributed_ecommerce::scenarios::{self, Narrative};

        async fn fresh() -> eventcore_examples::distributed_ecommerce::shop::Shop {
            $crate::ecommerce::shop($stores).await
        }

        $crate::ecommerce_tests!(@scenario [$($attr),*]
            an_order_goes_through_every_service, an_order_short_of_stock_reserves_and_charges_nothing, a_declined_card_releases_the_stock,
            a_refused_shipment_refunds_releases_and_cancels, a_payment_answer_delivered_twice_charges_once, two_orders_racing_for_the_last_unit_sell_it_once,
            a_payment_that_never_answers_is_compensated_at_the_deadline,
            a_gateway_outage_opens_the_circuit_and_the_deadline_compensates,
            a_service_restarted_mid_saga_does_nothing_twice);

        $(#[$attr])*
        #[tokio::test]
        async fn all_scenarios_one_store_per_service_then_the_view() {
            let mut shop = fresh().await;
            let mut out = Narrative::quiet();
            scenarios::run_all(&mut shop, &mut out).await.expect("every scenario holds");
            let view = shop.view().await.expect("view");
            let row = |id: &str| {
                let order = &view.orders[id];
                (order.status, order.stock, order.payment, order.shipping)
            };
            assert_eq!(view.orders.len(), 14);
            assert_eq!(row("A-1"), ("completed", "reserved", "captured", "shipped"));
            assert_eq!(row("B-1"), ("cancelled", "refused", "-", "-"));
            assert_eq!(row("C-1"), ("cancelled", "released", "declined", "-"));
            assert_eq!(row("D-1"), ("cancelled", "released", "refunded", "refused"));
            assert_eq!(row("E-1"), ("completed", "reserved", "captured", "shipped"));
            let won = ("completed", "reserved", "captured", "shipped");
            let lost = ("cancelled", "refused", "-", "-");
            assert!(
                (row("F-1") == won && row("F-2") == lost) || (row("F-1") == lost && row("F-2") == won),
                "F-1 {:?}, F-2 {:?}", row("F-1"), row("F-2")
            );
            assert_eq!(row("G-1"), ("cancelled", "released", "refunded", "-"));
            for id in ["H-1", "H-2", "H-3", "H-4"] {
                assert_eq!(row(id), ("cancelled", "released", "voided", "-"), "{id}");
            }
            assert_eq!(row("H-5"), ("completed", "reserved", "captured", "shipped"));
            assert_eq!(row("I-1"), ("completed", "reserved", "captured", "shipped"));
            assert!(out.lines().iter().any(|l| l.contains("PaymentRefundRequested -> StockReleaseRequested -> OrderCancelled")));
        }

        $(#[$attr])*
        #[tokio::test]
        async fn late_forward_actions_after_compensation_change_nothing() {
            $crate::ecommerce::late_forward_actions_after_compensation_change_nothing($stores).await;
        }

        $(#[$attr])*
        #[tokio::test]
        async fn answers_from_the_wrong_stream_move_nothing() {
            $crate::ecommerce::answers_from_the_wrong_stream_move_nothing($stores).await;
        }

        $(#[$attr])*
        #[tokio::test]
        async fn bad_order_input_is_refused() {
            $crate::ecommerce::bad_order_input_is_refused($stores).await;
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

/// A `PaymentCaptured` naming the order but written on another stream (another
/// service's, or another order's payment) does not answer the saga's payment step; the
/// same answer from the order's own payment stream does.
pub async fn answers_from_the_wrong_stream_move_nothing<F, Fut>(stores: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Stores>,
{
    use eventcore::distributed::{Delivery, DistributedEvent};
    use eventcore::saga::StepStatus;
    use eventcore_examples::distributed_ecommerce::order_saga::steps;

    let mut base = shop(stores).await;
    place(&mut base, Ending::TimedOut).await;
    base.settle().await.expect("settles");
    let running = |saga: &eventcore::saga::SagaState| {
        matches!(
            saga.status_of(steps::PAYMENT),
            Some(StepStatus::Running { .. })
        )
    };
    assert!(
        running(&base.saga("X-1").await.expect("saga")),
        "waiting for the gateway"
    );
    let answer = |stream: &str, position: u64| {
        let recorded = RecordedEvent::new(
            eventcore::EventId::new(),
            StreamId::try_new(stream).expect("valid"),
            eventcore::StreamVersion::new(9),
            GlobalPosition::new(position),
            eventcore::EventType::try_new("PaymentCaptured").expect("valid"),
            eventcore::EventPayload::from_json(
                r#"{"order_id":"X-1","amount":4000,"reference":"forged"}"#,
            )
            .expect("valid"),
            Arc::new(eventcore::EventMetadata::default()),
            Utc::now(),
        );
        let event =
            DistributedEvent::from_recorded(&recorded, &ServiceName::Payment.id(), Utc::now())
                .expect("readable");
        Delivery::new(event, ServiceName::Payment.topic(), position, 1)
    };
    for wrong in ["payment-Y-9", "shipment-X-1", "reservation-X-1"] {
        base.running_mut(ServiceName::Order)
            .redeliver("order-saga", &answer(wrong, 1_000))
            .await
            .expect("handled");
        assert!(
            running(&base.saga("X-1").await.expect("saga")),
            "an answer on {wrong} moved the payment step"
        );
    }
    base.running_mut(ServiceName::Order)
        .redeliver("order-saga", &answer("payment-X-1", 1_001))
        .await
        .expect("handled");
    assert_eq!(
        base.saga("X-1")
            .await
            .expect("saga")
            .status_of(steps::PAYMENT),
        Some(&StepStatus::Succeeded),
        "the answer from the order's payment stream counts"
    );
}
