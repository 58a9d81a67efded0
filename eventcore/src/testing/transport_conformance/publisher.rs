//! The publisher runner on the transport: the store is the outbox, and the publication
//! ends complete, in log order and with every event once after every fault.

use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;

use super::{TransportHarness, next_and_ack, service, topic};
use crate::distributed::{
    EventPublisher, Publication, PublicationPolicy, PublicationRule, PublisherRunner, ServiceId,
    SubscriptionName, SubscriptionSpec, Topic, TransportError,
};
use crate::event::{EventData, EventPayload, RecordedEvent};
use crate::metadata::EventMetadata;
use crate::names::{EventType, StreamId};
use crate::store::{AppendRequest, LogQuery};
use crate::trace::TraceContext;
use crate::types::{ExpectedVersion, GlobalPosition};
use crate::{CheckpointStore, EventStore, ProjectionName};

const TRACE: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

fn orders() -> ServiceId {
    service("orders")
}

/// Order streams go to `order-events`; stock reservations, on a private stream, to
/// `stock-events`; the ledger stays private.
fn policy() -> PublicationPolicy {
    PublicationPolicy::new([
        PublicationRule::new(topic("order-events")).with_stream_prefix("order-"),
        PublicationRule::new(topic("stock-events"))
            .with_event_types(["StockReserved"])
            .expect("valid"),
    ])
    .expect("valid policy")
}

fn topics() -> [Topic; 2] {
    [topic("order-events"), topic("stock-events")]
}

fn checkpoint_name() -> ProjectionName {
    ProjectionName::try_new("publisher-orders").expect("valid")
}

