//! The scenarios the example narrates and the tests run, each ending with a check of the
//! final state across the services.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use eventcore::circuit_breaker::CircuitState;
use eventcore::distributed::{Delivery, DistributedEvent};
use eventcore::saga::{SagaPhase, StepStatus};
use eventcore::{
    AppendOutcome, AppendRequest, CorrelationId, Error, EventStore, ExecutionOptions,
    GlobalPosition, IdempotencyKey, LogQuery, RecordedEvent, StreamId, StreamsSnapshot,
};
use tokio::sync::Barrier;

use super::contracts::{
    Address, InventoryEvent, OrderLine, PaymentEvent, ServiceName, ShippingEvent, ShopEvent,
    payment_stream, reservation_stream,
};
use super::order::OrderStatus;
use super::order_saga::{OrderSaga, steps};
use super::payment::{GatewayAnswer, PaymentStatus, RecordGatewayAnswer};
use super::shipping::ShipmentStatus;
use super::shop::{INVENTORY_WORKERS, PAYMENT_TIMEOUT, Shop, publication_policy};
use super::view::money;

/// A scenario's outcome did not hold, or the store failed.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// A check of the final state failed.
    #[error("scenario ({scenario}): {message}")]
    Check {
        /// Which scenario.
        scenario: &'static str,
        /// What did not hold.
        message: String,
    },
    /// The store or a command failed.
    #[error(transparent)]
    EventCore(#[from] Error),
}

macro_rules! ensure {
    ($scenario:expr, $condition:expr, $($message:tt)+) => {
        if !$condition {
            return Err(ScenarioError::Check {
                scenario: $scenario,
                message: format!($($message)+),
            });
        }
    };
}

/// Where the narrative goes.
#[derive(Debug, Default)]
pub struct Narrative {
    print: bool,
    lines: Vec<String>,
}

impl Narrative {
    /// A narrative printed as it is told.
    pub fn printing() -> Self {
        Narrative {
            print: true,
            lines: Vec::new(),
        }
    }

    /// A narrative only kept.
    pub fn quiet() -> Self {
        Narrative::default()
    }

    /// Tells one line.
    pub fn say(&mut self, line: impl Into<String>) {
        let line = line.into();
        if self.print {
            println!("{line}");
        }
        self.lines.push(line);
    }

    /// What was told.
    pub fn lines(&self) -> &[String] {
        &self.lines
    }
}

fn line(sku: &str, quantity: u32, unit_price: u64) -> OrderLine {
    OrderLine {
        sku: sku.to_owned(),
        quantity,
        unit_price,
    }
}

fn address(city: &str, country: &str) -> Address {
    Address {
        street: "1 Main Street".to_owned(),
        city: city.to_owned(),
        country: country.to_owned(),
    }
}

fn check_failed(scenario: &'static str, message: impl Into<String>) -> ScenarioError {
    ScenarioError::Check {
        scenario,
        message: message.into(),
    }
}

/// Registers the customers with the User service and lets the Order service learn of
/// them (its `customer-profiles` subscription to `user-events`).
async fn customers(
    shop: &mut Shop,
    out: &mut Narrative,
    ids: &[&str],
) -> Result<(), ScenarioError> {
    for id in ids {
        shop.register_user(
            id,
            &format!("{id} (customer)"),
            &format!("{id}@example.com"),
        )
        .await?;
    }
    shop.settle().await?;
    out.say(format!(
        "    user: {} registered; order keeps a profile of each (from user-events)",
        ids.join(", ")
    ));
    Ok(())
}

async fn tell_saga(shop: &Shop, out: &mut Narrative, order_id: &str) -> Result<(), ScenarioError> {
    out.say(format!(
        "    saga {}/{order_id} (order service):",
        OrderSaga::NAME
    ));
    for entry in shop.saga_history(order_id).await? {
        out.say(format!("      - {entry}"));
    }
    out.say(format!("    published for {order_id}:"));
    for (topic, types) in shop.traffic(order_id).await? {
        out.say(format!("      {topic:<16} {}", types.join(", ")));
    }
    Ok(())
}

/// The order a service event is about, if it is one.
pub fn order_of(event: &RecordedEvent) -> Option<String> {
    let order_id = match event.decode::<ShopEvent>().ok()?.payload {
        ShopEvent::Order(order) => return Some(order.order_id().to_owned()),
        ShopEvent::Inventory(
            InventoryEvent::StockReserved { order_id, .. }
            | InventoryEvent::StockReleased { order_id, .. }
            | InventoryEvent::StockReservationConfirmed { order_id }
            | InventoryEvent::StockReservationRefused { order_id, .. },
        )
        | ShopEvent::Payment(
            PaymentEvent::PaymentRequested { order_id, .. }
            | PaymentEvent::PaymentCaptured { order_id, .. }
            | PaymentEvent::PaymentDeclined { order_id, .. }
            | PaymentEvent::PaymentRefunded { order_id, .. }
            | PaymentEvent::PaymentVoided { order_id },
        )
        | ShopEvent::Shipping(
            ShippingEvent::ShipmentCreated { order_id, .. }
            | ShippingEvent::ShipmentCancelled { order_id }
            | ShippingEvent::ShipmentRefused { order_id, .. },
        ) => order_id,
        ShopEvent::Inventory(InventoryEvent::StockAdded { .. }) | ShopEvent::User(_) => {
            return None;
        }
    };
    Some(order_id)
}

