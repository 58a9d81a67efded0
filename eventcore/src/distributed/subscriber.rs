//! The subscription runner: events of other services, handled with an exactly-once
//! effect on this service's own store.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tracing::Instrument;

use super::envelope::DistributedEvent;
use super::names::{ServiceId, Topic};
use super::transport::{Delivery, EventSubscriber, Subscription, SubscriptionSpec};
use crate::error::{Error, Result, error_chain};
use crate::event::{Event, EventData};
use crate::executor::CommandExecutor;
use crate::metadata::EventMetadata;
use crate::names::{IdempotencyKey, StreamId};
use crate::process::Dispatcher;
use crate::projection::{OnFailure, ProjectionErrorPolicy};
use crate::store::{AppendRequest, EventStore};
use crate::types::{ExpectedVersion, GlobalPosition, StreamVersion};

/// What a service does with the events of a subscription: usually, execute its own
/// commands through the [`Dispatcher`], whose idempotency keys derive from the
/// subscription and the event id, so a redelivered event writes nothing (the key is
/// stored with the effect, atomically, in this service's store).
///
/// The keys are positional (`.../<event id>/0`, `/1`, ...): for one event, dispatch the
/// same commands in the same order every time, deciding from the event and not from
/// state read elsewhere, so a redelivery meets each command's own first outcome.
///
/// Implement with plain `async fn` (ADR 0008).
pub trait EventHandler: Send + 'static {
    /// Handles one event. An error is retried (with backoff) by the runner, then the
    /// event is parked.
    fn handle(
        &mut self,
        event: &DistributedEvent,
        dispatcher: &mut Dispatcher<'_>,
    ) -> impl Future<Output = Result<()>> + Send;
}

/// What [`SubscriptionRunner::process`] did with a delivery. In every case the outcome
/// is durable in the subscribing service's store when it returns: the delivery may be
/// acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Processed {
    /// The handler succeeded (or had succeeded before: a redelivery wrote nothing).
    Handled,
    /// The handler kept failing; the event is parked.
    Parked,
    /// An earlier event of the same source stream is parked: this one is held behind
    /// it, to be handled when the stream is re-driven.
    Held,
}

/// An event kept in a subscription's inbox: parked (its handler kept failing) or held
/// behind a parked one of the same source stream.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ParkedDelivery {
    /// The event.
    pub event: DistributedEvent,
    /// Why it was parked; `None` for an event held behind a parked one.
    pub error: Option<String>,
}

/// How handling one event ended.
enum Outcome {
    Handled,
    /// Every attempt failed; the message with its cause chain, and the last error.
    Failed(String, Error),
    /// The last attempt failed with an error that may go away (a store outage).
    Transient(Error),
}

/// The inbox's own events, stored in the subscribing service's store.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum InboxEvent {
    Parked {
        event: Box<DistributedEvent>,
        error: String,
    },
    Held {
        event: Box<DistributedEvent>,
    },
    Redriven {
        service: ServiceId,
        stream: StreamId,
        through: GlobalPosition,
    },
}

impl Event for InboxEvent {
    fn event_type(&self) -> &str {
        match self {
            InboxEvent::Parked { .. } => "DeliveryParked",
            InboxEvent::Held { .. } => "DeliveryHeld",
            InboxEvent::Redriven { .. } => "StreamRedriven",
        }
    }
}

/// The folded inbox: per source stream, what waits, in order.
#[derive(Debug, Default)]
struct Inbox {
    version: StreamVersion,
    pending: BTreeMap<(ServiceId, StreamId), Vec<ParkedDelivery>>,
}

impl Inbox {
    fn apply(&mut self, event: InboxEvent) {
        match event {
            InboxEvent::Parked { event, error } => {
                let key = (event.service_id.clone(), event.stream_id.clone());
                push_once(self.pending.entry(key).or_default(), *event, Some(error));
            }
            InboxEvent::Held { event } => {
                let key = (event.service_id.clone(), event.stream_id.clone());
                push_once(self.pending.entry(key).or_default(), *event, None);
            }
            InboxEvent::Redriven {
                service,
                stream,
                through,
            } => {
                let key = (service, stream);
                if let Some(waiting) = self.pending.get_mut(&key) {
                    waiting.retain(|p| p.event.global_position > through);
                    if waiting.is_empty() {
                        self.pending.remove(&key);
                    }
                }
            }
        }
    }

