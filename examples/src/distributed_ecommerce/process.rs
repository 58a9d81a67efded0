//! One service per process, over NATS JetStream (and PostgreSQL when `DATABASE_URL` is
//! set), and the driver that runs orders through services started that way.
//!
//! A service process serves `/metrics`, `/health` and `/ready` over HTTP, registers
//! itself in the NATS service registry, and takes the outside world's commands (sign-up,
//! stock, orders) as NATS requests on `<prefix>.<service>.commands` (a queue group, so
//! several instances share them). Everything between the services goes through their
//! published events; the driver only sends those commands and reads each service's own
//! store to check the outcome.

use std::sync::Arc;
use std::time::Duration;

use eventcore::distributed::{
    EventPublisher, EventSubscriber, ServiceRegistration, ServiceRegistry,
};
use eventcore::saga::SagaPhase;
use eventcore::{CorrelationId, ExecutionOptions, ProjectionErrorPolicy};
use eventcore_nats::{NatsConfig, NatsServiceRegistry, NatsTransport};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::contracts::{Address, OrderLine, ServiceName};
use super::inventory::AddStock;
use super::order::{CreateOrder, OrderStatus};
use super::payment::{FakeGateway, PaymentStatus};
use super::shipping::ShipmentStatus;
use super::shop::{Broker, Ledger, RunningService, ServiceContext, Stores};
use super::user::RegisterUser;

/// A command from outside the services.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    /// User service: sign a user up.
    RegisterUser {
        /// The user id.
        user_id: String,
        /// Their name.
        name: String,
        /// Their e-mail address.
        email: String,
    },
    /// Inventory service: units arrive.
    AddStock {
        /// The product.
        sku: String,
        /// How many.
        quantity: u32,
    },
    /// Order service: a customer orders.
    PlaceOrder {
        /// The order id.
        order_id: String,
        /// The customer (a registered user id).
        customer: String,
        /// What.
        lines: Vec<OrderLine>,
        /// The card token.
        card: String,
        /// Where to ship.
        address: Address,
    },
}

impl Request {
    /// The service that takes it.
    pub fn service(&self) -> ServiceName {
        match self {
            Request::RegisterUser { .. } => ServiceName::User,
            Request::AddStock { .. } => ServiceName::Inventory,
            Request::PlaceOrder { .. } => ServiceName::Order,
        }
    }
}

/// A [`Request`] with the id that makes it happen once: a request sent again (its
/// answer was lost, the service restarted) finds the first outcome, and the processing
/// it starts carries the id as its correlation id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandRequest {
    /// The request's id (a UUID the sender chooses once).
    pub request_id: uuid::Uuid,
    /// What is asked.
    pub request: Request,
}

