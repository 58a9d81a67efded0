//! Process managers: consumers of the global log that react to events by dispatching
//! commands, with a durable checkpoint, one leader at a time, and dispatched commands
//! that are not executed twice when an event is delivered again.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use tracing::Instrument;

use crate::command::Command;
use crate::error::{Error, Result};
use crate::event::{Event, StoredEvent};
use crate::executor::{CommandExecutor, ExecutionOptions, ExecutionResult};
use crate::leadership::LeaderElection;
use crate::metadata::EventMetadata;
use crate::names::{InvalidProjectionName, NameProblem, ProjectionName};
use crate::projection::{
    CheckpointStore, Projection, ProjectionErrorPolicy, ProjectionFilter, ProjectionMetrics,
    ProjectionRunner, RunSummary,
};
use crate::trace::TraceContext;
use crate::types::{CausationId, CorrelationId, EventId, IdempotencyKey};

/// The longest process manager name: its idempotency keys append the causing event's id
/// to it and must stay within [`crate::MAX_NAME_LEN`].
pub const MAX_PROCESS_MANAGER_NAME_LEN: usize = 200;

/// Reacts to events of the global log by dispatching commands.
///
/// A process manager is run by a [`ProcessManagerRunner`], which is a
/// [`ProjectionRunner`] underneath: it has a durable checkpoint, runs as one active
/// instance under [`ProcessManagerRunner::run_as_leader`], and follows the same error
/// policy. Delivery is at-least-once (events after the last checkpoint are handed over
/// again after a crash), and that is safe because every command goes through the
/// [`Dispatcher`], which gives it an idempotency key derived from the manager's name,
/// the causing event's id and the command's position among the event's dispatches: a
/// redelivered event dispatches the same keys, and the store answers with the first
/// outcome instead of executing again.
///
/// For that, `handle` must dispatch the same commands in the same order when it is
/// handed the same event again: keys go by position. Read what it decides from from the
/// event and from the store (whose answers only move forward); do not draw random
/// numbers or read a clock to pick commands. Two things are not covered by keys: a
/// command refused for a business reason stores no key and runs again on redelivery
/// (so do not branch into *different* commands on a refusal that may not repeat), and
/// calls outside the store (a card gateway, a mail server) repeat unless they take a key
/// of their own — the causing event's id is a good one.
///
/// Leadership is checked between batches: a leader that loses its lease finishes the
/// batch it is in. Commands whose effect must not happen after a competing decision
/// should read the stream that decision is written to (optimistic concurrency then
/// refuses the stale one), or be made harmless by the compensations (see
/// [`crate::saga::Saga`]).
///
/// # Examples
///
/// ```
/// use eventcore::{Dispatcher, ProcessManager, ProjectionFilter, StoredEvent};
/// # use eventcore::{CommandLogic, ReadStreams, StreamResolver, StreamWrite, CommandResult, StreamId};
/// # #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, eventcore::Event)]
/// # enum ShopEvent { OrderPlaced { order: String }, WelcomeMailQueued }
/// # #[derive(eventcore::Command)]
/// # struct QueueMail { #[stream] outbox: StreamId }
/// # impl CommandLogic for QueueMail {
/// #     type State = ();
/// #     type Event = ShopEvent;
/// #     fn apply(&self, _: &mut (), _: &StoredEvent<ShopEvent>) {}
/// #     fn handle(&self, streams: ReadStreams<Self::StreamSet>, _: (), _: &mut StreamResolver)
/// #         -> CommandResult<Vec<StreamWrite<Self::StreamSet, ShopEvent>>> {
/// #         Ok(vec![StreamWrite::new(&streams, self.outbox.clone(), ShopEvent::WelcomeMailQueued)?])
/// #     }
/// # }
///
/// /// Queues a mail for every order placed.
/// struct Mailer;
///
/// impl ProcessManager for Mailer {
///     type Event = ShopEvent;
///
///     fn name(&self) -> &str {
///         "mailer"
///     }
///
///     fn filter(&self) -> ProjectionFilter {
///         ProjectionFilter::all().with_event_types(["OrderPlaced"]).expect("a valid type name")
///     }
///
///     async fn handle(
///         &mut self,
///         event: &StoredEvent<ShopEvent>,
///         dispatcher: &mut Dispatcher<'_>,
///     ) -> eventcore::Result<()> {
///         if let ShopEvent::OrderPlaced { order } = &event.payload {
///             let outbox = StreamId::try_new(format!("mail-{order}"))?;
///             dispatcher.dispatch(&QueueMail { outbox }).await?;
///         }
///         Ok(())
///     }
/// }
/// ```
pub trait ProcessManager: Send + 'static {
    /// What the events it receives decode into.
    type Event: Event;

    /// Its name: checkpoint, dead letters, leadership and idempotency keys are kept
    /// under it. Same rules as a stream id, at most [`MAX_PROCESS_MANAGER_NAME_LEN`]
    /// bytes.
    fn name(&self) -> &str;

    /// Which events to receive; every event by default.
    fn filter(&self) -> ProjectionFilter {
        ProjectionFilter::all()
    }

    /// Reacts to one event, dispatching commands through `dispatcher`.
    ///
    /// An error is handled by the runner's [`ProjectionErrorPolicy`]: retried with
    /// backoff (the retry dispatches the same keys, so commands that already ran are not
    /// run again), then the runner stops or parks the event. A business refusal of a
    /// dispatched command that the process expects belongs in the process's logic, not
    /// in the error path: match on it.
    fn handle(
        &mut self,
        event: &StoredEvent<Self::Event>,
        dispatcher: &mut Dispatcher<'_>,
    ) -> impl Future<Output = Result<()>> + Send;
}

