//! The Inventory service: owns `product-<sku>`. Adds, reserves and releases stock.

use std::collections::{BTreeMap, HashMap};

use eventcore::{
    Command, CommandLogic, CommandResult, ReadStreams, StoredEvent, StreamId, StreamResolver,
    StreamWrite, require,
};

use super::contracts::{InventoryEvent, OrderLine, ShopEvent, order_stream, product_stream};
use super::order::OrderStatus;

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

/// Reserves every line of an order at once, or none: one atomic write across all the
/// product streams. The order stream is read too (it is not written: it belongs to the
/// Order service), so the reservation is only committed if the order was still pending
/// at that very version: an order cancelled meanwhile makes the write conflict and the
/// retry refuse it.
#[derive(Debug, Clone, Command)]
pub struct ReserveStock {
    /// `order-<id>`, read only.
    #[stream]
    pub order: StreamId,
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
            order: order_stream(order_id)?,
            products,
            order_id: order_id.to_owned(),
            lines: lines.to_vec(),
        })
    }
}

/// The order's status and every product's stock, each product keyed by its own stream:
/// an event is counted for the stream it is in, once.
#[derive(Debug, Default)]
pub struct ReservationState {
    order: OrderStatus,
    products: HashMap<StreamId, ProductStock>,
}

impl CommandLogic for ReserveStock {
    type State = ReservationState;
    type Event = ShopEvent;

    fn apply(&self, state: &mut ReservationState, event: &StoredEvent<ShopEvent>) {
        match &event.payload {
            ShopEvent::Order(order) if event.stream_id == self.order => state.order.apply(order),
            ShopEvent::Inventory(inventory) => state
                .products
                .entry(event.stream_id.clone())
                .or_default()
                .apply(inventory, &self.order_id),
            _ => {}
        }
    }

    fn handle(
        &self,
        read_streams: ReadStreams<Self::StreamSet>,
        state: ReservationState,
        _: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, ShopEvent>>> {
        require!(
            state.order == OrderStatus::Pending,
            "order {} is {:?}, not pending",
            self.order_id,
            state.order
        );
        let mut writes = Vec::new();
        for (sku, quantity) in wanted(&self.lines) {
            let stream = product_stream(&sku)?;
            let stock = state.products.get(&stream).copied().unwrap_or_default();
            // A release closes the order's reservation for good: a reservation that
            // arrives after it (from a saga instance that stalled) must not hold stock
            // for an order on its way to cancellation.
            require!(
                !stock.released_for_order,
                "the reservation of order {} was released",
                self.order_id
            );
            // Already reserved for this order (a repeated request): nothing more.
            let missing = quantity - stock.reserved_for_order;
            if missing <= 0 {
                continue;
            }
            require!(
                stock.available >= missing,
                "insufficient stock of {sku}: {} available, {missing} wanted",
                stock.available.max(0)
            );
            let quantity = u32::try_from(missing).map_err(|_| {
                eventcore::Error::BusinessRuleViolation(format!("{missing} units of {sku}"))
            })?;
            writes.push(StreamWrite::new(
                &read_streams,
                stream,
                ShopEvent::Inventory(InventoryEvent::StockReserved {
                    sku,
                    order_id: self.order_id.clone(),
                    quantity,
                }),
            )?);
        }
        Ok(writes)
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
