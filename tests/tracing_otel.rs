//! One trace across two services (feature `opentelemetry`), read back from the
//! OpenTelemetry SDK's in-memory exporter: a request span in `orders` executes a
//! command; its events carry the command span's context through the store and the
//! broker; billing's consumer span for each of them is a child of that command span
//! (remote parent), billing's command a child of the consumer span, and billing's own
//! events carry billing's command context. The publisher's send span links to the
//! contexts it sends. The same run over the in-memory broker and over a real NATS
//! JetStream server (NATS_URL), where the context crosses as `traceparent` /
//! `tracestate` headers.

use std::collections::HashMap;
use std::sync::Arc;

use eventcore::distributed::{EventPublisher, EventSubscriber};
use eventcore::{CommandExecutor, EventStore, LogQuery, StreamId};
use eventcore_memory::{InMemoryBroker, InMemoryEventStore};
use eventcore_tests::nats;
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
    let broker = InMemoryBroker::new();
    one_trace_across(
        Arc::new(broker.publisher(two_services::orders_service())),
        Arc::new(broker),
    )
    .await;
}

#[tokio::test]
#[cfg_attr(
    not(nats_tests),
    ignore = "needs a NATS server: set NATS_URL (scripts/test starts one)"
)]
async fn the_trace_crosses_nats_in_the_message_headers() {
    let transport = nats::fresh_transport().await;
    one_trace_across(
        Arc::new(transport.publisher(two_services::orders_service())),
        Arc::new(transport.subscriber()),
    )
    .await;
}

/// Spans exported to memory from this test's thread.
struct Exported {
    exporter: InMemorySpanExporter,
    provider: SdkTracerProvider,
    _default: tracing::subscriber::DefaultGuard,
}

impl Exported {
    /// Installs an OpenTelemetry layer exporting to memory, for this thread only: the
    /// runtime is current-thread, so every task of the test runs on it.
    fn install() -> Self {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("eventcore-tests")));
        let _default = tracing::subscriber::set_default(subscriber);
        Exported {
            exporter,
            provider,
            _default,
        }
    }

    /// Every span finished so far.
    fn spans(&self) -> Vec<SpanData> {
        self.provider.force_flush().expect("flushed");
        self.exporter.get_finished_spans().expect("spans")
    }
}

/// Orders places an order inside a `POST /orders` request span (two events) and
/// publishes them through `publishing`; returns orders' store.
async fn place_and_publish(publishing: Arc<dyn EventPublisher>) -> InMemoryEventStore {
    let orders_store = InMemoryEventStore::new();
    let orders: Arc<dyn EventStore> = Arc::new(orders_store.clone());
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
    let mut publisher =
        two_services::publisher_on(&orders, Arc::new(orders_store.clone()), publishing);
    publisher.publish_available().await.expect("publishes");
    orders_store
}

/// Billing consumes through `subscribing` until it has invoiced both events; returns
/// billing's store.
async fn bill(subscribing: Arc<dyn EventSubscriber>) -> Arc<dyn EventStore> {
    let billing: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let mut runner = two_services::subscriber_on(&billing, subscribing);
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
    billing
}

/// Runs orders' command, publishes through `publishing`, runs billing's subscriber on
/// `subscribing`, and asserts the trace structure of what the exporter received.
async fn one_trace_across(
    publishing: Arc<dyn EventPublisher>,
    subscribing: Arc<dyn EventSubscriber>,
) {
    let exported = Exported::install();
    let orders_store = place_and_publish(publishing).await;
    let billing = bill(subscribing).await;
    let spans = exported.spans();

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

/// The trace id and span id a relay between the services put in the first message.
const RELAY_TRACE: &str = "5b8efff798038103d269b633813fc60c";
const RELAY_SPAN: &str = "eee19b7ec3c1b174";

#[tokio::test]
#[cfg_attr(
    not(nats_tests),
    ignore = "needs a NATS server: set NATS_URL (scripts/test starts one)"
)]
async fn the_consumer_continues_the_trace_in_the_headers_and_ignores_malformed_ones() {
    let exported = Exported::install();
    let transport = nats::fresh_transport().await;
    let orders = two_services::orders_service();
    let orders_store = place_and_publish(Arc::new(transport.publisher(orders.clone()))).await;
    // A relay rewrote the first message's context to put itself in the trace, and
    // damaged the second's.
    let mut seen = 0;
    nats::rewrite_messages(&transport, &orders, |headers, _| {
        seen += 1;
        let traceparent = if seen == 1 {
            format!("00-{RELAY_TRACE}-{RELAY_SPAN}-01")
        } else {
            "00-not-a-context".to_owned()
        };
        headers.insert("traceparent", traceparent.as_str());
        headers.insert("tracestate", "relay=1");
    })
    .await;
    assert_eq!(seen, 2);
    bill(Arc::new(transport.subscriber())).await;
    let spans = exported.spans();

    let placed = orders_store
        .read_all(&LogQuery::new())
        .await
        .expect("reads");
    let written_in = |index: usize| {
        placed[index]
            .metadata
            .trace_context
            .clone()
            .expect("a trace context")
    };
    let consumer_of = |event: &eventcore::RecordedEvent| {
        let id = event.event_id.to_string();
        spans
            .iter()
            .find(|s| {
                s.name == "process invoices"
                    && s.attributes.iter().any(|kv| {
                        kv.key.as_str() == "messaging.message.id" && kv.value.to_string() == id
                    })
            })
            .unwrap_or_else(|| panic!("a consumer span for {id}: {spans:#?}"))
    };
    // The first: a child of the relay's span, in the relay's trace.
    let relayed = consumer_of(&placed[0]);
    assert_eq!(hex_trace(relayed.span_context.trace_id()), RELAY_TRACE);
    assert_eq!(hex_span(relayed.parent_span_id), RELAY_SPAN);
    assert!(relayed.parent_span_is_remote);
    assert_eq!(
        relayed.span_context.trace_state().header(),
        "relay=1",
        "the tracestate came along"
    );
    // The second: the malformed header is ignored; the context written with the event
    // stands.
    let damaged = consumer_of(&placed[1]);
    let own = written_in(1);
    assert_eq!(hex_trace(damaged.span_context.trace_id()), own.trace_id());
    assert_eq!(hex_span(damaged.parent_span_id), own.parent_id());
    assert_ne!(own.trace_id(), RELAY_TRACE);
}
