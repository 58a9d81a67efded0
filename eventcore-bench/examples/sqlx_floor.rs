//! The client's floor: one INSERT per transaction with EventCore's row shape, sent through
//! sqlx from C tokio tasks exactly as the store sends its statements (a pool, prepared
//! statements, a multi-threaded runtime), without EventCore. The gap between this and
//! `scripts/pg-limit.sh` (pgbench, in C) is what the Rust client costs on its own; the gap
//! between this and W5 is what EventCore adds.
//!
//! ```sh
//! DATABASE_URL=postgres://... cargo run --release -p eventcore-bench --example sqlx_floor -- [CONCURRENCY] [SECONDS]
//! ```

use std::time::{Duration, Instant};

use sqlx::postgres::PgPoolOptions;

const METADATA: &str = r#"{"correlation_id":"0191d0c4-0000-7000-8000-000000000000","causation_id":"0191d0c4-0000-7000-8000-000000000001"}"#;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL").map_err(|_| "set DATABASE_URL")?;
    let mut args = std::env::args().skip(1);
    let concurrency: usize = args.next().map_or(Ok(8), |a| a.parse())?;
    let seconds: u64 = args.next().map_or(Ok(10), |a| a.parse())?;
    let pool = PgPoolOptions::new()
        .max_connections(10)
        .connect(&url)
        .await?;
    let schema = format!("floor_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&pool)
        .await?;
    sqlx::query(&format!(
        "CREATE TABLE {schema}.events (
             global_position bigserial PRIMARY KEY, event_id uuid NOT NULL UNIQUE,
             stream_id text NOT NULL, stream_version bigint NOT NULL, event_type text NOT NULL,
             payload jsonb NOT NULL, metadata jsonb NOT NULL,
             recorded_at timestamptz NOT NULL DEFAULT now(), idempotency_key text,
             UNIQUE (stream_id, stream_version))"
    ))
    .execute(&pool)
    .await?;
    let insert = format!(
        "INSERT INTO {schema}.events (event_id, stream_id, stream_version, event_type, payload, metadata)
         VALUES ($1, $2, 1, 'Deposited', $3::text::jsonb, $4::text::jsonb)"
    );
    let end = Instant::now() + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..concurrency)
        .map(|task| {
            let (pool, insert) = (pool.clone(), insert.clone());
            tokio::spawn(async move {
                let mut n = 0_u64;
                while Instant::now() < end {
                    sqlx::query(&insert)
                        .bind(uuid::Uuid::new_v4())
                        .bind(format!("floor-{task}-{n}"))
                        .bind(r#"{"amount":1}"#)
                        .bind(METADATA)
                        .execute(&pool)
                        .await?;
                    n += 1;
                }
                Ok::<u64, sqlx::Error>(n)
            })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&pool)
        .await?;
    println!(
        "{{\"floor\":\"sqlx_one_insert\",\"concurrency\":{concurrency},\"tps\":{:.0}}}",
        total as f64 / seconds as f64
    );
    Ok(())
}
