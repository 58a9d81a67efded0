//! Sagas built from commands: a long-running process across services whose progress is
//! events in its own stream, with forward steps, compensations in reverse order and
//! durable timeouts.
//!
//! The pieces:
//! - [`Saga`]: the definition (steps, what starts an instance, which events answer a
//!   step, what each step and compensation dispatches).
//! - The saga stream `saga/<name>/<instance>` holds [`SagaEvent`]s, written only by the
//!   saga's own commands. Every transition is decided by a command from the folded
//!   stream ([`SagaState`]) under optimistic concurrency, so duplicate answers, answers
//!   after the deadline, and timeouts after the answer are recognised from what is
//!   stored and change nothing. (An answer for a step that has not started is dropped
//!   too: it cannot happen when the step's own command is what asks for the answer.)
//! - [`SagaManager`]: the [`ProcessManager`] that performs the steps and compensations
//!   the stream asks for and records the answers. Run it with a
//!   [`crate::ProcessManagerRunner`] (durable checkpoint, one leader, idempotent
//!   dispatch).
//! - [`SagaTimer`]: fires the deadlines recorded in the saga streams, through a [`Clock`]
//!   that tests control ([`ManualClock`]).

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;

use crate::command::{CommandLogic, CommandStreams, ReadStreams, StreamResolver, StreamWrite};
use crate::error::{CommandResult, Error, Result};
use crate::event::{Event, StoredEvent};
use crate::executor::{CommandExecutor, ExecutionOptions, ExecutionResult};
use crate::process::{Dispatcher, ProcessManager, check_manager_name};
use crate::projection::ProjectionFilter;
use crate::store::LogQuery;
use crate::types::{CorrelationId, EventId, GlobalPosition, StreamId};

// ---------------------------------------------------------------------------------------
// Clocks

/// A future returned by [`Clock::sleep_until`].
pub type SleepFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// Where saga deadlines get the time from. Commands never read it: the components that
/// dispatch them pass the time in.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> DateTime<Utc>;

    /// Completes once [`Clock::now`] has reached `deadline`.
    fn sleep_until(&self, deadline: DateTime<Utc>) -> SleepFuture<'_>;
}

/// The system's wall clock, with Tokio's timer for waiting.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn sleep_until(&self, deadline: DateTime<Utc>) -> SleepFuture<'_> {
        Box::pin(async move {
            loop {
                let left = deadline - Utc::now();
                match left.to_std() {
                    Ok(left) if !left.is_zero() => tokio::time::sleep(left).await,
                    _ => return,
                }
            }
        })
    }
}

/// A clock that only moves when told to: tests advance it past a deadline instead of
/// sleeping. Clones share the time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<watch::Sender<DateTime<Utc>>>,
}

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: DateTime<Utc>) -> Self {
        ManualClock {
            now: Arc::new(watch::Sender::new(start)),
        }
    }

    /// Moves the time forward by `by`, waking whoever waits for a deadline it reaches.
    pub fn advance(&self, by: Duration) {
        let by = chrono::Duration::from_std(by).unwrap_or(chrono::Duration::MAX);
        self.now.send_modify(|now| {
            *now = now
                .checked_add_signed(by)
                .unwrap_or(DateTime::<Utc>::MAX_UTC);
        });
    }

    /// Sets the time; a time before the current one is ignored (the clock never goes
    /// back).
    pub fn set(&self, to: DateTime<Utc>) {
        self.now.send_if_modified(|now| {
            if to > *now {
                *now = to;
                true
            } else {
                false
            }
        });
    }
}

impl Default for ManualClock {
    /// A clock standing at the Unix epoch.
    fn default() -> Self {
        ManualClock::new(DateTime::<Utc>::UNIX_EPOCH)
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.borrow()
    }

    fn sleep_until(&self, deadline: DateTime<Utc>) -> SleepFuture<'_> {
        let mut receiver = self.now.subscribe();
        Box::pin(async move {
            // The sender lives in `self`, which outlives this future: the wait cannot
            // fail for a closed channel.
            let _ = receiver.wait_for(|now| *now >= deadline).await;
        })
    }
}

// ---------------------------------------------------------------------------------------
// Definition

/// One step of a saga: a name, unique in the saga, and optionally how long it may wait
/// for its answer before it times out and the saga compensates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaStep {
    name: String,
    timeout_ms: Option<u64>,
}

impl SagaStep {
    /// A step without a deadline.
    pub fn new(name: impl Into<String>) -> Self {
        SagaStep {
            name: name.into(),
            timeout_ms: None,
        }
    }

