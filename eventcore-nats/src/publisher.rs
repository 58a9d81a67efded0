//! [`NatsPublisher`]: one service's publication as one JetStream stream, published in
//! chained, pipelined batches.

use std::collections::{HashSet, VecDeque};
use std::future::{Future, IntoFuture};
use std::task::Poll;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use async_trait::async_trait;
use eventcore::GlobalPosition;
use eventcore::distributed::{EventPublisher, Publication, ServiceId, Topic, TransportError};
use tracing::Instrument;

use crate::subject::Names;
use crate::{NatsConfig, Storage, api_error, rejected, unavailable};

/// The headers every message carries besides `Nats-Msg-Id` (the event id): the
/// envelope's identity, for tools and filters. The body is the whole envelope.
pub(crate) mod header {
    // Names built once: a name from a `&str` is validated and allocated per message.
    use async_nats::header::HeaderName;
    /// The event id travels as the server's own dedup id (`Nats-Msg-Id`), once.
    pub(crate) const EVENT_ID: HeaderName = async_nats::header::NATS_MESSAGE_ID;
    pub(crate) const EVENT_TYPE: HeaderName = HeaderName::from_static("Eventcore-Event-Type");
    pub(crate) const STREAM: HeaderName = HeaderName::from_static("Eventcore-Stream");
    pub(crate) const STREAM_VERSION: HeaderName =
        HeaderName::from_static("Eventcore-Stream-Version");
    pub(crate) const POSITION: HeaderName = HeaderName::from_static("Eventcore-Global-Position");
    pub(crate) const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
    pub(crate) const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
}

/// Where this handle last saw the publication end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct End {
    /// The stream's last sequence (0: empty).
    sequence: u64,
    /// The source position of the event stored there.
    position: Option<GlobalPosition>,
}

#[derive(Debug, Default)]
struct View {
    /// `None` until the handle asked the stream (on its first publish, or
    /// [`EventPublisher::last_published`]).
    end: Option<End>,
    /// Topics this handle has seen in its stream's subjects.
    topics: HashSet<Topic>,
}

/// The [`EventPublisher`] of one service on NATS JetStream (see the crate docs).
///
/// Like every chained publisher, a handle expects the stream to end where it last saw
/// it end: after another handle published, or after the broker lost messages, its next
/// publish is refused with [`TransportError::OutOfOrder`] until it asks
/// [`EventPublisher::last_published`]. Publishes on one handle are serialized.
#[derive(Debug)]
pub struct NatsPublisher {
    context: jetstream::Context,
    config: NatsConfig,
    names: Names,
    service: ServiceId,
    stream: String,
    view: tokio::sync::Mutex<View>,
}

impl NatsPublisher {
    pub(crate) fn new(context: jetstream::Context, config: NatsConfig, service: ServiceId) -> Self {
        let names = Names::new(config.prefix());
        let stream = names.stream(&service);
        NatsPublisher {
            context,
            config,
            names,
            service,
            stream,
            view: tokio::sync::Mutex::new(View::default()),
        }
    }

    /// The name of the JetStream stream of this publication.
    pub fn stream_name(&self) -> &str {
        &self.stream
    }

    /// The stream, or `None` when it does not exist yet.
    async fn get_stream(&self) -> Result<Option<stream::Stream>, TransportError> {
        match self.context.get_stream(&self.stream).await {
            Ok(stream) => Ok(Some(stream)),
            Err(error) => match error.kind() {
                jetstream::context::GetStreamErrorKind::JetStream(api)
                    if api.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
                {
                    Ok(None)
                }
                jetstream::context::GetStreamErrorKind::JetStream(api) => {
                    Err(api_error("reading the publication stream", &api))
                }
                jetstream::context::GetStreamErrorKind::Request => {
                    Err(unavailable("reading the publication stream", error))
                }
                _ => Err(rejected("reading the publication stream", error)),
            },
        }
    }