    /// Whether anything of `event`'s stream waits in the inbox.
    fn holds(&self, event: &DistributedEvent) -> bool {
        self.pending
            .contains_key(&(event.service_id.clone(), event.stream_id.clone()))
    }

    /// What waits for `stream` of `service`, in the stream's order, each event once,
    /// whatever order they were kept in (a republished event can be held after a later
    /// one).
    fn in_order(&self, service: &ServiceId, stream: &StreamId) -> Vec<ParkedDelivery> {
        let mut waiting = self
            .pending
            .get(&(service.clone(), stream.clone()))
            .cloned()
            .unwrap_or_default();
        waiting.sort_by_key(|p| p.event.global_position);
        waiting.dedup_by_key(|p| p.event.event_id);
        waiting
    }

    /// Whether `event` itself waits in the inbox.
    fn waits(&self, event: &DistributedEvent) -> bool {
        self.pending
            .get(&(event.service_id.clone(), event.stream_id.clone()))
            .is_some_and(|waiting| waiting.iter().any(|p| p.event.event_id == event.event_id))
    }

    /// Whether `event`'s stream is parked: one of its events waits after a failure.
    /// Events held with none parked are left over from a hold recorded after a re-drive
    /// had released the stream (it read the inbox before the hold was written); nothing
    /// stops them, and the runner handles them.
    fn parks(&self, event: &DistributedEvent) -> bool {
        self.pending
            .get(&(event.service_id.clone(), event.stream_id.clone()))
            .is_some_and(|waiting| waiting.iter().any(|p| p.error.is_some()))
    }
}

/// Keeps `event` waiting once; an event held and later parked (its handling failed
/// when its stream was drained) is parked.
fn push_once(waiting: &mut Vec<ParkedDelivery>, event: DistributedEvent, error: Option<String>) {
    match waiting
        .iter_mut()
        .find(|p| p.event.event_id == event.event_id)
    {
        Some(kept) => {
            if kept.error.is_none() {
                kept.error = error;
            }
        }
        None => waiting.push(ParkedDelivery { event, error }),
    }
}

/// Runs a durable subscription: receives other services' events in order, hands each
/// to an [`EventHandler`], and acknowledges it only once its effect is durable.
///
/// - **Exactly-once effect.** The handler's [`Dispatcher`] gives every command an
///   idempotency key `sub-<service>-<subscription>/<event id>/<n>`: the key commits with
///   the command's events, so a redelivery (after a crash between effect and
///   acknowledgement, after any outage, however long) executes nothing again.
/// - **Order.** Events come one at a time in each publishing service's order; the
///   runner handles one before it asks for the next.
/// - **Nothing is skipped.** A handler that keeps failing is retried with backoff
///   ([`ProjectionErrorPolicy`]), then its event is parked in this service's store
///   (stream `eventcore/subscription/<service>/<name>/inbox`) and later events of the
///   same source stream are held behind it while other streams go on;
///   [`SubscriptionRunner::parked`] lists them and [`SubscriptionRunner::redrive`]
///   handles them again, in order. With [`OnFailure::Stop`] the runner stops instead,
///   leaving the event unacknowledged.
///
/// Several instances of a service may run the same subscription: the transport keeps
/// one event in flight across them, and the keys make every effect happen once.
///
/// **Concurrency.** One runner handles one event at a time. To handle several source
/// streams at once, split the subscription ([`SubscriptionSpec::split`]) and run one
/// runner per partition (each with its own handler): every source stream belongs to one
/// partition, so its events stay in order, and the partitions share the subscription's
/// keys and inbox ([`SubscriptionRunner::parked`] lists every partition's).
pub struct SubscriptionRunner<H> {
    subscriber: Arc<dyn EventSubscriber>,
    spec: SubscriptionSpec,
    handler: H,
    executor: CommandExecutor,
    policy: ProjectionErrorPolicy,
    key: String,
    inbox_stream: StreamId,
    inbox: Inbox,
    max_deliveries: u32,
    labels: Labels,
    /// The handle [`SubscriptionRunner::process_available`] keeps open between calls
    /// ([`SubscriptionRunner::run`] takes it over).
    open: Option<Box<dyn Subscription>>,
    /// The delivery in hand whose processing failed (processed again first).
    unfinished: Option<Delivery>,
}

