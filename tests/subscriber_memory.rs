//! The subscription runner on the in-memory store and broker: parking and holding per
//! source stream, re-driving, stopping, and two instances following live.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use eventcore::distributed::{
    DistributedEvent, EventHandler, EventPublisher, EventSubscriber, Publication, ServiceId,
    SubscriptionName, SubscriptionRunner, SubscriptionSpec, Topic,
};
use eventcore::{
    CommandExecutor, Dispatcher, Error, EventMetadata, EventPayload, EventStore, EventType,
    GlobalPosition, LogQuery, OnFailure, ProjectionErrorPolicy, RecordedEvent, StreamId,
    StreamVersion,
};
use eventcore_memory::{InMemoryBroker, InMemoryEventStore};
use eventcore_tests::two_services::{self, PlaceOrder};
use parking_lot::Mutex;

fn topic() -> Topic {
    Topic::try_new("things").expect("valid")
}

fn spec() -> SubscriptionSpec {
    SubscriptionSpec::new(
        ServiceId::try_new("consumer").expect("valid"),
        SubscriptionName::try_new("things").expect("valid"),
        [topic()],
    )
}

/// Publishes events of `streams` (name, version) under the test topic, at positions
/// `first_position`, `first_position + 1`, ...
async fn publish(publisher: &dyn EventPublisher, events: &[(&str, u64)], first_position: u64) {
    publish_to(publisher, &topic(), events, first_position).await;
}

/// As [`publish`], under `topic`.
async fn publish_to(
    publisher: &dyn EventPublisher,
    topic: &Topic,
    events: &[(&str, u64)],
    first_position: u64,
) {
    let batch: Vec<Publication> = events
        .iter()
        .enumerate()
        .map(|(i, (stream, version))| {
            let recorded = RecordedEvent::new(
                eventcore::EventId::new(),
                StreamId::try_new(*stream).expect("valid"),
                StreamVersion::new(*version),
                GlobalPosition::new(first_position + i as u64),
                EventType::try_new("Happened").expect("valid"),
                EventPayload::from_json("{}").expect("valid"),
                Arc::new(EventMetadata::default()),
                chrono::Utc::now(),
            );
            let event =
                DistributedEvent::from_recorded(&recorded, publisher.service(), chrono::Utc::now())
                    .expect("readable");
            Publication::new(topic.clone(), event)
        })
        .collect();
    publisher.publish(&batch).await.expect("publishes");
}

/// Records what it handled; fails for the events of `failing` streams.
#[derive(Debug, Clone, Default)]
struct Recorder {
    handled: Arc<Mutex<Vec<(String, u64)>>>,
    failing: Arc<Mutex<HashSet<String>>>,
}

impl EventHandler for Recorder {
    async fn handle(
        &mut self,
        event: &DistributedEvent,
        _: &mut Dispatcher<'_>,
    ) -> eventcore::Result<()> {
        if self.failing.lock().contains(event.stream_id.as_str()) {
            return Err(Error::rejected(format!(
                "cannot handle {}",
                event.stream_id
            )));
        }
        self.handled.lock().push((
            event.stream_id.as_str().to_owned(),
            event.stream_version.value(),
        ));
        Ok(())
    }
}

fn quick_retries(on_failure: OnFailure) -> ProjectionErrorPolicy {
    ProjectionErrorPolicy::new()
        .with_max_attempts(2)
        .with_initial_delay(std::time::Duration::ZERO)
        .with_max_delay(std::time::Duration::ZERO)
        .with_on_failure(on_failure)
}

#[tokio::test]
async fn a_stop_policy_stops_without_acknowledging_and_the_event_comes_again() {
    let broker = InMemoryBroker::new();
    let producer = broker.publisher(ServiceId::try_new("producer").expect("valid"));
    producer.declare_topics(&[topic()]).await.expect("declares");
    publish(&producer, &[("a", 1)], 1).await;
    let store = InMemoryEventStore::new();
    let recorder = Recorder::default();
    recorder.failing.lock().insert("a".to_owned());
    let mut runner = SubscriptionRunner::new(
        Arc::new(broker.clone()),
        spec(),
        recorder.clone(),
        CommandExecutor::new(store.clone()),
    )
    .expect("valid")
    .with_error_policy(quick_retries(OnFailure::Stop));
    let stopped = runner.run(std::future::pending()).await;
    assert!(
        matches!(&stopped, Err(Error::ProjectionFailed { stream, .. }) if stream.as_str() == "a"),
        "{stopped:?}"
    );
    assert!(
        runner.parked().await.expect("reads").is_empty(),
        "not parked"
    );
    let mut subscription = broker.subscribe(&spec()).await.expect("subscribes");
    let again = subscription.next().await.expect("delivers");
    assert!(again.attempt >= 2, "not acknowledged: delivered again");
}

