//! [`InMemoryBroker`]: the embedded transport between services, as strict as a real
//! broker and deterministic in tests.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use eventcore::distributed::{
    Backlog, Delivery, DistributedEvent, EventPublisher, EventSubscriber, Partition, Publication,
    ServiceId, Subscription, SubscriptionName, SubscriptionSpec, Topic, TransportError, slot_of,
};
use eventcore::{Clock, EventId, GlobalPosition, SystemClock};
use parking_lot::Mutex;
use tokio::sync::watch;

/// An in-process broker for services in one process (examples, users' tests): the
/// default transport of `eventcore::distributed`, exactly as strict as the production
/// one where the contract is concerned.
///
/// - Each publishing service has **one ordered publication log**; a topic belongs to the
///   service that declared it first, and another service publishing it is refused.
/// - Publishes are checked like chained publishes at a real broker: an event at or below
///   the last held position is a duplicate when its id is held within the dedup window
///   (acknowledged, not stored twice) and refused as out of order otherwise, so the log
///   never holds a gap or a reordering.
/// - Durable subscriptions deliver each service's events in log order, **one in flight
///   at a time**, at least once: the unacknowledged event comes again to the next
///   [`Subscription::next`] call, or to another handle when its handle is dropped (a
///   crash).
/// - A split subscription ([`SubscriptionSpec::split`]) is one such subscription per
///   partition, each delivering the events of its partition's source streams only.
/// - Faults can be injected ([`InMemoryBroker::fail_after`],
///   [`InMemoryBroker::crash`]), so tests force each interleaving without timing.
///
/// Cheap to clone; clones share the broker. `publisher(service)` gives one service's
/// [`EventPublisher`]; the broker itself is the [`EventSubscriber`].
#[derive(Clone)]
pub struct InMemoryBroker {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    changed: watch::Sender<u64>,
    clock: Arc<dyn Clock>,
    dedup_window: Duration,
}

#[derive(Default)]
struct State {
    logs: HashMap<ServiceId, Log>,
    owners: BTreeMap<Topic, ServiceId>,
    /// Per subscription partition (a subscription not split is [`Partition::WHOLE`]).
    consumers: HashMap<ConsumerKey, Consumer>,
    next_handle: u64,
    /// Fault injection: messages still to store before the next one fails.
    fail_after: Option<u32>,
    /// Broker-wide arrival counter, to interleave services fairly.
    arrivals: u64,
    /// Broker-wide delivery counter: every delivery's id (never reused, so an id from
    /// before a subscription was dropped and made again matches nothing after).
    deliveries: u64,
}

#[derive(Default)]
struct Log {
    messages: Vec<Message>,
    /// Sequence numbers handed out (never reused, even after a crash lost messages).
    next_sequence: u64,
    /// How many of the last messages a crash loses (acknowledged, not yet "synced").
    unsynced: usize,
}

/// A durable subscription's partition: whose, which, which part.
type ConsumerKey = (ServiceId, SubscriptionName, Partition);

struct Message {
    sequence: u64,
    arrival: u64,
    topic: Topic,
    /// The source stream's [`slot_of`].
    slot: u32,
    event: DistributedEvent,
    stored_at: DateTime<Utc>,
}

struct Consumer {
    topics: Vec<Topic>,
    /// Per publishing service: the sequence of the last acknowledged message.
    acked: HashMap<ServiceId, u64>,
    in_flight: Option<InFlight>,
    /// Deliveries so far of the message in flight (kept across redeliveries).
    attempts: HashMap<(ServiceId, u64), u32>,
    /// Per publishing service: the id of the last delivery of its events (to any
    /// handle), from the broker-wide `State::deliveries`.
    last_delivery: HashMap<ServiceId, u64>,
}

#[derive(Clone)]
struct InFlight {
    handle: Option<u64>,
    service: ServiceId,
    sequence: u64,
}

impl InMemoryBroker {
    /// A broker on the system clock with a dedup window of 2 minutes (NATS' default).
    pub fn new() -> Self {
        Self::with_clock(Arc::new(SystemClock), Duration::from_secs(120))
    }