/// The metric labels of a runner, built once: a label from a `&str` is allocated at
/// every emission.
#[derive(Debug)]
struct Labels {
    service: Arc<str>,
    subscription: Arc<str>,
    topics: Vec<(Topic, Arc<str>)>,
}

impl Labels {
    fn topic(&mut self, topic: &Topic) -> Arc<str> {
        if let Some((_, label)) = self.topics.iter().find(|(known, _)| known == topic) {
            return Arc::clone(label);
        }
        let label: Arc<str> = Arc::from(topic.as_str());
        self.topics.push((topic.clone(), Arc::clone(&label)));
        label
    }
}

impl<H: EventHandler> SubscriptionRunner<H> {
    /// A runner of `spec` on `subscriber`, handling with `handler` on `executor` (the
    /// subscribing service's own store).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidProjectionName`] or [`Error::InvalidStreamId`] if the names built
    /// from the subscription are invalid (they never are for valid service and
    /// subscription names).
    pub fn new(
        subscriber: Arc<dyn EventSubscriber>,
        spec: SubscriptionSpec,
        handler: H,
        executor: CommandExecutor,
    ) -> Result<Self> {
        let key = format!("sub-{}-{}", spec.service, spec.name);
        // The dispatcher checks the name on first use; check it now.
        Dispatcher::new(
            &executor,
            &key,
            crate::EventId::new(),
            crate::CorrelationId::new(),
        )?;
        let inbox_stream = StreamId::try_new(format!(
            "eventcore/subscription/{}/{}/inbox",
            spec.service, spec.name
        ))?;
        let (spec_service, spec_name) = (spec.service.clone(), spec.name.clone());
        Ok(SubscriptionRunner {
            subscriber,
            spec,
            handler,
            executor,
            policy: ProjectionErrorPolicy::new().with_on_failure(OnFailure::Park),
            key,
            inbox_stream,
            inbox: Inbox::default(),
            max_deliveries: 10,
            labels: Labels {
                service: Arc::from(spec_service.as_str()),
                subscription: Arc::from(spec_name.as_str()),
                topics: Vec::new(),
            },
            open: None,
            unfinished: None,
        })
    }

    /// Retries and what happens after the last attempt (default: 5 attempts, then
    /// park).
    pub fn with_error_policy(mut self, policy: ProjectionErrorPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// How many deliveries of one event without an outcome are tolerated (default 10)
    /// before it is parked without running the handler again: an event on which the
    /// process handling it dies (a panic, an abort, out of memory) would otherwise come
    /// back forever and stop the subscription on every instance.
    pub fn with_max_deliveries(mut self, deliveries: u32) -> Self {
        self.max_deliveries = deliveries.max(1);
        self
    }

    /// The subscription.
    pub fn spec(&self) -> &SubscriptionSpec {
        &self.spec
    }

    /// The handler.
    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// Brings the folded inbox up to date with the store (other instances may have
    /// parked or re-driven meanwhile).
    async fn refresh_inbox(&mut self) -> Result<()> {
        let snapshot = self
            .executor
            .store()
            .read_streams_after(&[(self.inbox_stream.clone(), self.inbox.version)])
            .await?;
        for recorded in &snapshot.events {
            self.inbox.apply(recorded.decode::<InboxEvent>()?.payload);
        }
        self.inbox.version = snapshot.version_of(&self.inbox_stream);
        Ok(())
    }

    async fn record(&mut self, entry: InboxEvent, key: String) -> Result<()> {
        let data = EventData::from_event(&entry, EventMetadata::default())?;
        let request =
            AppendRequest::single(self.inbox_stream.clone(), ExpectedVersion::Any, vec![data])
                .with_idempotency_key(IdempotencyKey::try_new(key)?);
        self.executor.store().append(request).await?;
        self.refresh_inbox().await
    }

    /// Handles `event` with retries; `Err` with the last failure's text when every
    /// attempt failed.
    async fn handle_with_retries(&mut self, event: &DistributedEvent) -> Outcome {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut dispatcher = match Dispatcher::new(
                &self.executor,
                &self.key,
                event.event_id,
                event.metadata.correlation_id,
            ) {
                Ok(dispatcher) => dispatcher,
                Err(error) => return Outcome::Failed(error_chain(&error), error),
            };
            dispatcher.inherit_metadata(&event.metadata);
            if event.trace_context.is_some() {
                dispatcher.set_trace_context(event.trace_context.clone());
            }
            // OpenTelemetry's messaging conventions: a consumer span named
            // "process <subscription>", a child of the context the event was written in.
            let span = tracing::info_span!(
                "eventcore.handle",
                otel.name = %format_args!("process {}", self.spec.name),
                otel.kind = "consumer",
                messaging.operation.type = "process",
                messaging.consumer.group.name = %self.spec.name,
                messaging.message.id = %event.event_id,
                subscription = %self.spec.name,
                partition = %self.spec.partition,
                service = %event.service_id,
                event_id = %event.event_id,
                event_type = %event.event_type,
                stream = %event.stream_id,
                attempt,
            );
            #[cfg(feature = "opentelemetry")]
            if let Some(context) = &event.trace_context {
                crate::otel::continue_from(&span, context);
            }
            match self
                .handler
                .handle(event, &mut dispatcher)
                .instrument(span)
                .await
            {
                Ok(()) => return Outcome::Handled,
                Err(error) if attempt < self.policy.max_attempts() => {
                    tracing::warn!(subscription = %self.spec.name, event_id = %event.event_id, attempt, error = %error_chain(&error), "handler failed; retrying");
                    tokio::time::sleep(self.policy.delay_before_retry(attempt)).await;
                }
                // A store or broker that is down is not the event's fault: not parked.
                Err(error) if error.is_retryable() => return Outcome::Transient(error),
                Err(error) => return Outcome::Failed(error_chain(&error), error),
            }
        }
    }