    /// The step times out `timeout` after it started if no answer was recorded.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout_ms = Some(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        self
    }

    /// The step's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The step's timeout, if it has one.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout_ms.map(Duration::from_millis)
    }

    fn deadline(&self, started: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let timeout = self.timeout_ms?;
        // A timeout beyond what a date can hold is a deadline at the end of time, not
        // no deadline.
        let deadline = i64::try_from(timeout)
            .ok()
            .and_then(chrono::Duration::try_milliseconds)
            .and_then(|timeout| started.checked_add_signed(timeout));
        Some(deadline.unwrap_or(DateTime::<Utc>::MAX_UTC))
    }
}

/// How a step went, as the saga records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepOutcome {
    /// The step did what it should.
    Succeeded,
    /// The step was refused for a business reason (stock short, card declined, ...):
    /// the saga compensates the steps that succeeded before it, in reverse order.
    Failed(String),
    /// The step was asked for and its answer will come as an event (see
    /// [`SagaTrigger::Reply`]), or its deadline passes first.
    Pending,
}

impl StepOutcome {
    /// The outcome of a step that is the execution of one command: success is
    /// [`StepOutcome::Succeeded`], a business refusal ([`Error::BusinessRuleViolation`]
    /// or [`Error::Rejected`]) is [`StepOutcome::Failed`], so compensation fires for
    /// refusals and not only for faults; any other error stays an error (retried by the
    /// runner's policy).
    ///
    /// # Errors
    ///
    /// The execution's error when it is not a business refusal.
    pub fn from_execution(result: Result<ExecutionResult>) -> Result<StepOutcome> {
        match result {
            Ok(_) => Ok(StepOutcome::Succeeded),
            Err(Error::BusinessRuleViolation(reason)) => Ok(StepOutcome::Failed(reason)),
            Err(Error::Rejected(reason)) => Ok(StepOutcome::Failed(reason.to_string())),
            Err(error) => Err(error),
        }
    }
}

/// What an event means to a saga.
#[derive(Debug, Clone, PartialEq)]
pub enum SagaTrigger<I> {
    /// Start the instance `instance` with `input` (nothing happens if it already
    /// started).
    Start {
        /// The instance, unique within the saga (an order id, say).
        instance: String,
        /// What the instance works on.
        input: I,
    },
    /// The answer to the step named `step` of `instance`.
    Reply {
        /// The instance.
        instance: String,
        /// The step answered.
        step: String,
        /// The answer; [`StepOutcome::Pending`] changes nothing.
        outcome: StepOutcome,
    },
}

/// What a step or compensation gets to work with.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct SagaContext<'a, I> {
    /// The instance.
    pub instance: &'a str,
    /// The instance's saga stream.
    pub stream: &'a StreamId,
    /// The instance's input, as it was started.
    pub input: &'a I,
    /// Why the saga is compensating (the failed step's reason, or the timeout), when it
    /// is.
    pub failure: Option<&'a str>,
}

/// A saga definition: a sequence of steps, each with a compensation, over commands of
/// several services.
///
/// The [`SagaManager`] calls [`Saga::perform`] when the saga stream says a step started
/// and [`Saga::compensate`] when it says a compensation started; both dispatch commands
/// through the [`Dispatcher`] they are given (idempotent, causation = the saga event).
/// When a step fails, the steps that succeeded before it are compensated in reverse
/// order; a step that timed out is compensated too (its outcome is unknown), first.
///
/// Compensations must therefore accept "nothing to undo" and "the step's late answer
/// comes after the undo" (a refund of a payment not yet captured voids it, say). They
/// must also leave a mark when there was nothing to undo, because the step's forward
/// action can still arrive after them: the manager checks that a step runs before
/// performing it, but a manager that stalled between that check and its dispatch (or a
/// leader that lost its lease mid-batch) performs it after the timer compensated it. A
/// refund of a payment never requested records a void that refuses the later request;
/// a release of stock never reserved closes the order's reservation.
///
/// `perform` and `compensate` are looked up by step name in the code that runs: the
/// names and order of the steps are recorded when an instance starts, the code behind
/// each name is today's.
pub trait Saga: Send + Sync + 'static {
    /// What an instance works on; stored in its first event.
    type Input: Serialize + DeserializeOwned + Send + Sync + 'static;
    /// What the events it listens to decode into.
    type Event: DeserializeOwned + Send + Sync + 'static;

    /// The saga's name: its streams are `saga/<name>/<instance>`, its manager and timer
    /// run under it. At most 190 bytes, no `/`.
    fn name(&self) -> &str;

    /// The steps, in forward order. Recorded when an instance starts: an instance keeps
    /// the step names, order and timeouts it started with.
    fn steps(&self) -> Vec<SagaStep>;

    /// The event types that start instances or answer steps.
    fn listens_to(&self) -> Vec<String>;

    /// What an event of those types means to this saga, if anything.
    fn on_event(&self, event: &StoredEvent<Self::Event>) -> Option<SagaTrigger<Self::Input>>;

    /// Performs the step named `step`.
    fn perform(
        &self,
        step: &str,
        saga: SagaContext<'_, Self::Input>,
        dispatcher: &mut Dispatcher<'_>,
    ) -> impl Future<Output = Result<StepOutcome>> + Send;

    /// Undoes the step named `step`.
    fn compensate(
        &self,
        step: &str,
        saga: SagaContext<'_, Self::Input>,
        dispatcher: &mut Dispatcher<'_>,
    ) -> impl Future<Output = Result<()>> + Send;
}

