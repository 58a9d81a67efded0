//! The four services wired together over one event store, and the reads the scenarios
//! check their outcomes with.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use eventcore::circuit_breaker::CircuitBreaker;
use eventcore::health::{CheckpointLag, HealthChecks, StoreHealth};
use eventcore::saga::{SagaEvent, SagaManager, SagaState, SagaTimer};
use eventcore::{
    CheckpointStore, CommandExecutor, CorrelationId, EventStore, ExecutionOptions, LogQuery,
    ProcessManager, ProcessManagerRunner, Projection, ProjectionErrorPolicy, ProjectionName,
    ProjectionRunner, RecordedEvent, StreamId,
};

use super::contracts::{
    Address, InventoryEvent, OrderEvent, OrderLine, PaymentEvent, ShippingEvent, order_stream,
    payment_stream, product_stream, shipment_stream,
};
use super::inventory::AddStock;
use super::order::{CreateOrder, OrderStatus};
use super::order_saga::OrderSaga;
use super::payment::{FakeGateway, PaymentGatewayAdapter, PaymentStatus, gateway_circuit};
use super::shipping::ShipmentStatus;
use super::view::OrderView;

/// The order saga's payment deadline.
pub const PAYMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// The shop: the Order service's saga manager and timer, the Payment service's gateway
/// adapter, and the order view, over one store. In production each would run in its
/// own process with `run_as_leader`; here [`Shop::settle`] runs them in turn until none
/// has anything left to do, so every scenario is deterministic.
pub struct Shop {
    executor: CommandExecutor,
    checkpoints: Arc<dyn CheckpointStore>,
    clock: eventcore::saga::ManualClock,
    gateway: Arc<FakeGateway>,
    breaker: CircuitBreaker,
    saga: ProcessManagerRunner<SagaManager<OrderSaga>>,
    payments: ProcessManagerRunner<PaymentGatewayAdapter>,
    timer: SagaTimer,
    view: ProjectionRunner<OrderView>,
    policy: ProjectionErrorPolicy,
}

impl std::fmt::Debug for Shop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shop")
            .field("executor", &self.executor)
            .field("clock", &self.clock)
            .finish_non_exhaustive()
    }
}

impl Shop {
    /// The services over `events`, with checkpoints in `checkpoints`, deadlines on
    /// `clock`, the card gateway `gateway`, and `policy` for events whose handling keeps
    /// failing.
    pub fn new(
        events: Arc<dyn EventStore>,
        checkpoints: Arc<dyn CheckpointStore>,
        clock: eventcore::saga::ManualClock,
        gateway: Arc<FakeGateway>,
        policy: ProjectionErrorPolicy,
    ) -> eventcore::Result<Self> {
        let executor = CommandExecutor::from_shared(events);
        let shared_clock: Arc<dyn eventcore::saga::Clock> = Arc::new(clock.clone());
        let saga = SagaManager::new(
            OrderSaga {
                payment_timeout: PAYMENT_TIMEOUT,
            },
            Arc::clone(&shared_clock),
        )?;
        let saga = ProcessManagerRunner::new(saga, executor.clone(), Arc::clone(&checkpoints))
            .with_error_policy(policy.clone());
        // The breaker runs on the shop's clock: the scenarios move it past the open
        // period as they move it past the saga's deadlines.
        let breaker = CircuitBreaker::with_clock(
            "card-gateway",
            gateway_circuit(),
            Arc::clone(&shared_clock),
        );
        let payments = ProcessManagerRunner::new(
            PaymentGatewayAdapter::new(Arc::clone(&gateway), breaker.clone())?,
            executor.clone(),
            Arc::clone(&checkpoints),
        )
        .with_error_policy(policy.clone());
        let timer = SagaTimer::new(OrderSaga::NAME, executor.clone(), shared_clock)?;
        let view = ProjectionRunner::new(
            OrderView::new()?,
            Arc::clone(executor.store()),
            Arc::clone(&checkpoints),
        )
        .with_error_policy(policy.clone());
        Ok(Shop {
            executor,
            checkpoints,
            clock,
            gateway,
            breaker,
            saga,
            payments,
            timer,
            view,
            policy,
        })
    }

    /// The same services started again over the same store, clock and gateway, as after
    /// a restart: everything they knew comes back from the store (checkpoints,
    /// deadlines), nothing from memory.
    pub fn restart(&self) -> eventcore::Result<Shop> {
        Shop::new(
            Arc::clone(self.executor.store()),
            Arc::clone(&self.checkpoints),
            self.clock.clone(),
            Arc::clone(&self.gateway),
            self.policy.clone(),
        )
    }