#[tokio::test]
async fn process_available_handles_what_is_held_then_returns_and_resumes_after_a_failure() {
    let broker = InMemoryBroker::new();
    let producer = broker.publisher(ServiceId::try_new("producer").expect("valid"));
    producer.declare_topics(&[topic()]).await.expect("declares");
    let store = InMemoryEventStore::new();
    let recorder = Recorder::default();
    let mut runner = SubscriptionRunner::new(
        Arc::new(broker.clone()),
        spec(),
        recorder.clone(),
        CommandExecutor::new(store.clone()),
    )
    .expect("valid")
    .with_error_policy(quick_retries(OnFailure::Stop))
    // A second delivery of an event would be parked unhandled: the retry after a
    // failure must process the delivery in hand, not ask the broker again.
    .with_max_deliveries(1);
    // Opened before anything is published: what comes later is kept for it.
    runner.open().await.expect("opens");
    assert_eq!(runner.process_available().await.expect("nothing held"), 0);
    publish(&producer, &[("a", 1), ("b", 1), ("a", 2)], 1).await;
    assert_eq!(runner.process_available().await.expect("handles"), 3);
    assert_eq!(
        *recorder.handled.lock(),
        [
            ("a".to_owned(), 1),
            ("b".to_owned(), 1),
            ("a".to_owned(), 2)
        ]
    );
    let backlog = broker
        .backlog(&spec())
        .await
        .expect("answers")
        .expect("opened");
    assert_eq!(backlog.events, 0, "all acknowledged");
    assert_eq!(runner.process_available().await.expect("nothing new"), 0);

    // A failure stops it with the event unacknowledged; the next call handles it.
    recorder.failing.lock().insert("c".to_owned());
    publish(&producer, &[("c", 1), ("d", 1)], 4).await;
    let stopped = runner.process_available().await;
    assert!(
        matches!(stopped, Err(Error::ProjectionFailed { .. })),
        "{stopped:?}"
    );
    recorder.failing.lock().clear();
    assert_eq!(runner.process_available().await.expect("resumes"), 2);
    let handled = recorder.handled.lock().clone();
    assert_eq!(&handled[3..], [("c".to_owned(), 1), ("d".to_owned(), 1)]);
    assert!(
        runner.parked().await.expect("reads").is_empty(),
        "nothing parked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_running_instances_apply_each_event_once_in_order() {
    let orders: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let billing: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let broker = InMemoryBroker::new();
    let checkpoints = Arc::new(InMemoryEventStore::new());
    let mut publisher = two_services::publisher(&orders, checkpoints, &broker);
    publisher
        .publish_available()
        .await
        .expect("declares the topic");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut instances = Vec::new();
    for _ in 0..2 {
        let mut runner = two_services::subscriber(&billing, &broker);
        let mut stopped = stopped.clone();
        instances.push(tokio::spawn(async move {
            runner
                .run(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
        }));
    }
    let publishing = tokio::spawn(async move {
        let mut stopped = stopped;
        publisher
            .run(async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await
    });
    let executor = CommandExecutor::new(orders.clone());
    let mut expected = BTreeMap::new();
    for n in 0..100_u64 {
        let id = format!("o{n}");
        executor
            .execute(&PlaceOrder {
                order: StreamId::try_new(format!("order-{id}")).expect("valid"),
                id: id.clone(),
                amount: n + 1,
            })
            .await
            .expect("places");
        expected.insert(id, n + 1);
    }
    // Wait (on the store's own notification) until billing has an effect per event; a
    // guard turns a lost event into a failure instead of a hang.
    eventcore::testing::within_hang_guard("billing catches up", async {
        loop {
            // The head before the count: an effect appended after the count was read
            // is after the head, so the wait returns for it.
            let head = billing.head_position().await.expect("reads");
            let effects = billing
                .read_all(&LogQuery::new().with_stream_prefix("invoice-"))
                .await
                .expect("reads");
            if effects.len() >= 200 {
                break;
            }
            billing.wait_for_events(head).await.expect("waits");
        }
    })
    .await;
    stop.send(true).expect("running");
    for instance in instances {
        instance.await.expect("joins").expect("ran");
    }
    publishing.await.expect("joins").expect("ran");
    two_services::check_billing(&billing, &expected).await;
}

/// Counts events per publishing service.
#[derive(Debug, Default)]
struct Counts(BTreeMap<String, u64>);

impl eventcore::Projection for Counts {
    type Event = eventcore::RawEvent;
    type Error = std::convert::Infallible;

    fn name(&self) -> &str {
        "counts"
    }

    fn filter(&self) -> eventcore::ProjectionFilter {
        eventcore::ProjectionFilter::all().with_stream_prefix("a")
    }

    async fn apply(
        &mut self,
        event: &eventcore::StoredEvent<eventcore::RawEvent>,
    ) -> Result<(), Self::Error> {
        *self
            .0
            .entry(event.stream_id.as_str().to_owned())
            .or_default() += 1;
        Ok(())
    }
}

#[tokio::test]
async fn a_cross_service_projection_applies_each_event_once_across_redeliveries() {
    use eventcore::distributed::ProjectionHandler;

    let broker = InMemoryBroker::new();
    let first = broker.publisher(ServiceId::try_new("first").expect("valid"));
    let second = broker.publisher(ServiceId::try_new("second").expect("valid"));
    first.declare_topics(&[topic()]).await.expect("declares");
    second
        .declare_topics(&[Topic::try_new("more").expect("valid")])
        .await
        .expect("declares");
    publish(&first, &[("a1", 1), ("b1", 1), ("a1", 2)], 1).await;
    publish_to(
        &second,
        &Topic::try_new("more").expect("valid"),
        &[("a2", 1), ("a2", 2)],
        1,
    )
    .await;

    let store = InMemoryEventStore::new();
    let spec = SubscriptionSpec::new(
        ServiceId::try_new("reports").expect("valid"),
        SubscriptionName::try_new("counts").expect("valid"),
        [topic(), Topic::try_new("more").expect("valid")],
    );
    let mut runner = SubscriptionRunner::new(
        Arc::new(broker.clone()),
        spec.clone(),
        ProjectionHandler::new(Counts::default(), Arc::new(store.clone())).expect("valid"),
        CommandExecutor::new(store.clone()),
    )
    .expect("valid");
    let mut subscription = broker.subscribe(&spec).await.expect("subscribes");
    for n in 0..5 {
        let delivery = subscription.next().await.expect("delivers");
        runner.process(&delivery).await.expect("processes");
        if n == 2 {
            // A crash after the effect, before the acknowledgement: delivered again.
            drop(subscription);
            subscription = broker.subscribe(&spec).await.expect("subscribes");
            let again = subscription.next().await.expect("delivers again");
            assert_eq!(again.event.event_id, delivery.event.event_id);
            runner.process(&again).await.expect("processes");
            subscription.ack(&again).await.expect("acknowledges");
        } else {
            subscription.ack(&delivery).await.expect("acknowledges");
        }
    }
    let counts = &runner.handler().projection().0;
    assert_eq!(
        counts
            .iter()
            .map(|(s, n)| (s.as_str(), *n))
            .collect::<Vec<_>>(),
        [("a1", 2), ("a2", 2)],
        "each selected event once; b1 filtered out"
    );
    // A durable position per source stream: a new handler (a restart) skips them all.
    let mut restarted =
        ProjectionHandler::new(Counts::default(), Arc::new(store.clone())).expect("valid");
    let executor = CommandExecutor::new(store.clone());
    let mut dispatcher = Dispatcher::new(
        &executor,
        "replay",
        eventcore::EventId::new(),
        eventcore::CorrelationId::new(),
    )
    .expect("valid");
    for event in broker
        .published(&ServiceId::try_new("first").expect("valid"))
        .iter()
        .chain(&broker.published(&ServiceId::try_new("second").expect("valid")))
    {
        eventcore::distributed::EventHandler::handle(&mut restarted, event, &mut dispatcher)
            .await
            .expect("handles");
    }
    assert!(
        restarted.projection().0.is_empty(),
        "nothing applied twice after a restart"
    );
}

/// Counts applications per stream; fails for streams in `failing`.
#[derive(Debug, Default)]
struct Flaky {
    applied: BTreeMap<String, u64>,
    failing: Arc<Mutex<HashSet<String>>>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot apply")]
struct CannotApply;

impl eventcore::Projection for Flaky {
    type Event = eventcore::RawEvent;
    type Error = CannotApply;

    fn name(&self) -> &str {
        "flaky"
    }

    async fn apply(
        &mut self,
        event: &eventcore::StoredEvent<eventcore::RawEvent>,
    ) -> Result<(), Self::Error> {
        if self.failing.lock().contains(event.stream_id.as_str()) {
            return Err(CannotApply);
        }
        *self
            .applied
            .entry(event.stream_id.as_str().to_owned())
            .or_default() += 1;
        Ok(())
    }
}

#[tokio::test]
async fn a_cross_service_projection_applies_a_parked_stream_when_it_is_redriven() {
    use eventcore::distributed::ProjectionHandler;

    let broker = InMemoryBroker::new();
    let producer = broker.publisher(ServiceId::try_new("producer").expect("valid"));
    producer.declare_topics(&[topic()]).await.expect("declares");
    // `a` fails first; `b` goes on meanwhile, with later positions.
    publish(&producer, &[("a", 1), ("b", 1), ("a", 2), ("b", 2)], 1).await;
    let store = InMemoryEventStore::new();
    let failing = Arc::new(Mutex::new(HashSet::from(["a".to_owned()])));
    let projection = Flaky {
        failing: failing.clone(),
        ..Flaky::default()
    };
    let mut runner = SubscriptionRunner::new(
        Arc::new(broker.clone()),
        spec(),
        ProjectionHandler::new(projection, Arc::new(store.clone())).expect("valid"),
        CommandExecutor::new(store.clone()),
    )
    .expect("valid")
    .with_error_policy(quick_retries(OnFailure::Park));
    let mut subscription = broker.subscribe(&spec()).await.expect("subscribes");
    for _ in 0..4 {
        let delivery = subscription.next().await.expect("delivers");
        runner.process(&delivery).await.expect("processes");
        subscription.ack(&delivery).await.expect("acknowledges");
    }
    failing.lock().clear();
    let service = ServiceId::try_new("producer").expect("valid");
    let stream = StreamId::try_new("a").expect("valid");
    assert_eq!(
        runner.redrive(&service, &stream).await.expect("redrives"),
        2
    );
    let applied = &runner.handler().projection().applied;
    assert_eq!(
        applied
            .iter()
            .map(|(s, n)| (s.as_str(), *n))
            .collect::<Vec<_>>(),
        [("a", 2), ("b", 2)],
        "the parked stream's events were applied, not skipped as seen"
    );
}

/// Fails with a retryable store error `failures` times, then succeeds and says so.
#[derive(Debug)]
struct Outage {
    failures: Arc<Mutex<u32>>,
    recovered: Arc<tokio::sync::Notify>,
}

impl EventHandler for Outage {
    async fn handle(
        &mut self,
        _: &DistributedEvent,
        _: &mut Dispatcher<'_>,
    ) -> eventcore::Result<()> {
        {
            let mut left = self.failures.lock();
            if *left > 0 {
                *left -= 1;
                return Err(Error::retryable_backend("the store is down", None));
            }
        }
        self.recovered.notify_one();
        Ok(())
    }
}

#[tokio::test]
async fn a_store_outage_longer_than_the_retries_parks_nothing_and_run_waits_it_out() {
    let broker = InMemoryBroker::new();
    let producer = broker.publisher(ServiceId::try_new("producer").expect("valid"));
    producer.declare_topics(&[topic()]).await.expect("declares");
    publish(&producer, &[("a", 1)], 1).await;
    let store = InMemoryEventStore::new();
    let failures = Arc::new(Mutex::new(7));
    let recovered = Arc::new(tokio::sync::Notify::new());
    let mut runner = SubscriptionRunner::new(
        Arc::new(broker.clone()),
        spec(),
        Outage {
            failures: failures.clone(),
            recovered: recovered.clone(),
        },
        CommandExecutor::new(store.clone()),
    )
    .expect("valid")
    .with_error_policy(quick_retries(OnFailure::Park));
    {
        let mut subscription = broker.subscribe(&spec()).await.expect("subscribes");
        let delivery = subscription.next().await.expect("delivers");
        // Both attempts of this call failed: an error to retry, not a parked event.
        let outage = runner.process(&delivery).await;
        assert!(
            matches!(&outage, Err(error) if error.is_retryable()),
            "{outage:?}"
        );
        assert!(runner.parked().await.expect("reads").is_empty());
    }
    // `run` retries in place until the store is back (three more calls), acknowledges,
    // and stops once the handler succeeded.
    runner
        .run(async move { recovered.notified().await })
        .await
        .expect("runs");
    assert_eq!(*failures.lock(), 0);
    assert!(
        runner.parked().await.expect("reads").is_empty(),
        "nothing parked"
    );
    publish(&producer, &[("b", 1)], 2).await;
    let mut subscription = broker.subscribe(&spec()).await.expect("subscribes");
    let next = subscription.next().await.expect("delivers");
    assert_eq!(next.event.stream_id.as_str(), "b", "`a` was acknowledged");
    assert_eq!(next.attempt, 1);
}
