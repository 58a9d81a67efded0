//! The PostgreSQL [`EventStore`].

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use eventcore::{
    AppendOutcome, AppendRequest, AppendedEvent, CheckpointStore, EventDamage, EventId,
    EventMetadata, EventPayload, EventStore, EventType, ExpectedVersion, GlobalPosition,
    IdempotencyKey, LogQuery, LogRead, ParkedEvent, RecordedEvent, StreamId, StreamVersion,
    StreamsSnapshot, check_checkpoint_position, check_projection_name,
};
use sqlx::postgres::{PgPoolOptions, PgRow};
use sqlx::{PgPool, Row};
use tokio::sync::watch;
use tracing::Instrument;
use uuid::Uuid;

use crate::config::{DEFAULT_NOTIFY_INTERVAL, PostgresConfig, SchemaName};
use crate::error::{
    Error, is_connection_failure, is_duplicate_event_id, is_ended_by_server,
    is_stream_version_taken, map_sqlx_error,
};
use crate::notify;

/// The SQL of every operation, with the schema filled in once at construction.
pub(crate) struct Sql {
    pub(crate) read_streams: String,
    pub(crate) read_streams_after: String,
    pub(crate) read_all: String,
    pub(crate) heads: String,
    pub(crate) append: String,
    pub(crate) append_one: String,
    pub(crate) idempotent_outcome: String,
    pub(crate) events_by_id: String,
    pub(crate) key_attempt: String,
    pub(crate) load_checkpoint: String,
    pub(crate) save_checkpoint: String,
    pub(crate) reset_checkpoint: String,
    pub(crate) park: String,
    pub(crate) parked: String,
    pub(crate) claim_checkpoint: String,
    pub(crate) lock_checkpoint: String,
    pub(crate) advance_checkpoint: String,
}