    /// A broker whose dedup window is measured on `clock` (a [`eventcore::ManualClock`]
    /// makes it deterministic).
    pub fn with_clock(clock: Arc<dyn Clock>, dedup_window: Duration) -> Self {
        let (changed, _) = watch::channel(0);
        InMemoryBroker {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                changed,
                clock,
                dedup_window,
            }),
        }
    }

    /// The publisher of `service`'s publication. Like a client chaining its publishes
    /// (NATS' `Nats-Expected-Last-Sequence`), it expects the publication to end where
    /// it last saw it end (its last acknowledged publish, or its last
    /// [`EventPublisher::last_published`]); when the broker lost messages meanwhile, its
    /// next publish is refused with [`TransportError::OutOfOrder`] instead of leaving a
    /// gap.
    pub fn publisher(&self, service: ServiceId) -> InMemoryPublisher {
        InMemoryPublisher {
            broker: self.clone(),
            service,
            expected: Arc::new(Mutex::new(None)),
        }
    }

    /// Makes `topic` part of `service`'s publication (what a publisher does when it
    /// starts), so subscriptions to it can be opened before its first event.
    ///
    /// # Errors
    ///
    /// [`TransportError::TopicOwnedByAnother`] when another service publishes it.
    pub fn declare_topic(&self, service: &ServiceId, topic: &Topic) -> Result<(), TransportError> {
        let mut state = self.shared.state.lock();
        claim(&mut state, service, topic)?;
        state.logs.entry(service.clone()).or_default();
        Ok(())
    }

    /// Lets the next `stored` published messages through, then fails the one after, as
    /// a lost connection does in the middle of a pipelined batch: that publish keeps
    /// what came before it in its batch and returns [`TransportError::Unavailable`].
    /// One failure per call.
    pub fn fail_after(&self, stored: u32) {
        self.shared.state.lock().fail_after = Some(stored);
    }

    /// From now on, a crash loses the last `messages` messages of `service`'s
    /// publication, acknowledged or not (a broker that acknowledges before it syncs to
    /// disk, as NATS does by default).
    pub fn set_unsynced(&self, service: &ServiceId, messages: usize) {
        self.shared
            .state
            .lock()
            .logs
            .entry(service.clone())
            .or_default()
            .unsynced = messages;
    }

    /// A broker crash and restart: every publication loses its unsynced tail
    /// ([`InMemoryBroker::set_unsynced`]), and every event in flight to a subscription
    /// will be delivered again. Subscriptions' positions past what was lost move back.
    pub fn crash(&self) {
        let mut state = self.shared.state.lock();
        let State {
            logs, consumers, ..
        } = &mut *state;
        for (service, log) in logs.iter_mut() {
            let keep = log.messages.len().saturating_sub(log.unsynced);
            log.messages.truncate(keep);
            let last = log.messages.last().map_or(0, |m| m.sequence);
            for consumer in consumers.values_mut() {
                if let Some(acked) = consumer.acked.get_mut(service) {
                    *acked = (*acked).min(last);
                }
            }
        }
        for consumer in consumers.values_mut() {
            let lost = consumer.in_flight.as_ref().is_some_and(|flight| {
                logs.get(&flight.service)
                    .is_none_or(|log| !log.messages.iter().any(|m| m.sequence == flight.sequence))
            });
            if lost {
                consumer.in_flight = None;
            } else if let Some(flight) = &mut consumer.in_flight {
                flight.handle = None;
            }
        }
        drop(state);
        self.bump();
    }

    /// Every event `service`'s publication holds, in order (for tests).
    pub fn published(&self, service: &ServiceId) -> Vec<DistributedEvent> {
        self.shared
            .state
            .lock()
            .logs
            .get(service)
            .map(|log| log.messages.iter().map(|m| m.event.clone()).collect())
            .unwrap_or_default()
    }

    fn bump(&self) {
        self.shared.changed.send_modify(|v| *v += 1);
    }
}

impl Default for InMemoryBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for InMemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.shared.state.lock();
        f.debug_struct("InMemoryBroker")
            .field("publications", &state.logs.len())
            .field("topics", &state.owners.len())
            .field("subscriptions", &state.consumers.len())
            .field("dedup_window", &self.shared.dedup_window)
            .finish()
    }
}

fn claim(state: &mut State, service: &ServiceId, topic: &Topic) -> Result<(), TransportError> {
    match state.owners.get(topic) {
        Some(owner) if owner != service => Err(TransportError::TopicOwnedByAnother {
            topic: topic.clone(),
            owner: owner.clone(),
            service: service.clone(),
        }),
        Some(_) => Ok(()),
        None => {
            state.owners.insert(topic.clone(), service.clone());
            Ok(())
        }
    }
}