    /// The service whose stream captures `topic`'s subjects, if any.
    async fn owner_of(&self, topic: &Topic) -> Result<Option<ServiceId>, TransportError> {
        let probe = format!("{}.{topic}.x", self.config.prefix());
        match self.context.stream_by_subject(probe).await {
            Ok(name) => Ok(Some(self.names.service_of_stream(&name).ok_or_else(
                || {
                    TransportError::rejected(
                        format!(
                            "topic `{topic}`'s subjects are captured by stream `{name}`, which is \
                         not an EventCore publication under prefix `{}`",
                            self.config.prefix()
                        ),
                        None,
                    )
                },
            )?)),
            Err(error) => match error.kind() {
                jetstream::context::GetStreamByNameErrorKind::NotFound => Ok(None),
                _ => Err(unavailable("looking up the owner of a topic", error)),
            },
        }
    }

    fn stream_config(&self, subjects: Vec<String>) -> stream::Config {
        stream::Config {
            name: self.stream.clone(),
            subjects,
            retention: stream::RetentionPolicy::Limits,
            storage: match self.config.storage {
                Storage::File => stream::StorageType::File,
                Storage::Memory => stream::StorageType::Memory,
            },
            num_replicas: self.config.replicas,
            duplicate_window: self.config.duplicate_window,
            allow_direct: true,
            description: Some(format!(
                "EventCore: the publication of service `{}`",
                self.service
            )),
            ..Default::default()
        }
    }

    /// [`TransportError::TopicOwnedByAnother`] for the first of `topics` another
    /// service's stream captures.
    async fn refuse_foreign_topics(&self, topics: &[Topic]) -> Result<(), TransportError> {
        for topic in topics {
            if let Some(owner) = self.owner_of(topic).await?
                && owner != self.service
            {
                return Err(TransportError::TopicOwnedByAnother {
                    topic: topic.clone(),
                    owner,
                    service: self.service.clone(),
                });
            }
        }
        Ok(())
    }

    /// Creates the stream with `topics`' subjects, or adds the missing ones; refuses a
    /// topic another service's stream captures.
    async fn ensure_topics(&self, topics: &[Topic]) -> Result<(), TransportError> {
        self.refuse_foreign_topics(topics).await?;
        // Two instances may start at once: create, or update what the other created.
        for _ in 0..5 {
            let outcome = match self.get_stream().await? {
                None => {
                    let subjects = topics.iter().map(|t| self.names.topic_filter(t)).collect();
                    self.context
                        .create_stream(self.stream_config(subjects))
                        .await
                        .map(|_| ())
                        .map_err(|error| refusal("creating the publication stream", error))
                }
                Some(mut stream) => {
                    let info = stream
                        .info()
                        .await
                        .map_err(|e| unavailable("reading the publication stream", e))?;
                    let mut config = info.config.clone();
                    let missing: Vec<String> = topics
                        .iter()
                        .map(|t| self.names.topic_filter(t))
                        .filter(|s| !config.subjects.contains(s))
                        .collect();
                    if missing.is_empty() {
                        return Ok(());
                    }
                    config.subjects.extend(missing);
                    // Another instance may update at the same moment (last writer
                    // wins): look again until every subject is there.
                    self.context
                        .update_stream(config)
                        .await
                        .map(|_| ())
                        .map_err(|error| refusal("updating the publication stream", error))
                }
            };
            match outcome {
                Ok(()) => continue,
                Err(Err(error)) => return Err(error),
                // Created or changed meanwhile by another instance: look again.
                Err(Ok(api))
                    if matches!(
                        api.error_code(),
                        jetstream::ErrorCode::STREAM_NAME_EXIST
                            | jetstream::ErrorCode::STREAM_NOT_FOUND
                    ) =>
                {
                    continue;
                }
                Err(Ok(api))
                    if api.error_code() == jetstream::ErrorCode::STREAM_SUBJECT_OVERLAP =>
                {
                    self.refuse_foreign_topics(topics).await?;
                    // A stream that is not an EventCore publication captures it.
                    return Err(api_error(
                        &format!("declaring the publication stream `{}`", self.stream),
                        &api,
                    ));
                }
                Err(Ok(api)) => {
                    return Err(api_error(
                        &format!("declaring the publication stream `{}`", self.stream),
                        &api,
                    ));
                }
            }
        }
        Err(TransportError::unavailable(
            format!(
                "the publication stream `{}` kept changing while its topics were declared",
                self.stream
            ),
            None,
        ))
    }

