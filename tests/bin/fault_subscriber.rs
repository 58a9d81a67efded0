//! A subscriber process for the NATS fault tests: billing's `SubscriptionRunner` on a
//! PostgreSQL schema. With an abort count `n`, the process aborts right after the
//! effect of its `n`-th event committed, before the acknowledgement: a crash between
//! effect and ack.
//!
//! Usage: `fault-subscriber <schema> <nats url> <prefix> [n]`, with `DATABASE_URL` set.

use std::sync::Arc;
use std::time::Duration;

use eventcore::distributed::{DistributedEvent, EventHandler, SubscriptionRunner};
use eventcore::{CommandExecutor, Dispatcher};
use eventcore_nats::{NatsConfig, NatsTransport};
use eventcore_postgres::{PostgresEventStore, SchemaName};
use eventcore_tests::two_services::{Billing, spec};

/// Billing, dying after the effect of its `abort_at`-th event.
struct DiesAfterEffect {
    billing: Billing,
    handled: u64,
    abort_at: Option<u64>,
}

impl EventHandler for DiesAfterEffect {
    async fn handle(
        &mut self,
        event: &DistributedEvent,
        dispatcher: &mut Dispatcher<'_>,
    ) -> eventcore::Result<()> {
        self.billing.handle(event, dispatcher).await?;
        self.handled += 1;
        if self.abort_at == Some(self.handled) {
            // The effect is committed; the acknowledgement never leaves.
            std::process::abort();
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(schema), Some(url), Some(prefix)) = (args.next(), args.next(), args.next()) else {
        return Err("usage: fault-subscriber <schema> <nats url> <prefix> [n]".into());
    };
    let abort_at = args.next().map(|n| n.parse()).transpose()?;
    let schema = SchemaName::try_new(schema)?;
    let store =
        PostgresEventStore::connect_with(eventcore_tests::postgres::config(&schema)).await?;
    let client = async_nats::connect(url).await?;
    let config = NatsConfig::default()
        .with_prefix(prefix)?
        .with_ack_wait(Duration::from_secs(2))?
        .with_pull_expiry(Duration::from_secs(1))?;
    let transport = NatsTransport::new(client, config);
    let mut runner = SubscriptionRunner::new(
        Arc::new(transport.subscriber()),
        spec(),
        DiesAfterEffect {
            billing: Billing,
            handled: 0,
            abort_at,
        },
        CommandExecutor::new(store),
    )?;
    runner.run(std::future::pending()).await?;
    Ok(())
}
