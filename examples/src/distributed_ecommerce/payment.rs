//! The Payment service: owns `payment-<order id>`. Takes the order saga's requests from
//! `order-events`, asks the card gateway for payments, records its answers (published
//! on `payment-events`: the saga's answer), refunds.
//!
//! The gateway is outside the event store: it answers later (or never), and it can be
//! down. Its adapter is a process manager that reacts to `PaymentRequested`, calls the
//! gateway through a circuit breaker with the event id as the gateway's own idempotency
//! key, and records the answer with a command. While the gateway is down the breaker
//! opens and the adapter stops calling it; the payments it could not ask for stay
//! requested, and the order saga's payment deadline compensates them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use eventcore::circuit_breaker::{CircuitBreaker, CircuitBreakerConfig, CircuitBreakerError};
use eventcore::distributed::{DistributedEvent, EventHandler};
use eventcore::{
    Command, CommandLogic, CommandResult, Dispatcher, ProcessManager, ProjectionFilter,
    ReadStreams, StoredEvent, StreamId, StreamResolver, StreamWrite, require,
};
use serde::{Deserialize, Serialize};

use super::contracts::{Cents, OrderEvent, PaymentEvent, payment_stream};

/// A payment, as folded from its stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PaymentStatus {
    /// Never requested.
    #[default]
    None,
    /// Asked of the gateway, no answer yet.
    Requested {
        /// How much.
        amount: Cents,
    },
    /// Charged.
    Captured {
        /// How much.
        amount: Cents,
    },
    /// Refused by the gateway.
    Declined {
        /// How much was asked.
        amount: Cents,
    },
    /// Withdrawn before the gateway answered.
    Voided {
        /// How much was asked.
        amount: Cents,
    },
    /// Charged, then paid back.
    Refunded,
}

impl PaymentStatus {
    /// Folds one payment event.
    pub fn apply(&mut self, event: &PaymentEvent) {
        *self = match (*self, event) {
            (_, PaymentEvent::PaymentRequested { amount, .. }) => {
                PaymentStatus::Requested { amount: *amount }
            }
            (_, PaymentEvent::PaymentCaptured { amount, .. }) => {
                PaymentStatus::Captured { amount: *amount }
            }
            (PaymentStatus::Requested { amount }, PaymentEvent::PaymentDeclined { .. }) => {
                PaymentStatus::Declined { amount }
            }
            (_, PaymentEvent::PaymentDeclined { .. }) => PaymentStatus::Declined { amount: 0 },
            (PaymentStatus::Requested { amount }, PaymentEvent::PaymentVoided { .. }) => {
                PaymentStatus::Voided { amount }
            }
            (_, PaymentEvent::PaymentVoided { .. }) => PaymentStatus::Voided { amount: 0 },
            (_, PaymentEvent::PaymentRefunded { .. }) => PaymentStatus::Refunded,
        };
    }
}

/// Asks for an order's payment; asking again, or after the payment was voided, changes
/// nothing.
#[derive(Debug, Clone, Command)]
pub struct ProcessPayment {
    /// `payment-<order id>`.
    #[stream]
    pub payment: StreamId,
    /// The order.
    pub order_id: String,
    /// How much.
    pub amount: Cents,
    /// The card token.
    pub card: String,
}

impl ProcessPayment {
    /// The payment of `amount` for `order_id` with `card`.
    pub fn new(order_id: &str, amount: Cents, card: &str) -> eventcore::Result<Self> {
        Ok(ProcessPayment {
            payment: payment_stream(order_id)?,
            order_id: order_id.to_owned(),
            amount,
            card: card.to_owned(),
        })
    }
}

impl CommandLogic for ProcessPayment {
    type State = PaymentStatus;
    type Event = PaymentEvent;

    fn apply(&self, state: &mut PaymentStatus, event: &StoredEvent<PaymentEvent>) {
        state.apply(&event.payload);
    }

