//! The crate's own errors (setting up a store) and the one place where database errors
//! become [`eventcore::Error`]s.

use eventcore::{AppendRequest, StreamConflict, StreamVersion};

/// What can go wrong while configuring, connecting or migrating a store. Errors of store
/// operations are [`eventcore::Error`]s.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The connection URL is not a PostgreSQL URL or could not be parsed. Fix the URL.
    #[error("invalid PostgreSQL URL: {reason}")]
    InvalidUrl {
        /// What is wrong with it (never the URL itself, which may hold a password).
        reason: String,
    },

    /// The schema name breaks the rules of [`crate::SchemaName`].
    #[error(
        "invalid schema name {name:?}: use 1 to 63 lowercase ASCII letters, digits or underscores, not starting with a digit or `pg_`"
    )]
    InvalidSchemaName {
        /// The rejected name.
        name: String,
    },

    /// The server could not be reached or refused the connection. Usually retryable
    /// once the server is up.
    #[error("cannot connect to PostgreSQL")]
    Connect {
        /// What sqlx reported.
        #[source]
        source: sqlx::Error,
    },

    /// Creating the schema or applying the migrations failed; nothing half-applied stays
    /// (each migration runs in a transaction).
    #[error("migrating schema `{schema}` failed")]
    Migrate {
        /// The schema being migrated.
        schema: String,
        /// What failed.
        #[source]
        source: sqlx::migrate::MigrateError,
    },

    /// The store's schema is not migrated to the version this crate needs. Run
    /// [`crate::migrate`] (or [`crate::PostgresEventStore::migrate`]) first.
    #[error("schema `{schema}` is not migrated: run migrate() first")]
    NotMigrated {
        /// The schema.
        schema: String,
    },
}

/// SQLSTATE codes this crate relies on, by name. Our own codes are raised by the
/// functions in `migrations/`.
pub(crate) mod sqlstate {
    pub(crate) const VERSION_CONFLICT: &str = "ECV01";
    pub(crate) const NOT_READ_COMMITTED: &str = "ECS01";
    pub(crate) const ON_STANDBY: &str = "ECS02";
    pub(crate) const LOCK_NOT_AVAILABLE: &str = "55P03";
    pub(crate) const READ_ONLY_TRANSACTION: &str = "25006";
    pub(crate) const STATEMENT_COMPLETION_UNKNOWN: &str = "40003";
    /// Class 53: insufficient resources (out of connections, memory, disk).
    pub(crate) const INSUFFICIENT_RESOURCES_CLASS: &str = "53";
    /// Out of memory, shared memory included: the lock table is full (an append over
    /// more streams than `max_locks_per_transaction` times the sessions allow).
    pub(crate) const OUT_OF_MEMORY: &str = "53200";
    /// A configured limit (such as `max_locks_per_transaction`) was exceeded.
    pub(crate) const CONFIGURATION_LIMIT_EXCEEDED: &str = "53400";
    pub(crate) const IMMUTABLE_EVENTS: &str = "ECI01";
    pub(crate) const MARK_ABOVE_POSITION: &str = "ECM01";
    pub(crate) const UNIQUE_VIOLATION: &str = "23505";
    pub(crate) const SERIALIZATION_FAILURE: &str = "40001";
    pub(crate) const DEADLOCK_DETECTED: &str = "40P01";
    pub(crate) const QUERY_CANCELED: &str = "57014";
    pub(crate) const ADMIN_SHUTDOWN: &str = "57P01";
    pub(crate) const CRASH_SHUTDOWN: &str = "57P02";
    pub(crate) const CANNOT_CONNECT_NOW: &str = "57P03";
    pub(crate) const UNDEFINED_TABLE: &str = "42P01";
    pub(crate) const UNDEFINED_FUNCTION: &str = "42883";
    /// Class 08: connection exceptions.
    pub(crate) const CONNECTION_EXCEPTION_CLASS: &str = "08";
}

/// Constraint names of the schema (`migrations/0001_event_store.sql`) this crate reads
/// errors by.
pub(crate) mod constraint {
    /// `UNIQUE (event_id)` on `events`.
    pub(crate) const EVENT_ID: &str = "events_event_id_key";
    /// `UNIQUE (stream_id, stream_version)` on `events`.
    pub(crate) const STREAM_VERSION: &str = "events_stream_version_key";
}

#[derive(serde::Deserialize)]
struct ConflictDetail {
    index: usize,
    actual: u64,
}

/// Whether the error means the connection (not the statement) failed, so the outcome
/// of a statement in flight is unknown.
pub(crate) fn is_connection_failure(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with(sqlstate::CONNECTION_EXCEPTION_CLASS)
                || code == sqlstate::ADMIN_SHUTDOWN
                || code == sqlstate::CRASH_SHUTDOWN
        }),
        _ => false,
    }
}

/// Whether the server ended the session in place of the statement's answer (a FATAL
/// error such as `terminating connection due to administrator command`): the backend
/// that ran the statement is exiting, so its transaction has committed already or never
/// will. A bare I/O failure (end of stream, reset) says nothing of the kind.
pub(crate) fn is_ended_by_server(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(_)) && is_connection_failure(error)
}