/// The longest saga name (its timer runs under `<name>.timeout`).
pub const MAX_SAGA_NAME_LEN: usize = crate::process::MAX_PROCESS_MANAGER_NAME_LEN - 10;

/// The stream of the instance `instance` of the saga `saga`: `saga/<saga>/<instance>`.
///
/// # Errors
///
/// [`Error::InvalidStreamId`] when the result is not a valid stream id (too long, a
/// control character).
pub fn saga_stream(saga: &str, instance: &str) -> Result<StreamId> {
    Ok(StreamId::try_new(format!("saga/{saga}/{instance}"))?)
}

fn check_saga_name(name: &str) -> Result<()> {
    check_manager_name(name)?;
    if name.len() > MAX_SAGA_NAME_LEN {
        return Err(Error::InvalidProjectionName {
            name: name.to_owned(),
            problem: crate::NameProblem::TooLong {
                len: name.len(),
                max: MAX_SAGA_NAME_LEN,
            },
        });
    }
    // `saga/<name>/<instance>` must name one saga only: with a `/` in names, saga `a`
    // instance `b/1` and saga `a/b` instance `1` would share a stream.
    if name.contains('/') {
        return Err(Error::InvalidSaga {
            saga: name.to_owned(),
            reason: "a saga name cannot contain `/`".to_owned(),
        });
    }
    Ok(())
}

