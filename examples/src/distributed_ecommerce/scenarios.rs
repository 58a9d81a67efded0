//! The scenarios the example narrates and the tests run, each ending with a check of the
//! final state across the services.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use eventcore::circuit_breaker::CircuitState;
use eventcore::saga::{SagaPhase, StepStatus};
use eventcore::{
    AppendOutcome, AppendRequest, CommandExecutor, CorrelationId, Error, EventStore,
    ExecutionOptions, GlobalPosition, IdempotencyKey, LogQuery, RecordedEvent, StreamId,
    StreamsSnapshot,
};
use tokio::sync::Barrier;

use super::contracts::{Address, OrderLine, payment_stream};
use super::inventory::ReserveStock;
use super::order::OrderStatus;
use super::order_saga::{OrderSaga, steps};
use super::payment::{GatewayAnswer, PaymentStatus, RecordGatewayAnswer};
use super::shipping::ShipmentStatus;
use super::shop::{PAYMENT_TIMEOUT, Shop};
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

async fn tell_saga(shop: &Shop, out: &mut Narrative, order_id: &str) -> Result<(), ScenarioError> {
    out.say(format!("    saga {}/{order_id}:", OrderSaga::NAME));
    for entry in shop.saga_history(order_id).await? {
        out.say(format!("      - {entry}"));
    }
    Ok(())
}

/// The order a service event is about, if it is one.
fn order_of(event: &RecordedEvent) -> Option<String> {
    use super::contracts::{InventoryEvent, OrderEvent, PaymentEvent, ShippingEvent, ShopEvent};
    let order_id = match event.decode::<ShopEvent>().ok()?.payload {
        ShopEvent::Order(
            OrderEvent::OrderCreated { order_id, .. }
            | OrderEvent::OrderCompleted { order_id }
            | OrderEvent::OrderCancelled { order_id, .. },
        )
        | ShopEvent::Inventory(
            InventoryEvent::StockReserved { order_id, .. }
            | InventoryEvent::StockReleased { order_id, .. },
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
            | ShippingEvent::ShipmentCancelled { order_id },
        ) => order_id,
        ShopEvent::Inventory(InventoryEvent::StockAdded { .. }) => return None,
    };
    Some(order_id)
}

/// Every event of the order's processing carries the order's correlation id: the
/// events of its order, payment, shipment and saga streams, and the stock events that
/// name it.
pub async fn check_correlation(
    shop: &Shop,
    scenario: &'static str,
    order_id: &str,
    correlation: CorrelationId,
) -> Result<usize, ScenarioError> {
    let own = [
        format!("order-{order_id}"),
        format!("payment-{order_id}"),
        format!("shipment-{order_id}"),
        format!("saga/{}/{order_id}", OrderSaga::NAME),
    ];
    let mut checked = 0;
    for event in shop.log().await? {
        let stream = event.stream_id.as_str();
        let names_order =
            stream.starts_with("product-") && order_of(&event).as_deref() == Some(order_id);
        if own.iter().any(|s| s == stream) || names_order {
            ensure!(
                scenario,
                event.metadata.correlation_id == correlation,
                "{} at {} of {} carries another correlation id",
                event.event_type.as_str(),
                event.stream_version,
                stream
            );
            checked += 1;
        }
    }
    Ok(checked)
}