/// Whether an append failed because one of its event ids is already stored.
pub(crate) fn is_duplicate_event_id(error: &sqlx::Error) -> bool {
    error.as_database_error().is_some_and(|db| {
        db.code().as_deref() == Some(sqlstate::UNIQUE_VIOLATION)
            && db.constraint() == Some(constraint::EVENT_ID)
    })
}

/// Whether an append failed because a concurrent append took one of its stream versions.
pub(crate) fn is_stream_version_taken(error: &sqlx::Error) -> bool {
    error.as_database_error().is_some_and(|db| {
        db.code().as_deref() == Some(sqlstate::UNIQUE_VIOLATION)
            && db.constraint() == Some(constraint::STREAM_VERSION)
    })
}

/// Turns a database error into an EventCore error: by SQLSTATE, constraint name and
/// sqlx error kind, never by the message text. `append` gives the request, so that a
/// version conflict can name its streams and expectations.
pub(crate) fn map_sqlx_error(
    error: sqlx::Error,
    operation: &'static str,
    append: Option<&AppendRequest>,
) -> eventcore::Error {
    if let sqlx::Error::Database(db) = &error {
        let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
        match code.as_str() {
            sqlstate::VERSION_CONFLICT => {
                if let Some(request) = append
                    && let Some(conflicts) = conflicts_from_detail(db.as_ref(), request)
                {
                    return eventcore::Error::VersionConflict { conflicts };
                }
            }
            sqlstate::UNIQUE_VIOLATION => match db.constraint() {
                Some(constraint::EVENT_ID) => {
                    return eventcore::Error::InvalidAppend {
                        reason: "an event with one of these event ids is already stored".to_owned(),
                    };
                }
                // The function locks streams before inserting, so this is a backstop:
                // a concurrent writer took the version. Re-reading resolves it.
                Some(constraint::STREAM_VERSION) => {
                    return eventcore::Error::retryable_backend(
                        "a concurrent append took the same stream version",
                        Some(Box::new(error) as eventcore::BoxError),
                    );
                }
                _ => {}
            },
            sqlstate::NOT_READ_COMMITTED | sqlstate::ON_STANDBY => {
                return eventcore::Error::permanent_backend(
                    format!(
                        "{operation}: the session cannot keep the global order (READ COMMITTED on the primary is required)"
                    ),
                    Some(Box::new(error) as eventcore::BoxError),
                );
            }
            sqlstate::MARK_ABOVE_POSITION => {
                return eventcore::Error::permanent_backend(
                    format!(
                        "{operation}: the mark is above the first position drawn (the position sequence went backwards; was it altered?); nothing was written"
                    ),
                    Some(Box::new(error) as eventcore::BoxError),
                );
            }
            sqlstate::IMMUTABLE_EVENTS => {
                return eventcore::Error::permanent_backend(
                    "stored events are immutable",
                    Some(Box::new(error) as eventcore::BoxError),
                );
            }
            sqlstate::UNDEFINED_TABLE | sqlstate::UNDEFINED_FUNCTION => {
                return eventcore::Error::permanent_backend(
                    format!("{operation}: the schema is not migrated (run migrate())"),
                    Some(Box::new(error) as eventcore::BoxError),
                );
            }
            _ => {}
        }
        let retryable = matches!(
            code.as_str(),
            sqlstate::SERIALIZATION_FAILURE
                | sqlstate::DEADLOCK_DETECTED
                | sqlstate::STATEMENT_COMPLETION_UNKNOWN
                | sqlstate::QUERY_CANCELED
                | sqlstate::LOCK_NOT_AVAILABLE
                | sqlstate::READ_ONLY_TRANSACTION
                | sqlstate::ADMIN_SHUTDOWN
                | sqlstate::CRASH_SHUTDOWN
                | sqlstate::CANNOT_CONNECT_NOW
        ) || code.starts_with(sqlstate::CONNECTION_EXCEPTION_CLASS)
            // Out of connections or disk: may pass once the server has room again. Out
            // of memory or over a configured limit: the same request fails the same way
            // until an operator acts (resending it only adds load); class 54 (program
            // limits: too large, too complex) never passes.
            || (code.starts_with(sqlstate::INSUFFICIENT_RESOURCES_CLASS)
                && code != sqlstate::OUT_OF_MEMORY
                && code != sqlstate::CONFIGURATION_LIMIT_EXCEEDED);
        return eventcore::Error::Backend {
            message: format!("{operation} failed (SQLSTATE {code})"),
            retryable,
            source: Some(Box::new(error) as eventcore::BoxError),
        };
    }
    let retryable = matches!(
        error,
        sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::WorkerCrashed
    );
    eventcore::Error::Backend {
        message: format!("{operation} failed"),
        retryable,
        source: Some(Box::new(error) as eventcore::BoxError),
    }
}

fn conflicts_from_detail(
    db: &dyn sqlx::error::DatabaseError,
    request: &AppendRequest,
) -> Option<Vec<StreamConflict>> {
    let detail = db
        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()?
        .detail()?;
    let entries: Vec<ConflictDetail> = serde_json::from_str(detail).ok()?;
    entries
        .into_iter()
        .map(|entry| {
            let stream = request.streams.get(entry.index.checked_sub(1)?)?;
            Some(StreamConflict {
                stream: stream.stream_id.clone(),
                expected: stream.expected_version,
                actual: StreamVersion::new(entry.actual),
            })
        })
        .collect()
}
