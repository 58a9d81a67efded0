//! The transport alone: order, dedup, chaining, topic ownership, redelivery, one event
//! in flight, resumption, topic selection, split subscriptions.

use std::sync::Arc;

use super::{TransportHarness, event, next_and_ack, publish_some, service, spec, topic};
use crate::distributed::{
    DistributedEvent, Partition, Publication, SubscriptionSpec, TransportError,
};
use crate::names::StreamId;
use crate::types::{EventId, GlobalPosition};

/// The envelope arrives as it was published (payload bytes, metadata, trace context),
/// and one service's events arrive in its publication's order.
pub async fn published_events_arrive_in_order_and_intact(harness: impl TransportHarness) {
    let orders = harness.publisher(&service("orders")).await;
    orders
        .declare_topics(&[topic("order-events")])
        .await
        .expect("declares");
    let subscriber = harness.subscriber().await;
    let mut subscription = subscriber
        .subscribe(&spec("billing", "orders", &["order-events"]))
        .await
        .expect("subscribes");
    let sent = publish_some(&*orders, "order-events", 1, 20).await;
    for expected in &sent {
        let delivery = next_and_ack(&mut *subscription).await;
        assert_eq!(
            &delivery.event, expected,
            "delivered as published, in order"
        );
        assert_eq!(delivery.event.payload.as_str(), expected.payload.as_str());
        assert_eq!(delivery.topic, topic("order-events"));
        assert_eq!(delivery.attempt, 1);
    }
}

/// Publishing the same events again (a publisher retrying a batch whose answer it lost)
/// stores nothing twice and delivers each once.
pub async fn an_event_published_twice_is_held_once(harness: impl TransportHarness) {
    let orders = harness.publisher(&service("orders")).await;
    orders
        .declare_topics(&[topic("order-events")])
        .await
        .expect("declares");
    let sent = publish_some(&*orders, "order-events", 1, 3).await;
    let batch: Vec<Publication> = sent
        .iter()
        .map(|e| Publication::new(topic("order-events"), e.clone()))
        .collect();
    orders
        .publish(&batch)
        .await
        .expect("a repeat is acknowledged");
    assert_eq!(
        orders.last_published().await.expect("reads"),
        Some(GlobalPosition::new(3))
    );
    let more = publish_some(&*orders, "order-events", 4, 1).await;
    let subscriber = harness.subscriber().await;
    let mut subscription = subscriber
        .subscribe(&spec("billing", "orders", &["order-events"]))
        .await
        .expect("subscribes");
    for expected in sent.iter().chain(&more) {
        let delivery = next_and_ack(&mut *subscription).await;
        assert_eq!(
            delivery.event.event_id, expected.event_id,
            "each event once, in order"
        );
    }
}

/// A new event at or below the last position held is refused: the publication never
/// holds an event after a later one.
pub async fn an_event_below_the_last_held_is_never_stored_after_it(harness: impl TransportHarness) {
    let orders = harness.publisher(&service("orders")).await;
    orders
        .declare_topics(&[topic("order-events")])
        .await
        .expect("declares");
    publish_some(&*orders, "order-events", 5, 2).await;
    let late = event(orders.service(), "late", 1, 4);
    let refused = orders
        .publish(&[Publication::new(topic("order-events"), late)])
        .await;
    assert!(
        matches!(refused, Err(TransportError::OutOfOrder { .. })),
        "{refused:?}"
    );
    assert_eq!(
        orders.last_published().await.expect("reads"),
        Some(GlobalPosition::new(6))
    );
}