async fn append(store: &impl EventStore, stream: &str, event_type: &str, n: u64) {
    let data = EventData::new(
        EventType::try_new(event_type).expect("valid"),
        EventPayload::from_json(format!(r#"{{"n":{n}}}"#)).expect("valid"),
        EventMetadata::default().with_trace_context(TraceContext::new(TRACE).expect("valid")),
    );
    store
        .append(AppendRequest::single(
            StreamId::try_new(stream).expect("valid"),
            ExpectedVersion::Any,
            vec![data],
        ))
        .await
        .expect("appends");
}

/// `count` rounds of an order event, a private ledger event and, every third round, a
/// stock reservation on a private stream.
async fn fill(store: &impl EventStore, from: u64, count: u64) {
    for n in from..from + count {
        append(store, &format!("order-{}", n % 4), "OrderPlaced", n).await;
        append(store, "ledger", "Booked", n).await;
        if n.is_multiple_of(3) {
            append(store, "stock-apple", "StockReserved", n).await;
        }
    }
}

/// What the policy makes public, in log order.
async fn public_events(store: &impl EventStore) -> Vec<RecordedEvent> {
    let policy = policy();
    store
        .read_all(&LogQuery::new())
        .await
        .expect("reads")
        .into_iter()
        .filter(|event| policy.topic_of(event).is_some())
        .collect()
}

fn runner<S: EventStore + CheckpointStore + Clone>(
    store: &S,
    publisher: Arc<dyn EventPublisher>,
) -> PublisherRunner {
    PublisherRunner::new(
        Arc::new(store.clone()),
        Arc::new(store.clone()),
        publisher,
        policy(),
    )
    .expect("valid runner")
    .with_batch_size(7)
}

/// Reads the whole publication through a new subscription and checks that it holds
/// exactly the public events, in log order, once each, with intact envelopes. After
/// them, a new public event must be the next delivery: nothing else was held.
async fn assert_complete<H: TransportHarness>(harness: &H, store: &H::Store, check: &str) {
    let expected = public_events(store).await;
    let subscriber = harness.subscriber().await;
    let spec = SubscriptionSpec::new(
        service("auditor"),
        SubscriptionName::try_new(check).expect("valid name"),
        topics(),
    );
    let mut subscription = subscriber.subscribe(&spec).await.expect("subscribes");
    for recorded in &expected {
        let envelope = next_and_ack(&mut *subscription).await.event;
        assert_eq!(
            (envelope.event_id, envelope.global_position),
            (recorded.event_id, recorded.global_position),
            "every public event once, in log order"
        );
        assert_eq!(envelope.stream_id, recorded.stream_id);
        assert_eq!(envelope.stream_version, recorded.stream_version);
        assert_eq!(envelope.payload.as_str(), recorded.payload.as_str());
        assert_eq!(envelope.occurred_at, recorded.recorded_at);
        assert_eq!(envelope.service_id, orders());
        assert_eq!(
            envelope
                .trace_context
                .as_ref()
                .map(TraceContext::traceparent),
            Some(TRACE)
        );
    }
    let publisher = harness.publisher(&orders()).await;
    assert_eq!(
        publisher.last_published().await.expect("reads"),
        expected.last().map(|e| e.global_position),
        "the publication ends at the last public event"
    );
    append(store, "order-sentinel", "OrderPlaced", 0).await;
    runner(store, publisher)
        .publish_available()
        .await
        .expect("publishes");
    let sentinel = next_and_ack(&mut *subscription).await.event;
    assert_eq!(
        sentinel.stream_id.as_str(),
        "order-sentinel",
        "the publication held an event more than the public ones: {sentinel:?}"
    );
}

/// Only the policy's events are published, in log order, and the checkpoint follows the
/// log.
pub async fn the_publisher_publishes_the_public_events_in_log_order(
    harness: impl TransportHarness,
) {
    let store = harness.store().await;
    fill(&store, 0, 10).await;
    let mut publisher = runner(&store, harness.publisher(&orders()).await);
    let summary = publisher.publish_available().await.expect("publishes");
    assert_eq!(summary.published, public_events(&store).await.len() as u64);
    assert_eq!(
        store
            .load_checkpoint(&checkpoint_name())
            .await
            .expect("reads"),
        store.head_position().await.expect("reads"),
        "the checkpoint passes the private events at the end too"
    );
    let again = publisher.publish_available().await.expect("publishes");
    assert_eq!(again.published, 0);
    assert_complete(&harness, &store, "complete").await;
}

/// A publisher restarted (a new process, a new handle) goes on where the publication
/// ends.
pub async fn a_restarted_publisher_resumes_without_a_gap_or_a_repeat(
    harness: impl TransportHarness,
) {
    let store = harness.store().await;
    fill(&store, 0, 6).await;
    let before = public_events(&store).await.len() as u64;
    let first = runner(&store, harness.publisher(&orders()).await)
        .publish_available()
        .await
        .expect("publishes");
    assert_eq!(first.published, before);
    fill(&store, 6, 6).await;
    let after = public_events(&store).await.len() as u64;
    let restarted = runner(&store, harness.publisher(&orders()).await)
        .publish_available()
        .await
        .expect("publishes");
    assert_eq!(restarted.published, after - before, "the new events only");
    assert_complete(&harness, &store, "restarted").await;
}

/// How many public events come after `held` (the end of the publication).
async fn not_held(store: &impl EventStore, held: Option<GlobalPosition>) -> u64 {
    public_events(store)
        .await
        .iter()
        .filter(|e| held.is_none_or(|held| e.global_position > held))
        .count() as u64
}

/// A fault wrapper for tests: publishes through the wrapped transport, then loses the
/// answer. The events are held, but the caller hears of a failure, as a publisher that
/// crashed after the publish and before its checkpoint would (had it lived).
pub struct AnswerLost(pub Arc<dyn EventPublisher>);

impl std::fmt::Debug for AnswerLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("AnswerLost").field(self.0.service()).finish()
    }
}

#[async_trait]
impl EventPublisher for AnswerLost {
    fn service(&self) -> &ServiceId {
        self.0.service()
    }

    async fn declare_topics(&self, topics: &[Topic]) -> Result<(), TransportError> {
        self.0.declare_topics(topics).await
    }

    async fn publish(&self, batch: &[Publication]) -> Result<(), TransportError> {
        self.0.publish(batch).await?;
        Err(TransportError::unavailable(
            "the connection dropped before the answer",
            None,
        ))
    }