    /// Where the stream ends now.
    async fn read_end(&self) -> Result<End, TransportError> {
        let Some(mut stream) = self.get_stream().await? else {
            return Ok(End {
                sequence: 0,
                position: None,
            });
        };
        let info = stream
            .info()
            .await
            .map_err(|e| unavailable("reading the publication stream", e))?;
        let sequence = info.state.last_sequence;
        if info.state.messages == 0 {
            return Ok(End {
                sequence,
                position: None,
            });
        }
        let message = stream
            .get_raw_message(sequence)
            .await
            .map_err(|e| unavailable("reading the last message of the publication", e))?;
        let position = message
            .headers
            .get(header::POSITION)
            .and_then(|value| value.as_str().parse::<u64>().ok())
            .ok_or_else(|| TransportError::Undecodable {
                service: self.service.clone(),
                sequence,
                message: format!("no valid `{}` header", header::POSITION),
            })?;
        Ok(End {
            sequence,
            position: Some(GlobalPosition::new(position)),
        })
    }

    /// Whether the stream holds `event`, at or before `end`: a binary search by source
    /// position (the publication is in position order), then the event id compared.
    async fn holds(
        &self,
        event: &eventcore::distributed::DistributedEvent,
        end: End,
    ) -> Result<bool, TransportError> {
        let Some(mut stream) = self.get_stream().await? else {
            return Ok(false);
        };
        let first = stream
            .info()
            .await
            .map_err(|e| unavailable("reading the publication stream", e))?
            .state
            .first_sequence;
        let wanted = event.global_position.value();
        let (mut low, mut high) = (first.max(1), end.sequence);
        while low <= high {
            let middle = low + (high - low) / 2;
            let message = stream
                .get_raw_message(middle)
                .await
                .map_err(|e| unavailable("reading the publication", e))?;
            let header = |name: async_nats::header::HeaderName| {
                message
                    .headers
                    .get(name)
                    .map(|value| value.as_str().to_owned())
            };
            let position = header(header::POSITION)
                .and_then(|value| value.parse::<u64>().ok())
                .ok_or_else(|| TransportError::Undecodable {
                    service: self.service.clone(),
                    sequence: middle,
                    message: format!("no valid `{}` header", header::POSITION),
                })?;
            match position.cmp(&wanted) {
                std::cmp::Ordering::Equal => {
                    return Ok(header(header::EVENT_ID) == Some(event.event_id.to_string()));
                }
                std::cmp::Ordering::Less => low = middle + 1,
                std::cmp::Ordering::Greater => high = middle - 1,
            }
        }
        Ok(false)
    }

    /// Checks that every topic of `batch` is captured by this service's stream.
    async fn check_topics(
        &self,
        view: &mut View,
        batch: &[Publication],
    ) -> Result<(), TransportError> {
        for publication in batch {
            if publication.event.service_id != self.service {
                return Err(TransportError::rejected(
                    format!(
                        "event {} was published by `{}`, not by `{}`",
                        publication.event.event_id, publication.event.service_id, self.service
                    ),
                    None,
                ));
            }
            if view.topics.contains(&publication.topic) {
                continue;
            }
            match self.owner_of(&publication.topic).await? {
                Some(owner) if owner == self.service => {
                    view.topics.insert(publication.topic.clone());
                }
                Some(owner) => {
                    return Err(TransportError::TopicOwnedByAnother {
                        topic: publication.topic.clone(),
                        owner,
                        service: self.service.clone(),
                    });
                }
                None => {
                    return Err(TransportError::unavailable(
                        format!(
                            "topic `{}` is not declared yet (the publisher declares its topics \
                             when it starts)",
                            publication.topic
                        ),
                        None,
                    ));
                }
            }
        }
        Ok(())
    }