impl CommandRequest {
    /// `request` under a new id.
    pub fn new(request: Request) -> Self {
        CommandRequest {
            request_id: uuid::Uuid::now_v7(),
            request,
        }
    }
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Reply {
    /// Done; the correlation id its processing carries.
    Done {
        /// The correlation id.
        correlation: String,
    },
    /// Refused (a business rule, bad input, or a request for another service).
    Refused {
        /// Why.
        reason: String,
    },
}

/// The subject `service` takes its commands on.
pub fn command_subject(prefix: &str, service: ServiceName) -> String {
    format!("{prefix}.{service}.commands")
}

/// Executes `request` on `service`'s own store, once per request id.
pub async fn execute(
    service: ServiceName,
    executor: &eventcore::CommandExecutor,
    request: CommandRequest,
) -> Reply {
    let CommandRequest {
        request_id,
        request,
    } = request;
    if request.service() != service {
        return Reply::Refused {
            reason: format!("the {service} service does not take {request:?}"),
        };
    }
    let correlation = CorrelationId::from_uuid(request_id);
    let key = match eventcore::IdempotencyKey::try_new(format!("request-{request_id}")) {
        Ok(key) => key,
        Err(error) => {
            return Reply::Refused {
                reason: error.to_string(),
            };
        }
    };
    let options = ExecutionOptions::new()
        .with_correlation_id(correlation)
        .with_idempotency_key(key);
    let result = match request {
        Request::RegisterUser {
            user_id,
            name,
            email,
        } => match RegisterUser::new(&user_id, &name, &email) {
            Ok(command) => executor.execute_with(&command, options).await.map(|_| ()),
            Err(error) => Err(error),
        },
        Request::AddStock { sku, quantity } => match AddStock::new(&sku, quantity) {
            Ok(command) => executor.execute_with(&command, options).await.map(|_| ()),
            Err(error) => Err(error),
        },
        Request::PlaceOrder {
            order_id,
            customer,
            lines,
            card,
            address,
        } => match CreateOrder::new(&order_id, &customer, lines, &card, address) {
            Ok(command) => executor
                .execute_with(&command, options.with_actor(customer))
                .await
                .map(|_| ()),
            Err(error) => Err(error),
        },
    };
    match result {
        Ok(()) => Reply::Done {
            correlation: correlation.to_string(),
        },
        Err(error) => Reply::Refused {
            reason: error.to_string(),
        },
    }
}

/// Answers `service`'s commands on NATS until `shutdown` completes.
///
/// # Errors
///
/// The NATS client's errors when subscribing.
pub async fn serve_commands(
    client: async_nats::Client,
    prefix: String,
    service: ServiceName,
    executor: eventcore::CommandExecutor,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut requests = client
        .queue_subscribe(
            command_subject(&prefix, service),
            format!("{prefix}-{service}"),
        )
        .await?;
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let message = tokio::select! {
            () = &mut shutdown => return Ok(()),
            message = requests.next() => match message {
                Some(message) => message,
                None => return Ok(()),
            },
        };
        let reply = match serde_json::from_slice::<CommandRequest>(&message.payload) {
            Ok(request) => {
                // The root of the trace of everything the command causes, in every
                // service (the events carry its context across the broker).
                let span = tracing::info_span!(
                    "ecommerce.command",
                    otel.name = %format_args!("{service} command"),
                    otel.kind = "server",
                    service = %service,
                );
                tracing::Instrument::instrument(execute(service, &executor, request), span).await
            }
            Err(error) => Reply::Refused {
                reason: format!("not a request: {error}"),
            },
        };
        if let Some(to) = message.reply {
            let body = serde_json::to_vec(&reply)?;
            if let Err(error) = client.publish(to, body.into()).await {
                tracing::warn!(%error, "cannot answer a command");
            }
        }
    }
}

/// Where a deployment of the five processes lives: its NATS prefix (the first token of
/// every subject and stream) and the PostgreSQL schema prefix of its stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployment {
    /// `ECOMMERCE_PREFIX` (default `ecommerce`): NATS prefix and schema prefix.
    pub prefix: String,
}

impl Deployment {
    /// From `ECOMMERCE_PREFIX` (ASCII letters, digits and `_`; default `ecommerce`).
    pub fn from_env() -> Self {
        Deployment {
            prefix: std::env::var("ECOMMERCE_PREFIX").unwrap_or_else(|_| "ecommerce".to_owned()),
        }
    }

    /// The NATS transport of the deployment on `client`.
    ///
    /// # Errors
    ///
    /// An invalid prefix.
    pub fn transport(
        &self,
        client: async_nats::Client,
    ) -> Result<NatsTransport, Box<dyn std::error::Error + Send + Sync>> {
        Ok(NatsTransport::new(
            client,
            NatsConfig::default().with_prefix(self.prefix.clone())?,
        ))
    }

    /// A broker over the deployment's NATS streams.
    ///
    /// # Errors
    ///
    /// An invalid prefix.
    pub fn broker(
        &self,
        client: async_nats::Client,
    ) -> Result<Broker, Box<dyn std::error::Error + Send + Sync>> {
        let transport = self.transport(client)?;
        let subscriber: Arc<dyn EventSubscriber> = Arc::new(transport.subscriber());
        Ok(Broker::new(
            subscriber,
            Arc::new(move |service| {
                Arc::new(transport.publisher(service.clone())) as Arc<dyn EventPublisher>
            }),
        ))
    }

    /// The PostgreSQL schema of `service`'s store: `<prefix>_<service>`.
    pub fn schema(&self, service: ServiceName) -> String {
        format!("{}_{service}", self.prefix)
    }

