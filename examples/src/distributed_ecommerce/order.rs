//! The Order service: owns `order-<id>` and `customer-<user id>`. Creates, completes and
//! cancels orders, writes the order saga's requests to the other services, and keeps a
//! profile of every user the User service registers (from its published
//! `UserRegistered`), so that an order is only taken from a known customer without
//! asking the User service.

use eventcore::distributed::{DistributedEvent, EventHandler};
use eventcore::{
    Command, CommandLogic, CommandResult, Dispatcher, ReadStreams, StoredEvent, StreamId,
    StreamResolver, StreamWrite, require,
};

use super::contracts::{
    Address, Cents, CustomerEvent, OrderEvent, OrderLine, UserEvent, customer_stream,
};

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
            // The saga's requests do not change the order's status.
            _ => *self,
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

/// Places an order for a known customer: one whose profile the Order service made from
/// the User service's `UserRegistered` (read in the same command, so the order is only
/// written if the profile exists at that very version).
#[derive(Debug, Clone, Command)]
pub struct CreateOrder {
    /// `order-<id>`.
    #[stream]
    pub order: StreamId,
    /// `customer-<user id>`, read only.
    #[stream]
    pub customer_profile: StreamId,
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

impl CreateOrder {
    /// Order `order_id` of `customer` (a user id).
    pub fn new(
        order_id: &str,
        customer: &str,
        lines: Vec<OrderLine>,
        card: &str,
        address: Address,
    ) -> eventcore::Result<Self> {
        check_id("order id", order_id)?;
        check_id("customer", customer)?;
        Ok(CreateOrder {
            order: super::contracts::order_stream(order_id)?,
            customer_profile: customer_stream(customer)?,
            order_id: order_id.to_owned(),
            customer: customer.to_owned(),
            lines,
            card: card.to_owned(),
            address,
        })
    }
}

/// An order's status, and whether its customer has a profile.
#[derive(Debug, Default)]
pub struct CreateOrderState {
    order: OrderStatus,
    known_customer: bool,
}

/// An order or a customer event.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, eventcore::Event)]
pub enum OrderServiceEvent {
    /// An order event.
    #[event(transparent)]
    Order(OrderEvent),
    /// A customer profile event.
    #[event(transparent)]
    Customer(CustomerEvent),
}

impl CommandLogic for CreateOrder {
    type State = CreateOrderState;
    type Event = OrderServiceEvent;

    fn apply(&self, state: &mut CreateOrderState, event: &StoredEvent<OrderServiceEvent>) {
        match &event.payload {
            OrderServiceEvent::Order(order) => state.order.apply(order),
            OrderServiceEvent::Customer(CustomerEvent::CustomerProfileCreated { .. }) => {
                state.known_customer = true;
            }
        }
    }

    fn handle(
        &self,
        read_streams: ReadStreams<Self::StreamSet>,
        state: CreateOrderState,
        _: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, OrderServiceEvent>>> {
        check_id("order id", &self.order_id)?;
        require!(
            state.order == OrderStatus::Missing,
            "order {} already exists",
            self.order_id
        );
        require!(
            state.known_customer,
            "customer {:?} is not known to the Order service (no UserRegistered seen)",
            self.customer
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
            OrderServiceEvent::Order(OrderEvent::OrderCreated {
                order_id: self.order_id.clone(),
                customer: self.customer.clone(),
                lines: self.lines.clone(),
                total,
                card: self.card.clone(),
                address: self.address.clone(),
            }),
        )?])
    }
}

/// Writes one of the order saga's requests to another service (a `…Requested` event) on
/// the order's stream, which the Order service publishes on `order-events`. The order
/// must exist; the saga's dispatcher keys make a repeated step write it once.
#[derive(Debug, Clone, Command)]
pub struct SendRequest {
    /// `order-<id>`.
    #[stream]
    pub order: StreamId,
    /// The request.
    pub request: OrderEvent,
}

impl SendRequest {
    /// `request`, on the stream of the order it names.
    pub fn new(request: OrderEvent) -> eventcore::Result<Self> {
        Ok(SendRequest {
            order: super::contracts::order_stream(request.order_id())?,
            request,
        })
    }
}

impl CommandLogic for SendRequest {
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
        require!(
            state != OrderStatus::Missing,
            "order {} does not exist",
            self.request.order_id()
        );
        require!(
            !matches!(
                self.request,
                OrderEvent::OrderCreated { .. }
                    | OrderEvent::OrderCompleted { .. }
                    | OrderEvent::OrderCancelled { .. }
            ),
            "{:?} is not a request",
            self.request
        );
        Ok(vec![StreamWrite::new(
            &read_streams,
            self.order.clone(),
            self.request.clone(),
        )?])
    }
}

/// Makes the Order service's profile of a registered user; making it again changes
/// nothing.
#[derive(Debug, Clone, Command)]
pub struct CreateCustomerProfile {
    /// `customer-<user id>`.
    #[stream]
    pub customer: StreamId,
    /// The user.
    pub user_id: String,
    /// Their name.
    pub name: String,
    /// Their e-mail address.
    pub email: String,
}

impl CommandLogic for CreateCustomerProfile {
    type State = bool;
    type Event = CustomerEvent;

    fn apply(&self, exists: &mut bool, _: &StoredEvent<CustomerEvent>) {
        *exists = true;
    }

    fn handle(
        &self,
        read_streams: ReadStreams<Self::StreamSet>,
        exists: bool,
        _: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, CustomerEvent>>> {
        if exists {
            return Ok(Vec::new());
        }
        Ok(vec![StreamWrite::new(
            &read_streams,
            self.customer.clone(),
            CustomerEvent::CustomerProfileCreated {
                user_id: self.user_id.clone(),
                name: self.name.clone(),
                email: self.email.clone(),
            },
        )?])
    }
}

/// The Order service's handler of `user-events` (choreography: the User service does
/// not know it exists): a profile for every `UserRegistered`, exactly once however
/// often the event is delivered.
#[derive(Debug, Default)]
pub struct CustomerProfiles;

impl EventHandler for CustomerProfiles {
    async fn handle(
        &mut self,
        event: &DistributedEvent,
        dispatcher: &mut Dispatcher<'_>,
    ) -> eventcore::Result<()> {
        if event.event_type.as_str() != "UserRegistered" {
            return Ok(());
        }
        let UserEvent::UserRegistered {
            user_id,
            name,
            email,
        } = event.decode::<UserEvent>()?.payload;
        dispatcher
            .dispatch(&CreateCustomerProfile {
                customer: customer_stream(&user_id)?,
                user_id,
                name,
                email,
            })
            .await?;
        Ok(())
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
