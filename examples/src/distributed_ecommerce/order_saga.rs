//! The order saga (Order service): takes an order through stock, payment, shipping and
//! completion, and undoes what was done, in reverse order, when a step is refused or
//! does not answer in time.

use std::time::Duration;

use eventcore::saga::{Saga, SagaContext, SagaStep, SagaTrigger, StepOutcome};
use eventcore::{Dispatcher, Error, StoredEvent};
use serde::{Deserialize, Serialize};

use super::contracts::{
    Address, Cents, OrderEvent, OrderLine, PaymentEvent, ShopEvent, order_stream,
};
use super::inventory::{ReleaseStock, ReserveStock};
use super::order::{CancelOrder, CompleteOrder};
use super::payment::{ProcessPayment, RefundPayment};
use super::shipping::{CancelShipment, CreateShipment};

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
    /// Every line reserved at once; undone by releasing the stock.
    pub const RESERVE_STOCK: &str = "reserve-stock";
    /// Asked of the gateway, answered by `PaymentCaptured` or `PaymentDeclined`, or
    /// timed out; undone by a refund (or a void if it was never answered).
    pub const PAYMENT: &str = "payment";
    /// Shipped; undone by stopping the shipment.
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
            SagaStep::new(steps::RESERVE_STOCK),
            SagaStep::new(steps::PAYMENT).with_timeout(self.payment_timeout),
            SagaStep::new(steps::SHIPPING),
            SagaStep::new(steps::COMPLETE),
        ]
    }

    fn listens_to(&self) -> Vec<String> {
        ["OrderCreated", "PaymentCaptured", "PaymentDeclined"]
            .map(String::from)
            .to_vec()
    }

    fn on_event(&self, event: &StoredEvent<ShopEvent>) -> Option<SagaTrigger<OrderSagaInput>> {
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
            ShopEvent::Payment(PaymentEvent::PaymentCaptured { order_id, .. }) => {
                Some(SagaTrigger::Reply {
                    instance: order_id.clone(),
                    step: steps::PAYMENT.to_owned(),
                    outcome: StepOutcome::Succeeded,
                })
            }
            ShopEvent::Payment(PaymentEvent::PaymentDeclined { order_id, reason }) => {
                Some(SagaTrigger::Reply {
                    instance: order_id.clone(),
                    step: steps::PAYMENT.to_owned(),
                    outcome: StepOutcome::Failed(reason.clone()),
                })
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
        match step {
            steps::PLACE_ORDER => Ok(StepOutcome::Succeeded),
            steps::RESERVE_STOCK => {
                let command = ReserveStock::new(&order.order_id, &order.lines)?;
                StepOutcome::from_execution(dispatcher.dispatch(&command).await)
            }
            steps::PAYMENT => {
                let command = ProcessPayment::new(&order.order_id, order.total, &order.card)?;
                // Asked; the answer comes as an event (or the deadline passes).
                match StepOutcome::from_execution(dispatcher.dispatch(&command).await)? {
                    StepOutcome::Succeeded => Ok(StepOutcome::Pending),
                    refused => Ok(refused),
                }
            }
            steps::SHIPPING => {
                let command = CreateShipment::new(&order.order_id, &order.address)?;
                StepOutcome::from_execution(dispatcher.dispatch(&command).await)
            }
            steps::COMPLETE => {
                let command = CompleteOrder {
                    order: order_stream(&order.order_id)?,
                    order_id: order.order_id.clone(),
                };
                StepOutcome::from_execution(dispatcher.dispatch(&command).await)
            }
            other => Err(unknown_step(other)),
        }
    }

    async fn compensate(
        &self,
        step: &str,
        saga: SagaContext<'_, OrderSagaInput>,
        dispatcher: &mut Dispatcher<'_>,
    ) -> eventcore::Result<()> {
        let order = saga.input;
        match step {
            steps::PLACE_ORDER => {
                let command = CancelOrder {
                    order: order_stream(&order.order_id)?,
                    order_id: order.order_id.clone(),
                    reason: saga.failure.unwrap_or("cancelled").to_owned(),
                };
                dispatcher.dispatch(&command).await?;
            }
            steps::RESERVE_STOCK => {
                dispatcher
                    .dispatch(&ReleaseStock::new(&order.order_id, &order.lines)?)
                    .await?;
            }
            steps::PAYMENT => {
                dispatcher
                    .dispatch(&RefundPayment::new(&order.order_id)?)
                    .await?;
            }
            steps::SHIPPING => {
                dispatcher
                    .dispatch(&CancelShipment::new(&order.order_id)?)
                    .await?;
            }
            steps::COMPLETE => {}
            other => return Err(unknown_step(other)),
        }
        Ok(())
    }
}

fn unknown_step(step: &str) -> Error {
    Error::InvalidSaga {
        saga: OrderSaga::NAME.to_owned(),
        reason: format!("no step named `{step}`"),
    }
}
