//! Code shared by the runnable examples under `examples/<name>/`, so that the workspace
//! tests can run the very same scenarios against every event store.

pub mod distributed_ecommerce;
