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
