//! Connection and schema settings.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;

use crate::error::Error;

/// A PostgreSQL schema name the store lives in: 1 to 63 bytes of lowercase ASCII letters,
/// digits and underscores, not starting with a digit, not `pg_`-prefixed and not
/// `information_schema` (schemas PostgreSQL reserves, which backups leave out).
///
/// The rule is narrower than what PostgreSQL accepts on purpose: such a name never
/// needs case folding rules, and quoting it can never change its meaning.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SchemaName(String);

impl SchemaName {
    /// Validates `name`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSchemaName`] when `name` breaks the rule above.
    pub fn try_new(name: impl Into<String>) -> Result<Self, Error> {
        let name = name.into();
        let valid_chars = name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        let starts_well = name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_');
        // PostgreSQL reserves `pg_` (pg_catalog, pg_toast, pg_temp_N, ...) and
        // information_schema; pg_dump leaves those out of backups, so a store there
        // would silently be missing from them.
        let reserved = name.starts_with("pg_") || name == "information_schema";
        if !valid_chars || !starts_well || name.len() > 63 || reserved {
            return Err(Error::InvalidSchemaName { name });
        }
        Ok(SchemaName(name))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name quoted as an SQL identifier.
    pub(crate) fn quoted(&self) -> String {
        format!("\"{}\"", self.0)
    }
}

impl Default for SchemaName {
    /// `eventcore`. Not `public`: the schema also holds the migration history
    /// (`_sqlx_migrations`), which must not be shared with the application's own.
    fn default() -> Self {
        SchemaName("eventcore".to_owned())
    }
}

impl fmt::Display for SchemaName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for SchemaName {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::try_new(s)
    }
}

/// The longest timeout or interval a [`PostgresConfig`] keeps (one day); longer ones are
/// cut to it, so no duration can overflow the clock it is added to.
pub const MAX_WAIT: Duration = Duration::from_secs(24 * 60 * 60);

/// The `statement_timeout` setting for `timeout`, in milliseconds: at least 1 (0 would
/// mean no limit), at most `i32::MAX` (the setting's range).
pub(crate) fn statement_timeout_millis(timeout: Duration) -> u64 {
    let millis = timeout.as_nanos().div_ceil(1_000_000);
    u64::try_from(millis)
        .unwrap_or(u64::MAX)
        .clamp(1, i32::MAX as u64)
}

/// Refuses connect options with a NUL character where the startup message would carry
/// it (user, database, application name, options): it would end the field early and
/// start one of the attacker's choosing.
pub(crate) fn check_options(options: &PgConnectOptions) -> Result<(), Error> {
    let fields = [
        ("user", Some(options.get_username())),
        ("database", options.get_database()),
        ("host", Some(options.get_host())),
        ("application name", options.get_application_name()),
        ("options", options.get_options()),
    ];
    for (name, value) in fields {
        if value.is_some_and(|v| v.contains('\0')) {
            return Err(Error::InvalidUrl {
                reason: format!("the {name} contains a NUL character"),
            });
        }
    }
    Ok(())
}

/// The default of [`PostgresConfig::with_notify_interval`].
pub(crate) const DEFAULT_NOTIFY_INTERVAL: Duration = Duration::from_millis(5);

/// How to connect and where the store's tables live.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use eventcore_postgres::{PostgresConfig, SchemaName};
///
/// let config = PostgresConfig::from_url("postgres://app@127.0.0.1/app")?
///     .with_schema(SchemaName::try_new("billing")?)
///     .with_max_connections(20)
///     .with_acquire_timeout(Duration::from_secs(5))
///     .with_statement_timeout(Duration::from_secs(10));
/// # Ok::<(), eventcore_postgres::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct PostgresConfig {
    pub(crate) connect: PgConnectOptions,
    pub(crate) schema: SchemaName,
    pub(crate) max_connections: u32,
    pub(crate) acquire_timeout: Duration,
    pub(crate) statement_timeout: Option<Duration>,
    pub(crate) fallback_poll_interval: Duration,
    pub(crate) notify_interval: Duration,
    pub(crate) kept_connections: Option<usize>,
}