    fn message(
        &self,
        publication: &Publication,
        expected_last: u64,
    ) -> Result<(String, jetstream::message::PublishMessage), TransportError> {
        let event = &publication.event;
        // Sized for the envelope at once: grown from serde_json's default, the body was
        // reallocated several times per event.
        let mut body = Vec::with_capacity(event.payload.len() + 768);
        serde_json::to_writer(&mut body, event)
            .map_err(|e| rejected("encoding the envelope", e))?;
        let mut headers = HeaderMap::new();
        // The id moved in, not copied again by `message_id`.
        headers.insert(
            header::EVENT_ID,
            async_nats::HeaderValue::from(event.event_id.to_string()),
        );
        headers.insert(header::EVENT_TYPE, event.event_type.as_str());
        headers.insert(header::STREAM, event.stream_id.as_str());
        headers.insert(
            header::STREAM_VERSION,
            async_nats::HeaderValue::from(event.stream_version.value()),
        );
        headers.insert(
            header::POSITION,
            async_nats::HeaderValue::from(event.global_position.value()),
        );
        if let Some(context) = &event.trace_context {
            headers.insert(header::TRACEPARENT, context.traceparent());
            if let Some(state) = context.tracestate() {
                headers.insert(header::TRACESTATE, state);
            }
        }
        let message = jetstream::message::PublishMessage::build()
            .headers(headers)
            .payload(body.into())
            .expected_stream(&self.stream)
            .expected_last_sequence(expected_last);
        Ok((
            self.names.subject(&publication.topic, &event.stream_id),
            message,
        ))
    }
}

/// A failed stream creation or update: `Ok` with the server's refusal to decide on
/// (a race with another instance, a subject overlap), `Err` when the broker could not
/// be asked.
fn refusal(
    what: &str,
    error: jetstream::context::CreateStreamError,
) -> Result<jetstream::Error, TransportError> {
    match error.kind() {
        jetstream::context::CreateStreamErrorKind::JetStream(api) => Ok(api.clone()),
        _ => Err(unavailable(what, error)),
    }
}

/// A publish waiting for its acknowledgement, with its event's position and index in
/// the batch.
type InFlight = (
    <jetstream::context::PublishAckFuture as IntoFuture>::IntoFuture,
    GlobalPosition,
    usize,
);

/// The answer to the oldest publish in flight (of a non-empty window).
fn oldest(
    in_flight: &mut VecDeque<InFlight>,
) -> impl Future<Output = (Acked, GlobalPosition, usize)> + '_ {
    std::future::poll_fn(move |cx| {
        let Some((ack, position, index)) = in_flight.front_mut() else {
            // Callers ask only when something is in flight.
            return Poll::Pending;
        };
        let outcome = match ack.as_mut().poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(ack)) if ack.duplicate => Acked::Duplicate,
            Poll::Ready(Ok(ack)) => Acked::Stored(ack.sequence),
            Poll::Ready(Err(error)) => publish_error(error),
        };
        let answer = (outcome, *position, *index);
        in_flight.pop_front();
        Poll::Ready(answer)
    })
}

