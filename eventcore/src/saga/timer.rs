//! Durable step deadlines, rebuilt from the log and fired on a clock.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::commands::TimeOutStep;
use super::definition::check_saga_name;
use super::state::{SagaEvent, event_types};
use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::executor::CommandExecutor;
use crate::names::ProjectionName;
use crate::process::Dispatcher;
use crate::projection::CheckpointStore;
use crate::store::LogQuery;
use crate::types::{CorrelationId, EventId, GlobalPosition, StreamId};

/// A deadline waiting to pass.
#[derive(Debug, Clone)]
struct Deadline {
    deadline: DateTime<Utc>,
    cause: EventId,
    correlation_id: CorrelationId,
    /// The step event's metadata: the timeout carries its custom fields and continues
    /// its trace, as a process manager's commands continue their event's.
    metadata: std::sync::Arc<crate::EventMetadata>,
    /// Where the step's `StepStarted` is in the log: no low-water mark passes it while
    /// the step is pending.
    started: GlobalPosition,
}

/// With [`SagaTimer::with_low_water_mark`]: where the timer keeps how far a restart may
/// skip.
struct LowWaterMark {
    checkpoints: Arc<dyn CheckpointStore>,
    name: ProjectionName,
    /// Loaded (at the first catch-up), and the last value saved or loaded.
    loaded: bool,
    saved: Option<GlobalPosition>,
}

/// Fires a saga's step deadlines.
///
/// The deadlines are in the saga streams (each `StepStarted` carries its own), so they
/// survive any restart: a timer rebuilds what is pending by reading the saga's step
/// events from the start of the log (or, with [`SagaTimer::with_low_water_mark`], from
/// its oldest pending step), then follows it. When a deadline passes on its
/// [`Clock`], it dispatches the saga's timeout command, which times the step out only if
/// the stream still says it runs past its deadline; the dispatch is idempotent
/// (keyed by the step's `StepStarted` event), so two timers, or one restarted, never
/// time a step out twice.
pub struct SagaTimer {
    manager: String,
    executor: CommandExecutor,
    clock: Arc<dyn Clock>,
    query: LogQuery,
    pending: BTreeMap<(StreamId, usize), Deadline>,
    position: Option<GlobalPosition>,
    scanned: Option<GlobalPosition>,
    unreadable: Vec<GlobalPosition>,
    mark: Option<LowWaterMark>,
}

impl SagaTimer {
    /// Events read per batch.
    pub const BATCH_SIZE: usize = 1_000;

    /// A timer for the saga named `saga`, dispatching through `executor`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidProjectionName`] for a saga name that is not valid.
    pub fn new(saga: &str, executor: CommandExecutor, clock: Arc<dyn Clock>) -> Result<Self> {
        check_saga_name(saga)?;
        let query = LogQuery::new()
            .with_stream_prefix(format!("saga/{saga}/"))
            .with_event_types([
                event_types::STEP_STARTED,
                event_types::STEP_SUCCEEDED,
                event_types::STEP_FAILED,
                event_types::STEP_TIMED_OUT,
            ])?;
        Ok(SagaTimer {
            manager: format!("{saga}.timeout"),
            executor,
            clock,
            query,
            pending: BTreeMap::new(),
            position: None,
            scanned: None,
            unreadable: Vec::new(),
            mark: None,
        })
    }

    /// Keeps a low-water mark in `checkpoints` (under the name `<saga>/timer`), so that a
    /// restarted timer does not read every saga's history again: it starts after the
    /// mark, the position before the oldest step still pending (or, with none pending,
    /// as far as the timer has read). Every step whose deadline can still pass started
    /// after the mark, so nothing is missed; steps before it are all answered. A step
    /// event the timer could not decode holds the mark before it too (it is read, and
    /// reported, again at every start), and a step with a long deadline holds it for as
    /// long as it runs.
    ///
    /// The mark only saves reading: when it cannot be loaded the timer reads from the
    /// start, and when it cannot be saved it carries on (both with a warning).
    ///
    /// The mark is loaded at the first [`SagaTimer::catch_up`] and saved at the end of
    /// each one that moved it. Without it (the default) a timer reads the saga's step
    /// events from the start of the log. Timers of one saga that share the checkpoint
    /// store share the mark; a checkpoint never moves backwards, and the mark of one
    /// timer is right for any other (it depends on the log alone).
    pub fn with_low_water_mark(mut self, checkpoints: Arc<dyn CheckpointStore>) -> Self {
        // `<saga>/timer`: no saga name holds a `/`, so no other saga's checkpoint (its
        // manager's is the bare name) can be called that.
        let saga = self
            .manager
            .strip_suffix(".timeout")
            .unwrap_or(&self.manager);
        if let Ok(name) = ProjectionName::try_new(format!("{saga}/timer")) {
            self.mark = Some(LowWaterMark {
                checkpoints,
                name,
                loaded: false,
                saved: None,
            });
        }
        self
    }

