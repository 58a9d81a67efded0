//! Command execution: read, fold, decide, append atomically, retry on conflict.
//!
//! This file holds the API and the retry loop; beside it, `retry` (the
//! [`RetryPolicy`]), `decide` (one fold-and-handle round and the append request it
//! yields) and `state_cache` (kept states and the cached path, with the rules that
//! keep it correct).

mod decide;
mod feed;
mod queue;
mod retry;
mod state_cache;

use std::sync::Arc;

use tracing::{Instrument, field};

use crate::command::{Command, StreamWrite};
#[cfg(doc)]
use crate::command::{CommandLogic, StreamResolver};
use crate::error::{Error, Result};
use crate::metadata::EventMetadata;
use crate::store::{AppendOutcome, AppendedEvent, EventStore, StreamsSnapshot};
use crate::trace::TraceContext;
use crate::types::{CausationId, CorrelationId, EventId, IdempotencyKey, StreamId};
use serde_json::{Map, Value};

use decide::build_request;
pub(crate) use decide::decide;
use queue::StreamQueue;
pub use retry::RetryPolicy;
use state_cache::StateCacheMap;

/// Per-execution settings: idempotency key and the metadata stamped on every event.
///
/// # Examples
///
/// ```
/// use eventcore::{ExecutionOptions, IdempotencyKey, CorrelationId};
///
/// let key = IdempotencyKey::try_new("order-7/charge")?;
/// let options = ExecutionOptions::new()
///     .with_idempotency_key(key.clone())
///     .with_correlation_id(CorrelationId::new())
///     .with_actor("user-3");
/// assert_eq!(options.idempotency_key(), Some(&key));
/// assert_eq!(options.actor(), Some("user-3"));
/// # Ok::<(), eventcore::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExecutionOptions {
    idempotency_key: Option<IdempotencyKey>,
    correlation_id: Option<CorrelationId>,
    causation_id: Option<CausationId>,
    actor: Option<String>,
    custom: Map<String, Value>,
    trace_context: Option<TraceContext>,
}

impl ExecutionOptions {
    /// No key; a fresh correlation id; causation = this execution.
    pub fn new() -> Self {
        Self::default()
    }

    /// Executes at most once for this key: a later execution with the same key writes
    /// nothing and returns the first outcome.
    pub fn with_idempotency_key(mut self, key: IdempotencyKey) -> Self {
        self.idempotency_key = Some(key);
        self
    }

    /// The correlation id stamped on every event (a fresh one when not set).
    pub fn with_correlation_id(mut self, id: CorrelationId) -> Self {
        self.correlation_id = Some(id);
        self
    }

    /// The causation id stamped on every event, usually the event that triggered this
    /// command (an id for this execution when not set).
    pub fn with_causation_id(mut self, id: CausationId) -> Self {
        self.causation_id = Some(id);
        self
    }

    /// The user or system on whose behalf the command runs.
    pub fn with_actor(mut self, actor: impl Into<String>) -> Self {
        self.actor = Some(actor.into());
        self
    }

    /// A custom metadata field stamped on every event.
    pub fn with_custom(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.custom.insert(key.into(), value.into());
        self
    }

    /// The W3C trace context stamped on every event (see [`TraceContext`]): the
    /// context the command runs in, carried with its events to other services.
    pub fn with_trace_context(mut self, context: TraceContext) -> Self {
        self.trace_context = Some(context);
        self
    }

    /// The idempotency key, if set.
    pub fn idempotency_key(&self) -> Option<&IdempotencyKey> {
        self.idempotency_key.as_ref()
    }

    /// The correlation id, if set.
    pub fn correlation_id(&self) -> Option<CorrelationId> {
        self.correlation_id
    }

    /// The causation id, if set.
    pub fn causation_id(&self) -> Option<CausationId> {
        self.causation_id
    }

    /// The actor, if set.
    pub fn actor(&self) -> Option<&str> {
        self.actor.as_deref()
    }

