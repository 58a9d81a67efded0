//! Health checks over real stores and the in-memory broker: a filtered projection that
//! is caught up is not reported behind however far its checkpoint trails the head, one
//! that has work left is, with the age of its oldest event; the publisher check reports
//! what the broker holds against the store, and a broker that does not answer as down;
//! the subscription check reports what the subscription has not acknowledged, over the
//! in-memory broker and a real NATS server.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use eventcore::distributed::{
    Backlog, EventPublisher, EventSubscriber, Publication, PublicationPolicy, PublicationRule,
    PublisherRunner, ServiceId, Subscription, SubscriptionName, SubscriptionSpec, Topic,
    TransportError,
};
use eventcore::health::{
    CheckpointLag, HealthCheck, HealthStatus, PublisherHealth, SubscriptionHealth,
};
use eventcore::{
    AppendRequest, CheckpointStore, EventData, EventMetadata, EventPayload, EventStore, EventType,
    ExpectedVersion, GlobalPosition, ProjectionFilter, ProjectionName, StreamId,
};
use eventcore_memory::{InMemoryBroker, InMemoryEventStore};

async fn append(store: &InMemoryEventStore, stream: &str) -> GlobalPosition {
    let data = EventData::new(
        EventType::try_new("Happened").expect("valid"),
        EventPayload::from_json("{}").expect("valid"),
        EventMetadata::default(),
    );
    let outcome = store
        .append(AppendRequest::single(
            StreamId::try_new(stream).expect("valid"),
            ExpectedVersion::Any,
            vec![data],
        ))
        .await
        .expect("appends");
    outcome.events[0].global_position
}

#[tokio::test]
async fn a_caught_up_filtered_projection_is_not_behind_and_one_with_work_left_is() {
    let store = InMemoryEventStore::new();
    let view = ProjectionName::try_new("order-view").expect("valid");
    let handled = append(&store, "order-1").await;
    for _ in 0..5 {
        append(&store, "ledger").await;
    }
    store.save_checkpoint(&view, handled).await.expect("saved");
    let orders_only = ProjectionFilter::all().with_stream_prefix("order-");
    let check = |filter: ProjectionFilter| {
        CheckpointLag::new(
            view.clone(),
            Arc::new(store.clone()),
            Arc::new(store.clone()),
        )
        .with_filter(filter)
        .with_max_positions(3)
    };

    let found = check(orders_only.clone()).check().await;
    assert_eq!(found.status, HealthStatus::Up, "{found:?}");
    assert_eq!(
        (found.lag_positions, found.lag_seconds),
        (Some(0), Some(0.0))
    );

    // Without its filter, the five ledger events count against it.
    let found = check(ProjectionFilter::all()).check().await;
    assert_eq!(found.status, HealthStatus::Degraded, "{found:?}");
    assert_eq!(found.lag_positions, Some(5));
    assert!(found.lag_seconds.is_some_and(|s| s >= 0.0));

    // An order event it has not handled: behind, by every position up to the head.
    append(&store, "order-2").await;
    let found = check(orders_only).check().await;
    assert_eq!(found.status, HealthStatus::Degraded, "{found:?}");
    assert_eq!(found.lag_positions, Some(6));
    assert_eq!(found.name, "projection order-view");
}

/// A publisher whose broker stops answering when told to.
struct Flaky {
    inner: eventcore_memory::InMemoryPublisher,
    down: Arc<AtomicBool>,
}

#[async_trait]
impl EventPublisher for Flaky {
    fn service(&self) -> &ServiceId {
        self.inner.service()
    }
    async fn declare_topics(&self, topics: &[Topic]) -> Result<(), TransportError> {
        self.inner.declare_topics(topics).await
    }
    async fn publish(&self, batch: &[Publication]) -> Result<(), TransportError> {
        self.inner.publish(batch).await
    }
    async fn last_published(&self) -> Result<Option<GlobalPosition>, TransportError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(TransportError::Unavailable {
                message: "connection refused".to_owned(),
                source: None,
            });
        }
        self.inner.last_published().await
    }
}

#[tokio::test]
async fn the_publisher_check_compares_the_broker_with_the_store() {
    let store = InMemoryEventStore::new();
    let broker = InMemoryBroker::new();
    let service = ServiceId::try_new("orders").expect("valid");
    let down = Arc::new(AtomicBool::new(false));
    let publisher: Arc<dyn EventPublisher> = Arc::new(Flaky {
        inner: broker.publisher(service.clone()),
        down: Arc::clone(&down),
    });
    let public = ProjectionFilter::all().with_stream_prefix("order-");
    let check = PublisherHealth::new(Arc::clone(&publisher), Arc::new(store.clone()))
        .with_filter(public)
        .with_max_positions(1);
    for n in 0..3 {
        append(&store, &format!("order-{n}")).await;
    }

    let found = check.check().await;
    assert_eq!(found.name, "publisher orders");
    assert_eq!(found.status, HealthStatus::Degraded, "{found:?}");
    assert_eq!(found.lag_positions, Some(3));

    let policy = PublicationPolicy::new([PublicationRule::new(
        Topic::try_new("order-events").expect("valid"),
    )
    .with_stream_prefix("order-")])
    .expect("valid");
    let mut runner = PublisherRunner::new(
        Arc::new(store.clone()),
        Arc::new(store.clone()),
        Arc::clone(&publisher),
        policy,
    )
    .expect("valid runner");
    runner.publish_available().await.expect("publishes");
    let found = check.check().await;
    assert_eq!(found.status, HealthStatus::Up, "{found:?}");
    assert_eq!(found.lag_positions, Some(0));

    down.store(true, Ordering::SeqCst);
    let found = check.check().await;
    assert_eq!(found.status, HealthStatus::Down, "{found:?}");
    assert!(
        found
            .detail
            .as_deref()
            .is_some_and(|d| d.starts_with("the broker does not answer")),
        "{found:?}"
    );
}

