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
//! - [`SagaManager`]: the [`ProcessManager`](crate::ProcessManager) that performs the steps and compensations
//!   the stream asks for and records the answers. Run it with a
//!   [`crate::ProcessManagerRunner`] (durable checkpoint, one leader, idempotent
//!   dispatch).
//! - [`SagaTimer`]: fires the deadlines recorded in the saga streams, through a [`Clock`]
//!   that tests control ([`ManualClock`]).

mod commands;
mod definition;
mod manager;
mod state;
mod timer;

pub use crate::clock::{Clock, ManualClock, SleepFuture, SystemClock};
pub use definition::{
    MAX_SAGA_NAME_LEN, Saga, SagaContext, SagaStep, SagaTrigger, StepOutcome, saga_stream,
};
pub use manager::SagaManager;
pub use state::{SagaEvent, SagaPhase, SagaState, StepStatus, event_types};
pub use timer::SagaTimer;