/// Every event of the order's processing, in every service's store, carries the order's
/// correlation id: the events of its order, saga, reservation, payment and shipment
/// streams, and the stock events that name it. Returns how many it checked, and in how
/// many services.
pub async fn check_correlation(
    shop: &Shop,
    scenario: &'static str,
    order_id: &str,
    correlation: CorrelationId,
) -> Result<(usize, usize), ScenarioError> {
    let own = [
        format!("order-{order_id}"),
        format!("reservation-{order_id}"),
        format!("payment-{order_id}"),
        format!("shipment-{order_id}"),
        format!("saga/{}/{order_id}", OrderSaga::NAME),
    ];
    let mut checked = 0;
    let mut services = 0;
    for name in ServiceName::ALL {
        let mut here = 0;
        for event in shop.service(name).log().await? {
            let stream = event.stream_id.as_str();
            let names_order =
                stream.starts_with("product-") && order_of(&event).as_deref() == Some(order_id);
            if own.iter().any(|s| s == stream) || names_order {
                ensure!(
                    scenario,
                    event.metadata.correlation_id == correlation,
                    "{} at {} of {} ({name} service) carries another correlation id",
                    event.event_type.as_str(),
                    event.stream_version,
                    stream
                );
                here += 1;
            }
        }
        checked += here;
        services += usize::from(here > 0);
    }
    Ok((checked, services))
}

/// An order for two products goes through every service.
pub async fn an_order_goes_through_every_service(
    shop: &mut Shop,
    out: &mut Narrative,
) -> Result<(), ScenarioError> {
    const S: &str = "a";
    out.say("(a) An order goes through every service");
    customers(shop, out, &["ada"]).await?;
    shop.add_stock("lamp-a", 5).await?;
    shop.add_stock("rug-a", 3).await?;
    out.say("    inventory: 5 x lamp-a, 3 x rug-a");
    let lines = vec![line("lamp-a", 2, 4_900), line("rug-a", 1, 3_100)];
    let correlation = shop
        .place_order("A-1", "ada", lines, "4242-ada", address("Berlin", "DE"))
        .await?;
    out.say("    order: ada orders A-1: 2 x lamp-a at 49.00, 1 x rug-a at 31.00 (card 4242-ada)");
    shop.settle().await?;
    tell_saga(shop, out, "A-1").await?;

    let order = shop.order_status("A-1").await?;
    ensure!(S, order == OrderStatus::Completed, "order A-1 is {order:?}");
    let saga = shop.saga("A-1").await?;
    ensure!(
        S,
        saga.phase() == SagaPhase::Completed,
        "saga is {:?}",
        saga.phase()
    );
    let lamp = shop.stock("lamp-a").await?;
    let rug = shop.stock("rug-a").await?;
    ensure!(
        S,
        lamp.available == 3 && lamp.held.get("A-1") == Some(&2),
        "lamp-a: {lamp:?}"
    );
    ensure!(
        S,
        rug.available == 2 && rug.held.get("A-1") == Some(&1),
        "rug-a: {rug:?}"
    );
    ensure!(
        S,
        lamp.reservations.get("A-1") == Some(&1),
        "lamp-a reserved more than once"
    );
    let payment = shop.payment_status("A-1").await?;
    ensure!(
        S,
        payment == PaymentStatus::Captured { amount: 12_900 },
        "payment is {payment:?}"
    );
    ensure!(
        S,
        shop.gateway().charges_for("A-1") == 1,
        "charged {} times",
        shop.gateway().charges_for("A-1")
    );
    let shipment = shop.shipment_status("A-1").await?;
    ensure!(
        S,
        shipment == ShipmentStatus::Created,
        "shipment is {shipment:?}"
    );
    let (carried, services) = check_correlation(shop, S, "A-1", correlation).await?;
    ensure!(
        S,
        services == 4,
        "the order's events are in {services} services, not 4"
    );
    out.say(format!(
        "    checked: order completed; 2 lamp-a + 1 rug-a reserved in one write; charged {} once; shipped; \
         all {carried} events in {services} stores carry correlation {correlation}",
        money(12_900)
    ));
    Ok(())
}

/// One product of two is short: nothing is reserved, nothing charged, the order is
/// cancelled.
pub async fn an_order_short_of_stock_reserves_and_charges_nothing(
    shop: &mut Shop,
    out: &mut Narrative,
) -> Result<(), ScenarioError> {
    const S: &str = "b";
    out.say("(b) Insufficient inventory");
    customers(shop, out, &["bob"]).await?;
    shop.add_stock("lamp-b", 5).await?;
    shop.add_stock("rug-b", 1).await?;
    out.say("    inventory: 5 x lamp-b, 1 x rug-b");
    let lines = vec![line("lamp-b", 2, 4_900), line("rug-b", 2, 3_100)];
    let correlation = shop
        .place_order("B-1", "bob", lines, "4242-bob", address("Paris", "FR"))
        .await?;
    out.say("    order: bob orders B-1: 2 x lamp-b, 2 x rug-b");
    shop.settle().await?;
    tell_saga(shop, out, "B-1").await?;

    let order = shop.order_status("B-1").await?;
    ensure!(S, order == OrderStatus::Cancelled, "order B-1 is {order:?}");
    let saga = shop.saga("B-1").await?;
    ensure!(
        S,
        saga.phase() == SagaPhase::Aborted,
        "saga is {:?}",
        saga.phase()
    );
    ensure!(
        S,
        matches!(saga.status_of(steps::RESERVE_STOCK), Some(StepStatus::Failed(reason)) if reason.contains("rug-b")),
        "reserve-stock is {:?}",
        saga.status_of(steps::RESERVE_STOCK)
    );
    let lamp = shop.stock("lamp-b").await?;
    ensure!(
        S,
        lamp.available == 5 && lamp.held.is_empty(),
        "lamp-b was touched: {lamp:?}"
    );
    let payment = shop.payment_status("B-1").await?;
    ensure!(S, payment == PaymentStatus::None, "payment is {payment:?}");
    ensure!(S, shop.gateway().charges_for("B-1") == 0, "B-1 was charged");
    check_correlation(shop, S, "B-1", correlation).await?;
    out.say("    checked: order cancelled; lamp-b untouched (all or nothing); no payment asked, nothing charged");
    Ok(())
}

