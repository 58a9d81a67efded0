//! The command executor against the in-memory store: atomic multi-stream writes,
//! conflicts and retries, the stream resolver, metadata, idempotency keys.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use eventcore::{
    AppendOutcome, AppendRequest, CausationId, Command, CommandExecutor, CommandLogic,
    CommandResult, CorrelationId, Error, EventData, EventMetadata, EventPayload, EventStore,
    EventType, ExecutionOptions, ExpectedVersion, GlobalPosition, IdempotencyKey, LogQuery,
    ReadStreams, RecordedEvent, RetryPolicy, StoredEvent, StreamId, StreamResolver, StreamWrite,
    StreamsSnapshot, require,
};
use eventcore_memory::InMemoryEventStore;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Ledger {
    Credited {
        amount: i64,
    },
    Debited {
        amount: i64,
    },
    /// Points at another stream (for the stream resolver).
    Linked {
        to: StreamId,
    },
}

impl eventcore::Event for Ledger {
    fn event_type(&self) -> &'static str {
        match self {
            Ledger::Credited { .. } => "Credited",
            Ledger::Debited { .. } => "Debited",
            Ledger::Linked { .. } => "Linked",
        }
    }
}

fn id(name: &str) -> StreamId {
    StreamId::try_new(name).expect("valid")
}

fn credit(amount: i64) -> EventData {
    EventData::from_event(&Ledger::Credited { amount }, EventMetadata::default()).expect("ser")
}

async fn seed(store: &impl EventStore, stream: &StreamId, events: Vec<EventData>) {
    store
        .append(AppendRequest::single(
            stream.clone(),
            ExpectedVersion::Any,
            events,
        ))
        .await
        .expect("seed");
}

async fn balance(store: &impl EventStore, stream: &StreamId) -> i64 {
    let snapshot = store
        .read_streams(std::slice::from_ref(stream))
        .await
        .expect("read");
    snapshot
        .events
        .iter()
        .map(|e| match e.decode::<Ledger>().expect("decode").payload {
            Ledger::Credited { amount } => amount,
            Ledger::Debited { amount } => -amount,
            Ledger::Linked { .. } => 0,
        })
        .sum()
}

/// Moves money; reads a third "audit" stream it never writes (a read-only participant).
#[derive(Command)]
struct Move {
    #[stream]
    from: StreamId,
    #[stream]
    to: StreamId,
    #[stream]
    audit: Option<StreamId>,
    amount: i64,
}

#[derive(Default)]
struct MoveState {
    from: i64,
    audit_events: usize,
}

impl CommandLogic for Move {
    type State = MoveState;
    type Event = Ledger;

    fn apply(&self, state: &mut MoveState, event: &StoredEvent<Ledger>) {
        if Some(&event.stream_id) == self.audit.as_ref() {
            state.audit_events += 1;
        } else if event.stream_id == self.from {
            match event.payload {
                Ledger::Credited { amount } => state.from += amount,
                Ledger::Debited { amount } => state.from -= amount,
                Ledger::Linked { .. } => {}
            }
        }
    }

    fn handle(
        &self,
        read_streams: ReadStreams<Self::StreamSet>,
        state: MoveState,
        _resolver: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, Ledger>>> {
        require!(
            state.from >= self.amount,
            "insufficient funds: {} < {}",
            state.from,
            self.amount
        );
        Ok(vec![
            StreamWrite::new(
                &read_streams,
                self.from.clone(),
                Ledger::Debited {
                    amount: self.amount,
                },
            )?,
            StreamWrite::new(
                &read_streams,
                self.to.clone(),
                Ledger::Credited {
                    amount: self.amount,
                },
            )?,
        ])
    }
}

fn transfer(from: &StreamId, to: &StreamId, amount: i64) -> Move {
    Move {
        from: from.clone(),
        to: to.clone(),
        audit: None,
        amount,
    }
}

/// Wraps a store; before chosen appends it runs a competing write, and it can inject
/// backend failures. Counts reads and appends.
#[derive(Default)]
struct Meddler {
    inner: InMemoryEventStore,
    /// Streams to write to (one event each) before each of the next appends, in order.
    interfere: Mutex<Vec<StreamId>>,
    /// Errors to return from the next appends instead of appending.
    failures: Mutex<Vec<Error>>,
    /// The next appends this many are carried out, and then answered with
    /// `OutcomeUnknown` (the answer lost on the way back).
    lose_answers: AtomicUsize,
    reads: AtomicUsize,
    appends: AtomicUsize,
}

#[async_trait]
impl EventStore for Meddler {
    async fn read_streams(&self, streams: &[StreamId]) -> eventcore::Result<StreamsSnapshot> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.read_streams(streams).await
    }

