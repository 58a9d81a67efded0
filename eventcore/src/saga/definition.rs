//! What a saga is: its steps, what starts an instance, and what each step dispatches.

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::event::{Event, StoredEvent};
use crate::executor::ExecutionResult;
use crate::process::{Dispatcher, check_name_len};
use crate::types::StreamId;

/// One step of a saga: a name, unique in the saga, and optionally how long it may wait
/// for its answer before it times out and the saga compensates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaStep {
    pub(super) name: String,
    pub(super) timeout_ms: Option<u64>,
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

    pub(super) fn deadline(&self, started: DateTime<Utc>) -> Option<DateTime<Utc>> {
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
/// The [`SagaManager`](super::SagaManager) calls [`Saga::perform`] when the saga stream says a step started
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
    type Event: Event;

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

pub(super) fn check_saga_name(name: &str) -> Result<()> {
    check_name_len(name, MAX_SAGA_NAME_LEN)?;
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

pub(super) fn check_plan(saga: &str, steps: &[SagaStep]) -> Result<()> {
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