impl Sql {
    fn for_schema(schema: &SchemaName) -> Self {
        let fill = |template: &str| {
            // The schema's name inside SQL string literals (lock keys), where the
            // functions use current_schema(). SchemaName allows no quote character.
            // Comment lines are for readers of the files: the server gets the statement
            // alone (and pg_stat_activity, which keeps the first 1 kB of each, shows it).
            template
                .lines()
                .filter(|line| !line.trim_start().starts_with("--"))
                .collect::<Vec<_>>()
                .join("\n")
                .replace("{schema}", &schema.quoted())
                .replace("{schema_name}", schema.as_str())
        };
        Sql {
            read_streams: fill(include_str!("sql/read_streams.sql")),
            read_streams_after: fill(include_str!("sql/read_streams_after.sql")),
            read_all: fill(include_str!("sql/read_all.sql")),
            heads: fill(include_str!("sql/heads.sql")),
            append: fill(include_str!("sql/append.sql")),
            append_one: fill(include_str!("sql/append_one.sql")),
            idempotent_outcome: fill(include_str!("sql/idempotent_outcome.sql")),
            events_by_id: fill(include_str!("sql/events_by_id.sql")),
            key_attempt: fill(include_str!("sql/key_attempt.sql")),
            load_checkpoint: fill(include_str!("sql/load_checkpoint.sql")),
            save_checkpoint: fill(include_str!("sql/save_checkpoint.sql")),
            reset_checkpoint: fill(include_str!("sql/reset_checkpoint.sql")),
            park: fill(include_str!("sql/park.sql")),
            parked: fill(include_str!("sql/parked.sql")),
            claim_checkpoint: fill(include_str!("sql/claim_checkpoint.sql")),
            lock_checkpoint: fill(include_str!("sql/lock_checkpoint.sql")),
            advance_checkpoint: fill(include_str!("sql/advance_checkpoint.sql")),
        }
    }
}

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
///     .schema(SchemaName::try_new("orders")?);
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
    /// The last position this process appended, for the notifier task.
    appended: watch::Sender<u64>,
    /// Bumped by the listener task on every notification (and reconnection).
    wake: watch::Sender<u64>,
    background: OnceLock<notify::Tasks>,
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
                appended: watch::Sender::new(0),
                wake: watch::Sender::new(0),
                background: OnceLock::new(),
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
    /// between statements ([`PostgresConfig::kept_connections`]).
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

    /// Parks an event on `conn` (inside the caller's transaction).
    pub(crate) async fn park_on(
        &self,
        conn: &mut sqlx::PgConnection,
        parked: ParkedEvent,
    ) -> eventcore::Result<()> {
        let parked = parked.checked()?;
        park_query(&self.inner.sql.park, &parked)?
            .execute(conn)
            .await
            .map_err(|e| map_sqlx_error(e, "parking an event", None))?;
        Ok(())
    }

    /// Starts the LISTEN and NOTIFY tasks on first use. They need a Tokio runtime; without
    /// one, live readers fall back to polling instead of failing.
    fn ensure_background(&self) -> bool {
        if self.inner.background.get().is_some() {
            return true;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        let _ = self.inner.background.get_or_init(|| {
            notify::Tasks::start(
                &runtime,
                self.inner.pool.clone(),
                self.inner.channel.clone(),
                self.inner.notify_interval,
                self.inner.appended.subscribe(),
                self.inner.wake.clone(),
            )
        });
        true
    }

    async fn heads(&self) -> eventcore::Result<Heads> {
        let op = "reading the head";
        let mut conn = self.lease(op).await?;
        let row = sqlx::query(&self.inner.sql.heads)
            .fetch_one(&mut *conn)
            .await;
        conn.done(&row);
        let row = row.map_err(|e| map_sqlx_error(e, op, None))?;
        let visible: Option<i64> = row.try_get("visible").map_err(decode_error)?;
        let committed: Option<i64> = row.try_get("committed").map_err(decode_error)?;
        Ok(Heads {
            visible: visible.map(|p| p.max(0) as u64),
            committed: committed.map(|p| p.max(0) as u64),
        })
    }

    /// Where the events of `request` landed, after queueing behind any append still
    /// holding their streams; `None` unless every one of them is stored (and when the
    /// request carries none: there is nothing to find).
    async fn stored_events(
        &self,
        request: &AppendRequest,
    ) -> eventcore::Result<Option<Vec<AppendedEvent>>> {
        let ids: Vec<Uuid> = request
            .streams
            .iter()
            .flat_map(|s| &s.events)
            .map(|e| e.event_id.as_uuid())
            .collect();
        if ids.is_empty() {
            return Ok(None);
        }
        let streams: Vec<&str> = request
            .streams
            .iter()
            .filter(|s| !s.events.is_empty())
            .map(|s| s.stream_id.as_str())
            .collect();
        let rows = sqlx::query(&self.inner.sql.events_by_id)
            .bind(&streams)
            .bind(&ids)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(|e| map_sqlx_error(e, "checking an interrupted append", None))?;
        if rows.len() != ids.len() {
            return Ok(None);
        }
        rows.iter()
            .map(appended_from_row)
            .collect::<eventcore::Result<Vec<_>>>()
            .map(Some)
    }

    /// After the connection failed with `request` in flight: what it did, if that can
    /// be known now. `attempt` is the id this call stored with the request's key.
    async fn interrupted_outcome(
        &self,
        request: &AppendRequest,
        attempt: Uuid,
    ) -> eventcore::Result<Option<AppendOutcome>> {
        let stored = self.stored_events(request).await?;
        let Some(key) = &request.idempotency_key else {
            // Without a key, the event ids are the request's identity: found means
            // stored (by this call, or an identical earlier one whose answer was lost
            // too; they cannot be told apart here). A request without events and
            // without a key leaves no trace: whether its expectations held is unknown.
            return Ok(stored.map(AppendOutcome::written));
        };
        let carries_events = request.event_count() > 0;
        // The key's row says which attempt stored it; it is written in the same
        // transaction as the events, after the stream locks stored_events waited for.
        let row: Option<(Option<Uuid>,)> = sqlx::query_as(&self.inner.sql.key_attempt)
            .bind(key.as_str())
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(|e| map_sqlx_error(e, "checking an interrupted append", None))?;
        match row {
            // Not stored yet: the append may still be running, or may never commit.
            None => Ok(None),
            // This call stored the key, and its events in the same transaction.
            Some((Some(stored_by),)) if stored_by == attempt => Ok(if carries_events {
                stored.map(AppendOutcome::written)
            } else {
                Some(AppendOutcome::written(Vec::new()))
            }),
            // An earlier call stored the key: this one wrote nothing.
            Some(_) => self.idempotent_outcome_impl(key).await,
        }
    }

    /// The answer to an append whose connection failed after the request was sent.
    async fn recover(
        &self,
        request: &AppendRequest,
        attempt: Uuid,
        error: sqlx::Error,
    ) -> eventcore::Result<AppendOutcome> {
        tracing::warn!(%error, "connection failed during an append; checking whether it committed");
        let event_ids = request
            .streams
            .iter()
            .flat_map(|s| &s.events)
            .map(|e| e.event_id)
            .collect();
        let message = match self.interrupted_outcome(request, attempt).await {
            Ok(Some(outcome)) => return Ok(outcome),
            // The server itself ended the backend that ran the statement (it said so,
            // in place of the answer): that backend is exiting, so its transaction
            // committed before (and was found, after its locks were released) or never
            // will. Nothing was written.
            Ok(None) if is_ended_by_server(&error) => {
                return Err(map_sqlx_error(error, "appending", Some(request)));
            }
            // The connection broke without a word from the server: the statement may
            // still be running, or still on its way.
            Ok(None) => "the connection failed while the append was in flight, and its events \
                         are not stored (yet): it may still commit, or never"
                .to_owned(),
            Err(check) => format!(
                "the connection failed while the append was in flight, and checking whether \
                 it committed failed too ({check})"
            ),
        };
        Err(eventcore::Error::OutcomeUnknown {
            message,
            event_ids,
            source: Some(Box::new(error)),
        })
    }
}