    /// The position a restart may start after: before the oldest pending step, or as far
    /// as the timer has read when none is pending.
    fn low_water_mark(&self) -> Option<GlobalPosition> {
        // Pending steps and unreadable step events must be read again after a restart.
        let held = self
            .pending
            .values()
            .map(|d| d.started)
            .chain(self.unreadable.iter().copied())
            .min();
        match held {
            Some(oldest) => oldest
                .value()
                .checked_sub(1)
                .filter(|p| *p > 0)
                .map(GlobalPosition::new),
            None => self.scanned.max(self.position),
        }
    }

    /// The positions of the step events the timer could not decode and passed (see
    /// [`SagaTimer::catch_up`]), in the order met.
    pub fn unreadable(&self) -> &[GlobalPosition] {
        &self.unreadable
    }

    /// Steps running with a deadline.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// The earliest deadline still pending.
    pub fn next_deadline(&self) -> Option<DateTime<Utc>> {
        self.pending.values().map(|d| d.deadline).min()
    }

    /// Reads the saga's step events up to the end of the log. Returns how many it read.
    ///
    /// A step event that cannot be decoded (written by hand, damaged in storage) does
    /// not stop the timer, which would hold back every other instance's deadlines: it
    /// is logged, listed in [`SagaTimer::unreadable`], and passed. Its instance cannot
    /// move on anyway: every saga command folds the stream and fails on it.
    ///
    /// # Errors
    ///
    /// The store's errors.
    pub async fn catch_up(&mut self) -> Result<usize> {
        if let Some(mark) = &mut self.mark
            && !mark.loaded
        {
            let loaded = match mark.checkpoints.load_checkpoint(&mark.name).await {
                Ok(loaded) => loaded,
                Err(error) => {
                    tracing::warn!(saga = %self.manager, error = %crate::error_chain(&error), "loading the saga timer's low-water mark failed; reading from the start of the log");
                    None
                }
            };
            mark.loaded = true;
            mark.saved = loaded;
            if loaded > self.position {
                tracing::debug!(saga = %self.manager, mark = ?loaded, "saga timer resumes after its low-water mark");
                self.position = loaded;
            }
        }
        let mut read = 0;
        loop {
            let query = self
                .query
                .clone()
                .with_after(self.position)
                .with_limit(Self::BATCH_SIZE);
            // How far the read looked comes from the read itself, never from a head
            // read before it (which may be ahead of what the read could see).
            let page = self.executor.store().read_log(&query).await?;
            if page.events.is_empty() {
                self.scanned = page.scanned.max(self.scanned);
                self.save_low_water_mark().await;
                return Ok(read);
            }
            let batch = page.events;
            for event in &batch {
                let decoded = match event.decode::<SagaEvent>() {
                    Ok(decoded) => decoded,
                    Err(error) => {
                        tracing::error!(position = %event.global_position, stream = %event.stream_id, error = %crate::error_chain(&error), "a saga step event does not decode; the timer passes it");
                        self.unreadable.push(event.global_position);
                        self.position = Some(event.global_position);
                        continue;
                    }
                };
                let stream = decoded.stream_id.clone();
                match decoded.payload {
                    SagaEvent::StepStarted {
                        step,
                        deadline: Some(deadline),
                        ..
                    } => {
                        self.pending.insert(
                            (stream, step),
                            Deadline {
                                deadline,
                                cause: decoded.event_id,
                                correlation_id: decoded.metadata.correlation_id,
                                metadata: std::sync::Arc::clone(&event.metadata),
                                started: event.global_position,
                            },
                        );
                    }
                    SagaEvent::StepSucceeded { step }
                    | SagaEvent::StepFailed { step, .. }
                    | SagaEvent::StepTimedOut { step, .. } => {
                        self.pending.remove(&(stream, step));
                    }
                    _ => {}
                }
                self.position = Some(event.global_position);
            }
            read += batch.len();
        }
    }

