//! The distributed e-commerce example: `cargo run --example distributed_ecommerce`.
//!
//! Five services (User, Order, Inventory, Payment, Shipping), each with its own event
//! store, learn about each other only from the events they publish on their topics;
//! the order saga (in the Order service) asks the others for each step with a
//! `…Requested` event and waits for their answers, and compensates, in reverse order,
//! when a step is refused or does not answer in time. The example tells nine scenarios,
//! checks each one's final state in every service's own store, and prints the
//! storefront's order view, built from the published events alone.
//!
//! By default everything runs in this process over in-memory stores and the in-memory
//! broker, deterministic, and needs no services. With `DATABASE_URL` set each service
//! gets its own PostgreSQL schema, `ecommerce_<random>_<service>` (printed; drop them
//! when done); with `NATS_URL` set the services talk over NATS JetStream (streams and
//! consumers under a fresh prefix, printed). The saga's deadlines and the gateway's circuit breaker run on a manual
//! clock the example moves forward, so the timeout scenarios do not wait 30 real
//! seconds.
//!
//! Metrics go to a Prometheus recorder (`eventcore-http`); at the end the example prints
//! an excerpt of them and every service's health report.
//!
//! As separate processes, over NATS JetStream (`NATS_URL`, required) and, with
//! `DATABASE_URL`, PostgreSQL (schema `<ECOMMERCE_PREFIX>_<service>`; the prefix, default
//! `ecommerce`, is also the NATS prefix):
//!
//! - `--service <user|order|inventory|payment|shipping> [--http ADDR]` runs one service:
//!   `/metrics`, `/health` and `/ready` on `ADDR` (default `127.0.0.1:0`, printed),
//!   registered in the NATS service registry, taking commands on
//!   `<prefix>.<service>.commands`, until Ctrl-C or SIGTERM;
//! - `--drive` places five orders through services started that way, waits for their
//!   sagas to end (the payment deadline is `ECOMMERCE_PAYMENT_TIMEOUT_SECS` of the Order
//!   service, default 30) and checks every order in each service's store (needs
//!   `DATABASE_URL`). `scripts/ecommerce-processes.sh` starts the five and drives them.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use chrono::{SubsecRound, Utc};
use eventcore::saga::ManualClock;
use eventcore::{EventId, ProjectionErrorPolicy};
use eventcore_examples::distributed_ecommerce::contracts::ServiceName;
use eventcore_examples::distributed_ecommerce::payment::FakeGateway;
use eventcore_examples::distributed_ecommerce::process::Deployment;
use eventcore_examples::distributed_ecommerce::scenarios::{Narrative, run_all};
use eventcore_examples::distributed_ecommerce::shop::{
    Broker, Environment, Shop, Stores, memory_stores,
};
use eventcore_memory::InMemoryBroker;
use eventcore_postgres::{PostgresConfig, PostgresEventStore, SchemaName};

mod processes;

