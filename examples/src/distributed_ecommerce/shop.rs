//! The five services, each over its own event store, talking only through a broker; the
//! storefront's order view built from what they publish; and the reads the scenarios
//! check their outcomes with, each from the store of the service that owns the stream.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use eventcore::circuit_breaker::CircuitBreaker;
use eventcore::distributed::{
    Delivery, EventPublisher, EventSubscriber, Processed, ProjectionHandler, PublicationPolicy,
    PublicationRule, PublisherRunner, SubscriptionName, SubscriptionRunner, SubscriptionSpec,
};
use eventcore::health::{CheckpointLag, HealthChecks, StoreHealth, SubscriptionHealth};
use eventcore::saga::{SagaEvent, SagaManager, SagaState, SagaTimer};
use eventcore::{
    CheckpointStore, CommandExecutor, CorrelationId, EventStore, ExecutionOptions, LogQuery,
    ProcessManager, ProcessManagerRunner, ProjectionErrorPolicy, ProjectionName, RecordedEvent,
    StreamId,
};
use eventcore_memory::{InMemoryBroker, InMemoryEventStore};

use super::contracts::{
    Address, InventoryEvent, OrderEvent, OrderLine, PaymentEvent, ServiceName, ShippingEvent,
    order_stream, payment_stream, product_stream, shipment_stream,
};
use super::inventory::{AddStock, InventoryRequests};
use super::order::{CreateOrder, CustomerProfiles, OrderStatus};
use super::order_saga::OrderSaga;
use super::payment::{
    FakeGateway, PaymentGatewayAdapter, PaymentRequests, PaymentStatus, gateway_circuit,
};
use super::shipping::{ShipmentStatus, ShippingRequests};
use super::user::RegisterUser;
use super::view::OrderView;

/// The order saga's payment deadline.
pub const PAYMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// How many ways the Inventory service splits its `order-events` subscription: two
/// workers reserve at once, each for the orders of its partition.
pub const INVENTORY_WORKERS: u32 = 2;

/// An event store and the checkpoint store beside it: one service's storage.
pub type Stores = (Arc<dyn EventStore>, Arc<dyn CheckpointStore>);

/// A fresh in-memory store for one service.
pub fn memory_stores() -> Stores {
    let store = InMemoryEventStore::new();
    (Arc::new(store.clone()), Arc::new(store))
}

/// Makes the publisher of a service (or hub) on the broker.
pub type PublisherFactory =
    Arc<dyn Fn(&eventcore::distributed::ServiceId) -> Arc<dyn EventPublisher> + Send + Sync>;

/// The broker the services talk through: one subscriber, and the publisher of any
/// service.
#[derive(Clone)]
pub struct Broker {
    subscriber: Arc<dyn EventSubscriber>,
    publishers: PublisherFactory,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").finish_non_exhaustive()
    }
}

impl Broker {
    /// The in-process broker.
    pub fn in_memory(broker: &InMemoryBroker) -> Self {
        let publishing = broker.clone();
        Broker {
            subscriber: Arc::new(broker.clone()),
            publishers: Arc::new(move |service| Arc::new(publishing.publisher(service.clone()))),
        }
    }

    /// A broker of `subscriber`, with `publishers` making each service's publisher.
    pub fn new(subscriber: Arc<dyn EventSubscriber>, publishers: PublisherFactory) -> Self {
        Broker {
            subscriber,
            publishers,
        }
    }

    /// The subscribing half.
    pub fn subscriber(&self) -> &Arc<dyn EventSubscriber> {
        &self.subscriber
    }

    /// The publisher of `service`.
    pub fn publisher(&self, service: ServiceName) -> Arc<dyn EventPublisher> {
        self.publisher_of(&service.id())
    }

    /// The publisher of any service id (a federation hub's).
    pub fn publisher_of(
        &self,
        service: &eventcore::distributed::ServiceId,
    ) -> Arc<dyn EventPublisher> {
        (self.publishers)(service)
    }
}

/// What a service makes public, and where: every event of the streams it owns that
/// others may rely on, on its one topic. Its saga, inbox and customer streams stay
/// private.
pub fn publication_policy(service: ServiceName) -> eventcore::Result<PublicationPolicy> {
    let topic = service.topic();
    let prefixes: &[&str] = match service {
        ServiceName::User => &["user-"],
        ServiceName::Order => &["order-"],
        ServiceName::Inventory => &["product-", "reservation-"],
        ServiceName::Payment => &["payment-"],
        ServiceName::Shipping => &["shipment-"],
    };
    PublicationPolicy::new(
        prefixes
            .iter()
            .map(|prefix| PublicationRule::new(topic.clone()).with_stream_prefix(*prefix)),
    )
}

/// A subscription of `service` named `name` to the topics of `from`.
pub fn subscription(
    service: ServiceName,
    name: &str,
    from: &[ServiceName],
) -> eventcore::Result<SubscriptionSpec> {
    let name = SubscriptionName::try_new(name)?;
    Ok(SubscriptionSpec::new(
        service.id(),
        name,
        from.iter().map(|s| s.topic()),
    ))
}

