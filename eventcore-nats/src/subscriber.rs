//! [`NatsSubscriber`]: durable subscriptions as pull consumers with one message in
//! flight.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer};
use async_trait::async_trait;
use eventcore::distributed::{
    Backlog, Delivery, DistributedEvent, EventSubscriber, ServiceId, Subscription,
    SubscriptionSpec, Topic, TransportError,
};
use futures::StreamExt;
use tokio::sync::{mpsc, watch};

use crate::subject::Names;
use crate::{NatsConfig, unavailable};

/// The consumer metadata key holding the subscription's topics (all of them, sorted,
/// comma-separated): how partitions of one subscription check they agree.
const TOPICS_KEY: &str = "eventcore-topics";

fn topics_of(spec: &SubscriptionSpec) -> String {
    spec.topics
        .iter()
        .map(Topic::as_str)
        .collect::<Vec<_>>()
        .join(",")
}

/// The [`EventSubscriber`] on NATS JetStream (see the crate docs).
#[derive(Debug, Clone)]
pub struct NatsSubscriber {
    context: jetstream::Context,
    config: NatsConfig,
    names: Names,
}

impl NatsSubscriber {
    pub(crate) fn new(context: jetstream::Context, config: NatsConfig) -> Self {
        let names = Names::new(config.prefix());
        NatsSubscriber {
            context,
            config,
            names,
        }
    }

    /// The stream publishing `topic`.
    async fn stream_of(&self, topic: &Topic) -> Result<(String, ServiceId), TransportError> {
        match self
            .context
            .stream_by_subject(self.names.topic_filter(topic))
            .await
        {
            Ok(name) => {
                let service = self.names.service_of_stream(&name).ok_or_else(|| {
                    TransportError::rejected(
                        format!(
                            "topic `{topic}` is captured by stream `{name}`, which is not an \
                             EventCore publication under prefix `{}`",
                            self.config.prefix()
                        ),
                        None,
                    )
                })?;
                Ok((name, service))
            }
            Err(error) => match error.kind() {
                jetstream::context::GetStreamByNameErrorKind::NotFound => {
                    Err(TransportError::unavailable(
                        format!(
                            "no service publishes topic `{topic}` yet (it exists once its \
                             publisher declared it)"
                        ),
                        None,
                    ))
                }
                _ => Err(unavailable("looking up the stream of a topic", error)),
            },
        }
    }

    fn consumer_config(
        &self,
        name: &str,
        filters: Vec<String>,
        spec: &SubscriptionSpec,
    ) -> consumer::pull::Config {
        consumer::pull::Config {
            metadata: [(TOPICS_KEY.to_owned(), topics_of(spec))].into(),
            durable_name: Some(name.to_owned()),
            description: Some("EventCore subscription".to_owned()),
            deliver_policy: consumer::DeliverPolicy::All,
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: self.config.ack_wait,
            // Never dropped by the broker: the subscription runner counts deliveries
            // and parks.
            max_deliver: -1,
            // One in flight: a redelivery can never overtake a newer message.
            max_ack_pending: 1,
            filter_subjects: filters,
            num_replicas: 0,
            ..Default::default()
        }
    }