/// Takes the oldest answer of a window: the stream's end moves to what it stored, or
/// the window halts (after which answers are awaited only; what they say is learnt by
/// asking the stream).
fn take_answer(
    (outcome, position, at): (Acked, GlobalPosition, usize),
    halt: &mut Option<Stop>,
    end: &mut End,
    view: &mut View,
    stream: &str,
) {
    if halt.is_some() {
        return;
    }
    match outcome {
        Acked::Stored(sequence) => {
            *end = End {
                sequence,
                position: Some(position),
            };
            view.end = Some(*end);
        }
        // Held already (the dedup window knew it) though after the last position
        // seen: the predictions after it are one too far.
        Acked::Duplicate => *halt = Some(Stop::Restart(at + 1)),
        Acked::WrongLastSequence => {
            *halt = Some(Stop::Failed(TransportError::OutOfOrder {
                message: format!(
                    "the publication stream `{stream}` does not end at sequence {} as this \
                     publisher last saw it (another publisher, or a broker that lost \
                     messages): ask where it ends and publish from there",
                    end.sequence
                ),
            }));
        }
        Acked::Failed(error) => *halt = Some(Stop::Failed(error)),
    }
}

/// Why a window stopped sending.
enum Stop {
    /// A publish failed or was refused.
    Failed(TransportError),
    /// A duplicate acknowledgement: go on from this index after reading the end.
    Restart(usize),
    /// The event at this index is not after the ones before it.
    OutOfOrder(usize),
}

/// What became of one pipelined publish.
enum Acked {
    Stored(u64),
    Duplicate,
    WrongLastSequence,
    Failed(TransportError),
}

fn publish_error(error: jetstream::context::PublishError) -> Acked {
    match error.kind() {
        PublishErrorKind::WrongLastSequence => Acked::WrongLastSequence,
        PublishErrorKind::StreamNotFound => Acked::Failed(TransportError::unavailable(
            format!("no stream captures the subject: {error}"),
            Some(Box::new(error)),
        )),
        PublishErrorKind::MaxPayloadExceeded => Acked::Failed(rejected(
            "the event is larger than the server accepts",
            error,
        )),
        PublishErrorKind::Other => {
            let api = std::error::Error::source(&error)
                .and_then(|source| source.downcast_ref::<jetstream::Error>())
                .cloned();
            Acked::Failed(match api {
                Some(api) => crate::api_error("JetStream refused a publish", &api),
                None => unavailable("publishing", error),
            })
        }
        _ => Acked::Failed(unavailable("publishing", error)),
    }
}

#[async_trait]
impl EventPublisher for NatsPublisher {
    fn service(&self) -> &ServiceId {
        &self.service
    }

    async fn declare_topics(&self, topics: &[Topic]) -> Result<(), TransportError> {
        let span = tracing::info_span!("eventcore.nats.declare_topics", service = %self.service, stream = %self.stream);
        async {
            self.ensure_topics(topics).await?;
            self.view.lock().await.topics.extend(topics.iter().cloned());
            Ok(())
        }
        .instrument(span)
        .await
    }

