//! The order saga (Order service): takes an order through stock, payment, shipping and
//! completion, and undoes what was done, in reverse order, when a step is refused or
//! does not answer in time.
//!
//! It is orchestrated: each step that needs another service writes a `…Requested` event
//! on the order's stream (published on `order-events`) and waits; the service answers
//! with an event on its own topic, which reaches the saga over the Order service's
//! `order-saga` subscription ([`eventcore::saga::SagaManager`] is also an
//! [`eventcore::distributed::EventHandler`]). Compensations are requests too; they are
//! written in reverse order, and each service applies them exactly once (they cannot be
//! refused, so the saga does not wait for them).

use std::time::Duration;

use eventcore::saga::{Saga, SagaContext, SagaStep, SagaTrigger, StepOutcome};
use eventcore::{Dispatcher, Error, StoredEvent};
use serde::{Deserialize, Serialize};

use super::contracts::{
    Address, Cents, InventoryEvent, OrderEvent, OrderLine, PaymentEvent, ShippingEvent, ShopEvent,
    order_stream,
};
use super::order::{CancelOrder, CompleteOrder, SendRequest};

/// What an order saga works on: copied from `OrderCreated`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderSagaInput {
    /// The order.
    pub order_id: String,
    /// Its lines.
    pub lines: Vec<OrderLine>,
    /// Its total.
    pub total: Cents,
    /// The card token.
    pub card: String,
    /// Where to ship.
    pub address: Address,
}

/// The steps, in order.
pub mod steps {
    /// The order exists (created by `CreateOrder`); undone by cancelling it.
    pub const PLACE_ORDER: &str = "place-order";
    /// Asked of the Inventory service, answered by `StockReservationConfirmed` or
    /// `StockReservationRefused`; undone by asking it to release the stock.
    pub const RESERVE_STOCK: &str = "reserve-stock";
    /// Asked of the Payment service, answered by `PaymentCaptured` or `PaymentDeclined`,
    /// or timed out; undone by asking for a refund (or a void if it was never answered).
    pub const PAYMENT: &str = "payment";
    /// Asked of the Shipping service, answered by `ShipmentCreated` or
    /// `ShipmentRefused`; undone by asking it to stop the shipment.
    pub const SHIPPING: &str = "shipping";
    /// The order is completed.
    pub const COMPLETE: &str = "complete";
}

/// The order saga.
#[derive(Debug, Clone)]
pub struct OrderSaga {
    /// How long the payment step waits for the gateway before the saga compensates.
    pub payment_timeout: Duration,
}

/// How long the reservation and shipping steps wait for the other service's answer
/// before the saga compensates: they answer at once when they are up, so only a service
/// that is down or keeps failing on the request (its subscription parks it) reaches it.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(300);

impl OrderSaga {
    /// The saga's name: its streams are `saga/order-fulfilment/<order id>`.
    pub const NAME: &'static str = "order-fulfilment";
}

impl Saga for OrderSaga {
    type Input = OrderSagaInput;
    type Event = ShopEvent;

    fn name(&self) -> &str {
        Self::NAME
    }

    fn steps(&self) -> Vec<SagaStep> {
        vec![
            SagaStep::new(steps::PLACE_ORDER),
            SagaStep::new(steps::RESERVE_STOCK).with_timeout(ANSWER_TIMEOUT),
            SagaStep::new(steps::PAYMENT).with_timeout(self.payment_timeout),
            SagaStep::new(steps::SHIPPING).with_timeout(ANSWER_TIMEOUT),
            SagaStep::new(steps::COMPLETE),
        ]
    }

    fn listens_to(&self) -> Vec<String> {
        [
            "OrderCreated",
            "StockReservationConfirmed",
            "StockReservationRefused",
            "PaymentCaptured",
            "PaymentDeclined",
            "ShipmentCreated",
            "ShipmentRefused",
        ]
        .map(String::from)
        .to_vec()
    }

