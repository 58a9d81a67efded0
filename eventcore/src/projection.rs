//! Projections: named consumers of the global log with durable checkpoints.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Datelike, SubsecRound, Utc};
use tracing::Instrument;

use crate::error::{BoxError, Error, Result, error_chain};
use crate::event::{Event, RecordedEvent, StoredEvent};
use crate::executor::RetryPolicy;
use crate::leadership::LeaderElection;
use crate::names::{EventType, InvalidProjectionName, ProjectionName};
use crate::store::{EventStore, LogQuery};
use crate::types::{EventId, GlobalPosition, StreamId, StreamVersion};

/// Which events of the global log a projection wants. Filtering happens in the store,
/// before decoding: events of other types are never handed to the projection, and never
/// fail to decode.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProjectionFilter {
    /// The filters, as the log query every batch starts from.
    template: LogQuery,
}

impl ProjectionFilter {
    /// Every event.
    pub fn all() -> Self {
        Self::default()
    }

    /// Only events of streams whose id starts with `prefix`.
    pub fn with_stream_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.template = self.template.with_stream_prefix(prefix);
        self
    }

    /// Only events of these types.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidEventType`] if a name is not a valid event type name.
    pub fn with_event_types<I>(mut self, types: I) -> Result<Self>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        self.template = self.template.with_event_types(types)?;
        Ok(self)
    }

    /// The stream prefix filter.
    pub fn stream_prefix(&self) -> Option<&str> {
        self.template.stream_prefix()
    }

    /// The event type filter.
    pub fn event_types(&self) -> Option<&[EventType]> {
        self.template.event_types()
    }

    /// The log query for the next batch: after `after`, at most `limit` events, with
    /// these filters.
    pub fn query(&self, after: Option<GlobalPosition>, limit: usize) -> LogQuery {
        self.template.clone().with_after(after).with_limit(limit)
    }
}

/// A read model built from the global log.
///
/// The runner hands `apply` every event that passes [`Projection::filter`], in global
/// order, each once per successful run; delivery is at-least-once across crashes (an
/// event after the last saved checkpoint is applied again), so `apply` should be
/// idempotent or the read model should live with its checkpoint (see the PostgreSQL
/// runner for exactly-once).
///
/// # Examples
///
/// ```
/// use eventcore::{Projection, ProjectionFilter, StoredEvent};
/// # #[derive(serde::Serialize, serde::Deserialize, eventcore::Event)] enum AccountEvent { Deposited { amount: u64 } }
///
/// #[derive(Default)]
/// struct TotalDeposits(u64);
///
/// impl Projection for TotalDeposits {
///     type Event = AccountEvent;
///     type Error = std::convert::Infallible;
///
///     fn name(&self) -> &str {
///         "total-deposits"
///     }
///
///     fn filter(&self) -> ProjectionFilter {
///         ProjectionFilter::all().with_stream_prefix("account-")
///     }
///
///     async fn apply(&mut self, event: &StoredEvent<AccountEvent>) -> Result<(), Self::Error> {
///         let AccountEvent::Deposited { amount } = event.payload;
///         self.0 += amount;
///         Ok(())
///     }
/// }
/// ```
///
/// Implement it with plain `async fn`, as above. `#[async_trait]`, which the store
/// traits use because they are held as trait objects (ADR 0008), does not belong on
/// this impl: it rewrites `apply` into a method returning a boxed future, which does not
/// match the trait, and the compiler reports a signature or lifetime mismatch on `apply`:
///
/// ```compile_fail,E0195
/// # use eventcore::{Projection, StoredEvent};
/// # #[derive(serde::Serialize, serde::Deserialize, eventcore::Event)] struct Deposited;
/// struct Count(u64);
///
/// #[async_trait::async_trait] // wrong: remove it
/// impl Projection for Count {
///     type Event = Deposited;
///     type Error = std::convert::Infallible;
///     fn name(&self) -> &str { "count" }
///     async fn apply(&mut self, _: &StoredEvent<Deposited>) -> Result<(), Self::Error> {
///         self.0 += 1;
///         Ok(())
///     }
/// }
/// ```
pub trait Projection: Send + 'static {
    /// What the events decode into (usually an enum over the types the filter selects).
    type Event: Event;
    /// What `apply` can fail with.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The projection's name: its checkpoint, dead letters and leadership are kept under
    /// it. Same rules as a stream id.
    fn name(&self) -> &str;

    /// Which events to receive; every event by default.
    fn filter(&self) -> ProjectionFilter {
        ProjectionFilter::all()
    }

    /// Folds one event into the read model.
    fn apply(
        &mut self,
        event: &StoredEvent<Self::Event>,
    ) -> impl Future<Output = std::result::Result<(), Self::Error>> + Send;

    /// Forgets everything, before a rebuild from the start of the log.
    fn reset(&mut self) -> impl Future<Output = std::result::Result<(), Self::Error>> + Send {
        async { Ok(()) }
    }
}