/// The card is declined: the stock is released and the order cancelled.
pub async fn a_declined_card_releases_the_stock(
    shop: &mut Shop,
    out: &mut Narrative,
) -> Result<(), ScenarioError> {
    const S: &str = "c";
    out.say("(c) Payment declined");
    customers(shop, out, &["cy"]).await?;
    shop.add_stock("lamp-c", 2).await?;
    let correlation = shop
        .place_order(
            "C-1",
            "cy",
            vec![line("lamp-c", 1, 4_900)],
            "4000-cy-decline",
            address("Lyon", "FR"),
        )
        .await?;
    out.say("    order: cy orders C-1: 1 x lamp-c (card 4000-cy-decline)");
    shop.settle().await?;
    tell_saga(shop, out, "C-1").await?;

    let payment = shop.payment_status("C-1").await?;
    ensure!(
        S,
        matches!(payment, PaymentStatus::Declined { .. }),
        "payment is {payment:?}"
    );
    let lamp = shop.stock("lamp-c").await?;
    ensure!(
        S,
        lamp.available == 2 && lamp.held.get("C-1") == Some(&0),
        "lamp-c: {lamp:?}"
    );
    let order = shop.order_status("C-1").await?;
    ensure!(S, order == OrderStatus::Cancelled, "order C-1 is {order:?}");
    ensure!(S, shop.gateway().charges_for("C-1") == 0, "C-1 was charged");
    let saga = shop.saga("C-1").await?;
    ensure!(
        S,
        saga.phase() == SagaPhase::Aborted,
        "saga is {:?}",
        saga.phase()
    );
    check_correlation(shop, S, "C-1", correlation).await?;
    out.say("    checked: payment declined; stock released; order cancelled; nothing charged");
    Ok(())
}

/// Shipping is refused after the payment: refund, release, cancel, asked in that order,
/// each done once by the service that owns it.
pub async fn a_refused_shipment_refunds_releases_and_cancels(
    shop: &mut Shop,
    out: &mut Narrative,
) -> Result<(), ScenarioError> {
    const S: &str = "d";
    out.say("(d) Shipping fails after payment");
    customers(shop, out, &["dee"]).await?;
    shop.add_stock("lamp-d", 2).await?;
    let correlation = shop
        .place_order(
            "D-1",
            "dee",
            vec![line("lamp-d", 1, 4_900)],
            "4242-dee",
            address("McMurdo", "AQ"),
        )
        .await?;
    out.say("    order: dee orders D-1: 1 x lamp-d, to be shipped to Antarctica (no carrier)");
    shop.settle().await?;
    tell_saga(shop, out, "D-1").await?;

    let payment = shop.payment_status("D-1").await?;
    ensure!(
        S,
        payment == PaymentStatus::Refunded,
        "payment is {payment:?}"
    );
    let lamp = shop.stock("lamp-d").await?;
    ensure!(
        S,
        lamp.available == 2 && lamp.held.get("D-1") == Some(&0),
        "lamp-d: {lamp:?}"
    );
    let order = shop.order_status("D-1").await?;
    ensure!(S, order == OrderStatus::Cancelled, "order D-1 is {order:?}");
    let shipment = shop.shipment_status("D-1").await?;
    ensure!(
        S,
        shipment == ShipmentStatus::Refused,
        "shipment is {shipment:?}"
    );
    // The requests, in the order the saga wrote them on the order's stream.
    let requests = shop.requests("D-1").await?;
    ensure!(
        S,
        requests
            == [
                "StockReservationRequested",
                "PaymentProcessingRequested",
                "ShipmentRequested",
                "PaymentRefundRequested",
                "StockReleaseRequested",
                "OrderCancelled"
            ],
        "the saga asked {requests:?}"
    );
    let undo = &requests[3..];
    // Each compensation done once, by its own service.
    let refunds = shop
        .payment_events("D-1")
        .await?
        .iter()
        .filter(|t| *t == "PaymentRefunded")
        .count();
    ensure!(S, refunds == 1, "{refunds} refunds");
    let releases = shop
        .service(ServiceName::Inventory)
        .log()
        .await?
        .iter()
        .filter(|e| {
            e.event_type.as_str() == "StockReleased" && order_of(e).as_deref() == Some("D-1")
        })
        .count();
    ensure!(S, releases == 1, "{releases} releases");
    check_correlation(shop, S, "D-1", correlation).await?;
    out.say(format!(
        "    checked: compensated in reverse order: {}; each done once by its service",
        undo.join(" -> ")
    ));
    Ok(())
}

/// The published events of `from` as the broker delivers them, again (attempt 2).
async fn published_again(shop: &Shop, from: ServiceName) -> Result<Vec<Delivery>, ScenarioError> {
    let policy = publication_policy(from)?;
    let mut deliveries = Vec::new();
    for event in shop.service(from).log().await? {
        if let Some(topic) = policy.topic_of(&event) {
            let envelope = DistributedEvent::from_recorded(&event, &from.id(), chrono::Utc::now())?;
            deliveries.push(Delivery::new(
                envelope,
                topic.clone(),
                event.global_position.value(),
                2,
            ));
        }
    }
    Ok(deliveries)
}

/// Every service's store head.
async fn heads(shop: &Shop) -> Result<Vec<Option<GlobalPosition>>, ScenarioError> {
    let mut heads = Vec::new();
    for name in ServiceName::ALL {
        heads.push(shop.service(name).store().head_position().await?);
    }
    Ok(heads)
}