    fn on_event(&self, event: &StoredEvent<ShopEvent>) -> Option<SagaTrigger<OrderSagaInput>> {
        // An answer counts only from the stream the answering service keeps for that
        // order (`reservation-`, `payment-`, `shipment-<order id>`), and a start only
        // from the order's own stream: an event that merely names the order elsewhere
        // moves nothing.
        let from = |stream: Result<eventcore::StreamId, eventcore::Error>| {
            stream.is_ok_and(|stream| stream == event.stream_id)
        };
        let trusted = match &event.payload {
            ShopEvent::Order(order) => from(order_stream(order.order_id())),
            ShopEvent::Inventory(
                InventoryEvent::StockReservationConfirmed { order_id }
                | InventoryEvent::StockReservationRefused { order_id, .. },
            ) => from(super::contracts::reservation_stream(order_id)),
            ShopEvent::Payment(
                PaymentEvent::PaymentCaptured { order_id, .. }
                | PaymentEvent::PaymentDeclined { order_id, .. },
            ) => from(super::contracts::payment_stream(order_id)),
            ShopEvent::Shipping(
                ShippingEvent::ShipmentCreated { order_id, .. }
                | ShippingEvent::ShipmentRefused { order_id, .. },
            ) => from(super::contracts::shipment_stream(order_id)),
            _ => false,
        };
        if !trusted {
            tracing::warn!(stream = %event.stream_id, event_id = %event.event_id, "not from the stream that answers for its order; ignored");
            return None;
        }
        match &event.payload {
            ShopEvent::Order(OrderEvent::OrderCreated {
                order_id,
                lines,
                total,
                card,
                address,
                ..
            }) => Some(SagaTrigger::Start {
                instance: order_id.clone(),
                input: OrderSagaInput {
                    order_id: order_id.clone(),
                    lines: lines.clone(),
                    total: *total,
                    card: card.clone(),
                    address: address.clone(),
                },
            }),
            ShopEvent::Inventory(InventoryEvent::StockReservationConfirmed { order_id }) => Some(
                reply(order_id, steps::RESERVE_STOCK, StepOutcome::Succeeded),
            ),
            ShopEvent::Inventory(InventoryEvent::StockReservationRefused { order_id, reason }) => {
                Some(reply(
                    order_id,
                    steps::RESERVE_STOCK,
                    StepOutcome::Failed(reason.clone()),
                ))
            }
            ShopEvent::Payment(PaymentEvent::PaymentCaptured { order_id, .. }) => {
                Some(reply(order_id, steps::PAYMENT, StepOutcome::Succeeded))
            }
            ShopEvent::Payment(PaymentEvent::PaymentDeclined { order_id, reason }) => Some(reply(
                order_id,
                steps::PAYMENT,
                StepOutcome::Failed(reason.clone()),
            )),
            ShopEvent::Shipping(ShippingEvent::ShipmentCreated { order_id, .. }) => {
                Some(reply(order_id, steps::SHIPPING, StepOutcome::Succeeded))
            }
            ShopEvent::Shipping(ShippingEvent::ShipmentRefused { order_id, reason }) => {
                Some(reply(
                    order_id,
                    steps::SHIPPING,
                    StepOutcome::Failed(reason.clone()),
                ))
            }
            _ => None,
        }
    }

    async fn perform(
        &self,
        step: &str,
        saga: SagaContext<'_, OrderSagaInput>,
        dispatcher: &mut Dispatcher<'_>,
    ) -> eventcore::Result<StepOutcome> {
        let order = saga.input;
        let request = match step {
            steps::PLACE_ORDER => return Ok(StepOutcome::Succeeded),
            steps::RESERVE_STOCK => OrderEvent::StockReservationRequested {
                order_id: order.order_id.clone(),
                lines: order.lines.clone(),
            },
            steps::PAYMENT => OrderEvent::PaymentProcessingRequested {
                order_id: order.order_id.clone(),
                amount: order.total,
                card: order.card.clone(),
            },
            steps::SHIPPING => OrderEvent::ShipmentRequested {
                order_id: order.order_id.clone(),
                address: order.address.clone(),
            },
            steps::COMPLETE => {
                let command = CompleteOrder {
                    order: order_stream(&order.order_id)?,
                    order_id: order.order_id.clone(),
                };
                return StepOutcome::from_execution(dispatcher.dispatch(&command).await);
            }
            other => return Err(unknown_step(other)),
        };
        // Asked; the answer comes as an event of the other service (or the deadline
        // passes).
        match StepOutcome::from_execution(dispatcher.dispatch(&SendRequest::new(request)?).await)? {
            StepOutcome::Succeeded => Ok(StepOutcome::Pending),
            refused => Ok(refused),
        }
    }

    async fn compensate(
        &self,
        step: &str,
        saga: SagaContext<'_, OrderSagaInput>,
        dispatcher: &mut Dispatcher<'_>,
    ) -> eventcore::Result<()> {
        let order = saga.input;
        let order_id = order.order_id.clone();
        let request = match step {
            steps::PLACE_ORDER => {
                let command = CancelOrder {
                    order: order_stream(&order.order_id)?,
                    order_id,
                    reason: saga.failure.unwrap_or("cancelled").to_owned(),
                };
                dispatcher.dispatch(&command).await?;
                return Ok(());
            }
            steps::RESERVE_STOCK => OrderEvent::StockReleaseRequested {
                order_id,
                lines: order.lines.clone(),
            },
            steps::PAYMENT => OrderEvent::PaymentRefundRequested { order_id },
            steps::SHIPPING => OrderEvent::ShipmentCancellationRequested { order_id },
            steps::COMPLETE => return Ok(()),
            other => return Err(unknown_step(other)),
        };
        dispatcher.dispatch(&SendRequest::new(request)?).await?;
        Ok(())
    }
}

fn reply(order_id: &str, step: &str, outcome: StepOutcome) -> SagaTrigger<OrderSagaInput> {
    SagaTrigger::Reply {
        instance: order_id.to_owned(),
        step: step.to_owned(),
        outcome,
    }
}

fn unknown_step(step: &str) -> Error {
    Error::InvalidSaga {
        saga: OrderSaga::NAME.to_owned(),
        reason: format!("no step named `{step}`"),
    }
}