/// One service's [`EventPublisher`] on an [`InMemoryBroker`].
#[derive(Clone)]
pub struct InMemoryPublisher {
    broker: InMemoryBroker,
    service: ServiceId,
    /// The sequence the publication ends at, as this publisher last saw it (`None`:
    /// not known yet; `Some(0)`: empty).
    expected: Arc<Mutex<Option<u64>>>,
}

impl std::fmt::Debug for InMemoryPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryPublisher")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl EventPublisher for InMemoryPublisher {
    fn service(&self) -> &ServiceId {
        &self.service
    }

    async fn declare_topics(&self, topics: &[Topic]) -> Result<(), TransportError> {
        for topic in topics {
            self.broker.declare_topic(&self.service, topic)?;
        }
        Ok(())
    }

    async fn publish(&self, batch: &[Publication]) -> Result<(), TransportError> {
        let shared = &self.broker.shared;
        let now = shared.clock.now();
        let mut state = shared.state.lock();
        let mut expected = self.expected.lock();
        let end = state
            .logs
            .get(&self.service)
            .and_then(|log| log.messages.last())
            .map_or(0, |m| m.sequence);
        match *expected {
            Some(sequence) if sequence != end => {
                return Err(TransportError::OutOfOrder {
                    message: format!(
                        "the publication ends at sequence {end}, not at {sequence} as this \
                         publisher last saw it: ask where it ends and publish from there"
                    ),
                });
            }
            Some(_) => {}
            None => *expected = Some(end),
        }
        let mut stored = 0;
        let mut result = Ok(());
        for publication in batch {
            if publication.event.service_id != self.service {
                result = Err(TransportError::rejected(
                    format!(
                        "event {} was published by `{}`, not by `{}`",
                        publication.event.event_id, publication.event.service_id, self.service
                    ),
                    None,
                ));
                break;
            }
            if let Err(error) = claim(&mut state, &self.service, &publication.topic) {
                result = Err(error);
                break;
            }
            match state.fail_after {
                Some(0) => {
                    state.fail_after = None;
                    result = Err(TransportError::unavailable(
                        format!(
                            "injected failure publishing event {}",
                            publication.event.event_id
                        ),
                        None,
                    ));
                    break;
                }
                Some(left) => state.fail_after = Some(left - 1),
                None => {}
            }
            state.arrivals += 1;
            let arrival = state.arrivals;
            let log = state.logs.entry(self.service.clone()).or_default();
            let position = publication.event.global_position;
            let last = log.messages.last().map(|m| m.event.global_position);
            if last.is_some_and(|last| position <= last) {
                if is_held_within(log, publication.event.event_id, now, shared.dedup_window) {
                    continue;
                }
                result = Err(TransportError::OutOfOrder {
                    message: format!(
                        "event {} at position {position} comes after position {} already held",
                        publication.event.event_id,
                        last.map_or(0, GlobalPosition::value)
                    ),
                });
                break;
            }
            log.next_sequence += 1;
            let sequence = log.next_sequence;
            log.messages.push(Message {
                sequence,
                arrival,
                topic: publication.topic.clone(),
                slot: slot_of(&publication.event.stream_id),
                event: publication.event.clone(),
                stored_at: now,
            });
            *expected = Some(sequence);
            stored += 1;
        }
        drop(expected);
        drop(state);
        if stored > 0 {
            self.broker.bump();
        }
        result
    }

    async fn last_published(&self) -> Result<Option<GlobalPosition>, TransportError> {
        let state = self.broker.shared.state.lock();
        let last = state
            .logs
            .get(&self.service)
            .and_then(|log| log.messages.last());
        *self.expected.lock() = Some(last.map_or(0, |m| m.sequence));
        Ok(last.map(|m| m.event.global_position))
    }
}

fn is_held_within(log: &Log, id: EventId, now: DateTime<Utc>, window: Duration) -> bool {
    let window = chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX);
    log.messages
        .iter()
        .rev()
        .take_while(|m| now.signed_duration_since(m.stored_at) <= window)
        .any(|m| m.event.event_id == id)
}