/// Every event in `store`, in its global order.
async fn read_log(store: &Arc<dyn EventStore>) -> eventcore::Result<Vec<RecordedEvent>> {
    let mut events = Vec::new();
    loop {
        let after = events.last().map(|e: &RecordedEvent| e.global_position);
        let batch = store
            .read_all(&LogQuery::new().with_after(after).with_limit(1_000))
            .await?;
        if batch.is_empty() {
            return Ok(events);
        }
        events.extend(batch);
    }
}

/// What every service has: its store, its executor, and the publisher of its outbox
/// (the store's own log).
pub struct Service {
    name: ServiceName,
    executor: CommandExecutor,
    checkpoints: Arc<dyn CheckpointStore>,
    publisher: PublisherRunner,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Service {
    /// Service `name` over `stores`, publishing through `broker` (its topic declared).
    pub async fn start(
        name: ServiceName,
        stores: &Stores,
        broker: &Broker,
    ) -> eventcore::Result<Self> {
        let publisher = broker.publisher(name);
        let policy = publication_policy(name)?;
        publisher.declare_topics(&policy.topics()).await?;
        Ok(Service {
            name,
            executor: CommandExecutor::from_shared(Arc::clone(&stores.0)),
            checkpoints: Arc::clone(&stores.1),
            publisher: PublisherRunner::new(
                Arc::clone(&stores.0),
                Arc::clone(&stores.1),
                publisher,
                policy,
            )?,
        })
    }

    /// Which service.
    pub fn name(&self) -> ServiceName {
        self.name
    }

    /// Its executor (over its own store only).
    pub fn executor(&self) -> &CommandExecutor {
        &self.executor
    }

    /// Its checkpoints.
    pub fn checkpoints(&self) -> &Arc<dyn CheckpointStore> {
        &self.checkpoints
    }

    /// Its store.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        self.executor.store()
    }

    /// The events of `stream` in its store.
    pub async fn stream(&self, stream: &StreamId) -> eventcore::Result<Vec<RecordedEvent>> {
        Ok(self
            .store()
            .read_streams(std::slice::from_ref(stream))
            .await?
            .events)
    }

    /// Every event in its store, in its global order.
    pub async fn log(&self) -> eventcore::Result<Vec<RecordedEvent>> {
        read_log(self.store()).await
    }

    /// Publishes what its store holds and the broker does not yet; how many.
    pub async fn publish(&mut self) -> eventcore::Result<u64> {
        Ok(self.publisher.publish_available().await?.published)
    }
}

/// The Order service's moving parts besides its commands.
struct OrderParts {
    saga: ProcessManagerRunner<SagaManager<OrderSaga>>,
    answers: SubscriptionRunner<SagaManager<OrderSaga>>,
    timer: SagaTimer,
    profiles: SubscriptionRunner<CustomerProfiles>,
}

/// The Payment service's.
struct PaymentParts {
    requests: SubscriptionRunner<PaymentRequests>,
    adapter: ProcessManagerRunner<PaymentGatewayAdapter>,
    breaker: CircuitBreaker,
}

/// A service with its moving parts.
enum Parts {
    User,
    Order(Box<OrderParts>),
    Inventory(Box<[SubscriptionRunner<InventoryRequests>; 2]>),
    Payment(Box<PaymentParts>),
    Shipping(Box<SubscriptionRunner<ShippingRequests>>),
}

/// What the services share in this process: the saga's clock, the card gateway (outside
/// every store), and the error policy of their handlers.
#[derive(Clone, Debug)]
pub struct Environment {
    /// The clock of the saga's deadlines and of the gateway's circuit breaker.
    pub clock: eventcore::saga::ManualClock,
    /// The card gateway.
    pub gateway: Arc<FakeGateway>,
    /// What happens to an event whose handling keeps failing.
    pub policy: ProjectionErrorPolicy,
}

impl Environment {
    /// What a service of this shop runs with.
    pub fn context(&self) -> ServiceContext {
        ServiceContext {
            clock: Arc::new(self.clock.clone()),
            gateway: Arc::clone(&self.gateway),
            policy: self.policy.clone(),
            payment_timeout: PAYMENT_TIMEOUT,
        }
    }
}

/// What a service runs with: the clock of its deadlines and breaker, the card gateway,
/// its handlers' error policy, and the saga's payment deadline.
#[derive(Clone)]
pub struct ServiceContext {
    /// The clock (a manual one in the scenarios, the system's in a process of its own).
    pub clock: Arc<dyn eventcore::saga::Clock>,
    /// The card gateway.
    pub gateway: Arc<FakeGateway>,
    /// What happens to an event whose handling keeps failing.
    pub policy: ProjectionErrorPolicy,
    /// How long the saga's payment step waits for an answer.
    pub payment_timeout: Duration,
}