    fn handle(
        &self,
        read_streams: ReadStreams<Self::StreamSet>,
        state: PaymentStatus,
        _: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, PaymentEvent>>> {
        require!(
            self.amount > 0,
            "a payment of 0 for order {}",
            self.order_id
        );
        if state != PaymentStatus::None {
            return Ok(Vec::new());
        }
        Ok(vec![StreamWrite::new(
            &read_streams,
            self.payment.clone(),
            PaymentEvent::PaymentRequested {
                order_id: self.order_id.clone(),
                amount: self.amount,
                card: self.card.clone(),
            },
        )?])
    }
}

/// What the gateway said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GatewayAnswer {
    /// Charged, under this reference.
    Approved {
        /// The gateway's reference.
        reference: String,
    },
    /// Refused.
    Declined {
        /// Why.
        reason: String,
    },
}

/// Records the gateway's answer. A repeated answer changes nothing; an approval that
/// arrives after the payment was voided (or declined) is recorded and paid back at once,
/// so no money is kept for a cancelled order.
#[derive(Debug, Clone, Command)]
pub struct RecordGatewayAnswer {
    /// `payment-<order id>`.
    #[stream]
    pub payment: StreamId,
    /// The order.
    pub order_id: String,
    /// The answer.
    pub answer: GatewayAnswer,
}

impl CommandLogic for RecordGatewayAnswer {
    type State = PaymentStatus;
    type Event = PaymentEvent;

    fn apply(&self, state: &mut PaymentStatus, event: &StoredEvent<PaymentEvent>) {
        state.apply(&event.payload);
    }

    fn handle(
        &self,
        read_streams: ReadStreams<Self::StreamSet>,
        state: PaymentStatus,
        _: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, PaymentEvent>>> {
        let order_id = self.order_id.clone();
        let events = match (state, &self.answer) {
            (PaymentStatus::Requested { amount }, GatewayAnswer::Approved { reference }) => {
                vec![PaymentEvent::PaymentCaptured {
                    order_id,
                    amount,
                    reference: reference.clone(),
                }]
            }
            (PaymentStatus::Requested { .. }, GatewayAnswer::Declined { reason }) => {
                vec![PaymentEvent::PaymentDeclined {
                    order_id,
                    reason: reason.clone(),
                }]
            }
            // Money taken for a payment that was withdrawn or refused: recorded, and paid
            // back at once.
            (
                PaymentStatus::Voided { amount } | PaymentStatus::Declined { amount },
                GatewayAnswer::Approved { reference },
            ) => vec![
                PaymentEvent::PaymentCaptured {
                    order_id: order_id.clone(),
                    amount,
                    reference: reference.clone(),
                },
                PaymentEvent::PaymentRefunded { order_id, amount },
            ],
            (PaymentStatus::None, _) => {
                return Err(eventcore::Error::BusinessRuleViolation(format!(
                    "no payment was requested for order {}",
                    self.order_id
                )));
            }
            // Answered already, or a refusal after a void: nothing happened.
            _ => Vec::new(),
        };
        events
            .into_iter()
            .map(|event| StreamWrite::new(&read_streams, self.payment.clone(), event))
            .collect()
    }
}

/// Pays back a captured payment, or voids one still waiting for the gateway. A payment
/// never requested is voided too, so that a request arriving after it (from a saga
/// instance that stalled) is refused; nothing to do for a payment declined or already
/// undone.
#[derive(Debug, Clone, Command)]
pub struct RefundPayment {
    /// `payment-<order id>`.
    #[stream]
    pub payment: StreamId,
    /// The order.
    pub order_id: String,
}

impl RefundPayment {
    /// The refund of `order_id`'s payment.
    pub fn new(order_id: &str) -> eventcore::Result<Self> {
        Ok(RefundPayment {
            payment: payment_stream(order_id)?,
            order_id: order_id.to_owned(),
        })
    }
}

impl CommandLogic for RefundPayment {
    type State = PaymentStatus;
    type Event = PaymentEvent;

    fn apply(&self, state: &mut PaymentStatus, event: &StoredEvent<PaymentEvent>) {
        state.apply(&event.payload);
    }