/// Dispatches the commands a process manager decides on in reaction to one event.
///
/// Every command gets:
/// - the causing event's id as its causation id and the causing event's correlation id,
///   so the whole chain can be followed in the metadata;
/// - an idempotency key `"<manager>/<causing event id>/<n>"`, where `n` counts the
///   dispatches made for this event, so delivering the event again finds the first
///   outcome instead of executing again.
pub struct Dispatcher<'a> {
    executor: &'a CommandExecutor,
    manager: &'a str,
    cause: EventId,
    correlation_id: CorrelationId,
    dispatched: u32,
    custom: serde_json::Map<String, serde_json::Value>,
    trace_context: Option<TraceContext>,
}

impl<'a> Dispatcher<'a> {
    /// A dispatcher for commands caused by the event `cause` (whose correlation id is
    /// `correlation_id`), on behalf of `manager`.
    ///
    /// The runners create dispatchers; create one yourself to dispatch from a component
    /// of your own with the same guarantees.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidProjectionName`] when `manager` is not a valid process manager
    /// name.
    pub fn new(
        executor: &'a CommandExecutor,
        manager: &'a str,
        cause: EventId,
        correlation_id: CorrelationId,
    ) -> Result<Self> {
        check_manager_name(manager)?;
        Ok(Dispatcher {
            executor,
            manager,
            cause,
            correlation_id,
            dispatched: 0,
            custom: serde_json::Map::new(),
            trace_context: None,
        })
    }

    /// Executes `command` as caused by this dispatcher's event.
    ///
    /// `ExecutionResult::deduplicated` is `true` when the command had already run for
    /// this event (a redelivery): nothing was executed now.
    ///
    /// # Errors
    ///
    /// As [`CommandExecutor::execute`]. A refused command (a business error) consumes no
    /// key: delivering the event again executes it again.
    pub async fn dispatch<C: Command>(&mut self, command: &C) -> Result<ExecutionResult> {
        let options = self.next_options()?;
        self.executor.execute_with(command, options).await
    }

    /// The executor commands are dispatched through (for reading the store).
    pub fn executor(&self) -> &CommandExecutor {
        self.executor
    }

    /// The id of the event being handled.
    pub fn cause(&self) -> EventId {
        self.cause
    }

    /// The correlation id every dispatched command carries.
    pub fn correlation_id(&self) -> CorrelationId {
        self.correlation_id
    }

    /// Stamps a custom metadata field (a tenant, a channel) on the events of every
    /// command dispatched from now on for this event; a later value for the same key
    /// replaces the earlier one. Correlation, causation, actor and the idempotency key
    /// stay the dispatcher's.
    pub fn set_custom(
        &mut self,
        key: impl Into<String>,
        value: impl Into<serde_json::Value>,
    ) -> &mut Self {
        self.custom.insert(key.into(), value.into());
        self
    }

