//! The Inventory service: owns `product-<sku>` and `reservation-<order id>`. Adds,
//! reserves and releases stock; takes the order saga's requests from `order-events` and
//! answers on `inventory-events`.

use std::collections::{BTreeMap, HashMap};

use eventcore::distributed::{DistributedEvent, EventHandler};
use eventcore::{
    Command, CommandLogic, CommandResult, Dispatcher, ReadStreams, StoredEvent, StreamId,
    StreamResolver, StreamWrite, require,
};

use super::contracts::{InventoryEvent, OrderEvent, OrderLine, product_stream, reservation_stream};

/// One product's stock as folded from its stream, seen from one order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProductStock {
    /// Units not reserved by anyone.
    pub available: i64,
    /// Units reserved for the order in question.
    pub reserved_for_order: i64,
    /// Whether the order's reservation was released (closed) in this stream.
    pub released_for_order: bool,
}

impl ProductStock {
    /// Folds one inventory event of this product's stream.
    pub fn apply(&mut self, event: &InventoryEvent, order: &str) {
        match event {
            InventoryEvent::StockAdded { quantity, .. } => self.available += i64::from(*quantity),
            InventoryEvent::StockReserved {
                order_id, quantity, ..
            } => {
                self.available -= i64::from(*quantity);
                if order_id == order {
                    self.reserved_for_order += i64::from(*quantity);
                }
            }
            InventoryEvent::StockReleased {
                order_id, quantity, ..
            } => {
                self.available += i64::from(*quantity);
                if order_id == order {
                    self.reserved_for_order -= i64::from(*quantity);
                    self.released_for_order = true;
                }
            }
            InventoryEvent::StockReservationConfirmed { .. }
            | InventoryEvent::StockReservationRefused { .. } => {}
        }
    }
}

/// Units arrive in the warehouse.
#[derive(Debug, Clone, Command)]
pub struct AddStock {
    /// `product-<sku>`.
    #[stream]
    pub product: StreamId,
    /// The product.
    pub sku: String,
    /// How many.
    pub quantity: u32,
}

impl AddStock {
    /// `quantity` units of `sku`.
    pub fn new(sku: &str, quantity: u32) -> eventcore::Result<Self> {
        Ok(AddStock {
            product: product_stream(sku)?,
            sku: sku.to_owned(),
            quantity,
        })
    }
}

impl CommandLogic for AddStock {
    type State = ();
    type Event = InventoryEvent;

    fn apply(&self, _: &mut (), _: &StoredEvent<InventoryEvent>) {}

    fn handle(
        &self,
        read_streams: ReadStreams<Self::StreamSet>,
        _: (),
        _: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, InventoryEvent>>> {
        require!(self.quantity > 0, "adding 0 units of {}", self.sku);
        Ok(vec![StreamWrite::new(
            &read_streams,
            self.product.clone(),
            InventoryEvent::StockAdded {
                sku: self.sku.clone(),
                quantity: self.quantity,
            },
        )?])
    }
}

/// The units wanted per product, lines of the same product added up.
fn wanted(lines: &[OrderLine]) -> BTreeMap<String, i64> {
    let mut wanted = BTreeMap::new();
    for line in lines {
        *wanted.entry(line.sku.clone()).or_insert(0) += i64::from(line.quantity);
    }
    wanted
}

/// Reserves every line of an order at once, or none, and answers: one atomic write
/// across all the product streams and the order's `reservation-<order id>` stream, with
/// `StockReservationConfirmed`, or only `StockReservationRefused` there when a line is
/// short (or the reservation was released already). The answer is an event, not an
/// error, so that the Order service learns it; a reservation answered before changes
/// nothing.
#[derive(Debug, Clone, Command)]
pub struct ReserveStock {
    /// `reservation-<order id>`: the answer.
    #[stream]
    pub reservation: StreamId,
    /// `product-<sku>` for every product of the order.
    #[stream]
    pub products: Vec<StreamId>,
    /// The order id.
    pub order_id: String,
    /// The order's lines.
    pub lines: Vec<OrderLine>,
}

impl ReserveStock {
    /// The reservation of `lines` for `order_id`.
    pub fn new(order_id: &str, lines: &[OrderLine]) -> eventcore::Result<Self> {
        let products = wanted(lines)
            .keys()
            .map(|sku| product_stream(sku))
            .collect::<eventcore::Result<_>>()?;
        Ok(ReserveStock {
            reservation: reservation_stream(order_id)?,
            products,
            order_id: order_id.to_owned(),
            lines: lines.to_vec(),
        })
    }
}

/// Whether the order's reservation was answered, and every product's stock, each
/// product keyed by its own stream: an event is counted for the stream it is in, once.
#[derive(Debug, Default)]
pub struct ReservationState {
    answered: bool,
    products: HashMap<StreamId, ProductStock>,
}

impl CommandLogic for ReserveStock {
    type State = ReservationState;
    type Event = InventoryEvent;

    fn apply(&self, state: &mut ReservationState, event: &StoredEvent<InventoryEvent>) {
        match &event.payload {
            InventoryEvent::StockReservationConfirmed { .. }
            | InventoryEvent::StockReservationRefused { .. } => state.answered = true,
            inventory => state
                .products
                .entry(event.stream_id.clone())
                .or_default()
                .apply(inventory, &self.order_id),
        }
    }