    /// The custom metadata fields.
    pub fn custom(&self) -> &Map<String, Value> {
        &self.custom
    }

    /// The trace context, if set.
    pub fn trace_context(&self) -> Option<&TraceContext> {
        self.trace_context.as_ref()
    }
}

/// What an execution did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExecutionResult {
    /// The events written, with their stream versions and global positions.
    pub events_written: Vec<AppendedEvent>,
    /// Attempts made: 1 when the first attempt succeeded (or found its idempotency key
    /// already used), more after conflicts or retryable backend failures.
    pub attempts: u32,
    /// `true` when the idempotency key had been used before: nothing was written now and
    /// `events_written` are the first execution's.
    pub deduplicated: bool,
}

impl ExecutionResult {
    /// A result as the executor returns it; for tests and for components that stand in
    /// for an executor (the struct is `#[non_exhaustive]`).
    ///
    /// ```
    /// let repeat = eventcore::ExecutionResult::new(Vec::new(), 1, true);
    /// assert!(repeat.deduplicated && repeat.events_written.is_empty());
    /// ```
    pub fn new(events_written: Vec<AppendedEvent>, attempts: u32, deduplicated: bool) -> Self {
        ExecutionResult {
            events_written,
            attempts,
            deduplicated,
        }
    }
}

/// Executes commands against an [`EventStore`].
///
/// For each execution: read every declared stream, fold the events into the command's
/// state (or bring a cached state up to date, for commands that allow it: see
/// [`CommandLogic::state_cache`]), call `handle`, read any streams the command resolved and decide again, then
/// append all writes atomically, with an expected version for every stream read, the
/// read-only ones included. A [`Error::VersionConflict`] or a retryable backend error
/// repeats the whole cycle under the [`RetryPolicy`]; business errors never do.
///
/// Cloning is cheap; clones share the store.
#[derive(Clone)]
pub struct CommandExecutor {
    store: Arc<dyn EventStore>,
    retry_policy: RetryPolicy,
    max_stream_resolutions: u32,
    states: Arc<StateCacheMap>,
    /// `None` when executions race (see [`CommandExecutor::with_stream_queue`]).
    queue: Option<Arc<StreamQueue>>,
    /// With [`CommandExecutor::with_log_feed`]: the task following the log, started at
    /// the first cached execution, stopped with the last clone.
    feed: Option<Arc<std::sync::OnceLock<Option<feed::Follower>>>>,
    metrics: Arc<crate::metrics::CommandMetrics>,
}

impl CommandExecutor {
    /// The default bound on [`StreamResolver`] rounds per attempt.
    pub const DEFAULT_MAX_STREAM_RESOLUTIONS: u32 = 8;

    /// The default number of folded states kept for commands that allow it
    /// ([`CommandLogic::state_cache`]).
    pub const DEFAULT_STATE_CACHE_CAPACITY: usize = 10_000;

    /// An executor over `store` with the default retry policy.
    pub fn new(store: impl EventStore) -> Self {
        Self::from_shared(Arc::new(store))
    }

    /// An executor over a store that is already shared.
    pub fn from_shared(store: Arc<dyn EventStore>) -> Self {
        CommandExecutor {
            store,
            retry_policy: RetryPolicy::default(),
            max_stream_resolutions: Self::DEFAULT_MAX_STREAM_RESOLUTIONS,
            states: Arc::new(StateCacheMap::new(
                Self::DEFAULT_STATE_CACHE_CAPACITY,
                Arc::default(),
            )),
            queue: Some(Arc::new(StreamQueue::new())),
            feed: None,
            metrics: Arc::default(),
        }
    }

    /// Keeps at most `capacity` folded states for commands that allow it
    /// ([`CommandLogic::state_cache`]); 0 turns the cache off. The cache is shared by
    /// this executor's clones; this gives the executor a new, empty one.
    pub fn with_state_cache_capacity(mut self, capacity: usize) -> Self {
        // Snapshots the old cache started saving are still waited for by
        // `flush_snapshots`.
        self.states = Arc::new(StateCacheMap::new(capacity, self.states.saves.clone()));
        if self.feed.is_some() {
            // The feed follows the log into this executor's new cache.
            self.feed = Some(Arc::default());
        }
        self
    }