    async fn append(&self, request: AppendRequest) -> eventcore::Result<AppendOutcome> {
        self.appends.fetch_add(1, Ordering::SeqCst);
        let failure = {
            let mut failures = self.failures.lock();
            (!failures.is_empty()).then(|| failures.remove(0))
        };
        if let Some(error) = failure {
            return Err(error);
        }
        let target = {
            let mut interfere = self.interfere.lock();
            (!interfere.is_empty()).then(|| interfere.remove(0))
        };
        if let Some(stream) = target {
            seed(&self.inner, &stream, vec![credit(1)]).await;
        }
        let event_ids = request
            .streams
            .iter()
            .flat_map(|s| &s.events)
            .map(|e| e.event_id)
            .collect();
        let outcome = self.inner.append(request).await;
        let lose = self
            .lose_answers
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if lose {
            return Err(Error::OutcomeUnknown {
                message: "the answer was lost (test)".to_owned(),
                event_ids,
                source: None,
            });
        }
        outcome
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

fn fast_retries(attempts: u32) -> RetryPolicy {
    RetryPolicy::new()
        .with_max_attempts(attempts)
        .with_initial_delay(std::time::Duration::ZERO)
}

#[tokio::test]
async fn transfer_writes_both_streams_atomically_with_versions_and_positions() {
    let store = InMemoryEventStore::new();
    let (a, b) = (id("acc-a"), id("acc-b"));
    seed(&store, &a, vec![credit(100)]).await;
    let executor = CommandExecutor::new(store.clone());

    let result = executor.execute(&transfer(&a, &b, 30)).await.expect("ok");

    assert_eq!(result.attempts, 1);
    assert!(!result.deduplicated);
    assert_eq!(result.events_written.len(), 2);
    assert_eq!(result.events_written[0].stream_id, a);
    assert_eq!(result.events_written[0].stream_version.value(), 2);
    assert_eq!(result.events_written[1].stream_id, b);
    assert_eq!(result.events_written[1].stream_version.value(), 1);
    assert!(result.events_written[0].global_position < result.events_written[1].global_position);
    assert_eq!(balance(&store, &a).await, 70);
    assert_eq!(balance(&store, &b).await, 30);
}

#[tokio::test]
async fn business_errors_are_returned_once_and_never_retried() {
    let store = Arc::new(Meddler::default());
    let (a, b) = (id("acc-a"), id("acc-b"));
    seed(&store.inner, &a, vec![credit(10)]).await;
    let executor = CommandExecutor::from_shared(store.clone()).with_retry_policy(fast_retries(5));

    let error = executor
        .execute(&transfer(&a, &b, 50))
        .await
        .expect_err("overdraft");

    assert!(
        matches!(&error, Error::BusinessRuleViolation(m) if m == "insufficient funds: 10 < 50")
    );
    assert!(!error.is_retryable());
    assert_eq!(store.reads.load(Ordering::SeqCst), 1);
    assert_eq!(store.appends.load(Ordering::SeqCst), 0);
    assert_eq!(store.inner.len(), 1);
}

#[tokio::test]
async fn a_conflict_is_retried_with_fresh_state() {
    let store = Arc::new(Meddler::default());
    let (a, b) = (id("acc-a"), id("acc-b"));
    seed(&store.inner, &a, vec![credit(10)]).await;
    // Somebody credits `a` between our read and our append.
    store.interfere.lock().push(a.clone());
    let executor = CommandExecutor::from_shared(store.clone()).with_retry_policy(fast_retries(5));

    let result = executor.execute(&transfer(&a, &b, 10)).await.expect("ok");

    assert_eq!(result.attempts, 2);
    assert_eq!(store.reads.load(Ordering::SeqCst), 2);
    // The retry appended at the version that includes the competing credit.
    assert_eq!(result.events_written[0].stream_version.value(), 3);
    assert_eq!(balance(&store.inner, &a).await, 1);
    assert_eq!(balance(&store.inner, &b).await, 10);
}

#[tokio::test]
async fn a_read_only_stream_that_moved_forces_a_retry() {
    let store = Arc::new(Meddler::default());
    let (a, b, audit) = (id("acc-a"), id("acc-b"), id("audit"));
    seed(&store.inner, &a, vec![credit(10)]).await;
    store.interfere.lock().push(audit.clone());
    let executor = CommandExecutor::from_shared(store.clone()).with_retry_policy(fast_retries(5));
    let command = Move {
        audit: Some(audit.clone()),
        ..transfer(&a, &b, 5)
    };

    let result = executor.execute(&command).await.expect("ok");

    assert_eq!(
        result.attempts, 2,
        "the audit stream moved after the first read"
    );
    assert!(result.events_written.iter().all(|e| e.stream_id != audit));
    assert_eq!(
        balance(&store.inner, &audit).await,
        1,
        "only the meddler wrote"
    );
}

#[tokio::test]
async fn retries_stop_at_the_policy_limit_with_the_last_conflict() {
    let store = Arc::new(Meddler::default());
    let (a, b) = (id("acc-a"), id("acc-b"));
    seed(&store.inner, &a, vec![credit(10)]).await;
    store
        .interfere
        .lock()
        .extend([a.clone(), a.clone(), a.clone()]);
    let executor = CommandExecutor::from_shared(store.clone()).with_retry_policy(fast_retries(3));

    let error = executor
        .execute(&transfer(&a, &b, 1))
        .await
        .expect_err("always conflicts");

    match &error {
        Error::RetriesExhausted { attempts, last } => {
            assert_eq!(*attempts, 3);
            assert!(matches!(**last, Error::VersionConflict { .. }));
        }
        other => panic!("expected RetriesExhausted, got {other:?}"),
    }
    let conflicts = error.version_conflicts().expect("conflicts");
    assert_eq!(conflicts[0].stream, a);
    assert_eq!(
        balance(&store.inner, &b).await,
        0,
        "nothing of the command written"
    );
    assert_eq!(
        balance(&store.inner, &a).await,
        13,
        "only the meddler's credits"
    );
}

#[tokio::test]
async fn retryable_backend_errors_are_retried_and_others_are_not() {
    let store = Arc::new(Meddler::default());
    let (a, b) = (id("acc-a"), id("acc-b"));
    seed(&store.inner, &a, vec![credit(10)]).await;
    store
        .failures
        .lock()
        .push(Error::retryable_backend("connection reset", None));
    let executor = CommandExecutor::from_shared(store.clone()).with_retry_policy(fast_retries(3));
    let result = executor.execute(&transfer(&a, &b, 1)).await.expect("ok");
    assert_eq!(result.attempts, 2);

    store
        .failures
        .lock()
        .push(Error::permanent_backend("permission denied", None));
    let error = executor
        .execute(&transfer(&a, &b, 1))
        .await
        .expect_err("fatal");
    assert!(matches!(
        error,
        Error::Backend {
            retryable: false,
            ..
        }
    ));
    assert_eq!(balance(&store.inner, &b).await, 1);
}

/// Without an idempotency key, an append whose outcome is unknown is not decided again
/// (that could write twice): the caller gets the error, and the write happened once.
#[tokio::test]
async fn an_unknown_outcome_without_a_key_is_returned_not_retried() {
    let store = Arc::new(Meddler::default());
    let (a, b) = (id("acc-a"), id("acc-b"));
    seed(&store.inner, &a, vec![credit(10)]).await;
    store.lose_answers.store(1, Ordering::SeqCst);
    let executor = CommandExecutor::from_shared(store.clone()).with_retry_policy(fast_retries(5));
    let error = executor
        .execute(&transfer(&a, &b, 3))
        .await
        .expect_err("the outcome is unknown");
    assert!(matches!(error, Error::OutcomeUnknown { .. }), "{error:?}");
    assert!(!error.is_retryable());
    assert_eq!(store.appends.load(Ordering::SeqCst), 1, "not decided again");
    assert_eq!(balance(&store.inner, &b).await, 3, "written once");
}

/// With a key, the executor asks again under it: it finds its own write, reports it as
/// this execution's (not deduplicated), and writes nothing more.
#[tokio::test]
async fn an_unknown_outcome_with_a_key_is_resolved_through_the_key() {
    let store = Arc::new(Meddler::default());
    let (a, b) = (id("acc-a"), id("acc-b"));
    seed(&store.inner, &a, vec![credit(10)]).await;
    store.lose_answers.store(1, Ordering::SeqCst);
    let executor = CommandExecutor::from_shared(store.clone()).with_retry_policy(fast_retries(5));
    let key = IdempotencyKey::try_new("transfer-1").expect("key");
    let result = executor
        .execute_with(
            &transfer(&a, &b, 3),
            ExecutionOptions::default().with_idempotency_key(key.clone()),
        )
        .await
        .expect("the key tells the outcome");
    assert!(!result.deduplicated, "this execution wrote the events");
    assert_eq!(result.attempts, 2);
    assert_eq!(result.events_written.len(), 2);
    assert_eq!(
        store.appends.load(Ordering::SeqCst),
        1,
        "nothing appended again"
    );
    assert_eq!(balance(&store.inner, &b).await, 3, "written once");

    // A later execution with the same key wrote nothing, and says so.
    let again = executor
        .execute_with(
            &transfer(&a, &b, 3),
            ExecutionOptions::default().with_idempotency_key(key),
        )
        .await
        .expect("repeat");
    assert!(again.deduplicated);
    assert_eq!(again.events_written, result.events_written);
}

/// When the attempts run out before the outcome is known, the error says the outcome
/// is unknown, not that nothing was written.
#[tokio::test]
async fn attempts_running_out_after_an_unknown_outcome_report_it() {
    let store = Arc::new(Meddler::default());
    let (a, b) = (id("acc-a"), id("acc-b"));
    seed(&store.inner, &a, vec![credit(10)]).await;
    store.lose_answers.store(1, Ordering::SeqCst);
    // Every key lookup after the lost answer fails, retryably.
    let executor = CommandExecutor::from_shared(Arc::new(FailingLookups {
        inner: store.clone(),
    }))
    .with_retry_policy(fast_retries(3));
    let error = executor
        .execute_with(
            &transfer(&a, &b, 3),
            ExecutionOptions::default()
                .with_idempotency_key(IdempotencyKey::try_new("transfer-2").expect("key")),
        )
        .await
        .expect_err("never learned the outcome");
    assert!(matches!(error, Error::OutcomeUnknown { .. }), "{error:?}");
    assert_eq!(balance(&store.inner, &b).await, 3, "written once");
}

/// The Meddler, except that key lookups fail (retryably) once an append happened.
struct FailingLookups {
    inner: Arc<Meddler>,
}

#[async_trait]
impl EventStore for FailingLookups {
    async fn read_streams(&self, streams: &[StreamId]) -> eventcore::Result<StreamsSnapshot> {
        self.inner.read_streams(streams).await
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
        if self.inner.appends.load(Ordering::SeqCst) > 0 {
            return Err(Error::retryable_backend("connection refused", None));
        }
        self.inner.idempotent_outcome(key).await
    }
}

/// Tries to write to a stream it did not declare.
#[derive(Command)]
struct Sneaky {
    #[stream]
    declared: StreamId,
    target: StreamId,
}

impl CommandLogic for Sneaky {
    type State = ();
    type Event = Ledger;

    fn apply(&self, _: &mut (), _: &StoredEvent<Ledger>) {}

    fn handle(
        &self,
        read_streams: ReadStreams<Self::StreamSet>,
        _: (),
        _: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, Ledger>>> {
        Ok(vec![
            StreamWrite::new(
                &read_streams,
                self.declared.clone(),
                Ledger::Credited { amount: 1 },
            )?,
            StreamWrite::new(
                &read_streams,
                self.target.clone(),
                Ledger::Credited { amount: 1 },
            )?,
        ])
    }
}

#[tokio::test]
async fn a_write_to_an_undeclared_stream_is_refused_before_anything_is_stored() {
    let store = InMemoryEventStore::new();
    let executor = CommandExecutor::new(store.clone());
    let command = Sneaky {
        declared: id("mine"),
        target: id("yours"),
    };

    let error = executor.execute(&command).await.expect_err("refused");

    assert!(matches!(error, Error::UndeclaredStream { stream } if stream == id("yours")));
    assert!(store.is_empty());
}

/// Follows `Linked` events to discover and write to another stream.
#[derive(Command)]
struct CreditLinked {
    #[stream]
    directory: StreamId,
    /// How many links to follow before writing (to exercise the round bound).
    hops: usize,
}

#[derive(Default)]
struct Links {
    seen: Vec<StreamId>,
}

impl CommandLogic for CreditLinked {
    type State = Links;
    type Event = Ledger;

    fn apply(&self, state: &mut Links, event: &StoredEvent<Ledger>) {
        if let Ledger::Linked { to } = &event.payload {
            state.seen.push(to.clone());
        }
    }

    fn handle(
        &self,
        read_streams: ReadStreams<Self::StreamSet>,
        state: Links,
        resolver: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, Ledger>>> {
        let unread: Vec<StreamId> = state
            .seen
            .iter()
            .filter(|s| !read_streams.contains(s))
            .cloned()
            .collect();
        if !unread.is_empty() {
            resolver.add_streams(unread);
            return Ok(Vec::new());
        }
        require!(
            read_streams.len() > self.hops,
            "only {} streams found",
            read_streams.len()
        );
        let last = read_streams.iter().last().cloned().expect("non-empty");
        Ok(vec![StreamWrite::new(
            &read_streams,
            last,
            Ledger::Credited { amount: 7 },
        )?])
    }
}

async fn link(store: &impl EventStore, from: &StreamId, to: &StreamId) {
    let event = EventData::from_event(&Ledger::Linked { to: to.clone() }, EventMetadata::default())
        .expect("ser");
    seed(store, from, vec![event]).await;
}

#[tokio::test]
async fn the_stream_resolver_reads_discovered_streams_and_allows_writing_to_them() {
    let store = Arc::new(Meddler::default());
    let (dir, first, second) = (id("directory"), id("first"), id("second"));
    link(&store.inner, &dir, &first).await;
    link(&store.inner, &first, &second).await;
    let executor = CommandExecutor::from_shared(store.clone());

    let result = executor
        .execute(&CreditLinked {
            directory: dir.clone(),
            hops: 2,
        })
        .await
        .expect("ok");

    assert_eq!(
        store.reads.load(Ordering::SeqCst),
        3,
        "declared, then first, then second"
    );
    assert_eq!(result.events_written.len(), 1);
    assert_eq!(result.events_written[0].stream_id, second);
    assert_eq!(balance(&store.inner, &second).await, 7);
}

#[tokio::test]
async fn stream_resolution_rounds_are_bounded() {
    let store = InMemoryEventStore::new();
    let streams: Vec<StreamId> = (0..6).map(|i| id(&format!("chain-{i}"))).collect();
    for pair in streams.windows(2) {
        link(&store, &pair[0], &pair[1]).await;
    }
    let executor = CommandExecutor::new(store.clone()).with_max_stream_resolutions(3);

    let error = executor
        .execute(&CreditLinked {
            directory: streams[0].clone(),
            hops: 5,
        })
        .await
        .expect_err("too deep");

    assert!(matches!(
        error,
        Error::TooManyStreamResolutions { limit: 3 }
    ));
    assert_eq!(store.len(), 5, "nothing written");
}

#[tokio::test]
async fn metadata_carries_correlation_causation_actor_and_custom_fields() {
    let store = InMemoryEventStore::new();
    let (a, b) = (id("acc-a"), id("acc-b"));
    seed(&store, &a, vec![credit(10)]).await;
    let executor = CommandExecutor::new(store.clone());
    let correlation = CorrelationId::new();
    let causation = CausationId::new();

    executor
        .execute_with(
            &transfer(&a, &b, 1),
            ExecutionOptions::new()
                .with_correlation_id(correlation)
                .with_causation_id(causation)
                .with_actor("clerk-9")
                .with_custom("channel", "branch"),
        )
        .await
        .expect("ok");
    executor.execute(&transfer(&a, &b, 1)).await.expect("ok");

    let log = store.read_all(&LogQuery::new()).await.expect("read");
    let first: Vec<_> = log[1..3].iter().map(|e| e.metadata.clone()).collect();
    for metadata in &first {
        assert_eq!(metadata.correlation_id, correlation);
        assert_eq!(metadata.causation_id, Some(causation));
        assert_eq!(metadata.actor.as_deref(), Some("clerk-9"));
        assert_eq!(metadata.custom["channel"], "branch");
    }
    let second: Vec<_> = log[3..5].iter().map(|e| e.metadata.clone()).collect();
    assert_eq!(second[0].correlation_id, second[1].correlation_id);
    assert_ne!(
        second[0].correlation_id, correlation,
        "a fresh one by default"
    );
    assert!(
        second[0].causation_id.is_some(),
        "causation is always filled"
    );
    assert_eq!(second[0].causation_id, second[1].causation_id);
    assert_eq!(second[0].actor, None);
}

#[tokio::test]
async fn a_dispatcher_stamps_its_custom_fields_beside_its_own_metadata() {
    let store = InMemoryEventStore::new();
    let (a, b) = (id("acc-a"), id("acc-b"));
    seed(&store, &a, vec![credit(10)]).await;
    let executor = CommandExecutor::new(store.clone());
    let cause = eventcore::EventId::new();
    let correlation = CorrelationId::from_business_key("order-7");
    let mut dispatcher =
        eventcore::Dispatcher::new(&executor, "mailer", cause, correlation).expect("valid");
    dispatcher.dispatch(&transfer(&a, &b, 1)).await.expect("ok");
    dispatcher
        .set_custom("tenant", "acme")
        .set_custom("channel", "web")
        .set_custom("channel", "mail");
    dispatcher.dispatch(&transfer(&a, &b, 2)).await.expect("ok");

    let log = store.read_all(&LogQuery::new()).await.expect("read");
    assert_eq!(log.len(), 5);
    for (i, event) in log[1..].iter().enumerate() {
        let metadata = &event.metadata;
        assert_eq!(metadata.correlation_id, correlation);
        assert_eq!(metadata.causation_id, Some(CausationId::from(cause)));
        assert_eq!(metadata.actor.as_deref(), Some("mailer"));
        if i < 2 {
            assert!(metadata.custom.is_empty(), "{:?}", metadata.custom);
        } else {
            assert_eq!(metadata.custom["tenant"], "acme");
            assert_eq!(metadata.custom["channel"], "mail");
            assert_eq!(metadata.custom.len(), 2);
        }
    }
}

#[tokio::test]
async fn an_idempotency_key_makes_a_second_execution_return_the_first_outcome() {
    let store = InMemoryEventStore::new();
    let (a, b) = (id("acc-a"), id("acc-b"));
    seed(&store, &a, vec![credit(10)]).await;
    let key = IdempotencyKey::try_new("transfer-42").expect("valid");
    let options = ExecutionOptions::new().with_idempotency_key(key.clone());

    let first = CommandExecutor::new(store.clone())
        .execute_with(&transfer(&a, &b, 4), options.clone())
        .await
        .expect("first");
    // A fresh executor, as after a restart.
    let second = CommandExecutor::new(store.clone())
        .execute_with(&transfer(&a, &b, 4), options)
        .await
        .expect("second");

    assert!(!first.deduplicated);
    assert!(second.deduplicated);
    assert_eq!(second.events_written, first.events_written);
    assert_eq!(balance(&store, &b).await, 4, "charged once");
    assert_eq!(store.len(), 3);
}

/// Reads no stream and decides to write nothing (written by hand: the derive needs a
/// stream).
struct Nothing {}

struct NoStreams;

impl eventcore::CommandStreams for Nothing {
    type StreamSet = NoStreams;

    fn read_streams(&self) -> Vec<StreamId> {
        Vec::new()
    }
}

impl CommandLogic for Nothing {
    type State = ();
    type Event = Ledger;

    fn apply(&self, _: &mut (), _: &StoredEvent<Ledger>) {}

    fn handle(
        &self,
        _: ReadStreams<Self::StreamSet>,
        _: (),
        _: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, Ledger>>> {
        Ok(Vec::new())
    }
}

/// A command with no streams reaches no append, so nothing else checks its key: a key
/// used before still answers with its first outcome.
#[tokio::test]
async fn a_key_used_before_answers_a_command_with_no_streams() {
    let store = InMemoryEventStore::new();
    let (a, b) = (id("acc-a"), id("acc-b"));
    seed(&store, &a, vec![credit(10)]).await;
    let options = ExecutionOptions::new()
        .with_idempotency_key(IdempotencyKey::try_new("one-key").expect("valid"));
    let first = CommandExecutor::new(store.clone())
        .execute_with(&transfer(&a, &b, 4), options.clone())
        .await
        .expect("first");
    let second = CommandExecutor::new(store.clone())
        .execute_with(&Nothing {}, options)
        .await
        .expect("second");
    assert!(second.deduplicated);
    assert_eq!(second.events_written, first.events_written);
}

/// The first attempt leaves the key to the append; a decision that fails because the
/// state includes the key's own earlier effect (the whole balance already moved) must
/// still answer with that effect, not with the business error.
#[tokio::test]
async fn a_repeated_key_whose_decision_now_fails_returns_the_first_outcome() {
    let store = InMemoryEventStore::new();
    let (a, b) = (id("acc-a"), id("acc-b"));
    seed(&store, &a, vec![credit(10)]).await;
    let options = ExecutionOptions::new()
        .with_idempotency_key(IdempotencyKey::try_new("all-of-it").expect("valid"));
    let first = CommandExecutor::new(store.clone())
        .execute_with(&transfer(&a, &b, 10), options.clone())
        .await
        .expect("first");
    let second = CommandExecutor::new(store.clone())
        .execute_with(&transfer(&a, &b, 10), options)
        .await
        .expect("the repeat answers with the first outcome, not insufficient funds");
    assert!(second.deduplicated);
    assert_eq!(second.events_written, first.events_written);
    assert_eq!(balance(&store, &b).await, 10, "moved once");
    // Without the key the same repeat is the business error.
    let error = CommandExecutor::new(store.clone())
        .execute(&transfer(&a, &b, 10))
        .await
        .expect_err("nothing left to move");
    assert!(
        matches!(error, Error::BusinessRuleViolation(_)),
        "{error:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_executions_with_one_key_write_once() {
    // Racing, the losers conflict and find the key on their retry.
    executions_with_one_key_write_once(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn executions_with_one_key_taking_turns_write_once() {
    // Taking turns, each later one decides again and the append's key check answers it.
    executions_with_one_key_write_once(true).await;
}

async fn executions_with_one_key_write_once(take_turns: bool) {
    let store = InMemoryEventStore::new();
    let (a, b) = (id("acc-a"), id("acc-b"));
    seed(&store, &a, vec![credit(100)]).await;
    let executor = CommandExecutor::new(store.clone())
        .with_retry_policy(fast_retries(50))
        .with_stream_queue(take_turns);
    let key = IdempotencyKey::try_new("one-charge").expect("valid");
    let barrier = Arc::new(tokio::sync::Barrier::new(8));

    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (executor, key, barrier) = (executor.clone(), key.clone(), barrier.clone());
            let command = transfer(&a, &b, 3);
            tokio::spawn(async move {
                barrier.wait().await;
                executor
                    .execute_with(&command, ExecutionOptions::new().with_idempotency_key(key))
                    .await
            })
        })
        .collect();
    let results: Vec<_> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.expect("task").expect("execution"))
        .collect();

    assert_eq!(results.iter().filter(|r| !r.deduplicated).count(), 1);
    assert!(
        results
            .iter()
            .all(|r| r.events_written == results[0].events_written)
    );
    assert_eq!(balance(&store, &b).await, 3);
}

#[tokio::test]
async fn an_undecodable_stored_event_fails_the_command_with_a_typed_error() {
    let store = InMemoryEventStore::new();
    let (a, b) = (id("acc-a"), id("acc-b"));
    let odd = EventData::new(
        EventType::try_new("Credited").expect("valid"),
        EventPayload::from_json(r#"{"Credited":{"amount":"lots"}}"#).expect("json"),
        EventMetadata::default(),
    );
    seed(&store, &a, vec![credit(5), odd]).await;

    let error = CommandExecutor::new(store.clone())
        .execute(&transfer(&a, &b, 1))
        .await
        .expect_err("cannot decode");

    match error {
        Error::Deserialization {
            stream,
            version,
            event_type,
            ..
        } => {
            assert_eq!(stream, a);
            assert_eq!(version.value(), 2);
            assert_eq!(event_type, "Credited");
        }
        other => panic!("expected Deserialization, got {other:?}"),
    }
    assert_eq!(store.len(), 2, "nothing written, nothing dropped");
}

/// Decides to write nothing.
#[derive(Command)]
struct Noop {
    #[stream]
    stream: StreamId,
}

impl CommandLogic for Noop {
    type State = ();
    type Event = Ledger;

    fn apply(&self, _: &mut (), _: &StoredEvent<Ledger>) {}

    fn handle(
        &self,
        _: ReadStreams<Self::StreamSet>,
        _: (),
        _: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, Ledger>>> {
        Ok(Vec::new())
    }
}

#[tokio::test]
async fn a_command_that_writes_nothing_does_not_append() {
    let store = Arc::new(Meddler::default());
    let executor = CommandExecutor::from_shared(store.clone());
    let result = executor
        .execute(&Noop { stream: id("s") })
        .await
        .expect("ok");
    assert!(result.events_written.is_empty());
    assert_eq!(store.appends.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn executor_works_behind_a_shared_trait_object() {
    let store: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let executor = CommandExecutor::from_shared(store.clone());
    fn assert_send<T: Send>(_: &T) {}
    let command = Noop { stream: id("s") };
    let future = executor.execute(&command);
    assert_send(&future);
    future.await.expect("ok");
    // Commands are usable through the blanket `Command` bound.
    fn takes_command<C: Command>(_: &C) {}
    takes_command(&command);
}

/// Appends the next number of a sequence: 1, 2, 3, ... A stale state would repeat one.
/// Its state depends on the events only, so it may be cached.
#[derive(Command)]
struct Count {
    #[stream]
    counter: StreamId,
}

impl CommandLogic for Count {
    type State = i64;
    type Event = Ledger;

    fn apply(&self, last: &mut i64, event: &StoredEvent<Ledger>) {
        if let Ledger::Credited { amount } = event.payload {
            *last = amount;
        }
    }

    fn handle(
        &self,
        read: ReadStreams<Self::StreamSet>,
        last: i64,
        _: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, Ledger>>> {
        Ok(vec![StreamWrite::new(
            &read,
            self.counter.clone(),
            Ledger::Credited { amount: last + 1 },
        )?])
    }

    fn state_cache(&self) -> eventcore::StateCache<i64> {
        eventcore::StateCache::for_command::<Self>()
    }
}

/// Counts how the executor reads, and can slip a stale, out-of-order event into the
/// answers of `read_streams_after` once.
struct ReadSpy {
    inner: InMemoryEventStore,
    whole: AtomicUsize,
    after: AtomicUsize,
    appends: AtomicUsize,
    slip: Mutex<Option<RecordedEvent>>,
    /// Lose the first event of the next `read_streams_after` answer, versions kept (a
    /// store with a gap).
    gap_once: std::sync::atomic::AtomicBool,
}

impl ReadSpy {
    fn new(inner: InMemoryEventStore) -> Self {
        ReadSpy {
            inner,
            whole: AtomicUsize::new(0),
            after: AtomicUsize::new(0),
            appends: AtomicUsize::new(0),
            slip: Mutex::new(None),
            gap_once: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

#[async_trait]
impl EventStore for ReadSpy {
    async fn read_streams(&self, streams: &[StreamId]) -> eventcore::Result<StreamsSnapshot> {
        self.whole.fetch_add(1, Ordering::SeqCst);
        self.inner.read_streams(streams).await
    }

    async fn read_streams_after(
        &self,
        streams: &[(StreamId, eventcore::StreamVersion)],
    ) -> eventcore::Result<StreamsSnapshot> {
        self.after.fetch_add(1, Ordering::SeqCst);
        let mut snapshot = self.inner.read_streams_after(streams).await?;
        if let Some(event) = self.slip.lock().take() {
            snapshot.events.insert(0, event);
        }
        if self.gap_once.swap(false, Ordering::SeqCst) && !snapshot.events.is_empty() {
            snapshot.events.remove(0);
        }
        Ok(snapshot)
    }

    async fn append(&self, request: AppendRequest) -> eventcore::Result<AppendOutcome> {
        self.appends.fetch_add(1, Ordering::SeqCst);
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

async fn sequence(store: &impl EventStore, stream: &StreamId) -> Vec<i64> {
    store
        .read_streams(std::slice::from_ref(stream))
        .await
        .expect("read")
        .events
        .iter()
        .map(|e| match e.decode::<Ledger>().expect("decode").payload {
            Ledger::Credited { amount } => amount,
            _ => 0,
        })
        .collect()
}

#[tokio::test]
async fn a_cached_state_is_brought_up_to_date_with_what_others_wrote() {
    let memory = InMemoryEventStore::new();
    let spy = Arc::new(ReadSpy::new(memory.clone()));
    let cached = CommandExecutor::from_shared(spy.clone());
    let other = CommandExecutor::new(memory.clone());
    let counter = id("counter-1");
    for round in 0..5 {
        cached
            .execute(&Count {
                counter: counter.clone(),
            })
            .await
            .expect("cached");
        // Another process (its own cache) moves the stream meanwhile.
        for _ in 0..round {
            other
                .execute(&Count {
                    counter: counter.clone(),
                })
                .await
                .expect("other");
        }
    }
    cached
        .execute(&Count {
            counter: counter.clone(),
        })
        .await
        .expect("cached");
    let expected: Vec<i64> = (1..=16).collect();
    assert_eq!(
        sequence(&memory, &counter).await,
        expected,
        "no number repeated or skipped"
    );
    assert_eq!(
        spy.whole.load(Ordering::SeqCst),
        0,
        "streams never read whole"
    );
    // Round 0 reads from the start; round 1 decides on the state it kept, with its own
    // write folded in, and its append proves it current; rounds 2 to 4 and the last
    // execution find the stream moved by the other executor (the append conflicts) and
    // read only what is new.
    assert_eq!(
        spy.after.load(Ordering::SeqCst),
        5,
        "from the start once, then what was new after each conflict"
    );
    assert_eq!(
        spy.appends.load(Ordering::SeqCst),
        10,
        "one append per execution, plus one per conflict"
    );
}

#[tokio::test]
async fn an_event_older_than_the_cached_state_makes_the_executor_read_whole_streams() {
    let memory = InMemoryEventStore::new();
    let spy = Arc::new(ReadSpy::new(memory.clone()));
    let executor = CommandExecutor::from_shared(spy.clone());
    let counter = id("counter-2");
    executor
        .execute(&Count {
            counter: counter.clone(),
        })
        .await
        .expect("first");
    executor
        .execute(&Count {
            counter: counter.clone(),
        })
        .await
        .expect("second");
    // Another executor moves the stream, so the third execution's decision on its
    // cached state conflicts and it reads what is new.
    CommandExecutor::new(memory.clone())
        .execute(&Count {
            counter: counter.clone(),
        })
        .await
        .expect("other");
    // A stale answer: an event from before the newest one folded (as a slow commit in a
    // store without a global commit order would show). Folding it on top of the cached
    // state would make the next number 100 + 1.
    let mut stale = memory
        .read_streams(std::slice::from_ref(&counter))
        .await
        .expect("read")
        .events
        .remove(0);
    stale = RecordedEvent::new(
        stale.event_id,
        stale.stream_id.clone(),
        stale.stream_version,
        stale.global_position,
        EventType::try_new("Credited").expect("valid"),
        EventPayload::from_json(r#"{"Credited":{"amount":100}}"#).expect("json"),
        Arc::new(EventMetadata::default()),
        stale.recorded_at,
    );
    *spy.slip.lock() = Some(stale);
    let after_before = spy.after.load(Ordering::SeqCst);
    executor
        .execute(&Count {
            counter: counter.clone(),
        })
        .await
        .expect("third");
    assert_eq!(
        spy.after.load(Ordering::SeqCst),
        after_before + 2,
        "the stale answer, then the streams again from the start"
    );
    assert_eq!(sequence(&memory, &counter).await, [1, 2, 3, 4]);
}

#[tokio::test]
async fn a_zero_capacity_turns_the_state_cache_off() {
    let memory = InMemoryEventStore::new();
    let spy = Arc::new(ReadSpy::new(memory.clone()));
    let executor = CommandExecutor::from_shared(spy.clone()).with_state_cache_capacity(0);
    let counter = id("counter-3");
    for _ in 0..3 {
        executor
            .execute(&Count {
                counter: counter.clone(),
            })
            .await
            .expect("count");
    }
    assert_eq!(spy.whole.load(Ordering::SeqCst), 3);
    assert_eq!(spy.after.load(Ordering::SeqCst), 0);
    assert_eq!(sequence(&memory, &counter).await, [1, 2, 3]);
}

#[tokio::test]
async fn a_full_cache_keeps_working_by_dropping_states() {
    let memory = InMemoryEventStore::new();
    let executor = CommandExecutor::new(memory.clone()).with_state_cache_capacity(2);
    let counters: Vec<StreamId> = (0..5).map(|n| id(&format!("counter-many-{n}"))).collect();
    for _ in 0..3 {
        for counter in &counters {
            executor
                .execute(&Count {
                    counter: counter.clone(),
                })
                .await
                .expect("count");
        }
    }
    for counter in &counters {
        assert_eq!(sequence(&memory, counter).await, [1, 2, 3]);
    }
}

/// Pays 1 from `from` to `to`; its state is `from`'s balance, folded from `from` only.
#[derive(Command)]
struct PayOne {
    #[stream]
    from: StreamId,
    #[stream]
    to: StreamId,
}

impl CommandLogic for PayOne {
    type State = i64;
    type Event = Ledger;

    // Reads nothing of `self` (a cached state is brought forward with the events of
    // other `PayOne`s, through their `apply`). Were the events of `to` folded in, the
    // refusal at the end of the test would not come: destinations hold credits.
    fn apply(&self, balance: &mut i64, event: &StoredEvent<Ledger>) {
        match event.payload {
            Ledger::Credited { amount } => *balance += amount,
            Ledger::Debited { amount } => *balance -= amount,
            Ledger::Linked { .. } => {}
        }
    }

    fn handle(
        &self,
        read: ReadStreams<Self::StreamSet>,
        balance: i64,
        _: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, Ledger>>> {
        require!(balance >= 1, "balance {balance}");
        Ok(vec![
            StreamWrite::new(&read, self.from.clone(), Ledger::Debited { amount: 1 })?,
            StreamWrite::new(&read, self.to.clone(), Ledger::Credited { amount: 1 })?,
        ])
    }

    fn state_cache(&self) -> eventcore::StateCache<i64> {
        eventcore::StateCache::for_command::<Self>().folded_from([self.from.clone()])
    }
}

#[tokio::test]
async fn a_state_folded_from_some_streams_serves_every_destination() {
    let memory = InMemoryEventStore::new();
    let spy = Arc::new(ReadSpy::new(memory.clone()));
    let cached = CommandExecutor::from_shared(spy.clone());
    let other = CommandExecutor::new(memory.clone());
    let (a, b, c) = (id("pay-a"), id("pay-b"), id("pay-c"));
    seed(&memory, &a, vec![credit(3)]).await;
    for to in [&b, &c, &b] {
        // Another process pays into the destination meanwhile: its version moves, and
        // the cached executor must append at the version it has now.
        other
            .execute(&PayOne {
                from: c.clone(),
                to: to.clone(),
            })
            .await
            .ok();
        seed(&memory, to, vec![credit(10)]).await;
        let paid = cached
            .execute(&PayOne {
                from: a.clone(),
                to: to.clone(),
            })
            .await
            .expect("paid");
        assert_eq!(
            paid.attempts, 1,
            "no conflict: destinations are read for their versions"
        );
    }
    let refused = cached
        .execute(&PayOne {
            from: a.clone(),
            to: c.clone(),
        })
        .await;
    assert!(
        matches!(refused, Err(Error::BusinessRuleViolation(_))),
        "{refused:?}"
    );
    assert_eq!(balance(&memory, &a).await, 0);
    assert_eq!(spy.whole.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_refusal_on_a_cached_state_is_decided_again_after_reading() {
    let memory = InMemoryEventStore::new();
    let spy = Arc::new(ReadSpy::new(memory.clone()));
    let cached = CommandExecutor::from_shared(spy.clone());
    let (a, b) = (id("refuse-a"), id("refuse-b"));
    seed(&memory, &a, vec![credit(1)]).await;
    let pay = PayOne {
        from: a.clone(),
        to: b.clone(),
    };
    cached.execute(&pay).await.expect("first payment");
    assert_eq!(balance(&memory, &a).await, 0);
    // Someone else credits `a`: the cached balance (0) is behind, and a refusal decided
    // on it would be wrong. No append checks a refusal, so it is not trusted.
    seed(&memory, &a, vec![credit(5)]).await;
    let reads_before = spy.after.load(Ordering::SeqCst);
    let appends_before = spy.appends.load(Ordering::SeqCst);
    let paid = cached.execute(&pay).await.expect("paid after reading");
    assert_eq!(paid.attempts, 1);
    assert_eq!(spy.after.load(Ordering::SeqCst), reads_before + 1);
    assert_eq!(spy.appends.load(Ordering::SeqCst), appends_before + 1);
    assert_eq!(balance(&memory, &a).await, 4);
    assert_eq!(balance(&memory, &b).await, 2);
}

#[tokio::test]
async fn own_writes_bring_other_cached_states_of_the_type_forward() {
    let memory = InMemoryEventStore::new();
    let spy = Arc::new(ReadSpy::new(memory.clone()));
    let cached = CommandExecutor::from_shared(spy.clone());
    let (a, b, c) = (id("forward-a"), id("forward-b"), id("forward-c"));
    seed(&memory, &a, vec![credit(1)]).await;
    seed(&memory, &b, vec![credit(1)]).await;
    let b_to_c = PayOne {
        from: b.clone(),
        to: c.clone(),
    };
    let a_to_b = PayOne {
        from: a.clone(),
        to: b.clone(),
    };
    // Reads `b` (balance 1) and `c`, pays: b's cached balance is 0.
    cached.execute(&b_to_c).await.expect("b pays c");
    // Reads `a`; its credit to `b` also brings b's cached balance forward, to 1.
    cached.execute(&a_to_b).await.expect("a pays b");
    let reads_before = spy.after.load(Ordering::SeqCst);
    let appends_before = spy.appends.load(Ordering::SeqCst);
    // Decided without reading, on b's balance of 1, and proven by the append.
    cached.execute(&b_to_c).await.expect("b pays c again");
    assert_eq!(spy.after.load(Ordering::SeqCst), reads_before, "no read");
    assert_eq!(spy.appends.load(Ordering::SeqCst), appends_before + 1);
    // b is now at 0: refused, after reading to make sure.
    let refused = cached.execute(&b_to_c).await;
    assert!(
        matches!(refused, Err(Error::BusinessRuleViolation(_))),
        "{refused:?}"
    );
    assert_eq!(spy.after.load(Ordering::SeqCst), reads_before + 1);
    assert_eq!(balance(&memory, &a).await, 0);
    assert_eq!(balance(&memory, &b).await, 0);
    assert_eq!(balance(&memory, &c).await, 2);
}

/// `PayOne` with an `apply` that breaks the cache contract: it reads `self` and panics
/// on an event of any stream but its own `from`.
#[derive(Command)]
struct PayOneStrict {
    #[stream]
    from: StreamId,
    #[stream]
    to: StreamId,
}

impl CommandLogic for PayOneStrict {
    type State = i64;
    type Event = Ledger;

    fn apply(&self, balance: &mut i64, event: &StoredEvent<Ledger>) {
        assert_eq!(
            event.stream_id, self.from,
            "reads self (breaks the contract)"
        );
        match event.payload {
            Ledger::Credited { amount } => *balance += amount,
            Ledger::Debited { amount } => *balance -= amount,
            Ledger::Linked { .. } => {}
        }
    }

    fn handle(
        &self,
        read: ReadStreams<Self::StreamSet>,
        balance: i64,
        _: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, Ledger>>> {
        require!(balance >= 1, "balance {balance}");
        Ok(vec![
            StreamWrite::new(&read, self.from.clone(), Ledger::Debited { amount: 1 })?,
            StreamWrite::new(&read, self.to.clone(), Ledger::Credited { amount: 1 })?,
        ])
    }

    fn state_cache(&self) -> eventcore::StateCache<i64> {
        eventcore::StateCache::for_command::<Self>().folded_from([self.from.clone()])
    }
}

#[tokio::test]
async fn a_panicking_apply_after_the_append_does_not_fail_the_written_command() {
    let memory = InMemoryEventStore::new();
    let executor = CommandExecutor::new(memory.clone());
    let (a, b, c) = (id("strict-a"), id("strict-b"), id("strict-c"));
    seed(&memory, &a, vec![credit(1)]).await;
    seed(&memory, &b, vec![credit(1)]).await;
    executor
        .execute(&PayOneStrict {
            from: b.clone(),
            to: c.clone(),
        })
        .await
        .expect("b pays c: b's state is kept");
    // Bringing b's kept state forward with the credit to `b` calls this command's
    // `apply` (from = a) on an event of `b`: it panics after the append committed.
    let paid = executor
        .execute(&PayOneStrict {
            from: a.clone(),
            to: b.clone(),
        })
        .await;
    assert!(paid.is_ok(), "{paid:?}");
    assert_eq!(balance(&memory, &a).await, 0);
    assert_eq!(balance(&memory, &b).await, 1);
    // b's state was not kept forward: the next payment from b reads and sees 1.
    executor
        .execute(&PayOneStrict {
            from: b.clone(),
            to: c.clone(),
        })
        .await
        .expect("b pays c again");
    assert_eq!(balance(&memory, &b).await, 0);
    assert_eq!(balance(&memory, &c).await, 2);
}

/// Appends the number of events already in its stream, plus one: 1, 2, 3, ... A state
/// that counted an event twice would skip a number.
#[derive(Command)]
struct Tally {
    #[stream]
    counter: StreamId,
}

impl CommandLogic for Tally {
    type State = i64;
    type Event = Ledger;

    fn apply(&self, count: &mut i64, _: &StoredEvent<Ledger>) {
        *count += 1;
    }

    fn handle(
        &self,
        read: ReadStreams<Self::StreamSet>,
        count: i64,
        _: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, Ledger>>> {
        Ok(vec![StreamWrite::new(
            &read,
            self.counter.clone(),
            Ledger::Credited { amount: count + 1 },
        )?])
    }

    fn state_cache(&self) -> eventcore::StateCache<i64> {
        eventcore::StateCache::for_command::<Self>()
    }
}

#[tokio::test]
async fn an_answer_with_a_gap_is_not_folded_into_the_cached_state() {
    let memory = InMemoryEventStore::new();
    let spy = Arc::new(ReadSpy::new(memory.clone()));
    let executor = CommandExecutor::from_shared(spy.clone()).with_retry_policy(fast_retries(5));
    let counter = id("tally-1");
    let other = CommandExecutor::new(memory.clone());
    for _ in 0..2 {
        executor
            .execute(&Tally {
                counter: counter.clone(),
            })
            .await
            .expect("tally");
    }
    other
        .execute(&Tally {
            counter: counter.clone(),
        })
        .await
        .expect("other");
    spy.gap_once.store(true, Ordering::SeqCst);
    executor
        .execute(&Tally {
            counter: counter.clone(),
        })
        .await
        .expect("tally");
    assert_eq!(
        sequence(&memory, &counter).await,
        [1, 2, 3, 4],
        "nothing missed"
    );
}

/// Keys its cache under another command's type (a copy-paste slip).
#[derive(Command)]
struct Borrowed {
    #[stream]
    counter: StreamId,
}

impl CommandLogic for Borrowed {
    type State = i64;
    type Event = Ledger;

    fn apply(&self, count: &mut i64, _: &StoredEvent<Ledger>) {
        *count += 100;
    }

    fn handle(
        &self,
        read: ReadStreams<Self::StreamSet>,
        count: i64,
        _: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, Ledger>>> {
        Ok(vec![StreamWrite::new(
            &read,
            self.counter.clone(),
            Ledger::Credited { amount: count },
        )?])
    }

    fn state_cache(&self) -> eventcore::StateCache<i64> {
        eventcore::StateCache::for_command::<Tally>()
    }
}

#[tokio::test]
async fn a_state_cache_keyed_by_another_command_type_is_not_used() {
    let memory = InMemoryEventStore::new();
    let spy = Arc::new(ReadSpy::new(memory.clone()));
    let executor = CommandExecutor::from_shared(spy.clone());
    let counter = id("tally-2");
    executor
        .execute(&Tally {
            counter: counter.clone(),
        })
        .await
        .expect("tally");
    executor
        .execute(&Borrowed {
            counter: counter.clone(),
        })
        .await
        .expect("borrowed");
    executor
        .execute(&Tally {
            counter: counter.clone(),
        })
        .await
        .expect("tally");
    // Borrowed folded its own way (100 per event), not from Tally's cached count.
    assert_eq!(sequence(&memory, &counter).await, [1, 100, 3]);
    assert_eq!(
        spy.whole.load(Ordering::SeqCst),
        1,
        "Borrowed read whole, uncached"
    );
}

#[tokio::test]
async fn a_state_folded_from_some_streams_sees_only_them_with_the_cache_off_too() {
    let memory = InMemoryEventStore::new();
    let executor = CommandExecutor::new(memory.clone()).with_state_cache_capacity(0);
    let (a, b) = (id("only-a"), id("only-b"));
    seed(&memory, &a, vec![credit(1)]).await;
    seed(&memory, &b, vec![credit(50)]).await;
    // PayOne's apply asserts it is only handed `from`'s events.
    executor
        .execute(&PayOne {
            from: a.clone(),
            to: b.clone(),
        })
        .await
        .expect("paid");
    let refused = executor
        .execute(&PayOne {
            from: a.clone(),
            to: b.clone(),
        })
        .await;
    assert!(
        matches!(refused, Err(Error::BusinessRuleViolation(_))),
        "{refused:?}"
    );
}

/// A store whose first read waits at a gate until the test opens it; counts reads.
struct GatedFirstRead {
    inner: InMemoryEventStore,
    reads: AtomicUsize,
    gate: tokio::sync::Semaphore,
}

#[async_trait]
impl EventStore for GatedFirstRead {
    async fn read_streams(&self, streams: &[StreamId]) -> eventcore::Result<StreamsSnapshot> {
        let snapshot = self.inner.read_streams(streams).await?;
        if self.reads.fetch_add(1, Ordering::SeqCst) == 0 {
            // The read happened; its answer waits for the gate.
            self.gate.acquire().await.expect("open").forget();
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

/// Two transfers from one account through one executor, the first held at its read:
/// returns the reads seen while it was held, and each transfer's attempts.
async fn two_transfers_from_one_account(take_turns: bool) -> (usize, u32, u32) {
    let store = Arc::new(GatedFirstRead {
        inner: InMemoryEventStore::new(),
        reads: AtomicUsize::new(0),
        gate: tokio::sync::Semaphore::new(0),
    });
    let (hot, x, y) = (id("acc-hot"), id("acc-x"), id("acc-y"));
    seed(&store.inner, &hot, vec![credit(100)]).await;
    let executor = CommandExecutor::from_shared(store.clone())
        .with_retry_policy(fast_retries(5))
        .with_stream_queue(take_turns);
    let first = {
        let (executor, hot, x) = (executor.clone(), hot.clone(), x.clone());
        tokio::spawn(async move { executor.execute(&transfer(&hot, &x, 10)).await })
    };
    while store.reads.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    let second = {
        let (executor, hot, y) = (executor.clone(), hot.clone(), y.clone());
        tokio::spawn(async move { executor.execute(&transfer(&hot, &y, 20)).await })
    };
    // On this single-threaded runtime, the second transfer runs as far as it can while
    // the test yields: to its own read if it may race, to the queue if it takes turns.
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    let reads_while_held = store.reads.load(Ordering::SeqCst);
    store.gate.add_permits(1);
    let first = first.await.expect("task").expect("first transfer");
    let second = second.await.expect("task").expect("second transfer");
    assert_eq!(balance(&store.inner, &hot).await, 70);
    assert_eq!(balance(&store.inner, &x).await, 10);
    assert_eq!(balance(&store.inner, &y).await, 20);
    (reads_while_held, first.attempts, second.attempts)
}

/// Executions of one executor over the same stream take turns: the second waits for
/// the first instead of deciding on the same state and losing at the append.
#[tokio::test]
async fn executions_over_one_stream_take_turns_instead_of_conflicting() {
    let (reads_while_held, first, second) = two_transfers_from_one_account(true).await;
    assert_eq!(
        reads_while_held, 1,
        "the second read while the first held its turn"
    );
    assert_eq!((first, second), (1, 1), "neither conflicted");
}

/// Without the queue the same two executions race: both read, and one conflicts.
#[tokio::test]
async fn without_the_queue_executions_over_one_stream_race() {
    let (reads_while_held, first, second) = two_transfers_from_one_account(false).await;
    assert_eq!(reads_while_held, 2);
    assert_eq!(first + second, 3, "one of them conflicted and tried again");
}

/// A store that, at its first append, executes another command through the executor
/// that called it, over the same stream, on the same task.
struct ExecutesFromAppend {
    inner: InMemoryEventStore,
    executor: std::sync::OnceLock<CommandExecutor>,
    started: std::sync::atomic::AtomicBool,
    nested: tokio::sync::Mutex<Option<eventcore::Result<u32>>>,
    from: StreamId,
    to: StreamId,
}

#[async_trait]
impl EventStore for ExecutesFromAppend {
    async fn read_streams(&self, streams: &[StreamId]) -> eventcore::Result<StreamsSnapshot> {
        self.inner.read_streams(streams).await
    }

    async fn append(&self, request: AppendRequest) -> eventcore::Result<AppendOutcome> {
        if !self.started.swap(true, Ordering::SeqCst) {
            let executor = self.executor.get().expect("set before executing");
            let result = executor.execute(&transfer(&self.from, &self.to, 5)).await;
            *self.nested.lock().await = Some(result.map(|r| r.attempts));
        }
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

/// An execution started from inside another's attempt on the same task does not wait
/// for the turn its own task holds. (The clock is paused: were the two waiting for each
/// other, the runtime would go idle, the clock jump, and the timeout fire at once.)
#[tokio::test(start_paused = true)]
async fn an_execution_started_inside_an_attempt_does_not_wait_for_its_own_turn() {
    let (hot, x, y) = (id("acc-hot"), id("acc-x"), id("acc-y"));
    let store = Arc::new(ExecutesFromAppend {
        inner: InMemoryEventStore::new(),
        executor: std::sync::OnceLock::new(),
        started: std::sync::atomic::AtomicBool::new(false),
        nested: tokio::sync::Mutex::new(None),
        from: hot.clone(),
        to: y.clone(),
    });
    seed(&store.inner, &hot, vec![credit(100)]).await;
    let executor = CommandExecutor::from_shared(store.clone()).with_retry_policy(fast_retries(5));
    assert!(store.executor.set(executor.clone()).is_ok());

    let outer = tokio::time::timeout(
        std::time::Duration::from_secs(3_600),
        executor.execute(&transfer(&hot, &x, 10)),
    )
    .await
    .expect("the executions waited for each other")
    .expect("the outer transfer");
    let nested = store.nested.lock().await.take().expect("it ran");
    assert_eq!(nested.expect("the nested transfer"), 1);
    // The nested transfer wrote first; the outer one conflicted and decided again.
    assert_eq!(outer.attempts, 2);
    assert_eq!(balance(&store.inner, &hot).await, 85);
    assert_eq!(balance(&store.inner, &x).await, 10);
    assert_eq!(balance(&store.inner, &y).await, 5);
}

/// A conflict only on a stream the state is not folded from (a transfer's destination,
/// written by someone else) says all that was missing, its version: the kept state is
/// still current, and the decision is taken again on it at once, without reading.
#[tokio::test]
async fn a_conflict_only_on_a_stream_not_folded_is_decided_again_without_reading() {
    let memory = InMemoryEventStore::new();
    let spy = Arc::new(ReadSpy::new(memory.clone()));
    let cached = CommandExecutor::from_shared(spy.clone());
    let (a, b) = (id("pay-from"), id("pay-to"));
    seed(&memory, &a, vec![credit(5)]).await;
    let pay = PayOne {
        from: a.clone(),
        to: b.clone(),
    };
    cached.execute(&pay).await.expect("first payment");
    let reads = |spy: &ReadSpy| spy.whole.load(Ordering::SeqCst) + spy.after.load(Ordering::SeqCst);
    let (reads_before, appends_before) = (reads(&spy), spy.appends.load(Ordering::SeqCst));

    // Someone else credits the destination: its version moves, the source's does not.
    seed(&memory, &b, vec![credit(10), credit(10)]).await;
    let paid = cached.execute(&pay).await.expect("second payment");

    assert_eq!(paid.attempts, 1);
    assert_eq!(reads(&spy), reads_before, "the executor read again");
    assert_eq!(
        spy.appends.load(Ordering::SeqCst) - appends_before,
        2,
        "the stale append, then the one at the destination's new version"
    );
    assert_eq!(balance(&memory, &a).await, 3);
    assert_eq!(balance(&memory, &b).await, 22);
}

/// A conflict on the stream the state is folded from still reads what is new.
#[tokio::test]
async fn a_conflict_on_the_folded_stream_reads_what_is_new() {
    let memory = InMemoryEventStore::new();
    let spy = Arc::new(ReadSpy::new(memory.clone()));
    let cached = CommandExecutor::from_shared(spy.clone());
    let (a, b) = (id("pay-from-2"), id("pay-to-2"));
    seed(&memory, &a, vec![credit(5)]).await;
    let pay = PayOne {
        from: a.clone(),
        to: b.clone(),
    };
    cached.execute(&pay).await.expect("first payment");
    let (after_before, appends_before) = (
        spy.after.load(Ordering::SeqCst),
        spy.appends.load(Ordering::SeqCst),
    );
    // Someone else takes 3 from the source: the kept balance (4) is behind, and a
    // payment decided on it would still pass, so only the append can tell.
    let debit = EventData::from_event(&Ledger::Debited { amount: 3 }, EventMetadata::default())
        .expect("serializes");
    seed(&memory, &a, vec![debit]).await;
    cached.execute(&pay).await.expect("second payment");
    assert_eq!(
        spy.after.load(Ordering::SeqCst),
        after_before + 1,
        "no read"
    );
    assert_eq!(spy.appends.load(Ordering::SeqCst), appends_before + 2);
    assert_eq!(balance(&memory, &a).await, 0);
    assert_eq!(balance(&memory, &b).await, 2);
}

/// Counts the executor's reads and appends, and tells after which position the log
/// feed last started waiting (so a test knows what it has seen).
struct FeedSpy {
    inner: InMemoryEventStore,
    reads: AtomicUsize,
    appends: AtomicUsize,
    /// Calls of `wait_for_events`, and the position of the last one.
    waiting: tokio::sync::watch::Sender<(usize, Option<GlobalPosition>)>,
}

impl FeedSpy {
    fn new(inner: InMemoryEventStore) -> Self {
        FeedSpy {
            inner,
            reads: AtomicUsize::new(0),
            appends: AtomicUsize::new(0),
            waiting: tokio::sync::watch::Sender::new((0, None)),
        }
    }

    /// Returns once the feed has taken in everything up to the store's head: it waits
    /// for what comes after (it folds a batch into the cache before it waits again).
    async fn fed_to_head(&self) {
        let head = self.inner.head_position().await.expect("head");
        self.waiting
            .subscribe()
            .wait_for(|(calls, after)| *calls > 0 && *after >= head)
            .await
            .expect("the spy lives");
    }

    fn counts(&self) -> (usize, usize) {
        (
            self.reads.load(Ordering::SeqCst),
            self.appends.load(Ordering::SeqCst),
        )
    }
}

#[async_trait]
impl EventStore for FeedSpy {
    async fn read_streams(&self, streams: &[StreamId]) -> eventcore::Result<StreamsSnapshot> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.read_streams(streams).await
    }

    async fn read_streams_after(
        &self,
        streams: &[(StreamId, eventcore::StreamVersion)],
    ) -> eventcore::Result<StreamsSnapshot> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.read_streams_after(streams).await
    }

    async fn append(&self, request: AppendRequest) -> eventcore::Result<AppendOutcome> {
        self.appends.fetch_add(1, Ordering::SeqCst);
        self.inner.append(request).await
    }

    async fn read_all(&self, query: &LogQuery) -> eventcore::Result<Vec<RecordedEvent>> {
        self.inner.read_all(query).await
    }

    async fn head_position(&self) -> eventcore::Result<Option<GlobalPosition>> {
        self.inner.head_position().await
    }

    async fn wait_for_events(&self, after: Option<GlobalPosition>) -> eventcore::Result<()> {
        self.waiting.send_modify(|(calls, at)| {
            *calls += 1;
            *at = after;
        });
        self.inner.wait_for_events(after).await
    }

    async fn idempotent_outcome(
        &self,
        key: &IdempotencyKey,
    ) -> eventcore::Result<Option<AppendOutcome>> {
        self.inner.idempotent_outcome(key).await
    }
}

/// The amounts of a counter stream, in order.
async fn counted(store: &InMemoryEventStore, counter: &StreamId) -> Vec<i64> {
    store
        .read_streams(std::slice::from_ref(counter))
        .await
        .expect("read")
        .events
        .iter()
        .map(
            |event| match event.decode::<Ledger>().expect("decodes").payload {
                Ledger::Credited { amount } => amount,
                other => panic!("unexpected {other:?}"),
            },
        )
        .collect()
}

/// Two executors write one counter; ours follows the log. `theirs` writes `n` numbers
/// between two of ours; returns our reads and appends for the last number, and the
/// stream.
async fn count_between_writes_of_another_executor(
    n: usize,
    feed: bool,
) -> (usize, usize, Vec<i64>) {
    let inner = InMemoryEventStore::new();
    let spy = Arc::new(FeedSpy::new(inner.clone()));
    let ours = CommandExecutor::from_shared(spy.clone())
        .with_retry_policy(fast_retries(5))
        .with_log_feed(feed);
    let theirs = CommandExecutor::new(inner.clone());
    let counter = id("counter");
    let count = Count {
        counter: counter.clone(),
    };
    ours.execute(&count).await.expect("ours, first");
    if feed {
        // The feed starts at the head it finds.
        spy.fed_to_head().await;
    }
    for _ in 0..n {
        theirs.execute(&count).await.expect("theirs");
    }
    if feed {
        spy.fed_to_head().await;
    }
    let before = spy.counts();
    let last = ours.execute(&count).await.expect("ours, last");
    assert_eq!(last.attempts, 1, "a conflict after reading is an attempt");
    let after = spy.counts();
    (
        after.0 - before.0,
        after.1 - before.1,
        counted(&inner, &counter).await,
    )
}

/// With the log feed, a kept state is brought forward with what another executor
/// wrote: the next decision needs neither a read nor a second append.
#[tokio::test]
async fn a_kept_state_is_brought_forward_with_what_another_executor_wrote() {
    let (reads, appends, numbers) = count_between_writes_of_another_executor(2, true).await;
    assert_eq!(
        numbers,
        vec![1, 2, 3, 4],
        "a number was repeated or skipped"
    );
    assert_eq!((reads, appends), (0, 1), "the feed was not used");
}

/// Without it, the decision on the kept state loses at the append, and the executor
/// reads and decides again.
#[tokio::test]
async fn without_the_log_feed_a_kept_state_learns_of_other_writers_at_its_append() {
    let (reads, appends, numbers) = count_between_writes_of_another_executor(2, false).await;
    assert_eq!(numbers, vec![1, 2, 3, 4]);
    assert_eq!((reads, appends), (1, 2));
}

/// The feed keeps the latest 32 events of a stream: after more from another writer it
/// cannot bring the state forward (the events right after it are gone), and the
/// executor reads, deciding as without it.
#[tokio::test]
async fn a_feed_missing_events_of_a_stream_is_not_used() {
    let (reads, appends, numbers) = count_between_writes_of_another_executor(40, true).await;
    assert_eq!(numbers, (1..=42).collect::<Vec<_>>());
    assert_eq!((reads, appends), (1, 2));
}

/// Credits the sum of its stream's credits plus one; folded from its stream named twice
/// (as a transfer to its own account would name it), which must fold each event once.
#[derive(Command)]
struct SumNamedTwice {
    #[stream]
    counter: StreamId,
}

impl CommandLogic for SumNamedTwice {
    type State = i64;
    type Event = Ledger;

    fn apply(&self, sum: &mut i64, event: &StoredEvent<Ledger>) {
        if let Ledger::Credited { amount } = event.payload {
            *sum += amount;
        }
    }

    fn handle(
        &self,
        read: ReadStreams<Self::StreamSet>,
        sum: i64,
        _: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, Ledger>>> {
        Ok(vec![StreamWrite::new(
            &read,
            self.counter.clone(),
            Ledger::Credited { amount: sum + 1 },
        )?])
    }

    fn state_cache(&self) -> eventcore::StateCache<i64> {
        eventcore::StateCache::for_command::<Self>()
            .folded_from([self.counter.clone(), self.counter.clone()])
    }
}

/// A stream named twice in `folded_from` is folded once, also from the log feed (whose
/// events were folded once per name, and the append, checking the stream's version,
/// could not tell).
#[tokio::test]
async fn a_stream_named_twice_in_folded_from_is_folded_once_from_the_feed() {
    let inner = InMemoryEventStore::new();
    let spy = Arc::new(FeedSpy::new(inner.clone()));
    let ours = CommandExecutor::from_shared(spy.clone()).with_log_feed(true);
    let theirs = CommandExecutor::new(inner.clone());
    let counter = id("summed");
    let sum = SumNamedTwice {
        counter: counter.clone(),
    };
    ours.execute(&sum).await.expect("ours, first"); // credits 1
    spy.fed_to_head().await;
    theirs.execute(&sum).await.expect("theirs"); // credits 2
    spy.fed_to_head().await;
    let before = spy.counts();
    ours.execute(&sum).await.expect("ours, last"); // credits 1 + 2 + 1
    let after = spy.counts();
    assert_eq!(counted(&inner, &counter).await, vec![1, 2, 4]);
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (0, 1),
        "the feed was used"
    );
}