    /// Saves the low-water mark when it moved past the one saved.
    async fn save_low_water_mark(&mut self) {
        let mark = self.low_water_mark();
        let Some(kept) = &mut self.mark else {
            return;
        };
        if let Some(position) = mark
            && Some(position) > kept.saved
        {
            match kept.checkpoints.save_checkpoint(&kept.name, position).await {
                Ok(()) => kept.saved = Some(position),
                Err(error) => {
                    tracing::warn!(saga = %self.manager, error = %crate::error_chain(&error), "saving the saga timer's low-water mark failed; a restart reads from the last one saved");
                }
            }
        }
    }

    /// Times out every pending step whose deadline has passed on the clock. Returns how
    /// many timeout commands it dispatched.
    ///
    /// # Errors
    ///
    /// As [`CommandExecutor::execute`]; the steps not fired stay pending.
    pub async fn fire_due(&mut self) -> Result<usize> {
        let now = self.clock.now();
        let due: Vec<_> = self
            .pending
            .iter()
            .filter(|(_, d)| d.deadline <= now)
            .map(|(key, d)| (key.clone(), d.clone()))
            .collect();
        let mut fired = 0;
        let mut first_error = None;
        // One failed timeout must not hold back the others: all are tried, the first
        // error is returned after, and the failed ones stay pending for the next call.
        for ((stream, step), deadline) in due {
            let mut dispatcher = Dispatcher::new(
                &self.executor,
                &self.manager,
                deadline.cause,
                deadline.correlation_id,
            )?;
            dispatcher.inherit_metadata(&deadline.metadata);
            let command = TimeOutStep {
                stream: stream.clone(),
                step,
                now,
            };
            let span = tracing::info_span!(
                "eventcore.saga.timeout",
                otel.name = %format_args!("timeout {}", self.manager),
                otel.kind = "internal",
                %stream,
                step,
            );
            #[cfg(feature = "opentelemetry")]
            if let Some(context) = &deadline.metadata.trace_context {
                crate::otel::continue_from(&span, context);
            }
            match tracing::Instrument::instrument(dispatcher.dispatch(&command), span).await {
                Ok(_) => {
                    tracing::info!(%stream, step, deadline = %deadline.deadline, "saga step deadline passed");
                    self.pending.remove(&(stream, step));
                    fired += 1;
                }
                Err(error) => {
                    tracing::warn!(%stream, step, %error, "timing a saga step out failed");
                    first_error.get_or_insert(error);
                }
            }
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(fired),
        }
    }

    /// Catches up and fires what is due, then waits for new saga events or the next
    /// deadline, until `shutdown` completes. Retryable failures (a lost connection, a
    /// conflict that outlasted the executor's retries) are retried with backoff.
    ///
    /// # Errors
    ///
    /// A failure that is not retryable, from [`SagaTimer::catch_up`] or
    /// [`SagaTimer::fire_due`].
    pub async fn run(&mut self, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        let mut shutdown = std::pin::pin!(shutdown);
        let backoff = crate::RetryPolicy::new()
            .with_initial_delay(Duration::from_millis(50))
            .with_max_delay(Duration::from_secs(5));
        let mut failures = 0;
        loop {
            let step = async {
                self.catch_up().await?;
                self.fire_due().await
            };
            match step.await {
                Ok(_) => failures = 0,
                Err(error) if error.is_retryable() || is_exhausted(&error) => {
                    failures += 1;
                    let delay = backoff.delay_before_retry(failures);
                    tracing::warn!(%error, ?delay, "saga timer failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => continue,
                        () = &mut shutdown => return Ok(()),
                    }
                }
                Err(error) => return Err(error),
            }
            let next = self.next_deadline();
            let clock = Arc::clone(&self.clock);
            let deadline = async move {
                match next {
                    Some(next) => clock.sleep_until(next).await,
                    None => std::future::pending().await,
                }
            };
            let store = Arc::clone(self.executor.store());
            let after = self.scanned.max(self.position);
            tokio::select! {
                waited = store.wait_for_events(after) => match waited {
                    Ok(()) => {}
                    // The next round's catch-up meets the failure again and backs off.
                    Err(error) if error.is_retryable() => {
                        tracing::warn!(%error, "waiting for saga events failed");
                    }
                    Err(error) => return Err(error),
                },
                () = deadline => {}
                () = &mut shutdown => return Ok(()),
            }
        }
    }
}

/// Retries that ran out on a retryable failure: worth trying again later.
fn is_exhausted(error: &Error) -> bool {
    matches!(error, Error::RetriesExhausted { last, .. } if last.is_retryable())
}

impl fmt::Debug for SagaTimer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SagaTimer")
            .field("manager", &self.manager)
            .field("pending", &self.pending.len())
            .field("position", &self.position)
            .finish_non_exhaustive()
    }
}