    /// Whether kept states ([`CommandLogic::state_cache`]) are also brought forward
    /// with what other writers append (off by default). With it, one background task
    /// per executor (shared by its clones, started at the first cached execution,
    /// stopped when the last clone is dropped) follows the store's global log, waiting
    /// for events without polling, and keeps the latest events of the streams the cache
    /// knows. An execution folds those into its copy of the kept state before deciding
    /// without reading. It is for several processes (or executors) writing the same
    /// streams, such as two instances of a service: without the feed, most of their
    /// commands decide on a state the other one has moved, lose at the append, read and
    /// decide again.
    ///
    /// Decisions are the same with it or without it: events are folded only when they
    /// follow on from the kept state, and the append checks every stream at the
    /// versions of the fold, so a feed that lags costs a conflict, never a wrong
    /// decision. It costs a read of every event of the log, in batches, and memory for
    /// the latest 32 events of up to the cache's capacity in streams. Outside a Tokio
    /// runtime there is no feed.
    pub fn with_log_feed(mut self, follow: bool) -> Self {
        self.feed = follow.then(Arc::default);
        self
    }

    /// Whether kept states are brought forward from the log, starting the feed if it
    /// has not started.
    fn feeds(&self) -> bool {
        self.feed.as_ref().is_some_and(|slot| {
            slot.get_or_init(|| feed::Follower::start(self.store.clone(), &self.states))
                .is_some()
        })
    }

    /// Whether executions of this executor (and its clones) that declare the same stream
    /// take turns (the default) or race. Taking turns, the second waits for the first
    /// one's attempt to end and then decides on what it left, instead of deciding at the
    /// same time and losing at the append (a conflict, a read, and a wait from the retry
    /// policy): on a hot stream that is most of the latency. The append still checks
    /// every stream it read, so writers elsewhere (other processes, other executors) are
    /// caught as before. Turns are per attempt and per declared stream (streams a
    /// [`StreamResolver`] adds are not queued), held only while the attempt runs, never
    /// during a retry's delay. Racing can be the better choice only when commands over
    /// the same streams rarely meet and each attempt is long.
    ///
    /// Streams share 4,096 turns by hash, so two unrelated streams occasionally take
    /// turns too, and a command waiting for one of its streams holds the others: turns
    /// can chain. An attempt holds its turns while it waits for the store, so **a store
    /// (or a wrapper around one) must not wait for another execution of this executor**
    /// from inside a read or an append, as a test gate that needs two executions inside
    /// the store at once would: that one waits for the turn, forever. Give such
    /// executions their own queues or race (`false`). An execution started from inside
    /// an attempt, on the same task, does not queue.
    ///
    /// The queue is shared by this executor's clones; `true` gives the executor a new
    /// one of its own (as does `false`, none).
    pub fn with_stream_queue(mut self, take_turns: bool) -> Self {
        self.queue = take_turns.then(|| Arc::new(StreamQueue::new()));
        self
    }

