//! What a process manager's commands inherit from the event they react to: its custom
//! metadata fields (a tenant) and its trace context, so neither ends at the first hop.
//! With the `opentelemetry` feature on but no OpenTelemetry layer installed, the stored
//! trace context passes through unchanged.

use std::sync::Arc;

use eventcore::{
    CommandExecutor, Dispatcher, EventStore, ExecutionOptions, LogQuery, ProcessManager,
    ProcessManagerRunner, ProjectionFilter, StoredEvent, StreamId, TraceContext,
};
use eventcore_memory::InMemoryEventStore;
use eventcore_tests::two_services::{OrderEvent, PlaceOrder};

const TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// Mirrors every order placed on `order-*` as one on `mirror-*`.
struct Mirror;

impl ProcessManager for Mirror {
    type Event = OrderEvent;

    fn name(&self) -> &str {
        "mirror"
    }

    fn filter(&self) -> ProjectionFilter {
        ProjectionFilter::all().with_stream_prefix("order-")
    }

    async fn handle(
        &mut self,
        event: &StoredEvent<OrderEvent>,
        dispatcher: &mut Dispatcher<'_>,
    ) -> eventcore::Result<()> {
        if let OrderEvent::OrderPlaced { order, amount } = &event.payload {
            dispatcher
                .dispatch(&PlaceOrder {
                    order: StreamId::try_new(format!("mirror-{order}"))?,
                    id: order.clone(),
                    amount: *amount,
                })
                .await?;
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_process_managers_commands_inherit_custom_fields_and_the_trace() {
    let store = InMemoryEventStore::new();
    let executor = CommandExecutor::new(store.clone());
    let trace = TraceContext::new(TRACE)
        .expect("valid")
        .with_tracestate("congo=t61rcWkgMzE")
        .expect("valid");
    executor
        .execute_with(
            &PlaceOrder {
                order: StreamId::try_new("order-o1").expect("valid"),
                id: "o1".to_owned(),
                amount: 5,
            },
            ExecutionOptions::new()
                .with_custom("tenant", "acme")
                .with_trace_context(trace.clone()),
        )
        .await
        .expect("places");
    let mut runner = ProcessManagerRunner::new(Mirror, executor.clone(), Arc::new(store.clone()));
    runner.catch_up().await.expect("handles");

    let mirrored = store
        .read_all(&LogQuery::new().with_stream_prefix("mirror-"))
        .await
        .expect("reads");
    assert!(!mirrored.is_empty(), "the manager dispatched");
    for event in &mirrored {
        assert_eq!(
            event.metadata.custom.get("tenant"),
            Some(&serde_json::Value::from("acme")),
            "{:?}",
            event.metadata
        );
        assert_eq!(event.metadata.trace_context.as_ref(), Some(&trace));
        assert_eq!(event.metadata.actor.as_deref(), Some("mirror"));
    }
}

/// A saga of one step that never answers: only its deadline moves it.
struct Waits;

impl eventcore::saga::Saga for Waits {
    type Input = String;
    type Event = OrderEvent;

    fn name(&self) -> &str {
        "waits"
    }

    fn steps(&self) -> Vec<eventcore::saga::SagaStep> {
        vec![
            eventcore::saga::SagaStep::new("answer")
                .with_timeout(std::time::Duration::from_secs(10)),
        ]
    }

    fn listens_to(&self) -> Vec<String> {
        vec!["OrderPlaced".to_owned()]
    }

    fn on_event(
        &self,
        event: &StoredEvent<OrderEvent>,
    ) -> Option<eventcore::saga::SagaTrigger<String>> {
        let OrderEvent::OrderPlaced { order, .. } = &event.payload else {
            return None;
        };
        Some(eventcore::saga::SagaTrigger::Start {
            instance: order.clone(),
            input: order.clone(),
        })
    }

    async fn perform(
        &self,
        _: &str,
        _: eventcore::saga::SagaContext<'_, String>,
        _: &mut Dispatcher<'_>,
    ) -> eventcore::Result<eventcore::saga::StepOutcome> {
        Ok(eventcore::saga::StepOutcome::Pending)
    }

    async fn compensate(
        &self,
        _: &str,
        _: eventcore::saga::SagaContext<'_, String>,
        _: &mut Dispatcher<'_>,
    ) -> eventcore::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_saga_timeout_inherits_the_custom_fields_and_the_trace_of_its_step() {
    let store = InMemoryEventStore::new();
    let executor = CommandExecutor::new(store.clone());
    let trace = TraceContext::new(TRACE).expect("valid");
    executor
        .execute_with(
            &PlaceOrder {
                order: StreamId::try_new("order-o1").expect("valid"),
                id: "o1".to_owned(),
                amount: 5,
            },
            ExecutionOptions::new()
                .with_custom("tenant", "acme")
                .with_trace_context(trace.clone()),
        )
        .await
        .expect("places");
    let clock = eventcore::saga::ManualClock::new(chrono::Utc::now());
    let manager = eventcore::saga::SagaManager::new(Waits, Arc::new(clock.clone())).expect("valid");
    let mut runner = ProcessManagerRunner::new(manager, executor.clone(), Arc::new(store.clone()));
    runner.catch_up().await.expect("starts the saga");
    let mut timer =
        eventcore::saga::SagaTimer::new("waits", executor.clone(), Arc::new(clock.clone()))
            .expect("valid");
    timer.catch_up().await.expect("reads the deadline");
    clock.advance(std::time::Duration::from_secs(11));
    assert_eq!(timer.fire_due().await.expect("fires"), 1);

    let stream = eventcore::saga::saga_stream("waits", "o1").expect("valid");
    let events = store
        .read_streams(std::slice::from_ref(&stream))
        .await
        .expect("reads")
        .events;
    let timed_out: Vec<_> = events
        .iter()
        .skip_while(|e| e.event_type.as_str() != eventcore::saga::event_types::STEP_TIMED_OUT)
        .collect();
    assert!(!timed_out.is_empty(), "the step timed out: {events:?}");
    for event in timed_out {
        assert_eq!(
            event.metadata.trace_context.as_ref(),
            Some(&trace),
            "{} continues the step's trace",
            event.event_type.as_str()
        );
        assert_eq!(
            event.metadata.custom.get("tenant"),
            Some(&serde_json::Value::from("acme")),
            "{}",
            event.event_type.as_str()
        );
    }
}