/// An event a projection could not process and parked instead of stopping.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ParkedEvent {
    /// The projection that parked it.
    pub projection: ProjectionName,
    /// The event's id.
    pub event_id: EventId,
    /// Its stream.
    pub stream_id: StreamId,
    /// Its version in the stream.
    pub stream_version: StreamVersion,
    /// Its global position.
    pub global_position: GlobalPosition,
    /// Its stored type name.
    pub event_type: String,
    /// Why it could not be processed.
    pub error: String,
    /// When it was parked.
    pub parked_at: DateTime<Utc>,
}

impl ParkedEvent {
    /// A parked record of `event` for `projection`, failed with `error` (NUL characters,
    /// which databases cannot store as text, are replaced).
    pub fn new(
        projection: &ProjectionName,
        event: &RecordedEvent,
        error: impl Into<String>,
    ) -> Self {
        ParkedEvent {
            projection: projection.clone(),
            event_id: event.event_id,
            stream_id: event.stream_id.clone(),
            stream_version: event.stream_version,
            global_position: event.global_position,
            event_type: event.event_type.as_str().to_owned(),
            error: error.into().replace('\0', "\u{fffd}"),
            parked_at: Utc::now().trunc_subsecs(6),
        }
    }

    /// The record as every backend stores it, or why none can: positions and versions
    /// above [`crate::limits::MAX_POSITION`] and times outside years 1 to 9999 are
    /// refused; NUL characters in the text fields (which databases cannot keep in text)
    /// are replaced with U+FFFD, and `parked_at` is cut to whole microseconds (what
    /// PostgreSQL keeps). Backends call this first in [`CheckpointStore::park`], so
    /// every backend keeps and returns the same record.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidPosition`] or [`Error::InvalidParkedEvent`].
    pub fn checked(mut self) -> Result<Self> {
        check_storable("parked event position", self.global_position.value())?;
        check_storable("parked event stream version", self.stream_version.value())?;
        let year = self.parked_at.year();
        if !(1..=9999).contains(&year) {
            return Err(Error::InvalidParkedEvent {
                reason: format!(
                    "parked_at {} is outside years 1 to 9999",
                    self.parked_at.to_rfc3339()
                ),
            });
        }
        self.parked_at = self.parked_at.trunc_subsecs(6);
        if self.error.contains('\0') {
            self.error = self.error.replace('\0', "\u{fffd}");
        }
        if self.event_type.contains('\0') {
            self.event_type = self.event_type.replace('\0', "\u{fffd}");
        }
        Ok(self)
    }

    /// Assembles a parked event read back from storage (for backends).
    #[allow(clippy::too_many_arguments)]
    pub fn from_parts(
        projection: ProjectionName,
        event_id: EventId,
        stream_id: StreamId,
        stream_version: StreamVersion,
        global_position: GlobalPosition,
        event_type: String,
        error: String,
        parked_at: DateTime<Utc>,
    ) -> Self {
        ParkedEvent {
            projection,
            event_id,
            stream_id,
            stream_version,
            global_position,
            event_type,
            error,
            parked_at,
        }
    }
}

/// Refuses a position no backend can store as a checkpoint: 0 (positions start at 1;
/// [`CheckpointStore::reset_checkpoint`] forgets a checkpoint) or above
/// [`crate::limits::MAX_POSITION`]. Backends call this first in
/// [`CheckpointStore::save_checkpoint`].
///
/// # Errors
///
/// [`Error::InvalidPosition`].
pub fn check_checkpoint_position(position: GlobalPosition) -> Result<()> {
    if position.value() == 0 {
        return Err(Error::InvalidPosition {
            what: "checkpoint position",
            value: 0,
            reason: "positions start at 1 (reset the checkpoint to start over)",
        });
    }
    check_storable("checkpoint position", position.value())
}

