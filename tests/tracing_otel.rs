//! One trace across two services (feature `opentelemetry`), read back from the
//! OpenTelemetry SDK's in-memory exporter: a request span in `orders` executes a
//! command; its events carry the command span's context through the store and the
//! broker; billing's consumer span for each of them is a child of that command span
//! (remote parent), billing's command a child of the consumer span, and billing's own
//! events carry billing's command context. The publisher's send span links to the
//! contexts it sends.

use std::collections::HashMap;
use std::sync::Arc;

use eventcore::{CommandExecutor, EventStore, LogQuery, StreamId};
use eventcore_memory::{InMemoryBroker, InMemoryEventStore};
use eventcore_tests::two_services::{self, PlaceOrder};
use opentelemetry::trace::{SpanId, SpanKind, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

fn hex_trace(id: TraceId) -> String {
    format!("{id}")
}

fn hex_span(id: SpanId) -> String {
    format!("{id}")
}

#[tokio::test]
async fn a_command_its_publication_and_the_consumer_and_its_command_share_one_trace() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("eventcore-tests")));
    // This test's thread only; the runtime is current-thread, so every task is on it.
    let _default = tracing::subscriber::set_default(subscriber);

    let broker = InMemoryBroker::new();
    let orders_store = InMemoryEventStore::new();
    let orders: Arc<dyn EventStore> = Arc::new(orders_store.clone());
    let billing: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let request = tracing::info_span!("POST /orders");
    CommandExecutor::new(orders.clone())
        .execute(&PlaceOrder {
            order: StreamId::try_new("order-o1").expect("valid"),
            id: "o1".to_owned(),
            amount: 42,
        })
        .instrument(request)
        .await
        .expect("places");
    let mut publisher = two_services::publisher(&orders, Arc::new(orders_store.clone()), &broker);
    publisher.publish_available().await.expect("publishes");
    let mut runner = two_services::subscriber(&billing, &broker);
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(async move {
        runner
            .run(async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await
    });
    // Placed and confirmed: two events, an invoice effect each.
    two_services::wait_for_invoices(&billing, 2).await;
    stop.send(true).expect("running");
    running.await.expect("joins").expect("ran");
    provider.force_flush().expect("flushed");
    let spans = exporter.get_finished_spans().expect("spans");

    let named =
        |name: &str| -> Vec<&SpanData> { spans.iter().filter(|s| s.name == name).collect() };
    let by_id: HashMap<SpanId, &SpanData> = spans
        .iter()
        .map(|s| (s.span_context.span_id(), s))
        .collect();
    let [request] = named("POST /orders")[..] else {
        panic!("one request span: {spans:#?}");
    };
    let trace = request.span_context.trace_id();
    let executes = named("eventcore.execute");
    let place = executes
        .iter()
        .find(|s| s.parent_span_id == request.span_context.span_id())
        .expect("the command's span is a child of the request span");
    assert_eq!(place.span_context.trace_id(), trace);

    // The orders' events carry the command span's context.
    let placed = orders_store
        .read_all(&LogQuery::new())
        .await
        .expect("reads");
    assert_eq!(placed.len(), 2);
    for event in &placed {
        let context = event
            .metadata
            .trace_context
            .as_ref()
            .expect("a trace context");
        assert_eq!(context.trace_id(), hex_trace(trace));
        assert_eq!(context.parent_id(), hex_span(place.span_context.span_id()));
    }

    // Billing's consumer spans: children of the orders command span, across the broker.
    let consumers = named("process invoices");
    assert_eq!(consumers.len(), 2, "one per event: {spans:#?}");
    for consumer in &consumers {
        assert_eq!(consumer.span_context.trace_id(), trace);
        assert_eq!(consumer.parent_span_id, place.span_context.span_id());
        assert!(
            consumer.parent_span_is_remote,
            "the parent came with the message"
        );
        assert_eq!(consumer.span_kind, SpanKind::Consumer);
        let attribute = |key: &str| {
            consumer
                .attributes
                .iter()
                .find(|kv| kv.key.as_str() == key)
                .map(|kv| kv.value.to_string())
        };
        assert_eq!(
            attribute("messaging.operation.type").as_deref(),
            Some("process")
        );
        assert_eq!(
            attribute("messaging.consumer.group.name").as_deref(),
            Some("invoices")
        );
        assert!(attribute("messaging.message.id").is_some());
    }

    // Billing's commands: children of the consumer spans, in the same trace.
    let invoices: Vec<_> = executes
        .iter()
        .filter(|s| {
            by_id
                .get(&s.parent_span_id)
                .is_some_and(|parent| parent.name == "process invoices")
        })
        .collect();
    assert_eq!(invoices.len(), 2, "{spans:#?}");
    assert!(invoices.iter().all(|s| s.span_context.trace_id() == trace));

    // Billing's events carry its own commands' contexts.
    let invoice_ids: Vec<String> = invoices
        .iter()
        .map(|s| hex_span(s.span_context.span_id()))
        .collect();
    let billed = billing
        .read_all(&LogQuery::new().with_stream_prefix("invoice-"))
        .await
        .expect("reads");
    assert_eq!(billed.len(), 2);
    for event in &billed {
        let context = event
            .metadata
            .trace_context
            .as_ref()
            .expect("a trace context");
        assert_eq!(context.trace_id(), hex_trace(trace));
        assert!(
            invoice_ids.iter().any(|id| id == context.parent_id()),
            "{} is not one of billing's command spans {invoice_ids:?}",
            context.parent_id()
        );
    }

    // The send span is a producer span of its own, linked to what it sent.
    let [send] = named("send orders")[..] else {
        panic!("one send span: {spans:#?}");
    };
    assert_eq!(send.span_kind, SpanKind::Producer);
    assert!(
        send.links
            .links
            .iter()
            .any(|link| link.span_context.span_id() == place.span_context.span_id()),
        "the send span links to the command that wrote the events: {send:#?}"
    );
}
