//! The metrics EventCore emits (`eventcore::metrics`), read back through
//! `metrics-util`'s debugging recorder: names, labels and values for commands (success,
//! refusal, a real version conflict and its retry), publication and consumption, and
//! snapshots (used, ignored, saved).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use eventcore::metrics::{
    COMMAND_DURATION_SECONDS, COMMAND_ERRORS_TOTAL, COMMAND_RETRIES_TOTAL, COMMANDS_TOTAL,
    EVENT_LAG_SECONDS, EVENTS_APPENDED_TOTAL, EVENTS_CONSUMED_TOTAL, EVENTS_PUBLISHED_TOTAL,
    VERSION_CONFLICTS_TOTAL,
};
use eventcore::{
    AppendOutcome, AppendRequest, CommandExecutor, EventData, EventMetadata, EventStore,
    ExpectedVersion, GlobalPosition, IdempotencyKey, LogQuery, RecordedEvent, StreamAppend,
    StreamId, StreamsSnapshot,
};
use eventcore_memory::{InMemoryBroker, InMemoryEventStore};
use eventcore_tests::bank::{BankEvent, Open, Transfer, account};
use eventcore_tests::two_services::{self, PlaceOrder};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

/// Every metric of a snapshot: (name, sorted labels) → value.
type Seen = BTreeMap<(String, Vec<(String, String)>), DebugValue>;

fn seen(snapshotter: &Snapshotter) -> Seen {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let key = key.key();
            let mut labels: Vec<(String, String)> = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            labels.sort();
            ((key.name().to_owned(), labels), value)
        })
        .collect()
}

fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut labels: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    labels.sort();
    labels
}

fn counter(seen: &Seen, name: &str, pairs: &[(&str, &str)]) -> Option<u64> {
    match seen.get(&(name.to_owned(), labels(pairs))) {
        Some(DebugValue::Counter(n)) => Some(*n),
        Some(other) => panic!("{name} is not a counter: {other:?}"),
        None => None,
    }
}

fn histogram(seen: &Seen, name: &str, pairs: &[(&str, &str)]) -> Vec<f64> {
    match seen.get(&(name.to_owned(), labels(pairs))) {
        Some(DebugValue::Histogram(values)) => values.iter().map(|v| v.0).collect(),
        Some(other) => panic!("{name} is not a histogram: {other:?}"),
        None => Vec::new(),
    }
}

/// Runs `test` on a current-thread runtime with `recorder` as this thread's recorder:
/// every task of the runtime emits into it, and no other test's metrics do.
fn with_recorder<F: std::future::Future<Output = ()>>(
    recorder: &DebuggingRecorder,
    test: impl FnOnce() -> F,
) {
    metrics::with_local_recorder(recorder, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
            .block_on(test());
    });
}

/// A store in which another writer appends to a stream right after the first read of
/// it: the command that read it meets a real version conflict, then retries.
#[derive(Debug, Clone)]
struct Interleaved {
    inner: InMemoryEventStore,
    stream: StreamId,
    done: Arc<AtomicBool>,
}

#[async_trait]
impl EventStore for Interleaved {
    async fn read_streams(&self, streams: &[StreamId]) -> eventcore::Result<StreamsSnapshot> {
        let snapshot = self.inner.read_streams(streams).await?;
        if streams.contains(&self.stream) && !self.done.swap(true, Ordering::SeqCst) {
            let deposit = EventData::from_event(
                &BankEvent::Deposited { amount: 1 },
                EventMetadata::default(),
            )?;
            self.inner
                .append(AppendRequest::new().with_stream(StreamAppend::new(
                    self.stream.clone(),
                    ExpectedVersion::Any,
                    vec![deposit],
                )))
                .await?;
        }
        Ok(snapshot)
    }

    async fn append(&self, request: AppendRequest) -> eventcore::Result<AppendOutcome> {
        self.inner.append(request).await
    }

    async fn read_all(&self, query: &LogQuery) -> eventcore::Result<Vec<RecordedEvent>> {
        self.inner.read_all(query).await
    }

    async fn head_position(&self) -> eventcore::Result<Option<GlobalPosition>> {
        self.inner.head_position().await
    }

    async fn wait_for_events(&self, after: Option<GlobalPosition>) -> eventcore::Result<()> {
        self.inner.wait_for_events(after).await
    }

    async fn idempotent_outcome(
        &self,
        key: &IdempotencyKey,
    ) -> eventcore::Result<Option<AppendOutcome>> {
        self.inner.idempotent_outcome(key).await
    }
}