    /// The same services over other stores (wrappers of these, say), keeping the clock
    /// and gateway.
    pub fn with_stores(
        &self,
        events: Arc<dyn EventStore>,
        checkpoints: Arc<dyn CheckpointStore>,
    ) -> eventcore::Result<Shop> {
        Shop::new(
            events,
            checkpoints,
            self.clock.clone(),
            Arc::clone(&self.gateway),
            self.policy.clone(),
        )
    }

    /// The executor commands go through.
    pub fn executor(&self) -> &CommandExecutor {
        &self.executor
    }

    /// The checkpoints of the services.
    pub fn checkpoints(&self) -> &Arc<dyn CheckpointStore> {
        &self.checkpoints
    }

    /// The clock the saga's deadlines run on.
    pub fn clock(&self) -> &eventcore::saga::ManualClock {
        &self.clock
    }

    /// The card gateway.
    pub fn gateway(&self) -> &FakeGateway {
        &self.gateway
    }

    /// The shop's health checks: the store answers, and the saga manager, the gateway
    /// adapter and the order view are at most `max_lag` behind (the age of the oldest
    /// event each has still to handle).
    pub fn health_checks(&self, max_lag: Duration) -> eventcore::Result<HealthChecks> {
        let store = Arc::clone(self.executor.store());
        let saga = SagaManager::new(
            OrderSaga {
                payment_timeout: PAYMENT_TIMEOUT,
            },
            Arc::new(self.clock.clone()),
        )?;
        let adapter = PaymentGatewayAdapter::new(Arc::clone(&self.gateway), self.breaker.clone())?;
        let view = OrderView::new()?;
        let mut checks = HealthChecks::new("shop").with_check(StoreHealth::new(Arc::clone(&store)));
        for (name, filter) in [
            (OrderSaga::NAME, ProcessManager::filter(&saga)),
            ("payment-gateway", ProcessManager::filter(&adapter)),
            ("order-view", Projection::filter(&view)),
        ] {
            checks = checks.with_check(
                CheckpointLag::new(
                    ProjectionName::try_new(name)?,
                    Arc::clone(&store),
                    Arc::clone(&self.checkpoints),
                )
                .with_filter(filter)
                .with_max_lag(max_lag),
            );
        }
        Ok(checks)
    }

    /// The circuit breaker the gateway adapter calls the gateway through (a new, closed
    /// one after a restart, as in a new process).
    pub fn gateway_breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    /// Puts `quantity` units of `sku` in stock.
    pub async fn add_stock(&self, sku: &str, quantity: u32) -> eventcore::Result<()> {
        self.executor
            .execute(&AddStock::new(sku, quantity)?)
            .await?;
        Ok(())
    }

    /// A customer places an order; returns the correlation id every event of its
    /// processing will carry.
    pub async fn place_order(
        &self,
        order_id: &str,
        customer: &str,
        lines: Vec<OrderLine>,
        card: &str,
        address: Address,
    ) -> eventcore::Result<CorrelationId> {
        let correlation = CorrelationId::new();
        let command = CreateOrder {
            order: order_stream(order_id)?,
            order_id: order_id.to_owned(),
            customer: customer.to_owned(),
            lines,
            card: card.to_owned(),
            address,
        };
        self.executor
            .execute_with(
                &command,
                ExecutionOptions::new()
                    .with_correlation_id(correlation)
                    .with_actor(customer.to_owned()),
            )
            .await?;
        Ok(correlation)
    }

    /// Runs the services until none has anything left to do: the saga manager, the
    /// gateway adapter, and the timer (which fires the deadlines the clock has passed).
    /// Returns how many events the services handled.
    pub async fn settle(&mut self) -> eventcore::Result<u64> {
        let mut handled = 0;
        loop {
            let mut progress = 0;
            progress += self.saga.catch_up().await?.applied;
            progress += self.payments.catch_up().await?.applied;
            progress += self.timer.catch_up().await? as u64;
            progress += self.timer.fire_due().await? as u64;
            if progress == 0 {
                return Ok(handled);
            }
            handled += progress;
        }
    }

    /// The order view, caught up.
    pub async fn view(&mut self) -> eventcore::Result<&OrderView> {
        self.view.catch_up().await?;
        Ok(self.view.projection())
    }

    /// Steps of the saga with a deadline still pending.
    pub fn pending_deadlines(&self) -> usize {
        self.timer.pending()
    }

    /// The events of `stream`.
    pub async fn stream(&self, stream: &StreamId) -> eventcore::Result<Vec<RecordedEvent>> {
        Ok(self
            .executor
            .store()
            .read_streams(std::slice::from_ref(stream))
            .await?
            .events)
    }

    /// Every event in the store, in global order.
    pub async fn log(&self) -> eventcore::Result<Vec<RecordedEvent>> {
        let mut events = Vec::new();
        loop {
            let after = events.last().map(|e: &RecordedEvent| e.global_position);
            let batch = self
                .executor
                .store()
                .read_all(&LogQuery::new().with_after(after).with_limit(1_000))
                .await?;
            if batch.is_empty() {
                return Ok(events);
            }
            events.extend(batch);
        }
    }

