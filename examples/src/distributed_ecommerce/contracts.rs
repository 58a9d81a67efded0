//! The published language between the services: their events, the stream naming, and the
//! values they exchange. Each service owns the streams named here for it and is the only
//! one to write them (the saga asks a service to write through that service's commands);
//! the others learn about them from events, from the log or by reading a stream in a
//! command (as `ReserveStock` reads the order's).

use eventcore::{Event, StreamId};
use serde::{Deserialize, Serialize};

/// Amounts in cents.
pub type Cents = u64;

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    /// The product.
    pub sku: String,
    /// How many units.
    pub quantity: u32,
    /// The price of one unit.
    pub unit_price: Cents,
}

/// Where an order ships to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Address {
    /// Street and number.
    pub street: String,
    /// City.
    pub city: String,
    /// ISO 3166 country code.
    pub country: String,
}

/// `order-<id>`: owned by the Order service.
pub fn order_stream(order_id: &str) -> eventcore::Result<StreamId> {
    Ok(StreamId::try_new(format!("order-{order_id}"))?)
}

/// `product-<sku>`: owned by the Inventory service.
pub fn product_stream(sku: &str) -> eventcore::Result<StreamId> {
    Ok(StreamId::try_new(format!("product-{sku}"))?)
}

/// `payment-<order id>`: owned by the Payment service.
pub fn payment_stream(order_id: &str) -> eventcore::Result<StreamId> {
    Ok(StreamId::try_new(format!("payment-{order_id}"))?)
}

/// `shipment-<order id>`: owned by the Shipping service.
pub fn shipment_stream(order_id: &str) -> eventcore::Result<StreamId> {
    Ok(StreamId::try_new(format!("shipment-{order_id}"))?)
}

/// Events of the Order service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
pub enum OrderEvent {
    /// A customer placed an order.
    OrderCreated {
        /// The order.
        order_id: String,
        /// Who ordered.
        customer: String,
        /// What.
        lines: Vec<OrderLine>,
        /// The sum of the lines.
        total: Cents,
        /// The card to charge (a token).
        card: String,
        /// Where to ship.
        address: Address,
    },
    /// Paid, reserved, shipped.
    OrderCompleted {
        /// The order.
        order_id: String,
    },
    /// Cancelled; everything it held was given back.
    OrderCancelled {
        /// The order.
        order_id: String,
        /// Why.
        reason: String,
    },
}

/// Events of the Inventory service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
pub enum InventoryEvent {
    /// Units arrived.
    StockAdded {
        /// The product.
        sku: String,
        /// How many.
        quantity: u32,
    },
    /// Units set aside for an order.
    StockReserved {
        /// The product.
        sku: String,
        /// For which order.
        order_id: String,
        /// How many.
        quantity: u32,
    },
    /// An order's reservation was given back.
    StockReleased {
        /// The product.
        sku: String,
        /// The order.
        order_id: String,
        /// How many.
        quantity: u32,
    },
}

/// Events of the Payment service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
pub enum PaymentEvent {
    /// The order's payment was asked of the gateway.
    PaymentRequested {
        /// The order.
        order_id: String,
        /// How much.
        amount: Cents,
        /// The card token.
        card: String,
    },
    /// The gateway charged the card.
    PaymentCaptured {
        /// The order.
        order_id: String,
        /// How much.
        amount: Cents,
        /// The gateway's reference.
        reference: String,
    },
    /// The gateway refused.
    PaymentDeclined {
        /// The order.
        order_id: String,
        /// Why.
        reason: String,
    },
    /// A captured payment was paid back.
    PaymentRefunded {
        /// The order.
        order_id: String,
        /// How much.
        amount: Cents,
    },
    /// A payment still waiting for the gateway was withdrawn.
    PaymentVoided {
        /// The order.
        order_id: String,
    },
}

/// Events of the Shipping service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
pub enum ShippingEvent {
    /// A parcel is on its way.
    ShipmentCreated {
        /// The order.
        order_id: String,
        /// Where to.
        address: Address,
    },
    /// The parcel was stopped.
    ShipmentCancelled {
        /// The order.
        order_id: String,
    },
}

/// Any event of the four services, for the components that read across them (a command
/// reading streams of two services, the order saga, the order view). Stored events are
/// exactly those of the service enums: each stored event decodes, by its type name, into
/// the one service enum that has the name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
pub enum ShopEvent {
    /// An Order service event.
    #[event(transparent)]
    Order(OrderEvent),
    /// An Inventory service event.
    #[event(transparent)]
    Inventory(InventoryEvent),
    /// A Payment service event.
    #[event(transparent)]
    Payment(PaymentEvent),
    /// A Shipping service event.
    #[event(transparent)]
    Shipping(ShippingEvent),
}

/// Every event type of the four services.
pub const SHOP_EVENT_TYPES: [&str; 13] = [
    "OrderCreated",
    "OrderCompleted",
    "OrderCancelled",
    "StockAdded",
    "StockReserved",
    "StockReleased",
    "PaymentRequested",
    "PaymentCaptured",
    "PaymentDeclined",
    "PaymentRefunded",
    "PaymentVoided",
    "ShipmentCreated",
    "ShipmentCancelled",
];