fn check_plan(saga: &str, steps: &[SagaStep]) -> Result<()> {
    let mut names = HashSet::new();
    for step in steps {
        if step.name.is_empty() {
            return Err(Error::InvalidSaga {
                saga: saga.to_owned(),
                reason: "a step has an empty name".to_owned(),
            });
        }
        if !names.insert(step.name.as_str()) {
            return Err(Error::InvalidSaga {
                saga: saga.to_owned(),
                reason: format!("two steps are named `{}`", step.name),
            });
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The saga stream

/// The events of a saga stream. Written only by the saga's commands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum SagaEvent {
    /// The instance started with this input and plan.
    Started {
        /// The saga's name.
        saga: String,
        /// The instance.
        instance: String,
        /// The input, as JSON.
        input: Value,
        /// The plan.
        steps: Vec<SagaStep>,
    },
    /// Step `step` started; it times out at `deadline`.
    StepStarted {
        /// The step's index in the plan.
        step: usize,
        /// The step's name.
        name: String,
        /// When it times out, if it can.
        deadline: Option<DateTime<Utc>>,
    },
    /// Step `step` succeeded.
    StepSucceeded {
        /// The step's index.
        step: usize,
    },
    /// Step `step` was refused.
    StepFailed {
        /// The step's index.
        step: usize,
        /// Why.
        reason: String,
    },
    /// Step `step` had no answer by its deadline.
    StepTimedOut {
        /// The step's index.
        step: usize,
        /// The deadline that passed.
        deadline: DateTime<Utc>,
    },
    /// The compensation of step `step` started.
    CompensationStarted {
        /// The step's index.
        step: usize,
        /// The step's name.
        name: String,
    },
    /// Step `step` was compensated.
    StepCompensated {
        /// The step's index.
        step: usize,
    },
    /// Every step succeeded.
    Completed,
    /// The saga failed and every step that needed it was compensated.
    Aborted {
        /// The failure that started the compensation.
        reason: String,
    },
}

/// The stored type names of [`SagaEvent`]s.
pub mod event_types {
    /// [`super::SagaEvent::Started`].
    pub const STARTED: &str = "eventcore.SagaStarted";
    /// [`super::SagaEvent::StepStarted`].
    pub const STEP_STARTED: &str = "eventcore.SagaStepStarted";
    /// [`super::SagaEvent::StepSucceeded`].
    pub const STEP_SUCCEEDED: &str = "eventcore.SagaStepSucceeded";
    /// [`super::SagaEvent::StepFailed`].
    pub const STEP_FAILED: &str = "eventcore.SagaStepFailed";
    /// [`super::SagaEvent::StepTimedOut`].
    pub const STEP_TIMED_OUT: &str = "eventcore.SagaStepTimedOut";
    /// [`super::SagaEvent::CompensationStarted`].
    pub const COMPENSATION_STARTED: &str = "eventcore.SagaCompensationStarted";
    /// [`super::SagaEvent::StepCompensated`].
    pub const STEP_COMPENSATED: &str = "eventcore.SagaStepCompensated";
    /// [`super::SagaEvent::Completed`].
    pub const COMPLETED: &str = "eventcore.SagaCompleted";
    /// [`super::SagaEvent::Aborted`].
    pub const ABORTED: &str = "eventcore.SagaAborted";
}

impl Event for SagaEvent {
    fn event_type(&self) -> &'static str {
        match self {
            SagaEvent::Started { .. } => event_types::STARTED,
            SagaEvent::StepStarted { .. } => event_types::STEP_STARTED,
            SagaEvent::StepSucceeded { .. } => event_types::STEP_SUCCEEDED,
            SagaEvent::StepFailed { .. } => event_types::STEP_FAILED,
            SagaEvent::StepTimedOut { .. } => event_types::STEP_TIMED_OUT,
            SagaEvent::CompensationStarted { .. } => event_types::COMPENSATION_STARTED,
            SagaEvent::StepCompensated { .. } => event_types::STEP_COMPENSATED,
            SagaEvent::Completed => event_types::COMPLETED,
            SagaEvent::Aborted { .. } => event_types::ABORTED,
        }
    }
}

/// Where an instance is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SagaPhase {
    /// Not started (its stream is empty).
    NotStarted,
    /// Step `step` runs.
    Running {
        /// The step's index.
        step: usize,
    },
    /// The compensation of step `step` runs.
    Compensating {
        /// The step's index.
        step: usize,
    },
    /// Every step succeeded.
    Completed,
    /// Failed and compensated.
    Aborted,
}

/// Where a step is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepStatus {
    /// Not reached.
    NotStarted,
    /// Started, waiting for its outcome until `deadline`.
    Running {
        /// When it times out, if it can.
        deadline: Option<DateTime<Utc>>,
    },
    /// Succeeded.
    Succeeded,
    /// Refused.
    Failed(String),
    /// No answer by its deadline; compensated like a success.
    TimedOut,
    /// Being compensated.
    Compensating,
    /// Compensated.
    Compensated,
}

/// An instance folded from its saga stream.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaState {
    saga: String,
    instance: String,
    input: Value,
    steps: Vec<SagaStep>,
    status: Vec<StepStatus>,
    phase: SagaPhase,
    failure: Option<String>,
}

impl Default for SagaState {
    fn default() -> Self {
        SagaState {
            saga: String::new(),
            instance: String::new(),
            input: Value::Null,
            steps: Vec::new(),
            status: Vec::new(),
            phase: SagaPhase::NotStarted,
            failure: None,
        }
    }
}

impl SagaState {
    /// Reads and folds the saga stream `stream`.
    ///
    /// # Errors
    ///
    /// The store's errors; [`Error::Deserialization`] for an event that is not a
    /// [`SagaEvent`].
    pub async fn load(executor: &CommandExecutor, stream: &StreamId) -> Result<SagaState> {
        let snapshot = executor
            .store()
            .read_streams(std::slice::from_ref(stream))
            .await?;
        let mut state = SagaState::default();
        for event in &snapshot.events {
            state.apply(&event.decode::<SagaEvent>()?.payload);
        }
        Ok(state)
    }