    /// Processes one delivery: holds it behind a parked event of its stream, or hands it
    /// to the handler (with retries) and parks it if the handler keeps failing. When
    /// this returns `Ok`, the outcome is durable and the delivery may be acknowledged.
    ///
    /// # Errors
    ///
    /// [`Error::ProjectionFailed`] when the handler kept failing and the policy says
    /// [`OnFailure::Stop`]; the store's errors while parking or holding.
    pub async fn process(&mut self, delivery: &Delivery) -> Result<Processed> {
        // Only the handling of this service's events elsewhere could have parked one of
        // its streams since the last read; a consecutive delivery says there was none.
        // (Other partitions' runners park only their own streams, never this one's.)
        // (Re-drives run on parked streams, which the folded inbox already knows: when
        // it says "held", it is read again before holding.)
        let event = &delivery.event;
        if !delivery.consecutive || self.inbox.holds(event) {
            self.refresh_inbox().await?;
        }
        // Delivered this often without an outcome: the process handling it ended each
        // time (a panic, an abort). No handler runs again: the event, or the oldest one
        // waiting before it, is parked.
        let exhausted = (delivery.attempt > self.max_deliveries).then(|| {
            format!(
                "delivered {} times without an outcome (more than {}): the process handling \
                 it ended each time",
                delivery.attempt, self.max_deliveries
            )
        });
        if self.inbox.holds(event) && !self.inbox.parks(event) {
            // Left over, released meanwhile: what waits goes first, in order.
            if let Some(message) = exhausted {
                return self.park_oldest_waiting(event, message).await;
            }
            let waiting_itself = self.inbox.waits(event);
            match self.drain(event).await? {
                Processed::Handled if waiting_itself => return Ok(Processed::Handled),
                Processed::Handled => {}
                _ => return self.hold(event).await,
            }
        }
        if self.inbox.holds(event) {
            let held = self.hold(event).await?;
            if !self.inbox.parks(event) {
                // Released by a re-drive between this runner's read and its hold.
                if let Some(message) = exhausted {
                    return self.park_oldest_waiting(event, message).await;
                }
                return self.drain(event).await;
            }
            return Ok(held);
        }
        if let Some(message) = exhausted {
            return self.park(event, message).await;
        }
        match self.handle_with_retries(event).await {
            Outcome::Handled => Ok(Processed::Handled),
            Outcome::Transient(error) => Err(error),
            Outcome::Failed(message, error) => match self.policy.on_failure() {
                OnFailure::Stop => Err(Error::ProjectionFailed {
                    projection: self.key.clone(),
                    stream: event.stream_id.clone(),
                    version: event.stream_version,
                    position: event.global_position,
                    message,
                    source: Some(Box::new(error)),
                }),
                OnFailure::Park => self.park(event, message).await,
            },
        }
    }

