//! The subscription runner on the transport: every effect once and in source-stream
//! order, across redeliveries, parked events, crashed handlers, two instances and a
//! broker that lost events.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::{TransportHarness, service, topic};
use crate::EventStore;
use crate::command::{CommandLogic, CommandStreams, ReadStreams, StreamResolver, StreamWrite};
use crate::distributed::{
    DistributedEvent, EventHandler, EventPublisher, Processed, Publication, SubscriptionName,
    SubscriptionRunner, SubscriptionSpec,
};
use crate::error::{CommandResult, Error, Result};
use crate::event::{Event, EventPayload, RecordedEvent, StoredEvent};
use crate::executor::CommandExecutor;
use crate::metadata::EventMetadata;
use crate::names::{EventType, StreamId};
use crate::process::Dispatcher;
use crate::projection::{OnFailure, ProjectionErrorPolicy};
use crate::store::LogQuery;
use crate::types::{CorrelationId, EventId, GlobalPosition, StreamVersion};

/// The effect's event: one per source event, on `applied/<service>/<source stream>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Applied {
    version: u64,
    event_id: EventId,
}

impl Event for Applied {
    fn event_type(&self) -> &str {
        "Applied"
    }
}

/// The effect: appends [`Applied`] for the source event at `version`, and refuses
/// anything but the next version of its source stream, so an effect out of order or
/// repeated fails the handler (and shows as a parked event).
struct Apply {
    target: StreamId,
    version: u64,
    event_id: EventId,
}

struct ApplyStreams;

impl CommandStreams for Apply {
    type StreamSet = ApplyStreams;

    fn read_streams(&self) -> Vec<StreamId> {
        vec![self.target.clone()]
    }
}

impl CommandLogic for Apply {
    type State = u64;
    type Event = Applied;

    fn apply(&self, count: &mut u64, _: &StoredEvent<Applied>) {
        *count += 1;
    }