    fn handle(
        &self,
        read_streams: ReadStreams<Self::StreamSet>,
        state: ReservationState,
        _: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, InventoryEvent>>> {
        if state.answered {
            return Ok(Vec::new());
        }
        let refuse = |reason: String| {
            Ok(vec![StreamWrite::new(
                &read_streams,
                self.reservation.clone(),
                InventoryEvent::StockReservationRefused {
                    order_id: self.order_id.clone(),
                    reason,
                },
            )?])
        };
        let mut writes = Vec::new();
        for (sku, quantity) in wanted(&self.lines) {
            let stream = product_stream(&sku)?;
            let stock = state.products.get(&stream).copied().unwrap_or_default();
            // A release closes the order's reservation for good: a reservation that
            // arrives after it (from a saga instance that stalled) must not hold stock
            // for an order on its way to cancellation.
            if stock.released_for_order {
                return refuse(format!(
                    "the reservation of order {} was released",
                    self.order_id
                ));
            }
            let missing = quantity - stock.reserved_for_order;
            if missing <= 0 {
                continue;
            }
            if stock.available < missing {
                return refuse(format!(
                    "insufficient stock of {sku}: {} available, {missing} wanted",
                    stock.available.max(0)
                ));
            }
            let quantity = u32::try_from(missing).map_err(|_| {
                eventcore::Error::BusinessRuleViolation(format!("{missing} units of {sku}"))
            })?;
            writes.push(StreamWrite::new(
                &read_streams,
                stream,
                InventoryEvent::StockReserved {
                    sku,
                    order_id: self.order_id.clone(),
                    quantity,
                },
            )?);
        }
        writes.push(StreamWrite::new(
            &read_streams,
            self.reservation.clone(),
            InventoryEvent::StockReservationConfirmed {
                order_id: self.order_id.clone(),
            },
        )?);
        Ok(writes)
    }
}

/// The Inventory service's handler of `order-events`: reserves on
/// `StockReservationRequested` and releases on `StockReleaseRequested`, each exactly
/// once however often the request is delivered; the order's other events are ignored.
#[derive(Debug, Default)]
pub struct InventoryRequests;

impl EventHandler for InventoryRequests {
    async fn handle(
        &mut self,
        event: &DistributedEvent,
        dispatcher: &mut Dispatcher<'_>,
    ) -> eventcore::Result<()> {
        match OrderEvent::request_in(
            event,
            &["StockReservationRequested", "StockReleaseRequested"],
        )? {
            Some(OrderEvent::StockReservationRequested { order_id, lines }) => {
                dispatcher
                    .dispatch(&ReserveStock::new(&order_id, &lines)?)
                    .await?;
            }
            Some(OrderEvent::StockReleaseRequested { order_id, lines }) => {
                dispatcher
                    .dispatch(&ReleaseStock::new(&order_id, &lines)?)
                    .await?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// Gives back whatever is reserved for an order, product by product, and closes the
/// order's reservation: a release is recorded even where nothing was held, so that a
/// reservation arriving after it is refused. Releasing again changes nothing.
#[derive(Debug, Clone, Command)]
pub struct ReleaseStock {
    /// `product-<sku>` for every product of the order.
    #[stream]
    pub products: Vec<StreamId>,
    /// The skus, in the order of `products`.
    pub skus: Vec<String>,
    /// The order id.
    pub order_id: String,
}

impl ReleaseStock {
    /// The release of what `order_id` holds of the products in `lines`.
    pub fn new(order_id: &str, lines: &[OrderLine]) -> eventcore::Result<Self> {
        let skus: Vec<String> = wanted(lines).into_keys().collect();
        let products = skus
            .iter()
            .map(|sku| product_stream(sku))
            .collect::<eventcore::Result<_>>()?;
        Ok(ReleaseStock {
            products,
            skus,
            order_id: order_id.to_owned(),
        })
    }
}

impl CommandLogic for ReleaseStock {
    type State = HashMap<StreamId, ProductStock>;
    type Event = InventoryEvent;

    fn apply(&self, state: &mut Self::State, event: &StoredEvent<InventoryEvent>) {
        state
            .entry(event.stream_id.clone())
            .or_default()
            .apply(&event.payload, &self.order_id);
    }

    fn handle(
        &self,
        read_streams: ReadStreams<Self::StreamSet>,
        state: Self::State,
        _: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, InventoryEvent>>> {
        require!(
            self.products.len() == self.skus.len(),
            "{} product streams for {} skus",
            self.products.len(),
            self.skus.len()
        );
        let mut writes = Vec::new();
        for (stream, sku) in self.products.iter().zip(&self.skus) {
            let stock = state.get(stream).copied().unwrap_or_default();
            let quantity = u32::try_from(stock.reserved_for_order.max(0)).unwrap_or(u32::MAX);
            if stock.released_for_order && quantity == 0 {
                continue;
            }
            writes.push(StreamWrite::new(
                &read_streams,
                stream.clone(),
                InventoryEvent::StockReleased {
                    sku: sku.clone(),
                    order_id: self.order_id.clone(),
                    quantity,
                },
            )?);
        }
        Ok(writes)
    }
}