#[async_trait]
impl EventSubscriber for InMemoryBroker {
    async fn subscribe(
        &self,
        spec: &SubscriptionSpec,
    ) -> Result<Box<dyn Subscription>, TransportError> {
        let mut state = self.shared.state.lock();
        if spec.topics.is_empty() {
            return Err(TransportError::rejected(
                format!("subscription `{}` names no topic", spec.name),
                None,
            ));
        }
        undeclared(&state, spec)?;
        // Split one way for the subscription's whole life, every partition with the
        // same topics.
        for ((service, name, other), consumer) in &state.consumers {
            if service != &spec.service || name != &spec.name {
                continue;
            }
            if other.count() != spec.partition.count() {
                return Err(TransportError::rejected(
                    format!(
                        "subscription `{}` of `{}` exists split into {} partitions, not {}",
                        spec.name,
                        spec.service,
                        other.count(),
                        spec.partition.count()
                    ),
                    None,
                ));
            }
            if consumer.topics != spec.topics {
                return Err(TransportError::rejected(
                    format!(
                        "subscription `{}` of `{}` exists with other topics (partition {})",
                        spec.name, spec.service, other
                    ),
                    None,
                ));
            }
        }
        let key = (spec.service.clone(), spec.name.clone(), spec.partition);
        // (A consumer under this very key has the same topics: checked above.)
        state
            .consumers
            .entry(key.clone())
            .or_insert_with(|| Consumer {
                topics: spec.topics.clone(),
                acked: HashMap::new(),
                in_flight: None,
                attempts: HashMap::new(),
                last_delivery: HashMap::new(),
            });
        state.next_handle += 1;
        let handle = state.next_handle;
        drop(state);
        Ok(Box::new(InMemorySubscription {
            broker: self.clone(),
            key,
            handle,
            changed: self.shared.changed.subscribe(),
            in_hand: None,
            acked: HashMap::new(),
        }))
    }

    async fn backlog(&self, spec: &SubscriptionSpec) -> Result<Option<Backlog>, TransportError> {
        let state = self.shared.state.lock();
        undeclared(&state, spec)?;
        let key = (spec.service.clone(), spec.name.clone(), spec.partition);
        let Some(consumer) = state.consumers.get(&key) else {
            return Ok(None);
        };
        let mut services: Vec<&ServiceId> = consumer
            .topics
            .iter()
            .filter_map(|topic| state.owners.get(topic))
            .collect();
        services.sort();
        services.dedup();
        let mut backlog = Backlog::default();
        for service in services {
            let Some(log) = state.logs.get(service) else {
                continue;
            };
            let acked = consumer.acked.get(service).copied().unwrap_or(0);
            let after = log.messages.partition_point(|m| m.sequence <= acked);
            let mut held = log.messages[after..].iter().filter(|m| {
                spec.partition.holds_slot(m.slot) && consumer.topics.contains(&m.topic)
            });
            let oldest = held.next().map(|m| m.event.occurred_at);
            let events = u64::from(oldest.is_some()) + held.count() as u64;
            backlog = backlog.merge(Backlog::new(events, oldest));
        }
        Ok(Some(backlog))
    }
}

/// Refuses `spec` while one of its topics is not declared by its publisher yet.
fn undeclared(state: &State, spec: &SubscriptionSpec) -> Result<(), TransportError> {
    match spec.topics.iter().find(|t| !state.owners.contains_key(*t)) {
        Some(unknown) => Err(TransportError::unavailable(
            format!(
                "no service publishes topic `{unknown}` yet (it exists once its publisher \
                 declared it)"
            ),
            None,
        )),
        None => Ok(()),
    }
}

/// A handle on a durable subscription of an [`InMemoryBroker`].
struct InMemorySubscription {
    broker: InMemoryBroker,
    key: ConsumerKey,
    handle: u64,
    changed: watch::Receiver<u64>,
    /// The id of the delivery this handle holds, and its service.
    in_hand: Option<(ServiceId, u64)>,
    /// Per publishing service: the id of the last delivery this handle acknowledged.
    acked: HashMap<ServiceId, u64>,
}