    /// The trace context stamped on the events of every command dispatched from now on
    /// (the runners set the causing event's, so a trace continues through the process).
    pub fn set_trace_context(&mut self, context: Option<TraceContext>) -> &mut Self {
        self.trace_context = context;
        self
    }

    /// Carries the causing event's custom fields and trace context onto every command
    /// dispatched from now on (the runners do this for every event they hand over, so a
    /// tenant or a trace follows a process across its hops); later
    /// [`Dispatcher::set_custom`] and [`Dispatcher::set_trace_context`] calls override
    /// them.
    pub fn inherit_metadata(&mut self, cause: &EventMetadata) -> &mut Self {
        for (field, value) in &cause.custom {
            self.custom.insert(field.clone(), value.clone());
        }
        self.trace_context = cause.trace_context.clone();
        self
    }

    /// How many commands were dispatched for this event so far.
    pub fn dispatched(&self) -> u32 {
        self.dispatched
    }

    fn next_options(&mut self) -> Result<ExecutionOptions> {
        let key = IdempotencyKey::try_new(format!(
            "{}/{}/{}",
            self.manager, self.cause, self.dispatched
        ))?;
        self.dispatched += 1;
        let mut options = ExecutionOptions::new()
            .with_idempotency_key(key)
            .with_correlation_id(self.correlation_id)
            .with_causation_id(CausationId::from(self.cause))
            .with_actor(self.manager.to_owned());
        for (field, value) in &self.custom {
            options = options.with_custom(field.clone(), value.clone());
        }
        if let Some(context) = &self.trace_context {
            options = options.with_trace_context(context.clone());
        }
        Ok(options)
    }
}

impl fmt::Debug for Dispatcher<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dispatcher")
            .field("manager", &self.manager)
            .field("cause", &self.cause)
            .field("correlation_id", &self.correlation_id)
            .field("dispatched", &self.dispatched)
            .field("custom", &self.custom)
            .field("trace_context", &self.trace_context)
            .finish_non_exhaustive()
    }
}

/// Checks a process manager name: a valid projection name of at most
/// [`MAX_PROCESS_MANAGER_NAME_LEN`] bytes.
pub(crate) fn check_manager_name(name: &str) -> Result<()> {
    check_name_len(name, MAX_PROCESS_MANAGER_NAME_LEN)
}

/// A valid projection name of at most `max` bytes.
pub(crate) fn check_name_len(name: &str, max: usize) -> Result<()> {
    ProjectionName::try_new(name)?;
    if name.len() > max {
        return Err(Error::InvalidProjectionName(InvalidProjectionName {
            value: name.to_owned(),
            problem: NameProblem::TooLong {
                len: name.len(),
                max,
            },
        }));
    }
    Ok(())
}

/// A [`ProcessManager`] seen as a [`Projection`]: applying an event is handling it.
struct Managed<M> {
    manager: M,
    name: String,
    executor: CommandExecutor,
}

impl<M: ProcessManager> Projection for Managed<M> {
    type Event = M::Event;
    type Error = Error;

    fn name(&self) -> &str {
        &self.name
    }

    fn filter(&self) -> ProjectionFilter {
        self.manager.filter()
    }

    async fn apply(&mut self, event: &StoredEvent<M::Event>) -> Result<()> {
        let mut dispatcher = Dispatcher::new(
            &self.executor,
            &self.name,
            event.event_id,
            event.metadata.correlation_id,
        )?;
        dispatcher.inherit_metadata(&event.metadata);
        let span = tracing::info_span!(
            "eventcore.process",
            otel.name = %format_args!("process {}", self.name),
            otel.kind = "consumer",
            manager = %self.name,
            event_id = %event.event_id,
            stream = %event.stream_id,
        );
        #[cfg(feature = "opentelemetry")]
        if let Some(context) = &event.metadata.trace_context {
            crate::otel::continue_from(&span, context);
        }
        self.manager
            .handle(event, &mut dispatcher)
            .instrument(span)
            .await
    }
}