    /// `service`'s store: its schema at `database_url` (migrated), or a fresh in-memory
    /// store when there is none (gone with the process).
    ///
    /// # Errors
    ///
    /// The store's connection and migration errors.
    pub async fn stores(
        &self,
        service: ServiceName,
        database_url: Option<&str>,
    ) -> Result<Stores, Box<dyn std::error::Error + Send + Sync>> {
        let Some(url) = database_url else {
            return Ok(super::shop::memory_stores());
        };
        let schema = eventcore_postgres::SchemaName::try_new(self.schema(service))?;
        let store = eventcore_postgres::PostgresEventStore::connect_with(
            eventcore_postgres::PostgresConfig::from_url(url)?.with_schema(schema),
        )
        .await?;
        store.migrate().await?;
        Ok((Arc::new(store.clone()), Arc::new(store)))
    }

    /// What a service process runs with: the system clock, a card gateway of its own
    /// (only the Payment service calls it), handlers parked after 5 attempts, and the
    /// payment deadline from `ECOMMERCE_PAYMENT_TIMEOUT_SECS` (default 30).
    pub fn context(&self) -> ServiceContext {
        let seconds = std::env::var("ECOMMERCE_PAYMENT_TIMEOUT_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(30);
        ServiceContext {
            clock: Arc::new(eventcore::saga::SystemClock),
            gateway: Arc::new(FakeGateway::default()),
            policy: ProjectionErrorPolicy::new().with_on_failure(eventcore::OnFailure::Park),
            payment_timeout: Duration::from_secs(seconds),
        }
    }
}

/// Sends `request` to its service and waits for the answer, asking again (with the same
/// request id: it happens once) while no instance answers (a service still starting, or
/// restarting, or an answer lost) until `patience` runs out.
///
/// # Errors
///
/// No answer within `patience`, or an answer that is not a [`Reply`].
pub async fn send(
    client: &async_nats::Client,
    prefix: &str,
    request: &CommandRequest,
    patience: Duration,
) -> Result<Reply, Box<dyn std::error::Error + Send + Sync>> {
    let subject = command_subject(prefix, request.request.service());
    let body = serde_json::to_vec(request)?;
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let asked = tokio::time::timeout(
            Duration::from_secs(5),
            client.request(subject.clone(), body.clone().into()),
        )
        .await;
        match asked {
            Ok(Ok(message)) => return Ok(serde_json::from_slice(&message.payload)?),
            Ok(Err(error)) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(%error, %subject, "no answer yet; asking again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(Err(error)) => return Err(error.into()),
            Err(_) if tokio::time::Instant::now() < deadline => {}
            Err(elapsed) => return Err(elapsed.into()),
        }
    }
}

/// The orders the driver places, and how each must end.
pub const ORDERS: [(&str, Ending); 5] = [
    ("A-1", Ending::Completed),
    ("B-1", Ending::OutOfStock),
    ("C-1", Ending::Declined),
    ("D-1", Ending::ShippingRefused),
    ("G-1", Ending::TimedOut),
];

/// How an order of the driver must end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Reserved, charged, shipped, completed.
    Completed,
    /// A line is short: nothing reserved or charged, cancelled.
    OutOfStock,
    /// The card is declined: released, cancelled, nothing charged.
    Declined,
    /// No carrier: refunded, released, cancelled.
    ShippingRefused,
    /// The gateway never answers: at the deadline voided, released, cancelled.
    TimedOut,
}

fn driver_order(order_id: &str, ending: Ending) -> Request {
    let line = |sku: &str, quantity| OrderLine {
        sku: sku.to_owned(),
        quantity,
        unit_price: 1_000,
    };
    let (lines, card, country) = match ending {
        Ending::Completed => (vec![line("lamp", 1), line("rug", 1)], "4242-x", "DE"),
        Ending::OutOfStock => (vec![line("lamp", 1), line("vase", 5)], "4242-x", "DE"),
        Ending::Declined => (vec![line("lamp", 1)], "4000-x-decline", "FR"),
        Ending::ShippingRefused => (vec![line("rug", 1)], "4242-x", "AQ"),
        Ending::TimedOut => (vec![line("lamp", 1)], "4000-x-hang", "SE"),
    };
    Request::PlaceOrder {
        order_id: order_id.to_owned(),
        customer: "xan".to_owned(),
        lines,
        card: card.to_owned(),
        address: Address {
            street: "1 Main Street".to_owned(),
            city: "Somewhere".to_owned(),
            country: country.to_owned(),
        },
    }
}

