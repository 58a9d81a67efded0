//! The workspace tests: the conformance suites against every backend, the invariant and
//! fault tests, and the examples' scenarios, in one binary (one module per file). Run a
//! part with a filter: `cargo test -p eventcore-tests --test workspace
//! conformance_postgres::`. Two tests keep binaries of their own because they must not
//! share the server with other tests: `postgres_lock_table` (fills the server's lock
//! table) and `postgres_prefix_torture` (writer processes under load).

mod bank_invariant_memory;
mod bank_invariant_postgres;
mod command_scenarios;
mod conformance_memory;
mod conformance_postgres;
mod ecommerce_memory;
mod ecommerce_postgres;
mod ecommerce_processes;
mod federation;
mod health;
mod metrics;
mod nats_faults;
mod payload_roundtrip;
mod postgres_hostile;
mod postgres_prefix;
mod postgres_store;
mod process_metadata;
mod projections_exactly_once;
mod projections_leadership;
mod projections_memory;
mod projections_postgres;
mod publisher_memory;
mod registry;
mod subscriber_memory;
mod tracing_otel;
mod transport_memory;
mod transport_nats;
mod two_services;