impl std::fmt::Debug for PostgresEventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresEventStore")
            .field("schema", &self.inner.schema)
            .finish_non_exhaustive()
    }
}

fn decode_error(error: sqlx::Error) -> eventcore::Error {
    eventcore::Error::backend(
        "unexpected row shape from PostgreSQL",
        false,
        Some(Box::new(error) as eventcore::BoxError),
    )
}

fn corrupt(what: String) -> eventcore::Error {
    eventcore::Error::backend(what, false, None)
}

fn position_from(value: i64) -> eventcore::Result<GlobalPosition> {
    u64::try_from(value)
        .map(GlobalPosition::new)
        .map_err(|_| corrupt(format!("stored global position {value} is negative")))
}

fn version_from(value: i64) -> eventcore::Result<StreamVersion> {
    u64::try_from(value)
        .map(StreamVersion::new)
        .map_err(|_| corrupt(format!("stored stream version {value} is negative")))
}

fn stream_from(value: String) -> eventcore::Result<StreamId> {
    StreamId::try_new(value).map_err(|e| corrupt(format!("stored stream id is invalid: {e}")))
}

/// Decodes the rows of one read into events.
pub(crate) fn recorded_from_rows(rows: &[PgRow]) -> eventcore::Result<Vec<RecordedEvent>> {
    let mut decoder = RowDecoder::default();
    rows.iter().map(|row| decoder.decode(row)).collect()
}

/// Decodes the rows of `sql/read_all.sql`: events, then one row that carries only the
/// horizon the read stopped at. Every position below the horizon belongs to a
/// transaction that has ended, so the read looked at every position up to
/// `horizon - 1`.
pub(crate) fn log_read_from_rows(query: &LogQuery, rows: &[PgRow]) -> eventcore::Result<LogRead> {
    let Some((last, events)) = rows.split_last() else {
        return Err(corrupt("the log read returned no horizon row".to_owned()));
    };
    let horizon: Option<i64> = last.try_get(8).map_err(decode_error)?;
    let Some(horizon) = horizon else {
        return Err(corrupt("the log read's last row has no horizon".to_owned()));
    };
    let events = recorded_from_rows(events)?;
    let bound = u64::try_from(horizon.saturating_sub(1))
        .ok()
        .filter(|bound| *bound > 0)
        .map(GlobalPosition::new);
    Ok(LogRead::new(query, events, bound))
}

/// The stream prefix of `query` as a text parameter. PostgreSQL text cannot hold NUL;
/// a prefix holding one selects nothing on every backend (no stream id holds a control
/// character), and so does the same prefix with U+0001 in its place.
pub(crate) fn prefix_param(query: &LogQuery) -> Option<std::borrow::Cow<'_, str>> {
    query.stream_prefix_value().map(|prefix| {
        if prefix.contains('\0') {
            std::borrow::Cow::Owned(prefix.replace('\0', "\u{1}"))
        } else {
            std::borrow::Cow::Borrowed(prefix)
        }
    })
}

/// The two heads of the log (`eventcore_heads`).
struct Heads {
    /// The last position readers may see.
    visible: Option<u64>,
    /// The last committed position: higher while an older append still holds its mark.
    committed: Option<u64>,
}

/// Why an append statement did not answer.
enum AppendFailure {
    /// No connection could be had: nothing was sent.
    NotSent(sqlx::Error),
    /// The statement was sent and failed, or its answer was lost.
    Failed(sqlx::Error),
}

/// Turns event rows into [`RecordedEvent`]s. Every query that reads events returns the
/// same columns in the same order: `global_position, event_id, stream_id,
/// stream_version, event_type, payload (text), metadata (text), recorded_at`; they are
/// read by index and borrowed, and the stream ids and type names of one read are
/// validated and allocated once each.
#[derive(Default)]
struct RowDecoder {
    streams: HashMap<String, StreamId>,
    types: HashMap<String, EventType>,
}

