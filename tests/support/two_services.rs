//! Two services with separate stores, joined by published events: `orders` places and
//! confirms orders; `billing` subscribes and opens, then confirms, an invoice per order
//! on its own streams. The driver injects crashes at every step of publication and
//! subscription and checks, at the end, that billing's state is exactly what the orders
//! imply: one invoice per order, the right amount, confirmed after it was opened, every
//! effect once.

use std::collections::BTreeMap;
use std::sync::Arc;

use eventcore::distributed::{
    DistributedEvent, EventHandler, EventPublisher, EventSubscriber, Processed, PublicationPolicy,
    PublicationRule, PublisherRunner, ServiceId, SubscriptionName, SubscriptionRunner,
    SubscriptionSpec, Topic,
};
use eventcore::{
    CheckpointStore, Command, CommandExecutor, CommandLogic, CommandResult, Dispatcher, Event,
    EventStore, LogQuery, ReadStreams, StoredEvent, StreamId, StreamResolver, StreamWrite, require,
};
use eventcore_memory::InMemoryBroker;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// The orders service's events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
pub enum OrderEvent {
    /// An order was placed.
    OrderPlaced {
        /// The order.
        order: String,
        /// Its amount, in cents.
        amount: u64,
    },
    /// It was confirmed.
    OrderConfirmed {
        /// The order.
        order: String,
    },
}

/// The billing service's events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
pub enum BillingEvent {
    /// An invoice was opened for an order.
    InvoiceOpened {
        /// The order.
        order: String,
        /// The amount.
        amount: u64,
    },
    /// The invoice's order was confirmed.
    InvoiceConfirmed {
        /// The order.
        order: String,
    },
}

/// Orders: place one.
#[derive(Debug, Command)]
pub struct PlaceOrder {
    /// The order's stream.
    #[stream]
    pub order: StreamId,
    /// The order id.
    pub id: String,
    /// The amount.
    pub amount: u64,
}

impl CommandLogic for PlaceOrder {
    type State = bool;
    type Event = OrderEvent;

    fn apply(&self, placed: &mut bool, _: &StoredEvent<OrderEvent>) {
        *placed = true;
    }

    fn handle(
        &self,
        streams: ReadStreams<Self::StreamSet>,
        placed: bool,
        _: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, OrderEvent>>> {
        require!(!placed, "order {} exists", self.id);
        Ok(vec![
            StreamWrite::new(
                &streams,
                self.order.clone(),
                OrderEvent::OrderPlaced {
                    order: self.id.clone(),
                    amount: self.amount,
                },
            )?,
            StreamWrite::new(
                &streams,
                self.order.clone(),
                OrderEvent::OrderConfirmed {
                    order: self.id.clone(),
                },
            )?,
        ])
    }
}

/// Billing: open or confirm the invoice of an order (one stream per order).
#[derive(Debug, Command)]
struct Invoice {
    #[stream]
    invoice: StreamId,
    event: BillingEvent,
}

impl CommandLogic for Invoice {
    /// (opened, confirmed)
    type State = (bool, bool);
    type Event = BillingEvent;

    fn apply(&self, state: &mut (bool, bool), event: &StoredEvent<BillingEvent>) {
        match event.payload {
            BillingEvent::InvoiceOpened { .. } => state.0 = true,
            BillingEvent::InvoiceConfirmed { .. } => state.1 = true,
        }
    }