/// Runs a [`ProcessManager`]: a [`ProjectionRunner`] whose projection dispatches
/// commands. Catch up, follow live, run as the single leader, rewind: all as for
/// projections.
///
/// # Examples
///
/// ```
/// # use eventcore::{Dispatcher, ProcessManager, StoredEvent};
/// # struct Mailer;
/// # impl ProcessManager for Mailer {
/// #     type Event = eventcore::RawEvent;
/// #     fn name(&self) -> &str { "mailer" }
/// #     async fn handle(&mut self, _: &StoredEvent<eventcore::RawEvent>, _: &mut Dispatcher<'_>) -> eventcore::Result<()> { Ok(()) }
/// # }
/// use std::sync::Arc;
/// use eventcore::{CommandExecutor, ProcessManagerRunner};
/// use eventcore_memory::InMemoryEventStore;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> eventcore::Result<()> {
/// let store = InMemoryEventStore::new();
/// let executor = CommandExecutor::new(store.clone());
/// let mut runner = ProcessManagerRunner::new(Mailer, executor, Arc::new(store));
/// runner.catch_up().await?;
/// // In a service: runner.run_as_leader(&election, shutdown_signal).await?
/// # Ok(())
/// # }
/// ```
pub struct ProcessManagerRunner<M: ProcessManager> {
    runner: ProjectionRunner<Managed<M>>,
}

impl<M: ProcessManager> ProcessManagerRunner<M> {
    /// The default number of events per batch (and per checkpoint): at most this many
    /// events are handed over again after a crash.
    pub const DEFAULT_BATCH_SIZE: usize = 100;

    /// A runner for `manager`, reading the executor's store, dispatching through
    /// `executor` and keeping its checkpoint in `checkpoints`.
    pub fn new(
        manager: M,
        executor: CommandExecutor,
        checkpoints: Arc<dyn CheckpointStore>,
    ) -> Self {
        let name = manager.name().to_owned();
        let events = Arc::clone(executor.store());
        let managed = Managed {
            manager,
            name,
            executor,
        };
        ProcessManagerRunner {
            runner: ProjectionRunner::new(managed, events, checkpoints)
                .with_batch_size(Self::DEFAULT_BATCH_SIZE),
        }
    }

    /// Events per batch; the checkpoint is saved after each (at least 1).
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.runner = self.runner.with_batch_size(batch_size);
        self
    }

    /// What to do with events whose handling keeps failing.
    pub fn with_error_policy(mut self, policy: ProjectionErrorPolicy) -> Self {
        self.runner = self.runner.with_error_policy(policy);
        self
    }

    /// Live figures: checkpoint, lag, events handled, leadership.
    pub fn metrics(&self) -> ProjectionMetrics {
        self.runner.metrics()
    }

    /// The process manager.
    pub fn manager(&self) -> &M {
        &self.runner.projection().manager
    }

    /// Handles every event up to the end of the log as last read, then returns.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidProjectionName`] for a name that is not valid;
    /// [`Error::ProjectionFailed`] when an event's handling keeps failing and the policy
    /// says stop; store errors.
    pub async fn catch_up(&mut self) -> Result<RunSummary> {
        check_manager_name(self.manager().name())?;
        self.runner.catch_up().await
    }

    /// Catches up, then follows the log live until `shutdown` completes.
    ///
    /// # Errors
    ///
    /// As [`ProcessManagerRunner::catch_up`].
    pub async fn run(&mut self, shutdown: impl Future<Output = ()> + Send) -> Result<RunSummary> {
        check_manager_name(self.manager().name())?;
        self.runner.run(shutdown).await
    }

    /// Like [`ProcessManagerRunner::run`], but only while this instance holds the
    /// leadership over the manager's name (see [`ProjectionRunner::run_as_leader`]).
    ///
    /// # Errors
    ///
    /// As [`ProcessManagerRunner::catch_up`], and the election's errors.
    pub async fn run_as_leader(
        &mut self,
        election: &dyn LeaderElection,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<RunSummary> {
        check_manager_name(self.manager().name())?;
        self.runner.run_as_leader(election, shutdown).await
    }
}

impl<M: ProcessManager> fmt::Debug for ProcessManagerRunner<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcessManagerRunner")
            .field("runner", &self.runner)
            .finish()
    }
}
