//! A read model across the services: one line per order with its stock, payment and
//! shipping status, built by a projection from the events the Order, Inventory, Payment
//! and Shipping services publish (it reads no service's store).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;

use eventcore::{Projection, ProjectionFilter, StoredEvent};

use super::contracts::{
    Cents, InventoryEvent, OrderEvent, PaymentEvent, SHOP_EVENT_TYPES, ShippingEvent, ShopEvent,
};

/// One order, as the Order, Inventory, Payment and Shipping services published it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrderSummary {
    /// Who ordered.
    pub customer: String,
    /// The total.
    pub total: Cents,
    /// `pending`, `completed` or `cancelled`.
    pub status: &'static str,
    /// Why it was cancelled.
    pub reason: Option<String>,
    /// `-`, `reserved`, `refused` or `released`.
    pub stock: &'static str,
    /// `-`, `requested`, `captured`, `declined`, `refunded` or `voided`.
    pub payment: &'static str,
    /// `-`, `shipped`, `refused` or `cancelled`.
    pub shipping: &'static str,
}

/// Every order by id.
#[derive(Debug, Clone, Default)]
pub struct OrderView {
    /// The orders.
    pub orders: BTreeMap<String, OrderSummary>,
    filter: ProjectionFilter,
}

impl OrderView {
    /// An empty view.
    pub fn new() -> eventcore::Result<Self> {
        let types = SHOP_EVENT_TYPES.iter().filter(|t| {
            **t != "StockAdded" && **t != "UserRegistered" && !t.ends_with("Requested")
        });
        Ok(OrderView {
            orders: BTreeMap::new(),
            filter: ProjectionFilter::all().with_event_types(types)?,
        })
    }

    fn order(&mut self, order_id: &str) -> &mut OrderSummary {
        self.orders
            .entry(order_id.to_owned())
            .or_insert_with(|| OrderSummary {
                status: "pending",
                stock: "-",
                payment: "-",
                shipping: "-",
                ..OrderSummary::default()
            })
    }
}

impl Projection for OrderView {
    type Event = ShopEvent;
    type Error = Infallible;

    fn name(&self) -> &str {
        "order-view"
    }

    fn filter(&self) -> ProjectionFilter {
        self.filter.clone()
    }

    async fn apply(&mut self, event: &StoredEvent<ShopEvent>) -> Result<(), Infallible> {
        match &event.payload {
            ShopEvent::Order(OrderEvent::OrderCreated {
                order_id,
                customer,
                total,
                ..
            }) => {
                let order = self.order(order_id);
                order.customer.clone_from(customer);
                order.total = *total;
            }
            ShopEvent::Order(OrderEvent::OrderCompleted { order_id }) => {
                self.order(order_id).status = "completed";
            }
            ShopEvent::Order(OrderEvent::OrderCancelled { order_id, reason }) => {
                let order = self.order(order_id);
                order.status = "cancelled";
                order.reason = Some(reason.clone());
            }
            ShopEvent::Inventory(InventoryEvent::StockReserved { order_id, .. }) => {
                self.order(order_id).stock = "reserved";
            }
            ShopEvent::Inventory(InventoryEvent::StockReleased { order_id, .. }) => {
                self.order(order_id).stock = "released";
            }
            ShopEvent::Inventory(InventoryEvent::StockReservationRefused { order_id, .. }) => {
                self.order(order_id).stock = "refused";
            }
            ShopEvent::Inventory(
                InventoryEvent::StockAdded { .. }
                | InventoryEvent::StockReservationConfirmed { .. },
            )
            | ShopEvent::User(_)
            | ShopEvent::Order(_) => {}
            ShopEvent::Payment(payment) => {
                let (order_id, status) = match payment {
                    PaymentEvent::PaymentRequested { order_id, .. } => (order_id, "requested"),
                    PaymentEvent::PaymentCaptured { order_id, .. } => (order_id, "captured"),
                    PaymentEvent::PaymentDeclined { order_id, .. } => (order_id, "declined"),
                    PaymentEvent::PaymentRefunded { order_id, .. } => (order_id, "refunded"),
                    PaymentEvent::PaymentVoided { order_id } => (order_id, "voided"),
                };
                self.order(order_id).payment = status;
            }
            ShopEvent::Shipping(ShippingEvent::ShipmentCreated { order_id, .. }) => {
                self.order(order_id).shipping = "shipped";
            }
            ShopEvent::Shipping(ShippingEvent::ShipmentCancelled { order_id }) => {
                self.order(order_id).shipping = "cancelled";
            }
            ShopEvent::Shipping(ShippingEvent::ShipmentRefused { order_id, .. }) => {
                self.order(order_id).shipping = "refused";
            }
        }
        Ok(())
    }

    async fn reset(&mut self) -> Result<(), Infallible> {
        self.orders.clear();
        Ok(())
    }
}

impl fmt::Display for OrderView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "  {:<8} {:<9} {:>9}  {:<10} {:<9} {:<10} {:<9} reason",
            "order", "customer", "total", "status", "stock", "payment", "shipping"
        )?;
        for (id, order) in &self.orders {
            writeln!(
                f,
                "  {:<8} {:<9} {:>9}  {:<10} {:<9} {:<10} {:<9} {}",
                id,
                order.customer,
                money(order.total),
                order.status,
                order.stock,
                order.payment,
                order.shipping,
                order.reason.as_deref().unwrap_or("")
            )?;
        }
        Ok(())
    }
}

/// Cents as `12.34`.
pub fn money(cents: Cents) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
}
