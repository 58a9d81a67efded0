//! The distributed e-commerce example: `cargo run --example distributed_ecommerce`.
//!
//! Four services (Order, Inventory, Payment, Shipping) own their streams and talk only
//! through events and commands; the order saga takes each order through them and
//! compensates, in reverse order, when a step is refused or does not answer in time. The
//! example tells eight scenarios, checks each one's final state across the services, and
//! prints an order view built by a projection over all four.
//!
//! It uses the in-memory store, so it needs no services. With `DATABASE_URL` set it runs
//! on PostgreSQL instead, in a new schema named `ecommerce_<random>` (printed; drop it
//! when done). The saga's deadlines and the gateway's circuit breaker run on a manual
//! clock the example moves forward, so the timeout scenarios do not wait 30 real
//! seconds.
//!
//! Metrics go to a Prometheus recorder (`eventcore-http`); at the end the example prints
//! an excerpt of them and the shop's health report. With `--serve` it then serves
//! `/metrics`, `/health` and `/ready` on `127.0.0.1:9464` (or `ECOMMERCE_HTTP_ADDR`)
//! until Ctrl-C.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use chrono::{SubsecRound, Utc};
use eventcore::saga::ManualClock;
use eventcore::{CheckpointStore, EventId, EventStore, ProjectionErrorPolicy};
use eventcore_examples::distributed_ecommerce::payment::FakeGateway;
use eventcore_examples::distributed_ecommerce::scenarios::{Narrative, run_all};
use eventcore_examples::distributed_ecommerce::shop::Shop;
use eventcore_memory::InMemoryEventStore;
use eventcore_postgres::{PostgresConfig, PostgresEventStore, SchemaName};

type Stores = (Arc<dyn EventStore>, Arc<dyn CheckpointStore>);

/// The in-memory store, or PostgreSQL when `DATABASE_URL` is set.
async fn open_store() -> Result<Stores, Box<dyn std::error::Error>> {
    let Ok(url) = std::env::var("DATABASE_URL") else {
        println!("Store: in memory (set DATABASE_URL to use PostgreSQL)\n");
        let store = InMemoryEventStore::new();
        return Ok((Arc::new(store.clone()), Arc::new(store)));
    };
    let suffix = EventId::new().as_uuid().simple().to_string();
    let schema = SchemaName::try_new(format!("ecommerce_{}", &suffix[suffix.len() - 12..]))?;
    let store = PostgresEventStore::connect_with(
        PostgresConfig::from_url(&url)?.with_schema(schema.clone()),
    )
    .await?;
    store.migrate().await?;
    println!("Store: PostgreSQL, schema {schema}\n");
    Ok((Arc::new(store.clone()), Arc::new(store)))
}

#[tokio::main]
async fn main() -> ExitCode {
    let serve = std::env::args().skip(1).any(|arg| arg == "--serve");
    let prometheus = match eventcore_http::install_prometheus() {
        Ok(handle) => handle,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    };
    let (events, checkpoints) = match open_store().await {
        Ok(stores) => stores,
        Err(error) => {
            eprintln!("cannot open the event store: {error}");
            return ExitCode::FAILURE;
        }
    };
    let shop = Shop::new(
        events,
        checkpoints,
        ManualClock::new(Utc::now().trunc_subsecs(0)),
        Arc::new(FakeGateway::default()),
        ProjectionErrorPolicy::default(),
    );
    let mut shop = match shop {
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
    println!("\nAll eight scenarios ended in the state they should.");

    println!("\nMetrics (an excerpt of the Prometheus text):");
    let metrics = prometheus.render();
    for line in metrics.lines().filter(|line| {
        line.starts_with("eventcore_commands_total{") && line.contains("CreateOrder\"")
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
    let report = health.report().await;
    println!("\nHealth: {}", report.status);
    for component in &report.components {
        let lag = component
            .lag_positions
            .map(|n| format!("at most {n} log positions behind"))
            .unwrap_or_default();
        println!(
            "  {:<28} {:<9} {lag}",
            component.name,
            component.status.as_str()
        );
    }
    if !serve {
        return ExitCode::SUCCESS;
    }
    let address =
        std::env::var("ECOMMERCE_HTTP_ADDR").unwrap_or_else(|_| "127.0.0.1:9464".to_owned());
    let listener = match tokio::net::TcpListener::bind(&address).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("cannot listen on {address}: {error}");
            return ExitCode::FAILURE;
        }
    };
    println!("\nServing http://{address}/metrics, /health and /ready; Ctrl-C stops.");
    let served = eventcore_http::Endpoints::new(health)
        .with_prometheus(prometheus)
        .serve(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await;
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("serving failed: {error}");
            ExitCode::FAILURE
        }
    }
}