impl std::fmt::Debug for ServiceContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceContext")
            .field("payment_timeout", &self.payment_timeout)
            .finish_non_exhaustive()
    }
}

/// One running service: its store, publisher, subscriptions and runners.
pub struct RunningService {
    service: Service,
    parts: Parts,
}

impl std::fmt::Debug for RunningService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningService")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

fn no_subscription(service: ServiceName, name: &str) -> eventcore::Error {
    eventcore::Error::BusinessRuleViolation(format!(
        "service {service} has no subscription {name:?}"
    ))
}

fn order_saga(env: &ServiceContext) -> eventcore::Result<SagaManager<OrderSaga>> {
    SagaManager::new(
        OrderSaga {
            payment_timeout: env.payment_timeout,
        },
        Arc::clone(&env.clock),
    )
}

/// The subscriptions a service runs, by name, with the services whose topics they read.
pub fn subscriptions_of(service: ServiceName) -> Vec<(&'static str, Vec<ServiceName>)> {
    use ServiceName::{Inventory, Order, Payment, Shipping, User};
    match service {
        User => Vec::new(),
        Order => vec![
            ("customer-profiles", vec![User]),
            ("order-saga", vec![Inventory, Payment, Shipping]),
        ],
        Inventory | Payment | Shipping => vec![("order-requests", vec![Order])],
    }
}

impl RunningService {
    /// Starts `name` over `stores`: declares its topic and makes its runners (their
    /// subscriptions open when they first run, or with [`RunningService::open`]).
    pub async fn start(
        name: ServiceName,
        stores: &Stores,
        broker: &Broker,
        env: &ServiceContext,
    ) -> eventcore::Result<Self> {
        let service = Service::start(name, stores, broker).await?;
        let executor = service.executor.clone();
        let checkpoints = Arc::clone(&service.checkpoints);
        let subscriber = Arc::clone(broker.subscriber());
        let specs: Vec<SubscriptionSpec> = subscriptions_of(name)
            .into_iter()
            .map(|(sub, from)| subscription(name, sub, &from))
            .collect::<eventcore::Result<_>>()?;
        let parts = match name {
            ServiceName::User => Parts::User,
            ServiceName::Order => {
                let saga = ProcessManagerRunner::new(
                    order_saga(env)?,
                    executor.clone(),
                    Arc::clone(&checkpoints),
                )
                .with_error_policy(env.policy.clone());
                let profiles = SubscriptionRunner::new(
                    Arc::clone(&subscriber),
                    specs[0].clone(),
                    CustomerProfiles,
                    executor.clone(),
                )?
                .with_error_policy(env.policy.clone());
                let answers = SubscriptionRunner::new(
                    Arc::clone(&subscriber),
                    specs[1].clone(),
                    order_saga(env)?,
                    executor.clone(),
                )?
                .with_error_policy(env.policy.clone());
                // A restart reads the saga's step events from its oldest pending step
                // on, not from the start of the log.
                let timer =
                    SagaTimer::new(OrderSaga::NAME, executor.clone(), Arc::clone(&env.clock))?
                        .with_low_water_mark(Arc::clone(&checkpoints));
                Parts::Order(Box::new(OrderParts {
                    saga,
                    answers,
                    timer,
                    profiles,
                }))
            }
            ServiceName::Inventory => {
                let mut workers = Vec::new();
                for spec in specs[0].split(INVENTORY_WORKERS).map_err(|e| {
                    eventcore::Error::BusinessRuleViolation(format!("partitions: {e}"))
                })? {
                    // Each worker stands for an instance of the service: its commands
                    // take turns among themselves, never with the other worker's (which
                    // scenario (f) makes race for the last unit). Same store, same
                    // state cache.
                    let worker = SubscriptionRunner::new(
                        Arc::clone(&subscriber),
                        spec,
                        InventoryRequests,
                        executor.clone().with_stream_queue(true),
                    )?
                    .with_error_policy(env.policy.clone());
                    workers.push(worker);
                }
                let workers: [SubscriptionRunner<InventoryRequests>; 2] =
                    workers.try_into().map_err(|_| {
                        eventcore::Error::BusinessRuleViolation("two workers".to_owned())
                    })?;
                Parts::Inventory(Box::new(workers))
            }
            ServiceName::Payment => {
                let requests = SubscriptionRunner::new(
                    Arc::clone(&subscriber),
                    specs[0].clone(),
                    PaymentRequests,
                    executor.clone(),
                )?
                .with_error_policy(env.policy.clone());
                // The breaker runs on the shop's clock: the scenarios move it past the
                // open period as they move it past the saga's deadlines. A new process
                // has a new, closed one.
                let breaker = CircuitBreaker::with_clock(
                    "card-gateway",
                    gateway_circuit(),
                    Arc::clone(&env.clock),
                );
                let adapter = ProcessManagerRunner::new(
                    PaymentGatewayAdapter::new(Arc::clone(&env.gateway), breaker.clone())?,
                    executor.clone(),
                    Arc::clone(&checkpoints),
                )
                .with_error_policy(env.policy.clone());
                Parts::Payment(Box::new(PaymentParts {
                    requests,
                    adapter,
                    breaker,
                }))
            }
            ServiceName::Shipping => {
                let requests = SubscriptionRunner::new(
                    Arc::clone(&subscriber),
                    specs[0].clone(),
                    ShippingRequests,
                    executor.clone(),
                )?
                .with_error_policy(env.policy.clone());
                Parts::Shipping(Box::new(requests))
            }
        };
        Ok(RunningService { service, parts })
    }