    /// The order's status.
    pub async fn order_status(&self, order_id: &str) -> eventcore::Result<OrderStatus> {
        let mut status = OrderStatus::default();
        for event in self.stream(&order_stream(order_id)?).await? {
            status.apply(&event.decode::<OrderEvent>()?.payload);
        }
        Ok(status)
    }

    /// The order's payment.
    pub async fn payment_status(&self, order_id: &str) -> eventcore::Result<PaymentStatus> {
        let mut status = PaymentStatus::default();
        for event in self.stream(&payment_stream(order_id)?).await? {
            status.apply(&event.decode::<PaymentEvent>()?.payload);
        }
        Ok(status)
    }

    /// The payment events of the order, by type name.
    pub async fn payment_events(&self, order_id: &str) -> eventcore::Result<Vec<String>> {
        Ok(self
            .stream(&payment_stream(order_id)?)
            .await?
            .iter()
            .map(|e| e.event_type.as_str().to_owned())
            .collect())
    }

    /// The order's shipment.
    pub async fn shipment_status(&self, order_id: &str) -> eventcore::Result<ShipmentStatus> {
        let mut status = ShipmentStatus::default();
        for event in self.stream(&shipment_stream(order_id)?).await? {
            status.apply(&event.decode::<ShippingEvent>()?.payload);
        }
        Ok(status)
    }

    /// A product's stock: units available, and units held per order.
    pub async fn stock(&self, sku: &str) -> eventcore::Result<Stock> {
        let mut stock = Stock::default();
        for event in self.stream(&product_stream(sku)?).await? {
            match event.decode::<InventoryEvent>()?.payload {
                InventoryEvent::StockAdded { quantity, .. } => {
                    stock.available += i64::from(quantity);
                }
                InventoryEvent::StockReserved {
                    order_id, quantity, ..
                } => {
                    stock.available -= i64::from(quantity);
                    *stock.held.entry(order_id.clone()).or_default() += i64::from(quantity);
                    *stock.reservations.entry(order_id).or_default() += 1;
                }
                InventoryEvent::StockReleased {
                    order_id, quantity, ..
                } => {
                    stock.available += i64::from(quantity);
                    *stock.held.entry(order_id).or_default() -= i64::from(quantity);
                }
            }
        }
        Ok(stock)
    }

    /// The order's saga.
    pub async fn saga(&self, order_id: &str) -> eventcore::Result<SagaState> {
        let stream = eventcore::saga::saga_stream(OrderSaga::NAME, order_id)?;
        SagaState::load(&self.executor, &stream).await
    }

    /// The order's saga stream, one line per event.
    pub async fn saga_history(&self, order_id: &str) -> eventcore::Result<Vec<String>> {
        let stream = eventcore::saga::saga_stream(OrderSaga::NAME, order_id)?;
        let mut names = Vec::new();
        let mut history = Vec::new();
        for event in self.stream(&stream).await? {
            let decoded = event.decode::<SagaEvent>()?;
            if let SagaEvent::Started { steps, .. } = &decoded.payload {
                names = steps.iter().map(|s| s.name().to_owned()).collect();
            }
            history.push(describe(&decoded.payload, &names));
        }
        Ok(history)
    }
}

fn describe(event: &SagaEvent, names: &[String]) -> String {
    let name = |step: &usize| names.get(*step).map_or("?", String::as_str);
    match event {
        SagaEvent::Started { steps, .. } => format!("started ({} steps)", steps.len()),
        SagaEvent::StepStarted { name, deadline, .. } => match deadline {
            Some(deadline) => format!(
                "{name}: started, answer due by {}",
                deadline.format("%H:%M:%S")
            ),
            None => format!("{name}: started"),
        },
        SagaEvent::StepSucceeded { step } => format!("{}: succeeded", name(step)),
        SagaEvent::StepFailed { step, reason } => format!("{}: FAILED ({reason})", name(step)),
        SagaEvent::StepTimedOut { step, .. } => format!("{}: TIMED OUT", name(step)),
        SagaEvent::CompensationStarted { name, .. } => format!("{name}: compensating"),
        SagaEvent::StepCompensated { step } => format!("{}: compensated", name(step)),
        SagaEvent::Completed => "completed".to_owned(),
        SagaEvent::Aborted { reason } => format!("aborted ({reason})"),
        _ => format!("{event:?}"),
    }
}

/// A product's stock.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stock {
    /// Units nobody holds.
    pub available: i64,
    /// Units held per order.
    pub held: BTreeMap<String, i64>,
    /// `StockReserved` events per order.
    pub reservations: BTreeMap<String, u32>,
}