/// Signs the customer up, stocks the products and places [`ORDERS`] through the
/// services' command subjects; returns each order's correlation id.
///
/// # Errors
///
/// A service that does not answer within `patience`, or refuses.
pub async fn place_orders(
    client: &async_nats::Client,
    prefix: &str,
    patience: Duration,
) -> Result<Vec<(String, String)>, Box<dyn std::error::Error + Send + Sync>> {
    let setup = [
        Request::RegisterUser {
            user_id: "xan".to_owned(),
            name: "Xan".to_owned(),
            email: "xan@example.com".to_owned(),
        },
        Request::AddStock {
            sku: "lamp".to_owned(),
            quantity: 10,
        },
        Request::AddStock {
            sku: "rug".to_owned(),
            quantity: 10,
        },
        Request::AddStock {
            sku: "vase".to_owned(),
            quantity: 1,
        },
    ];
    for request in setup {
        let request = CommandRequest::new(request);
        if let Reply::Refused { reason } = send(client, prefix, &request, patience).await? {
            return Err(format!("{request:?} refused: {reason}").into());
        }
    }
    let mut placed = Vec::new();
    for (order_id, ending) in ORDERS {
        let request = CommandRequest::new(driver_order(order_id, ending));
        let deadline = tokio::time::Instant::now() + patience;
        // The Order service takes the order once it has the customer's profile (from
        // the User service's `UserRegistered`, over the broker).
        loop {
            match send(client, prefix, &request, patience).await? {
                Reply::Done { correlation } => {
                    placed.push((order_id.to_owned(), correlation));
                    break;
                }
                Reply::Refused { reason }
                    if reason.contains("not known") && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Reply::Refused { reason } => {
                    return Err(format!("order {order_id} refused: {reason}").into());
                }
            }
        }
    }
    Ok(placed)
}