    /// Keeps `event` in the inbox behind its stream's parked event.
    async fn hold(&mut self, event: &DistributedEvent) -> Result<Processed> {
        tracing::info!(subscription = %self.spec.name, event_id = %event.event_id, stream = %event.stream_id, "held behind a parked event");
        let key = format!("{}/hold/{}", self.key, event.event_id);
        self.record(
            InboxEvent::Held {
                event: Box::new(event.clone()),
            },
            key,
        )
        .await?;
        Ok(Processed::Held)
    }

    /// Handles, in order, the events of `event`'s stream that wait in the inbox with none
    /// parked, and releases them: [`Processed::Handled`] when all were, or
    /// [`Processed::Parked`] when one failed for good (it is parked, and what follows it
    /// stays held behind it).
    async fn drain(&mut self, event: &DistributedEvent) -> Result<Processed> {
        let (service, stream) = (event.service_id.clone(), event.stream_id.clone());
        let waiting = self.inbox.in_order(&service, &stream);
        tracing::info!(subscription = %self.spec.name, stream = %stream, events = waiting.len(), "handling events left held after a re-drive");
        let mut through: Option<DistributedEvent> = None;
        for kept in waiting {
            let outcome = self.handle_with_retries(&kept.event).await;
            let failed = match outcome {
                Outcome::Handled => {
                    through = Some(kept.event);
                    continue;
                }
                Outcome::Transient(error) => Err(error),
                Outcome::Failed(message, error) => match self.policy.on_failure() {
                    OnFailure::Stop => Err(Error::ProjectionFailed {
                        projection: self.key.clone(),
                        stream: kept.event.stream_id.clone(),
                        version: kept.event.stream_version,
                        position: kept.event.global_position,
                        message,
                        source: Some(Box::new(error)),
                    }),
                    OnFailure::Park => Ok(message),
                },
            };
            if let Some(through) = &through {
                self.release(&service, &stream, through).await?;
            }
            let message = failed?;
            return self.park(&kept.event, message).await;
        }
        if let Some(through) = &through {
            self.release(&service, &stream, through).await?;
        }
        Ok(Processed::Handled)
    }

    /// Records `event` as held, as [`SubscriptionRunner::process`] does behind a parked
    /// event, whatever the inbox says (for the conformance checks: the hold of a runner
    /// that read the inbox before a re-drive released the stream).
    #[cfg(feature = "testing")]
    pub(crate) async fn record_hold(&mut self, event: &DistributedEvent) -> Result<()> {
        self.hold(event).await.map(|_| ())
    }

    /// Parks the oldest event of `event`'s stream waiting in the inbox, without
    /// handling it, and keeps `event` behind it (or `event` itself when it is the
    /// oldest).
    async fn park_oldest_waiting(
        &mut self,
        event: &DistributedEvent,
        message: String,
    ) -> Result<Processed> {
        let oldest = self
            .inbox
            .pending
            .get(&(event.service_id.clone(), event.stream_id.clone()))
            .and_then(|waiting| waiting.iter().min_by_key(|p| p.event.global_position))
            .map(|p| p.event.clone());
        match oldest {
            Some(oldest) if oldest.event_id != event.event_id => {
                self.park(&oldest, message).await?;
                self.hold(event).await
            }
            _ => self.park(event, message).await,
        }
    }

    async fn park(&mut self, event: &DistributedEvent, message: String) -> Result<Processed> {
        tracing::error!(subscription = %self.spec.name, event_id = %event.event_id, stream = %event.stream_id, %message, "parking an event");
        // Unique per park (the inbox's version moves with every record): an event
        // released and later parked again is parked again.
        let key = format!(
            "{}/park/{}/{}",
            self.key, event.event_id, self.inbox.version
        );
        self.record(
            InboxEvent::Parked {
                event: Box::new(event.clone()),
                error: message,
            },
            key,
        )
        .await?;
        crate::metrics::event_parked(&self.labels.service, &self.labels.subscription);
        Ok(Processed::Parked)
    }

