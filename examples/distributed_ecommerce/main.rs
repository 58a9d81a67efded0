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
//! when done). The saga's deadlines run on a manual clock the example moves forward, so
//! the timeout scenario does not wait 30 real seconds.

use std::process::ExitCode;
use std::sync::Arc;

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
    match run_all(&mut shop, &mut narrative).await {
        Ok(()) => {
            println!("\nAll eight scenarios ended in the state they should.");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("\nFAILED: {error}");
            ExitCode::FAILURE
        }
    }
}