    /// Folds one event.
    pub fn apply(&mut self, event: &SagaEvent) {
        match event {
            SagaEvent::Started {
                saga,
                instance,
                input,
                steps,
            } => {
                self.saga.clone_from(saga);
                self.instance.clone_from(instance);
                self.input = input.clone();
                self.steps = steps.clone();
                self.status = vec![StepStatus::NotStarted; steps.len()];
            }
            SagaEvent::StepStarted { step, deadline, .. } => {
                self.set(
                    *step,
                    StepStatus::Running {
                        deadline: *deadline,
                    },
                );
                self.phase = SagaPhase::Running { step: *step };
            }
            SagaEvent::StepSucceeded { step } => self.set(*step, StepStatus::Succeeded),
            SagaEvent::StepFailed { step, reason } => {
                self.set(*step, StepStatus::Failed(reason.clone()));
                self.failure = Some(reason.clone());
            }
            SagaEvent::StepTimedOut { step, deadline } => {
                self.set(*step, StepStatus::TimedOut);
                let name = self.steps.get(*step).map_or("?", |s| s.name.as_str());
                self.failure = Some(format!(
                    "step `{name}` had no answer by {}",
                    deadline.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                ));
            }
            SagaEvent::CompensationStarted { step, .. } => {
                self.set(*step, StepStatus::Compensating);
                self.phase = SagaPhase::Compensating { step: *step };
            }
            SagaEvent::StepCompensated { step } => self.set(*step, StepStatus::Compensated),
            SagaEvent::Completed => self.phase = SagaPhase::Completed,
            SagaEvent::Aborted { .. } => self.phase = SagaPhase::Aborted,
        }
    }

    fn set(&mut self, step: usize, status: StepStatus) {
        if let Some(slot) = self.status.get_mut(step) {
            *slot = status;
        }
    }

    /// Where the instance is.
    pub fn phase(&self) -> SagaPhase {
        self.phase
    }

    /// The saga's name (empty before it started).
    pub fn saga(&self) -> &str {
        &self.saga
    }

    /// The instance's name (empty before it started).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The plan it runs.
    pub fn steps(&self) -> &[SagaStep] {
        &self.steps
    }

    /// Where step `step` is (`None` past the plan).
    pub fn status(&self, step: usize) -> Option<&StepStatus> {
        self.status.get(step)
    }

    /// Where the step named `name` is.
    pub fn status_of(&self, name: &str) -> Option<&StepStatus> {
        let index = self.index_of(name)?;
        self.status.get(index)
    }

    /// Why it is compensating or aborted.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// The input, decoded.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSaga`] when the stored input does not decode into `I`.
    pub fn input<I: DeserializeOwned>(&self) -> Result<I> {
        serde_json::from_value(self.input.clone()).map_err(|error| Error::InvalidSaga {
            saga: self.saga.clone(),
            reason: format!(
                "the stored input of instance `{}` does not decode: {error}",
                self.instance
            ),
        })
    }

    fn index_of(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == name)
    }

    /// The events that start step `step` at `now`, or complete the saga past the plan.
    fn start_step(&self, step: usize, now: DateTime<Utc>) -> SagaEvent {
        match self.steps.get(step) {
            Some(planned) => SagaEvent::StepStarted {
                step,
                name: planned.name.clone(),
                deadline: planned.deadline(now),
            },
            None => SagaEvent::Completed,
        }
    }

    /// The next compensation below `below`: the latest step that succeeded, or the end.
    fn compensate_below(&self, below: usize, reason: &str) -> SagaEvent {
        let next = (0..below)
            .rev()
            .find(|&i| self.status.get(i) == Some(&StepStatus::Succeeded));
        match next {
            Some(step) => SagaEvent::CompensationStarted {
                step,
                name: self.steps[step].name.clone(),
            },
            None => SagaEvent::Aborted {
                reason: reason.to_owned(),
            },
        }
    }
}

/// The marker of the saga commands.
#[doc(hidden)]
#[derive(Debug)]
pub struct SagaStreamSet;

type SagaWrites = Vec<StreamWrite<SagaStreamSet, SagaEvent>>;

fn writes(
    read: &ReadStreams<SagaStreamSet>,
    stream: &StreamId,
    events: Vec<SagaEvent>,
) -> CommandResult<SagaWrites> {
    events
        .into_iter()
        .map(|event| StreamWrite::new(read, stream.clone(), event))
        .collect()
}