impl PostgresConfig {
    /// Parses a `postgres://` URL. TLS is negotiated as the URL's `sslmode` says
    /// (`prefer` by default; `require`, `verify-ca`, `verify-full` for production).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidUrl`] when the URL cannot be parsed.
    pub fn from_url(url: &str) -> Result<Self, Error> {
        let scheme = url
            .split_once("://")
            .map(|(scheme, _)| scheme.to_ascii_lowercase());
        if !matches!(scheme.as_deref(), Some("postgres" | "postgresql")) {
            return Err(Error::InvalidUrl {
                reason: "it must start with postgres:// or postgresql://".to_owned(),
            });
        }
        // The startup message separates its fields with NUL bytes: a NUL in the user,
        // database or options (`%00` in the URL) would inject parameters of its own.
        if url.contains('\0') || url.to_ascii_lowercase().contains("%00") {
            return Err(Error::InvalidUrl {
                reason: "it contains a NUL character (%00)".to_owned(),
            });
        }
        let connect = url
            .parse::<PgConnectOptions>()
            .map_err(|error| Error::InvalidUrl {
                reason: error.to_string(),
            })?;
        check_options(&connect)?;
        Ok(Self::from_options(connect))
    }

    /// Uses connect options built with sqlx directly (TLS roots, certificates, ...).
    pub fn from_options(connect: PgConnectOptions) -> Self {
        PostgresConfig {
            connect,
            schema: SchemaName::default(),
            max_connections: 10,
            acquire_timeout: Duration::from_secs(10),
            statement_timeout: None,
            fallback_poll_interval: Duration::from_secs(1),
            notify_interval: DEFAULT_NOTIFY_INTERVAL,
            kept_connections: None,
        }
    }

    /// The schema the store's tables live in (default `eventcore`; created by
    /// [`crate::migrate`] if missing). Stores in different schemas of one database do not
    /// see each other. Give the store a schema of its own: it keeps its migration history
    /// (`_sqlx_migrations`) there.
    pub fn with_schema(mut self, schema: SchemaName) -> Self {
        self.schema = schema;
        self
    }

    /// The most connections the pool opens (default 10).
    pub fn with_max_connections(mut self, max: u32) -> Self {
        self.max_connections = max.max(1);
        self
    }

