//! The publisher runner on the in-memory store and broker: the store is the outbox,
//! the broker's publication ends up complete and in order after every fault, and
//! nothing is published twice.

use std::sync::Arc;

use eventcore::distributed::{
    DistributedEvent, PublicationPolicy, PublicationRule, PublisherRunner, ServiceId, Topic,
};
use eventcore::{
    AppendRequest, CheckpointStore, EventData, EventMetadata, EventPayload, EventStore, EventType,
    ExpectedVersion, GlobalPosition, LogQuery, ProjectionName, RecordedEvent, StreamId,
    TraceContext,
};
use eventcore_memory::{InMemoryBroker, InMemoryEventStore};

fn orders() -> ServiceId {
    ServiceId::try_new("orders").expect("valid")
}

fn policy() -> PublicationPolicy {
    PublicationPolicy::new([
        PublicationRule::new(Topic::try_new("order-events").expect("valid"))
            .with_stream_prefix("order-"),
        PublicationRule::new(Topic::try_new("stock-events").expect("valid"))
            .with_event_types(["StockReserved"])
            .expect("valid"),
    ])
    .expect("valid policy")
}

/// Appends one event of `event_type` to `stream`, at the stream's next version.
async fn append(store: &InMemoryEventStore, stream: &str, event_type: &str, n: u64) {
    let stream = StreamId::try_new(stream).expect("valid");
    let metadata = EventMetadata::default().with_trace_context(
        TraceContext::new("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
            .expect("valid"),
    );
    let data = EventData::new(
        EventType::try_new(event_type).expect("valid"),
        EventPayload::from_json(format!(r#"{{"n":{n}}}"#)).expect("valid"),
        metadata,
    );
    store
        .append(AppendRequest::single(
            stream,
            ExpectedVersion::Any,
            vec![data],
        ))
        .await
        .expect("appends");
}

/// A mix of public and private events: `count` rounds of an order event, a private
/// ledger event and, every third round, a stock reservation on a private stream.
async fn fill(store: &InMemoryEventStore, from: u64, count: u64) {
    for n in from..from + count {
        append(store, &format!("order-{}", n % 4), "OrderPlaced", n).await;
        append(store, "ledger", "Booked", n).await;
        if n.is_multiple_of(3) {
            append(store, "stock-apple", "StockReserved", n).await;
        }
    }
}

/// What the policy makes public, in log order.
async fn public_events(store: &InMemoryEventStore) -> Vec<RecordedEvent> {
    let policy = policy();
    store
        .read_all(&LogQuery::new())
        .await
        .expect("reads")
        .into_iter()
        .filter(|event| policy.topic_of(event).is_some())
        .collect()
}

/// The broker holds exactly the public events, in order, once each, with intact
/// envelopes.
async fn assert_complete(store: &InMemoryEventStore, broker: &InMemoryBroker) {
    let expected = public_events(store).await;
    let held: Vec<DistributedEvent> = broker.published(&orders());
    let held_ids: Vec<_> = held.iter().map(|e| e.event_id).collect();
    let expected_ids: Vec<_> = expected.iter().map(|e| e.event_id).collect();
    assert_eq!(
        held_ids, expected_ids,
        "every public event once, in log order"
    );
    for (envelope, recorded) in held.iter().zip(&expected) {
        assert_eq!(envelope.stream_id, recorded.stream_id);
        assert_eq!(envelope.stream_version, recorded.stream_version);
        assert_eq!(envelope.global_position, recorded.global_position);
        assert_eq!(envelope.payload.as_str(), recorded.payload.as_str());
        assert_eq!(envelope.occurred_at, recorded.recorded_at);
        assert_eq!(envelope.service_id, orders());
        assert_eq!(
            envelope.trace_context.as_ref().map(TraceContext::trace_id),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
    }
}

fn runner(store: &InMemoryEventStore, broker: &InMemoryBroker) -> PublisherRunner {
    PublisherRunner::new(
        Arc::new(store.clone()),
        Arc::new(store.clone()),
        Arc::new(broker.publisher(orders())),
        policy(),
    )
    .expect("valid runner")
    .with_batch_size(7)
}

fn checkpoint_name() -> ProjectionName {
    ProjectionName::try_new("publisher-orders").expect("valid")
}

#[tokio::test]
async fn only_public_events_are_published_in_log_order_and_the_checkpoint_follows() {
    let store = InMemoryEventStore::new();
    let broker = InMemoryBroker::new();
    fill(&store, 0, 12).await;
    let mut publisher = runner(&store, &broker);
    let summary = publisher.publish_available().await.expect("publishes");
    assert_complete(&store, &broker).await;
    assert_eq!(summary.published, public_events(&store).await.len() as u64);
    let head = store.head_position().await.expect("reads");
    assert_eq!(summary.position, head);
    assert_eq!(
        store
            .load_checkpoint(&checkpoint_name())
            .await
            .expect("reads"),
        head,
        "the checkpoint covers the private tail too"
    );
    // Nothing new: nothing published.
    let again = publisher.publish_available().await.expect("publishes");
    assert_eq!(again.published, 0);
    assert_eq!(publisher.metrics().published(), summary.published);
}

#[tokio::test]
async fn a_publish_that_fails_inside_a_batch_resumes_without_a_gap_or_a_repeat() {
    let store = InMemoryEventStore::new();
    let broker = InMemoryBroker::new();
    fill(&store, 0, 15).await;
    let mut publisher = runner(&store, &broker);
    for stored_first in [3, 0, 5, 1] {
        broker.fail_after(stored_first);
        let failed = publisher.publish_available().await;
        assert!(
            matches!(&failed, Err(error) if error.is_retryable()),
            "{failed:?}"
        );
        // What the broker holds is always a prefix of the public events.
        let held: Vec<_> = broker
            .published(&orders())
            .iter()
            .map(|e| e.event_id)
            .collect();
        let public: Vec<_> = public_events(&store)
            .await
            .iter()
            .map(|e| e.event_id)
            .collect();
        assert_eq!(held[..], public[..held.len()]);
        // The checkpoint never passes what the broker acknowledged.
        let checkpoint = store
            .load_checkpoint(&checkpoint_name())
            .await
            .expect("reads")
            .map_or(0, GlobalPosition::value);
        let last_held = broker
            .published(&orders())
            .last()
            .map_or(0, |e| e.global_position.value());
        let next_public = public_events(&store)
            .await
            .into_iter()
            .find(|e| e.global_position.value() > last_held);
        if let Some(next) = next_public {
            assert!(checkpoint < next.global_position.value());
        }
        fill(&store, 100 + u64::from(stored_first) * 10, 2).await;
    }
    publisher.publish_available().await.expect("publishes");
    assert_complete(&store, &broker).await;
}

#[tokio::test]
async fn a_policy_that_selects_nothing_is_refused() {
    let everything =
        PublicationPolicy::new([PublicationRule::new(Topic::try_new("all").expect("valid"))]);
    assert!(
        matches!(
            everything,
            Err(eventcore::Error::InvalidPublicationPolicy { .. })
        ),
        "{everything:?}"
    );
    assert!(PublicationPolicy::new([]).is_err());
    let no_types = PublicationRule::new(Topic::try_new("t").expect("valid"))
        .with_event_types(Vec::<String>::new())
        .expect("valid names");
    assert!(PublicationPolicy::new([no_types]).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_as_leaders_publish_everything_once_in_order() {
    use eventcore::distributed::{EventSubscriber, SubscriptionName, SubscriptionSpec};

    let store = InMemoryEventStore::new();
    let broker = InMemoryBroker::new();
    let election = Arc::new(eventcore_memory::InMemoryLeaderElection::new());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut instances = Vec::new();
    for _ in 0..2 {
        let mut publisher = runner(&store, &broker);
        let election = election.clone();
        let mut stopped = stopped.clone();
        instances.push(tokio::spawn(async move {
            publisher
                .run_as_leader(&*election, async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
        }));
    }
    fill(&store, 0, 15).await;
    // The leader declares the topics when it starts; then read every event through a
    // subscription (each `next` waits for the broker, nothing is timed).
    let spec = SubscriptionSpec::new(
        ServiceId::try_new("watcher").expect("valid"),
        SubscriptionName::try_new("all").expect("valid"),
        [
            Topic::try_new("order-events").expect("valid"),
            Topic::try_new("stock-events").expect("valid"),
        ],
    );
    let mut subscription = loop {
        match broker.subscribe(&spec).await {
            Ok(subscription) => break subscription,
            Err(error) => {
                assert!(error.is_retryable(), "{error}");
                tokio::task::yield_now().await;
            }
        }
    };
    let mut received = 0;
    for round in 0..2 {
        if round == 1 {
            // The leader loses its leadership; the other instance takes over.
            assert!(election.revoke("publisher-orders"), "someone leads");
            fill(&store, 15, 15).await;
        }
        let expected = public_events(&store).await;
        for event in &expected[received..] {
            let delivery = subscription.next().await.expect("delivers");
            assert_eq!(delivery.event.event_id, event.event_id, "in log order");
            subscription.ack(&delivery).await.expect("acknowledges");
        }
        received = expected.len();
    }
    stop.send(true).expect("running");
    for instance in instances {
        instance.await.expect("joins").expect("ran");
    }
    assert_complete(&store, &broker).await;
}

#[tokio::test]
async fn a_broker_that_lost_events_gets_them_again_while_the_service_writes_only_private_events() {
    let store = InMemoryEventStore::new();
    let broker = InMemoryBroker::new();
    let mut publisher = runner(&store, &broker);
    fill(&store, 0, 5).await;
    broker.set_unsynced(&orders(), 3);
    publisher.publish_available().await.expect("publishes");
    broker.crash();
    broker.set_unsynced(&orders(), 0);
    // Nothing public to publish: no publish that the broker could refuse.
    append(&store, "ledger", "Booked", 99).await;
    publisher.publish_available().await.expect("publishes");
    assert_complete(&store, &broker).await;
    // And with nothing new at all.
    broker.set_unsynced(&orders(), 2);
    fill(&store, 5, 1).await;
    publisher.publish_available().await.expect("publishes");
    broker.crash();
    broker.set_unsynced(&orders(), 0);
    publisher.publish_available().await.expect("publishes");
    assert_complete(&store, &broker).await;
}