/// Two handles of one service's publication (two instances, or one that lost track):
/// a handle whose view of where the publication ends is behind is refused, so it can
/// never store an event after a gap it cannot see; once it asks where the publication
/// ends, it goes on from there.
pub async fn a_publisher_handle_behind_the_publication_is_refused(harness: impl TransportHarness) {
    let one = harness.publisher(&service("orders")).await;
    one.declare_topics(&[topic("order-events")])
        .await
        .expect("declares");
    publish_some(&*one, "order-events", 1, 3).await;
    let two = harness.publisher(&service("orders")).await;
    assert_eq!(
        two.last_published().await.expect("reads"),
        Some(GlobalPosition::new(3))
    );
    publish_some(&*two, "order-events", 4, 2).await;
    let late = event(one.service(), "late", 1, 6);
    let refused = one
        .publish(&[Publication::new(topic("order-events"), late.clone())])
        .await;
    assert!(
        matches!(refused, Err(TransportError::OutOfOrder { .. })),
        "a handle behind the publication published: {refused:?}"
    );
    assert_eq!(
        one.last_published().await.expect("reads"),
        Some(GlobalPosition::new(5))
    );
    one.publish(&[Publication::new(topic("order-events"), late)])
        .await
        .expect("publishes from where the publication ends");
    assert_eq!(
        two.last_published().await.expect("reads"),
        Some(GlobalPosition::new(6))
    );
}

/// After a broker crash that lost the end of the publication, a handle that saw the
/// lost events is refused (its next event would leave a gap), and goes on once it asked
/// where the publication ends.
pub async fn a_publisher_handle_ahead_of_a_broker_that_lost_events_is_refused(
    harness: impl TransportHarness,
) {
    let orders = harness.publisher(&service("orders")).await;
    orders
        .declare_topics(&[topic("order-events")])
        .await
        .expect("declares");
    let sent = publish_some(&*orders, "order-events", 1, 4).await;
    harness.lose_last_messages(&service("orders"), 2).await;
    let late = [Publication::new(
        topic("order-events"),
        event(orders.service(), "late", 1, 5),
    )];
    let refused = orders.publish(&late).await;
    assert!(
        matches!(refused, Err(TransportError::OutOfOrder { .. })),
        "a publish after a gap was accepted: {refused:?}"
    );
    // Refused until the handle is asked where the publication ends: a refusal does not
    // quietly move the handle to the broker's end (the retry would leave the gap).
    let retried = orders.publish(&late).await;
    assert!(
        matches!(retried, Err(TransportError::OutOfOrder { .. })),
        "a publish retried after a refusal was accepted: {retried:?}"
    );
    assert_eq!(
        orders.last_published().await.expect("reads"),
        Some(GlobalPosition::new(2))
    );
    let again: Vec<Publication> = sent[2..]
        .iter()
        .map(|e| Publication::new(topic("order-events"), e.clone()))
        .collect();
    orders
        .publish(&again)
        .await
        .expect("publishes from where the publication ends");
    let subscriber = harness.subscriber().await;
    let mut subscription = subscriber
        .subscribe(&spec("billing", "orders", &["order-events"]))
        .await
        .expect("subscribes");
    for expected in &sent {
        assert_eq!(
            next_and_ack(&mut *subscription).await.event.event_id,
            expected.event_id,
            "no gap, in order"
        );
    }
}

/// `last_published` is `None` before anything, then the position of the last event.
pub async fn last_published_is_the_last_event_held(harness: impl TransportHarness) {
    let orders = harness.publisher(&service("orders")).await;
    orders
        .declare_topics(&[topic("order-events")])
        .await
        .expect("declares");
    assert_eq!(orders.last_published().await.expect("reads"), None);
    publish_some(&*orders, "order-events", 10, 3).await;
    assert_eq!(
        orders.last_published().await.expect("reads"),
        Some(GlobalPosition::new(12))
    );
    // Another service's publication is its own.
    let users = harness.publisher(&service("users")).await;
    assert_eq!(users.last_published().await.expect("reads"), None);
}