impl InMemorySubscription {
    /// The next delivery if one can be made now.
    fn try_next(&mut self) -> Option<Delivery> {
        let mut state = self.broker.shared.state.lock();
        let State {
            logs,
            consumers,
            owners,
            deliveries,
            ..
        } = &mut *state;
        let consumer = consumers.get_mut(&self.key)?;
        let flight = match &consumer.in_flight {
            // Held by another live handle: wait for it.
            Some(flight) if flight.handle.is_some_and(|h| h != self.handle) => return None,
            // Ours again (not acknowledged), or released by a crash: deliver it again.
            Some(flight) => flight.clone(),
            None => {
                // The oldest message, across the publishing services, after each one's
                // acknowledged position and of a subscribed topic.
                let partition = self.key.2;
                let next = consumer
                    .topics
                    .iter()
                    .filter_map(|topic| owners.get(topic))
                    .filter_map(|service| {
                        let acked = consumer.acked.get(service).copied().unwrap_or(0);
                        let messages = &logs.get(service)?.messages;
                        let after = messages.partition_point(|m| m.sequence <= acked);
                        messages[after..]
                            .iter()
                            .find(|m| {
                                partition.holds_slot(m.slot) && consumer.topics.contains(&m.topic)
                            })
                            .map(|m| (m.arrival, service.clone(), m.sequence))
                    })
                    .min_by_key(|(arrival, _, _)| *arrival)?;
                InFlight {
                    handle: None,
                    service: next.1,
                    sequence: next.2,
                }
            }
        };
        let message = logs
            .get(&flight.service)?
            .messages
            .iter()
            .find(|m| m.sequence == flight.sequence)?;
        let attempt = consumer
            .attempts
            .entry((flight.service.clone(), flight.sequence))
            .or_insert(0);
        *attempt += 1;
        *deliveries += 1;
        let id = *deliveries;
        let previous = consumer.last_delivery.insert(flight.service.clone(), id);
        let consecutive =
            previous.is_some() && previous == self.acked.get(&flight.service).copied();
        self.in_hand = Some((flight.service.clone(), id));
        let delivery = Delivery::new(
            message.event.clone(),
            message.topic.clone(),
            message.sequence,
            *attempt,
        )
        .with_consecutive(consecutive);
        consumer.in_flight = Some(InFlight {
            handle: Some(self.handle),
            ..flight
        });
        Some(delivery)
    }
}

#[async_trait]
impl Subscription for InMemorySubscription {
    async fn next(&mut self) -> Result<Delivery, TransportError> {
        loop {
            self.changed.borrow_and_update();
            if let Some(delivery) = self.try_next() {
                return Ok(delivery);
            }
            if self.changed.changed().await.is_err() {
                return Err(TransportError::unavailable("the broker is gone", None));
            }
        }
    }

    async fn ack(&mut self, delivery: &Delivery) -> Result<(), TransportError> {
        let mut state = self.broker.shared.state.lock();
        let consumer = state
            .consumers
            .get_mut(&self.key)
            .ok_or_else(|| TransportError::rejected("the subscription is gone", None))?;
        let service = &delivery.event.service_id;
        match &consumer.in_flight {
            Some(flight)
                if flight.handle == Some(self.handle)
                    && &flight.service == service
                    && flight.sequence == delivery.sequence =>
            {
                consumer.acked.insert(service.clone(), delivery.sequence);
                consumer
                    .attempts
                    .remove(&(service.clone(), delivery.sequence));
                consumer.in_flight = None;
                match self.in_hand.take() {
                    Some((held, id)) if &held == service => {
                        self.acked.insert(held, id);
                    }
                    _ => {
                        self.acked.remove(service);
                    }
                }
            }
            // Already acknowledged (a repeat): nothing to do.
            _ if consumer
                .acked
                .get(service)
                .is_some_and(|acked| *acked >= delivery.sequence) => {}
            // Taken back (a broker crash, or this handle asked for the next event without
            // acknowledging): it will be delivered again.
            _ => {
                return Err(TransportError::unavailable(
                    format!(
                        "delivery {} of `{service}` is no longer in flight to this handle; it \
                         will be delivered again",
                        delivery.sequence
                    ),
                    None,
                ));
            }
        }
        drop(state);
        self.broker.bump();
        Ok(())
    }
}

impl Drop for InMemorySubscription {
    /// A dropped handle is a crashed consumer: what it had in flight goes to the next.
    fn drop(&mut self) {
        let mut state = self.broker.shared.state.lock();
        if let Some(consumer) = state.consumers.get_mut(&self.key)
            && let Some(flight) = &mut consumer.in_flight
            && flight.handle == Some(self.handle)
        {
            flight.handle = None;
        }
        drop(state);
        self.broker.bump();
    }
}

impl std::fmt::Debug for InMemorySubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemorySubscription")
            .field("service", &self.key.0)
            .field("name", &self.key.1)
            .field("handle", &self.handle)
            .finish_non_exhaustive()
    }
}