    /// Receives, processes and acknowledges events until `shutdown` completes. An
    /// acknowledgement that fails is not retried: the transport delivers the event again
    /// and the handler's keys make that harmless.
    ///
    /// # Errors
    ///
    /// The transport's errors that are not retryable, and what
    /// [`SubscriptionRunner::process`] returns.
    pub async fn run(&mut self, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        let mut shutdown = std::pin::pin!(shutdown);
        // The handle opened before (by `open` or `process_available`), if any: a second
        // handle of the same subscription would wait behind what the first holds.
        let mut subscription: Option<Box<dyn Subscription>> = self.open.take();
        let mut failures = 0;
        loop {
            let open = match subscription.as_mut() {
                Some(open) => open,
                None => match self.subscriber.subscribe(&self.spec).await {
                    Ok(open) => subscription.insert(open),
                    Err(error) if error.is_retryable() => {
                        failures += 1;
                        tracing::warn!(subscription = %self.spec.name, %error, "cannot subscribe yet; retrying");
                        tokio::select! {
                            () = tokio::time::sleep(self.policy.delay_before_retry(failures)) => continue,
                            () = &mut shutdown => return Ok(()),
                        }
                    }
                    Err(error) => return Err(error.into()),
                },
            };
            let delivery = tokio::select! {
                next = open.next() => next,
                () = &mut shutdown => return Ok(()),
            };
            let delivery = match delivery {
                Ok(delivery) => delivery,
                Err(error) if error.is_retryable() => {
                    failures += 1;
                    subscription = None;
                    tokio::select! {
                        () = tokio::time::sleep(self.policy.delay_before_retry(failures)) => continue,
                        () = &mut shutdown => return Ok(()),
                    }
                }
                Err(error) => return Err(error.into()),
            };
            failures = 0;
            // A store outage: the same delivery again after a pause, in place (asking
            // the transport again would count as another delivery).
            let mut outage = 0;
            let processed = loop {
                match self.process(&delivery).await {
                    Ok(processed) => break processed,
                    Err(error) if error.is_retryable() => {
                        outage += 1;
                        tracing::warn!(subscription = %self.spec.name, event_id = %delivery.event.event_id, error = %error_chain(&error), "the store failed; retrying");
                        tokio::select! {
                            () = tokio::time::sleep(self.policy.delay_before_retry(outage)) => {}
                            () = &mut shutdown => return Ok(()),
                        }
                    }
                    Err(error) => return Err(error),
                }
            };
            match open.ack(&delivery).await {
                Ok(()) => self.consumed(&delivery, processed),
                Err(error) => {
                    if !error.is_retryable() {
                        return Err(error.into());
                    }
                    tracing::warn!(subscription = %self.spec.name, event_id = %delivery.event.event_id, %error, "acknowledgement failed; the event will come again");
                }
            }
        }
    }

    fn consumed(&mut self, delivery: &Delivery, processed: Processed) {
        if matches!(processed, Processed::Handled) {
            let topic = self.labels.topic(&delivery.topic);
            let lag = (chrono::Utc::now() - delivery.event.occurred_at)
                .to_std()
                .ok();
            crate::metrics::event_consumed(
                &self.labels.service,
                &self.labels.subscription,
                &topic,
                lag,
            );
        }
    }

    /// Opens the subscription (if this runner has not yet), so that the transport keeps
    /// what is published for it from now on even before the first
    /// [`SubscriptionRunner::process_available`], and its [`EventSubscriber::backlog`] is known.
    ///
    /// # Errors
    ///
    /// The transport's errors.
    pub async fn open(&mut self) -> Result<()> {
        if self.open.is_none() {
            self.open = Some(self.subscriber.subscribe(&self.spec).await?);
        }
        Ok(())
    }

