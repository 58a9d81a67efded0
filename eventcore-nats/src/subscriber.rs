//! [`NatsSubscriber`]: durable subscriptions as pull consumers with one message in
//! flight.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer};
use async_trait::async_trait;
use eventcore::distributed::{
    Delivery, DistributedEvent, EventSubscriber, ServiceId, Subscription, SubscriptionSpec, Topic,
    TransportError,
};
use futures::StreamExt;
use futures::stream::FuturesUnordered;

use crate::subject::Names;
use crate::{NatsConfig, unavailable};

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
        let probe = format!("{}.{topic}.x", self.config.prefix());
        match self.context.stream_by_subject(probe).await {
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

    fn consumer_config(&self, name: &str, filters: Vec<String>) -> consumer::pull::Config {
        consumer::pull::Config {
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
                    if existing != filters {
                        return Err(TransportError::rejected(
                            format!(
                                "subscription `{}` of `{}` exists with other topics",
                                spec.name, spec.service
                            ),
                            None,
                        ));
                    }
                    return stream.get_consumer(name).await.map_err(|error| {
                        TransportError::unavailable(
                            format!("opening a subscription: {error}"),
                            Some(error),
                        )
                    });
                }
                Err(error) => match error.kind() {
                    jetstream::context::ConsumerInfoErrorKind::NotFound => {
                        // Another instance may create it at the same moment: an
                        // identical creation succeeds, and a failed one looks again.
                        if stream
                            .create_consumer(self.consumer_config(name, filters.clone()))
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
                .push(self.names.topic_filter(topic));
        }
        let name = self.names.consumer(&spec.service, &spec.name);
        let mut consumers = Vec::with_capacity(by_stream.len());
        for (stream, (service, mut filters)) in by_stream {
            filters.sort();
            let consumer = self.ensure_consumer(&stream, &name, filters, spec).await?;
            consumers.push(Source { service, consumer });
        }
        let pulling = vec![false; consumers.len()];
        Ok(Box::new(NatsSubscription {
            consumers,
            pulls: FuturesUnordered::new(),
            pulling,
            held: None,
            names: self.names.clone(),
            expiry: self.config.pull_expiry,
        }))
    }
}

/// One publishing stream a subscription reads.
struct Source {
    service: ServiceId,
    consumer: consumer::PullConsumer,
}

/// The delivery this handle holds, not yet acknowledged.
struct Held {
    service: ServiceId,
    sequence: u64,
    message: jetstream::Message,
}

/// A pull request for one message of source `.0`, waiting at the broker.
type Pull = Pin<
    Box<dyn Future<Output = (usize, Result<Option<jetstream::Message>, TransportError>)> + Send>,
>;

/// An open handle on a durable subscription.
struct NatsSubscription {
    consumers: Vec<Source>,
    /// The pull requests at the broker, at most one per source. They outlive a call to
    /// `next` (a request nobody listens to would hold its message until the
    /// acknowledgement wait), so a message of another source can wait here while one is
    /// held.
    pulls: FuturesUnordered<Pull>,
    pulling: Vec<bool>,
    held: Option<Held>,
    names: Names,
    expiry: Duration,
}

impl std::fmt::Debug for NatsSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSubscription")
            .field("sources", &self.consumers.len())
            .field("holding", &self.held.as_ref().map(|h| h.sequence))
            .finish_non_exhaustive()
    }
}

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
    match batch.next().await {
        None => Ok(None),
        Some(Ok(message)) => Ok(Some(message)),
        Some(Err(error)) => Err(TransportError::unavailable(
            format!("receiving the next event: {error}"),
            Some(error),
        )),
    }
}

impl NatsSubscription {
    fn pull(&self, index: usize) -> Pull {
        let consumer = self.consumers[index].consumer.clone();
        let expiry = self.expiry;
        Box::pin(async move { (index, pull_one(&consumer, expiry).await) })
    }

    /// Hands the held delivery back to the broker, for this handle or another.
    async fn release(&mut self) -> Result<(), TransportError> {
        if let Some(held) = self.held.take() {
            held.message
                .ack_with(AckKind::Nak(None))
                .await
                .map_err(|error| {
                    TransportError::unavailable(
                        format!("handing back an unacknowledged event: {error}"),
                        Some(error),
                    )
                })?;
        }
        Ok(())
    }

    fn delivery(
        &self,
        service: &ServiceId,
        message: &jetstream::Message,
    ) -> Result<(Delivery, u64), TransportError> {
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
        let event: DistributedEvent = serde_json::from_slice(&message.payload)
            .map_err(|e| undecodable(format!("the body is not an envelope: {e}")))?;
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
        Ok((Delivery::new(event, topic, sequence, attempt), sequence))
    }
}

#[async_trait]
impl Subscription for NatsSubscription {
    async fn next(&mut self) -> Result<Delivery, TransportError> {
        self.release().await?;
        for index in 0..self.consumers.len() {
            if !self.pulling[index] {
                let pull = self.pull(index);
                self.pulls.push(pull);
                self.pulling[index] = true;
            }
        }
        let (index, message) = loop {
            let Some((index, pulled)) = self.pulls.next().await else {
                return Err(TransportError::unavailable(
                    "the subscription has no source",
                    None,
                ));
            };
            self.pulling[index] = false;
            match pulled? {
                Some(message) => break (index, message),
                // The request expired empty: ask again.
                None => {
                    let pull = self.pull(index);
                    self.pulls.push(pull);
                    self.pulling[index] = true;
                }
            }
        };
        let service = self.consumers[index].service.clone();
        match self.delivery(&service, &message) {
            Ok((delivery, sequence)) => {
                self.held = Some(Held {
                    service,
                    sequence,
                    message,
                });
                Ok(delivery)
            }
            Err(error) => {
                // Not skipped: handed back, and the subscription stops at it.
                let _ = message.ack_with(AckKind::Nak(None)).await;
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
                // Double: returns once the broker recorded the acknowledgement.
                held.message.double_ack().await.map_err(|error| {
                    TransportError::unavailable(
                        format!("acknowledging; the event may come again: {error}"),
                        Some(error),
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

impl Drop for NatsSubscription {
    /// A dropped handle hands its delivery back at once, rather than after the
    /// acknowledgement wait (a crashed process's delivery waits for it).
    fn drop(&mut self) {
        if let Some(held) = self.held.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                if let Err(error) = held.message.ack_with(AckKind::Nak(None)).await {
                    tracing::debug!(%error, "could not hand back an unacknowledged event; it comes again after the acknowledgement wait");
                }
            });
        }
    }
}