    /// The durable consumer `name` on `stream`, filtering `filters`: created if
    /// missing, checked if it exists.
    async fn ensure_consumer(
        &self,
        stream: &str,
        name: &str,
        filters: Vec<String>,
        spec: &SubscriptionSpec,
    ) -> Result<consumer::PullConsumer, TransportError> {
        let stream = self
            .context
            .get_stream_no_info(stream)
            .await
            .map_err(|e| unavailable("opening a publication stream", e))?;
        for _ in 0..3 {
            match stream.consumer_info(name).await {
                Ok(info) => {
                    let mut existing = info.config.filter_subjects.clone();
                    if !info.config.filter_subject.is_empty() {
                        existing.push(info.config.filter_subject.clone());
                    }
                    existing.sort();
                    let config = &info.config;
                    if config.max_ack_pending != 1
                        || config.ack_policy != consumer::AckPolicy::Explicit
                        || config.max_deliver > 0
                    {
                        return Err(TransportError::rejected(
                            format!(
                                "consumer `{name}` exists with a configuration that breaks the \
                                 subscription's order or drops messages (max_ack_pending {}, \
                                 ack policy {:?}, max_deliver {}); delete it to let the \
                                 subscription create its own",
                                config.max_ack_pending, config.ack_policy, config.max_deliver
                            ),
                            None,
                        ));
                    }
                    if existing != filters {
                        return Err(TransportError::rejected(
                            format!(
                                "subscription `{}` of `{}` exists with other topics",
                                spec.name, spec.service
                            ),
                            None,
                        ));
                    }
                    // Checked on every open, not only at creation: two deployments
                    // creating partitions split differently at the same moment both
                    // pass a check made before creating, and must not go on.
                    self.refuse_mismatched_partitions(&stream, spec).await?;
                    return stream.get_consumer(name).await.map_err(|error| {
                        TransportError::unavailable(
                            format!("opening a subscription: {error}"),
                            Some(error),
                        )
                    });
                }
                Err(error) => match error.kind() {
                    jetstream::context::ConsumerInfoErrorKind::NotFound => {
                        self.refuse_mismatched_partitions(&stream, spec).await?;
                        // Another instance may create it at the same moment: an
                        // identical creation succeeds, and a failed one looks again.
                        if stream
                            .create_consumer(self.consumer_config(name, filters.clone(), spec))
                            .await
                            .is_ok()
                        {
                            continue;
                        }
                    }
                    _ => return Err(unavailable("reading a subscription", error)),
                },
            }
        }
        Err(TransportError::unavailable(
            format!(
                "subscription `{}` of `{}` could not be created",
                spec.name, spec.service
            ),
            None,
        ))
    }
}

impl NatsSubscriber {
    /// Refuses `spec` next to a consumer of another partition of the same subscription
    /// split another way (both would deliver the same streams) or opened with other
    /// topics (some events would reach no partition).
    async fn refuse_mismatched_partitions(
        &self,
        stream: &jetstream::stream::Stream<()>,
        spec: &SubscriptionSpec,
    ) -> Result<(), TransportError> {
        let ours = self
            .names
            .consumer(&spec.service, &spec.name, spec.partition);
        let topics = topics_of(spec);
        let mut names = stream.consumer_names();
        while let Some(consumer) = names.next().await {
            let consumer = consumer.map_err(|e| unavailable("listing the subscriptions", e))?;
            let Some(other) =
                self.names
                    .partition_of_consumer(&consumer, &spec.service, &spec.name)
            else {
                continue;
            };
            if other.count() != spec.partition.count() {
                return Err(TransportError::rejected(
                    format!(
                        "subscription `{}` of `{}` exists split into {} partitions (consumer \
                         `{consumer}`), not {}; to split it another way, stop its runners and \
                         delete its consumers first",
                        spec.name,
                        spec.service,
                        other.count(),
                        spec.partition.count()
                    ),
                    None,
                ));
            }
            if consumer == ours {
                continue;
            }
            let info = match stream.consumer_info(&consumer).await {
                Ok(info) => info,
                // Deleted meanwhile: nothing to compare.
                Err(error)
                    if error.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound =>
                {
                    continue;
                }
                Err(error) => return Err(unavailable("reading a subscription", error)),
            };
            if let Some(theirs) = info.config.metadata.get(TOPICS_KEY)
                && theirs != &topics
            {
                return Err(TransportError::rejected(
                    format!(
                        "partition {other} of subscription `{}` of `{}` receives topics \
                         [{theirs}], not [{topics}]: every partition of a subscription has \
                         the same topics",
                        spec.name, spec.service
                    ),
                    None,
                ));
            }
        }
        Ok(())
    }
}

