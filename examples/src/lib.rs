//! Code shared by the runnable examples under `examples/<name>/`, so that the workspace
//! tests can run the very same scenarios against every event store.

#[path = "../distributed_ecommerce/mod.rs"]
pub mod distributed_ecommerce;