    /// The service.
    pub fn service(&self) -> &Service {
        &self.service
    }

    /// Opens its subscriptions now (so the broker keeps for them what is published from
    /// here on, and their backlog is known), rather than when they first run; every
    /// topic they read must exist.
    pub async fn open(&mut self) -> eventcore::Result<()> {
        match &mut self.parts {
            Parts::User => {}
            Parts::Order(order) => {
                order.profiles.open().await?;
                order.answers.open().await?;
            }
            Parts::Inventory(workers) => {
                for worker in workers.iter_mut() {
                    worker.open().await?;
                }
            }
            Parts::Payment(payment) => payment.requests.open().await?,
            Parts::Shipping(requests) => requests.open().await?,
        }
        Ok(())
    }

    /// Does what there is to do now: publishes its outbox, handles the events its
    /// subscriptions hold, runs its own process managers and fires the deadlines the
    /// clock has passed. Returns how much it did (0: nothing was waiting).
    pub async fn step(&mut self) -> eventcore::Result<u64> {
        let mut done = self.service.publish().await?;
        match &mut self.parts {
            Parts::User => {}
            Parts::Order(order) => {
                done += order.profiles.process_available().await?;
                done += order.answers.process_available().await?;
                done += order.saga.catch_up().await?.applied;
                done += order.timer.catch_up().await? as u64;
                done += order.timer.fire_due().await? as u64;
            }
            Parts::Inventory(workers) => {
                // The two workers at once, as two processes would.
                let [first, second] = &mut **workers;
                let (a, b) =
                    tokio::try_join!(first.process_available(), second.process_available())?;
                done += a + b;
            }
            Parts::Payment(payment) => {
                done += payment.requests.process_available().await?;
                done += payment.adapter.catch_up().await?.applied;
            }
            Parts::Shipping(requests) => {
                done += requests.process_available().await?;
            }
        }
        Ok(done)
    }

    /// Hands `delivery` to subscription `name` of this service again, as a broker does
    /// after a lost acknowledgement (the scenarios use it to deliver events twice).
    pub async fn redeliver(
        &mut self,
        name: &str,
        delivery: &Delivery,
    ) -> eventcore::Result<Processed> {
        match (&mut self.parts, name) {
            (Parts::Order(order), "order-saga") => order.answers.process(delivery).await,
            (Parts::Order(order), "customer-profiles") => order.profiles.process(delivery).await,
            (Parts::Payment(payment), "order-requests") => payment.requests.process(delivery).await,
            (Parts::Shipping(requests), "order-requests") => requests.process(delivery).await,
            (Parts::Inventory(workers), "order-requests") => {
                let stream = &delivery.event.stream_id;
                match workers
                    .iter_mut()
                    .find(|w| w.spec().partition.contains(stream))
                {
                    Some(worker) => worker.process(delivery).await,
                    None => Err(no_subscription(self.service.name, name)),
                }
            }
            _ => Err(no_subscription(self.service.name, name)),
        }
    }

    /// Forgets the checkpoint of its own process manager `name` (`order-fulfilment` or
    /// `payment-gateway`) and of its publisher, so that they handle and publish every
    /// event of its store again once it restarts.
    pub async fn forget_checkpoints(&self) -> eventcore::Result<()> {
        let mut names = vec![format!("publisher-{}", self.service.name)];
        match self.service.name {
            ServiceName::Order => names.push(OrderSaga::NAME.to_owned()),
            ServiceName::Payment => names.push("payment-gateway".to_owned()),
            _ => {}
        }
        for name in names {
            self.service
                .checkpoints
                .reset_checkpoint(&ProjectionName::try_new(name)?)
                .await?;
        }
        Ok(())
    }