    /// How long to wait for a free connection before failing with a retryable error
    /// (default 10 s; at most [`MAX_WAIT`], longer is cut to it).
    pub fn with_acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout.min(MAX_WAIT);
        self
    }

    /// A server-side limit on every statement (default: none). A statement that hits it
    /// is rolled back and reported as a retryable error. PostgreSQL counts it in whole
    /// milliseconds up to `i32::MAX`: a limit below 1 ms is sent as 1 ms (0 would mean no
    /// limit at all), a longer one than about 24.8 days as that. `Duration::ZERO` means
    /// no limit.
    pub fn with_statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = (!timeout.is_zero()).then_some(timeout);
        self
    }

    /// How often a waiting reader checks for new events when no notification arrives:
    /// the safety net behind LISTEN/NOTIFY (default 1 s; between 10 ms and
    /// [`MAX_WAIT`]).
    pub fn with_fallback_poll_interval(mut self, interval: Duration) -> Self {
        self.fallback_poll_interval = interval.clamp(Duration::from_millis(10), MAX_WAIT);
        self
    }

    /// The least time between two notifications this store sends to live readers in
    /// other processes (default 5 ms; zero: one after every append, or as soon as the
    /// previous one is through). Readers of the same store in this process are woken by
    /// its appends directly.
    ///
    /// Appends do not notify themselves: a task sends one NOTIFY, after commit, for the
    /// newest position this process appended, so appends arriving meanwhile share it.
    /// Each NOTIFY is a statement of its own on the server; under a steady stream of
    /// appends this interval bounds their number (200 a second by default, where one
    /// after every append cost about a sixth of the appends' throughput). A live reader
    /// in another process learns of new events up to this much later.
    ///
    /// At most [`MAX_WAIT`]; longer is cut to it.
    pub fn with_notify_interval(mut self, interval: Duration) -> Self {
        self.notify_interval = interval.min(MAX_WAIT);
        self
    }

    /// How many of the pool's connections the store keeps out of the pool between its
    /// statements (default: all but two of [`PostgresConfig::with_max_connections`]; at most
    /// all but one). The others go back to the pool after every statement, so
    /// transactions, checkpoints and what the application does with
    /// [`crate::PostgresEventStore::pool`] are served; close the pool with
    /// [`crate::PostgresEventStore::close`].
    ///
    /// sqlx checks a connection with a round trip every time it goes back to the pool.
    /// For a store whose every operation is one statement that check costs more than
    /// the statement: one INSERT per transaction through the pool ran at about half
    /// the rate of the same statements on connections kept out of it. A kept connection
    /// skips the check; one that failed other than with a database error goes back to
    /// the pool, which checks it, and the pool's lifetime and idle limits apply to a
    /// kept connection only once it is back. Zero keeps none. A store made with
    /// [`crate::PostgresEventStore::from_pool`] shares its pool with the application
    /// and keeps none.
    pub fn with_kept_connections(mut self, kept: usize) -> Self {
        self.kept_connections = Some(kept);
        self
    }

    /// The schema the store's tables live in.
    pub fn schema(&self) -> &SchemaName {
        &self.schema
    }

    /// The most connections the pool opens.
    pub fn max_connections(&self) -> u32 {
        self.max_connections
    }

    /// How long an operation waits for a free connection.
    pub fn acquire_timeout(&self) -> Duration {
        self.acquire_timeout
    }

    /// The server-side limit on every statement; `None`: no limit.
    pub fn statement_timeout(&self) -> Option<Duration> {
        self.statement_timeout
    }

    /// How often a waiting reader checks for new events without a notification.
    pub fn fallback_poll_interval(&self) -> Duration {
        self.fallback_poll_interval
    }

    /// The least time between two notifications to other processes.
    pub fn notify_interval(&self) -> Duration {
        self.notify_interval
    }

    /// How many connections are kept out of the pool between statements; `None`: the
    /// default (all but two of [`PostgresConfig::max_connections`]).
    pub fn kept_connections(&self) -> Option<usize> {
        self.kept_connections
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_validated() {
        for good in ["public", "billing", "_x", "a1_b2", &"s".repeat(63)] {
            assert!(SchemaName::try_new(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Billing",
            "1abc",
            "a-b",
            "a b",
            "pg_catalog",
            "pg_toast",
            "pg_temp_3",
            "pg_toast_temp_1",
            "information_schema",
            "x\"y",
            &"s".repeat(64),
        ] {
            assert!(
                matches!(
                    SchemaName::try_new(bad),
                    Err(Error::InvalidSchemaName { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn durations_saturate_instead_of_overflowing_a_clock() {
        let config = PostgresConfig::from_url("postgres://u@127.0.0.1/db")
            .expect("parses")
            .with_notify_interval(Duration::MAX)
            .with_acquire_timeout(Duration::MAX)
            .with_fallback_poll_interval(Duration::MAX)
            .with_statement_timeout(Duration::ZERO);
        assert_eq!(config.notify_interval, MAX_WAIT);
        assert_eq!(config.acquire_timeout, MAX_WAIT);
        assert_eq!(config.fallback_poll_interval, MAX_WAIT);
        assert_eq!(config.statement_timeout, None, "zero: no limit");
        assert!(tokio::time::Instant::now().checked_add(MAX_WAIT).is_some());
        assert_eq!(statement_timeout_millis(Duration::from_nanos(1)), 1);
        assert_eq!(statement_timeout_millis(Duration::from_micros(1_001)), 2);
        assert_eq!(statement_timeout_millis(Duration::from_secs(2)), 2_000);
        assert_eq!(statement_timeout_millis(Duration::MAX), i32::MAX as u64);
    }

    #[test]
    fn nul_characters_in_urls_are_refused() {
        for url in [
            "postgres://u@127.0.0.1/postgres%00user%00other",
            "postgres://u%00x@127.0.0.1/db",
            "postgres://u@127.0.0.1/db?options=-c%20a%3Db%00",
            "postgres://u@127.0.0.1/db?application_name=a%00b",
            "postgres://u:pa%00ss@127.0.0.1/db",
            "postgres://u@127.0.0.1/db\0",
        ] {
            assert!(
                matches!(PostgresConfig::from_url(url), Err(Error::InvalidUrl { .. })),
                "{url}"
            );
        }
        // An escaped percent sign followed by 00 is no NUL.
        assert!(PostgresConfig::from_url("postgres://u@127.0.0.1/db%2500").is_ok());
    }

    #[test]
    fn bad_urls_are_typed_errors() {
        assert!(matches!(
            PostgresConfig::from_url("not a url"),
            Err(Error::InvalidUrl { .. })
        ));
        assert!(matches!(
            PostgresConfig::from_url("mysql://localhost/db"),
            Err(Error::InvalidUrl { .. })
        ));
        assert!(PostgresConfig::from_url("postgres://u@127.0.0.1:5432/db?sslmode=require").is_ok());
    }
}