/// A topic declared by one service cannot be published by another.
pub async fn a_topic_belongs_to_the_service_that_declared_it(harness: impl TransportHarness) {
    let orders = harness.publisher(&service("orders")).await;
    orders
        .declare_topics(&[topic("order-events")])
        .await
        .expect("declares");
    orders
        .declare_topics(&[topic("order-events")])
        .await
        .expect("declaring again is fine");
    let users = harness.publisher(&service("users")).await;
    let refused = users.declare_topics(&[topic("order-events")]).await;
    assert!(
        matches!(refused, Err(TransportError::TopicOwnedByAnother { .. })),
        "{refused:?}"
    );
    let stolen = event(users.service(), "u", 1, 1);
    let refused = users
        .publish(&[Publication::new(topic("order-events"), stolen)])
        .await;
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(users.last_published().await.expect("reads"), None);
}

/// Asking for the next event without acknowledging the last delivers it again, with a
/// higher attempt; nothing newer comes first.
pub async fn an_unacknowledged_delivery_comes_again(harness: impl TransportHarness) {
    let orders = harness.publisher(&service("orders")).await;
    orders
        .declare_topics(&[topic("order-events")])
        .await
        .expect("declares");
    let sent = publish_some(&*orders, "order-events", 1, 2).await;
    let subscriber = harness.subscriber().await;
    let mut subscription = subscriber
        .subscribe(&spec("billing", "orders", &["order-events"]))
        .await
        .expect("subscribes");
    let first = subscription.next().await.expect("delivers");
    let again = subscription.next().await.expect("delivers again");
    assert_eq!(again.event.event_id, sent[0].event_id);
    assert_eq!((first.attempt, again.attempt), (1, 2));
    subscription.ack(&again).await.expect("acknowledges");
    let second = subscription.next().await.expect("delivers");
    assert_eq!(second.event.event_id, sent[1].event_id);
    assert_eq!(second.attempt, 1);
}

/// A handle dropped with a delivery in flight (a crashed consumer) hands it to the next
/// handle of the subscription.
pub async fn a_dropped_handle_hands_its_delivery_to_the_next(harness: impl TransportHarness) {
    let (sent, billing) = orders_for_billing(&harness, 2).await;
    let mut crashing = billing.subscribe().await;
    let taken = crashing.next().await.expect("delivers");
    assert_eq!(taken.event.event_id, sent[0].event_id);
    drop(crashing);
    let mut survivor = billing.subscribe().await;
    let redelivered = next_and_ack(&mut *survivor).await;
    assert_eq!(redelivered.event.event_id, sent[0].event_id);
    assert!(redelivered.attempt >= 2, "{}", redelivered.attempt);
    assert_eq!(
        next_and_ack(&mut *survivor).await.event.event_id,
        sent[1].event_id
    );
}

/// Two handles on one subscription (two instances of a service): while one holds a
/// delivery, the other gets nothing; after the acknowledgement, it gets the next event.
pub async fn two_handles_never_hold_two_events_at_once(harness: impl TransportHarness) {
    let (sent, billing) = orders_for_billing(&harness, 2).await;
    let (mut one, mut two) = (billing.subscribe().await, billing.subscribe().await);
    let held = one.next().await.expect("delivers");
    assert_eq!(held.event.event_id, sent[0].event_id);
    // The other handle asks meanwhile; what it gets must come after the
    // acknowledgement, and be the next event.
    let acknowledged = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = acknowledged.clone();
    let waiting = tokio::spawn(async move {
        let delivery = two.next().await.expect("delivers");
        (seen.load(std::sync::atomic::Ordering::SeqCst), delivery)
    });
    tokio::task::yield_now().await;
    acknowledged.store(true, std::sync::atomic::Ordering::SeqCst);
    one.ack(&held).await.expect("acknowledges");
    let (after_ack, next) = waiting.await.expect("joins");
    assert!(
        after_ack,
        "a second event was in flight while the first was unacknowledged"
    );
    assert_eq!(next.event.event_id, sent[1].event_id);
}