    /// Runs every part until `shutdown` completes (for a service in its own process).
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> eventcore::Result<()> {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let wait = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
            let _ = stopped.wait_for(|s| *s).await;
        };
        let RunningService { service, parts } = self;
        let mut publisher = service.publisher;
        let mut tasks = tokio::task::JoinSet::new();
        let w = wait(stopped.clone());
        tasks.spawn(async move { publisher.run(w).await });
        match parts {
            Parts::User => {}
            Parts::Order(order) => {
                let OrderParts {
                    mut saga,
                    mut answers,
                    mut timer,
                    mut profiles,
                } = *order;
                let w = wait(stopped.clone());
                tasks.spawn(async move { saga.run(w).await.map(|_| ()) });
                let w = wait(stopped.clone());
                tasks.spawn(async move { answers.run(w).await });
                let w = wait(stopped.clone());
                tasks.spawn(async move { timer.run(w).await });
                let w = wait(stopped.clone());
                tasks.spawn(async move { profiles.run(w).await });
            }
            Parts::Inventory(workers) => {
                for mut worker in *workers {
                    let w = wait(stopped.clone());
                    tasks.spawn(async move { worker.run(w).await });
                }
            }
            Parts::Payment(payment) => {
                let PaymentParts {
                    mut requests,
                    mut adapter,
                    ..
                } = *payment;
                let w = wait(stopped.clone());
                tasks.spawn(async move { requests.run(w).await });
                let w = wait(stopped.clone());
                tasks.spawn(async move { adapter.run(w).await.map(|_| ()) });
            }
            Parts::Shipping(requests) => {
                let mut requests = *requests;
                let w = wait(stopped.clone());
                tasks.spawn(async move { requests.run(w).await });
            }
        }
        let mut shutdown = std::pin::pin!(shutdown);
        let mut result = Ok(());
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                joined = tasks.join_next() => match joined {
                    None => break,
                    Some(Ok(Ok(()))) => {}
                    Some(Ok(Err(error))) => {
                        result = Err(error);
                        break;
                    }
                    Some(Err(join)) => {
                        result = Err(eventcore::Error::permanent_backend(
                            format!("a task of the service ended: {join}"),
                            None,
                        ));
                        break;
                    }
                },
            }
        }
        let _ = stop.send(true);
        while tasks.join_next().await.is_some() {}
        result
    }

    /// The health checks of this service: its store answers, its subscriptions are at
    /// most `max_lag` behind, its own process managers too.
    pub fn health_checks(
        &self,
        broker: &Broker,
        env: &ServiceContext,
        max_lag: Duration,
    ) -> eventcore::Result<HealthChecks> {
        let name = self.service.name;
        let store = Arc::clone(self.service.store());
        let mut checks =
            HealthChecks::new(name.as_str()).with_check(StoreHealth::new(Arc::clone(&store)));
        for (sub, from) in subscriptions_of(name) {
            let spec = subscription(name, sub, &from)?;
            if name == ServiceName::Inventory {
                for partition in spec.split(INVENTORY_WORKERS).map_err(|e| {
                    eventcore::Error::BusinessRuleViolation(format!("partitions: {e}"))
                })? {
                    checks = checks.with_check(
                        SubscriptionHealth::new(Arc::clone(broker.subscriber()), partition)
                            .with_max_lag(max_lag),
                    );
                }
                continue;
            }
            checks = checks.with_check(
                SubscriptionHealth::new(Arc::clone(broker.subscriber()), spec)
                    .with_max_lag(max_lag),
            );
        }
        let local: Vec<(&str, eventcore::ProjectionFilter)> = match name {
            ServiceName::Order => {
                vec![(OrderSaga::NAME, ProcessManager::filter(&order_saga(env)?))]
            }
            ServiceName::Payment => {
                let breaker = CircuitBreaker::new("card-gateway", gateway_circuit());
                let adapter = PaymentGatewayAdapter::new(Arc::clone(&env.gateway), breaker)?;
                vec![("payment-gateway", ProcessManager::filter(&adapter))]
            }
            _ => Vec::new(),
        };
        for (runner, filter) in local {
            checks = checks.with_check(
                CheckpointLag::new(
                    ProjectionName::try_new(runner)?,
                    Arc::clone(&store),
                    Arc::clone(&self.service.checkpoints),
                )
                .with_filter(filter)
                .with_max_lag(max_lag),
            );
        }
        Ok(checks)
    }
}

/// The storefront's order view: a projection over the published events of the Order,
/// Inventory, Payment and Shipping services, with its own (in-memory) storage. It is
/// not one of the services, and the scenarios' restarts do not restart it.
pub struct Storefront {
    view: SubscriptionRunner<ProjectionHandler<OrderView>>,
}

impl std::fmt::Debug for Storefront {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storefront").finish_non_exhaustive()
    }
}

impl Storefront {
    /// The storefront's view over `broker`, with its own in-memory store.
    pub async fn start(broker: &Broker) -> eventcore::Result<Self> {
        let store = InMemoryEventStore::new();
        let checkpoints: Arc<dyn CheckpointStore> = Arc::new(store.clone());
        let service = eventcore::distributed::ServiceId::try_new("storefront")?;
        let name = SubscriptionName::try_new("order-view")?;
        let spec = SubscriptionSpec::new(
            service,
            name,
            [
                ServiceName::Order,
                ServiceName::Inventory,
                ServiceName::Payment,
                ServiceName::Shipping,
            ]
            .map(ServiceName::topic),
        );
        let mut view = SubscriptionRunner::new(
            Arc::clone(broker.subscriber()),
            spec,
            ProjectionHandler::new(OrderView::new()?, checkpoints)?,
            CommandExecutor::new(store),
        )?;
        view.open().await?;
        Ok(Storefront { view })
    }