/// The gateway's answer is delivered twice; then every event the Payment service
/// published is delivered to the Order service again; then the Order and Payment
/// services lose their checkpoints and handle and publish everything again: charged
/// once, nothing written twice anywhere.
pub async fn a_payment_answer_delivered_twice_charges_once(
    shop: &mut Shop,
    out: &mut Narrative,
) -> Result<(), ScenarioError> {
    const S: &str = "e";
    out.say("(e) The same payment event delivered twice");
    customers(shop, out, &["eve"]).await?;
    shop.add_stock("lamp-e", 2).await?;
    let correlation = shop
        .place_order(
            "E-1",
            "eve",
            vec![line("lamp-e", 1, 4_900)],
            "4242-eve",
            address("Utrecht", "NL"),
        )
        .await?;
    shop.settle().await?;
    out.say("    eve's order E-1 completed; the gateway now calls the payment service back a second time");
    let captured = shop
        .service(ServiceName::Payment)
        .stream(&payment_stream("E-1")?)
        .await?
        .into_iter()
        .find(|e| e.event_type.as_str() == "PaymentCaptured")
        .ok_or_else(|| check_failed(S, "no PaymentCaptured"))?;
    let PaymentEvent::PaymentCaptured { reference, .. } =
        captured.decode::<PaymentEvent>()?.payload
    else {
        return Err(check_failed(S, "not a capture"));
    };
    let again = RecordGatewayAnswer {
        payment: payment_stream("E-1")?,
        order_id: "E-1".to_owned(),
        answer: GatewayAnswer::Approved { reference },
    };
    let repeated = shop
        .service(ServiceName::Payment)
        .executor()
        .execute_with(
            &again,
            ExecutionOptions::new().with_correlation_id(correlation),
        )
        .await?;
    ensure!(
        S,
        repeated.events_written.is_empty(),
        "the repeated answer wrote {:?}",
        repeated.events_written
    );

    let before = heads(shop).await?;
    let deliveries = published_again(shop, ServiceName::Payment).await?;
    out.say(format!(
        "    the broker delivers all {} payment-events to the order service's saga again",
        deliveries.len()
    ));
    for delivery in &deliveries {
        shop.running_mut(ServiceName::Order)
            .redeliver("order-saga", delivery)
            .await?;
    }
    ensure!(
        S,
        heads(shop).await? == before,
        "the redelivered answers wrote events"
    );

    out.say("    then the order and payment services lose their checkpoints (saga, gateway adapter, publishers) and restart");
    let calls = shop.gateway().calls();
    for name in [ServiceName::Order, ServiceName::Payment] {
        shop.running(name).forget_checkpoints().await?;
        shop.restart_service(name).await?;
    }
    let handled = shop.settle().await?;
    ensure!(
        S,
        heads(shop).await? == before,
        "handling everything again wrote events: {before:?} -> {:?}",
        heads(shop).await?
    );
    // The adapter handled the request again, found the payment captured, and did not
    // call the gateway.
    ensure!(
        S,
        shop.gateway().calls() == calls,
        "the gateway adapter called the gateway again for a captured payment"
    );
    ensure!(
        S,
        shop.gateway().charges_for("E-1") == 1,
        "E-1 charged {} times",
        shop.gateway().charges_for("E-1")
    );
    let payments = shop.payment_events("E-1").await?;
    ensure!(
        S,
        payments == ["PaymentRequested", "PaymentCaptured"],
        "payment stream: {payments:?}"
    );
    let order = shop.order_status("E-1").await?;
    ensure!(S, order == OrderStatus::Completed, "order E-1 is {order:?}");
    check_correlation(shop, S, "E-1", correlation).await?;
    out.say(format!(
        "    checked: {} deliveries and {handled} events handled again (the publishers resumed from what \
         the broker holds: nothing published twice), 0 events written in any store; the gateway was not \
         called again, and charged once",
        deliveries.len()
    ));
    Ok(())
}

/// A store whose first `gated` reads of product streams wait for each other before
/// answering, so that concurrent reservations are guaranteed to decide on the same
/// versions; it counts the product reads.
pub struct RaceGate {
    inner: Arc<dyn EventStore>,
    gated: AtomicUsize,
    reads: AtomicUsize,
    barrier: Barrier,
}

impl std::fmt::Debug for RaceGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaceGate")
            .field("gated", &self.gated)
            .field("reads", &self.reads)
            .finish_non_exhaustive()
    }
}

impl RaceGate {
    /// The first `racers` product reads of `inner` meet before any returns.
    pub fn new(inner: Arc<dyn EventStore>, racers: usize) -> Self {
        RaceGate {
            inner,
            gated: AtomicUsize::new(racers),
            reads: AtomicUsize::new(0),
            barrier: Barrier::new(racers),
        }
    }

