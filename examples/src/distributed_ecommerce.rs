//! The distributed e-commerce example: five services (User, Order, Inventory, Payment,
//! Shipping), each with its own event store, that learn about each other only from the
//! events they publish through a broker; an order saga in the Order service that asks
//! the others for each step and compensates, in reverse order, with a payment deadline;
//! and the storefront's order view, built from the published events. `cargo run
//! --example distributed_ecommerce` tells the scenarios; the workspace tests run them
//! with one store per service, in memory and on PostgreSQL.

pub mod contracts;
pub mod inventory;
pub mod order;
pub mod order_saga;
pub mod payment;
pub mod process;
pub mod reporting;
pub mod scenarios;
pub mod shipping;
pub mod shop;
pub mod user;
pub mod view;