    /// Applies what was published since; how many events.
    pub async fn step(&mut self) -> eventcore::Result<u64> {
        self.view.process_available().await
    }

    /// The view.
    pub fn view(&self) -> &OrderView {
        self.view.handler().projection()
    }
}

/// The shop: the five services in one process, each over its own store, talking only
/// through the broker, and the storefront's view. [`Shop::settle`] steps them in turn
/// until none has anything left to do, so every scenario is deterministic; in
/// production each service runs in its own process ([`RunningService::run`]).
pub struct Shop {
    broker: Broker,
    env: Environment,
    context: ServiceContext,
    stores: Vec<Stores>,
    ledger: Ledger,
    services: Vec<RunningService>,
    storefront: Storefront,
    analytics: super::reporting::Analytics,
}

impl std::fmt::Debug for Shop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shop")
            .field("services", &self.services)
            .field("clock", &self.env.clock)
            .finish_non_exhaustive()
    }
}

/// The shop reads through its [`Ledger`] (each service's current store).
impl std::ops::Deref for Shop {
    type Target = Ledger;

    fn deref(&self) -> &Ledger {
        &self.ledger
    }
}

impl Shop {
    /// The reads over every service's store.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The five services over `stores` (one per service, in the order of
    /// [`ServiceName::ALL`]), talking through `broker`.
    pub async fn start(
        stores: Vec<Stores>,
        broker: Broker,
        env: Environment,
    ) -> eventcore::Result<Self> {
        if stores.len() != ServiceName::ALL.len() {
            return Err(eventcore::Error::BusinessRuleViolation(format!(
                "{} stores for {} services",
                stores.len(),
                ServiceName::ALL.len()
            )));
        }
        // Every topic exists before anyone subscribes to it (in separate processes, a
        // subscriber waits for it instead).
        for name in ServiceName::ALL {
            broker
                .publisher(name)
                .declare_topics(&publication_policy(name)?.topics())
                .await?;
        }
        let context = env.context();
        let mut services = Vec::new();
        for name in ServiceName::ALL {
            services
                .push(RunningService::start(name, &stores[name.index()], &broker, &context).await?);
        }
        let storefront = Storefront::start(&broker).await?;
        let analytics = super::reporting::Analytics::start(&broker).await?;
        let ledger = Ledger::new(stores.clone())?;
        Ok(Shop {
            broker,
            context,
            env,
            ledger,
            stores,
            services,
            storefront,
            analytics,
        })
    }

    /// The five services on fresh in-memory stores and an in-memory broker.
    pub async fn in_memory(env: Environment) -> eventcore::Result<Self> {
        let stores = ServiceName::ALL.iter().map(|_| memory_stores()).collect();
        Shop::start(stores, Broker::in_memory(&InMemoryBroker::new()), env).await
    }

    /// Service `name` started again over its store, as after a crash or a deploy:
    /// everything it knew comes back from its store and the broker (checkpoints,
    /// deadlines, unacknowledged deliveries), nothing from memory.
    pub async fn restart_service(&mut self, name: ServiceName) -> eventcore::Result<()> {
        let restarted = RunningService::start(
            name,
            &self.stores[name.index()],
            &self.broker,
            &self.context,
        )
        .await?;
        // The old one is dropped here: its subscription handles give back what they
        // held unacknowledged, before the new ones open.
        let slot = &mut self.services[name.index()];
        *slot = restarted;
        slot.open().await
    }

    /// Every service started again.
    pub async fn restart(&mut self) -> eventcore::Result<()> {
        for name in ServiceName::ALL {
            self.restart_service(name).await?;
        }
        Ok(())
    }

    /// Service `name` restarted over other stores (wrappers of its own, say).
    pub async fn use_stores(&mut self, name: ServiceName, stores: Stores) -> eventcore::Result<()> {
        self.stores[name.index()] = stores;
        self.ledger = Ledger::new(self.stores.clone())?;
        self.restart_service(name).await
    }

    /// The stores of every service.
    pub fn stores(&self) -> &[Stores] {
        &self.stores
    }

    /// What the services share.
    pub fn environment(&self) -> &Environment {
        &self.env
    }

    /// The broker.
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// Service `name`.
    pub fn service(&self, name: ServiceName) -> &Service {
        &self.services[name.index()].service
    }

    /// Service `name` with its moving parts.
    pub fn running(&self, name: ServiceName) -> &RunningService {
        &self.services[name.index()]
    }

    /// Service `name` with its moving parts, to change.
    pub fn running_mut(&mut self, name: ServiceName) -> &mut RunningService {
        &mut self.services[name.index()]
    }