    fn handle(
        &self,
        read: ReadStreams<ApplyStreams>,
        count: u64,
        _: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<ApplyStreams, Applied>>> {
        if count + 1 != self.version {
            return Err(Error::BusinessRuleViolation(format!(
                "{}: version {} applied after {count} events",
                self.target, self.version
            )));
        }
        Ok(vec![StreamWrite::new(
            &read,
            self.target.clone(),
            Applied {
                version: self.version,
                event_id: self.event_id,
            },
        )?])
    }
}

/// Executes [`Apply`] for each event; fails for the streams in `failing` and dies (a
/// panic, as a process that crashes) on `dies_on`.
#[derive(Debug, Clone, Default)]
struct Applier {
    failing: Arc<Mutex<HashSet<String>>>,
    dies_on: Option<String>,
    /// The source streams of the events handed to it.
    seen: Arc<Mutex<HashSet<StreamId>>>,
}

impl EventHandler for Applier {
    async fn handle(
        &mut self,
        event: &DistributedEvent,
        dispatcher: &mut Dispatcher<'_>,
    ) -> Result<()> {
        let stream = event.stream_id.as_str();
        self.seen.lock().insert(event.stream_id.clone());
        assert!(
            self.dies_on.as_deref() != Some(stream),
            "the handler dies on `{stream}`"
        );
        if self.failing.lock().contains(stream) {
            return Err(Error::rejected(format!("cannot handle {stream}")));
        }
        dispatcher
            .dispatch(&Apply {
                target: StreamId::try_new(format!("applied/{}/{stream}", event.service_id))?,
                version: event.stream_version.value(),
                event_id: event.event_id,
            })
            .await?;
        Ok(())
    }
}

fn spec() -> SubscriptionSpec {
    SubscriptionSpec::new(
        service("consumer"),
        SubscriptionName::try_new("things").expect("valid"),
        [topic("things")],
    )
}

fn quick_retries() -> ProjectionErrorPolicy {
    ProjectionErrorPolicy::new()
        .with_max_attempts(2)
        .with_initial_delay(std::time::Duration::ZERO)
        .with_max_delay(std::time::Duration::ZERO)
        .with_on_failure(OnFailure::Park)
}

/// Envelopes of `publisher`'s events (source stream, version), at positions
/// `first_position`, `first_position + 1`, ...
fn envelopes(
    publisher: &dyn EventPublisher,
    events: &[(&str, u64)],
    first_position: u64,
) -> Vec<DistributedEvent> {
    events
        .iter()
        .zip(first_position..)
        .map(|((stream, version), position)| {
            let recorded = RecordedEvent::new(
                EventId::new(),
                StreamId::try_new(*stream).expect("valid"),
                StreamVersion::new(*version),
                GlobalPosition::new(position),
                EventType::try_new("Happened").expect("valid"),
                EventPayload::from_json("{}").expect("valid"),
                Arc::new(EventMetadata::new(CorrelationId::new())),
                chrono::Utc::now(),
            );
            DistributedEvent::from_recorded(&recorded, publisher.service(), chrono::Utc::now())
                .expect("readable")
        })
        .collect()
}

async fn publish(publisher: &dyn EventPublisher, events: &[DistributedEvent]) {
    let batch: Vec<Publication> = events
        .iter()
        .map(|e| Publication::new(topic("things"), e.clone()))
        .collect();
    publisher.publish(&batch).await.expect("publishes");
}

/// A producer with the test topic declared.
async fn producer(harness: &impl TransportHarness) -> Arc<dyn EventPublisher> {
    let producer = harness.publisher(&service("producer")).await;
    producer
        .declare_topics(&[topic("things")])
        .await
        .expect("declares");
    producer
}

/// The versions applied per `applied/...` stream, in the order applied.
async fn applied(store: &impl EventStore) -> BTreeMap<String, Vec<u64>> {
    let mut applied: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for recorded in store
        .read_all(&LogQuery::new().with_stream_prefix("applied/"))
        .await
        .expect("reads")
    {
        let event = recorded.decode::<Applied>().expect("decodes").payload;
        applied
            .entry(recorded.stream_id.as_str().to_owned())
            .or_default()
            .push(event.version);
    }
    applied
}

/// `applied/producer/<stream>` → `1..=n` for each (stream, n).
fn each_once(streams: &[(&str, u64)]) -> BTreeMap<String, Vec<u64>> {
    streams
        .iter()
        .map(|(stream, n)| (format!("applied/producer/{stream}"), (1..=*n).collect()))
        .collect()
}

fn runner<S: EventStore + Clone>(
    harness_subscriber: Arc<dyn crate::distributed::EventSubscriber>,
    store: &S,
    handler: Applier,
) -> SubscriptionRunner<Applier> {
    SubscriptionRunner::new(
        harness_subscriber,
        spec(),
        handler,
        CommandExecutor::new(store.clone()),
    )
    .expect("valid")
    .with_error_policy(quick_retries())
}

/// A delivery whose effect happened but whose acknowledgement did not (a crash between
/// the two) comes again, and handling it again writes nothing.
pub async fn a_redelivered_event_changes_nothing(harness: impl TransportHarness) {
    let producer = producer(&harness).await;
    let sent = envelopes(
        &*producer,
        &[("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 3)],
        1,
    );
    publish(&*producer, &sent).await;
    let store = harness.store().await;
    let subscriber = harness.subscriber().await;
    let mut runner = runner(subscriber.clone(), &store, Applier::default());
    let mut subscription = subscriber.subscribe(&spec()).await.expect("subscribes");
    for (n, expected) in sent.iter().enumerate() {
        let delivery = subscription.next().await.expect("delivers");
        assert_eq!(delivery.event.event_id, expected.event_id);
        assert_eq!(
            runner.process(&delivery).await.expect("processes"),
            Processed::Handled
        );
        if n % 2 == 0 {
            // The process dies before it acknowledges.
            drop(subscription);
            subscription = subscriber.subscribe(&spec()).await.expect("subscribes");
            let again = subscription.next().await.expect("delivers again");
            assert_eq!(again.event.event_id, expected.event_id);
            assert!(again.attempt >= 2, "{}", again.attempt);
            assert_eq!(
                runner.process(&again).await.expect("processes"),
                Processed::Handled
            );
            subscription.ack(&again).await.expect("acknowledges");
        } else {
            subscription.ack(&delivery).await.expect("acknowledges");
        }
    }
    assert_eq!(applied(&store).await, each_once(&[("a", 3), ("b", 2)]));
    assert!(runner.parked().await.expect("reads").is_empty());
}

/// A handler that keeps failing on an event: it is parked in the subscriber's store,
/// later events of its source stream are held behind it while other streams flow, and
/// re-driving after the fix handles them in order, once.
pub async fn a_failing_event_is_parked_and_holds_its_stream_while_others_flow_until_redriven(
    harness: impl TransportHarness,
) {
    let producer = producer(&harness).await;
    let sent = envelopes(
        &*producer,
        &[("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 3)],
        1,
    );
    publish(&*producer, &sent).await;
    let store = harness.store().await;
    let subscriber = harness.subscriber().await;
    let applier = Applier::default();
    applier.failing.lock().insert("a".to_owned());
    let mut runner = runner(subscriber.clone(), &store, applier.clone());
    let mut subscription = subscriber.subscribe(&spec()).await.expect("subscribes");
    let mut outcomes = Vec::new();
    for _ in &sent {
        let delivery = subscription.next().await.expect("delivers");
        outcomes.push(runner.process(&delivery).await.expect("processes"));
        subscription.ack(&delivery).await.expect("acknowledges");
    }
    assert_eq!(
        outcomes,
        [
            Processed::Parked,
            Processed::Handled,
            Processed::Held,
            Processed::Handled,
            Processed::Held
        ]
    );
    assert_eq!(
        applied(&store).await,
        each_once(&[("b", 2)]),
        "the other stream flowed"
    );
    let parked = runner.parked().await.expect("reads");
    let listed: Vec<(u64, bool)> = parked
        .iter()
        .map(|p| (p.event.stream_version.value(), p.error.is_some()))
        .collect();
    assert_eq!(listed, [(1, true), (2, false), (3, false)]);
    assert!(
        parked[0]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("cannot handle a")),
        "{parked:?}"
    );
    let stream = StreamId::try_new("a").expect("valid");
    assert!(matches!(
        runner.redrive(&service("producer"), &stream).await,
        Err(Error::ProjectionFailed { .. })
    ));
    assert_eq!(runner.parked().await.expect("reads").len(), 3, "kept");
    applier.failing.lock().clear();
    assert_eq!(
        runner
            .redrive(&service("producer"), &stream)
            .await
            .expect("redrives"),
        3
    );
    assert!(runner.parked().await.expect("reads").is_empty());
    publish(&*producer, &envelopes(&*producer, &[("a", 4)], 6)).await;
    let delivery = subscription.next().await.expect("delivers");
    assert_eq!(
        runner.process(&delivery).await.expect("processes"),
        Processed::Handled
    );
    subscription.ack(&delivery).await.expect("acknowledges");
    assert_eq!(applied(&store).await, each_once(&[("a", 4), ("b", 2)]));
}

/// A runner that read the inbox before a re-drive released a stream, and recorded its
/// hold after (a live runner racing a re-drive): the held event has nothing parked in
/// front of it, and its delivery was acknowledged. The stream's next event handles it
/// first, in order, and nothing stays held.
pub async fn an_event_held_after_its_stream_was_released_is_handled_before_the_next(
    harness: impl TransportHarness,
) {
    let producer = producer(&harness).await;
    let sent = envelopes(&*producer, &[("a", 1), ("a", 2), ("a", 3)], 1);
    publish(&*producer, &sent).await;
    let store = harness.store().await;
    let subscriber = harness.subscriber().await;
    let applier = Applier::default();
    applier.failing.lock().insert("a".to_owned());
    let mut runner = runner(subscriber.clone(), &store, applier.clone());
    let mut subscription = subscriber.subscribe(&spec()).await.expect("subscribes");
    for expected in [Processed::Parked, Processed::Held] {
        let delivery = subscription.next().await.expect("delivers");
        assert_eq!(
            runner.process(&delivery).await.expect("processes"),
            expected
        );
        subscription.ack(&delivery).await.expect("acknowledges");
    }
    applier.failing.lock().clear();
    let stream = StreamId::try_new("a").expect("valid");
    assert_eq!(
        runner
            .redrive(&service("producer"), &stream)
            .await
            .expect("redrives"),
        2
    );
    // The late hold of `a` 3, by a runner that still saw the stream parked; its
    // delivery is acknowledged, so the broker never brings it again.
    let mut late = self::runner(subscriber.clone(), &store, Applier::default());
    let delivery = subscription.next().await.expect("delivers");
    assert_eq!(delivery.event.event_id, sent[2].event_id);
    late.record_hold(&delivery.event).await.expect("holds");
    subscription.ack(&delivery).await.expect("acknowledges");
    assert_eq!(applied(&store).await, each_once(&[("a", 2)]));

    // The stream's next event comes to the same runner (the handle that acknowledged
    // the last one).
    publish(&*producer, &envelopes(&*producer, &[("a", 4)], 4)).await;
    let delivery = subscription.next().await.expect("delivers");
    assert_eq!(
        late.process(&delivery).await.expect("processes"),
        Processed::Handled,
        "nothing parks the stream any more"
    );
    subscription.ack(&delivery).await.expect("acknowledges");
    assert_eq!(
        applied(&store).await,
        each_once(&[("a", 4)]),
        "the held event first, then the next, each once"
    );
    assert!(runner.parked().await.expect("reads").is_empty());
}

/// An event left held (as above) whose stream's next delivery has passed the delivery
/// limit (the process died each time, perhaps on the held event): no handler runs
/// again; the held event is parked and the delivery kept behind it.
pub async fn an_event_left_held_is_parked_unhandled_past_the_delivery_limit(
    harness: impl TransportHarness,
) {
    let producer = producer(&harness).await;
    let sent = envelopes(&*producer, &[("a", 1), ("a", 2)], 1);
    publish(&*producer, &sent).await;
    let store = harness.store().await;
    let subscriber = harness.subscriber().await;
    let applier = Applier::default();
    applier.failing.lock().insert("a".to_owned());
    let mut runner = runner(subscriber.clone(), &store, applier.clone());
    let mut subscription = subscriber.subscribe(&spec()).await.expect("subscribes");
    let delivery = subscription.next().await.expect("delivers");
    assert_eq!(
        runner.process(&delivery).await.expect("processes"),
        Processed::Parked
    );
    subscription.ack(&delivery).await.expect("acknowledges");
    applier.failing.lock().clear();
    let stream = StreamId::try_new("a").expect("valid");
    runner
        .redrive(&service("producer"), &stream)
        .await
        .expect("redrives");
    // `a` 2 is held by a runner with a stale view, and acknowledged.
    let delivery = subscription.next().await.expect("delivers");
    let mut late = self::runner(subscriber.clone(), &store, Applier::default());
    late.record_hold(&delivery.event).await.expect("holds");
    subscription.ack(&delivery).await.expect("acknowledges");

    // `a` 3 comes a second time to a runner allowing one delivery, whose handler would
    // die on `a`.
    publish(&*producer, &envelopes(&*producer, &[("a", 3)], 3)).await;
    let first = subscription.next().await.expect("delivers");
    let again = subscription.next().await.expect("delivers again");
    assert_eq!(first.event.event_id, again.event.event_id);
    assert!(again.attempt >= 2, "{}", again.attempt);
    let dying = Applier {
        dies_on: Some("a".to_owned()),
        ..Applier::default()
    };
    let mut limited = self::runner(subscriber.clone(), &store, dying).with_max_deliveries(1);
    assert_eq!(
        limited.process(&again).await.expect("processes"),
        Processed::Held
    );
    subscription.ack(&again).await.expect("acknowledges");
    let parked = limited.parked().await.expect("reads");
    let listed: Vec<(u64, bool)> = parked
        .iter()
        .map(|p| (p.event.stream_version.value(), p.error.is_some()))
        .collect();
    assert_eq!(listed, [(2, true), (3, false)], "{parked:?}");
    assert!(
        parked[0]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("delivered")),
        "{parked:?}"
    );
    assert_eq!(applied(&store).await, each_once(&[("a", 1)]));
}

/// The same race, the other way round: the runner processing the next event of a
/// parked stream reads its inbox (parked), a re-drive then releases the stream and
/// reads for the last time, and only then is the hold written. The runner finds the
/// stream released once its hold is written, and handles what waits itself.
pub async fn a_hold_that_finds_its_stream_released_handles_it_at_once(
    harness: impl TransportHarness,
) {
    let producer = producer(&harness).await;
    let sent = envelopes(&*producer, &[("a", 1), ("a", 2)], 1);
    publish(&*producer, &sent).await;
    let store = harness.store().await;
    let subscriber = harness.subscriber().await;
    let applier = Applier::default();
    applier.failing.lock().insert("a".to_owned());
    let gate = Arc::new(Mutex::new(None));
    let gated = PausedAfterRead {
        inner: store.clone(),
        gate: gate.clone(),
    };
    let mut runner = SubscriptionRunner::new(
        subscriber.clone(),
        spec(),
        applier.clone(),
        CommandExecutor::new(gated),
    )
    .expect("valid")
    .with_error_policy(quick_retries());
    let mut subscription = subscriber.subscribe(&spec()).await.expect("subscribes");
    let delivery = subscription.next().await.expect("delivers");
    assert_eq!(
        runner.process(&delivery).await.expect("processes"),
        Processed::Parked
    );
    subscription.ack(&delivery).await.expect("acknowledges");
    applier.failing.lock().clear();

    // The runner's next read of its inbox (`a` parked) pauses before it goes on.
    let (reached, reaching) = tokio::sync::oneshot::channel();
    let (go, going) = tokio::sync::oneshot::channel();
    *gate.lock() = Some((reached, going));
    let delivery = subscription.next().await.expect("delivers");
    assert_eq!(delivery.event.event_id, sent[1].event_id);
    let processing = tokio::spawn(async move {
        let processed = runner.process(&delivery).await;
        (runner, delivery, processed)
    });
    reaching.await.expect("the runner reads its inbox");
    let mut other = self::runner(subscriber.clone(), &store, applier.clone());
    let stream = StreamId::try_new("a").expect("valid");
    assert_eq!(
        other
            .redrive(&service("producer"), &stream)
            .await
            .expect("redrives"),
        1
    );
    go.send(()).expect("the runner waits");
    let (mut runner, delivery, processed) = processing.await.expect("joins");
    assert_eq!(
        processed.expect("processes"),
        Processed::Handled,
        "the stream was released before the hold was written"
    );
    subscription.ack(&delivery).await.expect("acknowledges");
    assert_eq!(applied(&store).await, each_once(&[("a", 2)]));
    assert!(runner.parked().await.expect("reads").is_empty());
}

/// A store whose next [`EventStore::read_streams_after`], once armed, reads and then
/// says so and waits before it answers: the read's view is then stale while others go
/// on.
struct PausedAfterRead<S> {
    inner: S,
    #[allow(clippy::type_complexity)]
    gate: Arc<
        Mutex<
            Option<(
                tokio::sync::oneshot::Sender<()>,
                tokio::sync::oneshot::Receiver<()>,
            )>,
        >,
    >,
}

#[async_trait::async_trait]
impl<S: EventStore> EventStore for PausedAfterRead<S> {
    async fn read_streams(&self, streams: &[StreamId]) -> Result<crate::StreamsSnapshot> {
        self.inner.read_streams(streams).await
    }

    async fn read_streams_after(
        &self,
        streams: &[(StreamId, StreamVersion)],
    ) -> Result<crate::StreamsSnapshot> {
        let read = self.inner.read_streams_after(streams).await;
        let armed = self.gate.lock().take();
        if let Some((reached, go)) = armed {
            let _ = reached.send(());
            let _ = go.await;
        }
        read
    }

    async fn append(&self, request: crate::AppendRequest) -> Result<crate::AppendOutcome> {
        self.inner.append(request).await
    }

    async fn read_all(&self, query: &LogQuery) -> Result<Vec<RecordedEvent>> {
        self.inner.read_all(query).await
    }

    async fn read_log(&self, query: &LogQuery) -> Result<crate::LogRead> {
        self.inner.read_log(query).await
    }

    async fn head_position(&self) -> Result<Option<GlobalPosition>> {
        self.inner.head_position().await
    }

    async fn wait_for_events(&self, after: Option<GlobalPosition>) -> Result<()> {
        self.inner.wait_for_events(after).await
    }

    async fn idempotent_outcome(
        &self,
        key: &crate::IdempotencyKey,
    ) -> Result<Option<crate::AppendOutcome>> {
        self.inner.idempotent_outcome(key).await
    }
}

/// Two instances of a service: one parks an event of stream `a`, and the other, whose
/// previous delivery it acknowledged itself, must still hold the next event of `a`
/// behind it (it learns of the park from the store, since another handle was delivered
/// an event in between).
pub async fn an_event_parked_by_one_instance_holds_its_stream_on_the_other(
    harness: impl TransportHarness,
) {
    let producer = producer(&harness).await;
    let sent = envelopes(&*producer, &[("b", 1), ("a", 1), ("a", 2), ("b", 2)], 1);
    publish(&*producer, &sent).await;
    let store = harness.store().await;
    let subscriber = harness.subscriber().await;
    let failing = Applier::default();
    failing.failing.lock().insert("a".to_owned());
    let mut parking = runner(subscriber.clone(), &store, failing);
    let mut other = runner(subscriber.clone(), &store, Applier::default());
    let mut parking_handle = subscriber.subscribe(&spec()).await.expect("subscribes");
    let mut other_handle = subscriber.subscribe(&spec()).await.expect("subscribes");
    let step = async |runner: &mut SubscriptionRunner<Applier>,
                      handle: &mut Box<dyn crate::distributed::Subscription>| {
        let delivery = handle.next().await.expect("delivers");
        let processed = runner.process(&delivery).await.expect("processes");
        handle.ack(&delivery).await.expect("acknowledges");
        (delivery.event.event_id, processed)
    };
    assert_eq!(
        step(&mut other, &mut other_handle).await,
        (sent[0].event_id, Processed::Handled)
    );
    assert_eq!(
        step(&mut parking, &mut parking_handle).await,
        (sent[1].event_id, Processed::Parked)
    );
    assert_eq!(
        step(&mut other, &mut other_handle).await,
        (sent[2].event_id, Processed::Held),
        "the other instance handled a's next event past the parked one"
    );
    assert_eq!(
        step(&mut other, &mut other_handle).await,
        (sent[3].event_id, Processed::Handled)
    );
    assert_eq!(applied(&store).await, each_once(&[("b", 2)]));
    let waiting: Vec<u64> = other
        .parked()
        .await
        .expect("reads")
        .iter()
        .map(|p| p.event.stream_version.value())
        .collect();
    assert_eq!(waiting, [1, 2]);
}

/// An event on which the handling process dies every time (a panic; no outcome is ever
/// recorded) is parked once it was delivered more than the limit, without running the
/// handler again, and the subscription goes on.
pub async fn an_event_that_kills_its_handler_every_time_is_parked_after_the_delivery_limit(
    harness: impl TransportHarness,
) {
    let producer = producer(&harness).await;
    publish(&*producer, &envelopes(&*producer, &[("a", 1), ("b", 1)], 1)).await;
    let store = harness.store().await;
    let subscriber = harness.subscriber().await;
    let dying = Applier {
        dies_on: Some("a".to_owned()),
        ..Applier::default()
    };
    for _ in 0..3 {
        let mut runner = runner(subscriber.clone(), &store, dying.clone()).with_max_deliveries(3);
        // The panic ends the task, dropping its subscription as a crash does.
        let crashed = tokio::spawn(async move { runner.run(std::future::pending()).await }).await;
        assert!(crashed.is_err_and(|e| e.is_panic()), "the handler died");
    }
    let mut runner = runner(subscriber.clone(), &store, dying).with_max_deliveries(3);
    let mut subscription = subscriber.subscribe(&spec()).await.expect("subscribes");
    let delivery = subscription.next().await.expect("delivers");
    assert_eq!(delivery.event.stream_id.as_str(), "a");
    assert_eq!(delivery.attempt, 4, "one delivery per crash, then this one");
    assert_eq!(
        runner.process(&delivery).await.expect("processes"),
        Processed::Parked
    );
    subscription.ack(&delivery).await.expect("acknowledges");
    let parked = runner.parked().await.expect("reads");
    assert_eq!(parked.len(), 1);
    assert!(
        parked[0]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("delivered 4 times")),
        "{parked:?}"
    );
    let next = subscription.next().await.expect("delivers");
    assert_eq!(next.event.stream_id.as_str(), "b");
    assert_eq!(
        runner.process(&next).await.expect("processes"),
        Processed::Handled
    );
    subscription.ack(&next).await.expect("acknowledges");
    assert_eq!(applied(&store).await, each_once(&[("b", 1)]));
}

/// Two instances of the subscribing service run the same subscription at once, on one
/// store, while events keep coming: each event is applied once, and in its source
/// stream's order (the effect refuses anything else, which would park).
pub async fn two_instances_apply_each_event_once_in_source_stream_order(
    harness: impl TransportHarness,
) {
    const STREAMS: [&str; 5] = ["s0", "s1", "s2", "s3", "s4"];
    const ROUNDS: u64 = 12;
    let producer = producer(&harness).await;
    let store = harness.store().await;
    let subscriber = harness.subscriber().await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut instances = Vec::new();
    for _ in 0..2 {
        let mut runner = runner(subscriber.clone(), &store, Applier::default());
        let mut stopped = stopped.clone();
        instances.push(tokio::spawn(async move {
            runner
                .run(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
        }));
    }
    let mut position = 1;
    for round in 1..=ROUNDS {
        let events: Vec<(&str, u64)> = STREAMS.iter().map(|s| (*s, round)).collect();
        let sent = envelopes(&*producer, &events, position);
        position += sent.len() as u64;
        publish(&*producer, &sent).await;
    }
    let total = STREAMS.len() as u64 * ROUNDS;
    // Wait on the store's own notification until every effect is there.
    loop {
        // The head before the count: an effect appended after the count was read is
        // after the head, so the wait returns for it.
        let head = store.head_position().await.expect("reads");
        let count: u64 = applied(&store)
            .await
            .values()
            .map(|versions| versions.len() as u64)
            .sum();
        if count >= total {
            break;
        }
        store.wait_for_events(head).await.expect("waits");
    }
    stop.send(true).expect("running");
    for instance in instances {
        instance.await.expect("joins").expect("ran");
    }
    let expected: Vec<(&str, u64)> = STREAMS.iter().map(|s| (*s, ROUNDS)).collect();
    assert_eq!(applied(&store).await, each_once(&expected));
    let mut check = runner(subscriber, &store, Applier::default());
    assert!(
        check.parked().await.expect("reads").is_empty(),
        "nothing parked: no effect out of order or repeated"
    );
}

/// A subscription split four ways, one runner per partition, while events keep coming:
/// each event is applied once and in its source stream's order, and nothing parks.
pub async fn a_split_subscription_applies_each_event_once_in_order_across_its_runners(
    harness: impl TransportHarness,
) {
    const STREAMS: [&str; 8] = ["s0", "s1", "s2", "s3", "s4", "s5", "s6", "s7"];
    const ROUNDS: u64 = 8;
    let producer = producer(&harness).await;
    let store = harness.store().await;
    let subscriber = harness.subscriber().await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut partitions = Vec::new();
    let mut seen = Vec::new();
    for part in spec().split(4).expect("valid") {
        let applier = Applier::default();
        seen.push((part.partition, applier.seen.clone()));
        let mut runner = SubscriptionRunner::new(
            subscriber.clone(),
            part,
            applier,
            CommandExecutor::new(store.clone()),
        )
        .expect("valid")
        .with_error_policy(quick_retries());
        let mut stopped = stopped.clone();
        partitions.push(tokio::spawn(async move {
            runner
                .run(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
        }));
    }
    let mut position = 1;
    for round in 1..=ROUNDS {
        let events: Vec<(&str, u64)> = STREAMS.iter().map(|s| (*s, round)).collect();
        let sent = envelopes(&*producer, &events, position);
        position += sent.len() as u64;
        publish(&*producer, &sent).await;
    }
    let total = STREAMS.len() as u64 * ROUNDS;
    loop {
        let head = store.head_position().await.expect("reads");
        let count: u64 = applied(&store)
            .await
            .values()
            .map(|versions| versions.len() as u64)
            .sum();
        if count >= total {
            break;
        }
        store.wait_for_events(head).await.expect("waits");
    }
    stop.send(true).expect("running");
    for partition in partitions {
        partition.await.expect("joins").expect("ran");
    }
    let expected: Vec<(&str, u64)> = STREAMS.iter().map(|s| (*s, ROUNDS)).collect();
    assert_eq!(applied(&store).await, each_once(&expected));
    for (partition, seen) in &seen {
        let seen = seen.lock();
        assert!(
            seen.iter().all(|stream| partition.contains(stream)),
            "partition {partition}'s runner was handed events of other partitions: {seen:?}"
        );
    }
    let mut check = runner(subscriber, &store, Applier::default());
    assert!(
        check.parked().await.expect("reads").is_empty(),
        "nothing parked: no effect out of order or repeated"
    );
}

/// A broker that lost events the subscriber had applied and acknowledged gets them
/// again from the publisher and delivers them again: nothing happens twice, and what
/// follows is applied.
pub async fn a_broker_that_lost_events_makes_nothing_happen_twice(harness: impl TransportHarness) {
    let producer = producer(&harness).await;
    let sent = envelopes(
        &*producer,
        &[("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 3), ("b", 3)],
        1,
    );
    publish(&*producer, &sent).await;
    let store = harness.store().await;
    let subscriber = harness.subscriber().await;
    let mut runner = runner(subscriber.clone(), &store, Applier::default());
    let mut subscription = subscriber.subscribe(&spec()).await.expect("subscribes");
    for _ in &sent {
        let delivery = subscription.next().await.expect("delivers");
        assert_eq!(
            runner.process(&delivery).await.expect("processes"),
            Processed::Handled
        );
        subscription.ack(&delivery).await.expect("acknowledges");
    }
    drop(subscription);
    harness.lose_last_messages(&service("producer"), 3).await;
    // The publisher finds where the publication ends and publishes the lost ones again.
    let producer = harness.publisher(&service("producer")).await;
    assert_eq!(
        producer.last_published().await.expect("reads"),
        Some(GlobalPosition::new(3))
    );
    publish(&*producer, &sent[3..]).await;
    let more = envelopes(&*producer, &[("a", 4)], 7);
    publish(&*producer, &more).await;
    let mut subscription = subscriber.subscribe(&spec()).await.expect("subscribes");
    for expected in sent[3..].iter().chain(&more) {
        let delivery = subscription.next().await.expect("delivers");
        assert_eq!(delivery.event.event_id, expected.event_id, "in order");
        assert_eq!(
            runner.process(&delivery).await.expect("processes"),
            Processed::Handled
        );
        subscription.ack(&delivery).await.expect("acknowledges");
    }
    assert_eq!(applied(&store).await, each_once(&[("a", 4), ("b", 3)]));
    assert!(runner.parked().await.expect("reads").is_empty());
}