/// An order for two products goes through every service.
pub async fn an_order_goes_through_every_service(
    shop: &mut Shop,
    out: &mut Narrative,
) -> Result<(), ScenarioError> {
    const S: &str = "a";
    out.say("(a) An order goes through every service");
    shop.add_stock("lamp-a", 5).await?;
    shop.add_stock("rug-a", 3).await?;
    out.say("    inventory: 5 x lamp-a, 3 x rug-a");
    let lines = vec![line("lamp-a", 2, 4_900), line("rug-a", 1, 3_100)];
    let correlation = shop
        .place_order("A-1", "ada", lines, "4242-ada", address("Berlin", "DE"))
        .await?;
    out.say("    ada orders A-1: 2 x lamp-a at 49.00, 1 x rug-a at 31.00 (card 4242-ada)");
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
    let carried = check_correlation(shop, S, "A-1", correlation).await?;
    out.say(format!(
        "    checked: order completed; 2 lamp-a + 1 rug-a reserved in one write; charged {} once; shipped; \
         all {carried} events carry correlation {correlation}",
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
    shop.add_stock("lamp-b", 5).await?;
    shop.add_stock("rug-b", 1).await?;
    out.say("    inventory: 5 x lamp-b, 1 x rug-b");
    let lines = vec![line("lamp-b", 2, 4_900), line("rug-b", 2, 3_100)];
    let correlation = shop
        .place_order("B-1", "bob", lines, "4242-bob", address("Paris", "FR"))
        .await?;
    out.say("    bob orders B-1: 2 x lamp-b, 2 x rug-b");
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
    out.say("    cy orders C-1: 1 x lamp-c (card 4000-cy-decline)");
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

/// Shipping is refused after the payment: refund, release, cancel, in that order.
pub async fn a_refused_shipment_refunds_releases_and_cancels(
    shop: &mut Shop,
    out: &mut Narrative,
) -> Result<(), ScenarioError> {
    const S: &str = "d";
    out.say("(d) Shipping fails after payment");
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
    out.say("    dee orders D-1: 1 x lamp-d, to be shipped to Antarctica (no carrier)");
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
        shipment == ShipmentStatus::None,
        "shipment is {shipment:?}"
    );
    // The compensations, in the log's order.
    let mut order_of_undo = Vec::new();
    for event in shop.log().await? {
        let wanted = matches!(
            event.event_type.as_str(),
            "PaymentRefunded" | "StockReleased" | "OrderCancelled"
        );
        if wanted && order_of(&event).as_deref() == Some("D-1") {
            order_of_undo.push(event.event_type.as_str().to_owned());
        }
    }
    ensure!(
        S,
        order_of_undo == ["PaymentRefunded", "StockReleased", "OrderCancelled"],
        "compensations ran as {order_of_undo:?}"
    );
    check_correlation(shop, S, "D-1", correlation).await?;
    out.say(format!(
        "    checked: compensated in reverse order: {}",
        order_of_undo.join(" -> ")
    ));
    Ok(())
}

/// The gateway's answer is delivered twice, and then every service is made to
/// handle every event again: charged once, nothing written twice.
pub async fn a_payment_answer_delivered_twice_charges_once(
    shop: &mut Shop,
    out: &mut Narrative,
) -> Result<(), ScenarioError> {
    const S: &str = "e";
    out.say("(e) The same payment event delivered twice");
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
    out.say("    eve's order E-1 completed; the gateway now calls back a second time");
    let captured = shop
        .stream(&payment_stream("E-1")?)
        .await?
        .into_iter()
        .find(|e| e.event_type.as_str() == "PaymentCaptured");
    let Some(captured) = captured else {
        return Err(ScenarioError::Check {
            scenario: S,
            message: "no PaymentCaptured".to_owned(),
        });
    };
    let reference = captured.decode::<super::contracts::PaymentEvent>()?.payload;
    let super::contracts::PaymentEvent::PaymentCaptured { reference, .. } = reference else {
        return Err(ScenarioError::Check {
            scenario: S,
            message: "not a capture".to_owned(),
        });
    };
    let again = RecordGatewayAnswer {
        payment: payment_stream("E-1")?,
        order_id: "E-1".to_owned(),
        answer: GatewayAnswer::Approved { reference },
    };
    let repeated = shop
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

    out.say("    then the saga manager and the gateway adapter lose their checkpoints and handle every event again");
    let head = shop.executor().store().head_position().await?;
    let calls = shop.gateway().calls();
    for name in [OrderSaga::NAME, "payment-gateway"] {
        shop.checkpoints()
            .reset_checkpoint(&eventcore::ProjectionName::from_static(name))
            .await?;
    }
    *shop = shop.restart()?;
    let handled = shop.settle().await?;
    let head_after = shop.executor().store().head_position().await?;
    ensure!(
        S,
        head_after == head,
        "redelivery wrote events: head {head:?} -> {head_after:?}"
    );
    ensure!(
        S,
        shop.gateway().calls() > calls,
        "the gateway adapter did not see the request again"
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
        "    checked: {handled} events handled again, 0 events written; the gateway was called again and charged once"
    ));
    Ok(())
}

/// A store whose first `gated` stream reads wait for each other before answering, so
/// that concurrent commands are guaranteed to decide on the same versions.
pub struct RaceGate {
    inner: Arc<dyn EventStore>,
    gated: AtomicUsize,
    barrier: Barrier,
}

impl std::fmt::Debug for RaceGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaceGate")
            .field("gated", &self.gated)
            .finish_non_exhaustive()
    }
}