/// A subscriber whose broker stops answering health questions on demand.
struct Unreachable {
    inner: Arc<dyn EventSubscriber>,
    down: Arc<AtomicBool>,
}

#[async_trait]
impl EventSubscriber for Unreachable {
    async fn subscribe(
        &self,
        spec: &SubscriptionSpec,
    ) -> Result<Box<dyn Subscription>, TransportError> {
        self.inner.subscribe(spec).await
    }
    async fn backlog(&self, spec: &SubscriptionSpec) -> Result<Option<Backlog>, TransportError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(TransportError::Unavailable {
                message: "connection refused".to_owned(),
                source: None,
            });
        }
        self.inner.backlog(spec).await
    }
}

/// Orders publishes three events; billing's subscription check is degraded before any
/// runner opened the subscription, degraded past its limit while it has them to
/// consume, up once it consumed them, and down when the broker does not answer.
async fn the_subscription_check_reports_what_is_not_acknowledged(
    publisher: Arc<dyn EventPublisher>,
    subscriber: Arc<dyn EventSubscriber>,
) {
    let store = InMemoryEventStore::new();
    for n in 0..3 {
        append(&store, &format!("order-{n}")).await;
    }
    let topic = Topic::try_new("order-events").expect("valid");
    let policy =
        PublicationPolicy::new([PublicationRule::new(topic.clone()).with_stream_prefix("order-")])
            .expect("valid");
    let mut runner = PublisherRunner::new(
        Arc::new(store.clone()),
        Arc::new(store.clone()),
        publisher,
        policy,
    )
    .expect("valid runner");
    runner.publish_available().await.expect("publishes");
    let spec = SubscriptionSpec::new(
        ServiceId::try_new("billing").expect("valid"),
        SubscriptionName::try_new("invoices").expect("valid"),
        [topic],
    );
    let down = Arc::new(AtomicBool::new(false));
    let subscriber: Arc<dyn EventSubscriber> = Arc::new(Unreachable {
        inner: subscriber,
        down: Arc::clone(&down),
    });
    let check = SubscriptionHealth::new(Arc::clone(&subscriber), spec.clone())
        .with_max_events(1)
        .with_max_lag(std::time::Duration::from_secs(3600));
    assert_eq!(check.name(), "subscription invoices");

    let found = check.check().await;
    assert_eq!(found.status, HealthStatus::Degraded, "{found:?}");
    assert!(
        found
            .detail
            .as_deref()
            .is_some_and(|d| d.contains("does not exist yet")),
        "{found:?}"
    );

    let mut subscription = subscriber.subscribe(&spec).await.expect("subscribes");
    let found = check.check().await;
    assert_eq!(found.status, HealthStatus::Degraded, "{found:?}");
    assert_eq!(found.lag_positions, Some(3));
    assert!(
        found.lag_seconds.is_some_and(|s| s >= 0.0),
        "the age of the oldest: {found:?}"
    );
    assert!(
        found
            .detail
            .as_deref()
            .is_some_and(|d| d.starts_with("3 events behind")),
        "{found:?}"
    );
    for _ in 0..3 {
        let delivery = subscription.next().await.expect("delivers");
        subscription.ack(&delivery).await.expect("acknowledges");
    }
    let found = check.check().await;
    assert_eq!(found.status, HealthStatus::Up, "{found:?}");
    assert_eq!(found.lag_positions, Some(0));
    assert_eq!(found.lag_seconds, Some(0.0));

    down.store(true, Ordering::SeqCst);
    let found = check.check().await;
    assert_eq!(found.status, HealthStatus::Down, "{found:?}");
}

#[tokio::test]
async fn the_subscription_check_on_the_memory_broker() {
    let broker = InMemoryBroker::new();
    the_subscription_check_reports_what_is_not_acknowledged(
        Arc::new(broker.publisher(ServiceId::try_new("orders").expect("valid"))),
        Arc::new(broker),
    )
    .await;
}

#[tokio::test]
#[cfg_attr(
    not(nats_tests),
    ignore = "needs a NATS server: set NATS_URL (scripts/test starts one)"
)]
async fn the_subscription_check_on_nats() {
    let transport = eventcore_tests::nats::fresh_transport().await;
    the_subscription_check_reports_what_is_not_acknowledged(
        Arc::new(transport.publisher(ServiceId::try_new("orders").expect("valid"))),
        Arc::new(transport.subscriber()),
    )
    .await;
}