    fn handle(
        &self,
        read_streams: ReadStreams<Self::StreamSet>,
        state: PaymentStatus,
        _: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, PaymentEvent>>> {
        let order_id = self.order_id.clone();
        let event = match state {
            PaymentStatus::Captured { amount } => {
                PaymentEvent::PaymentRefunded { order_id, amount }
            }
            PaymentStatus::Requested { .. } | PaymentStatus::None => {
                PaymentEvent::PaymentVoided { order_id }
            }
            _ => return Ok(Vec::new()),
        };
        Ok(vec![StreamWrite::new(
            &read_streams,
            self.payment.clone(),
            event,
        )?])
    }
}

/// How the simulated gateway treats a card token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CardBehaviour {
    /// Charges it.
    Approve,
    /// Refuses it.
    Decline,
    /// Never answers (a lost callback, a gateway outage).
    NeverAnswer,
}

/// The gateway could not be reached: nothing was charged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the card gateway is unavailable")]
pub struct GatewayUnavailable;

/// A card gateway simulation: charges at most once per idempotency key, as real gateways
/// do, and counts what it did. Tokens ending in `-decline` are refused, tokens ending in
/// `-hang` are never answered, the rest are charged; while it is down
/// ([`FakeGateway::set_available`]) every call fails.
#[derive(Debug)]
pub struct FakeGateway {
    /// Charges by idempotency key: (reference, description, amount).
    charges: Mutex<HashMap<String, (String, String, Cents)>>,
    calls: Mutex<u64>,
    available: AtomicBool,
}

impl Default for FakeGateway {
    /// A gateway that is up and has charged nothing.
    fn default() -> Self {
        FakeGateway {
            charges: Mutex::default(),
            calls: Mutex::default(),
            available: AtomicBool::new(true),
        }
    }
}

impl FakeGateway {
    /// How a card token behaves.
    pub fn behaviour(card: &str) -> CardBehaviour {
        if card.ends_with("-decline") {
            CardBehaviour::Decline
        } else if card.ends_with("-hang") {
            CardBehaviour::NeverAnswer
        } else {
            CardBehaviour::Approve
        }
    }

    /// Brings the gateway down (`false`) or back up (`true`).
    pub fn set_available(&self, available: bool) {
        self.available.store(available, Ordering::SeqCst);
    }

    /// Charges `amount` to `card` once per `key`, with `description` on the statement;
    /// `None` when it never answers, [`GatewayUnavailable`] while it is down.
    pub fn charge(
        &self,
        key: &str,
        description: &str,
        card: &str,
        amount: Cents,
    ) -> Result<Option<GatewayAnswer>, GatewayUnavailable> {
        *self.calls.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        if !self.available.load(Ordering::SeqCst) {
            return Err(GatewayUnavailable);
        }
        Ok(match Self::behaviour(card) {
            CardBehaviour::Decline => Some(GatewayAnswer::Declined {
                reason: "the card was declined (issuer code 05: do not honour)".to_owned(),
            }),
            CardBehaviour::NeverAnswer => None,
            CardBehaviour::Approve => Some(self.capture(key, description, amount)),
        })
    }

    /// A charge the gateway makes after all, long after it was asked (a hung request
    /// that went through in the end): charged once per `key`, like any other.
    pub fn capture(&self, key: &str, description: &str, amount: Cents) -> GatewayAnswer {
        let mut charges = self.charges.lock().unwrap_or_else(|e| e.into_inner());
        let next = charges.len() + 1;
        let (reference, _, _) = charges
            .entry(key.to_owned())
            .or_insert_with(|| (format!("ch_{next:04}"), description.to_owned(), amount));
        GatewayAnswer::Approved {
            reference: reference.clone(),
        }
    }

    /// How many distinct charges carry `description`.
    pub fn charges_for(&self, description: &str) -> usize {
        self.charges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|(_, d, _)| d == description)
            .count()
    }