#[test]
fn commands_are_counted_timed_and_their_errors_conflicts_and_retries_named() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    with_recorder(&recorder, || async {
        let store = Interleaved {
            inner: InMemoryEventStore::new(),
            stream: account(0),
            done: Arc::new(AtomicBool::new(true)),
        };
        let executor = CommandExecutor::new(Arc::new(store.clone()));
        for n in 0..2 {
            executor
                .execute(&Open {
                    account: account(n),
                    initial: 100,
                })
                .await
                .expect("opens");
        }
        // Opened already: a business rule refuses it.
        let refused = executor
            .execute(&Open {
                account: account(0),
                initial: 1,
            })
            .await
            .expect_err("already open");
        assert_eq!(refused.kind(), "business_rule_violation");
        // Another writer gets in between the transfer's read and its append.
        store.done.store(false, Ordering::SeqCst);
        let moved = executor
            .execute(&Transfer {
                from: account(0),
                to: account(1),
                amount: 10,
            })
            .await
            .expect("transfers on the second attempt");
        assert_eq!(moved.attempts, 2, "the interleaving forced one conflict");
        // Another writer while the transfer's state is kept: its cached state is behind,
        // and the append from it meets a conflict inside the attempt.
        store
            .inner
            .append(AppendRequest::new().with_stream(StreamAppend::new(
                account(0),
                ExpectedVersion::Any,
                vec![
                    EventData::from_event(
                        &BankEvent::Deposited { amount: 1 },
                        EventMetadata::default(),
                    )
                    .expect("an event"),
                ],
            )))
            .await
            .expect("appends");
        executor
            .execute(&Transfer {
                from: account(0),
                to: account(1),
                amount: 10,
            })
            .await
            .expect("transfers");
    });
    let seen = seen(&snapshotter);
    let open = std::any::type_name::<Open>();
    let transfer = std::any::type_name::<Transfer>();
    assert_eq!(
        counter(
            &seen,
            COMMANDS_TOTAL,
            &[("command", open), ("outcome", "success")]
        ),
        Some(2)
    );
    assert_eq!(
        counter(
            &seen,
            COMMANDS_TOTAL,
            &[("command", open), ("outcome", "error")]
        ),
        Some(1)
    );
    assert_eq!(
        counter(
            &seen,
            COMMAND_ERRORS_TOTAL,
            &[("command", open), ("kind", "business_rule_violation")]
        ),
        Some(1)
    );
    assert_eq!(
        counter(
            &seen,
            COMMANDS_TOTAL,
            &[("command", transfer), ("outcome", "success")]
        ),
        Some(2),
        "a command is counted once, whatever its attempts"
    );
    assert_eq!(
        counter(&seen, VERSION_CONFLICTS_TOTAL, &[("command", transfer)]),
        Some(2),
        "the retried conflict and the kept state's"
    );
    assert_eq!(
        counter(
            &seen,
            COMMAND_RETRIES_TOTAL,
            &[("command", transfer), ("reason", "version_conflict")]
        ),
        Some(1)
    );
    assert_eq!(
        counter(&seen, EVENTS_APPENDED_TOTAL, &[("command", open)]),
        Some(2)
    );
    assert_eq!(
        counter(&seen, EVENTS_APPENDED_TOTAL, &[("command", transfer)]),
        Some(4)
    );
    let durations = histogram(&seen, COMMAND_DURATION_SECONDS, &[("command", open)]);
    assert_eq!(durations.len(), 3, "every execution timed: {durations:?}");
    assert!(durations.iter().all(|d| d.is_finite() && *d >= 0.0));
    assert_eq!(
        histogram(&seen, COMMAND_DURATION_SECONDS, &[("command", transfer)]).len(),
        2
    );
}