impl RowDecoder {
    fn decode(&mut self, row: &PgRow) -> eventcore::Result<RecordedEvent> {
        // What cannot be read about the row; it comes back damaged, in its place.
        let mut problems: Vec<String> = Vec::new();
        let stream: &str = row.try_get(2).map_err(decode_error)?;
        let stream_id = match self.streams.get(stream) {
            Some(id) => id.clone(),
            None => match StreamId::try_new(stream) {
                Ok(id) => {
                    self.streams.insert(stream.to_owned(), id.clone());
                    id
                }
                Err(e) => {
                    problems.push(format!("the stored stream id is invalid: {e}"));
                    StreamId::try_new(placeholder_name(stream))
                        .map_err(|e| corrupt(format!("placeholder stream id: {e}")))?
                }
            },
        };
        let stream_version = version_from(row.try_get(3).map_err(decode_error)?)?;
        let type_name: &str = row.try_get(4).map_err(decode_error)?;
        let event_type = match self.types.get(type_name) {
            Some(event_type) => event_type.clone(),
            None => match EventType::try_new(type_name) {
                Ok(event_type) => {
                    self.types.insert(type_name.to_owned(), event_type.clone());
                    event_type
                }
                Err(e) => {
                    problems.push(format!("the stored event type is invalid: {e}"));
                    EventType::try_new(placeholder_name(type_name))
                        .map_err(|e| corrupt(format!("placeholder event type: {e}")))?
                }
            },
        };
        let event_id = EventId::from_uuid(row.try_get(1).map_err(decode_error)?);
        let global_position = position_from(row.try_get(0).map_err(decode_error)?)?;
        let recorded_at: DateTime<Utc> = row.try_get(7).map_err(decode_error)?;
        // The column type keeps the text JSON, and the rule at the door was checked on
        // the way in; rows written otherwise (by hand, by an older release) that cannot
        // be read come back marked as damaged, in their place, never as a failed read.
        let payload_text: &str = row.try_get(5).map_err(decode_error)?;
        let metadata_text: &str = row.try_get(6).map_err(decode_error)?;
        let payload = EventPayload::from_stored_json(payload_text)
            .map_err(|e| format!("the stored payload cannot be read: {e}"));
        let metadata = serde_json::from_str::<EventMetadata>(metadata_text)
            .map_err(|e| format!("the stored metadata is not EventMetadata: {e}"));
        match (payload, metadata) {
            (Ok(payload), Ok(metadata)) if problems.is_empty() => Ok(RecordedEvent::new(
                event_id,
                stream_id,
                stream_version,
                global_position,
                event_type,
                payload,
                Arc::new(metadata),
                recorded_at,
            )),
            (payload, metadata) => {
                problems.extend([payload.err(), metadata.err()].into_iter().flatten());
                let reason = problems.join("; ");
                tracing::error!(%event_id, %global_position, stream = %stream_id, %reason, "a stored event cannot be read");
                Ok(RecordedEvent::damaged(
                    event_id,
                    stream_id,
                    stream_version,
                    global_position,
                    event_type,
                    recorded_at,
                    EventDamage::new(reason, payload_text, metadata_text),
                ))
            }
        }
    }
}

/// A valid name standing in for an invalid stored one in a damaged event: control
/// characters replaced with U+FFFD, cut to 255 bytes; U+FFFD alone for an empty one.
fn placeholder_name(stored: &str) -> String {
    let mut name = String::with_capacity(stored.len().min(255));
    for c in stored.chars() {
        let c = if c.is_control() { '\u{fffd}' } else { c };
        if name.len() + c.len_utf8() > eventcore::MAX_NAME_LEN {
            break;
        }
        name.push(c);
    }
    if name.is_empty() {
        name.push('\u{fffd}');
    }
    name
}

fn appended_from_row(row: &PgRow) -> eventcore::Result<AppendedEvent> {
    Ok(AppendedEvent::new(
        EventId::from_uuid(row.try_get("event_id").map_err(decode_error)?),
        stream_from(row.try_get("stream_id").map_err(decode_error)?)?,
        version_from(row.try_get("stream_version").map_err(decode_error)?)?,
        position_from(row.try_get("global_position").map_err(decode_error)?)?,
    )
    .with_recorded_at(row.try_get("recorded_at").map_err(decode_error)?))
}

/// A request the one-statement path takes: one event to one stream at an exact version
/// (or no stream yet), without an idempotency key.
struct SingleAppend<'r> {
    stream: &'r StreamId,
    /// The exact version expected; 0 for no stream.
    expected: i64,
    expected_version: ExpectedVersion,
    event: &'r eventcore::EventData,
    metadata: String,
}

fn single_exact(request: &AppendRequest) -> eventcore::Result<Option<SingleAppend<'_>>> {
    let [stream] = request.streams.as_slice() else {
        return Ok(None);
    };
    let [event] = stream.events.as_slice() else {
        return Ok(None);
    };
    if request.idempotency_key.is_some() {
        return Ok(None);
    }
    let expected = match stream.expected_version {
        ExpectedVersion::Any => return Ok(None),
        ExpectedVersion::NoStream => 0,
        ExpectedVersion::Exact(_) => expected_code(stream.expected_version),
    };
    Ok(Some(SingleAppend {
        stream: &stream.stream_id,
        expected,
        expected_version: stream.expected_version,
        event,
        metadata: metadata_json(&event.metadata)?,
    }))
}

