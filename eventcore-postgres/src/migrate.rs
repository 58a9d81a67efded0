//! Embedded migrations, run into the store's schema.

use std::borrow::Cow;
use std::sync::LazyLock;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{Connection, PgConnection, PgPool};
use tracing::Instrument;

use crate::config::SchemaName;
use crate::error::Error;

/// The migration files, in order: (version, file name). Embedded with `include_str!`
/// rather than sqlx's `migrate!` macro, whose proc-macro crate compiles a second copy of
/// sqlx for the host. A test checks this list against the directory, as sqlx reads it.
macro_rules! migrations {
    ($(($version:literal, $file:literal)),* $(,)?) => {
        &[$(($version, $file, include_str!(concat!("../migrations/", $file)))),*]
    };
}

const FILES: &[(i64, &str, &str)] = migrations![
    (1, "0001_event_store.sql"),
    (2, "0002_projections.sql"),
    (3, "0003_read_log_plan.sql"),
    (4, "0004_lean_append.sql"),
    (5, "0005_atomic_marks.sql"),
    (6, "0006_exact_payloads.sql"),
    (7, "0007_one_statement_appends.sql"),
    (8, "0008_snapshots.sql"),
];

/// One embedded file as sqlx's own resolver describes it: the description is the file
/// name after the version, without `.sql`, underscores as spaces; the checksum is of the
/// text as stored.
fn migration(version: i64, file: &'static str, sql: &'static str) -> Migration {
    let description = file
        .split_once('_')
        .map_or(file, |(_, rest)| rest)
        .trim_end_matches(".sql")
        .replace('_', " ");
    Migration::new(
        version,
        Cow::Owned(description),
        MigrationType::Simple,
        Cow::Borrowed(sql),
        sql.starts_with("-- no-transaction"),
    )
}

/// The embedded migrations (`migrations/NNNN_*.sql`). Run them with [`migrate`], which
/// applies them inside the store's schema; running them yourself works too, on a
/// connection whose `search_path` is that schema alone. The versions, descriptions and
/// checksums are the ones `sqlx::migrate!("./migrations")` would embed, so a schema
/// migrated by an earlier release (which used that macro) validates unchanged.
pub static MIGRATOR: LazyLock<Migrator> = LazyLock::new(|| Migrator {
    migrations: Cow::Owned(
        FILES
            .iter()
            .map(|&(version, file, sql)| migration(version, file, sql))
            .collect(),
    ),
    ..Migrator::DEFAULT
});

/// Creates `schema` if missing and applies every pending migration inside it.
///
/// Safe to run again (applied migrations are skipped) and from several processes at
/// once: a per-schema advisory lock serializes the schema creation, and sqlx's migration
/// lock serializes the migrations.
///
/// # Errors
///
/// [`Error::Connect`] when no connection can be had; [`Error::Migrate`] when creating
/// the schema or a migration fails (each migration is applied in a transaction, so a
/// failed one leaves nothing behind).
pub async fn migrate(pool: &PgPool, schema: &SchemaName) -> Result<(), Error> {
    let span = tracing::info_span!("eventcore.postgres.migrate", schema = schema.as_str());
    migrate_traced(pool, schema).instrument(span).await
}

async fn migrate_traced(pool: &PgPool, schema: &SchemaName) -> Result<(), Error> {
    // A connection of our own: session settings (search_path) and the session lock
    // must not leak into the pool's connections, so this one is closed afterwards.
    let mut own = PgConnection::connect_with(&pool.connect_options())
        .await
        .map_err(|source| Error::Connect { source })?;
    let result = migrate_on(&mut own, schema).await;
    // Closing ends the session, which also releases the advisory lock if the migration
    // failed half-way.
    let _ = own.close().await;
    result
}

async fn migrate_on(conn: &mut PgConnection, schema: &SchemaName) -> Result<(), Error> {
    let failed = |source: sqlx::Error| Error::Migrate {
        schema: schema.to_string(),
        source: sqlx::migrate::MigrateError::Execute(source),
    };
    // The pool's statement_timeout must not cut the wait for a concurrent migrator.
    sqlx::query("SET statement_timeout TO 0")
        .execute(&mut *conn)
        .await
        .map_err(failed)?;
    let lock_key = format!("eventcore.migrate.{schema}");
    sqlx::query("SELECT pg_advisory_lock(17731, hashtext($1))")
        .bind(&lock_key)
        .execute(&mut *conn)
        .await
        .map_err(failed)?;
    sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {}", schema.quoted()))
        .execute(&mut *conn)
        .await
        .map_err(failed)?;
    sqlx::query(&format!("SET search_path TO {}", schema.quoted()))
        .execute(&mut *conn)
        .await
        .map_err(failed)?;
    // run_direct, not run: run's generic Acquire bound makes the future not Send
    // (it could not be awaited inside tokio::spawn); a test below checks it is.
    MIGRATOR
        .run_direct(&mut *conn)
        .await
        .map_err(|source| Error::Migrate {
            schema: schema.to_string(),
            source,
        })?;
    sqlx::query("SELECT pg_advisory_unlock(17731, hashtext($1))")
        .bind(&lock_key)
        .execute(&mut *conn)
        .await
        .map_err(failed)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    fn assert_send<T: Send>(_: &T) {}

    /// The embedded list is the directory, as sqlx's resolver reads it: every file, in
    /// order, with the same version, description, type, checksum and transaction mode
    /// (a file added without adding it to `FILES` fails here).
    #[tokio::test]
    async fn embedded_migrations_are_the_directory_as_sqlx_reads_it() {
        let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"));
        let resolved = sqlx::migrate::Migrator::new(dir)
            .await
            .expect("the migrations directory resolves");
        let ours: Vec<_> = super::MIGRATOR.iter().collect();
        let theirs: Vec<_> = resolved.iter().collect();
        assert_eq!(ours.len(), theirs.len(), "one embedded migration per file");
        for (ours, theirs) in ours.iter().zip(&theirs) {
            assert_eq!(ours.version, theirs.version);
            assert_eq!(ours.description, theirs.description);
            assert_eq!(ours.migration_type, theirs.migration_type);
            assert_eq!(ours.checksum, theirs.checksum, "version {}", ours.version);
            assert_eq!(ours.no_tx, theirs.no_tx);
            assert_eq!(ours.sql, theirs.sql);
        }
        assert!(!super::MIGRATOR.ignore_missing && super::MIGRATOR.locking);
    }

    /// `migrate()` can be awaited inside `tokio::spawn`. Compiling is the test; the
    /// future is never polled (no database is needed).
    #[tokio::test]
    async fn migrate_futures_are_send() {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .expect("a lazy pool needs no server");
        let schema = crate::SchemaName::default();
        let future = super::migrate(&pool, &schema);
        assert_send(&future);
        let store = crate::PostgresEventStore::from_pool(pool.clone(), schema.clone());
        let future = store.migrate();
        assert_send(&future);
    }
}