    async fn publish(&self, batch: &[Publication]) -> Result<(), TransportError> {
        let mut view = self.view.lock().await;
        self.check_topics(&mut view, batch).await?;
        let mut end = match view.end {
            Some(end) => end,
            None => {
                let end = self.read_end().await?;
                view.end = Some(end);
                end
            }
        };
        // The view follows the last message the stream confirmed, answer by answer, on
        // every exit (a cancelled call included). Where the stream has moved past it
        // (an answer lost, a timeout on a stored message) or lost what it confirmed,
        // the next publish's expectation is refused, so the handle never silently
        // resynchronises: the caller asks where the stream ends (`last_published`).
        let mut next = 0;
        while next < batch.len() {
            // A sliding window: up to `publish_window` publishes in flight, their
            // acknowledgements taken in order as they come, each awaited. Sequences
            // are predicted: a new event is stored right after the previous one, and
            // each publish expects it, so after a lost or refused one every later one
            // is refused too: the stream never holds a gap or a reordering.
            let mut in_flight =
                VecDeque::with_capacity(self.config.publish_window.min(batch.len() - next));
            let mut predicted = end;
            // Why sending stopped early: the answers to what was sent still count.
            let mut unsent = None;
            // Why the answers stopped counting: the ones after it are awaited only.
            let mut halt = None;
            let mut index = next;
            while index < batch.len() || !in_flight.is_empty() {
                let sending = unsent.is_none() && halt.is_none() && index < batch.len();
                if sending && in_flight.len() < self.config.publish_window {
                    let publication = &batch[index];
                    let position = publication.event.global_position;
                    if predicted.position.is_some_and(|last| position <= last) {
                        // An event at or below the last position held can only be a
                        // repeat: JetStream checks expectations before its dedup
                        // window, so it is not sent but looked up (the publication is
                        // ordered by position), and refused unless the stream holds it.
                        if predicted != end || !in_flight.is_empty() {
                            unsent = Some(Stop::OutOfOrder(index));
                            continue;
                        }
                        if !self.holds(&publication.event, end).await? {
                            return Err(TransportError::OutOfOrder {
                                message: format!(
                                    "event {} at position {position} comes at or before \
                                     position {} already held, and the publication does not \
                                     hold it",
                                    publication.event.event_id,
                                    end.position.map_or(0, GlobalPosition::value)
                                ),
                            });
                        }
                        index += 1;
                        continue;
                    }
                    let (subject, message) = match self.message(publication, predicted.sequence) {
                        Ok(built) => built,
                        Err(error) => {
                            unsent = Some(Stop::Failed(error));
                            continue;
                        }
                    };
                    // Answers are taken while waiting to send: the context's publishes
                    // in flight are bounded (shared by every publisher on the client),
                    // and an answer not taken keeps its place.
                    let sent = {
                        let mut sending =
                            std::pin::pin!(self.context.send_publish(subject, message));
                        loop {
                            if halt.is_some() {
                                // Not sent (waiting for a place and sending to the
                                // connection task are both cancel-safe): its answer
                                // would not count.
                                break None;
                            }
                            tokio::select! {
                                biased;
                                sent = &mut sending => break Some(sent),
                                answer = oldest(&mut in_flight), if !in_flight.is_empty() => {
                                    take_answer(answer, &mut halt, &mut end, &mut view, &self.stream);
                                }
                            }
                        }
                    };
                    let Some(sent) = sent else {
                        continue;
                    };
                    match sent {
                        Ok(ack) => {
                            // Answers come in the order of the publishes: only the oldest
                            // is polled (its timeout runs from then), the others wait
                            // their turn with their answers kept by the connection.
                            in_flight.push_back((ack.into_future(), position, index));
                        }
                        Err(error) => {
                            unsent = Some(Stop::Failed(match publish_error(error) {
                                Acked::Failed(error) => error,
                                _ => TransportError::unavailable("publishing failed", None),
                            }));
                            continue;
                        }
                    }
                    predicted = End {
                        sequence: predicted.sequence + 1,
                        position: Some(position),
                    };
                    index += 1;
                    continue;
                }
                if in_flight.is_empty() {
                    break;
                }
                if halt.is_some() {
                    // The rest are awaited all the same, at once (on a dead connection
                    // two timeouts in all, the oldest's then the others' together, not
                    // one each); what they say is learnt by asking the stream.
                    futures::future::join_all(in_flight.drain(..).map(|(ack, _, _)| ack)).await;
                    break;
                }
                // The window is full, or nothing more is to be sent: the oldest answer.
                let answer = oldest(&mut in_flight).await;
                take_answer(answer, &mut halt, &mut end, &mut view, &self.stream);
            }
            match halt.or(unsent) {
                None => next = batch.len(),
                Some(Stop::Restart(at)) => {
                    end = self.read_end().await?;
                    view.end = Some(end);
                    next = at;
                }
                Some(Stop::Failed(error)) => return Err(error),
                Some(Stop::OutOfOrder(at)) => {
                    return Err(TransportError::OutOfOrder {
                        message: format!(
                            "event {} does not come after the events before it in the batch",
                            batch[at].event.event_id
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    async fn last_published(&self) -> Result<Option<GlobalPosition>, TransportError> {
        let mut view = self.view.lock().await;
        let end = self.read_end().await?;
        view.end = Some(end);
        Ok(end.position)
    }
}