#[async_trait]
impl EventSubscriber for NatsSubscriber {
    async fn subscribe(
        &self,
        spec: &SubscriptionSpec,
    ) -> Result<Box<dyn Subscription>, TransportError> {
        if spec.topics.is_empty() {
            return Err(TransportError::rejected(
                format!("subscription `{}` names no topic", spec.name),
                None,
            ));
        }
        let mut by_stream: BTreeMap<String, (ServiceId, Vec<String>)> = BTreeMap::new();
        for topic in &spec.topics {
            let (stream, service) = self.stream_of(topic).await?;
            by_stream
                .entry(stream)
                .or_insert_with(|| (service, Vec::new()))
                .1
                .extend(self.names.partition_filters(topic, spec.partition));
        }
        let name = self
            .names
            .consumer(&spec.service, &spec.name, spec.partition);
        let mut consumers = Vec::with_capacity(by_stream.len());
        for (stream, (service, mut filters)) in by_stream {
            filters.sort();
            let consumer = self.ensure_consumer(&stream, &name, filters, spec).await?;
            consumers.push((service, consumer));
        }
        Ok(Box::new(NatsSubscription::open(
            self.context.client(),
            consumers,
            self.names.clone(),
            self.config.pull_expiry,
            self.config.ack_wait,
        )))
    }

    #[tracing::instrument(
        name = "eventcore.nats.backlog",
        skip_all,
        fields(subscription = %spec.name, service = %spec.service)
    )]
    async fn backlog(&self, spec: &SubscriptionSpec) -> Result<Option<Backlog>, TransportError> {
        let mut streams = Vec::new();
        for topic in &spec.topics {
            let (stream, _) = self.stream_of(topic).await?;
            if !streams.contains(&stream) {
                streams.push(stream);
            }
        }
        let name = self
            .names
            .consumer(&spec.service, &spec.name, spec.partition);
        let mut found: Option<Backlog> = None;
        for stream in streams {
            let stream = self
                .context
                .get_stream_no_info(&stream)
                .await
                .map_err(|e| unavailable("opening a publication stream", e))?;
            let info = match stream.consumer_info(&name).await {
                Ok(info) => info,
                Err(error)
                    if error.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound =>
                {
                    continue;
                }
                Err(error) => return Err(unavailable("reading a subscription", error)),
            };
            let held = held_for(&stream, &info).await?;
            found = Some(found.unwrap_or_default().merge(held));
        }
        Ok(found)
    }
}

/// What consumer `info` of `stream` has not acknowledged: the message in flight (one
/// at most: `max_ack_pending` is 1) and those not delivered yet; the oldest is the
/// one in flight, or else the first after the acknowledged floor that its filters
/// select.
async fn held_for(
    stream: &jetstream::stream::Stream<()>,
    info: &consumer::Info,
) -> Result<Backlog, TransportError> {
    let events = info.num_pending.saturating_add(info.num_ack_pending as u64);
    if events == 0 {
        return Ok(Backlog::new(0, None));
    }
    let oldest = if info.num_ack_pending > 0 {
        Some(
            stream
                .direct_get(info.delivered.stream_sequence)
                .await
                .map_err(|e| unavailable("reading the message in flight", e))?,
        )
    } else {
        let after = info.ack_floor.stream_sequence.saturating_add(1);
        let mut filters = info.config.filter_subjects.clone();
        if !info.config.filter_subject.is_empty() {
            filters.push(info.config.filter_subject.clone());
        }
        let firsts = futures::future::join_all(
            filters
                .iter()
                .map(|filter| stream.direct_get_next_for_subject(filter.as_str(), Some(after))),
        )
        .await;
        let mut oldest: Option<jetstream::message::StreamMessage> = None;
        for first in firsts {
            match first {
                Ok(message) => {
                    if oldest
                        .as_ref()
                        .is_none_or(|o| message.sequence < o.sequence)
                    {
                        oldest = Some(message);
                    }
                }
                Err(error) if error.kind() == jetstream::stream::DirectGetErrorKind::NotFound => {}
                Err(error) => return Err(unavailable("reading the oldest message held", error)),
            }
        }
        oldest
    };
    Ok(Backlog::new(
        events,
        oldest.map(|message| occurred_at(&message)),
    ))
}

