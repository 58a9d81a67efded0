//! The Shipping service: owns `shipment-<order id>`. Takes the order saga's requests from
//! `order-events`; creates, refuses and cancels shipments (published on
//! `shipping-events`).

use eventcore::distributed::{DistributedEvent, EventHandler};
use eventcore::{
    Command, CommandLogic, CommandResult, Dispatcher, ReadStreams, StoredEvent, StreamId,
    StreamResolver, StreamWrite,
};

use super::contracts::{Address, OrderEvent, ShippingEvent, shipment_stream};

/// The countries the carrier serves.
pub const SERVED_COUNTRIES: [&str; 5] = ["DE", "FR", "NL", "SE", "US"];

/// A shipment, as folded from its stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ShipmentStatus {
    /// None yet.
    #[default]
    None,
    /// On its way.
    Created,
    /// Stopped.
    Cancelled,
    /// Refused (no carrier).
    Refused,
}

impl ShipmentStatus {
    /// Folds one shipping event.
    pub fn apply(&mut self, event: &ShippingEvent) {
        *self = match event {
            ShippingEvent::ShipmentCreated { .. } => ShipmentStatus::Created,
            ShippingEvent::ShipmentCancelled { .. } => ShipmentStatus::Cancelled,
            ShippingEvent::ShipmentRefused { .. } => ShipmentStatus::Refused,
        };
    }
}

/// Ships an order, or answers `ShipmentRefused` for a country the carrier does not serve
/// or a shipment stopped before it was asked for; asking again changes nothing.
#[derive(Debug, Clone, Command)]
pub struct CreateShipment {
    /// `shipment-<order id>`.
    #[stream]
    pub shipment: StreamId,
    /// The order.
    pub order_id: String,
    /// Where to.
    pub address: Address,
}

impl CreateShipment {
    /// The shipment of `order_id` to `address`.
    pub fn new(order_id: &str, address: &Address) -> eventcore::Result<Self> {
        Ok(CreateShipment {
            shipment: shipment_stream(order_id)?,
            order_id: order_id.to_owned(),
            address: address.clone(),
        })
    }
}

impl CommandLogic for CreateShipment {
    type State = ShipmentStatus;
    type Event = ShippingEvent;

    fn apply(&self, state: &mut ShipmentStatus, event: &StoredEvent<ShippingEvent>) {
        state.apply(&event.payload);
    }

    fn handle(
        &self,
        read_streams: ReadStreams<Self::StreamSet>,
        state: ShipmentStatus,
        _: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, ShippingEvent>>> {
        let event = match state {
            ShipmentStatus::Created | ShipmentStatus::Refused => return Ok(Vec::new()),
            ShipmentStatus::Cancelled => ShippingEvent::ShipmentRefused {
                order_id: self.order_id.clone(),
                reason: format!("the shipment of order {} was cancelled", self.order_id),
            },
            ShipmentStatus::None if !SERVED_COUNTRIES.contains(&self.address.country.as_str()) => {
                ShippingEvent::ShipmentRefused {
                    order_id: self.order_id.clone(),
                    reason: format!("no carrier serves country {:?}", self.address.country),
                }
            }
            ShipmentStatus::None => ShippingEvent::ShipmentCreated {
                order_id: self.order_id.clone(),
                address: self.address.clone(),
            },
        };
        Ok(vec![StreamWrite::new(
            &read_streams,
            self.shipment.clone(),
            event,
        )?])
    }
}

/// Stops a shipment. With no shipment yet it records the stop anyway, so a shipment
/// requested after it is refused; stopping again changes nothing.
#[derive(Debug, Clone, Command)]
pub struct CancelShipment {
    /// `shipment-<order id>`.
    #[stream]
    pub shipment: StreamId,
    /// The order.
    pub order_id: String,
}

impl CancelShipment {
    /// The cancellation of `order_id`'s shipment.
    pub fn new(order_id: &str) -> eventcore::Result<Self> {
        Ok(CancelShipment {
            shipment: shipment_stream(order_id)?,
            order_id: order_id.to_owned(),
        })
    }
}

impl CommandLogic for CancelShipment {
    type State = ShipmentStatus;
    type Event = ShippingEvent;

    fn apply(&self, state: &mut ShipmentStatus, event: &StoredEvent<ShippingEvent>) {
        state.apply(&event.payload);
    }

    fn handle(
        &self,
        read_streams: ReadStreams<Self::StreamSet>,
        state: ShipmentStatus,
        _: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, ShippingEvent>>> {
        if state == ShipmentStatus::Cancelled {
            return Ok(Vec::new());
        }
        Ok(vec![StreamWrite::new(
            &read_streams,
            self.shipment.clone(),
            ShippingEvent::ShipmentCancelled {
                order_id: self.order_id.clone(),
            },
        )?])
    }
}

/// The Shipping service's handler of `order-events`: ships on `ShipmentRequested` and
/// stops on `ShipmentCancellationRequested`, each exactly once however often the request
/// is delivered.
#[derive(Debug, Default)]
pub struct ShippingRequests;

impl EventHandler for ShippingRequests {
    async fn handle(
        &mut self,
        event: &DistributedEvent,
        dispatcher: &mut Dispatcher<'_>,
    ) -> eventcore::Result<()> {
        match OrderEvent::request_in(
            event,
            &["ShipmentRequested", "ShipmentCancellationRequested"],
        )? {
            Some(OrderEvent::ShipmentRequested { order_id, address }) => {
                dispatcher
                    .dispatch(&CreateShipment::new(&order_id, &address)?)
                    .await?;
            }
            Some(OrderEvent::ShipmentCancellationRequested { order_id }) => {
                dispatcher
                    .dispatch(&CancelShipment::new(&order_id)?)
                    .await?;
            }
            _ => {}
        }
        Ok(())
    }
}
