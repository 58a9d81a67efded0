//! The PostgreSQL [`EventStore`]: the store's handle and its trait impls, each a short
//! delegation to the file of its concern beside this one:
//!
//! - `store/sql.rs`: the statements (`src/sql/*.sql`), with the schema filled in once;
//! - `store/rows.rs`: rows to events and numbers, damaged rows kept in their place;
//! - `store/append.rs`: both append paths, and answers after a lost connection;
//! - `store/read.rs`: stream reads and log pages with their horizon;
//! - `store/live.rs`: the heads and waiting for the log to grow (LISTEN/NOTIFY);
//! - `store/checkpoints.rs`: checkpoints and parked events;
//! - `store/snapshots.rs`: snapshots of command states.

mod append;
mod checkpoints;
mod live;
mod read;
mod rows;
mod snapshots;
mod sql;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use eventcore::{
    AppendOutcome, AppendRequest, CheckpointStore, EventStore, GlobalPosition, IdempotencyKey,
    LogQuery, LogRead, ParkedEvent, ProjectionName, RecordedEvent, Snapshot, SnapshotKey,
    SnapshotStore, StreamId, StreamVersion, StreamsSnapshot,
};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::sync::watch;
use tracing::Instrument;

use crate::config::{DEFAULT_NOTIFY_INTERVAL, PostgresConfig, SchemaName};
use crate::error::{Error, map_sqlx_error};
use crate::notify;

pub use live::LiveWaitMetrics;
pub(crate) use read::prefix_param;
pub(crate) use rows::log_read_from_rows;
pub(crate) use sql::Sql;

/// An event store on PostgreSQL. Cheap to clone; clones share the pool.
///
/// Every operation is one SQL statement, so one round trip: a command executed through
/// the [`eventcore::CommandExecutor`] costs two (read its streams, append), plus one if
/// it carries an idempotency key, and one (the append) when the executor decides on a
/// state it kept ([`eventcore::CommandLogic::state_cache`]). See `docs/adr/0003-postgres-global-order.md` for how
/// the global log keeps the prefix property under concurrent commits.
///
/// # Examples
///
/// ```no_run
/// use eventcore_postgres::{PostgresConfig, PostgresEventStore, SchemaName};
///
/// # async fn run() -> Result<(), eventcore_postgres::Error> {
/// let config = PostgresConfig::from_url("postgres://app@127.0.0.1/app")?
///     .with_schema(SchemaName::try_new("orders")?);
/// let store = PostgresEventStore::connect_with(config).await?;
/// store.migrate().await?;
/// let executor = eventcore::CommandExecutor::new(store);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct PostgresEventStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    /// Connections kept out of the pool between statements (`kept.rs`).
    kept: crate::kept::KeptConnections,
    schema: SchemaName,
    sql: Sql,
    channel: String,
    fallback_poll_interval: Duration,
    notify_interval: Duration,
    /// What this process's appends did, for its live readers and the notifier task.
    appended: watch::Sender<notify::Appends>,
    /// Bumped by the listener task on every notification (and reconnection).
    wake: watch::Sender<u64>,
    background: OnceLock<notify::Tasks>,
    /// How live readers found out about new events.
    live: live::LiveCounters,
}