    async fn last_published(&self) -> Result<Option<GlobalPosition>, TransportError> {
        self.0.last_published().await
    }
}

/// A crash between publish and checkpoint: the restarted publisher asks the broker and
/// publishes nothing again, whether its checkpoint is behind or was never written.
pub async fn a_crash_between_publish_and_checkpoint_publishes_nothing_twice(
    harness: impl TransportHarness,
) {
    let store = harness.store().await;
    fill(&store, 0, 9).await;
    let crashed = runner(
        &store,
        Arc::new(AnswerLost(harness.publisher(&orders()).await)),
    )
    .publish_available()
    .await;
    assert!(
        matches!(&crashed, Err(error) if error.is_retryable()),
        "{crashed:?}"
    );
    let checkpoint = store
        .load_checkpoint(&checkpoint_name())
        .await
        .expect("reads");
    let first_public = public_events(&store).await[0].global_position;
    assert!(
        checkpoint.is_none_or(|c| c < first_public),
        "the checkpoint passed events whose publication was not acknowledged: {checkpoint:?}"
    );
    let before_restart = harness
        .publisher(&orders())
        .await
        .last_published()
        .await
        .expect("reads");
    assert!(
        before_restart.is_some(),
        "the lost answer's events are held"
    );
    let summary = runner(&store, harness.publisher(&orders()).await)
        .publish_available()
        .await
        .expect("publishes");
    assert_eq!(
        summary.published,
        not_held(&store, before_restart).await,
        "what the broker held is not published again"
    );
    // A checkpoint store that knows nothing (the checkpoint was never written).
    fill(&store, 9, 3).await;
    runner(
        &store,
        Arc::new(AnswerLost(harness.publisher(&orders()).await)),
    )
    .publish_available()
    .await
    .expect_err("the answer is lost");
    let before_restart = harness
        .publisher(&orders())
        .await
        .last_published()
        .await
        .expect("reads");
    let forgetful = harness.store().await;
    let mut restarted = PublisherRunner::new(
        Arc::new(store.clone()),
        Arc::new(forgetful.clone()),
        harness.publisher(&orders()).await,
        policy(),
    )
    .expect("valid runner");
    let summary = restarted.publish_available().await.expect("publishes");
    assert_eq!(
        summary.published,
        not_held(&store, before_restart).await,
        "what the broker held is not published again"
    );
    assert_eq!(
        forgetful
            .load_checkpoint(&checkpoint_name())
            .await
            .expect("reads"),
        store.head_position().await.expect("reads")
    );
    assert_complete(&harness, &store, "crashed").await;
}

/// Stores the next `n` events through the transport, then fails (a connection lost in
/// the middle of a pipelined batch).
struct FailsInsideABatch {
    inner: Arc<dyn EventPublisher>,
    after: Mutex<Option<usize>>,
}

#[async_trait]
impl EventPublisher for FailsInsideABatch {
    fn service(&self) -> &ServiceId {
        self.inner.service()
    }

    async fn declare_topics(&self, topics: &[Topic]) -> Result<(), TransportError> {
        self.inner.declare_topics(topics).await
    }

    async fn publish(&self, batch: &[Publication]) -> Result<(), TransportError> {
        // Counted across batches, as a connection drops wherever it is.
        let after = {
            let mut after = self.after.lock();
            match *after {
                Some(n) if n < batch.len() => after.take(),
                Some(n) => {
                    *after = Some(n - batch.len());
                    None
                }
                None => None,
            }
        };
        match after {
            Some(n) => {
                self.inner.publish(&batch[..n]).await?;
                Err(TransportError::unavailable(
                    format!("the connection dropped after {n} events of the batch"),
                    None,
                ))
            }
            None => self.inner.publish(batch).await,
        }
    }

    async fn last_published(&self) -> Result<Option<GlobalPosition>, TransportError> {
        self.inner.last_published().await
    }
}

