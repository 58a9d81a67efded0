//! Command execution: read, fold, decide, append atomically, retry on conflict.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use serde_json::{Map, Value};
use tracing::{Instrument, field};

use crate::command::{
    Command, CommandLogic, ReadStreams, StateCacheOps, StreamResolver, StreamWrite,
};
use crate::error::{Error, Result};
use crate::event::{EventData, RecordedEvent, StoredEvent};
use crate::metadata::EventMetadata;
use crate::store::{
    AppendOutcome, AppendRequest, AppendedEvent, EventStore, StreamAppend, StreamsSnapshot,
};
use crate::types::{
    CausationId, CorrelationId, EventId, ExpectedVersion, GlobalPosition, IdempotencyKey, StreamId,
    StreamVersion,
};

/// When and how often the executor repeats a command after a retryable failure
/// ([`Error::VersionConflict`], or a backend error marked retryable).
///
/// The delay before retry `n` (1-based) is drawn uniformly from
/// `[d/2, d]` with `d = min(max_delay, initial_delay * 2^(n-1))` ("equal jitter"), so
/// writers that collided spread out instead of colliding again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    max_attempts: u32,
    initial_delay: Duration,
    max_delay: Duration,
}

impl RetryPolicy {
    /// The default: 10 attempts, first delay 1 ms, delays capped at 100 ms.
    pub const fn new() -> Self {
        RetryPolicy {
            max_attempts: 10,
            initial_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(100),
        }
    }

    /// One attempt, no retry.
    pub const fn no_retries() -> Self {
        RetryPolicy {
            max_attempts: 1,
            initial_delay: Duration::ZERO,
            max_delay: Duration::ZERO,
        }
    }

    /// Sets the total number of attempts, the first one included (at least 1).
    pub const fn with_max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = if max_attempts == 0 { 1 } else { max_attempts };
        self
    }

    /// Sets the delay before the first retry.
    pub const fn with_initial_delay(mut self, delay: Duration) -> Self {
        self.initial_delay = delay;
        self
    }

    /// Sets the cap on any single delay.
    pub const fn with_max_delay(mut self, delay: Duration) -> Self {
        self.max_delay = delay;
        self
    }

    /// The total number of attempts allowed.
    pub const fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The delay to wait before retry number `retry` (1 for the first retry).
    pub fn delay_before_retry(&self, retry: u32) -> Duration {
        let exponent = retry.saturating_sub(1).min(31);
        let ceiling = self
            .initial_delay
            .saturating_mul(1u32 << exponent)
            .min(self.max_delay);
        if ceiling.is_zero() {
            return Duration::ZERO;
        }
        let half = ceiling / 2;
        let nanos = u64::try_from((ceiling - half).as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(rand::rng().random_range(0..=nanos))
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::new()
    }
}

/// Per-execution settings: idempotency key and the metadata stamped on every event.
///
/// # Examples
///
/// ```
/// use eventcore::{ExecutionOptions, IdempotencyKey, CorrelationId};
///
/// let options = ExecutionOptions::new()
///     .idempotency_key(IdempotencyKey::try_new("order-7/charge")?)
///     .correlation_id(CorrelationId::new())
///     .actor("user-3");
/// # Ok::<(), eventcore::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExecutionOptions {
    idempotency_key: Option<IdempotencyKey>,
    correlation_id: Option<CorrelationId>,
    causation_id: Option<CausationId>,
    actor: Option<String>,
    custom: Map<String, Value>,
}

impl ExecutionOptions {
    /// No key; a fresh correlation id; causation = this execution.
    pub fn new() -> Self {
        Self::default()
    }

    /// Executes at most once for this key: a later execution with the same key writes
    /// nothing and returns the first outcome.
    pub fn idempotency_key(mut self, key: IdempotencyKey) -> Self {
        self.idempotency_key = Some(key);
        self
    }

    /// The correlation id stamped on every event (a fresh one when not set).
    pub fn correlation_id(mut self, id: CorrelationId) -> Self {
        self.correlation_id = Some(id);
        self
    }