fn metadata_json(metadata: &EventMetadata) -> eventcore::Result<String> {
    serde_json::to_string(metadata).map_err(|source| eventcore::Error::Serialization {
        event_type: "EventMetadata".to_owned(),
        source,
    })
}

/// The answer of `sql/append_one.sql`: the stream's version, and where the event landed
/// (NULL when the version was not the one expected: nothing was written).
fn single_outcome(row: &PgRow, single: &SingleAppend<'_>) -> eventcore::Result<AppendOutcome> {
    let actual = version_from(row.try_get(0).map_err(decode_error)?)?;
    let position: Option<i64> = row.try_get(1).map_err(decode_error)?;
    let recorded_at: Option<DateTime<Utc>> = row.try_get(2).map_err(decode_error)?;
    let (Some(position), Some(recorded_at)) = (position, recorded_at) else {
        return Err(eventcore::Error::VersionConflict {
            conflicts: vec![eventcore::StreamConflict {
                stream: single.stream.clone(),
                expected: single.expected_version,
                actual,
            }],
        });
    };
    let event = AppendedEvent::new(
        single.event.event_id,
        single.stream.clone(),
        actual.next(),
        position_from(position)?,
    )
    .with_recorded_at(recorded_at);
    Ok(AppendOutcome::written(vec![event]))
}

/// The answer of `eventcore_append`.
fn general_outcome(row: &PgRow) -> eventcore::Result<AppendOutcome> {
    let deduplicated: bool = row.try_get("deduplicated").map_err(decode_error)?;
    let ids: Vec<Uuid> = row.try_get("event_ids").map_err(decode_error)?;
    let stream_ids: Vec<String> = row.try_get("stream_ids").map_err(decode_error)?;
    let versions: Vec<i64> = row.try_get("versions").map_err(decode_error)?;
    let positions: Vec<i64> = row.try_get("positions").map_err(decode_error)?;
    let recorded_at: Vec<DateTime<Utc>> = row.try_get("recorded_at").map_err(decode_error)?;
    if ids.len() != stream_ids.len()
        || ids.len() != versions.len()
        || ids.len() != positions.len()
        || ids.len() != recorded_at.len()
    {
        return Err(corrupt(
            "eventcore_append returned arrays of different lengths".to_owned(),
        ));
    }
    let events = ids
        .into_iter()
        .zip(stream_ids)
        .zip(versions.into_iter().zip(positions))
        .zip(recorded_at)
        .map(|(((id, stream), (version, position)), recorded_at)| {
            Ok(AppendedEvent::new(
                EventId::from_uuid(id),
                stream_from(stream)?,
                version_from(version)?,
                position_from(position)?,
            )
            .with_recorded_at(recorded_at))
        })
        .collect::<eventcore::Result<Vec<_>>>()?;
    let outcome = AppendOutcome::written(events);
    Ok(if deduplicated {
        outcome.into_deduplicated()
    } else {
        outcome
    })
}

fn expected_code(expected: ExpectedVersion) -> i64 {
    match expected {
        ExpectedVersion::Any => -1,
        ExpectedVersion::NoStream => -2,
        // No stream can reach a version above i64::MAX (the column's type), so such an
        // expectation fails as a conflict, as on every backend; i64::MAX itself is as
        // unreachable, and the conflict reports the expectation as given.
        ExpectedVersion::Exact(version) => i64::try_from(version.value()).unwrap_or(i64::MAX),
    }
}

#[async_trait]
impl EventStore for PostgresEventStore {
    async fn read_streams(&self, streams: &[StreamId]) -> eventcore::Result<StreamsSnapshot> {
        let mut ids: Vec<&str> = streams.iter().map(StreamId::as_str).collect();
        ids.sort_unstable();
        ids.dedup();
        let op = "reading streams";
        let mut conn = self.lease(op).await?;
        let rows = sqlx::query(&self.inner.sql.read_streams)
            .bind(&ids)
            .fetch_all(&mut *conn)
            .await;
        conn.done(&rows);
        let rows = rows.map_err(|e| map_sqlx_error(e, op, None))?;
        let events = recorded_from_rows(&rows)?;
        let mut versions: Vec<(StreamId, StreamVersion)> = Vec::with_capacity(streams.len());
        for stream in streams {
            if versions.iter().any(|(id, _)| id == stream) {
                continue;
            }
            // Versions are contiguous, so the last event's version is the stream's.
            let version = events
                .iter()
                .filter(|e| &e.stream_id == stream)
                .map(|e| e.stream_version)
                .max()
                .unwrap_or(StreamVersion::INITIAL);
            versions.push((stream.clone(), version));
        }
        Ok(StreamsSnapshot { events, versions })
    }