fn check_storable(what: &'static str, value: u64) -> Result<()> {
    if value > crate::limits::MAX_POSITION {
        return Err(Error::InvalidPosition {
            what,
            value,
            reason: "it is above the highest position a backend stores (i64::MAX)",
        });
    }
    Ok(())
}

/// Durable projection checkpoints and parked events. Implemented by every backend;
/// checked by `eventcore::projection_conformance_tests!` (feature `testing`).
///
/// Names arrive validated ([`ProjectionName`]); positions may not: a backend refuses
/// what it cannot store with [`check_checkpoint_position`] and [`ParkedEvent::checked`]
/// before writing, so every backend keeps and returns the same records.
#[async_trait]
pub trait CheckpointStore: Send + Sync + 'static {
    /// The last position the projection processed, `None` if it never saved one.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] when the backend fails.
    async fn load_checkpoint(&self, projection: &ProjectionName) -> Result<Option<GlobalPosition>>;

    /// Records that the projection processed everything up to `position`. A checkpoint
    /// never moves backwards: a lower position than the stored one is ignored.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidPosition`] for a position no backend stores (0, or above
    /// [`crate::limits::MAX_POSITION`]); [`Error::Backend`] when the backend fails.
    async fn save_checkpoint(
        &self,
        projection: &ProjectionName,
        position: GlobalPosition,
    ) -> Result<()>;

    /// Forgets the checkpoint (and the parked events), for a rebuild from the start.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] when the backend fails.
    async fn reset_checkpoint(&self, projection: &ProjectionName) -> Result<()>;

    /// Keeps an event the projection could not process.
    ///
    /// # Errors
    ///
    /// As [`ParkedEvent::checked`]; [`Error::Backend`] when the backend fails.
    async fn park(&self, parked: ParkedEvent) -> Result<()>;

    /// The events the projection parked, in position order.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] when the backend fails.
    async fn parked(&self, projection: &ProjectionName) -> Result<Vec<ParkedEvent>>;
}

#[async_trait]
impl<C: CheckpointStore + ?Sized> CheckpointStore for Arc<C> {
    async fn load_checkpoint(&self, projection: &ProjectionName) -> Result<Option<GlobalPosition>> {
        (**self).load_checkpoint(projection).await
    }

    async fn save_checkpoint(
        &self,
        projection: &ProjectionName,
        position: GlobalPosition,
    ) -> Result<()> {
        (**self).save_checkpoint(projection, position).await
    }

    async fn reset_checkpoint(&self, projection: &ProjectionName) -> Result<()> {
        (**self).reset_checkpoint(projection).await
    }

    async fn park(&self, parked: ParkedEvent) -> Result<()> {
        (**self).park(parked).await
    }

    async fn parked(&self, projection: &ProjectionName) -> Result<Vec<ParkedEvent>> {
        (**self).parked(projection).await
    }
}

/// What the runner does when an event cannot be processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// Stop with [`Error::ProjectionFailed`]; the checkpoint stays before the event.
    Stop,
    /// Park the event with the [`CheckpointStore`] and go on.
    Park,
}

/// How often `apply` is retried, and what happens when it keeps failing. An event that
/// does not decode goes through the same policy (it is not retried: decoding is
/// deterministic). Nothing is ever skipped silently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectionErrorPolicy {
    /// Attempts and backoff, as for commands.
    retry: RetryPolicy,
    on_failure: OnFailure,
}

impl ProjectionErrorPolicy {
    /// 5 attempts, backoff from 10 ms to 1 s (with jitter), then stop.
    pub const fn new() -> Self {
        ProjectionErrorPolicy {
            retry: RetryPolicy::new()
                .with_max_attempts(5)
                .with_initial_delay(Duration::from_millis(10))
                .with_max_delay(Duration::from_secs(1)),
            on_failure: OnFailure::Stop,
        }
    }

    /// Sets the attempts per event, the first included (at least 1).
    pub const fn with_max_attempts(mut self, attempts: u32) -> Self {
        self.retry = self.retry.with_max_attempts(attempts);
        self
    }