    /// The causation id stamped on every event, usually the event that triggered this
    /// command (an id for this execution when not set).
    pub fn causation_id(mut self, id: CausationId) -> Self {
        self.causation_id = Some(id);
        self
    }

    /// The user or system on whose behalf the command runs.
    pub fn actor(mut self, actor: impl Into<String>) -> Self {
        self.actor = Some(actor.into());
        self
    }

    /// A custom metadata field stamped on every event.
    pub fn custom(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.custom.insert(key.into(), value.into());
        self
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
            states: Arc::new(StateCacheMap::new(Self::DEFAULT_STATE_CACHE_CAPACITY)),
        }
    }

    /// Keeps at most `capacity` folded states for commands that allow it
    /// ([`CommandLogic::state_cache`]); 0 turns the cache off. The cache is shared by
    /// this executor's clones; this gives the executor a new, empty one.
    pub fn with_state_cache_capacity(mut self, capacity: usize) -> Self {
        self.states = Arc::new(StateCacheMap::new(capacity));
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
        self.run(command, options).instrument(span).await
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
        };
        let mut declared = command.read_streams();
        dedup_in_order(&mut declared);

        let mut attempt = 0;
        // After an append whose outcome is unknown: its event ids, and the error.
        let mut unknown: Option<(Vec<EventId>, Error)> = None;
        loop {
            attempt += 1;
            span.record("attempt", attempt);
            let result = self
                .attempt(
                    command,
                    &declared,
                    &metadata,
                    options.idempotency_key.as_ref(),
                )
                .await;
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
                    unknown
                        .get_or_insert((Vec::new(), error))
                        .0
                        .extend(event_ids);
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                }
                Err(error) if error.is_retryable() => {
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
    async fn attempt<C: Command>(
        &self,
        command: &C,
        declared: &[StreamId],
        metadata: &EventMetadata,
        idempotency_key: Option<&IdempotencyKey>,
    ) -> Result<AppendOutcome> {
        // Checked on every attempt, not just the first: if an earlier attempt's append
        // committed but its answer was lost (a dropped connection), this attempt must
        // return that outcome instead of deciding again on state that includes it.
        if let Some(key) = idempotency_key
            && let Some(outcome) = self.store.idempotent_outcome(key).await?
        {
            return Ok(outcome);
        }
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
        // all has nothing to guard either.
        if writes.is_empty() && (idempotency_key.is_none() || streams.is_empty()) {
            return Ok(AppendOutcome::written(Vec::new()));
        }
        let mut request = build_request(streams, snapshot, writes, metadata)?;
        request.idempotency_key = idempotency_key.cloned();
        self.store.append(request).await
    }

    /// The cached path of one attempt; `None` when it does not apply (the command asked
    /// for more streams than it declares, or its cache settings do not fit), and the
    /// uncached path runs instead.
    ///
    /// First without reading: when the kept state is not known to be behind and the
    /// version of every other declared stream is known, `handle` decides on it and the
    /// append checks every stream at those versions. That is the whole optimistic check:
    /// had anything been written since, the append conflicts. Only an append can prove
    /// the state current, so a decision that writes nothing (or a refusal) is not
    /// trusted: it is taken again after reading, as is a decision whose append
    /// conflicted (that conflict is not counted as an attempt).
    ///
    /// Otherwise the events appended since the kept versions are read and folded into a
    /// copy of the kept state, or the streams are read whole when nothing is kept.
    /// Executions over the same streams each work on a copy, so none of them has to
    /// read from the start while another one holds the state.
    async fn attempt_cached<C: Command>(
        &self,
        command: &C,
        declared: &[StreamId],
        ops: &StateCacheOps<C::State>,
        metadata: &EventMetadata,
        idempotency_key: Option<&IdempotencyKey>,
    ) -> Result<Option<AppendOutcome>> {
        // A state kept under another command's type would be shared with it.
        if ops.command_name != std::any::type_name::<C>() {
            tracing::debug!(
                command = std::any::type_name::<C>(),
                cached_as = ops.command_name,
                "state cache keyed by another type; not caching"
            );
            return Ok(None);
        }
        let folded: &[StreamId] = ops.only.as_deref().unwrap_or(declared);
        if !folded.iter().all(|stream| declared.contains(stream)) {
            tracing::debug!(
                command = command.command_name(),
                "state cache folded from undeclared streams; not caching"
            );
            return Ok(None);
        }
        let key = StateKey {
            command: ops.command,
            streams: folded.to_vec(),
        };

        if let Some(kept) = self.states.checkout(&key, ops)
            && kept.current
            && let Some(versions) = self.states.known_versions(declared, folded, &kept.versions)
            && let Ok(decision) = decide_from(command, declared, kept.state)
            && decision.more_streams.is_empty()
            && !decision.writes.is_empty()
        {
            let snapshot = StreamsSnapshot {
                events: Vec::new(),
                versions,
            };
            match self
                .append_cached(
                    command,
                    ops,
                    &key,
                    declared,
                    &snapshot,
                    decision.writes,
                    metadata,
                    idempotency_key,
                )
                .await
            {
                Err(Error::VersionConflict { .. }) => {
                    tracing::debug!(
                        command = command.command_name(),
                        "kept state was behind; reading what is new"
                    );
                }
                other => return other.map(Some),
            }
        }

        // Folded streams after the kept versions (or whole); the others for their
        // versions only.
        let wanted = |kept: Option<&[StreamVersion]>| -> Vec<(StreamId, StreamVersion)> {
            declared
                .iter()
                .map(|stream| {
                    let after = match folded.iter().position(|s| s == stream) {
                        Some(index) => kept
                            .and_then(|versions| versions.get(index).copied())
                            .unwrap_or(StreamVersion::INITIAL),
                        None => StreamVersion::new(u64::MAX),
                    };
                    (stream.clone(), after)
                })
                .collect()
        };
        let mut brought_up = None;
        if let Some(kept) = self.states.checkout(&key, ops) {
            let read = self
                .store
                .read_streams_after(&wanted(Some(&kept.versions)))
                .await?;
            // Folding must follow global order: an event older than the newest one
            // already folded (a commit that was slow to become visible) means the kept
            // state cannot simply be extended.
            let in_order = read.events.first().is_none_or(|first| {
                kept.last_position
                    .is_none_or(|last| first.global_position > last)
            });
            // The answer must follow on from the kept versions: exactly the events
            // between the kept version and the current one, for every folded stream.
            let follows_on = folded.iter().zip(&kept.versions).all(|(stream, kept)| {
                let now = read.version_of(stream);
                let new = read
                    .events
                    .iter()
                    .filter(|e| &e.stream_id == stream)
                    .count();
                now >= *kept
                    && u64::try_from(new).is_ok_and(|new| now.value() - kept.value() == new)
            });
            if in_order && follows_on {
                let mut state = kept.state;
                let mut last_position = kept.last_position;
                for event in &read.events {
                    command.apply(&mut state, &event.decode::<C::Event>()?);
                    last_position = Some(event.global_position);
                }
                brought_up = Some((state, last_position, read));
            } else {
                self.states.drop_entry(&key, &kept.versions);
            }
        }
        let (state, last_position, snapshot) = match brought_up {
            Some(brought_up) => brought_up,
            None => {
                let read = self.store.read_streams_after(&wanted(None)).await?;
                let mut state = C::State::default();
                for event in &read.events {
                    command.apply(&mut state, &event.decode::<C::Event>()?);
                }
                let last_position = read.events.last().map(|e| e.global_position);
                (state, last_position, read)
            }
        };
        self.states.learn_versions(&snapshot.versions);
        self.states.put(
            key.clone(),
            CachedState {
                versions: folded.iter().map(|s| snapshot.version_of(s)).collect(),
                last_position,
                state: (ops.keep)(&state),
                current: true,
            },
        );
        let decision = decide_from(command, declared, state)?;
        if !decision.more_streams.is_empty() {
            return Ok(None);
        }
        // Nothing to write and nothing to remember: no append.
        if decision.writes.is_empty() && (idempotency_key.is_none() || declared.is_empty()) {
            return Ok(Some(AppendOutcome::written(Vec::new())));
        }
        self.append_cached(
            command,
            ops,
            &key,
            declared,
            &snapshot,
            decision.writes,
            metadata,
            idempotency_key,
        )
        .await
        .map(Some)
    }

    /// Appends a decision taken on the kept state of `key` (as of `snapshot`'s
    /// versions), then brings the kept states its events belong to forward.
    #[allow(clippy::too_many_arguments)]
    async fn append_cached<C: Command>(
        &self,
        command: &C,
        ops: &StateCacheOps<C::State>,
        key: &StateKey,
        declared: &[StreamId],
        snapshot: &StreamsSnapshot,
        writes: Vec<StreamWrite<C::StreamSet, C::Event>>,
        metadata: &EventMetadata,
        idempotency_key: Option<&IdempotencyKey>,
    ) -> Result<AppendOutcome> {
        let mut request = build_request(declared, snapshot, writes, metadata)?;
        request.idempotency_key = idempotency_key.cloned();
        let written = OwnWrites::of(&request);
        match self.store.append(request).await {
            Ok(outcome) => {
                self.keep_own_writes(command, ops, key, &written, &outcome);
                Ok(outcome)
            }
            Err(error) => {
                if matches!(
                    error,
                    Error::VersionConflict { .. } | Error::OutcomeUnknown { .. }
                ) {
                    let versions: Vec<StreamVersion> =
                        key.streams.iter().map(|s| snapshot.version_of(s)).collect();
                    self.states.mark_behind(key, &versions);
                }
                Err(error)
            }
        }
    }

    /// After a successful append: the known versions of its streams, and the kept
    /// states of this command type over them (this execution's, and the single-stream
    /// ones of each stream it wrote, as a transfer's `to` is another transfer's `from`)
    /// brought forward with its events when they were at the versions the append
    /// checked, or marked as behind. Needs every event's recording time from the store
    /// (the very one a read returns); without it, the state is only marked as behind.
    fn keep_own_writes<C: Command>(
        &self,
        command: &C,
        ops: &StateCacheOps<C::State>,
        key: &StateKey,
        written: &OwnWrites,
        outcome: &AppendOutcome,
    ) {
        let checked_versions = |streams: &[StreamId]| -> Option<Vec<StreamVersion>> {
            streams
                .iter()
                .map(|stream| {
                    written
                        .streams
                        .iter()
                        .find(|s| s.stream == *stream)
                        .and_then(|s| s.expected)
                })
                .collect()
        };
        let recorded = if outcome.deduplicated {
            None
        } else {
            written.recorded(outcome)
        };
        let Some(recorded) = recorded else {
            if let Some(versions) = checked_versions(&key.streams) {
                self.states.mark_behind(key, &versions);
            }
            return;
        };
        self.states.learn_versions(&written.versions_after(outcome));
        let mut targets = vec![key.clone()];
        for written_stream in &written.streams {
            let single = StateKey {
                command: key.command,
                streams: vec![written_stream.stream.clone()],
            };
            if written_stream.events > 0 && !targets.contains(&single) {
                targets.push(single);
            }
        }
        for target in targets {
            let Some(kept) = self.states.checkout(&target, ops) else {
                continue;
            };
            if checked_versions(&target.streams).as_ref() != Some(&kept.versions) {
                self.states.mark_behind(&target, &kept.versions);
                continue;
            }
            let mut state = kept.state;
            let mut last_position = kept.last_position;
            let mut folded_all = true;
            for event in recorded
                .iter()
                .filter(|e| target.streams.contains(&e.stream_id))
            {
                let Ok(typed) = event.decode::<C::Event>() else {
                    folded_all = false;
                    break;
                };
                // The append has committed: an `apply` that panics here (one that breaks
                // the contract and reads `self`) must not make a written command look
                // failed. The state is not kept.
                let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    command.apply(&mut state, &typed);
                }));
                if applied.is_err() {
                    folded_all = false;
                    break;
                }
                last_position = Some(event.global_position);
            }
            let versions = target
                .streams
                .iter()
                .map(|stream| written.version_after(stream, outcome))
                .collect::<Option<Vec<_>>>();
            match versions {
                Some(versions) if folded_all => self.states.put(
                    target,
                    CachedState {
                        versions,
                        last_position,
                        state: (ops.boxed)(state),
                        current: true,
                    },
                ),
                _ => self.states.mark_behind(&target, &kept.versions),
            }
        }
    }
}