#[test]
fn publication_and_consumption_are_counted_per_service_topic_and_subscription() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let orders_placed = 7;
    with_recorder(&recorder, || async move {
        let broker = InMemoryBroker::new();
        let orders_store = InMemoryEventStore::new();
        let orders: Arc<dyn EventStore> = Arc::new(orders_store.clone());
        let billing: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
        let executor = CommandExecutor::new(orders.clone());
        for n in 0..orders_placed {
            executor
                .execute(&PlaceOrder {
                    order: StreamId::try_new(format!("order-o{n}")).expect("valid"),
                    id: format!("o{n}"),
                    amount: 10 + n as u64,
                })
                .await
                .expect("places");
        }
        let mut publisher =
            two_services::publisher(&orders, Arc::new(orders_store.clone()), &broker);
        publisher.publish_available().await.expect("publishes");
        let mut runner = two_services::subscriber(&billing, &broker);
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let running = tokio::spawn(async move {
            runner
                .run(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
        });
        // Two events per order (placed, confirmed), one effect each.
        two_services::wait_for_invoices(&billing, 2 * orders_placed).await;
        stop.send(true).expect("running");
        running.await.expect("joins").expect("ran");
    });
    let seen = seen(&snapshotter);
    assert_eq!(
        counter(
            &seen,
            EVENTS_PUBLISHED_TOTAL,
            &[("service", "orders"), ("topic", "order-events")]
        ),
        Some(2 * orders_placed as u64)
    );
    // The runner sees the stop only between deliveries, so the last one was
    // acknowledged (and counted) before it returned.
    let consumed = counter(
        &seen,
        EVENTS_CONSUMED_TOTAL,
        &[
            ("service", "billing"),
            ("subscription", "invoices"),
            ("topic", "order-events"),
        ],
    );
    assert_eq!(consumed, Some(2 * orders_placed as u64));
    let lags = histogram(
        &seen,
        EVENT_LAG_SECONDS,
        &[("service", "billing"), ("subscription", "invoices")],
    );
    assert_eq!(lags.len(), 2 * orders_placed, "one lag per event consumed");
    assert!(lags.iter().all(|lag| lag.is_finite() && *lag >= 0.0));
}

#[test]
fn circuit_breaker_state_changes_state_and_calls_are_counted() {
    use eventcore::circuit_breaker::{
        CALLS_TOTAL, CircuitBreaker, CircuitBreakerConfig, STATE, STATE_CHANGES_TOTAL,
    };
    use std::time::Duration;

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let counters = std::cell::RefCell::new(BTreeMap::<(String, Vec<(String, String)>), u64>::new());
    with_recorder(&recorder, || async {
        let clock = eventcore::ManualClock::default();
        let breaker = CircuitBreaker::with_clock(
            "card-gateway",
            CircuitBreakerConfig::new(2, Duration::from_secs(30), Duration::from_secs(5))
                .expect("valid"),
            Arc::new(clock.clone()),
        );
        // A snapshot takes the counters' values (and resets them): keep their sums.
        let gauge_now = |snapshotter: &Snapshotter| {
            let now = seen(snapshotter);
            let mut counters = counters.borrow_mut();
            for (key, value) in &now {
                if let DebugValue::Counter(n) = value {
                    *counters.entry(key.clone()).or_insert(0) += n;
                }
            }
            match now.get(&(STATE.to_owned(), labels(&[("breaker", "card-gateway")]))) {
                Some(DebugValue::Gauge(value)) => value.0,
                other => panic!("{STATE} is not a gauge: {other:?}"),
            }
        };
        assert_eq!(gauge_now(&snapshotter), 0.0, "closed from the start");
        for _ in 0..2 {
            let _ = breaker.call(|| async { Err::<(), _>("down") }).await;
        }
        let _ = breaker.call(|| async { Ok::<_, &str>(()) }).await;
        clock.advance(Duration::from_secs(30));
        breaker
            .call(|| async { Ok::<_, &str>(()) })
            .await
            .expect("the trial succeeds");
        // A snapshot resets a gauge to 0: read it only where the state set last is not
        // the one before it (half-open, 2, before this close; closed, 0, before the
        // next open).
        assert_eq!(gauge_now(&snapshotter), 0.0, "closed again");
        for _ in 0..2 {
            let _ = breaker.call(|| async { Err::<(), _>("down") }).await;
        }
        assert_eq!(gauge_now(&snapshotter), 1.0, "open again");
    });
    let counters = counters.into_inner();
    let count = |name: &str, pairs: &[(&str, &str)]| {
        counters.get(&(name.to_owned(), labels(pairs))).copied()
    };
    let breaker = ("breaker", "card-gateway");
    for (from, to, n) in [
        ("closed", "open", 2),
        ("open", "half_open", 1),
        ("half_open", "closed", 1),
    ] {
        assert_eq!(
            count(STATE_CHANGES_TOTAL, &[breaker, ("from", from), ("to", to)]),
            Some(n),
            "{from} -> {to}"
        );
    }
    for (outcome, n) in [("failure", 4), ("rejected", 1), ("success", 1)] {
        assert_eq!(
            count(CALLS_TOTAL, &[breaker, ("outcome", outcome)]),
            Some(n),
            "{outcome}"
        );
    }
    assert_eq!(count(CALLS_TOTAL, &[breaker, ("outcome", "timeout")]), None);
}