/// The saga commands: each reads and writes its saga stream only, folds it into a
/// [`SagaState`], and decides in its inherent `decide`.
macro_rules! saga_command {
    ($name:ident) => {
        impl CommandStreams for $name {
            type StreamSet = SagaStreamSet;

            fn read_streams(&self) -> Vec<StreamId> {
                vec![self.stream.clone()]
            }
        }

        impl CommandLogic for $name {
            type State = SagaState;
            type Event = SagaEvent;

            fn apply(&self, state: &mut SagaState, event: &StoredEvent<SagaEvent>) {
                state.apply(&event.payload);
            }

            fn handle(
                &self,
                read: ReadStreams<SagaStreamSet>,
                state: SagaState,
                _: &mut StreamResolver,
            ) -> CommandResult<SagaWrites> {
                self.decide(&read, state)
            }

            fn command_name(&self) -> &'static str {
                concat!("eventcore::saga::", stringify!($name))
            }
        }
    };
}

/// Starts an instance: its first events.
struct StartSaga {
    stream: StreamId,
    saga: String,
    instance: String,
    input: Value,
    steps: Vec<SagaStep>,
    now: DateTime<Utc>,
}
saga_command!(StartSaga);

impl StartSaga {
    fn decide(
        &self,
        read: &ReadStreams<SagaStreamSet>,
        state: SagaState,
    ) -> CommandResult<SagaWrites> {
        if state.phase != SagaPhase::NotStarted {
            return Ok(Vec::new());
        }
        let mut started = SagaState::default();
        let first = SagaEvent::Started {
            saga: self.saga.clone(),
            instance: self.instance.clone(),
            input: self.input.clone(),
            steps: self.steps.clone(),
        };
        started.apply(&first);
        let next = started.start_step(0, self.now);
        writes(read, &self.stream, vec![first, next])
    }
}

/// Records a step's outcome and moves on: next step, completion or compensation.
struct RecordOutcome {
    stream: StreamId,
    step: String,
    outcome: StepOutcome,
    now: DateTime<Utc>,
}
saga_command!(RecordOutcome);

impl RecordOutcome {
    fn decide(
        &self,
        read: &ReadStreams<SagaStreamSet>,
        state: SagaState,
    ) -> CommandResult<SagaWrites> {
        crate::require!(
            state.phase != SagaPhase::NotStarted,
            "saga `{}` has not started",
            self.stream
        );
        let Some(step) = state.index_of(&self.step) else {
            return Err(Error::BusinessRuleViolation(format!(
                "saga `{}` has no step `{}`",
                self.stream, self.step
            )));
        };
        // A duplicate, or an answer after the deadline: the stream already says what
        // happened to this step.
        if !matches!(state.status[step], StepStatus::Running { .. }) {
            return Ok(Vec::new());
        }
        let events = match &self.outcome {
            StepOutcome::Pending => return Ok(Vec::new()),
            StepOutcome::Succeeded => {
                vec![
                    SagaEvent::StepSucceeded { step },
                    state.start_step(step + 1, self.now),
                ]
            }
            StepOutcome::Failed(reason) => {
                vec![
                    SagaEvent::StepFailed {
                        step,
                        reason: reason.clone(),
                    },
                    state.compensate_below(step, reason),
                ]
            }
        };
        writes(read, &self.stream, events)
    }
}

/// Times a step out if it is still running past its deadline at `now`.
struct TimeOutStep {
    stream: StreamId,
    step: usize,
    now: DateTime<Utc>,
}
saga_command!(TimeOutStep);

impl TimeOutStep {
    fn decide(
        &self,
        read: &ReadStreams<SagaStreamSet>,
        state: SagaState,
    ) -> CommandResult<SagaWrites> {
        let deadline = match state.status.get(self.step) {
            Some(StepStatus::Running {
                deadline: Some(deadline),
            }) if *deadline <= self.now => *deadline,
            _ => return Ok(Vec::new()),
        };
        // Its outcome is unknown: it is compensated first, like a success.
        let events = vec![
            SagaEvent::StepTimedOut {
                step: self.step,
                deadline,
            },
            SagaEvent::CompensationStarted {
                step: self.step,
                name: state.steps[self.step].name.clone(),
            },
        ];
        writes(read, &self.stream, events)
    }
}

/// Records that a compensation is done and starts the next one down, or aborts.
struct RecordCompensated {
    stream: StreamId,
    step: usize,
}
saga_command!(RecordCompensated);

impl RecordCompensated {
    fn decide(
        &self,
        read: &ReadStreams<SagaStreamSet>,
        state: SagaState,
    ) -> CommandResult<SagaWrites> {
        if state.status.get(self.step) != Some(&StepStatus::Compensating) {
            return Ok(Vec::new());
        }
        let reason = state.failure.clone().unwrap_or_default();
        let mut after = state.clone();
        let done = SagaEvent::StepCompensated { step: self.step };
        after.apply(&done);
        let next = after.compensate_below(self.step, &reason);
        writes(read, &self.stream, vec![done, next])
    }
}

