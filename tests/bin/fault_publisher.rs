//! A publisher process for the NATS fault tests: the orders service's `PublisherRunner`
//! on a PostgreSQL schema, publishing to NATS until it is killed.
//!
//! Usage: `fault-publisher <schema> <nats url> <prefix>`, with `DATABASE_URL` set.

use std::sync::Arc;

use eventcore::EventStore;
use eventcore_nats::{NatsConfig, NatsTransport};
use eventcore_postgres::{PostgresEventStore, SchemaName};
use eventcore_tests::two_services::{orders_service, publisher_on};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(schema), Some(url), Some(prefix)) = (args.next(), args.next(), args.next()) else {
        return Err("usage: fault-publisher <schema> <nats url> <prefix>".into());
    };
    let schema = SchemaName::try_new(schema)?;
    let store =
        PostgresEventStore::connect_with(eventcore_tests::postgres::config(&schema)).await?;
    let client = async_nats::connect(url).await?;
    let transport = NatsTransport::new(client, NatsConfig::default().with_prefix(prefix)?);
    let orders: Arc<dyn EventStore> = Arc::new(store.clone());
    let mut runner = publisher_on(
        &orders,
        Arc::new(store),
        Arc::new(transport.publisher(orders_service())),
    );
    runner.run(std::future::pending()).await?;
    Ok(())
}