    /// Sets the delay before the first retry; it doubles up to the maximum.
    pub const fn with_initial_delay(mut self, delay: Duration) -> Self {
        self.retry = self.retry.with_initial_delay(delay);
        self
    }

    /// Sets the longest delay between retries.
    pub const fn with_max_delay(mut self, delay: Duration) -> Self {
        self.retry = self.retry.with_max_delay(delay);
        self
    }

    /// Sets what happens after the last attempt.
    pub const fn with_on_failure(mut self, on_failure: OnFailure) -> Self {
        self.on_failure = on_failure;
        self
    }

    /// The attempts per event, the first included.
    pub const fn max_attempts(&self) -> u32 {
        self.retry.max_attempts()
    }

    /// What happens after the last attempt.
    pub const fn on_failure(&self) -> OnFailure {
        self.on_failure
    }

    /// The delay before retry number `retry` (1 for the first retry); see
    /// [`RetryPolicy::delay_before_retry`].
    pub fn delay_before_retry(&self, retry: u32) -> Duration {
        self.retry.delay_before_retry(retry)
    }
}

impl Default for ProjectionErrorPolicy {
    fn default() -> Self {
        Self::new()
    }
}

/// Live figures of a running projection; cheap to clone and read from anywhere.
#[derive(Debug, Clone, Default)]
pub struct ProjectionMetrics {
    inner: Arc<MetricsInner>,
}

#[derive(Debug, Default)]
struct MetricsInner {
    checkpoint: AtomicU64,
    head: AtomicU64,
    processed: AtomicU64,
    parked: AtomicU64,
    rate_milli: AtomicU64,
    leading: std::sync::atomic::AtomicBool,
}

impl ProjectionMetrics {
    /// The last saved checkpoint (0 before the first).
    pub fn checkpoint(&self) -> u64 {
        self.inner.checkpoint.load(Ordering::Relaxed)
    }

    /// How far the checkpoint is behind the head of the log, as last observed.
    pub fn lag(&self) -> u64 {
        self.inner
            .head
            .load(Ordering::Relaxed)
            .saturating_sub(self.checkpoint())
    }

    /// Events applied since the runner started.
    pub fn processed(&self) -> u64 {
        self.inner.processed.load(Ordering::Relaxed)
    }

    /// Events parked since the runner started.
    pub fn parked(&self) -> u64 {
        self.inner.parked.load(Ordering::Relaxed)
    }

    /// Whether the runner currently holds leadership (see
    /// [`ProjectionRunner::run_as_leader`]); `false` for runners that do not elect.
    pub fn is_leader(&self) -> bool {
        self.inner.leading.load(Ordering::SeqCst)
    }

    /// Events per second over the runner's last batch.
    pub fn events_per_second(&self) -> f64 {
        self.inner.rate_milli.load(Ordering::Relaxed) as f64 / 1_000.0
    }
}

/// What a run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct RunSummary {
    /// Events applied.
    pub applied: u64,
    /// Events parked.
    pub parked: u64,
    /// The checkpoint at the end.
    pub checkpoint: Option<GlobalPosition>,
}

/// Runs a [`Projection`]: catches up from its checkpoint in batches, then follows the log
/// live without polling, saving the checkpoint after every batch and never ahead of what
/// was applied.
///
/// # Examples
///
/// ```
/// # use eventcore::{Projection, StoredEvent};
/// # #[derive(Default)] struct Counter(u64);
/// # impl Projection for Counter {
/// #     type Event = eventcore::RawEvent;
/// #     type Error = std::convert::Infallible;
/// #     fn name(&self) -> &str { "counter" }
/// #     async fn apply(&mut self, _: &StoredEvent<eventcore::RawEvent>) -> Result<(), Self::Error> { self.0 += 1; Ok(()) }
/// # }
/// use std::sync::Arc;
/// use eventcore::ProjectionRunner;
/// use eventcore_memory::InMemoryEventStore;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> eventcore::Result<()> {
/// let store = InMemoryEventStore::new();
/// let mut runner = ProjectionRunner::new(Counter::default(), Arc::new(store.clone()), Arc::new(store));
/// runner.catch_up().await?;
/// // Or follow live until shutdown: runner.run(shutdown_signal).await?
/// # Ok(())
/// # }
/// ```
pub struct ProjectionRunner<P: Projection> {
    projection: P,
    /// The projection's name as given, for messages.
    name: String,
    /// The name checkpoints and leadership are kept under: checked once, here; an
    /// invalid one fails every operation.
    key: std::result::Result<ProjectionName, InvalidProjectionName>,
    events: Arc<dyn EventStore>,
    checkpoints: Arc<dyn CheckpointStore>,
    batch_size: usize,
    policy: ProjectionErrorPolicy,
    metrics: ProjectionMetrics,
    position: Option<GlobalPosition>,
    /// How far the last empty batch looked: nothing wanted exists up to it.
    scanned: Option<GlobalPosition>,
    /// The store's head as last read for the lag gauge, and when: read at most once a
    /// second while catching up.
    head_probe: Option<(Instant, u64)>,
    loaded: bool,
}

