//! The published language between the services: their events, the stream naming, the
//! topics, and the values they exchange. Each service owns the streams named here for it
//! and is the only one to write them, in its own store; the others learn about them only
//! from the events it publishes on its topic (the order saga asks a service for
//! something with a `…Requested` event of the Order service, and the service answers
//! with one of its own).

use eventcore::distributed::{ServiceId, Topic};
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

/// The five services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ServiceName {
    /// Registers users; publishes `user-events`.
    User,
    /// Takes orders, runs the order saga, keeps customer profiles; publishes
    /// `order-events`.
    Order,
    /// Keeps stock; publishes `inventory-events`.
    Inventory,
    /// Charges cards through the gateway; publishes `payment-events`.
    Payment,
    /// Ships parcels; publishes `shipping-events`.
    Shipping,
}

impl ServiceName {
    /// Every service, in the order they are started.
    pub const ALL: [ServiceName; 5] = [
        ServiceName::User,
        ServiceName::Order,
        ServiceName::Inventory,
        ServiceName::Payment,
        ServiceName::Shipping,
    ];

    /// The service's name: `user`, `order`, `inventory`, `payment` or `shipping`.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceName::User => "user",
            ServiceName::Order => "order",
            ServiceName::Inventory => "inventory",
            ServiceName::Payment => "payment",
            ServiceName::Shipping => "shipping",
        }
    }

    /// The service named `name`.
    pub fn parse(name: &str) -> Option<ServiceName> {
        ServiceName::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// Its id on the broker.
    pub fn id(self) -> ServiceId {
        ServiceId::try_new(self.as_str()).expect("the service names are valid service ids")
    }

    /// The topic it publishes on: `<name>-events`.
    pub fn topic(self) -> Topic {
        Topic::try_new(match self {
            ServiceName::User => "user-events",
            ServiceName::Order => "order-events",
            ServiceName::Inventory => "inventory-events",
            ServiceName::Payment => "payment-events",
            ServiceName::Shipping => "shipping-events",
        })
        .expect("the topic names are valid topics")
    }

    /// Its index in [`ServiceName::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for ServiceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `user-<id>`: owned by the User service.
pub fn user_stream(user_id: &str) -> eventcore::Result<StreamId> {
    Ok(StreamId::try_new(format!("user-{user_id}"))?)
}

/// `customer-<user id>`: the Order service's profile of a registered user.
pub fn customer_stream(user_id: &str) -> eventcore::Result<StreamId> {
    Ok(StreamId::try_new(format!("customer-{user_id}"))?)
}

/// `reservation-<order id>`: owned by the Inventory service; its answer to the order's
/// reservation request.
pub fn reservation_stream(order_id: &str) -> eventcore::Result<StreamId> {
    Ok(StreamId::try_new(format!("reservation-{order_id}"))?)
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
    /// The saga asks the Inventory service to reserve every line at once.
    StockReservationRequested {
        /// The order.
        order_id: String,
        /// What to reserve.
        lines: Vec<OrderLine>,
    },
    /// The saga asks the Inventory service to give back what the order holds.
    StockReleaseRequested {
        /// The order.
        order_id: String,
        /// The order's lines.
        lines: Vec<OrderLine>,
    },
    /// The saga asks the Payment service to charge the card.
    PaymentProcessingRequested {
        /// The order.
        order_id: String,
        /// How much.
        amount: Cents,
        /// The card token.
        card: String,
    },
    /// The saga asks the Payment service to pay back (or withdraw) the payment.
    PaymentRefundRequested {
        /// The order.
        order_id: String,
    },
    /// The saga asks the Shipping service to ship.
    ShipmentRequested {
        /// The order.
        order_id: String,
        /// Where to.
        address: Address,
    },
    /// The saga asks the Shipping service to stop the shipment.
    ShipmentCancellationRequested {
        /// The order.
        order_id: String,
    },
}

impl OrderEvent {
    /// The order service's request in `event`, if its type is one of `wanted` (the
    /// requests a service handles); `None` for every other event of `order-events`.
    ///
    /// # Errors
    ///
    /// [`eventcore::Error`] when an event of a wanted type does not decode.
    pub fn request_in(
        event: &eventcore::distributed::DistributedEvent,
        wanted: &[&str],
    ) -> eventcore::Result<Option<OrderEvent>> {
        if !wanted.contains(&event.event_type.as_str()) {
            return Ok(None);
        }
        Ok(Some(event.decode::<OrderEvent>()?.payload))
    }

    /// The order it is about.
    pub fn order_id(&self) -> &str {
        match self {
            OrderEvent::OrderCreated { order_id, .. }
            | OrderEvent::OrderCompleted { order_id }
            | OrderEvent::OrderCancelled { order_id, .. }
            | OrderEvent::StockReservationRequested { order_id, .. }
            | OrderEvent::StockReleaseRequested { order_id, .. }
            | OrderEvent::PaymentProcessingRequested { order_id, .. }
            | OrderEvent::PaymentRefundRequested { order_id }
            | OrderEvent::ShipmentRequested { order_id, .. }
            | OrderEvent::ShipmentCancellationRequested { order_id } => order_id,
        }
    }
}

/// Events of the User service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
pub enum UserEvent {
    /// A user signed up.
    UserRegistered {
        /// The user.
        user_id: String,
        /// Their name.
        name: String,
        /// Their e-mail address.
        email: String,
    },
}

/// The Order service's own (private) events about customers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
pub enum CustomerEvent {
    /// A profile made from the User service's `UserRegistered`.
    CustomerProfileCreated {
        /// The user.
        user_id: String,
        /// Their name.
        name: String,
        /// Their e-mail address.
        email: String,
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
    /// The answer to `StockReservationRequested`: every line is reserved.
    StockReservationConfirmed {
        /// The order.
        order_id: String,
    },
    /// The answer to `StockReservationRequested`: nothing was reserved.
    StockReservationRefused {
        /// The order.
        order_id: String,
        /// Why.
        reason: String,
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
    /// The order cannot be shipped.
    ShipmentRefused {
        /// The order.
        order_id: String,
        /// Why.
        reason: String,
    },
}

/// Any published event of the five services, for the components that read across them
/// (the order saga, the order view). Stored events are exactly those of the service
/// enums: each decodes, by its type name, into the one service enum that has the name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
pub enum ShopEvent {
    /// A User service event.
    #[event(transparent)]
    User(UserEvent),
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

/// Every published event type of the five services.
pub const SHOP_EVENT_TYPES: [&str; 23] = [
    "UserRegistered",
    "OrderCreated",
    "OrderCompleted",
    "OrderCancelled",
    "StockReservationRequested",
    "StockReleaseRequested",
    "PaymentProcessingRequested",
    "PaymentRefundRequested",
    "ShipmentRequested",
    "ShipmentCancellationRequested",
    "StockAdded",
    "StockReserved",
    "StockReleased",
    "StockReservationConfirmed",
    "StockReservationRefused",
    "PaymentRequested",
    "PaymentCaptured",
    "PaymentDeclined",
    "PaymentRefunded",
    "PaymentVoided",
    "ShipmentCreated",
    "ShipmentCancelled",
    "ShipmentRefused",
];
