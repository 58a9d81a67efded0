//! The PostgreSQL event store for EventCore.
//!
//! [`PostgresEventStore`] implements [`eventcore::EventStore`] over sqlx and passes the
//! whole conformance suite. What it guarantees:
//!
//! - **Atomic multi-stream appends** in one transaction, with the expected version of
//!   every participating stream checked under row locks — read-only participants
//!   included — and conflicts reported as [`eventcore::Error::VersionConflict`].
//! - **The prefix property** of the global log under concurrent commits from any number
//!   of connections and processes, without serializing commits: an append marks the
//!   positions it is about to take while its transaction runs, and readers stop below the
//!   oldest mark still held. Nothing is skipped, nothing arrives out of order, and a
//!   rolled-back append stalls nobody (`docs/adr/0003-postgres-global-order.md`).
//! - **One round trip per operation**: an append is one statement (a plain one for a
//!   single event to one stream, a PL/pgSQL function call otherwise), so a command
//!   costs two round trips (read, append), and one once the executor keeps its state
//!   (`CommandLogic::state_cache`).
//! - **Immutability enforced by the database**: UPDATE, DELETE and TRUNCATE of events
//!   are refused by triggers.
//! - **Idempotency keys** stored with the events and enforced by a unique key.
//! - **Live readers without polling**: LISTEN/NOTIFY, with polling only as the fallback.
//! - **Schemas**: every store lives in a configurable schema; two stores in two schemas
//!   of one database do not see each other.
//!
//! # Examples
//!
//! ```no_run
//! use eventcore::{CommandExecutor, EventStore};
//! use eventcore_postgres::{PostgresConfig, PostgresEventStore, SchemaName};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = PostgresConfig::from_url(&std::env::var("DATABASE_URL")?)?
//!     .with_schema(SchemaName::try_new("bank")?)
//!     .with_max_connections(16);
//! let store = PostgresEventStore::connect_with(config).await?;
//! store.migrate().await?; // idempotent; safe from several processes at once
//! let executor = CommandExecutor::new(store);
//! # Ok(())
//! # }
//! ```
//!
//! TLS is available (rustls): use `sslmode=require` (or `verify-full`) in the URL, or
//! build [`sqlx::postgres::PgConnectOptions`] yourself and pass them to
//! [`PostgresConfig::from_options`].

mod config;
#[cfg(test)]
mod config_properties;
mod election;
mod error;
mod kept;
mod migrate;
mod notify;
mod store;
mod transactional;

pub use crate::config::{MAX_WAIT, PostgresConfig, SchemaName};
pub use crate::election::PostgresLeaderElection;
pub use crate::error::Error;
pub use crate::migrate::{MIGRATOR, migrate};
pub use crate::store::{LiveWaitMetrics, PostgresEventStore};
pub use crate::transactional::{TransactionalProjection, TransactionalProjectionRunner};

/// The sqlx crate this store is built on, for building connect options and pools.
pub use sqlx;

/// The manual's PostgreSQL chapter, compiled as doc tests so it cannot drift.
#[cfg(doctest)]
#[doc = include_str!("../../docs/postgres.md")]
struct ManualPostgres;

/// The manual's projections chapter (it uses both stores), compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../docs/projections.md")]
struct ManualProjections;
