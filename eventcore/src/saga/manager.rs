//! The process manager that performs a saga's steps and compensations.

use std::fmt;
use std::sync::Arc;

use super::commands::{RecordCompensated, RecordOutcome, StartSaga};
use super::definition::{
    Saga, SagaContext, SagaStep, SagaTrigger, StepOutcome, check_plan, check_saga_name, saga_stream,
};
use super::state::{SagaEvent, SagaState, StepStatus, event_types};
use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::event::{Event, RawEvent, StoredEvent, decode_payload};
use crate::executor::{CommandExecutor, ExecutionOptions, ExecutionResult};
use crate::process::{Dispatcher, ProcessManager};
use crate::projection::ProjectionFilter;
use crate::types::StreamId;

/// The [`ProcessManager`] of a [`Saga`]: starts instances and records answers from the
/// events the saga listens to, performs the steps and compensations its streams ask for.
/// Run it with [`crate::ProcessManagerRunner`] (and, for answers from other services, on
/// a subscription: it is also an `EventHandler` with the `distributed` feature);
/// deadlines are fired by a [`SagaTimer`](super::SagaTimer).
pub struct SagaManager<S: Saga> {
    saga: S,
    name: String,
    prefix: String,
    clock: Arc<dyn Clock>,
    filter: ProjectionFilter,
    plan: Vec<SagaStep>,
    /// The event types the saga listens to (starts and answers), for its handler of
    /// other services' events.
    #[cfg_attr(not(feature = "distributed"), allow(dead_code))]
    listens: Vec<String>,
}

impl<S: Saga> SagaManager<S> {
    /// A manager for `saga`, timing steps with `clock`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidProjectionName`] for a saga name that is not valid (or longer than
    /// [`MAX_SAGA_NAME_LEN`](super::MAX_SAGA_NAME_LEN)); [`Error::InvalidEventType`] for a listened type that is
    /// not valid; [`Error::InvalidSaga`] for a plan with an empty or repeated step name.
    pub fn new(saga: S, clock: Arc<dyn Clock>) -> Result<Self> {
        let name = saga.name().to_owned();
        check_saga_name(&name)?;
        let plan = saga.steps();
        check_plan(&name, &plan)?;
        let listens = saga.listens_to();
        let mut types = listens.clone();
        types.push(event_types::STEP_STARTED.to_owned());
        types.push(event_types::COMPENSATION_STARTED.to_owned());
        let filter = ProjectionFilter::all().with_event_types(types)?;
        Ok(SagaManager {
            prefix: format!("saga/{name}/"),
            saga,
            name,
            clock,
            filter,
            plan,
            listens,
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
        event: &StoredEvent<RawEvent>,
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
        event: &StoredEvent<RawEvent>,
        dispatcher: &mut Dispatcher<'_>,
    ) -> Result<()> {
        let decoded: StoredEvent<S::Event> = redecode(event)?;
        self.on_decoded(&decoded, dispatcher).await
    }

    async fn on_decoded(
        &self,
        decoded: &StoredEvent<S::Event>,
        dispatcher: &mut Dispatcher<'_>,
    ) -> Result<()> {
        let event = decoded;
        match self.saga.on_event(decoded) {
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
                        tracing::warn!(saga = %self.name, stream = %event.stream_id, position = %event.global_position, %reason, "answer ignored");
                        Ok(())
                    }
                    Err(error) => Err(error),
                }
            }
        }
    }
}

impl<S: Saga> ProcessManager for SagaManager<S> {
    type Event = RawEvent;

    fn name(&self) -> &str {
        &self.name
    }

    fn filter(&self) -> ProjectionFilter {
        self.filter.clone()
    }

    async fn handle(
        &mut self,
        event: &StoredEvent<RawEvent>,
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

/// A saga across services: the answers of other services (and the events that start
/// instances, when another service publishes them) arrive over a subscription. Run the
/// manager twice in the service that owns the saga: with a
/// [`crate::ProcessManagerRunner`] on the service's own log (its step events, and the
/// triggers it writes itself), and with a
/// [`SubscriptionRunner`](crate::distributed::SubscriptionRunner) on the other
/// services' topics. Each published event whose type the saga
/// [listens to](Saga::listens_to) is decoded as `S::Event` and given to
/// [`Saga::on_event`]; what it triggers is written once, however often the event is
/// delivered (the subscription's keys). Events of other types are acknowledged and
/// ignored.
///
/// A step that asks another service for something writes the request as an event of
/// its own service in [`Saga::perform`] (through the dispatcher) and returns
/// [`StepOutcome::Pending`]; the answer comes back here, or the step's deadline passes.
#[cfg(feature = "distributed")]
impl<S: Saga> crate::distributed::EventHandler for SagaManager<S> {
    async fn handle(
        &mut self,
        event: &crate::distributed::DistributedEvent,
        dispatcher: &mut Dispatcher<'_>,
    ) -> Result<()> {
        if !self.listens.iter().any(|t| t == event.event_type.as_str()) {
            return Ok(());
        }
        let decoded: StoredEvent<S::Event> = event.decode()?;
        self.on_decoded(&decoded, dispatcher).await
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

fn redecode<T: Event>(event: &StoredEvent<RawEvent>) -> Result<StoredEvent<T>> {
    let payload = decode_payload(
        &event.stream_id,
        event.stream_version,
        &event.event_type,
        event.payload.payload(),
    )?;
    Ok(event.with_payload(payload))
}