    /// The clock the saga's deadlines run on.
    pub fn clock(&self) -> &eventcore::saga::ManualClock {
        &self.env.clock
    }

    /// The card gateway.
    pub fn gateway(&self) -> &FakeGateway {
        &self.env.gateway
    }

    /// The circuit breaker the Payment service calls the gateway through (a new, closed
    /// one after it restarts, as in a new process).
    pub fn gateway_breaker(&self) -> eventcore::Result<&CircuitBreaker> {
        match &self.services[ServiceName::Payment.index()].parts {
            Parts::Payment(payment) => Ok(&payment.breaker),
            _ => Err(eventcore::Error::BusinessRuleViolation(
                "the payment service has no breaker".to_owned(),
            )),
        }
    }

    /// Every service's health checks, one set per service.
    pub fn health_checks(&self, max_lag: Duration) -> eventcore::Result<Vec<HealthChecks>> {
        self.services
            .iter()
            .map(|service| service.health_checks(&self.broker, &self.context, max_lag))
            .collect()
    }

    /// Registers a user with the User service.
    pub async fn register_user(
        &self,
        user_id: &str,
        name: &str,
        email: &str,
    ) -> eventcore::Result<()> {
        self.service(ServiceName::User)
            .executor()
            .execute(&RegisterUser::new(user_id, name, email)?)
            .await?;
        Ok(())
    }

    /// Puts `quantity` units of `sku` in stock (Inventory service).
    pub async fn add_stock(&self, sku: &str, quantity: u32) -> eventcore::Result<()> {
        self.service(ServiceName::Inventory)
            .executor()
            .execute(&AddStock::new(sku, quantity)?)
            .await?;
        Ok(())
    }

    /// A customer places an order with the Order service; returns the correlation id
    /// every event of its processing will carry, in every service.
    pub async fn place_order(
        &self,
        order_id: &str,
        customer: &str,
        lines: Vec<OrderLine>,
        card: &str,
        address: Address,
    ) -> eventcore::Result<CorrelationId> {
        let correlation = CorrelationId::new();
        let command = CreateOrder::new(order_id, customer, lines, card, address)?;
        self.service(ServiceName::Order)
            .executor()
            .execute_with(
                &command,
                ExecutionOptions::new()
                    .with_correlation_id(correlation)
                    .with_actor(customer.to_owned()),
            )
            .await?;
        Ok(correlation)
    }

    /// Steps every service, then the storefront, until none has anything left to do:
    /// outboxes published, subscriptions empty, process managers caught up, due
    /// deadlines fired. Returns how much they did.
    pub async fn settle(&mut self) -> eventcore::Result<u64> {
        let mut handled = 0;
        loop {
            let mut progress = 0;
            for service in &mut self.services {
                progress += service.step().await?;
            }
            progress += self.storefront.step().await?;
            progress += self.analytics.step().await?;
            if progress == 0 {
                return Ok(handled);
            }
            handled += progress;
        }
    }

    /// The storefront's order view, up to date with what was published.
    pub async fn view(&mut self) -> eventcore::Result<&OrderView> {
        self.storefront.step().await?;
        Ok(self.storefront.view())
    }

    /// Reporting's sales report (fed by the analytics federation hub), up to date.
    pub async fn report(&mut self) -> eventcore::Result<&super::reporting::SalesReport> {
        self.analytics.step().await?;
        Ok(self.analytics.report())
    }

    /// What the analytics hub forwarded to Reporting, as written.
    pub async fn forwarded(&self) -> eventcore::Result<Vec<RecordedEvent>> {
        self.analytics.forwarded().await
    }

    /// Steps of the saga with a deadline still pending.
    pub fn pending_deadlines(&self) -> usize {
        match &self.services[ServiceName::Order.index()].parts {
            Parts::Order(order) => order.timer.pending(),
            _ => 0,
        }
    }
}

/// The reads the scenarios check their outcomes with, each from the store of the
/// service that owns the stream (cheap to clone: the stores are shared).
#[derive(Clone)]
pub struct Ledger {
    stores: Vec<Stores>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger").finish_non_exhaustive()
    }
}

impl Ledger {
    /// Reads over `stores` (one per service, in the order of [`ServiceName::ALL`]).
    pub fn new(stores: Vec<Stores>) -> eventcore::Result<Self> {
        if stores.len() != ServiceName::ALL.len() {
            return Err(eventcore::Error::BusinessRuleViolation(format!(
                "{} stores for {} services",
                stores.len(),
                ServiceName::ALL.len()
            )));
        }
        Ok(Ledger { stores })
    }

    fn store(&self, name: ServiceName) -> &Arc<dyn EventStore> {
        &self.stores[name.index()].0
    }

    /// The stores, one per service in the order of [`ServiceName::ALL`].
    pub fn stores(&self) -> &[Stores] {
        &self.stores
    }

