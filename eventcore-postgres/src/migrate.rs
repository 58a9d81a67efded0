//! Embedded migrations, run into the store's schema.

use sqlx::migrate::Migrator;
use sqlx::{Connection, PgConnection, PgPool};
use tracing::Instrument;

use crate::config::SchemaName;
use crate::error::Error;

/// The embedded migrations (`migrations/NNNN_*.sql`). Run them with [`migrate`], which
/// applies them inside the store's schema; running them yourself works too, on a
/// connection whose `search_path` is that schema alone.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

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