impl<P: Projection> ProjectionRunner<P> {
    /// The default number of events read per batch (and per checkpoint).
    pub const DEFAULT_BATCH_SIZE: usize = 1_000;

    /// A runner for `projection`, reading `events` and keeping its checkpoint in
    /// `checkpoints`.
    pub fn new(
        projection: P,
        events: Arc<dyn EventStore>,
        checkpoints: Arc<dyn CheckpointStore>,
    ) -> Self {
        let name = projection.name().to_owned();
        let key = ProjectionName::try_new(name.as_str());
        ProjectionRunner {
            projection,
            name,
            key,
            events,
            checkpoints,
            batch_size: Self::DEFAULT_BATCH_SIZE,
            policy: ProjectionErrorPolicy::default(),
            metrics: ProjectionMetrics::default(),
            position: None,
            scanned: None,
            head_probe: None,
            loaded: false,
        }
    }

    /// Events per batch; the checkpoint is saved after each (at least 1).
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// What to do with events that cannot be processed.
    pub fn with_error_policy(mut self, policy: ProjectionErrorPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Live figures: checkpoint, lag, events processed, events per second.
    pub fn metrics(&self) -> ProjectionMetrics {
        self.metrics.clone()
    }

    /// The projection, as folded so far.
    pub fn projection(&self) -> &P {
        &self.projection
    }

    /// Gives the projection back.
    pub fn into_projection(self) -> P {
        self.projection
    }

    /// Processes batches until the log is exhausted (as seen by the last read), then
    /// returns. The checkpoint is saved after every batch.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidProjectionName`]; [`Error::ProjectionFailed`] when an event
    /// cannot be processed and the policy says stop; store errors.
    pub async fn catch_up(&mut self) -> Result<RunSummary> {
        let mut summary = RunSummary::default();
        self.load().await?;
        while self.step(&mut summary).await? {}
        summary.checkpoint = self.position;
        Ok(summary)
    }

    /// Catches up, then follows the log live until `shutdown` completes; the checkpoint
    /// of everything applied is saved before returning.
    ///
    /// # Errors
    ///
    /// As [`ProjectionRunner::catch_up`].
    pub async fn run(&mut self, shutdown: impl Future<Output = ()> + Send) -> Result<RunSummary> {
        let mut summary = RunSummary::default();
        self.run_until(shutdown, &mut summary).await?;
        summary.checkpoint = self.position;
        Ok(summary)
    }

    /// Like [`ProjectionRunner::run`], but only while this runner holds leadership over
    /// the projection's name: it waits to be elected, catches up from the checkpoint
    /// (which another leader may have moved), follows live, and when the leadership is
    /// lost it stops applying and waits to be elected again. Returns at `shutdown`.
    ///
    /// # Errors
    ///
    /// As [`ProjectionRunner::catch_up`], and the election's errors.
    pub async fn run_as_leader(
        &mut self,
        election: &dyn LeaderElection,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<RunSummary> {
        let key = self.key()?;
        let mut summary = RunSummary::default();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let policy = &self.policy;
            let Some(mut leadership) = crate::leadership::elected(
                election,
                &key,
                |_| policy.delay_before_retry(3),
                &mut shutdown,
            )
            .await?
            else {
                break;
            };
            tracing::info!(projection = %self.name, "elected");
            self.metrics.inner.leading.store(true, Ordering::SeqCst);
            crate::metrics::leadership("projection", &self.name, true);
            // Another leader may have moved the checkpoint meanwhile.
            self.loaded = false;
            let stopped = {
                let lost = leadership.lost();
                let either = async {
                    tokio::select! {
                        () = &mut shutdown => true,
                        () = lost => false,
                    }
                };
                let result = self.run_until(either, &mut summary).await;
                self.metrics.inner.leading.store(false, Ordering::SeqCst);
                crate::metrics::leadership("projection", &self.name, false);
                result?
            };
            if stopped {
                break;
            }
            tracing::warn!(projection = %self.name, "leadership lost; waiting to be elected again");
        }
        summary.checkpoint = self.position;
        Ok(summary)
    }

    /// Runs until `stop` completes; returns its output.
    async fn run_until<T>(
        &mut self,
        stop: impl Future<Output = T> + Send,
        summary: &mut RunSummary,
    ) -> Result<T> {
        self.load().await?;
        let mut stop = std::pin::pin!(stop);
        loop {
            // Drain what is there; a stop request is honoured between batches.
            loop {
                if let Some(value) = poll_now(&mut stop).await {
                    return Ok(value);
                }
                if !self.step(summary).await? {
                    break;
                }
            }
            // Wait for events after what was scanned, not just after what was applied:
            // with a filter, the log may end in events this projection does not want,
            // and waiting after the checkpoint would return at once, forever.
            let scanned = self.position.max(self.scanned);
            tokio::select! {
                waited = self.events.wait_for_events(scanned) => waited?,
                value = &mut stop => return Ok(value),
            }
        }
    }

    /// Forgets the checkpoint and the read model, then replays the whole log.
    ///
    /// # Errors
    ///
    /// As [`ProjectionRunner::catch_up`], and the projection's own `reset` error as
    /// [`Error::Rejected`].
    pub async fn rebuild(&mut self) -> Result<RunSummary> {
        let key = self.key()?;
        self.checkpoints.reset_checkpoint(&key).await?;
        self.projection.reset().await.map_err(Error::rejected)?;
        self.position = None;
        self.scanned = None;
        self.metrics.inner.checkpoint.store(0, Ordering::Relaxed);
        self.loaded = true;
        self.catch_up().await
    }

    async fn load(&mut self) -> Result<()> {
        if self.loaded {
            return Ok(());
        }
        let key = self.key()?;
        self.position = self.checkpoints.load_checkpoint(&key).await?;
        self.metrics.inner.checkpoint.store(
            self.position.map_or(0, GlobalPosition::value),
            Ordering::Relaxed,
        );
        self.loaded = true;
        Ok(())
    }

    /// One batch. Returns whether it found events.
    async fn step(&mut self, summary: &mut RunSummary) -> Result<bool> {
        let span = tracing::info_span!(
            "eventcore.projection.batch",
            projection = %self.name,
            after = self.position.map_or(0, GlobalPosition::value),
            events = tracing::field::Empty,
        );
        self.batch(summary).instrument(span).await
    }

    async fn batch(&mut self, summary: &mut RunSummary) -> Result<bool> {
        let started = Instant::now();
        let filter = self.projection.filter();
        // The read says how far it looked: if the batch is empty, nothing this
        // projection wants exists up to there, and anything wanted that comes later lies
        // beyond it. (Not a head read before: on a backend whose visible log can briefly
        // shrink, the read may have looked less far than that head, and waiting after
        // the head would skip what lies between until some later append.)
        let read = self
            .events
            .read_log(&filter.query(self.position, self.batch_size))
            .await?;
        let batch = read.events;
        tracing::Span::current().record("events", batch.len());
        if let Some(scanned) = read.scanned {
            self.metrics
                .inner
                .head
                .fetch_max(scanned.value(), Ordering::Relaxed);
        }
        if batch.is_empty() {
            self.scanned = read.scanned;
            crate::metrics::projection_lag(&self.name, 0, None);
            return Ok(false);
        }
        let mut processed = None;
        let mut failure = None;
        for event in &batch {
            match self.process(event).await {
                Ok(Outcome::Applied) => summary.applied += 1,
                Ok(Outcome::Parked) => summary.parked += 1,
                Err(error) => {
                    failure = Some(error);
                    break;
                }
            }
            processed = Some(event.global_position);
        }
        // Never ahead of what was applied: up to the last processed event.
        if let Some(position) = processed {
            // Applied is applied: even if saving fails, this runner must not apply these
            // events again (the next successful save covers them).
            self.position = Some(position);
            self.checkpoints
                .save_checkpoint(&self.key()?, position)
                .await?;
            let count = batch.len() as u64;
            self.metrics
                .inner
                .checkpoint
                .store(position.value(), Ordering::Relaxed);
            self.metrics
                .inner
                .processed
                .fetch_add(count, Ordering::Relaxed);
            let head = batch
                .last()
                .map_or(position.value(), |e| e.global_position.value());
            self.metrics.inner.head.fetch_max(head, Ordering::Relaxed);
            // A short batch read to the end of what it wants: caught up. After a full
            // one (catching up) or a failure, one read of the head says how far behind.
            let behind = if failure.is_some() || batch.len() >= self.batch_size {
                let head = match self.head_probe {
                    // The head only grows: the one read less than a second ago is a
                    // lower bound, and saves a read per batch while catching up.
                    Some((at, head)) if at.elapsed() < Duration::from_secs(1) => Some(head),
                    // Best effort: a failed read of the head leaves the lag unknown.
                    _ => match self.events.head_position().await {
                        Ok(head) => {
                            let head = head.map_or(0, GlobalPosition::value);
                            self.head_probe = Some((Instant::now(), head));
                            Some(head)
                        }
                        Err(_) => None,
                    },
                };
                head.map_or(0, |head| head.saturating_sub(position.value()))
            } else {
                0
            };
            let applied_at = batch
                .iter()
                .find(|e| e.global_position == position)
                .map(|e| e.recorded_at);
            crate::metrics::projection_lag(&self.name, behind, applied_at);
            let seconds = started.elapsed().as_secs_f64().max(1e-9);
            self.metrics
                .inner
                .rate_milli
                .store((count as f64 / seconds * 1_000.0) as u64, Ordering::Relaxed);
        }
        match failure {
            Some(error) => Err(error),
            None => Ok(true),
        }
    }

    async fn process(&mut self, event: &RecordedEvent) -> Result<Outcome> {
        let decoded = match event.decode::<P::Event>() {
            Ok(decoded) => decoded,
            Err(error) => return self.give_up(event, Box::new(error)).await,
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.projection.apply(&decoded).await {
                Ok(()) => return Ok(Outcome::Applied),
                Err(error) if attempt >= self.policy.max_attempts() => {
                    return self.give_up(event, Box::new(error)).await;
                }
                Err(error) => {
                    let delay = self.policy.delay_before_retry(attempt);
                    tracing::warn!(projection = %self.name, position = %event.global_position, attempt, %error, ?delay, "apply failed; retrying");
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                }
            }
        }
    }

    /// The checked name (a cheap clone).
    fn key(&self) -> Result<ProjectionName> {
        self.key.clone().map_err(Error::from)
    }

    async fn give_up(&mut self, event: &RecordedEvent, error: BoxError) -> Result<Outcome> {
        let message = error_chain(&*error);
        match self.policy.on_failure {
            OnFailure::Stop => Err(Error::ProjectionFailed {
                projection: self.name.clone(),
                stream: event.stream_id.clone(),
                version: event.stream_version,
                position: event.global_position,
                message,
                source: Some(error),
            }),
            OnFailure::Park => {
                tracing::error!(projection = %self.name, position = %event.global_position, %message, "parking an event");
                self.checkpoints
                    .park(ParkedEvent::new(&self.key()?, event, message))
                    .await?;
                self.metrics.inner.parked.fetch_add(1, Ordering::Relaxed);
                Ok(Outcome::Parked)
            }
        }
    }
}

impl<P: Projection> fmt::Debug for ProjectionRunner<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProjectionRunner")
            .field("name", &self.name)
            .field("position", &self.position)
            .field("batch_size", &self.batch_size)
            .finish_non_exhaustive()
    }
}

enum Outcome {
    Applied,
    Parked,
}

/// The output of `future` if it is already complete, without waiting for it.
async fn poll_now<F: Future + Unpin>(future: &mut F) -> Option<F::Output> {
    tokio::select! {
        biased;
        value = future => Some(value),
        () = std::future::ready(()) => None,
    }
}
