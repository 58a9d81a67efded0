//! The four commands that alone write a saga stream, each deciding from the folded
//! state.

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::definition::{SagaStep, StepOutcome};
use super::state::{SagaEvent, SagaPhase, SagaState, StepStatus};
use crate::command::{CommandLogic, CommandStreams, ReadStreams, StreamResolver, StreamWrite};
use crate::error::{CommandResult, Error};
use crate::event::StoredEvent;
use crate::types::StreamId;

/// The marker of the saga commands.
#[derive(Debug)]
pub(crate) struct SagaStreamSet;

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
pub(super) struct StartSaga {
    pub(super) stream: StreamId,
    pub(super) saga: String,
    pub(super) instance: String,
    pub(super) input: Value,
    pub(super) steps: Vec<SagaStep>,
    pub(super) now: DateTime<Utc>,
}
saga_command!(StartSaga);

impl StartSaga {
    pub(super) fn decide(
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
pub(super) struct RecordOutcome {
    pub(super) stream: StreamId,
    pub(super) step: String,
    pub(super) outcome: StepOutcome,
    pub(super) now: DateTime<Utc>,
}
saga_command!(RecordOutcome);

impl RecordOutcome {
    pub(super) fn decide(
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
pub(super) struct TimeOutStep {
    pub(super) stream: StreamId,
    pub(super) step: usize,
    pub(super) now: DateTime<Utc>,
}
saga_command!(TimeOutStep);

impl TimeOutStep {
    pub(super) fn decide(
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
pub(super) struct RecordCompensated {
    pub(super) stream: StreamId,
    pub(super) step: usize,
}
saga_command!(RecordCompensated);

impl RecordCompensated {
    pub(super) fn decide(
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
