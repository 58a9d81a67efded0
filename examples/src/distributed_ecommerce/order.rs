//! The Order service: owns `order-<id>`. Creates, completes and cancels orders.

use eventcore::{
    Command, CommandLogic, CommandResult, ReadStreams, StoredEvent, StreamId, StreamResolver,
    StreamWrite, require,
};

use super::contracts::{Address, Cents, OrderEvent, OrderLine};

/// Where an order is, as folded from its stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OrderStatus {
    /// No such order.
    #[default]
    Missing,
    /// Created, not yet completed or cancelled.
    Pending,
    /// Completed.
    Completed,
    /// Cancelled.
    Cancelled,
}

impl OrderStatus {
    /// Folds one order event.
    pub fn apply(&mut self, event: &OrderEvent) {
        *self = match event {
            OrderEvent::OrderCreated { .. } => OrderStatus::Pending,
            OrderEvent::OrderCompleted { .. } => OrderStatus::Completed,
            OrderEvent::OrderCancelled { .. } => OrderStatus::Cancelled,
        };
    }
}

/// The longest order id or sku: every stream named after them (including the saga's)
/// stays a valid stream id.
pub const MAX_ID_LEN: usize = 64;

/// Checks an order id or sku: 1 to [`MAX_ID_LEN`] ASCII letters, digits, `-` or `_`.
pub fn check_id(what: &str, id: &str) -> eventcore::Result<()> {
    let valid = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    require!(
        valid,
        "{what} {id:?} must be 1 to {MAX_ID_LEN} letters, digits, `-` or `_`"
    );
    Ok(())
}

/// The sum of the lines, refusing overflow and empty or zero lines.
pub fn order_total(lines: &[OrderLine]) -> eventcore::Result<Cents> {
    require!(!lines.is_empty(), "an order needs at least one line");
    let mut total: Cents = 0;
    for line in lines {
        check_id("sku", &line.sku)?;
        require!(line.quantity > 0, "line `{}` has quantity 0", line.sku);
        let amount = line
            .unit_price
            .checked_mul(Cents::from(line.quantity))
            .and_then(|amount| total.checked_add(amount));
        let Some(amount) = amount else {
            return Err(eventcore::Error::BusinessRuleViolation(
                "the order total does not fit in 64 bits".to_owned(),
            ));
        };
        total = amount;
    }
    Ok(total)
}

/// Places an order.
#[derive(Debug, Clone, Command)]
pub struct CreateOrder {
    /// `order-<id>`.
    #[stream]
    pub order: StreamId,
    /// The order id.
    pub order_id: String,
    /// Who orders.
    pub customer: String,
    /// What.
    pub lines: Vec<OrderLine>,
    /// The card token to charge.
    pub card: String,
    /// Where to ship.
    pub address: Address,
}

impl CommandLogic for CreateOrder {
    type State = OrderStatus;
    type Event = OrderEvent;

    fn apply(&self, state: &mut OrderStatus, event: &StoredEvent<OrderEvent>) {
        state.apply(&event.payload);
    }

    fn handle(
        &self,
        read_streams: ReadStreams<Self::StreamSet>,
        state: OrderStatus,
        _: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, OrderEvent>>> {
        check_id("order id", &self.order_id)?;
        require!(
            state == OrderStatus::Missing,
            "order {} already exists",
            self.order_id
        );
        require!(
            !self.customer.trim().is_empty(),
            "an order needs a customer"
        );
        require!(!self.card.trim().is_empty(), "an order needs a card token");
        let total = order_total(&self.lines)?;
        Ok(vec![StreamWrite::new(
            &read_streams,
            self.order.clone(),
            OrderEvent::OrderCreated {
                order_id: self.order_id.clone(),
                customer: self.customer.clone(),
                lines: self.lines.clone(),
                total,
                card: self.card.clone(),
                address: self.address.clone(),
            },
        )?])
    }
}

/// Completes a pending order; completing it again changes nothing.
#[derive(Debug, Clone, Command)]
pub struct CompleteOrder {
    /// `order-<id>`.
    #[stream]
    pub order: StreamId,
    /// The order id.
    pub order_id: String,
}

impl CommandLogic for CompleteOrder {
    type State = OrderStatus;
    type Event = OrderEvent;

    fn apply(&self, state: &mut OrderStatus, event: &StoredEvent<OrderEvent>) {
        state.apply(&event.payload);
    }

    fn handle(
        &self,
        read_streams: ReadStreams<Self::StreamSet>,
        state: OrderStatus,
        _: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, OrderEvent>>> {
        match state {
            OrderStatus::Completed => Ok(Vec::new()),
            OrderStatus::Pending => Ok(vec![StreamWrite::new(
                &read_streams,
                self.order.clone(),
                OrderEvent::OrderCompleted {
                    order_id: self.order_id.clone(),
                },
            )?]),
            OrderStatus::Missing => Err(eventcore::Error::BusinessRuleViolation(format!(
                "order {} does not exist",
                self.order_id
            ))),
            OrderStatus::Cancelled => Err(eventcore::Error::BusinessRuleViolation(format!(
                "order {} was cancelled",
                self.order_id
            ))),
        }
    }
}

/// Cancels a pending order; cancelling it again changes nothing.
#[derive(Debug, Clone, Command)]
pub struct CancelOrder {
    /// `order-<id>`.
    #[stream]
    pub order: StreamId,
    /// The order id.
    pub order_id: String,
    /// Why.
    pub reason: String,
}

impl CommandLogic for CancelOrder {
    type State = OrderStatus;
    type Event = OrderEvent;

    fn apply(&self, state: &mut OrderStatus, event: &StoredEvent<OrderEvent>) {
        state.apply(&event.payload);
    }

    fn handle(
        &self,
        read_streams: ReadStreams<Self::StreamSet>,
        state: OrderStatus,
        _: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, OrderEvent>>> {
        match state {
            OrderStatus::Cancelled => Ok(Vec::new()),
            OrderStatus::Pending => Ok(vec![StreamWrite::new(
                &read_streams,
                self.order.clone(),
                OrderEvent::OrderCancelled {
                    order_id: self.order_id.clone(),
                    reason: self.reason.clone(),
                },
            )?]),
            OrderStatus::Missing => Err(eventcore::Error::BusinessRuleViolation(format!(
                "order {} does not exist",
                self.order_id
            ))),
            OrderStatus::Completed => Err(eventcore::Error::BusinessRuleViolation(format!(
                "order {} is completed; it can be refunded, not cancelled",
                self.order_id
            ))),
        }
    }
}