impl PostgresEventStore {
    /// Connects to `url` with the default settings (schema `eventcore`).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidUrl`], or [`Error::Connect`] when the server cannot be reached.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        Self::connect_with(PostgresConfig::from_url(url)?).await
    }

    /// Connects with `config`. Opens one connection to fail early when the server cannot
    /// be reached; does not migrate (see [`PostgresEventStore::migrate`]).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidUrl`] when the options hold a NUL character where the startup
    /// message would carry it; [`Error::Connect`] when the server cannot be reached or
    /// refuses the connection.
    pub async fn connect_with(config: PostgresConfig) -> Result<Self, Error> {
        // Options built with sqlx directly (PostgresConfig::from_options) are checked
        // here; from_url checked its own.
        crate::config::check_options(&config.connect)?;
        // The global order needs READ COMMITTED (ADR 0003); the functions refuse other
        // levels, and these pools never start in one whatever the server's default.
        let mut connect = config
            .connect
            .clone()
            // The startup `options` are space-separated: the space is escaped.
            .options([("default_transaction_isolation", "read\\ committed")]);
        if let Some(timeout) = config.statement_timeout {
            connect = connect.options([(
                "statement_timeout",
                crate::config::statement_timeout_millis(timeout).to_string(),
            )]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(config.acquire_timeout)
            .connect_with(connect)
            .await
            .map_err(|source| Error::Connect { source })?;
        // At least one connection always goes back to the pool after each statement.
        let kept = config
            .kept_connections
            .unwrap_or(config.max_connections.saturating_sub(2) as usize)
            .min(config.max_connections.saturating_sub(1) as usize);
        Ok(Self::new(
            pool,
            config.schema,
            config.fallback_poll_interval,
            config.notify_interval,
            kept,
        ))
    }

    /// A store over an existing pool, in `schema`. The pool's settings (size, timeouts,
    /// TLS) are used as they are.
    pub fn from_pool(pool: PgPool, schema: SchemaName) -> Self {
        Self::new(
            pool,
            schema,
            Duration::from_secs(1),
            DEFAULT_NOTIFY_INTERVAL,
            0,
        )
    }

    fn new(
        pool: PgPool,
        schema: SchemaName,
        fallback_poll_interval: Duration,
        notify_interval: Duration,
        kept_connections: usize,
    ) -> Self {
        // NOTIFY refuses channel names of 64 bytes or more. Two schemas sharing the
        // first 53 bytes share a channel: their readers get extra wake-ups, nothing else.
        let mut channel = format!("eventcore_{}", schema.as_str());
        channel.truncate(63);
        PostgresEventStore {
            inner: Arc::new(Inner {
                sql: Sql::for_schema(&schema),
                kept: crate::kept::KeptConnections::new(pool.clone(), kept_connections),
                pool,
                schema,
                channel,
                fallback_poll_interval,
                notify_interval,
                appended: watch::Sender::new(notify::Appends::default()),
                wake: watch::Sender::new(0),
                background: OnceLock::new(),
                live: live::LiveCounters::default(),
            }),
        }
    }

    /// Creates the schema if missing and applies pending migrations; see
    /// [`crate::migrate`].
    ///
    /// # Errors
    ///
    /// As [`crate::migrate`].
    pub async fn migrate(&self) -> Result<(), Error> {
        crate::migrate(&self.inner.pool, &self.inner.schema).await
    }

    /// The connection pool. Close it with [`PostgresEventStore::close`]: the pool's own
    /// `close` waits for every connection, and the store keeps some out of the pool
    /// between statements ([`PostgresConfig::with_kept_connections`]).
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// Gives the connections kept between statements back to the pool and closes it,
    /// waiting for statements in flight to end. Later operations fail with a
    /// (non-retryable) error saying the pool is closed.
    pub async fn close(&self) {
        self.inner.kept.close().await;
    }

    /// The schema the store's tables live in.
    pub fn schema(&self) -> &SchemaName {
        &self.inner.schema
    }

    /// How this store's live readers have found out about new events so far: how often
    /// they looked, and how often only a poll found them (see [`LiveWaitMetrics`]).
    pub fn live_wait_metrics(&self) -> LiveWaitMetrics {
        self.live_wait_metrics_impl()
    }

    /// A connection for one statement (see `kept.rs`).
    async fn lease(&self, op: &'static str) -> eventcore::Result<crate::kept::Lease<'_>> {
        self.inner
            .kept
            .lease()
            .await
            .map_err(|e| map_sqlx_error(e, op, None))
    }

    pub(crate) fn sql(&self) -> &Sql {
        &self.inner.sql
    }
}

impl std::fmt::Debug for PostgresEventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresEventStore")
            .field("schema", &self.inner.schema)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl EventStore for PostgresEventStore {
    async fn read_streams(&self, streams: &[StreamId]) -> eventcore::Result<StreamsSnapshot> {
        self.read_streams_impl(streams).await
    }

    async fn read_streams_after(
        &self,
        streams: &[(StreamId, StreamVersion)],
    ) -> eventcore::Result<StreamsSnapshot> {
        self.read_streams_after_impl(streams).await
    }

    async fn append(&self, request: AppendRequest) -> eventcore::Result<AppendOutcome> {
        let span = tracing::debug_span!(
            "eventcore.postgres.append",
            streams = request.streams.len(),
            events = request.event_count(),
        );
        self.append_traced(request).instrument(span).await
    }

    async fn read_all(&self, query: &LogQuery) -> eventcore::Result<Vec<RecordedEvent>> {
        Ok(self.read_log_impl(query).await?.events)
    }

    async fn read_log(&self, query: &LogQuery) -> eventcore::Result<LogRead> {
        self.read_log_impl(query).await
    }

    async fn head_position(&self) -> eventcore::Result<Option<GlobalPosition>> {
        Ok(self.heads().await?.visible.map(GlobalPosition::new))
    }

    async fn wait_for_events(&self, after: Option<GlobalPosition>) -> eventcore::Result<()> {
        self.wait_for_events_impl(after).await
    }

    async fn idempotent_outcome(
        &self,
        key: &IdempotencyKey,
    ) -> eventcore::Result<Option<AppendOutcome>> {
        self.idempotent_outcome_impl(key).await
    }

    async fn peek_log(
        &self,
        after: Option<GlobalPosition>,
        limit: usize,
    ) -> eventcore::Result<Vec<RecordedEvent>> {
        self.peek_log_impl(after, limit).await
    }

    fn snapshots(&self) -> Option<&dyn SnapshotStore> {
        Some(self)
    }
}

/// Snapshots live in the store's schema (migration 0008), one row per key.
#[async_trait]
impl SnapshotStore for PostgresEventStore {
    async fn load_snapshot(&self, key: &SnapshotKey) -> eventcore::Result<Option<Snapshot>> {
        self.load_snapshot_impl(key).await
    }

    async fn save_snapshot(&self, snapshot: &Snapshot) -> eventcore::Result<bool> {
        self.save_snapshot_impl(snapshot).await
    }

    async fn delete_snapshot(&self, snapshot: &Snapshot) -> eventcore::Result<bool> {
        self.delete_snapshot_impl(snapshot).await
    }

    async fn delete_snapshots(&self, name: &str) -> eventcore::Result<u64> {
        self.delete_snapshots_impl(name).await
    }
}

/// Checkpoints and parked events live in the store's schema (migration 0002), so a
/// read model in the same database can commit with its checkpoint.
#[async_trait]
impl CheckpointStore for PostgresEventStore {
    async fn load_checkpoint(
        &self,
        projection: &ProjectionName,
    ) -> eventcore::Result<Option<GlobalPosition>> {
        self.load_checkpoint_impl(projection).await
    }

    async fn save_checkpoint(
        &self,
        projection: &ProjectionName,
        position: GlobalPosition,
    ) -> eventcore::Result<()> {
        self.save_checkpoint_impl(projection, position).await
    }

    async fn reset_checkpoint(&self, projection: &ProjectionName) -> eventcore::Result<()> {
        self.reset_checkpoint_impl(projection).await
    }

    async fn park(&self, parked: ParkedEvent) -> eventcore::Result<()> {
        self.park_impl(parked).await
    }

    async fn parked(&self, projection: &ProjectionName) -> eventcore::Result<Vec<ParkedEvent>> {
        self.parked_impl(projection).await
    }
}