    /// Processes and acknowledges every event the subscription holds, and returns how
    /// many, once its [`EventSubscriber::backlog`] is empty: a step-by-step driver for
    /// tests and examples, deterministic where the transport counts its backlog exactly
    /// (the in-memory broker). [`SubscriptionRunner::run`] is the way to run in
    /// production. The handle stays open between calls; a transport error closes it, so
    /// the next call opens it again and the unacknowledged event comes again. A delivery
    /// whose processing failed is kept and processed again first by the next call (not
    /// asked of the transport again, which would count another delivery of it).
    ///
    /// Use it where this runner is the only handle of its subscription (or partition):
    /// the backlog counts an event another handle holds, and this call would wait for
    /// it.
    ///
    /// # Errors
    ///
    /// The transport's errors and what [`SubscriptionRunner::process`] returns.
    pub async fn process_available(&mut self) -> Result<u64> {
        let mut handled = 0;
        loop {
            self.open().await?;
            // A delivery whose processing failed last time is processed again in place:
            // asking the transport again would count as another delivery.
            let delivery = match self.unfinished.take() {
                Some(delivery) => delivery,
                None => {
                    let waiting = self
                        .subscriber
                        .backlog(&self.spec)
                        .await?
                        .map_or(0, |backlog| backlog.events);
                    if waiting == 0 {
                        return Ok(handled);
                    }
                    let next = match self.open.as_mut() {
                        Some(open) => open.next().await,
                        None => continue,
                    };
                    match next {
                        Ok(delivery) => delivery,
                        Err(error) => {
                            self.open = None;
                            return Err(error.into());
                        }
                    }
                }
            };
            let processed = match self.process(&delivery).await {
                Ok(processed) => processed,
                Err(error) => {
                    self.unfinished = Some(delivery);
                    return Err(error);
                }
            };
            let acked = match self.open.as_mut() {
                Some(open) => open.ack(&delivery).await,
                None => Ok(()),
            };
            if let Err(error) = acked {
                self.open = None;
                return Err(error.into());
            }
            self.consumed(&delivery, processed);
            handled += 1;
        }
    }

    /// The events parked or held in this subscription's inbox, per source stream in
    /// order.
    ///
    /// # Errors
    ///
    /// The store's errors.
    pub async fn parked(&mut self) -> Result<Vec<ParkedDelivery>> {
        self.refresh_inbox().await?;
        Ok(self.inbox.pending.values().flatten().cloned().collect())
    }

    /// Handles the parked and held events of one source stream again, in order (after
    /// the cause was fixed), and releases the stream: later events of it are handled as
    /// they come. Returns how many were handled. Effects that had happened are not
    /// repeated (the keys).
    ///
    /// # Errors
    ///
    /// [`Error::ProjectionFailed`] when the handler fails again on one of them (after
    /// its retries): it stays in the inbox, parked, and what follows stays held behind
    /// it; the store's errors.
    pub async fn redrive(&mut self, service: &ServiceId, stream: &StreamId) -> Result<usize> {
        let mut handled = 0;
        // Events may be held behind the stream while it is re-driven (another instance
        // still receiving): go again until none waits, a bounded number of times.
        for _ in 0..16 {
            self.refresh_inbox().await?;
            let waiting = self.inbox.in_order(service, stream);
            if waiting.is_empty() {
                break;
            }
            let mut through: Option<&DistributedEvent> = None;
            for parked in &waiting {
                match self.handle_with_retries(&parked.event).await {
                    Outcome::Handled => {
                        handled += 1;
                        through = Some(&parked.event);
                    }
                    Outcome::Transient(error) => {
                        if let Some(through) = through {
                            self.release(service, stream, &through.clone()).await?;
                        }
                        return Err(error);
                    }
                    Outcome::Failed(message, error) => {
                        if let Some(through) = through {
                            self.release(service, stream, &through.clone()).await?;
                        }
                        if parked.error.is_none() {
                            // A held event that fails is parked: the stream stays parked
                            // at it, not left held with nothing in front.
                            self.park(&parked.event, message.clone()).await?;
                        }
                        return Err(Error::ProjectionFailed {
                            projection: self.key.clone(),
                            stream: parked.event.stream_id.clone(),
                            version: parked.event.stream_version,
                            position: parked.event.global_position,
                            message,
                            source: Some(Box::new(error)),
                        });
                    }
                }
            }
            if let Some(through) = through {
                self.release(service, stream, &through.clone()).await?;
            }
        }
        Ok(handled)
    }

    async fn release(
        &mut self,
        service: &ServiceId,
        stream: &StreamId,
        through: &DistributedEvent,
    ) -> Result<()> {
        // Unique per release (the inbox's version moves with every record): a stream
        // released through the same event twice is released twice.
        let key = format!(
            "{}/redrive/{}/{}",
            self.key, through.event_id, self.inbox.version
        );
        let through = through.global_position;
        self.record(
            InboxEvent::Redriven {
                service: service.clone(),
                stream: stream.clone(),
                through,
            },
            key,
        )
        .await
    }
}

impl<H> std::fmt::Debug for SubscriptionRunner<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscriptionRunner")
            .field("spec", &self.spec)
            .field("policy", &self.policy)
            .field("waiting_streams", &self.inbox.pending.len())
            .finish_non_exhaustive()
    }
}
