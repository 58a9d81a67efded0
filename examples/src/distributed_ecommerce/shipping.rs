//! The Shipping service: owns `shipment-<order id>`. Creates and cancels shipments.

use eventcore::{
    Command, CommandLogic, CommandResult, ReadStreams, StoredEvent, StreamId, StreamResolver,
    StreamWrite, require,
};

use super::contracts::{Address, ShippingEvent, shipment_stream};

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
}

impl ShipmentStatus {
    /// Folds one shipping event.
    pub fn apply(&mut self, event: &ShippingEvent) {
        *self = match event {
            ShippingEvent::ShipmentCreated { .. } => ShipmentStatus::Created,
            ShippingEvent::ShipmentCancelled { .. } => ShipmentStatus::Cancelled,
        };
    }
}

/// Ships an order; shipping it again changes nothing. Refused for a country the carrier
/// does not serve.
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
        match state {
            ShipmentStatus::Created => return Ok(Vec::new()),
            ShipmentStatus::Cancelled => {
                return Err(eventcore::Error::BusinessRuleViolation(format!(
                    "the shipment of order {} was cancelled",
                    self.order_id
                )));
            }
            ShipmentStatus::None => {}
        }
        require!(
            SERVED_COUNTRIES.contains(&self.address.country.as_str()),
            "no carrier serves country {:?}",
            self.address.country
        );
        Ok(vec![StreamWrite::new(
            &read_streams,
            self.shipment.clone(),
            ShippingEvent::ShipmentCreated {
                order_id: self.order_id.clone(),
                address: self.address.clone(),
            },
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