/// When the source store recorded the event `message` carries (the envelope's
/// `occurred_at`); when the body is not an envelope, when the broker stored it.
fn occurred_at(message: &jetstream::message::StreamMessage) -> chrono::DateTime<chrono::Utc> {
    #[derive(serde::Deserialize)]
    struct Occurred {
        occurred_at: chrono::DateTime<chrono::Utc>,
    }
    serde_json::from_slice::<Occurred>(&message.payload)
        .map(|o| o.occurred_at)
        .ok()
        .or_else(|| {
            chrono::DateTime::from_timestamp(
                message.time.unix_timestamp(),
                message.time.nanosecond(),
            )
        })
        .unwrap_or_default()
}

/// A message a source's pump received and keeps for the handle.
struct Offered {
    source: usize,
    message: jetstream::Message,
    /// A pull or a progress acknowledgement failed since the pump's previous offer
    /// (the consumer may have been deleted and made again): the handle's record of
    /// its last acknowledged delivery no longer says anything.
    after_failure: bool,
}

/// What a pump offers: a message, or a failure during call `call` of `next`.
enum Offer {
    Message(Box<Offered>),
    Failed { call: u64, error: TransportError },
}

/// What the handle tells a pump about the message it offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Done {
    /// Acknowledged by the handle: forget it.
    Acked,
    /// Hand it back to the broker (the pump sends the NAK, so a cancelled `next` cannot
    /// lose it, and it goes out before the pump's next pull).
    Nak,
}

/// Whether the handle waits in `next`, and which call of it this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Asking {
    waiting: bool,
    call: u64,
}

/// The delivery this handle holds, not yet acknowledged.
struct Held {
    source: usize,
    service: ServiceId,
    sequence: u64,
    /// The consumer's delivery sequence of this delivery.
    delivered_as: u64,
    message: jetstream::Message,
}

/// An open handle on a durable subscription.
///
/// Each publishing stream it reads has a *pump*: a task that sends a pull request for
/// one message while the handle waits in [`Subscription::next`], keeps listening until
/// the request is answered (a request nobody listens to would hold its message until
/// the acknowledgement wait), offers what it received to the handle, and keeps that
/// message this handle's (progress acknowledgements) until the handle is done with it.
/// So a message of one service can wait for the handle while it holds another's, and
/// a live handle never loses its delivery to the acknowledgement wait; a crashed
/// process's delivery comes again after it.
struct NatsSubscription {
    client: async_nats::Client,
    services: Vec<ServiceId>,
    offers: mpsc::Receiver<Offer>,
    asking: Arc<watch::Sender<Asking>>,
    /// Per source: what became of the message its pump offered.
    done: Vec<mpsc::UnboundedSender<Done>>,
    held: Option<Held>,
    /// Per source: the consumer's delivery sequence and the stream sequence of the last
    /// delivery this handle acknowledged (`None` after a failure). The broker numbers
    /// every delivery of a consumer, to any handle: a first delivery numbered right
    /// after it went to no other handle in between ([`Delivery::consecutive`]). The
    /// stream sequence must have moved forward too: a consumer deleted and made again
    /// under the same name (by an operator, or by `subscribe` after a broker lost it)
    /// numbers its deliveries from 1 again, from the start of the stream.
    acked: Vec<Option<(u64, u64)>>,
    names: Names,
}

impl std::fmt::Debug for NatsSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSubscription")
            .field("sources", &self.services)
            .field("holding", &self.held.as_ref().map(|h| h.sequence))
            .finish_non_exhaustive()
    }
}

/// How long after the broker's expiry a pull request is given up: the client's clock
/// starts when the request is queued, which can be well before the broker gets it
/// during a reconnect.
const PULL_GRACE: Duration = Duration::from_secs(2);