    async fn read_streams_after(
        &self,
        streams: &[(StreamId, StreamVersion)],
    ) -> eventcore::Result<StreamsSnapshot> {
        let mut wanted: Vec<(&str, i64)> = Vec::with_capacity(streams.len());
        for (stream, after) in streams {
            if wanted.iter().any(|(id, _)| *id == stream.as_str()) {
                continue;
            }
            // No stream reaches past i64::MAX: nothing comes after such a version.
            wanted.push((
                stream.as_str(),
                i64::try_from(after.value()).unwrap_or(i64::MAX),
            ));
        }
        let ids: Vec<&str> = wanted.iter().map(|(id, _)| *id).collect();
        let afters: Vec<i64> = wanted.iter().map(|(_, after)| *after).collect();
        let op = "reading streams";
        let mut conn = self.lease(op).await?;
        let rows = sqlx::query(&self.inner.sql.read_streams_after)
            .bind(&ids)
            .bind(&afters)
            .fetch_all(&mut *conn)
            .await;
        conn.done(&rows);
        let rows = rows.map_err(|e| map_sqlx_error(e, op, None))?;
        let mut decoder = RowDecoder::default();
        let mut events = Vec::with_capacity(rows.len());
        let mut current: Vec<(StreamId, StreamVersion)> = Vec::with_capacity(wanted.len());
        for row in &rows {
            let stream = stream_from(row.try_get(2).map_err(decode_error)?)?;
            // The stream's current version, on every row (NULL: no events at all).
            let version: Option<i64> = row.try_get(8).map_err(decode_error)?;
            let version = match version {
                Some(version) => version_from(version)?,
                None => StreamVersion::INITIAL,
            };
            if !current.iter().any(|(id, _)| *id == stream) {
                current.push((stream, version));
            }
            let position: Option<i64> = row.try_get(0).map_err(decode_error)?;
            if position.is_some() {
                events.push(decoder.decode(row)?);
            }
        }
        let mut versions: Vec<(StreamId, StreamVersion)> = Vec::with_capacity(streams.len());
        for (stream, _) in streams {
            if versions.iter().any(|(id, _)| id == stream) {
                continue;
            }
            let version = current
                .iter()
                .find(|(id, _)| id == stream)
                .map_or(StreamVersion::INITIAL, |(_, version)| *version);
            versions.push((stream.clone(), version));
        }
        Ok(StreamsSnapshot { events, versions })
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
}

impl PostgresEventStore {
    async fn append_traced(&self, request: AppendRequest) -> eventcore::Result<AppendOutcome> {
        request.validate()?;
        // Stored with the key, so that after a lost answer this call can tell its own
        // write from an earlier call's.
        let attempt = Uuid::new_v4();
        let result = match single_exact(&request)? {
            Some(single) => match self.append_one(&single).await {
                // Another append took the version after this statement's snapshot.
                // Nothing was written: the general path reports the conflict with the
                // stream's actual version.
                Err(AppendFailure::Failed(error)) if is_stream_version_taken(&error) => {
                    self.append_general(&request, attempt).await
                }
                result => result,
            },
            None => self.append_general(&request, attempt).await,
        };
        let outcome = match result {
            Ok(outcome) => outcome,
            // No connection, so nothing was sent.
            Err(AppendFailure::NotSent(error)) => {
                return Err(map_sqlx_error(error, "appending", Some(&request)));
            }
            // The answer was lost; the append may or may not have committed.
            Err(AppendFailure::Failed(error)) if is_connection_failure(&error) => {
                return self.recover(&request, attempt, error).await;
            }
            Err(AppendFailure::Failed(error)) if is_duplicate_event_id(&error) => {
                // The same events were appended before: this is a repeat of a request
                // that committed (its answer was lost). Its outcome is the answer.
                if let Some(events) = self.stored_events(&request).await? {
                    return Ok(AppendOutcome::written(events).into_deduplicated());
                }
                return Err(map_sqlx_error(error, "appending", Some(&request)));
            }
            Err(AppendFailure::Failed(error)) => {
                return Err(map_sqlx_error(error, "appending", Some(&request)));
            }
        }?;
        if outcome.deduplicated {
            return Ok(outcome);
        }
        if let Some(last) = outcome.events.last() {
            let position = last.global_position.value();
            if self.ensure_background() {
                self.inner.appended.send_if_modified(|current| {
                    let moved = position > *current;
                    if moved {
                        *current = position;
                    }
                    moved
                });
            }
        }
        Ok(outcome)
    }