    /// Calls received, repeats included.
    pub fn calls(&self) -> u64 {
        *self.calls.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The gateway adapter's circuit: opens after 3 failed calls in a row, stays open 10 s,
/// and gives a call 5 s.
pub fn gateway_circuit() -> CircuitBreakerConfig {
    CircuitBreakerConfig::new(3, Duration::from_secs(10), Duration::from_secs(5))
        .expect("a valid circuit breaker setting")
}

/// The gateway adapter: for every `PaymentRequested`, charges the card through the
/// gateway (keyed by the event id, so a redelivered request is not charged again) and
/// records the answer. Calls go through a circuit breaker: while it is open the adapter
/// does not call the gateway, and a payment it could not ask for is left requested for
/// the saga's deadline to compensate (a call that failed or timed out may or may not
/// have charged; a charge that surfaces later is paid back by [`RecordGatewayAnswer`]).
#[derive(Debug)]
pub struct PaymentGatewayAdapter {
    gateway: std::sync::Arc<FakeGateway>,
    breaker: CircuitBreaker,
    filter: ProjectionFilter,
}

impl PaymentGatewayAdapter {
    /// An adapter over `gateway`, calling it through `breaker`.
    pub fn new(
        gateway: std::sync::Arc<FakeGateway>,
        breaker: CircuitBreaker,
    ) -> eventcore::Result<Self> {
        let filter = ProjectionFilter::all()
            .with_stream_prefix("payment-")
            .with_event_types(["PaymentRequested"])?;
        Ok(PaymentGatewayAdapter {
            gateway,
            breaker,
            filter,
        })
    }
}

impl ProcessManager for PaymentGatewayAdapter {
    type Event = PaymentEvent;

    fn name(&self) -> &str {
        "payment-gateway"
    }

    fn filter(&self) -> ProjectionFilter {
        self.filter.clone()
    }

    async fn handle(
        &mut self,
        event: &StoredEvent<PaymentEvent>,
        dispatcher: &mut Dispatcher<'_>,
    ) -> eventcore::Result<()> {
        let PaymentEvent::PaymentRequested {
            order_id,
            amount,
            card,
        } = &event.payload
        else {
            return Ok(());
        };
        // Withdrawn meanwhile (the saga's deadline passed while this service lagged):
        // the card is not charged. (A void that lands during the call is handled by
        // `RecordGatewayAnswer`, which pays such a charge back.)
        let mut status = PaymentStatus::default();
        let stream = std::slice::from_ref(&event.stream_id);
        for recorded in dispatcher
            .executor()
            .store()
            .read_streams(stream)
            .await?
            .events
        {
            status.apply(&recorded.decode::<PaymentEvent>()?.payload);
        }
        if !matches!(status, PaymentStatus::Requested { .. }) {
            tracing::info!(
                order_id,
                ?status,
                "payment no longer requested: the gateway is not called"
            );
            return Ok(());
        }
        let key = event.event_id.to_string();
        let gateway = &self.gateway;
        let answer = self
            .breaker
            .call(|| async { gateway.charge(&key, order_id, card, *amount) })
            .await;
        match answer {
            Ok(Some(answer)) => {
                dispatcher
                    .dispatch(&RecordGatewayAnswer {
                        payment: event.stream_id.clone(),
                        order_id: order_id.clone(),
                        answer,
                    })
                    .await?;
            }
            // Asked; the answer never comes, and the saga's deadline decides.
            Ok(None) => {}
            Err(CircuitBreakerError::Open { .. }) => tracing::warn!(
                order_id,
                "card gateway circuit open: payment not asked; the saga's deadline decides"
            ),
            Err(error) => tracing::warn!(
                order_id,
                %error,
                "card gateway call failed; the saga's deadline decides"
            ),
        }
        Ok(())
    }
}

/// The Payment service's handler of `order-events`: asks for the payment on
/// `PaymentProcessingRequested` and refunds (or voids) on `PaymentRefundRequested`, each
/// exactly once however often the request is delivered.
#[derive(Debug, Default)]
pub struct PaymentRequests;

impl EventHandler for PaymentRequests {
    async fn handle(
        &mut self,
        event: &DistributedEvent,
        dispatcher: &mut Dispatcher<'_>,
    ) -> eventcore::Result<()> {
        match OrderEvent::request_in(
            event,
            &["PaymentProcessingRequested", "PaymentRefundRequested"],
        )? {
            Some(OrderEvent::PaymentProcessingRequested {
                order_id,
                amount,
                card,
            }) => {
                dispatcher
                    .dispatch(&ProcessPayment::new(&order_id, amount, &card)?)
                    .await?;
            }
            Some(OrderEvent::PaymentRefundRequested { order_id }) => {
                dispatcher.dispatch(&RefundPayment::new(&order_id)?).await?;
            }
            _ => {}
        }
        Ok(())
    }
}
