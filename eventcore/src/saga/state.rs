//! The saga stream: the events it holds and the state folded from them.

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::definition::SagaStep;
use crate::error::{Error, Result};
use crate::event::Event;
use crate::executor::CommandExecutor;
use crate::types::StreamId;

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
    pub(super) saga: String,
    pub(super) instance: String,
    pub(super) input: Value,
    pub(super) steps: Vec<SagaStep>,
    pub(super) status: Vec<StepStatus>,
    pub(super) phase: SagaPhase,
    pub(super) failure: Option<String>,
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

    pub(super) fn set(&mut self, step: usize, status: StepStatus) {
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

    pub(super) fn index_of(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == name)
    }

    /// The events that start step `step` at `now`, or complete the saga past the plan.
    pub(super) fn start_step(&self, step: usize, now: DateTime<Utc>) -> SagaEvent {
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
    pub(super) fn compensate_below(&self, below: usize, reason: &str) -> SagaEvent {
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