    /// One event to one stream at an exact version, in one plain statement
    /// (`sql/append_one.sql`). The outer error is the database's; the inner one a
    /// version conflict or a malformed answer.
    async fn append_one(
        &self,
        single: &SingleAppend<'_>,
    ) -> Result<eventcore::Result<AppendOutcome>, AppendFailure> {
        let mut conn = self
            .inner
            .kept
            .lease()
            .await
            .map_err(AppendFailure::NotSent)?;
        let row = sqlx::query(&self.inner.sql.append_one)
            .bind(single.stream.as_str())
            .bind(single.expected)
            .bind(single.event.event_id.as_uuid())
            .bind(single.event.event_type.as_str())
            .bind(single.event.payload.as_str())
            .bind(single.metadata.as_str())
            .fetch_one(&mut *conn)
            .await;
        conn.done(&row);
        Ok(single_outcome(&row.map_err(AppendFailure::Failed)?, single))
    }

    /// Any request, through `eventcore_append` (migrations/0004).
    async fn append_general(
        &self,
        request: &AppendRequest,
        attempt: Uuid,
    ) -> Result<eventcore::Result<AppendOutcome>, AppendFailure> {
        let n = request.event_count();
        let mut streams = Vec::with_capacity(request.streams.len());
        let mut expected = Vec::with_capacity(request.streams.len());
        let mut event_streams: Vec<i32> = Vec::with_capacity(n);
        let mut event_ids = Vec::with_capacity(n);
        let mut event_types = Vec::with_capacity(n);
        let mut payloads = Vec::with_capacity(n);
        let mut metadata = Vec::with_capacity(n);
        for (index, stream) in request.streams.iter().enumerate() {
            streams.push(stream.stream_id.as_str());
            expected.push(expected_code(stream.expected_version));
            let Ok(index) = i32::try_from(index + 1) else {
                return Ok(Err(eventcore::Error::InvalidAppend {
                    reason: "too many streams in one append".to_owned(),
                }));
            };
            for event in &stream.events {
                event_streams.push(index);
                event_ids.push(event.event_id.as_uuid());
                event_types.push(event.event_type.as_str());
                payloads.push(event.payload.as_str());
                match metadata_json(&event.metadata) {
                    Ok(json) => metadata.push(json),
                    Err(error) => return Ok(Err(error)),
                }
            }
        }
        let key = request.idempotency_key.as_ref().map(IdempotencyKey::as_str);

        let mut conn = self
            .inner
            .kept
            .lease()
            .await
            .map_err(AppendFailure::NotSent)?;
        let row = sqlx::query(&self.inner.sql.append)
            .bind(&streams)
            .bind(&expected)
            .bind(key)
            .bind(&event_streams)
            .bind(&event_ids)
            .bind(&event_types)
            .bind(&payloads)
            .bind(&metadata)
            .bind(key.map(|_| attempt))
            .fetch_one(&mut *conn)
            .await;
        conn.done(&row);
        Ok(general_outcome(&row.map_err(AppendFailure::Failed)?))
    }

    async fn read_log_impl(&self, query: &LogQuery) -> eventcore::Result<LogRead> {
        if query.limit_value() == 0 {
            return Ok(LogRead::new(query, Vec::new(), None));
        }
        let after = query
            .after_position()
            .map_or(0, |p| i64::try_from(p.value()).unwrap_or(i64::MAX));
        let limit = i64::try_from(query.limit_value()).unwrap_or(i64::MAX);
        let types: Option<Vec<&str>> = query
            .event_types_value()
            .map(|types| types.iter().map(EventType::as_str).collect());
        let op = "reading the global log";
        let mut conn = self.lease(op).await?;
        let rows = sqlx::query(&self.inner.sql.read_all)
            .bind(after)
            .bind(prefix_param(query))
            .bind(types)
            .bind(limit)
            .fetch_all(&mut *conn)
            .await;
        conn.done(&rows);
        let rows = rows.map_err(|e| map_sqlx_error(e, op, None))?;
        log_read_from_rows(query, &rows)
    }

    async fn wait_for_events_impl(&self, after: Option<GlobalPosition>) -> eventcore::Result<()> {
        let after = after.map_or(0, GlobalPosition::value);
        let listening = self.ensure_background();
        let mut wake = self.inner.wake.subscribe();
        // This process's own appends wake its readers at once, without waiting for their
        // notification (rate-limited, and meant for other processes).
        let mut local = self.inner.appended.subscribe();
        let fallback = self.inner.fallback_poll_interval;
        let mut held_back_poll = Duration::from_millis(2);
        loop {
            // Marked seen before looking, so a notification or an append arriving during
            // the query is not lost.
            wake.borrow_and_update();
            local.borrow_and_update();
            let Heads { visible, committed } = self.heads().await?;
            if visible.is_some_and(|v| v > after) {
                return Ok(());
            }
            if committed.is_some_and(|c| c > after) {
                // Committed events are held back by an older transaction still running.
                // When it ends, no notification says so: poll, backing off.
                tokio::time::sleep(held_back_poll).await;
                held_back_poll = (held_back_poll * 2).min(fallback);
                continue;
            }
            if listening {
                let woken = async {
                    tokio::select! {
                        _ = wake.changed() => {}
                        _ = local.changed() => {}
                    }
                };
                let _ = tokio::time::timeout(fallback, woken).await;
            } else {
                tokio::time::sleep(fallback).await;
            }
        }
    }