    /// Replaces the retry policy.
    pub fn with_retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.retry_policy = policy;
        self
    }

    /// Bounds the number of [`StreamResolver`] rounds per attempt.
    pub fn with_max_stream_resolutions(mut self, rounds: u32) -> Self {
        self.max_stream_resolutions = rounds;
        self
    }

    /// Waits until no snapshot ([`crate::StateCache::with_snapshots`]) that this
    /// executor or its clones started saving is still being saved (snapshots are saved
    /// by background tasks, at most two at a time). For an orderly shutdown, and for
    /// tests that look at the store's snapshots; while commands keep running, new saves
    /// can start, and it returns at the first moment none is under way.
    pub async fn flush_snapshots(&self) {
        self.states.saves.settled().await;
    }

    /// The store this executor writes to.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    /// The retry policy.
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.retry_policy
    }

    /// Executes `command` with default options.
    ///
    /// # Errors
    ///
    /// The command's business error; [`Error::RetriesExhausted`] when every attempt hit a
    /// conflict or a retryable backend failure; [`Error::Deserialization`] when a stored
    /// event does not decode into the command's event type; [`Error::UndeclaredStream`],
    /// [`Error::TooManyStreamResolutions`]; a non-retryable [`Error::Backend`].
    /// Whatever the error, nothing of this execution was written, with one exception:
    /// [`Error::OutcomeUnknown`], when the store lost contact during the append and
    /// could not find out whether it committed. Without an idempotency key that error
    /// is returned at once (deciding again could write twice; the events it names
    /// may be stored). With a key (see [`CommandExecutor::execute_with`]) the executor
    /// asks again under the key, within the retry policy: the outcome found is the
    /// answer (`deduplicated: false` when it is this execution's own write), and the
    /// error comes back only when the attempts run out before the outcome is known.
    ///
    /// # Panics
    ///
    /// When a retry must wait and the Tokio runtime has no timer (built without
    /// `enable_time`); `#[tokio::main]` and `#[tokio::test]` runtimes have one.
    pub async fn execute<C: Command>(&self, command: &C) -> Result<ExecutionResult> {
        self.execute_with(command, ExecutionOptions::default())
            .await
    }

    /// Executes `command` with an idempotency key and/or metadata.
    ///
    /// # Errors
    ///
    /// As [`CommandExecutor::execute`].
    ///
    /// # Panics
    ///
    /// As [`CommandExecutor::execute`].
    pub async fn execute_with<C: Command>(
        &self,
        command: &C,
        options: ExecutionOptions,
    ) -> Result<ExecutionResult> {
        let span = tracing::info_span!(
            "eventcore.execute",
            command = command.command_name(),
            streams = field::Empty,
            attempt = field::Empty,
            events_written = field::Empty,
            deduplicated = field::Empty,
        );
        #[cfg(feature = "opentelemetry")]
        let options = trace_command(&span, options);
        let started = std::time::Instant::now();
        let result = self.run(command, options).instrument(span).await;
        self.metrics
            .command_finished(command.command_name(), &result, started.elapsed());
        result
    }

    async fn run<C: Command>(
        &self,
        command: &C,
        options: ExecutionOptions,
    ) -> Result<ExecutionResult> {
        let span = tracing::Span::current();
        let metadata = EventMetadata {
            correlation_id: options.correlation_id.unwrap_or_default(),
            causation_id: Some(options.causation_id.unwrap_or_default()),
            actor: options.actor.clone(),
            custom: options.custom.clone(),
            trace_context: options.trace_context.clone(),
        };
        let mut declared = command.read_streams();
        dedup_in_order(&mut declared);

        let mut attempt = 0;
        // After an append whose outcome is unknown: its event ids, and the error.
        let mut unknown: Option<(Vec<EventId>, Error)> = None;
        loop {
            attempt += 1;
            span.record("attempt", attempt);
            // The first attempt leaves the key to the append (see `attempt`).
            let look_up_first = attempt > 1;
            // Held for this attempt only: released before any retry delay below.
            let turn = match &self.queue {
                Some(queue) if !queue::in_turn() => Some(queue.turn(&declared).await),
                _ => None,
            };
            let attempt_future = self.attempt(
                command,
                &declared,
                &metadata,
                options.idempotency_key.as_ref(),
                look_up_first,
            );
            // Holding a turn, the attempt is not preempted by Tokio's cooperative budget
            // (it still gives its worker back whenever it waits for I/O): executions
            // queued behind it would wait for every task of the worker to run first.
            let result = if turn.is_some() {
                tokio::task::unconstrained(queue::holding(attempt_future)).await
            } else {
                attempt_future.await
            };
            if let Some(turn) = turn {
                turn.end().await;
                // What the attempt did not spend of the task's budget, spent here, out of
                // the turn: a task executing commands back to back on a store that never
                // waits (the in-memory one) still gives its worker to other tasks.
                tokio::task::coop::consume_budget().await;
            }
            match result {
                Ok(outcome) => {
                    // The key found the events of this execution's own attempt whose
                    // answer was lost: this execution wrote them.
                    let deduplicated = outcome.deduplicated
                        && !unknown.as_ref().is_some_and(|(ids, _)| {
                            outcome.events.iter().any(|e| ids.contains(&e.event_id))
                        });
                    span.record("events_written", outcome.events.len());
                    span.record("deduplicated", deduplicated);
                    return Ok(ExecutionResult {
                        events_written: outcome.events,
                        attempts: attempt,
                        deduplicated,
                    });
                }
                // Without a key, deciding again could write a second time: the caller
                // gets the error. With one, the next attempt looks the key up first
                // and finds the outcome, or decides again under the key's protection.
                Err(Error::OutcomeUnknown {
                    message,
                    event_ids,
                    source,
                }) if options.idempotency_key.is_some() => {
                    let error = Error::OutcomeUnknown {
                        message,
                        event_ids: event_ids.clone(),
                        source,
                    };
                    if attempt >= self.retry_policy.max_attempts() {
                        tracing::warn!(attempt, %error, "giving up; the outcome is unknown");
                        return Err(error);
                    }
                    let delay = self.retry_policy.delay_before_retry(attempt);
                    tracing::warn!(attempt, %error, ?delay, "outcome unknown; asking again under the idempotency key");
                    crate::metrics::command_retried(
                        command.command_name(),
                        crate::metrics::RetryReason::OutcomeUnknown,
                    );
                    unknown
                        .get_or_insert((Vec::new(), error))
                        .0
                        .extend(event_ids);
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                }
                Err(error) if error.is_retryable() => {
                    crate::metrics::attempt_failed(command.command_name(), &error);
                    if attempt >= self.retry_policy.max_attempts() {
                        tracing::warn!(attempt, %error, "giving up");
                        // An earlier attempt may have written: say so, not "nothing
                        // was written".
                        if let Some((_, unknown)) = unknown {
                            return Err(unknown);
                        }
                        return Err(Error::RetriesExhausted {
                            attempts: attempt,
                            last: Box::new(error),
                        });
                    }
                    let delay = self.retry_policy.delay_before_retry(attempt);
                    tracing::debug!(attempt, %error, ?delay, "retrying");
                    crate::metrics::command_retried(
                        command.command_name(),
                        if matches!(error, Error::VersionConflict { .. }) {
                            crate::metrics::RetryReason::VersionConflict
                        } else {
                            crate::metrics::RetryReason::Backend
                        },
                    );
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// One read–fold–decide–append cycle. Every attempt starts from the declared
    /// streams: streams resolved from a state that turned out stale are not carried over.
    ///
    /// With an idempotency key, the key's earlier outcome (a redelivery, or an earlier
    /// attempt whose answer was lost) is what the caller gets, never a decision taken
    /// again on state that includes it. `look_up_first` asks the store before deciding
    /// (every retry does). Without it (a first attempt, almost always the key's first
    /// use), the lookup is left to the append, which checks the key before any version
    /// and answers with the stored outcome (the store contract, in the conformance
    /// suite): one round trip less. Only a decision that fails is then followed by the
    /// lookup, since the failure may come from the key's own earlier effect.
    async fn attempt<C: Command>(
        &self,
        command: &C,
        declared: &[StreamId],
        metadata: &EventMetadata,
        idempotency_key: Option<&IdempotencyKey>,
        look_up_first: bool,
    ) -> Result<AppendOutcome> {
        let Some(key) = idempotency_key else {
            return self
                .decide_and_append(command, declared, metadata, None)
                .await;
        };
        if look_up_first && let Some(outcome) = self.store.idempotent_outcome(key).await? {
            return Ok(outcome);
        }
        match self
            .decide_and_append(command, declared, metadata, Some(key))
            .await
        {
            Err(error)
                if !look_up_first
                    && !error.is_retryable()
                    && !matches!(error, Error::OutcomeUnknown { .. }) =>
            {
                match self.store.idempotent_outcome(key).await? {
                    Some(outcome) => Ok(outcome),
                    None => Err(error),
                }
            }
            result => result,
        }
    }

    async fn decide_and_append<C: Command>(
        &self,
        command: &C,
        declared: &[StreamId],
        metadata: &EventMetadata,
        idempotency_key: Option<&IdempotencyKey>,
    ) -> Result<AppendOutcome> {
        if let Some(ops) = command.state_cache().ops
            && self.states.capacity > 0
            && let Some(outcome) = self
                .attempt_cached(command, declared, &ops, metadata, idempotency_key)
                .await?
        {
            return Ok(outcome);
        }
        let mut streams = declared.to_vec();
        let mut rounds = 0;
        let (writes, snapshot) = loop {
            let snapshot = self.store.read_streams(&streams).await?;
            let events = snapshot
                .events
                .iter()
                .map(|event| event.decode::<C::Event>())
                .collect::<Result<Vec<_>>>()?;
            let decision = decide(command, &streams, &events)?;
            if decision.more_streams.is_empty() {
                break (decision.writes, snapshot);
            }
            rounds += 1;
            if rounds > self.max_stream_resolutions {
                return Err(Error::TooManyStreamResolutions {
                    limit: self.max_stream_resolutions,
                });
            }
            streams.extend(decision.more_streams);
        };
        let span = tracing::Span::current();
        if !span.is_disabled() {
            span.record("streams", field::debug(&streams));
        }

        self.append_decision(&streams, &snapshot, writes, metadata, idempotency_key)
            .await
    }

    /// Appends what `handle` decided, checking every stream read at its version.
    async fn append_decision<S, E: crate::Event>(
        &self,
        streams: &[StreamId],
        snapshot: &StreamsSnapshot,
        writes: Vec<StreamWrite<S, E>>,
        metadata: &EventMetadata,
        idempotency_key: Option<&IdempotencyKey>,
    ) -> Result<AppendOutcome> {
        // Nothing to write and nothing to remember: no append. A key with no streams at
        // all has nothing to guard either, so no append checks it: its earlier outcome,
        // if any, is looked up here.
        if writes.is_empty() {
            match idempotency_key {
                None => return Ok(AppendOutcome::written(Vec::new())),
                Some(key) if streams.is_empty() => {
                    let earlier = self.store.idempotent_outcome(key).await?;
                    return Ok(earlier.unwrap_or_else(|| AppendOutcome::written(Vec::new())));
                }
                Some(_) => {}
            }
        }
        let mut request = build_request(streams, snapshot, writes, metadata)?;
        request.idempotency_key = idempotency_key.cloned();
        self.store.append(request).await
    }
}

impl std::fmt::Debug for CommandExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandExecutor")
            .field("retry_policy", &self.retry_policy)
            .field("max_stream_resolutions", &self.max_stream_resolutions)
            .finish_non_exhaustive()
    }
}

/// With OpenTelemetry: a command given a trace context but run outside any trace (a
/// traceparent taken from an incoming request, say) continues that trace; and its events
/// carry the context of the command's own span, so what handles them is a child of it.
#[cfg(feature = "opentelemetry")]
fn trace_command(span: &tracing::Span, mut options: ExecutionOptions) -> ExecutionOptions {
    if let Some(given) = &options.trace_context
        && !crate::otel::in_trace()
    {
        crate::otel::continue_from(span, given);
    }
    if let Some(own) = crate::otel::context_of(span) {
        options.trace_context = Some(own);
    }
    options
}

fn dedup_in_order(streams: &mut Vec<StreamId>) {
    let mut seen = std::collections::HashSet::with_capacity(streams.len());
    streams.retain(|stream| seen.insert(stream.clone()));
}
