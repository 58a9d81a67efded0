//! The distributed e-commerce example: four services (Order, Inventory, Payment,
//! Shipping) that own their streams and talk only through events and commands, an order
//! saga that coordinates them with compensations and a payment deadline, and an order
//! view across all four. `cargo run --example distributed_ecommerce` tells the
//! scenarios; the workspace tests run them against every store.

pub mod contracts;
pub mod inventory;
pub mod order;
pub mod order_saga;
pub mod payment;
pub mod scenarios;
pub mod shipping;
pub mod shop;
pub mod user;
pub mod view;