    async fn idempotent_outcome_impl(
        &self,
        key: &IdempotencyKey,
    ) -> eventcore::Result<Option<AppendOutcome>> {
        let rows = sqlx::query(&self.inner.sql.idempotent_outcome)
            .bind(key.as_str())
            .fetch_all(&self.inner.pool)
            .await
            .map_err(|e| map_sqlx_error(e, "looking up an idempotency key", None))?;
        if rows.is_empty() {
            return Ok(None);
        }
        let mut events = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: Option<Uuid> = row.try_get("event_id").map_err(decode_error)?;
            if id.is_some() {
                events.push(appended_from_row(row)?);
            }
        }
        Ok(Some(AppendOutcome::written(events).into_deduplicated()))
    }
}

fn park_query<'q>(
    sql: &'q str,
    parked: &'q ParkedEvent,
) -> eventcore::Result<sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>> {
    let version = i64::try_from(parked.stream_version.value())
        .map_err(|_| eventcore::Error::backend("stream version out of range", false, None))?;
    Ok(sqlx::query(sql)
        .bind(&parked.projection)
        .bind(parked.event_id.as_uuid())
        .bind(position_param(parked.global_position)?)
        .bind(parked.stream_id.as_str())
        .bind(version)
        .bind(&parked.event_type)
        .bind(&parked.error)
        .bind(parked.parked_at))
}

fn position_param(position: GlobalPosition) -> eventcore::Result<i64> {
    i64::try_from(position.value()).map_err(|_| {
        eventcore::Error::backend(format!("position {position} is out of range"), false, None)
    })
}

/// Checkpoints and parked events live in the store's schema (migration 0002), so a
/// read model in the same database can commit with its checkpoint.
#[async_trait]
impl CheckpointStore for PostgresEventStore {
    async fn load_checkpoint(&self, projection: &str) -> eventcore::Result<Option<GlobalPosition>> {
        check_projection_name(projection)?;
        let row: Option<(i64,)> = sqlx::query_as(&self.inner.sql.load_checkpoint)
            .bind(projection)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(|e| map_sqlx_error(e, "loading a checkpoint", None))?;
        row.map(|(position,)| position_from(position)).transpose()
    }

    async fn save_checkpoint(
        &self,
        projection: &str,
        position: GlobalPosition,
    ) -> eventcore::Result<()> {
        check_projection_name(projection)?;
        check_checkpoint_position(position)?;
        sqlx::query(&self.inner.sql.save_checkpoint)
            .bind(projection)
            .bind(position_param(position)?)
            .execute(&self.inner.pool)
            .await
            .map_err(|e| map_sqlx_error(e, "saving a checkpoint", None))?;
        Ok(())
    }

    async fn reset_checkpoint(&self, projection: &str) -> eventcore::Result<()> {
        check_projection_name(projection)?;
        sqlx::query(&self.inner.sql.reset_checkpoint)
            .bind(projection)
            .execute(&self.inner.pool)
            .await
            .map_err(|e| map_sqlx_error(e, "resetting a checkpoint", None))?;
        Ok(())
    }

    async fn park(&self, parked: ParkedEvent) -> eventcore::Result<()> {
        let parked = parked.checked()?;
        park_query(&self.inner.sql.park, &parked)?
            .execute(&self.inner.pool)
            .await
            .map_err(|e| map_sqlx_error(e, "parking an event", None))?;
        Ok(())
    }

    async fn parked(&self, projection: &str) -> eventcore::Result<Vec<ParkedEvent>> {
        check_projection_name(projection)?;
        let rows = sqlx::query(&self.inner.sql.parked)
            .bind(projection)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(|e| map_sqlx_error(e, "reading parked events", None))?;
        rows.iter()
            .map(|row| {
                Ok(ParkedEvent::from_parts(
                    row.try_get("projection").map_err(decode_error)?,
                    EventId::from_uuid(row.try_get("event_id").map_err(decode_error)?),
                    stream_from(row.try_get("stream_id").map_err(decode_error)?)?,
                    version_from(row.try_get("stream_version").map_err(decode_error)?)?,
                    position_from(row.try_get("global_position").map_err(decode_error)?)?,
                    row.try_get("event_type").map_err(decode_error)?,
                    row.try_get("error").map_err(decode_error)?,
                    row.try_get("parked_at").map_err(decode_error)?,
                ))
            })
            .collect()
    }
}