/// [`crate::distributed::Delivery::consecutive`] (the subscription runner then skips
/// reading its inbox): never on a handle's first delivery, a redelivery, or a delivery
/// after another handle received one of the same service; and on the first delivery
/// right after the handle's own acknowledgement (a transport that cannot tell may
/// always say `false`, which is safe but fails this last part).
pub async fn a_delivery_is_consecutive_only_after_the_handles_own_acknowledgement(
    harness: impl TransportHarness,
) {
    let (sent, billing) = orders_for_billing(&harness, 5).await;
    let (mut one, mut two) = (billing.subscribe().await, billing.subscribe().await);

    let first = next_and_ack(&mut *one).await;
    assert_eq!(first.event.event_id, sent[0].event_id);
    assert!(
        !first.consecutive,
        "a handle's first delivery follows nothing of its own"
    );
    let second = next_and_ack(&mut *one).await;
    assert_eq!(second.event.event_id, sent[1].event_id);
    assert!(
        second.consecutive,
        "right after the handle's own acknowledgement"
    );

    let elsewhere = next_and_ack(&mut *two).await;
    assert_eq!(elsewhere.event.event_id, sent[2].event_id);
    assert!(
        !elsewhere.consecutive,
        "the other handle acknowledged nothing yet"
    );

    let after_other = one.next().await.expect("delivers");
    assert_eq!(after_other.event.event_id, sent[3].event_id);
    assert!(
        !after_other.consecutive,
        "another handle received an event in between"
    );
    let again = next_and_ack(&mut *one).await;
    assert_eq!(again.event.event_id, sent[3].event_id);
    assert!(
        again.attempt >= 2 && !again.consecutive,
        "a redelivery is never consecutive"
    );
    let last = next_and_ack(&mut *one).await;
    assert_eq!(last.event.event_id, sent[4].event_id);
    assert!(
        last.consecutive,
        "right after the handle's own acknowledgement"
    );
}

/// Dropping every handle and subscribing again resumes after the last acknowledged
/// event.
pub async fn a_subscription_resumes_after_its_last_acknowledgement(harness: impl TransportHarness) {
    let orders = harness.publisher(&service("orders")).await;
    orders
        .declare_topics(&[topic("order-events")])
        .await
        .expect("declares");
    let sent = publish_some(&*orders, "order-events", 1, 5).await;
    let subscriber = harness.subscriber().await;
    let subscription_spec = spec("billing", "orders", &["order-events"]);
    let mut subscription = subscriber
        .subscribe(&subscription_spec)
        .await
        .expect("subscribes");
    for expected in &sent[..3] {
        assert_eq!(
            next_and_ack(&mut *subscription).await.event.event_id,
            expected.event_id
        );
    }
    drop(subscription);
    let mut resumed = subscriber
        .subscribe(&subscription_spec)
        .await
        .expect("subscribes");
    assert_eq!(
        next_and_ack(&mut *resumed).await.event.event_id,
        sent[3].event_id
    );
    // Another subscription starts at the beginning.
    let mut other = subscriber
        .subscribe(&spec("billing", "audit", &["order-events"]))
        .await
        .expect("subscribes");
    assert_eq!(
        next_and_ack(&mut *other).await.event.event_id,
        sent[0].event_id
    );
}

/// A subscription receives the events of its topics only, of one service or several.
pub async fn a_subscription_receives_only_its_topics(harness: impl TransportHarness) {
    let orders = harness.publisher(&service("orders")).await;
    orders
        .declare_topics(&[topic("order-events"), topic("order-internal")])
        .await
        .expect("declares");
    let users = harness.publisher(&service("users")).await;
    users
        .declare_topics(&[topic("user-events")])
        .await
        .expect("declares");
    let public = publish_some(&*orders, "order-events", 1, 2).await;
    publish_some(&*orders, "order-internal", 3, 2).await;
    let more = publish_some(&*orders, "order-events", 5, 1).await;
    let registered = publish_some(&*users, "user-events", 1, 2).await;
    let subscriber = harness.subscriber().await;
    let mut subscription = subscriber
        .subscribe(&spec("billing", "mixed", &["order-events", "user-events"]))
        .await
        .expect("subscribes");
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(next_and_ack(&mut *subscription).await.event);
    }
    let of = |service_name: &str| -> Vec<EventId> {
        got.iter()
            .filter(|e| e.service_id.as_str() == service_name)
            .map(|e| e.event_id)
            .collect()
    };
    let expected_orders: Vec<EventId> = public.iter().chain(&more).map(|e| e.event_id).collect();
    assert_eq!(
        of("orders"),
        expected_orders,
        "order-internal is not subscribed"
    );
    let expected_users: Vec<EventId> = registered.iter().map(|e| e.event_id).collect();
    assert_eq!(of("users"), expected_users);
    // Nothing else is delivered: the next delivery is the next event of a subscribed
    // topic, not the later one of the unsubscribed topic.
    publish_some(&*orders, "order-internal", 6, 1).await;
    let last = publish_some(&*users, "user-events", 3, 1).await;
    let delivery = next_and_ack(&mut *subscription).await;
    assert_eq!(delivery.event.event_id, last[0].event_id);
}