/// A publish that fails inside a batch: the publication is always a prefix of the
/// public events, the checkpoint never passes what was not acknowledged, and the same
/// runner goes on without a gap or a repeat.
pub async fn a_publish_failing_inside_a_batch_resumes_without_a_gap_or_a_repeat(
    harness: impl TransportHarness,
) {
    let store = harness.store().await;
    fill(&store, 0, 15).await;
    let failing = Arc::new(FailsInsideABatch {
        inner: harness.publisher(&orders()).await,
        after: Mutex::new(None),
    });
    let mut publisher = runner(&store, failing.clone());
    let subscriber = harness.subscriber().await;
    let spec = SubscriptionSpec::new(
        service("auditor"),
        SubscriptionName::try_new("prefix").expect("valid name"),
        topics(),
    );
    let mut held = Vec::new();
    let mut subscription = None;
    for (round, stored_first) in [3_usize, 0, 5, 1].into_iter().enumerate() {
        *failing.after.lock() = Some(stored_first);
        let failed = publisher.publish_available().await;
        assert!(
            matches!(&failed, Err(error) if error.is_retryable()),
            "{failed:?}"
        );
        // What the broker holds is a prefix of the public events.
        let last = failing.last_published().await.expect("reads");
        if let Some(last) = last {
            let subscription = match &mut subscription {
                Some(open) => open,
                None => subscription.insert(subscriber.subscribe(&spec).await.expect("subscribes")),
            };
            while held.last().is_none_or(|&(_, p)| p < last) {
                let event = next_and_ack(&mut **subscription).await.event;
                held.push((event.event_id, event.global_position));
            }
        }
        let public: Vec<_> = public_events(&store)
            .await
            .iter()
            .map(|e| (e.event_id, e.global_position))
            .collect();
        assert_eq!(held[..], public[..held.len()], "a prefix, in order, once");
        // The checkpoint never passes the first public event not held.
        let checkpoint = store
            .load_checkpoint(&checkpoint_name())
            .await
            .expect("reads");
        if let Some(&(_, next)) = public.get(held.len()) {
            assert!(
                checkpoint.is_none_or(|c| c < next),
                "the checkpoint {checkpoint:?} passed {next}, which the broker does not hold"
            );
        }
        fill(&store, 100 + round as u64 * 10, 2).await;
    }
    publisher.publish_available().await.expect("publishes");
    assert_complete(&harness, &store, "batches").await;
}

/// A broker that lost acknowledged events in a crash gets exactly those again, in
/// order, from a restarted publisher whose checkpoint says they were published.
pub async fn a_broker_that_lost_acknowledged_events_gets_them_again_in_order(
    harness: impl TransportHarness,
) {
    let store = harness.store().await;
    fill(&store, 0, 12).await;
    runner(&store, harness.publisher(&orders()).await)
        .publish_available()
        .await
        .expect("publishes");
    assert_eq!(
        store
            .load_checkpoint(&checkpoint_name())
            .await
            .expect("reads"),
        store.head_position().await.expect("reads")
    );
    harness.lose_last_messages(&orders(), 4).await;
    let public = public_events(&store).await;
    assert_eq!(
        harness
            .publisher(&orders())
            .await
            .last_published()
            .await
            .expect("reads"),
        Some(public[public.len() - 5].global_position),
        "the crash lost 4"
    );
    let summary = runner(&store, harness.publisher(&orders()).await)
        .publish_available()
        .await
        .expect("publishes");
    assert_eq!(summary.published, 4, "exactly the lost ones again");
    assert_complete(&harness, &store, "lost").await;
}

/// A running publisher (the same runner, the same handle) whose broker lost events
/// publishes them again before newer ones.
pub async fn a_running_publisher_republishes_lost_events_before_newer_ones(
    harness: impl TransportHarness,
) {
    let store = harness.store().await;
    let mut publisher = runner(&store, harness.publisher(&orders()).await);
    fill(&store, 0, 5).await;
    publisher.publish_available().await.expect("publishes");
    harness.lose_last_messages(&orders(), 3).await;
    fill(&store, 5, 5).await;
    publisher.publish_available().await.expect("publishes");
    assert_complete(&harness, &store, "running").await;
}