/// Asks `consumer` for one message, waiting at most `expiry` at the broker.
async fn pull_one(
    consumer: &consumer::PullConsumer,
    expiry: Duration,
) -> Result<Option<jetstream::Message>, TransportError> {
    let mut batch = consumer
        .batch()
        .max_messages(1)
        .expires(expiry)
        .messages()
        .await
        .map_err(|e| unavailable("asking for the next event", e))?;
    // The client gives up on a request only seconds after the broker's expiry; a
    // request lost with a connection (a server restart) would stall the pump that
    // long. Give up a grace period after the broker would have.
    let waited = tokio::time::timeout(expiry + PULL_GRACE, batch.next()).await;
    let Ok(pulled) = waited else {
        return Ok(None);
    };
    match pulled {
        None => Ok(None),
        Some(Ok(message)) => Ok(Some(message)),
        Some(Err(error)) => Err(TransportError::unavailable(
            format!("receiving the next event: {error}"),
            Some(error),
        )),
    }
}

async fn nak(message: &jetstream::Message) {
    if let Err(error) = message.ack_with(AckKind::Nak(None)).await {
        tracing::debug!(%error, "could not hand an event back; it comes again after the acknowledgement wait");
    }
}

/// One source's pump (see [`NatsSubscription`]).
async fn pump(
    source: usize,
    consumer: consumer::PullConsumer,
    expiry: Duration,
    keep_alive: Duration,
    offers: mpsc::Sender<Offer>,
    mut asking: watch::Receiver<Asking>,
    mut done: mpsc::UnboundedReceiver<Done>,
) {
    // The call of `next` this pump last reported a failure to: not again in it.
    let mut failed_in = None;
    // Whether a pull or a progress acknowledgement failed since the last offer.
    let mut failed = false;
    loop {
        let now = match asking
            .wait_for(|asking| asking.waiting && Some(asking.call) != failed_in)
            .await
        {
            Ok(now) => *now,
            Err(_) => return,
        };
        let message = match pull_one(&consumer, expiry).await {
            Ok(Some(message)) => message,
            Ok(None) => continue,
            Err(error) => {
                failed = true;
                // Reported to the call that is waiting, if it still is; dropped when
                // the channel is full (the handle then has other offers to take).
                let current = *asking.borrow();
                if current.waiting && current.call == now.call {
                    match offers.try_send(Offer::Failed {
                        call: now.call,
                        error,
                    }) {
                        Ok(()) => failed_in = Some(now.call),
                        Err(mpsc::error::TrySendError::Closed(_)) => return,
                        // Not reported: pull again after a pause (a retry backoff).
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
                continue;
            }
        };
        let offered = Offer::Message(Box::new(Offered {
            source,
            message: message.clone(),
            after_failure: std::mem::take(&mut failed),
        }));
        // Offered, and kept alive meanwhile (the handle may be busy with another
        // source's event).
        let mut sending = std::pin::pin!(offers.send(offered));
        loop {
            tokio::select! {
                sent = &mut sending => {
                    if sent.is_err() {
                        nak(&message).await;
                        return;
                    }
                    break;
                }
                () = tokio::time::sleep(keep_alive) => {
                    if message.ack_with(AckKind::Progress).await.is_err() {
                        failed = true;
                    }
                }
            }
        }
        loop {
            tokio::select! {
                finished = done.recv() => {
                    match finished {
                        Some(Done::Acked) => {}
                        Some(Done::Nak) => nak(&message).await,
                        // The handle is gone (a crash, or dropped): hand it back now.
                        None => {
                            nak(&message).await;
                            return;
                        }
                    }
                    break;
                }
                () = tokio::time::sleep(keep_alive) => {
                    if let Err(error) = message.ack_with(AckKind::Progress).await {
                        failed = true;
                        tracing::debug!(%error, "could not extend the acknowledgement wait");
                    }
                }
            }
        }
    }
}

/// Marks the handle as no longer waiting when `next` returns or is cancelled.
struct Waiting(Arc<watch::Sender<Asking>>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.send_modify(|asking| asking.waiting = false);
    }
}

impl NatsSubscription {
    fn open(
        client: async_nats::Client,
        consumers: Vec<(ServiceId, consumer::PullConsumer)>,
        names: Names,
        expiry: Duration,
        ack_wait: Duration,
    ) -> Self {
        let (offer, offers) = mpsc::channel(consumers.len() * 2);
        let (asking, _) = watch::channel(Asking {
            waiting: false,
            call: 0,
        });
        let keep_alive = (ack_wait / 3).max(Duration::from_millis(100));
        let mut services = Vec::with_capacity(consumers.len());
        let mut done = Vec::with_capacity(consumers.len());
        for (source, (service, consumer)) in consumers.into_iter().enumerate() {
            let (finished, finishes) = mpsc::unbounded_channel();
            tokio::spawn(pump(
                source,
                consumer,
                expiry,
                keep_alive,
                offer.clone(),
                asking.subscribe(),
                finishes,
            ));
            services.push(service);
            done.push(finished);
        }
        let acked = vec![None; services.len()];
        NatsSubscription {
            client,
            services,
            offers,
            asking: Arc::new(asking),
            done,
            held: None,
            acked,
            names,
        }
    }

    /// Tells `source`'s pump what became of its message.
    fn finish(&self, source: usize, done: Done) {
        let _ = self.done[source].send(done);
    }

    /// Hands the held delivery back to the broker (through its pump), for this handle
    /// or another.
    fn release(&mut self) {
        if let Some(held) = self.held.take() {
            self.finish(held.source, Done::Nak);
        }
    }

    /// The next message a pump offers during call `call`: a message queued before a
    /// failure wins over it, and failures of earlier calls are stale.
    async fn next_offer(&mut self, call: u64) -> Result<Offered, TransportError> {
        let mut failure = None;
        loop {
            let offer = if failure.is_some() {
                match self.offers.try_recv() {
                    Ok(offer) => offer,
                    Err(_) => break,
                }
            } else {
                match self.offers.recv().await {
                    Some(offer) => offer,
                    None => {
                        return Err(TransportError::unavailable(
                            "the subscription's sources stopped",
                            None,
                        ));
                    }
                }
            };
            match offer {
                Offer::Message(offered) => return Ok(*offered),
                Offer::Failed { call: at, error } if at == call => failure = Some(error),
                Offer::Failed { .. } => {}
            }
        }
        Err(failure.unwrap_or_else(|| TransportError::unavailable("no offer", None)))
    }

    /// The delivery of `message` from `source`, with its stream sequence and the
    /// consumer's delivery sequence.
    fn delivery(
        &self,
        source: usize,
        service: &ServiceId,
        message: &jetstream::Message,
    ) -> Result<(Delivery, u64, u64), TransportError> {
        let info = message
            .info()
            .map_err(|error| TransportError::Undecodable {
                service: service.clone(),
                sequence: 0,
                message: format!("no JetStream metadata: {error}"),
            })?;
        let sequence = info.stream_sequence;
        let attempt = u32::try_from(info.delivered.max(1)).unwrap_or(u32::MAX);
        let undecodable = |message: String| TransportError::Undecodable {
            service: service.clone(),
            sequence,
            message,
        };
        let mut event: DistributedEvent = serde_json::from_slice(&message.payload)
            .map_err(|e| undecodable(format!("the body is not an envelope: {e}")))?;
        if let Some(context) = header_trace_context(message.headers.as_ref(), sequence) {
            event.trace_context = Some(context);
        }
        let (topic, stream) = self.names.parse_subject(&message.subject).ok_or_else(|| {
            undecodable(format!("subject `{}` is not an event's", message.subject))
        })?;
        if event.stream_id != stream || &event.service_id != service {
            return Err(undecodable(format!(
                "the envelope (service `{}`, stream `{}`) does not match where it was \
                 published (`{service}`, `{stream}`)",
                event.service_id, event.stream_id
            )));
        }
        let delivered_as = info.consumer_sequence;
        let consecutive = self.acked[source].is_some_and(|(delivery, stream)| {
            delivery.checked_add(1) == Some(delivered_as) && sequence > stream
        });
        let delivery = Delivery::new(event, topic, sequence, attempt).with_consecutive(consecutive);
        Ok((delivery, sequence, delivered_as))
    }
}

#[async_trait]
impl Subscription for NatsSubscription {
    async fn next(&mut self) -> Result<Delivery, TransportError> {
        self.release();
        let offered = {
            let mut call = 0;
            self.asking.send_modify(|asking| {
                asking.call += 1;
                asking.waiting = true;
                call = asking.call;
            });
            let _waiting = Waiting(self.asking.clone());
            match self.next_offer(call).await {
                Ok(offered) => offered,
                Err(error) => {
                    // What happened meanwhile is unknown.
                    self.acked.fill(None);
                    return Err(error);
                }
            }
        };
        let Offered {
            source,
            message,
            after_failure,
        } = offered;
        if after_failure {
            self.acked[source] = None;
        }
        let service = self.services[source].clone();
        match self.delivery(source, &service, &message) {
            Ok((delivery, sequence, delivered_as)) => {
                self.held = Some(Held {
                    source,
                    service,
                    sequence,
                    delivered_as,
                    message,
                });
                Ok(delivery)
            }
            Err(error) => {
                // Not skipped: handed back, and the subscription stops at it.
                self.finish(source, Done::Nak);
                Err(error)
            }
        }
    }

    async fn ack(&mut self, delivery: &Delivery) -> Result<(), TransportError> {
        match self.held.take() {
            Some(held)
                if held.service == delivery.event.service_id
                    && held.sequence == delivery.sequence =>
            {
                self.finish(held.source, Done::Acked);
                let Some(reply) = held.message.reply.clone() else {
                    return Err(TransportError::rejected(
                        "the delivery has no acknowledgement subject",
                        None,
                    ));
                };
                // A request: returns once the broker recorded the acknowledgement, and
                // fails (no responders) when no consumer leader took it.
                let acked = self
                    .client
                    .request(reply, bytes::Bytes::from_static(b"+ACK"))
                    .await;
                self.acked[held.source] =
                    acked.is_ok().then_some((held.delivered_as, held.sequence));
                acked.map(|_| ()).map_err(|error| {
                    TransportError::unavailable(
                        format!("acknowledging; the event may come again: {error}"),
                        Some(Box::new(error)),
                    )
                })
            }
            other => {
                self.held = other;
                Err(TransportError::unavailable(
                    format!(
                        "delivery {} of `{}` is no longer in flight to this handle; it will be \
                         delivered again",
                        delivery.sequence, delivery.event.service_id
                    ),
                    None,
                ))
            }
        }
    }
}

/// The trace context a message carries in its W3C `traceparent` / `tracestate`
/// headers: what OpenTelemetry's messaging conventions read, and what an intermediary
/// (a relay, a bridge) may have rewritten to put itself in the trace. `None` when
/// there is no `traceparent`; a malformed one is logged and ignored, and the
/// envelope's own copy (written with the event) stands.
fn header_trace_context(
    headers: Option<&async_nats::HeaderMap>,
    sequence: u64,
) -> Option<eventcore::TraceContext> {
    let headers = headers?;
    let traceparent = headers.get(crate::publisher::header::TRACEPARENT)?;
    let context = eventcore::TraceContext::new(traceparent.as_str()).and_then(|context| {
        match headers.get(crate::publisher::header::TRACESTATE) {
            Some(state) => context.with_tracestate(state.as_str()),
            None => Ok(context),
        }
    });
    match context {
        Ok(context) => Some(context),
        Err(error) => {
            tracing::warn!(
                sequence,
                %error,
                "ignoring the message's trace headers; the envelope's context stands"
            );
            None
        }
    }
}