/// One store per service: in memory, or a PostgreSQL schema each when `DATABASE_URL` is
/// set.
async fn open_stores() -> Result<Vec<Stores>, Box<dyn std::error::Error>> {
    let Ok(url) = std::env::var("DATABASE_URL") else {
        println!("Stores: one in memory per service (set DATABASE_URL to use PostgreSQL)");
        return Ok(ServiceName::ALL.iter().map(|_| memory_stores()).collect());
    };
    let suffix = EventId::new().as_uuid().simple().to_string();
    let suffix = &suffix[suffix.len() - 8..];
    let mut stores = Vec::new();
    for service in ServiceName::ALL {
        let schema = SchemaName::try_new(format!("ecommerce_{suffix}_{service}"))?;
        let store = PostgresEventStore::connect_with(
            PostgresConfig::from_url(&url)?.with_schema(schema.clone()),
        )
        .await?;
        store.migrate().await?;
        println!("Store of the {service} service: PostgreSQL, schema {schema}");
        stores.push((Arc::new(store.clone()) as _, Arc::new(store) as _));
    }
    Ok(stores)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| args.iter().position(|a| a == name);
    let value = |name: &str| flag(name).and_then(|i| args.get(i + 1)).cloned();
    if flag("--service").is_some() {
        let Some(service) = value("--service").as_deref().and_then(ServiceName::parse) else {
            eprintln!("--service takes one of: user, order, inventory, payment, shipping");
            return ExitCode::FAILURE;
        };
        let http = value("--http").unwrap_or_else(|| "127.0.0.1:0".to_owned());
        return match processes::run_service(service, &http).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("the {service} service failed: {error}");
                ExitCode::FAILURE
            }
        };
    }
    if flag("--drive").is_some() {
        return match processes::drive().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("FAILED: {error}");
                ExitCode::FAILURE
            }
        };
    }
    let prometheus = match eventcore_http::install_prometheus() {
        Ok(handle) => handle,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    };
    let stores = match open_stores().await {
        Ok(stores) => stores,
        Err(error) => {
            eprintln!("cannot open the event stores: {error}");
            return ExitCode::FAILURE;
        }
    };
    let broker = match std::env::var("NATS_URL") {
        Ok(url) => {
            let suffix = EventId::new().as_uuid().simple().to_string();
            let deployment = Deployment {
                prefix: format!("ecommerce_{}", &suffix[suffix.len() - 8..]),
            };
            let broker = match async_nats::connect(&url).await {
                Ok(client) => deployment.broker(client),
                Err(error) => Err(error.into()),
            };
            match broker {
                Ok(broker) => {
                    println!(
                        "Broker: NATS JetStream at {url}, prefix {} (streams and consumers stay: remove them when done)\n",
                        deployment.prefix
                    );
                    broker
                }
                Err(error) => {
                    eprintln!("cannot use NATS at {url}: {error}");
                    return ExitCode::FAILURE;
                }
            }
        }
        Err(_) => {
            println!("Broker: in memory (set NATS_URL to use NATS JetStream)\n");
            Broker::in_memory(&InMemoryBroker::new())
        }
    };
    let env = Environment {
        clock: ManualClock::new(Utc::now().trunc_subsecs(0)),
        gateway: Arc::new(FakeGateway::default()),
        // One attempt, then the runner stops with the error (the scenario fails loudly):
        // the scenarios never wait for a backoff.
        policy: ProjectionErrorPolicy::new().with_max_attempts(1),
    };
    let mut shop = match Shop::start(stores, broker, env).await {
        Ok(shop) => shop,
        Err(error) => {
            eprintln!("cannot start the services: {error}");
            return ExitCode::FAILURE;
        }
    };
    let mut narrative = Narrative::printing();
    if let Err(error) = run_all(&mut shop, &mut narrative).await {
        eprintln!("\nFAILED: {error}");
        return ExitCode::FAILURE;
    }
    println!("\nAll nine scenarios ended in the state they should.");

    println!("\nMetrics (an excerpt of the Prometheus text):");
    let metrics = prometheus.render();
    for line in metrics.lines().filter(|line| {
        line.starts_with("eventcore_commands_total{") && line.contains("CreateOrder\"")
            || line.starts_with("eventcore_events_published_total")
            || line.starts_with("eventcore_events_consumed_total")
            || line.starts_with("eventcore_version_conflicts_total")
            || line.starts_with("eventcore_circuit_breaker_state_changes_total")
    }) {
        println!("  {line}");
    }
    let health = match shop.health_checks(Duration::from_secs(30)) {
        Ok(health) => health,
        Err(error) => {
            eprintln!("cannot make the health checks: {error}");
            return ExitCode::FAILURE;
        }
    };
    println!("\nHealth:");
    for checks in health {
        let report = checks.report().await;
        println!("  {}: {}", report.service, report.status);
        for component in &report.components {
            println!("    {:<44} {}", component.name, component.status.as_str());
        }
    }
    ExitCode::SUCCESS
}
