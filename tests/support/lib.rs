//! Shared support for the workspace tests: a small bank domain and checks of the
//! invariants every backend must keep under concurrency.

pub mod bank;
pub mod ecommerce;
pub mod nats;
pub mod nats_server;
pub mod postgres;
pub mod proxy;
pub mod two_services;