    fn handle(
        &self,
        streams: ReadStreams<Self::StreamSet>,
        (opened, confirmed): (bool, bool),
        _: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, BillingEvent>>> {
        match &self.event {
            BillingEvent::InvoiceOpened { .. } => require!(!opened, "invoice opened twice"),
            BillingEvent::InvoiceConfirmed { .. } => {
                // Out of order delivery would show here: a confirmation before the order.
                require!(opened, "confirmation before the invoice was opened");
                require!(!confirmed, "invoice confirmed twice");
            }
        }
        Ok(vec![StreamWrite::new(
            &streams,
            self.invoice.clone(),
            self.event.clone(),
        )?])
    }
}

/// Billing's handler: order events become invoice commands.
#[derive(Debug)]
pub struct Billing;

impl EventHandler for Billing {
    async fn handle(
        &mut self,
        event: &DistributedEvent,
        dispatcher: &mut Dispatcher<'_>,
    ) -> eventcore::Result<()> {
        let order = event.decode::<OrderEvent>()?.payload;
        let (id, billing) = match order {
            OrderEvent::OrderPlaced { order, amount } => {
                (order.clone(), BillingEvent::InvoiceOpened { order, amount })
            }
            OrderEvent::OrderConfirmed { order } => {
                (order.clone(), BillingEvent::InvoiceConfirmed { order })
            }
        };
        dispatcher
            .dispatch(&Invoice {
                invoice: StreamId::try_new(format!("invoice-{id}"))?,
                event: billing,
            })
            .await?;
        Ok(())
    }
}

/// The orders service's id.
pub fn orders_service() -> ServiceId {
    ServiceId::try_new("orders").expect("valid")
}

/// Billing's subscription to the order events.
pub fn spec() -> SubscriptionSpec {
    SubscriptionSpec::new(
        ServiceId::try_new("billing").expect("valid"),
        SubscriptionName::try_new("invoices").expect("valid"),
        [Topic::try_new("order-events").expect("valid")],
    )
}

/// The orders service's publisher on the in-memory broker.
pub fn publisher(
    orders: &Arc<dyn EventStore>,
    checkpoints: Arc<dyn CheckpointStore>,
    broker: &InMemoryBroker,
) -> PublisherRunner {
    publisher_on(
        orders,
        checkpoints,
        Arc::new(broker.publisher(orders_service())),
    )
}

/// The orders service's publisher through `transport`.
pub fn publisher_on(
    orders: &Arc<dyn EventStore>,
    checkpoints: Arc<dyn CheckpointStore>,
    transport: Arc<dyn EventPublisher>,
) -> PublisherRunner {
    let policy = PublicationPolicy::new([PublicationRule::new(
        Topic::try_new("order-events").expect("valid"),
    )
    .with_stream_prefix("order-")])
    .expect("valid policy");
    PublisherRunner::new(orders.clone(), checkpoints, transport, policy)
        .expect("valid runner")
        .with_batch_size(5)
}

/// Billing's subscription runner on the in-memory broker.
pub fn subscriber(
    billing: &Arc<dyn EventStore>,
    broker: &InMemoryBroker,
) -> SubscriptionRunner<Billing> {
    subscriber_on(billing, Arc::new(broker.clone()))
}

/// Billing's subscription runner through `transport`.
pub fn subscriber_on(
    billing: &Arc<dyn EventStore>,
    transport: Arc<dyn EventSubscriber>,
) -> SubscriptionRunner<Billing> {
    SubscriptionRunner::new(
        transport,
        spec(),
        Billing,
        CommandExecutor::new(billing.clone()),
    )
    .expect("valid runner")
}

/// How many crashes of each kind a run injected.
#[derive(Debug, Default, Clone)]
pub struct Crashes {
    /// The publish failed inside a batch (a lost connection).
    pub publish_failed: u32,
    /// The broker crashed and lost acknowledged events.
    pub broker_lost_tail: u32,
    /// The publisher restarted having lost its checkpoint (a crash before saving it).
    pub publisher_lost_checkpoint: u32,
    /// The publisher restarted with its checkpoint.
    pub publisher_restarted: u32,
    /// The subscriber crashed after receiving, before the effect.
    pub before_effect: u32,
    /// The subscriber crashed after the effect, before the acknowledgement.
    pub after_effect: u32,
    /// The subscriber process restarted (a new runner) between events.
    pub subscriber_restarted: u32,
}

impl Crashes {
    /// Every crash injected.
    pub fn total(&self) -> u32 {
        self.publish_failed
            + self.broker_lost_tail
            + self.publisher_lost_checkpoint
            + self.publisher_restarted
            + self.before_effect
            + self.after_effect
            + self.subscriber_restarted
    }
}

/// Runs `orders` commands on the orders store while the two services exchange events
/// through an in-memory broker, crashing something at random (seeded) at every step;
/// then lets everything finish and checks billing's state. Returns the crashes made.
///
/// # Panics
///
/// When an invariant is broken.
pub async fn run_with_crashes(
    orders_store: Arc<dyn EventStore>,
    orders_checkpoints: Arc<dyn CheckpointStore>,
    billing_store: Arc<dyn EventStore>,
    orders: usize,
    seed: u64,
) -> Crashes {
    let broker = InMemoryBroker::new();
    let executor = CommandExecutor::new(orders_store.clone());
    let mut rng = StdRng::seed_from_u64(seed);
    let mut crashes = Crashes::default();
    let mut expected = BTreeMap::new();
    let checkpoints = orders_checkpoints;
    let mut pub_runner = publisher(&orders_store, checkpoints.clone(), &broker);
    let mut sub_runner = subscriber(&billing_store, &broker);
    // Publish once so the topic exists before billing subscribes.
    pub_runner.publish_available().await.expect("publishes");
    let mut subscription = broker.subscribe(&spec()).await.expect("subscribes");

    let mut placed = 0;
    let mut steps = 0;
    loop {
        steps += 1;
        assert!(steps < orders * 200, "the run does not converge");
        if placed < orders && rng.random_bool(0.5) {
            let amount = rng.random_range(1..10_000);
            let id = format!("o{placed}");
            executor
                .execute(&PlaceOrder {
                    order: StreamId::try_new(format!("order-{id}")).expect("valid"),
                    id: id.clone(),
                    amount,
                })
                .await
                .expect("places");
            expected.insert(id, amount);
            placed += 1;
        }
        // Publication, with a fault one time in three.
        match rng.random_range(0..12) {
            0 => {
                broker.fail_after(rng.random_range(0..4));
                crashes.publish_failed += 1;
            }
            1 => {
                broker.set_unsynced(&orders_service(), rng.random_range(1..4));
            }
            2 => {
                broker.crash();
                broker.set_unsynced(&orders_service(), 0);
                crashes.broker_lost_tail += 1;
                // The broker's restart also cut the consumer's connection.
                subscription = broker.subscribe(&spec()).await.expect("subscribes");
            }
            3 => {
                // A crash before the checkpoint was saved, as far back as it can be.
                checkpoints
                    .reset_checkpoint(pub_runner.name())
                    .await
                    .expect("resets");
                pub_runner = publisher(&orders_store, checkpoints.clone(), &broker);
                crashes.publisher_lost_checkpoint += 1;
            }
            4 => {
                pub_runner = publisher(&orders_store, checkpoints.clone(), &broker);
                crashes.publisher_restarted += 1;
            }
            _ => {}
        }
        match pub_runner.publish_available().await {
            Ok(_) => {}
            Err(error) => assert!(error.is_retryable(), "{error}"),
        }
        // Subscription: take what is there, crashing at random.
        for _ in 0..rng.random_range(0..6) {
            let Some(delivery) = futures::FutureExt::now_or_never(subscription.next()) else {
                break;
            };
            let delivery = delivery.expect("delivers");
            match rng.random_range(0..10) {
                0 => {
                    drop(subscription);
                    subscription = broker.subscribe(&spec()).await.expect("subscribes");
                    crashes.before_effect += 1;
                }
                1 => {
                    let processed = sub_runner.process(&delivery).await.expect("processes");
                    assert_eq!(processed, Processed::Handled);
                    drop(subscription);
                    subscription = broker.subscribe(&spec()).await.expect("subscribes");
                    crashes.after_effect += 1;
                }
                2 => {
                    sub_runner = subscriber(&billing_store, &broker);
                    crashes.subscriber_restarted += 1;
                    let processed = sub_runner.process(&delivery).await.expect("processes");
                    assert_eq!(processed, Processed::Handled);
                    subscription.ack(&delivery).await.expect("acknowledges");
                }
                _ => {
                    let processed = sub_runner.process(&delivery).await.expect("processes");
                    assert_eq!(processed, Processed::Handled, "nothing is parked");
                    // An acknowledgement refused after a broker crash took the delivery
                    // back: it comes again.
                    let _ = subscription.ack(&delivery).await;
                }
            }
        }
        if placed == orders && drained(&broker, &orders_store, &billing_store).await {
            break;
        }
    }
    check_billing(&billing_store, &expected).await;
    assert!(
        sub_runner.parked().await.expect("reads").is_empty(),
        "nothing parked"
    );
    crashes
}

/// Whether every order event reached billing (as far as the broker holds them all).
async fn drained(
    broker: &InMemoryBroker,
    orders: &Arc<dyn EventStore>,
    billing: &Arc<dyn EventStore>,
) -> bool {
    let public = orders
        .read_all(&LogQuery::new().with_stream_prefix("order-"))
        .await
        .expect("reads")
        .len();
    let effects = billing
        .read_all(&LogQuery::new().with_stream_prefix("invoice-"))
        .await
        .expect("reads")
        .len();
    broker.published(&orders_service()).len() == public && effects == public
}

/// Billing holds, per order, exactly an opening with the order's amount, then a
/// confirmation.
pub async fn check_billing(billing: &Arc<dyn EventStore>, expected: &BTreeMap<String, u64>) {
    let events = billing
        .read_all(&LogQuery::new().with_stream_prefix("invoice-"))
        .await
        .expect("reads");
    let mut per_order: BTreeMap<String, Vec<BillingEvent>> = BTreeMap::new();
    for event in &events {
        let payload = event.decode::<BillingEvent>().expect("decodes").payload;
        let order = match &payload {
            BillingEvent::InvoiceOpened { order, .. }
            | BillingEvent::InvoiceConfirmed { order } => order.clone(),
        };
        per_order.entry(order).or_default().push(payload);
    }
    assert_eq!(per_order.len(), expected.len(), "an invoice per order");
    for (order, amount) in expected {
        assert_eq!(
            per_order.get(order).map(Vec::as_slice),
            Some(
                &[
                    BillingEvent::InvoiceOpened {
                        order: order.clone(),
                        amount: *amount,
                    },
                    BillingEvent::InvoiceConfirmed {
                        order: order.clone(),
                    },
                ][..]
            ),
            "order {order}: opened once with its amount, then confirmed once"
        );
    }
}

/// Waits (on the billing store's own notification) until it holds at least `effects`
/// invoice events.
///
/// # Panics
///
/// When the store fails.
pub async fn wait_for_invoices(billing: &Arc<dyn EventStore>, effects: usize) {
    loop {
        // The head before the count: an effect appended after the count was read is
        // after the head, so the wait returns for it.
        let head = billing.head_position().await.expect("reads");
        let count = billing
            .read_all(&LogQuery::new().with_stream_prefix("invoice-"))
            .await
            .expect("reads")
            .len();
        if count >= effects {
            return;
        }
        billing.wait_for_events(head).await.expect("waits");
    }
}