/// Whether every saga of [`ORDERS`] has ended.
///
/// # Errors
///
/// The Order service's store errors.
pub async fn all_ended(ledger: &Ledger) -> eventcore::Result<bool> {
    for (order_id, _) in ORDERS {
        let phase = ledger.saga(order_id).await?.phase();
        if !matches!(phase, SagaPhase::Completed | SagaPhase::Aborted) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Checks how every order of [`ORDERS`] ended, in each service's own store: its saga,
/// the order, its reservation (once), its payment (charged at most once), its shipment;
/// returns one line per order.
///
/// # Errors
///
/// What did not hold, or a store error.
pub async fn check_orders(
    ledger: &Ledger,
) -> Result<Vec<String>, Box<dyn std::error::Error + Send + Sync>> {
    let mut lines = Vec::new();
    let inventory = ledger.log(ServiceName::Inventory).await?;
    for (order_id, ending) in ORDERS {
        let saga = ledger.saga(order_id).await?.phase();
        let order = ledger.order_status(order_id).await?;
        let payments = ledger.payment_events(order_id).await?;
        let payment = ledger.payment_status(order_id).await?;
        let shipment = ledger.shipment_status(order_id).await?;
        let count = |event_type: &str| {
            inventory
                .iter()
                .filter(|e| {
                    e.event_type.as_str() == event_type
                        && super::scenarios::order_of(e).as_deref() == Some(order_id)
                })
                .count()
        };
        let answers = count("StockReservationConfirmed") + count("StockReservationRefused");
        let captured = payments.iter().filter(|t| *t == "PaymentCaptured").count();
        let expected_ok = match ending {
            Ending::Completed => {
                saga == SagaPhase::Completed
                    && order == OrderStatus::Completed
                    && matches!(payment, PaymentStatus::Captured { .. })
                    && captured == 1
                    && shipment == ShipmentStatus::Created
                    && count("StockReserved") == 2
                    && count("StockReleased") == 0
            }
            Ending::OutOfStock => {
                saga == SagaPhase::Aborted
                    && order == OrderStatus::Cancelled
                    && payments.is_empty()
                    && count("StockReserved") == 0
                    && count("StockReservationRefused") == 1
            }
            Ending::Declined => {
                saga == SagaPhase::Aborted
                    && order == OrderStatus::Cancelled
                    && payments == ["PaymentRequested", "PaymentDeclined"]
                    && count("StockReserved") == 1
                    && count("StockReleased") == 1
            }
            Ending::ShippingRefused => {
                saga == SagaPhase::Aborted
                    && order == OrderStatus::Cancelled
                    && payments == ["PaymentRequested", "PaymentCaptured", "PaymentRefunded"]
                    && shipment == ShipmentStatus::Refused
                    && count("StockReleased") == 1
            }
            Ending::TimedOut => {
                saga == SagaPhase::Aborted
                    && order == OrderStatus::Cancelled
                    && payments == ["PaymentRequested", "PaymentVoided"]
                    && count("StockReleased") == 1
            }
        };
        let line = format!(
            "{order_id}: {ending:?}: saga {saga:?}, order {order:?}, payment {payments:?}, shipment {shipment:?}, {answers} stock answer(s)"
        );
        if !expected_ok || answers != 1 {
            return Err(format!("{line}: not as it should end").into());
        }
        lines.push(line);
    }
    Ok(lines)
}

/// The five services' stores of the deployment, for the driver's checks (read only).
///
/// # Errors
///
/// The stores' connection errors.
pub async fn ledger(
    deployment: &Deployment,
    database_url: &str,
) -> Result<Ledger, Box<dyn std::error::Error + Send + Sync>> {
    let mut stores = Vec::new();
    for service in ServiceName::ALL {
        stores.push(deployment.stores(service, Some(database_url)).await?);
    }
    Ok(Ledger::new(stores)?)
}

/// Starts service `name` of the deployment: its store, its runners on the broker.
///
/// # Errors
///
/// The store's and the broker's errors.
pub async fn start_service(
    deployment: &Deployment,
    name: ServiceName,
    client: async_nats::Client,
    database_url: Option<&str>,
) -> Result<(RunningService, Broker, ServiceContext), Box<dyn std::error::Error + Send + Sync>> {
    let broker = deployment.broker(client)?;
    let stores = deployment.stores(name, database_url).await?;
    let context = deployment.context();
    let running = RunningService::start(name, &stores, &broker, &context).await?;
    Ok((running, broker, context))
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Completes on Ctrl-C or SIGTERM.
async fn terminated() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn nats_url() -> Result<String, BoxError> {
    std::env::var("NATS_URL").map_err(|_| {
        "set NATS_URL (nats://host:port): the services talk over NATS JetStream".into()
    })
}

/// Runs `service` in this process until Ctrl-C or SIGTERM: its store, its runners over
/// NATS, `/metrics`, `/health` and `/ready` on `http`, its registration, its command
/// subject. Prints `ecommerce <service> ready: http://<address> ...` once it serves.
///
/// # Errors
///
/// What fails to start, or a part that fails for good.
pub async fn run_service(service: ServiceName, http: &str) -> Result<(), BoxError> {
    let prometheus = eventcore_http::install_prometheus()?;
    let tracer = install_tracing(service)?;
    let deployment = Deployment::from_env();
    let database_url = std::env::var("DATABASE_URL").ok();
    let client = async_nats::connect(nats_url()?).await?;
    let (mut running, broker, context) = start_service(
        &deployment,
        service,
        client.clone(),
        database_url.as_deref(),
    )
    .await?;
    // The topics it reads exist once their publishers started: wait for them (a
    // minute at most).
    let waiting_since = tokio::time::Instant::now();
    while let Err(error) = running.open().await {
        if waiting_since.elapsed() > Duration::from_secs(60) {
            return Err(format!("the topics it subscribes to never appeared: {error}").into());
        }
        tracing::debug!(%error, "waiting for the other services' topics");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let health = running.health_checks(&broker, &context, Duration::from_secs(60))?;
    let listener = tokio::net::TcpListener::bind(http).await?;
    let address = listener.local_addr()?;
    let registry = NatsServiceRegistry::new(client.clone());
    let registration = ServiceRegistration::new(service.id(), env!("CARGO_PKG_VERSION"))?
        .with_description(format!("the e-commerce example's {service} service"))
        .with_endpoint("http", format!("http://{address}"))?;
    let registered = registry.register(registration, health.clone()).await?;
    let executor = running.service().executor().clone();
    println!(
        "ecommerce {service} ready: http://{address} (store: {}; NATS prefix {})",
        if database_url.is_some() {
            deployment.schema(service)
        } else {
            "in memory".to_owned()
        },
        deployment.prefix
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let wait = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    let endpoints = eventcore_http::Endpoints::new(health)
        .with_prometheus(prometheus)
        .serve(listener, wait(stopped.clone()));
    let commands = serve_commands(
        client,
        deployment.prefix.clone(),
        service,
        executor,
        wait(stopped.clone()),
    );
    let runners = running.run(wait(stopped.clone()));
    // Whichever part ends (for good, or on the signal), the others stop too: a service
    // never goes on half working.
    let stop = &stop;
    let ending = |part| async move {
        let ended = part.await;
        let _ = stop.send(true);
        ended
    };
    let signal = async {
        tokio::select! {
            () = terminated() => {}
            () = wait(stopped.clone()) => {}
        }
        let _ = stop.send(true);
    };
    let endpoints = async { endpoints.await.map_err(BoxError::from) };
    let (served, answered, ran, ()) = tokio::join!(
        ending(Box::pin(endpoints)
            as std::pin::Pin<
                Box<dyn std::future::Future<Output = Result<(), BoxError>> + Send + '_>,
            >),
        ending(Box::pin(commands)),
        ending(Box::pin(async { runners.await.map_err(BoxError::from) })),
        signal
    );
    let _ = registered.deregister().await;
    let _ = tracer.shutdown();
    served?;
    answered?;
    ran?;
    Ok(())
}

/// Logs to stderr (`RUST_LOG`, default `info`) and traces with OpenTelemetry: every
/// span gets a trace context, which the events written under it carry to the other
/// services. Spans are not exported anywhere here; give the provider an exporter (OTLP,
/// say) to see them.
fn install_tracing(
    service: ServiceName,
) -> Result<opentelemetry_sdk::trace::SdkTracerProvider, BoxError> {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let subscriber = tracing_subscriber::registry()
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer(format!("ecommerce-{service}"))),
        )
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(filter),
        );
    tracing::subscriber::set_global_default(subscriber)?;
    Ok(provider)
}

/// Places [`ORDERS`] through the services of the deployment, waits until their sagas
/// ended and checks them in every service's store (`NATS_URL`, `DATABASE_URL`).
///
/// # Errors
///
/// A service that does not answer, a saga that does not end in 5 minutes, an order
/// that did not end as it should.
pub async fn drive() -> Result<(), BoxError> {
    let deployment = Deployment::from_env();
    let database_url = std::env::var("DATABASE_URL")
        .map_err(|_| "set DATABASE_URL: the driver checks each service's store")?;
    let client = async_nats::connect(nats_url()?).await?;
    let patience = Duration::from_secs(60);
    let placed = place_orders(&client, &deployment.prefix, patience).await?;
    for (order, correlation) in &placed {
        println!("placed {order} (correlation {correlation})");
    }
    let ledger = ledger(&deployment, &database_url).await?;
    let order_store = std::sync::Arc::clone(&ledger.stores()[ServiceName::Order.index()].0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    while !all_ended(&ledger).await? {
        if tokio::time::Instant::now() > deadline {
            return Err("the sagas did not end within 5 minutes".into());
        }
        // Woken by the Order service's next event (its store's live wait), at the
        // latest after a second.
        let head = order_store.head_position().await?;
        let _ =
            tokio::time::timeout(Duration::from_secs(1), order_store.wait_for_events(head)).await;
    }
    for line in check_orders(&ledger).await? {
        println!("checked {line}");
    }
    println!(
        "All {} orders ended as they should, in every service's store.",
        placed.len()
    );
    Ok(())
}