/// The cache key: the command type and the streams it declared, in order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct StateKey {
    command: TypeId,
    streams: Vec<StreamId>,
}

/// A folded state, as of the given versions of the key's streams.
struct CachedState {
    versions: Vec<StreamVersion>,
    /// The position of the newest event folded in.
    last_position: Option<GlobalPosition>,
    state: Box<dyn Any + Send>,
    /// Read, or brought forward with this executor's own append, and not known to be
    /// behind since: worth deciding on without reading first.
    current: bool,
}

/// A copy of a kept state, with what it was folded to.
struct Checkout<S> {
    versions: Vec<StreamVersion>,
    last_position: Option<GlobalPosition>,
    current: bool,
    state: S,
}

/// Folded states of commands that allow caching, and the last version seen of each
/// stream they read, shared by an executor's clones.
struct StateCacheMap {
    capacity: usize,
    inner: Mutex<CacheInner>,
}

#[derive(Default)]
struct CacheInner {
    entries: HashMap<StateKey, CachedState>,
    /// A stream's highest version seen in a read or an append of this executor: what a
    /// decision without reading expects of a stream it does not fold.
    versions: HashMap<StreamId, StreamVersion>,
}

impl StateCacheMap {
    fn new(capacity: usize) -> Self {
        StateCacheMap {
            capacity,
            inner: Mutex::new(CacheInner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A copy of the state kept for `key` (the cache keeps its own); `None` when there is
    /// none, or it is not an `S` (then it is dropped).
    fn checkout<S>(&self, key: &StateKey, ops: &StateCacheOps<S>) -> Option<Checkout<S>> {
        let mut inner = self.lock();
        let entry = inner.entries.get_mut(key)?;
        let kept = std::mem::replace(&mut entry.state, Box::new(()));
        let Some(state) = (ops.take)(kept) else {
            inner.entries.remove(key);
            return None;
        };
        entry.state = (ops.keep)(&state);
        Some(Checkout {
            versions: entry.versions.clone(),
            last_position: entry.last_position,
            current: entry.current,
            state,
        })
    }

    /// Keeps `state` unless a state folded further is kept already (put meanwhile by a
    /// concurrent execution).
    fn put(&self, key: StateKey, state: CachedState) {
        let capacity = self.capacity;
        let mut inner = self.lock();
        let entries = &mut inner.entries;
        if let Some(kept) = entries.get(&key)
            && kept.last_position > state.last_position
        {
            return;
        }
        make_room(entries, capacity, &key);
        entries.insert(key, state);
    }

    /// The state kept for `key` at `versions` is behind the store: the next execution
    /// reads before deciding.
    fn mark_behind(&self, key: &StateKey, versions: &[StreamVersion]) {
        if let Some(entry) = self.lock().entries.get_mut(key)
            && entry.versions == versions
        {
            entry.current = false;
        }
    }

    /// The state kept for `key` at `versions` cannot be brought up to date: dropped.
    fn drop_entry(&self, key: &StateKey, versions: &[StreamVersion]) {
        let mut inner = self.lock();
        if inner
            .entries
            .get(key)
            .is_some_and(|entry| entry.versions == versions)
        {
            inner.entries.remove(key);
        }
    }

    fn learn_versions(&self, versions: &[(StreamId, StreamVersion)]) {
        let capacity = self.capacity;
        let mut inner = self.lock();
        for (stream, version) in versions {
            match inner.versions.get_mut(stream) {
                Some(known) => *known = (*known).max(*version),
                None => {
                    make_room(&mut inner.versions, capacity, stream);
                    inner.versions.insert(stream.clone(), *version);
                }
            }
        }
    }

    /// Every declared stream's version: the cached state's for the streams it is folded
    /// from, the last one seen for the others; `None` when one is unknown.
    fn known_versions(
        &self,
        declared: &[StreamId],
        folded: &[StreamId],
        folded_versions: &[StreamVersion],
    ) -> Option<Vec<(StreamId, StreamVersion)>> {
        let inner = self.lock();
        declared
            .iter()
            .map(|stream| {
                let version = match folded.iter().position(|s| s == stream) {
                    Some(index) => folded_versions.get(index).copied(),
                    None => inner.versions.get(stream).copied(),
                };
                version.map(|version| (stream.clone(), version))
            })
            .collect()
    }
}

/// Drops an arbitrary entry (whichever the map yields first) when the map is full and
/// `key` is new; what is dropped is read again when next needed.
fn make_room<K: Clone + Eq + std::hash::Hash, V>(
    map: &mut HashMap<K, V>,
    capacity: usize,
    key: &K,
) {
    if map.len() >= capacity
        && !map.contains_key(key)
        && let Some(victim) = map.keys().next().cloned()
    {
        map.remove(&victim);
    }
}

/// What an append request writes, kept to bring cached states forward once it
/// succeeded.
struct OwnWrites {
    streams: Vec<OwnStream>,
    events: Vec<OwnEvent>,
}

/// One stream of an append the executor made.
struct OwnStream {
    stream: StreamId,
    /// The version the append expected it at (`None`: any).
    expected: Option<StreamVersion>,
    /// How many events the append writes to it.
    events: usize,
}

/// One event of an append the executor made.
struct OwnEvent {
    stream: StreamId,
    data: EventData,
}

impl OwnWrites {
    fn of(request: &AppendRequest) -> Self {
        let mut streams = Vec::with_capacity(request.streams.len());
        let mut events = Vec::with_capacity(request.event_count());
        for stream in &request.streams {
            let expected = match stream.expected_version {
                ExpectedVersion::Exact(version) => Some(version),
                ExpectedVersion::NoStream => Some(StreamVersion::INITIAL),
                ExpectedVersion::Any => None,
            };
            streams.push(OwnStream {
                stream: stream.stream_id.clone(),
                expected,
                events: stream.events.len(),
            });
            for event in &stream.events {
                events.push(OwnEvent {
                    stream: stream.stream_id.clone(),
                    data: event.clone(),
                });
            }
        }
        OwnWrites { streams, events }
    }

    /// The written events as any later read returns them, in global order; `None` when
    /// the outcome lacks a recording time or does not match the request.
    fn recorded(&self, outcome: &AppendOutcome) -> Option<Vec<RecordedEvent>> {
        if outcome.events.len() != self.events.len() {
            return None;
        }
        let mut recorded = Vec::with_capacity(outcome.events.len());
        for appended in &outcome.events {
            let OwnEvent { stream, data } = self
                .events
                .iter()
                .find(|own| own.data.event_id == appended.event_id)?;
            if *stream != appended.stream_id {
                return None;
            }
            recorded.push(RecordedEvent::new(
                appended.event_id,
                appended.stream_id.clone(),
                appended.stream_version,
                appended.global_position,
                data.event_type.clone(),
                data.payload.clone(),
                Arc::new(data.metadata.clone()),
                appended.recorded_at?,
            ));
        }
        recorded.sort_by_key(|event| event.global_position);
        Some(recorded)
    }

    /// A stream's version after the append: its last event's, or the one checked.
    fn version_after(&self, stream: &StreamId, outcome: &AppendOutcome) -> Option<StreamVersion> {
        outcome
            .events
            .iter()
            .filter(|e| &e.stream_id == stream)
            .map(|e| e.stream_version)
            .max()
            .or_else(|| {
                self.streams
                    .iter()
                    .find(|s| s.stream == *stream)
                    .and_then(|s| s.expected)
            })
    }

    fn versions_after(&self, outcome: &AppendOutcome) -> Vec<(StreamId, StreamVersion)> {
        self.streams
            .iter()
            .filter_map(|own| {
                self.version_after(&own.stream, outcome)
                    .map(|version| (own.stream.clone(), version))
            })
            .collect()
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

/// What one fold-and-handle round decided.
pub(crate) struct Decision<C: CommandLogic> {
    pub(crate) writes: Vec<StreamWrite<C::StreamSet, C::Event>>,
    /// Streams `handle` asked for that were not read yet.
    pub(crate) more_streams: Vec<StreamId>,
}

/// Folds `events` (already in global order) into a fresh state and calls `handle`.
/// Shared by the executor and the test harness so both run the very same logic.
pub(crate) fn decide<C: CommandLogic>(
    command: &C,
    streams: &[StreamId],
    events: &[StoredEvent<C::Event>],
) -> Result<Decision<C>> {
    let mut state = C::State::default();
    // A state declared as folded from some streams only sees their events, cached or
    // not, so turning the cache off never changes a decision.
    let only = command.state_cache().ops.and_then(|ops| ops.only);
    for event in events {
        if only
            .as_ref()
            .is_none_or(|only| only.contains(&event.stream_id))
        {
            command.apply(&mut state, event);
        }
    }
    decide_from(command, streams, state)
}

/// Calls `handle` on a state already folded from `streams`.
fn decide_from<C: CommandLogic>(
    command: &C,
    streams: &[StreamId],
    state: C::State,
) -> Result<Decision<C>> {
    let mut resolver = StreamResolver::new();
    let writes = command.handle(ReadStreams::new(streams.to_vec()), state, &mut resolver)?;
    let more_streams = resolver
        .into_requested()
        .into_iter()
        .filter(|stream| !streams.contains(stream))
        .collect();
    Ok(Decision {
        writes,
        more_streams,
    })
}

/// Groups the writes by stream. Streams that were written come first, in the order the
/// command first wrote to each (that is the order of their global positions); the
/// streams only read follow, each checked at the version read.
fn build_request<S, E: crate::Event>(
    streams: &[StreamId],
    snapshot: &crate::StreamsSnapshot,
    writes: Vec<StreamWrite<S, E>>,
    metadata: &EventMetadata,
) -> Result<AppendRequest> {
    let mut written: Vec<StreamAppend> = Vec::new();
    for write in writes {
        let (stream_id, event) = write.into_parts();
        if !streams.contains(&stream_id) {
            return Err(Error::UndeclaredStream { stream: stream_id });
        }
        let data = EventData::from_event(&event, metadata.clone())?;
        match written.iter_mut().find(|s| s.stream_id == stream_id) {
            Some(entry) => entry.events.push(data),
            None => {
                let expected = ExpectedVersion::Exact(snapshot.version_of(&stream_id));
                written.push(StreamAppend::new(stream_id, expected, vec![data]));
            }
        }
    }
    for stream in streams {
        if !written.iter().any(|s| &s.stream_id == stream) {
            written.push(StreamAppend::check_only(
                stream.clone(),
                ExpectedVersion::Exact(snapshot.version_of(stream)),
            ));
        }
    }
    Ok(AppendRequest {
        streams: written,
        idempotency_key: None,
    })
}

fn dedup_in_order(streams: &mut Vec<StreamId>) {
    let mut seen = std::collections::HashSet::with_capacity(streams.len());
    streams.retain(|stream| seen.insert(stream.clone()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_within_bounds() {
        let policy = RetryPolicy::new()
            .with_initial_delay(Duration::from_millis(4))
            .with_max_delay(Duration::from_millis(20));
        for _ in 0..100 {
            let first = policy.delay_before_retry(1);
            assert!(first >= Duration::from_millis(2) && first <= Duration::from_millis(4));
            let third = policy.delay_before_retry(3);
            assert!(third >= Duration::from_millis(8) && third <= Duration::from_millis(16));
            let capped = policy.delay_before_retry(30);
            assert!(capped >= Duration::from_millis(10) && capped <= Duration::from_millis(20));
        }
        assert_eq!(
            RetryPolicy::no_retries().delay_before_retry(1),
            Duration::ZERO
        );
        assert_eq!(RetryPolicy::new().with_max_attempts(0).max_attempts(), 1);
    }
}