    /// Reads of product streams so far.
    pub fn reads(&self) -> usize {
        self.reads.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl EventStore for RaceGate {
    async fn read_streams(&self, streams: &[StreamId]) -> eventcore::Result<StreamsSnapshot> {
        let snapshot = self.inner.read_streams(streams).await?;
        if !streams.iter().any(|s| s.as_str().starts_with("product-")) {
            return Ok(snapshot);
        }
        self.reads.fetch_add(1, Ordering::SeqCst);
        let gated = self
            .gated
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if gated {
            self.barrier.wait().await;
        }
        Ok(snapshot)
    }

    async fn append(&self, request: AppendRequest) -> eventcore::Result<AppendOutcome> {
        self.inner.append(request).await
    }

    async fn read_all(&self, query: &LogQuery) -> eventcore::Result<Vec<RecordedEvent>> {
        self.inner.read_all(query).await
    }

    async fn head_position(&self) -> eventcore::Result<Option<GlobalPosition>> {
        self.inner.head_position().await
    }

    async fn wait_for_events(&self, after: Option<GlobalPosition>) -> eventcore::Result<()> {
        self.inner.wait_for_events(after).await
    }

    async fn idempotent_outcome(
        &self,
        key: &IdempotencyKey,
    ) -> eventcore::Result<Option<AppendOutcome>> {
        self.inner.idempotent_outcome(key).await
    }
}

/// The Inventory service's answers to the order's reservation request.
async fn reservation_answers(
    shop: &Shop,
    order: &str,
) -> Result<Vec<InventoryEvent>, ScenarioError> {
    let stream = reservation_stream(order)?;
    let events = shop.service(ServiceName::Inventory).stream(&stream).await?;
    Ok(events
        .iter()
        .map(|e| e.decode::<InventoryEvent>().map(|d| d.payload))
        .collect::<eventcore::Result<_>>()?)
}

/// Two orders race for the last unit: the Inventory service's two workers (one per
/// partition of its subscription) reserve at the same instant; both read the same stock,
/// one write wins, the other conflicts, reads again and is refused.
pub async fn two_orders_racing_for_the_last_unit_sell_it_once(
    shop: &mut Shop,
    out: &mut Narrative,
) -> Result<(), ScenarioError> {
    const S: &str = "f";
    out.say("(f) Two orders race for the last unit");
    // F-1 and F-2 fall in different partitions of the Inventory service's subscription.
    let partitions = eventcore::distributed::Partition::all(INVENTORY_WORKERS)
        .map_err(|e| check_failed(S, e.to_string()))?;
    let partition_of = |order: &str| -> Result<usize, ScenarioError> {
        let stream = super::contracts::order_stream(order)?;
        partitions
            .iter()
            .position(|p| p.contains(&stream))
            .ok_or_else(|| check_failed(S, "in no partition"))
    };
    ensure!(
        S,
        partition_of("F-1")? != partition_of("F-2")?,
        "F-1 and F-2 are handled by the same inventory worker"
    );
    customers(shop, out, &["fay", "gus"]).await?;
    shop.add_stock("lamp-f", 1).await?;
    let (events, checkpoints) = shop.stores()[ServiceName::Inventory.index()].clone();
    let gate = Arc::new(RaceGate::new(Arc::clone(&events), 2));
    shop.use_stores(
        ServiceName::Inventory,
        (
            Arc::clone(&gate) as Arc<dyn EventStore>,
            Arc::clone(&checkpoints),
        ),
    )
    .await?;
    let first = shop
        .place_order(
            "F-1",
            "fay",
            vec![line("lamp-f", 1, 4_900)],
            "4242-fay",
            address("Malmo", "SE"),
        )
        .await?;
    let second = shop
        .place_order(
            "F-2",
            "gus",
            vec![line("lamp-f", 1, 4_900)],
            "4242-gus",
            address("Boston", "US"),
        )
        .await?;
    out.say("    1 x lamp-f in stock; fay (F-1) and gus (F-2) both order it; the two inventory workers reserve at the same instant");
    shop.settle().await?;
    shop.use_stores(ServiceName::Inventory, (events, checkpoints))
        .await?;
    let (a, b) = (
        reservation_answers(shop, "F-1").await?,
        reservation_answers(shop, "F-2").await?,
    );
    let confirmed = |answers: &[InventoryEvent]| {
        matches!(answers, [InventoryEvent::StockReservationConfirmed { .. }])
    };
    let refused = |answers: &[InventoryEvent]| matches!(answers, [InventoryEvent::StockReservationRefused { reason, .. }] if reason.contains("insufficient"));
    let (winner, loser) = if confirmed(&a) && refused(&b) {
        ("F-1", "F-2")
    } else if confirmed(&b) && refused(&a) {
        ("F-2", "F-1")
    } else {
        return Err(check_failed(
            S,
            format!("not exactly one winner: {a:?} / {b:?}"),
        ));
    };
    ensure!(
        S,
        gate.reads() >= 3,
        "{} product reads: the loser did not read again after the conflict",
        gate.reads()
    );
    out.say(format!(
        "    {winner} got the unit; {loser}'s reservation conflicted, was read again and refused ({} product reads)",
        gate.reads()
    ));
    tell_saga(shop, out, loser).await?;

    let won = shop.order_status(winner).await?;
    let lost = shop.order_status(loser).await?;
    ensure!(
        S,
        won == OrderStatus::Completed,
        "winner {winner} is {won:?}"
    );
    ensure!(
        S,
        lost == OrderStatus::Cancelled,
        "loser {loser} is {lost:?}"
    );
    let lamp = shop.stock("lamp-f").await?;
    ensure!(
        S,
        lamp.available == 0,
        "lamp-f available {}",
        lamp.available
    );
    let total_reservations: u32 = lamp.reservations.values().sum();
    ensure!(
        S,
        total_reservations == 1 && lamp.reservations.get(winner) == Some(&1),
        "reservations: {:?}",
        lamp.reservations
    );
    ensure!(
        S,
        shop.gateway().charges_for(loser) == 0,
        "{loser} was charged"
    );
    let (winner_correlation, loser_correlation) = if winner == "F-1" {
        (first, second)
    } else {
        (second, first)
    };
    check_correlation(shop, S, winner, winner_correlation).await?;
    check_correlation(shop, S, loser, loser_correlation).await?;
    out.say(format!("    checked: stock 0, exactly one reservation ({winner}); {winner} completed, {loser} cancelled and not charged"));
    Ok(())
}

/// The gateway never answers: at the deadline the saga compensates; the gateway's
/// answer, when it comes after all, is paid back.
pub async fn a_payment_that_never_answers_is_compensated_at_the_deadline(
    shop: &mut Shop,
    out: &mut Narrative,
) -> Result<(), ScenarioError> {
    const S: &str = "g";
    out.say("(g) A payment step that never answers");
    customers(shop, out, &["hal"]).await?;
    shop.add_stock("lamp-g", 2).await?;
    let correlation = shop
        .place_order(
            "G-1",
            "hal",
            vec![line("lamp-g", 1, 4_900)],
            "4000-hal-hang",
            address("Hamburg", "DE"),
        )
        .await?;
    out.say("    order: hal orders G-1 (card 4000-hal-hang: the gateway never answers)");
    shop.settle().await?;
    let saga = shop.saga("G-1").await?;
    ensure!(
        S,
        matches!(
            saga.status_of(steps::PAYMENT),
            Some(StepStatus::Running { deadline: Some(_) })
        ),
        "payment step is {:?}",
        saga.status_of(steps::PAYMENT)
    );
    ensure!(
        S,
        shop.order_status("G-1").await? == OrderStatus::Pending,
        "order not pending while waiting"
    );
    ensure!(
        S,
        shop.pending_deadlines() == 1,
        "{} deadlines pending",
        shop.pending_deadlines()
    );

    // Every service restarts in between: the deadline comes back from the order
    // service's store.
    shop.restart().await?;
    shop.clock()
        .advance(PAYMENT_TIMEOUT + Duration::from_secs(1));
    out.say(format!(
        "    every service restarts; the clock moves {} s on, past the deadline",
        (PAYMENT_TIMEOUT + Duration::from_secs(1)).as_secs()
    ));
    shop.settle().await?;
    tell_saga(shop, out, "G-1").await?;
    let saga = shop.saga("G-1").await?;
    ensure!(
        S,
        saga.phase() == SagaPhase::Aborted,
        "saga is {:?}",
        saga.phase()
    );
    ensure!(
        S,
        saga.status_of(steps::PAYMENT) == Some(&StepStatus::Compensated),
        "payment step is {:?}",
        saga.status_of(steps::PAYMENT)
    );
    let payment = shop.payment_status("G-1").await?;
    ensure!(
        S,
        matches!(payment, PaymentStatus::Voided { .. }),
        "payment is {payment:?}"
    );
    let lamp = shop.stock("lamp-g").await?;
    ensure!(
        S,
        lamp.available == 2 && lamp.held.get("G-1") == Some(&0),
        "lamp-g: {lamp:?}"
    );
    ensure!(
        S,
        shop.order_status("G-1").await? == OrderStatus::Cancelled,
        "order not cancelled"
    );

    // The gateway's answer arrives after all.
    let requested = shop
        .service(ServiceName::Payment)
        .stream(&payment_stream("G-1")?)
        .await?
        .into_iter()
        .find(|e| e.event_type.as_str() == "PaymentRequested")
        .ok_or_else(|| check_failed(S, "no PaymentRequested"))?;
    let answer = shop
        .gateway()
        .capture(&requested.event_id.to_string(), "G-1", 4_900);
    let late = RecordGatewayAnswer {
        payment: payment_stream("G-1")?,
        order_id: "G-1".to_owned(),
        answer,
    };
    shop.service(ServiceName::Payment)
        .executor()
        .execute_with(
            &late,
            ExecutionOptions::new().with_correlation_id(correlation),
        )
        .await?;
    let history = shop.saga_history("G-1").await?.len();
    shop.settle().await?;
    out.say("    much later the gateway charges the card after all; its answer is recorded and paid back");
    let payments = shop.payment_events("G-1").await?;
    ensure!(
        S,
        payments
            == [
                "PaymentRequested",
                "PaymentVoided",
                "PaymentCaptured",
                "PaymentRefunded"
            ],
        "payment stream: {payments:?}"
    );
    ensure!(
        S,
        shop.saga_history("G-1").await?.len() == history,
        "the late answer moved the aborted saga"
    );
    ensure!(
        S,
        shop.order_status("G-1").await? == OrderStatus::Cancelled,
        "order not cancelled"
    );
    check_correlation(shop, S, "G-1", correlation).await?;
    out.say("    checked: timed out, voided, stock released, order cancelled; the late charge (published again) moved nothing and was refunded");
    Ok(())
}

/// The card gateway is down: the adapter's circuit opens after three failed calls and
/// the next payment is not even asked for; at the deadline the saga compensates every
/// order; when the gateway is back, the first call is the circuit's trial, and it
/// closes.
pub async fn a_gateway_outage_opens_the_circuit_and_the_deadline_compensates(
    shop: &mut Shop,
    out: &mut Narrative,
) -> Result<(), ScenarioError> {
    const S: &str = "h";
    const DOWN: [&str; 4] = ["H-1", "H-2", "H-3", "H-4"];
    out.say("(h) The card gateway goes down");
    customers(shop, out, &["ivy-0", "ivy-1", "ivy-2", "ivy-3", "jo"]).await?;
    shop.add_stock("lamp-h", 10).await?;
    shop.gateway().set_available(false);
    let calls = shop.gateway().calls();
    let threshold = shop.gateway_breaker()?.config().failure_threshold();
    let mut correlations = Vec::new();
    for (n, order_id) in DOWN.into_iter().enumerate() {
        let customer = format!("ivy-{n}");
        let correlation = shop
            .place_order(
                order_id,
                &customer,
                vec![line("lamp-h", 1, 2_500)],
                &format!("4242-{customer}"),
                address("Stockholm", "SE"),
            )
            .await?;
        correlations.push(correlation);
    }
    out.say("    the gateway is down; ivy-0 to ivy-3 order H-1 to H-4");
    shop.settle().await?;
    let called = shop.gateway().calls() - calls;
    ensure!(
        S,
        called == u64::from(threshold),
        "the gateway was called {called} times, not {threshold}"
    );
    let state = shop.gateway_breaker()?.state();
    ensure!(S, state == CircuitState::Open, "the circuit is {state}");
    for order_id in DOWN {
        let payment = shop.payment_status(order_id).await?;
        ensure!(
            S,
            matches!(payment, PaymentStatus::Requested { .. }),
            "{order_id}: payment is {payment:?}"
        );
    }
    out.say(format!(
        "    payment: {threshold} calls fail, the circuit opens, H-4's payment is not even asked for"
    ));

    shop.clock()
        .advance(PAYMENT_TIMEOUT + Duration::from_secs(1));
    shop.settle().await?;
    for (order_id, correlation) in DOWN.into_iter().zip(correlations) {
        let saga = shop.saga(order_id).await?;
        ensure!(
            S,
            saga.phase() == SagaPhase::Aborted,
            "{order_id}: saga is {:?}",
            saga.phase()
        );
        let payment = shop.payment_status(order_id).await?;
        ensure!(
            S,
            matches!(payment, PaymentStatus::Voided { .. }),
            "{order_id}: payment is {payment:?}"
        );
        ensure!(
            S,
            shop.order_status(order_id).await? == OrderStatus::Cancelled,
            "{order_id}: order not cancelled"
        );
        ensure!(
            S,
            shop.gateway().charges_for(order_id) == 0,
            "{order_id} was charged"
        );
        check_correlation(shop, S, order_id, correlation).await?;
    }
    let lamp = shop.stock("lamp-h").await?;
    ensure!(S, lamp.available == 10, "lamp-h: {lamp:?}");
    out.say(format!(
        "    {} s later the deadlines pass: every payment voided, the stock released, the orders cancelled",
        (PAYMENT_TIMEOUT + Duration::from_secs(1)).as_secs()
    ));

    shop.gateway().set_available(true);
    let calls = shop.gateway().calls();
    shop.place_order(
        "H-5",
        "jo",
        vec![line("lamp-h", 1, 2_500)],
        "4242-jo",
        address("Stockholm", "SE"),
    )
    .await?;
    shop.settle().await?;
    let state = shop.gateway_breaker()?.state();
    ensure!(S, state == CircuitState::Closed, "the circuit is {state}");
    ensure!(
        S,
        shop.gateway().calls() - calls == 1,
        "the trial was not one call"
    );
    ensure!(
        S,
        shop.order_status("H-5").await? == OrderStatus::Completed,
        "H-5 not completed"
    );
    ensure!(
        S,
        shop.gateway().charges_for("H-5") == 1,
        "H-5 charged {} times",
        shop.gateway().charges_for("H-5")
    );
    out.say("    the gateway is back: jo's H-5 is the circuit's trial call; it is charged, and the circuit closes");
    Ok(())
}

/// A store that works until an append writes a product stream, commits that append,
/// and then fails it and everything after, like a process that died right after its
/// write (before it could acknowledge the delivery that caused it).
pub struct DiesAfterReserving {
    inner: Arc<dyn EventStore>,
    dead: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for DiesAfterReserving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiesAfterReserving")
            .field("dead", &self.dead)
            .finish_non_exhaustive()
    }
}

impl DiesAfterReserving {
    /// Over `inner`.
    pub fn new(inner: Arc<dyn EventStore>) -> Self {
        DiesAfterReserving {
            inner,
            dead: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn alive(&self) -> eventcore::Result<()> {
        if self.dead.load(Ordering::SeqCst) {
            return Err(Error::retryable_backend("the inventory process died", None));
        }
        Ok(())
    }

    /// Whether it died.
    pub fn died(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl EventStore for DiesAfterReserving {
    async fn read_streams(&self, streams: &[StreamId]) -> eventcore::Result<StreamsSnapshot> {
        self.alive()?;
        self.inner.read_streams(streams).await
    }

    async fn append(&self, request: AppendRequest) -> eventcore::Result<AppendOutcome> {
        self.alive()?;
        let reserving = request
            .streams
            .iter()
            .any(|s| !s.events.is_empty() && s.stream_id.as_str().starts_with("product-"));
        let outcome = self.inner.append(request).await?;
        if reserving {
            self.dead.store(true, Ordering::SeqCst);
            return Err(Error::retryable_backend("the inventory process died", None));
        }
        Ok(outcome)
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

/// The Inventory service dies right after reserving an order's stock, before it
/// acknowledged the request. Restarted, it gets the request again (still unacknowledged
/// at the broker) and reserves nothing twice; the saga completes.
pub async fn a_service_restarted_mid_saga_does_nothing_twice(
    shop: &mut Shop,
    out: &mut Narrative,
) -> Result<(), ScenarioError> {
    const S: &str = "i";
    out.say("(i) The Inventory service dies in the middle of a saga");
    customers(shop, out, &["kim"]).await?;
    shop.add_stock("lamp-i", 3).await?;
    let (events, checkpoints) = shop.stores()[ServiceName::Inventory.index()].clone();
    let dying = Arc::new(DiesAfterReserving::new(Arc::clone(&events)));
    shop.use_stores(
        ServiceName::Inventory,
        (
            Arc::clone(&dying) as Arc<dyn EventStore>,
            Arc::clone(&checkpoints),
        ),
    )
    .await?;
    let correlation = shop
        .place_order(
            "I-1",
            "kim",
            vec![line("lamp-i", 2, 1_500)],
            "4242-kim",
            address("Utrecht", "NL"),
        )
        .await?;
    out.say("    order: kim orders I-1: 2 x lamp-i");
    let crashed = shop.settle().await;
    ensure!(
        S,
        crashed.is_err() && dying.died(),
        "the inventory service did not die: {crashed:?}"
    );
    // Still held for the Inventory service at the broker: not acknowledged.
    let spec = super::shop::subscription(
        ServiceName::Inventory,
        "order-requests",
        &[ServiceName::Order],
    )?;
    let mut unacknowledged = 0;
    for partition in spec
        .split(INVENTORY_WORKERS)
        .map_err(|e| check_failed(S, e.to_string()))?
    {
        let backlog = shop
            .broker()
            .subscriber()
            .backlog(&partition)
            .await
            .map_err(Error::from)?;
        unacknowledged += backlog.map_or(0, |b| b.events);
    }
    ensure!(
        S,
        unacknowledged >= 1,
        "the request was acknowledged before the inventory service died"
    );
    shop.use_stores(ServiceName::Inventory, (events, checkpoints))
        .await?;
    let held = shop.stock("lamp-i").await?;
    ensure!(
        S,
        held.held.get("I-1") == Some(&2),
        "the reservation was not written before the crash: {held:?}"
    );
    out.say("    inventory: wrote the reservation, then died before acknowledging the request");
    out.say("    inventory restarts over its store; the broker delivers the request again");
    let redelivered = shop.settle().await?;
    ensure!(S, redelivered > 0, "nothing was delivered again");
    tell_saga(shop, out, "I-1").await?;
    let lamp = shop.stock("lamp-i").await?;
    ensure!(
        S,
        lamp.reservations.get("I-1") == Some(&1) && lamp.available == 1,
        "lamp-i: {lamp:?}"
    );
    let answers = shop
        .service(ServiceName::Inventory)
        .stream(&reservation_stream("I-1")?)
        .await?
        .len();
    ensure!(
        S,
        answers == 1,
        "{answers} answers to one reservation request"
    );
    ensure!(
        S,
        shop.order_status("I-1").await? == OrderStatus::Completed,
        "order I-1 not completed"
    );
    ensure!(
        S,
        shop.gateway().charges_for("I-1") == 1,
        "I-1 charged {} times",
        shop.gateway().charges_for("I-1")
    );
    check_correlation(shop, S, "I-1", correlation).await?;
    out.say("    checked: reserved once, answered once, charged once, completed");
    Ok(())
}

/// Every scenario in turn on one shop, then the order view.
pub async fn run_all(shop: &mut Shop, out: &mut Narrative) -> Result<(), ScenarioError> {
    an_order_goes_through_every_service(shop, out).await?;
    out.say("");
    an_order_short_of_stock_reserves_and_charges_nothing(shop, out).await?;
    out.say("");
    a_declined_card_releases_the_stock(shop, out).await?;
    out.say("");
    a_refused_shipment_refunds_releases_and_cancels(shop, out).await?;
    out.say("");
    a_payment_answer_delivered_twice_charges_once(shop, out).await?;
    out.say("");
    two_orders_racing_for_the_last_unit_sell_it_once(shop, out).await?;
    out.say("");
    a_payment_that_never_answers_is_compensated_at_the_deadline(shop, out).await?;
    out.say("");
    a_gateway_outage_opens_the_circuit_and_the_deadline_compensates(shop, out).await?;
    out.say("");
    a_service_restarted_mid_saga_does_nothing_twice(shop, out).await?;
    out.say("");
    out.say("Order view (the storefront's projection of what the Order, Inventory, Payment and Shipping services published):");
    let view = shop.view().await?.clone();
    for row in view.to_string().lines() {
        out.say(row.to_owned());
    }
    out.say("");
    sales_report_sees_no_personal_data(shop, out, &view).await
}

/// Reporting's sales report, fed by the analytics federation hub from the User and
/// Order services' events: every customer and order is in it, its revenue is that of
/// the completed orders, and it never received a name, an e-mail address or a card
/// token.
pub async fn sales_report_sees_no_personal_data(
    shop: &mut Shop,
    out: &mut Narrative,
    view: &super::view::OrderView,
) -> Result<(), ScenarioError> {
    const S: &str = "report";
    let report = shop.report().await?.clone();
    out.say("Sales report (Reporting, fed by the analytics hub: User* renamed Customer*, personal data redacted):");
    for row in report.to_string().lines() {
        out.say(row.to_owned());
    }
    let users = shop
        .log(ServiceName::User)
        .await?
        .iter()
        .filter(|e| e.event_type.as_str() == "UserRegistered")
        .count();
    ensure!(
        S,
        report.customers.len() == users,
        "{} customers reported for {users} users",
        report.customers.len()
    );
    ensure!(
        S,
        report.customers.values().all(|email| email == "[redacted]"),
        "an e-mail address reached Reporting: {:?}",
        report.customers
    );
    ensure!(
        S,
        !report.cards.is_empty() && report.cards.iter().all(|card| card == "[redacted]"),
        "a card token reached Reporting: {:?}",
        report.cards
    );
    ensure!(
        S,
        report.orders.len() == view.orders.len(),
        "{} orders reported, {} in the view",
        report.orders.len(),
        view.orders.len()
    );
    let revenue: u64 = view
        .orders
        .values()
        .filter(|o| o.status == "completed")
        .map(|o| o.total)
        .sum();
    ensure!(
        S,
        report.revenue() == revenue,
        "revenue {} reported, {} completed",
        money(report.revenue()),
        money(revenue)
    );
    // And in what the hub published, as written: no personal datum at all.
    let forwarded = shop.forwarded().await?;
    let customers = forwarded
        .iter()
        .filter(|e| e.event_type.as_str() == "CustomerRegistered")
        .count();
    ensure!(
        S,
        customers == users && forwarded.len() > users,
        "the hub forwarded {} events, {customers} of them customers",
        forwarded.len()
    );
    for event in &forwarded {
        let payload = event.payload.as_str();
        for personal in [
            "@example.com",
            "(customer)",
            "Main Street",
            "4242-",
            "4000-",
        ] {
            ensure!(
                S,
                !payload.contains(personal),
                "the hub forwarded {personal:?} in {}: {payload}",
                event.event_type.as_str()
            );
        }
    }
    out.say(format!(
        "    checked: {users} customers and {} orders reported, revenue {} as completed; none of the {} forwarded events holds a name, e-mail, street or card",
        report.orders.len(),
        money(revenue),
        forwarded.len()
    ));
    Ok(())
}