/// Billing's subscription to the orders service's `order-events`.
struct Billing {
    subscriber: Arc<dyn crate::distributed::EventSubscriber>,
}

impl Billing {
    /// A new handle on the subscription (another instance of billing).
    async fn subscribe(&self) -> Box<dyn crate::distributed::Subscription> {
        self.subscriber
            .subscribe(&spec("billing", "orders", &["order-events"]))
            .await
            .expect("subscribes")
    }
}

/// `count` events published by orders under `order-events`, and billing's subscription
/// to them.
async fn orders_for_billing(
    harness: &impl TransportHarness,
    count: u64,
) -> (Vec<crate::distributed::DistributedEvent>, Billing) {
    let orders = harness.publisher(&service("orders")).await;
    orders
        .declare_topics(&[topic("order-events")])
        .await
        .expect("declares");
    let sent = publish_some(&*orders, "order-events", 1, count).await;
    let subscriber = harness.subscriber().await;
    (sent, Billing { subscriber })
}

/// The first `count` streams `s0`, `s1`, ... that `partition` contains.
fn streams_of(partition: Partition, count: usize) -> Vec<String> {
    (0..)
        .map(|n| format!("s{n}"))
        .filter(|id| partition.contains(&StreamId::try_new(id.as_str()).expect("valid")))
        .take(count)
        .collect()
}

/// Publishes `rounds` events on each of `streams` (round by round) under
/// `order-events`, from position `first_position`; returns them in order.
async fn publish_rounds(
    publisher: &dyn crate::distributed::EventPublisher,
    streams: &[String],
    rounds: u64,
    first_position: u64,
) -> Vec<crate::distributed::DistributedEvent> {
    let mut position = first_position;
    let mut events = Vec::new();
    for round in 1..=rounds {
        for stream in streams {
            events.push(event(publisher.service(), stream, round, position));
            position += 1;
        }
    }
    let batch: Vec<Publication> = events
        .iter()
        .map(|e| Publication::new(topic("order-events"), e.clone()))
        .collect();
    publisher.publish(&batch).await.expect("publishes");
    events
}