// ---------------------------------------------------------------------------------------
// The manager

/// The [`ProcessManager`] of a [`Saga`]: starts instances and records answers from the
/// events the saga listens to, performs the steps and compensations its streams ask for.
/// Run it with [`crate::ProcessManagerRunner`]; deadlines are fired by a [`SagaTimer`].
pub struct SagaManager<S: Saga> {
    saga: S,
    name: String,
    prefix: String,
    clock: Arc<dyn Clock>,
    filter: ProjectionFilter,
    plan: Vec<SagaStep>,
}

impl<S: Saga> SagaManager<S> {
    /// A manager for `saga`, timing steps with `clock`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidProjectionName`] for a saga name that is not valid (or longer than
    /// [`MAX_SAGA_NAME_LEN`]); [`Error::InvalidEventType`] for a listened type that is
    /// not valid; [`Error::InvalidSaga`] for a plan with an empty or repeated step name.
    pub fn new(saga: S, clock: Arc<dyn Clock>) -> Result<Self> {
        let name = saga.name().to_owned();
        check_saga_name(&name)?;
        let plan = saga.steps();
        check_plan(&name, &plan)?;
        let mut types = saga.listens_to();
        types.push(event_types::STEP_STARTED.to_owned());
        types.push(event_types::COMPENSATION_STARTED.to_owned());
        let filter = ProjectionFilter::all().event_types(types)?;
        Ok(SagaManager {
            prefix: format!("saga/{name}/"),
            saga,
            name,
            clock,
            filter,
            plan,
        })
    }

    /// The saga.
    pub fn saga(&self) -> &S {
        &self.saga
    }

    /// The stream of `instance`.
    ///
    /// # Errors
    ///
    /// As [`saga_stream`].
    pub fn stream(&self, instance: &str) -> Result<StreamId> {
        saga_stream(&self.name, instance)
    }

    /// Starts `instance` directly (rather than from an event): writes its first events
    /// unless it already started.
    ///
    /// # Errors
    ///
    /// As [`CommandExecutor::execute`]; [`Error::Serialization`] when the input does not
    /// serialize; [`Error::InvalidStreamId`] for an instance name that makes no valid
    /// stream id.
    pub async fn start(
        &self,
        executor: &CommandExecutor,
        instance: &str,
        input: &S::Input,
        options: ExecutionOptions,
    ) -> Result<ExecutionResult> {
        let command = self.start_command(instance, input)?;
        executor.execute_with(&command, options).await
    }

    fn start_command(&self, instance: &str, input: &S::Input) -> Result<StartSaga> {
        let input = serde_json::to_value(input).map_err(|source| Error::Serialization {
            event_type: event_types::STARTED.to_owned(),
            source,
        })?;
        Ok(StartSaga {
            stream: self.stream(instance)?,
            saga: self.name.clone(),
            instance: instance.to_owned(),
            input,
            steps: self.plan.clone(),
            now: self.clock.now(),
        })
    }

    async fn on_saga_event(
        &self,
        event: &StoredEvent<Value>,
        dispatcher: &mut Dispatcher<'_>,
    ) -> Result<()> {
        let decoded: StoredEvent<SagaEvent> = redecode(event)?;
        let stream = &event.stream_id;
        let (step, name, compensating) = match decoded.payload {
            SagaEvent::StepStarted { step, name, .. } => (step, name, false),
            SagaEvent::CompensationStarted { step, name } => (step, name, true),
            _ => return Ok(()),
        };
        let state = SagaState::load(dispatcher.executor(), stream).await?;
        // Already moved on (a redelivery, or the deadline passed first): nothing to do.
        let still_due = match state.status(step) {
            Some(StepStatus::Running { .. }) => !compensating,
            Some(StepStatus::Compensating) => compensating,
            _ => false,
        };
        if !still_due {
            return Ok(());
        }
        let input: S::Input = state.input()?;
        let context = SagaContext {
            instance: state.instance(),
            stream,
            input: &input,
            failure: if compensating { state.failure() } else { None },
        };
        if compensating {
            self.saga.compensate(&name, context, dispatcher).await?;
            tracing::debug!(saga = %self.name, %stream, step = %name, "step compensated");
            let record = RecordCompensated {
                stream: stream.clone(),
                step,
            };
            dispatcher.dispatch(&record).await?;
        } else {
            let outcome = self.saga.perform(&name, context, dispatcher).await?;
            tracing::debug!(saga = %self.name, %stream, step = %name, ?outcome, "step performed");
            if outcome != StepOutcome::Pending {
                let record = RecordOutcome {
                    stream: stream.clone(),
                    step: name,
                    outcome,
                    now: self.clock.now(),
                };
                dispatcher.dispatch(&record).await?;
            }
        }
        Ok(())
    }