/// The executor keeps its metric handles, registered with the recorder in effect when
/// it first ran a command type, and registers them again when another one is in effect:
/// a recorder installed after the first commands ran (here: none, then local ones that
/// all live at once, so at distinct addresses) sees what follows.
#[test]
fn an_executor_emits_into_the_recorder_in_effect_even_after_it_changes() {
    let executor = CommandExecutor::new(InMemoryEventStore::new());
    let open = |n| Open {
        account: account(n),
        initial: 100,
    };
    let success = [
        ("command", std::any::type_name::<Open>()),
        ("outcome", "success"),
    ];
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime")
        .block_on(executor.execute(&open(0)))
        .expect("opens without a recorder");
    let recorders: Vec<DebuggingRecorder> = (0..3).map(|_| DebuggingRecorder::new()).collect();
    for (n, recorder) in recorders.iter().enumerate() {
        let snapshotter = recorder.snapshotter();
        with_recorder(recorder, || async {
            executor.execute(&open(n + 1)).await.expect("opens");
        });
        let seen = seen(&snapshotter);
        assert_eq!(
            counter(&seen, COMMANDS_TOTAL, &success),
            Some(1),
            "recorder {n} sees its command, not the handles of an earlier one"
        );
    }
}

/// Every gauge set: (name, sorted labels, value), in order.
type GaugeSets = Arc<parking_lot::Mutex<Vec<(String, Vec<(String, String)>, f64)>>>;

/// A recorder that keeps every value each gauge was set to, in order (the debugging
/// recorder keeps only the last one, and resets it when read).
#[derive(Debug, Default, Clone)]
struct GaugeHistory {
    sets: GaugeSets,
}

#[derive(Debug)]
struct HistoryGauge {
    key: metrics::Key,
    sets: GaugeSets,
}

impl metrics::GaugeFn for HistoryGauge {
    fn increment(&self, _: f64) {}
    fn decrement(&self, _: f64) {}
    fn set(&self, value: f64) {
        let mut labels: Vec<(String, String)> = self
            .key
            .labels()
            .map(|l| (l.key().to_owned(), l.value().to_owned()))
            .collect();
        labels.sort();
        self.sets
            .lock()
            .push((self.key.name().to_owned(), labels, value));
    }
}

impl metrics::Recorder for GaugeHistory {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn register_counter(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::noop()
    }
    fn register_gauge(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::from_arc(Arc::new(HistoryGauge {
            key: key.clone(),
            sets: Arc::clone(&self.sets),
        }))
    }
    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

impl GaugeHistory {
    fn values(&self, name: &str, pairs: &[(&str, &str)]) -> Vec<f64> {
        let wanted = labels(pairs);
        self.sets
            .lock()
            .iter()
            .filter(|(n, l, _)| n == name && *l == wanted)
            .map(|(_, _, v)| *v)
            .collect()
    }
}

/// Projection lag while catching up in batches, then 0; leadership 1 while elected, 0
/// after; the publisher's position and lag.
#[test]
fn projection_lag_leadership_and_publisher_progress_are_gauges() {
    use eventcore::metrics::{
        LEADER, PROJECTION_LAG_EVENTS, PROJECTION_LAG_SECONDS, PUBLISHER_LAG_SECONDS,
        PUBLISHER_POSITION,
    };
    use eventcore::testing::conformance::ConformanceEvent;
    use eventcore::testing::projection_conformance::SummingProjection;

    let history = GaugeHistory::default();
    metrics::with_local_recorder(&history, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
            .block_on(async {
                let store = InMemoryEventStore::new();
                let data: Vec<EventData> = (1..=5)
                    .map(|value| {
                        EventData::from_event(
                            &ConformanceEvent::Added { value },
                            EventMetadata::default(),
                        )
                        .expect("serializes")
                    })
                    .collect();
                store
                    .append(eventcore::AppendRequest::single(
                        StreamId::try_new("acc-1").expect("valid"),
                        ExpectedVersion::Any,
                        data,
                    ))
                    .await
                    .expect("appends");
                let projection = SummingProjection::new("lag-view", "acc-");
                let mut progress = projection.progress();
                let mut runner = eventcore::ProjectionRunner::new(
                    projection,
                    Arc::new(store.clone()),
                    Arc::new(store.clone()),
                )
                .with_batch_size(2);
                let election = eventcore_memory::InMemoryLeaderElection::new();
                let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                let running = async {
                    runner
                        .run_as_leader(&election, async {
                            let _ = stopped.await;
                        })
                        .await
                };
                let watch = async {
                    progress
                        .wait_for(|n| *n >= 5)
                        .await
                        .expect("applies all five");
                    stop.send(()).expect("running");
                };
                let (ran, ()) = tokio::join!(running, watch);
                ran.expect("runs");

                let orders_store = InMemoryEventStore::new();
                let orders: Arc<dyn EventStore> = Arc::new(orders_store.clone());
                let executor = CommandExecutor::new(orders.clone());
                for n in 0..3 {
                    executor
                        .execute(&PlaceOrder {
                            order: StreamId::try_new(format!("order-o{n}")).expect("valid"),
                            id: format!("o{n}"),
                            amount: 1,
                        })
                        .await
                        .expect("places");
                }
                let broker = InMemoryBroker::new();
                let mut publisher =
                    two_services::publisher(&orders, Arc::new(orders_store.clone()), &broker);
                publisher.publish_available().await.expect("publishes");
            });
    });
    let view = [("projection", "lag-view")];
    // Batches of two over five events: 3 behind, 1 behind, then a short batch at the
    // end; every read that finds nothing new after that says 0 again.
    let lag = history.values(PROJECTION_LAG_EVENTS, &view);
    assert_eq!(lag[..3], [3.0, 1.0, 0.0], "{lag:?}");
    assert!(lag[3..].iter().all(|n| *n == 0.0), "{lag:?}");
    let seconds = history.values(PROJECTION_LAG_SECONDS, &view);
    assert_eq!(seconds.len(), lag.len());
    assert!(seconds[2..].iter().all(|s| *s == 0.0), "{seconds:?}");
    assert_eq!(
        history.values(LEADER, &[("role", "projection"), ("name", "lag-view")]),
        [1.0, 0.0]
    );
    // Six events (placed, confirmed per order) in pages of five: the first page full,
    // the broker then holds up to 5, then all 6.
    let orders = [("service", "orders")];
    assert_eq!(
        history.values(PUBLISHER_POSITION, &orders).last(),
        Some(&6.0)
    );
    let lag = history.values(PUBLISHER_LAG_SECONDS, &orders);
    assert_eq!(lag.len(), 2, "one per page that published: {lag:?}");
    assert_eq!(lag[1], 0.0, "the last page reached the head: {lag:?}");
}

