//! PostgreSQL test support: a fresh schema per store, so tests never see each other.

use eventcore_postgres::{PostgresConfig, PostgresEventStore, SchemaName};

/// The database the PostgreSQL tests use.
///
/// # Panics
///
/// When DATABASE_URL is not set: the tests calling this are compiled as ignored then,
/// so reaching this without it is a broken set-up.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .expect("DATABASE_URL must be set to run the PostgreSQL tests (scripts/test sets it)")
}

/// A schema name no other test uses.
pub fn fresh_schema() -> SchemaName {
    SchemaName::try_new(format!("ect_{}", uuid::Uuid::new_v4().simple())).expect("valid")
}

/// The configuration for a store in `schema`.
pub fn config(schema: &SchemaName) -> PostgresConfig {
    PostgresConfig::from_url(&database_url())
        .expect("DATABASE_URL parses")
        .with_schema(schema.clone())
        .with_max_connections(12)
}

/// A migrated store in `schema`, on a pool of its own.
pub async fn store_in(schema: &SchemaName) -> PostgresEventStore {
    let store = PostgresEventStore::connect_with(config(schema))
        .await
        .expect("connect to DATABASE_URL");
    store.migrate().await.expect("migrate");
    store
}

/// A migrated store in a fresh schema.
pub async fn fresh_store() -> PostgresEventStore {
    store_in(&fresh_schema()).await
}