    async fn on_other_event(
        &self,
        event: &StoredEvent<Value>,
        dispatcher: &mut Dispatcher<'_>,
    ) -> Result<()> {
        let decoded: StoredEvent<S::Event> = redecode(event)?;
        match self.saga.on_event(&decoded) {
            None => Ok(()),
            Some(SagaTrigger::Start { instance, input }) => {
                let command = self.start_command(&instance, &input)?;
                dispatcher.dispatch(&command).await?;
                Ok(())
            }
            Some(SagaTrigger::Reply {
                instance,
                step,
                outcome,
            }) => {
                let record = RecordOutcome {
                    stream: self.stream(&instance)?,
                    step,
                    outcome,
                    now: self.clock.now(),
                };
                match dispatcher.dispatch(&record).await {
                    Ok(_) => Ok(()),
                    // An answer for an instance or step this saga does not have: nothing
                    // to record, and retrying will not change that.
                    Err(Error::BusinessRuleViolation(reason)) => {
                        tracing::warn!(saga = %self.name, position = %event.global_position, %reason, "answer ignored");
                        Ok(())
                    }
                    Err(error) => Err(error),
                }
            }
        }
    }
}

impl<S: Saga> ProcessManager for SagaManager<S> {
    type Event = Value;

    fn name(&self) -> &str {
        &self.name
    }

    fn filter(&self) -> ProjectionFilter {
        self.filter.clone()
    }

    async fn handle(
        &mut self,
        event: &StoredEvent<Value>,
        dispatcher: &mut Dispatcher<'_>,
    ) -> Result<()> {
        let stream = event.stream_id.as_str();
        let step_event = matches!(
            event.event_type.as_str(),
            event_types::STEP_STARTED | event_types::COMPENSATION_STARTED
        );
        if stream.starts_with(&self.prefix) {
            self.on_saga_event(event, dispatcher).await
        } else if step_event && stream.starts_with("saga/") {
            // Another saga's steps (this filter asks for every saga's): not for this one.
            Ok(())
        } else {
            self.on_other_event(event, dispatcher).await
        }
    }
}

impl<S: Saga> fmt::Debug for SagaManager<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SagaManager")
            .field("name", &self.name)
            .field("plan", &self.plan)
            .finish_non_exhaustive()
    }
}

fn redecode<T: DeserializeOwned>(event: &StoredEvent<Value>) -> Result<StoredEvent<T>> {
    let payload = T::deserialize(&event.payload).map_err(|source| Error::Deserialization {
        stream: event.stream_id.clone(),
        version: event.stream_version,
        event_type: event.event_type.as_str().to_owned(),
        source,
    })?;
    Ok(StoredEvent::new(
        event.event_id,
        event.stream_id.clone(),
        event.stream_version,
        event.global_position,
        event.event_type.clone(),
        payload,
        event.metadata.clone(),
        event.recorded_at,
    ))
}

// ---------------------------------------------------------------------------------------
// The timer

/// A deadline waiting to pass.
#[derive(Debug, Clone)]
struct Deadline {
    deadline: DateTime<Utc>,
    cause: EventId,
    correlation_id: CorrelationId,
}

/// Fires a saga's step deadlines.
///
/// The deadlines are in the saga streams (each `StepStarted` carries its own), so they
/// survive any restart: a timer rebuilds what is pending by reading the saga's step
/// events from the start of the log, then follows it. When a deadline passes on its
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
        let query = LogQuery::from_start()
            .stream_prefix(format!("saga/{saga}/"))
            .event_types([
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
        })
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
        let mut read = 0;
        loop {
            let query = self
                .query
                .clone()
                .starting_after(self.position)
                .limit(Self::BATCH_SIZE);
            // How far the read looked comes from the read itself, never from a head
            // read before it (which may be ahead of what the read could see).
            let page = self.executor.store().read_log(&query).await?;
            if page.events.is_empty() {
                self.scanned = page.scanned.max(self.scanned);
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
            let command = TimeOutStep {
                stream: stream.clone(),
                step,
                now,
            };
            match dispatcher.dispatch(&command).await {
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