    /// The events of `stream` in `name`'s store.
    pub async fn stream(
        &self,
        name: ServiceName,
        stream: &StreamId,
    ) -> eventcore::Result<Vec<RecordedEvent>> {
        Ok(self
            .store(name)
            .read_streams(std::slice::from_ref(stream))
            .await?
            .events)
    }

    /// Every event in `name`'s store, in its global order.
    pub async fn log(&self, name: ServiceName) -> eventcore::Result<Vec<RecordedEvent>> {
        read_log(self.store(name)).await
    }

    /// The order's status (Order service).
    pub async fn order_status(&self, order_id: &str) -> eventcore::Result<OrderStatus> {
        let mut status = OrderStatus::default();
        for event in self
            .stream(ServiceName::Order, &order_stream(order_id)?)
            .await?
        {
            status.apply(&event.decode::<OrderEvent>()?.payload);
        }
        Ok(status)
    }

    /// The saga's requests for the order, by type name, in the order written.
    pub async fn requests(&self, order_id: &str) -> eventcore::Result<Vec<String>> {
        Ok(self
            .stream(ServiceName::Order, &order_stream(order_id)?)
            .await?
            .iter()
            .map(|e| e.event_type.as_str().to_owned())
            .filter(|t| t.ends_with("Requested") || t == "OrderCancelled")
            .collect())
    }

    /// The order's payment (Payment service).
    pub async fn payment_status(&self, order_id: &str) -> eventcore::Result<PaymentStatus> {
        let mut status = PaymentStatus::default();
        for event in self.payment_stream(order_id).await? {
            status.apply(&event.decode::<PaymentEvent>()?.payload);
        }
        Ok(status)
    }

    async fn payment_stream(&self, order_id: &str) -> eventcore::Result<Vec<RecordedEvent>> {
        self.stream(ServiceName::Payment, &payment_stream(order_id)?)
            .await
    }

    /// The payment events of the order, by type name (Payment service).
    pub async fn payment_events(&self, order_id: &str) -> eventcore::Result<Vec<String>> {
        Ok(self
            .payment_stream(order_id)
            .await?
            .iter()
            .map(|e| e.event_type.as_str().to_owned())
            .collect())
    }

    /// The order's shipment (Shipping service).
    pub async fn shipment_status(&self, order_id: &str) -> eventcore::Result<ShipmentStatus> {
        let mut status = ShipmentStatus::default();
        for event in self
            .stream(ServiceName::Shipping, &shipment_stream(order_id)?)
            .await?
        {
            status.apply(&event.decode::<ShippingEvent>()?.payload);
        }
        Ok(status)
    }

    /// A product's stock: units available, and units held per order (Inventory
    /// service).
    pub async fn stock(&self, sku: &str) -> eventcore::Result<Stock> {
        let mut stock = Stock::default();
        for event in self
            .stream(ServiceName::Inventory, &product_stream(sku)?)
            .await?
        {
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
                InventoryEvent::StockReservationConfirmed { .. }
                | InventoryEvent::StockReservationRefused { .. } => {}
            }
        }
        Ok(stock)
    }

    /// The order's saga (Order service).
    pub async fn saga(&self, order_id: &str) -> eventcore::Result<SagaState> {
        let stream = eventcore::saga::saga_stream(OrderSaga::NAME, order_id)?;
        SagaState::load(
            &CommandExecutor::from_shared(Arc::clone(self.store(ServiceName::Order))),
            &stream,
        )
        .await
    }

    /// The order's saga stream, one line per event.
    pub async fn saga_history(&self, order_id: &str) -> eventcore::Result<Vec<String>> {
        let stream = eventcore::saga::saga_stream(OrderSaga::NAME, order_id)?;
        let mut names = Vec::new();
        let mut history = Vec::new();
        for event in self.stream(ServiceName::Order, &stream).await? {
            let decoded = event.decode::<SagaEvent>()?;
            if let SagaEvent::Started { steps, .. } = &decoded.payload {
                names = steps.iter().map(|s| s.name().to_owned()).collect();
            }
            history.push(describe(&decoded.payload, &names));
        }
        Ok(history)
    }

    /// The public events about `order_id` each service wrote, per topic, by type name:
    /// what crossed the broker for the order.
    pub async fn traffic(&self, order_id: &str) -> eventcore::Result<Vec<(String, Vec<String>)>> {
        let mut traffic = Vec::new();
        for name in ServiceName::ALL {
            let policy = publication_policy(name)?;
            let mut types: Vec<String> = Vec::new();
            for event in self.log(name).await? {
                if policy.topic_of(&event).is_some()
                    && super::scenarios::order_of(&event).as_deref() == Some(order_id)
                {
                    types.push(event.event_type.as_str().to_owned());
                }
            }
            if !types.is_empty() {
                traffic.push((name.topic().as_str().to_owned(), types));
            }
        }
        Ok(traffic)
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