/// A subscription split four ways: each partition receives the events of its own
/// source streams and no others, in the publication's order; together they receive
/// every event once.
pub async fn a_split_subscription_delivers_each_stream_to_its_partition_in_order(
    harness: impl TransportHarness,
) {
    let orders = harness.publisher(&service("orders")).await;
    orders
        .declare_topics(&[topic("order-events")])
        .await
        .expect("declares");
    let partitions = spec("billing", "orders", &["order-events"])
        .split(4)
        .expect("valid");
    // Two streams in each partition, interleaved in the publication.
    let mut streams: Vec<String> = Vec::new();
    for part in &partitions {
        streams.extend(streams_of(part.partition, 2));
    }
    streams.sort();
    let sent = publish_rounds(&*orders, &streams, 3, 1).await;
    let subscriber = harness.subscriber().await;
    let mut handles = Vec::new();
    for part in &partitions {
        handles.push(subscriber.subscribe(part).await.expect("subscribes"));
    }
    for (part, handle) in partitions.iter().zip(handles.iter_mut()) {
        let expected: Vec<EventId> = sent
            .iter()
            .filter(|e| part.partition.contains(&e.stream_id))
            .map(|e| e.event_id)
            .collect();
        assert_eq!(expected.len(), 6, "two streams of three events each");
        let mut got = Vec::new();
        for _ in 0..expected.len() {
            got.push(next_and_ack(&mut **handle).await.event.event_id);
        }
        assert_eq!(
            got, expected,
            "partition {}: its streams, in order",
            part.partition
        );
    }
    // Nothing else was delivered to any partition: the next delivery of each is the
    // next event of its own streams.
    let more = publish_rounds(&*orders, &streams, 1, sent.len() as u64 + 1).await;
    for (part, handle) in partitions.iter().zip(handles.iter_mut()) {
        let delivery = next_and_ack(&mut **handle).await;
        let first_of_its_own = more
            .iter()
            .find(|e| part.partition.contains(&e.stream_id))
            .expect("each partition has streams");
        assert_eq!(delivery.event.event_id, first_of_its_own.event_id);
    }
}

/// The partitions of a subscription are handled at once: each holds an event of its
/// own streams while the others hold theirs, none acknowledged.
pub async fn the_partitions_of_a_subscription_hold_an_event_each_at_once(
    harness: impl TransportHarness,
) {
    let orders = harness.publisher(&service("orders")).await;
    orders
        .declare_topics(&[topic("order-events")])
        .await
        .expect("declares");
    let partitions = spec("billing", "orders", &["order-events"])
        .split(2)
        .expect("valid");
    let streams: Vec<String> = partitions
        .iter()
        .flat_map(|part| streams_of(part.partition, 1))
        .collect();
    let sent = publish_rounds(&*orders, &streams, 2, 1).await;
    let subscriber = harness.subscriber().await;
    let mut held = Vec::new();
    for part in &partitions {
        let mut handle = subscriber.subscribe(part).await.expect("subscribes");
        // A transport that kept one event in flight for the whole subscription would
        // never deliver the second partition's: the check fails instead of hanging.
        let delivery = tokio::time::timeout(std::time::Duration::from_secs(30), handle.next())
            .await
            .expect("a partition waited for another partition's acknowledgement")
            .expect("delivers");
        let first_of_its_own = sent
            .iter()
            .find(|e| part.partition.contains(&e.stream_id))
            .expect("each partition has a stream");
        assert_eq!(delivery.event.event_id, first_of_its_own.event_id);
        held.push((handle, delivery));
    }
    for (handle, delivery) in &mut held {
        handle.ack(delivery).await.expect("acknowledges");
    }
}

/// A subscription is split one way for its life: a partition of another count (or the
/// whole subscription), or one with other topics, is refused while it exists; another
/// partition of the same count and topics opens.
pub async fn a_subscription_split_another_way_is_refused(harness: impl TransportHarness) {
    let (_, billing) = orders_for_billing(&harness, 1).await;
    harness
        .publisher(&service("orders"))
        .await
        .declare_topics(&[topic("order-events"), topic("order-notes")])
        .await
        .expect("declares");
    let whole = spec("billing", "orders", &["order-events"]);
    let halves = whole.split(2).expect("valid");
    let _first = billing
        .subscriber
        .subscribe(&halves[0])
        .await
        .expect("subscribes");
    let with_notes = spec("billing", "orders", &["order-events", "order-notes"]);
    for other in [
        whole.split(4).expect("valid")[0].clone(),
        whole.clone(),
        with_notes.split(2).expect("valid")[1].clone(),
    ] {
        let refused = billing.subscriber.subscribe(&other).await;
        assert!(
            matches!(refused, Err(TransportError::Rejected { .. })),
            "partition {} of {:?} opened next to partition {}: {:?}",
            other.partition,
            other.topics,
            halves[0].partition,
            refused.err()
        );
    }
    billing
        .subscriber
        .subscribe(&halves[1])
        .await
        .expect("the other half opens");
    // Another subscription of the same service is its own.
    billing
        .subscriber
        .subscribe(&spec("billing", "audit", &["order-events"]))
        .await
        .expect("subscribes");
}