#[test]
fn snapshots_used_ignored_and_saved_are_counted() {
    use eventcore::metrics::{SNAPSHOTS_LOADED_TOTAL, SNAPSHOTS_SAVED_TOTAL};
    use eventcore::{Snapshot, SnapshotKey, SnapshotStore};

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    with_recorder(&recorder, || async {
        let store = InMemoryEventStore::new();
        let transfer = || Transfer {
            from: account(0),
            to: account(1),
            amount: 1,
        };
        let executor = CommandExecutor::new(store.clone());
        for n in 0..2 {
            executor
                .execute(&Open {
                    account: account(n),
                    initial: 100,
                })
                .await
                .expect("opens");
        }
        // 2 events read, then 2 per transfer: the second reaches the 5 of `Transfer`'s
        // snapshots.
        for _ in 0..2 {
            executor.execute(&transfer()).await.expect("transfers");
        }
        executor.flush_snapshots().await;
        // A fresh executor starts from it.
        CommandExecutor::new(store.clone())
            .execute(&transfer())
            .await
            .expect("transfers");
        // A snapshot that does not decode: ignored.
        let key = SnapshotKey::new(
            format!(
                "{} {}",
                std::any::type_name::<Transfer>(),
                std::any::type_name::<eventcore_tests::bank::TransferState>()
            ),
            vec![account(0), account(1)],
            1,
        )
        .expect("key");
        let taken = store
            .load_snapshot(&key)
            .await
            .expect("load")
            .expect("taken");
        let broken = Snapshot::new(
            key.clone(),
            taken.versions().to_vec(),
            taken.last_position(),
            b"not json".to_vec(),
            taken.taken_at(),
        )
        .expect("valid");
        store.delete_snapshots(key.name()).await.expect("delete");
        assert!(store.save_snapshot(&broken).await.expect("save"));
        let fresh = CommandExecutor::new(store.clone());
        fresh.execute(&transfer()).await.expect("transfers");
        fresh.flush_snapshots().await;
    });
    let seen = seen(&snapshotter);
    let transfer = std::any::type_name::<Transfer>();
    assert_eq!(
        counter(
            &seen,
            SNAPSHOTS_LOADED_TOTAL,
            &[("command", transfer), ("outcome", "used")]
        ),
        Some(1)
    );
    assert_eq!(
        counter(
            &seen,
            SNAPSHOTS_LOADED_TOTAL,
            &[("command", transfer), ("outcome", "ignored")]
        ),
        Some(1)
    );
    assert!(
        counter(&seen, SNAPSHOTS_SAVED_TOTAL, &[("outcome", "saved")]).is_some_and(|n| n >= 1),
        "{seen:?}"
    );
}