/// The same live: the runner follows the log, the broker loses its last acknowledged
/// events, and new ones are appended. A live pass does not ask the broker first (the
/// reconcile interval is set out of reach here); the first publish, chained on an end
/// the broker no longer holds, is refused, and the runner reconciles and publishes the
/// lost events before the new ones.
pub async fn a_live_publisher_republishes_lost_events_before_newer_ones(
    harness: impl TransportHarness,
) {
    let store = harness.store().await;
    let live = Live::start(&harness, &store, std::time::Duration::from_secs(3600)).await;
    let metrics = live.metrics.clone();
    // Waits (bounded) until every public event of the store is behind the runner.
    let caught_up = async |what: &str| {
        let last = public_events(&store)
            .await
            .last()
            .map_or(0, |e| e.global_position.value());
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        while metrics.position() < last {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the live publisher did not publish {what} (at {}, log at {last})",
                metrics.position()
            );
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    };
    fill(&store, 0, 5).await;
    caught_up("the first events").await;
    harness.lose_last_messages(&orders(), 3).await;
    fill(&store, 5, 5).await;
    caught_up("past the loss").await;
    live.stop().await;
    assert_complete(&harness, &store, "live").await;
}

/// Live, the broker loses its last events and then only private events come, faster
/// than the reconcile interval: they publish nothing, so no refused publish reveals the
/// loss, and the interval must still bring it to light (a deadline, not a timer each
/// new event starts again).
pub async fn a_live_publisher_republishes_lost_events_while_only_private_ones_come(
    harness: impl TransportHarness,
) {
    let interval = std::time::Duration::from_millis(300);
    let store = harness.store().await;
    let live = Live::start(&harness, &store, interval).await;
    let metrics = live.metrics.clone();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    fill(&store, 0, 5).await;
    let last_public = public_events(&store)
        .await
        .last()
        .map(|e| e.global_position)
        .expect("public events");
    while metrics.position() < last_public.value() {
        assert!(tokio::time::Instant::now() < deadline, "never published");
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    harness.lose_last_messages(&orders(), 3).await;
    let broker = harness.publisher(&orders()).await;
    // Private events, one after another as soon as the runner passed the previous one.
    let mut n = 100;
    while broker.last_published().await.expect("reads") != Some(last_public) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lost events were not published again while private events kept coming"
        );
        append(&store, "ledger", "Booked", n).await;
        n += 1;
        let written = store
            .read_all(&LogQuery::new())
            .await
            .expect("reads")
            .last()
            .map_or(0, |e| e.global_position.value());
        while metrics.position() < written {
            assert!(tokio::time::Instant::now() < deadline, "the runner stopped");
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }
    live.stop().await;
    assert_complete(&harness, &store, "private").await;
}

/// A publisher runner following the log in a task of its own (quick retries, the
/// given reconcile interval), until [`Live::stop`].
struct Live {
    metrics: crate::distributed::PublisherMetrics,
    stop: tokio::sync::oneshot::Sender<()>,
    running: tokio::task::JoinHandle<crate::Result<()>>,
}

impl Live {
    async fn start<H: TransportHarness>(
        harness: &H,
        store: &H::Store,
        reconcile_interval: std::time::Duration,
    ) -> Self {
        let mut publisher = runner(store, harness.publisher(&orders()).await)
            .with_reconcile_interval(reconcile_interval)
            .with_retry_policy(
                crate::RetryPolicy::new()
                    .with_initial_delay(std::time::Duration::from_millis(1))
                    .with_max_delay(std::time::Duration::from_millis(10)),
            );
        let metrics = publisher.metrics();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(async move {
            publisher
                .run(async {
                    let _ = stopped.await;
                })
                .await
        });
        Live {
            metrics,
            stop,
            running,
        }
    }

    /// Stops the runner; it must end cleanly.
    async fn stop(self) {
        let _ = self.stop.send(());
        self.running
            .await
            .expect("joins")
            .expect("the run ends cleanly");
    }
}