impl RaceGate {
    /// The first `racers` reads of `inner` meet before any returns.
    pub fn new(inner: Arc<dyn EventStore>, racers: usize) -> Self {
        RaceGate {
            inner,
            gated: AtomicUsize::new(racers),
            barrier: Barrier::new(racers),
        }
    }
}

#[async_trait]
impl EventStore for RaceGate {
    async fn read_streams(&self, streams: &[StreamId]) -> eventcore::Result<StreamsSnapshot> {
        let snapshot = self.inner.read_streams(streams).await?;
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

/// Two orders race for the last unit: both reservations read the same stock, one
/// write wins, the other conflicts, reads again and is refused.
pub async fn two_orders_racing_for_the_last_unit_sell_it_once(
    shop: &mut Shop,
    out: &mut Narrative,
) -> Result<(), ScenarioError> {
    const S: &str = "f";
    out.say("(f) Two orders race for the last unit");
    shop.add_stock("lamp-f", 1).await?;
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
    out.say("    1 x lamp-f in stock; fay (F-1) and gus (F-2) both order it; two inventory workers reserve at the same instant");
    let gate: Arc<dyn EventStore> = Arc::new(RaceGate::new(Arc::clone(shop.executor().store()), 2));
    let racing = CommandExecutor::from_shared(gate);
    let reserve_first = ReserveStock::new("F-1", &[line("lamp-f", 1, 4_900)])?;
    let reserve_second = ReserveStock::new("F-2", &[line("lamp-f", 1, 4_900)])?;
    let (a, b) = tokio::join!(
        racing.execute_with(
            &reserve_first,
            ExecutionOptions::new().with_correlation_id(first)
        ),
        racing.execute_with(
            &reserve_second,
            ExecutionOptions::new().with_correlation_id(second)
        ),
    );
    let (winner, loser, result) = match (&a, &b) {
        (Ok(won), Err(Error::BusinessRuleViolation(_))) => ("F-1", "F-2", won),
        (Err(Error::BusinessRuleViolation(_)), Ok(won)) => ("F-2", "F-1", won),
        _ => {
            return Err(ScenarioError::Check {
                scenario: S,
                message: format!("not exactly one winner: {a:?} / {b:?}"),
            });
        }
    };
    ensure!(
        S,
        result.attempts == 1 || result.attempts == 2,
        "winner took {} attempts",
        result.attempts
    );
    let refused = if winner == "F-1" { &b } else { &a };
    out.say(format!(
        "    {winner} got the unit; {loser} was refused after re-reading: {}",
        match refused {
            Err(error) => error.to_string(),
            Ok(_) => String::new(),
        }
    ));
    shop.settle().await?;
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
    out.say("    hal orders G-1 (card 4000-hal-hang: the gateway never answers)");
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

    // A restart in between: the deadline comes back from the store.
    *shop = shop.restart()?;
    shop.clock()
        .advance(PAYMENT_TIMEOUT + Duration::from_secs(1));
    out.say(format!(
        "    the services restart; the clock moves {} s on, past the deadline",
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
        .stream(&payment_stream("G-1")?)
        .await?
        .into_iter()
        .find(|e| e.event_type.as_str() == "PaymentRequested");
    let Some(requested) = requested else {
        return Err(ScenarioError::Check {
            scenario: S,
            message: "no PaymentRequested".to_owned(),
        });
    };
    let answer = shop
        .gateway()
        .capture(&requested.event_id.to_string(), "G-1", 4_900);
    let late = RecordGatewayAnswer {
        payment: payment_stream("G-1")?,
        order_id: "G-1".to_owned(),
        answer,
    };
    shop.executor()
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
    out.say("    checked: timed out, voided, stock released, order cancelled; the late charge was refunded");
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
    shop.add_stock("lamp-h", 10).await?;
    shop.gateway().set_available(false);
    let calls = shop.gateway().calls();
    let threshold = shop.gateway_breaker().config().failure_threshold();
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
    let state = shop.gateway_breaker().state();
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
        "    {threshold} calls fail, the circuit opens, H-4's payment is not even asked for"
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
    let state = shop.gateway_breaker().state();
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
    out.say("Order view (a projection over the Order, Inventory, Payment and Shipping events):");
    let view = shop.view().await?.to_string();
    for row in view.lines() {
        out.say(row.to_owned());
    }
    Ok(())
}