/// A subscription's backlog is what it has not acknowledged, of its topics (and its
/// partition) only, the event in flight included, with the oldest of them; none
/// before any handle opened it; an undeclared topic is unavailable.
pub async fn a_subscriptions_backlog_is_what_it_has_not_acknowledged(
    harness: impl TransportHarness,
) {
    use crate::distributed::Backlog;
    let orders = harness.publisher(&service("orders")).await;
    orders
        .declare_topics(&[topic("order-events"), topic("order-internal")])
        .await
        .expect("declares");
    let sent = publish_some(&*orders, "order-events", 1, 4).await;
    publish_some(&*orders, "order-internal", 5, 2).await;
    let subscriber = harness.subscriber().await;
    let billing = spec("billing", "orders", &["order-events"]);
    assert_eq!(
        subscriber.backlog(&billing).await.expect("answers"),
        None,
        "no handle opened it yet"
    );
    let backlog_of = |spec: SubscriptionSpec| {
        let subscriber = subscriber.clone();
        async move {
            subscriber
                .backlog(&spec)
                .await
                .expect("answers")
                .expect("it exists")
        }
    };
    let mut subscription = subscriber.subscribe(&billing).await.expect("subscribes");
    assert_eq!(
        backlog_of(billing.clone()).await,
        Backlog::new(4, Some(sent[0].occurred_at)),
        "everything of its topic, nothing of the other"
    );
    let delivery = subscription.next().await.expect("delivers");
    assert_eq!(delivery.event.event_id, sent[0].event_id);
    assert_eq!(
        backlog_of(billing.clone()).await,
        Backlog::new(4, Some(sent[0].occurred_at)),
        "the event in flight is not consumed yet"
    );
    subscription.ack(&delivery).await.expect("acknowledges");
    assert_eq!(
        backlog_of(billing.clone()).await,
        Backlog::new(3, Some(sent[1].occurred_at))
    );
    for expected in &sent[1..] {
        assert_eq!(
            next_and_ack(&mut *subscription).await.event.event_id,
            expected.event_id
        );
    }
    assert_eq!(backlog_of(billing.clone()).await, Backlog::new(0, None));
    let more = publish_some(&*orders, "order-events", 7, 1).await;
    assert_eq!(
        backlog_of(billing.clone()).await,
        Backlog::new(1, Some(more[0].occurred_at))
    );

    // A partition counts its own streams only.
    let all: Vec<&DistributedEvent> = sent.iter().chain(&more).collect();
    let even = StreamId::try_new("even").expect("valid");
    let mut handles = Vec::new();
    for part in spec("billing", "audit", &["order-events"])
        .split(2)
        .expect("valid")
    {
        let its: Vec<&DistributedEvent> = all
            .iter()
            .copied()
            .filter(|e| part.partition.contains(&e.stream_id))
            .collect();
        let mut handle = subscriber.subscribe(&part).await.expect("subscribes");
        assert_eq!(
            backlog_of(part.clone()).await,
            Backlog::new(its.len() as u64, its.first().map(|e| e.occurred_at)),
            "partition {}",
            part.partition
        );
        if part.partition.contains(&even) {
            assert_eq!(
                next_and_ack(&mut *handle).await.event.event_id,
                its[0].event_id
            );
            assert_eq!(
                backlog_of(part.clone()).await,
                Backlog::new(its.len() as u64 - 1, its.get(1).map(|e| e.occurred_at)),
                "partition {}",
                part.partition
            );
        }
        handles.push(handle);
    }

    let unknown = spec("billing", "nothing", &["no-such-topic"]);
    assert!(
        matches!(
            subscriber.backlog(&unknown).await,
            Err(TransportError::Unavailable { .. })
        ),
        "an undeclared topic is unavailable"
    );
}
