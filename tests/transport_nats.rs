//! The transport conformance suite against a real NATS JetStream server (NATS_URL;
//! `scripts/test` starts one), each check under a subject prefix of its own, with
//! in-memory stores for the services of the runner checks.

use std::sync::Arc;

use eventcore::distributed::{EventPublisher, EventSubscriber, ServiceId};
use eventcore::testing::transport_conformance::TransportHarness;
use eventcore_memory::InMemoryEventStore;
use eventcore_nats::NatsTransport;
use eventcore_tests::nats;

/// A fresh prefix per check on the shared server.
struct NatsHarness(NatsTransport);

#[async_trait::async_trait]
impl TransportHarness for NatsHarness {
    type Store = InMemoryEventStore;

    async fn publisher(&self, service: &ServiceId) -> Arc<dyn EventPublisher> {
        Arc::new(self.0.publisher(service.clone()))
    }

    async fn subscriber(&self) -> Arc<dyn EventSubscriber> {
        Arc::new(self.0.subscriber())
    }

    async fn store(&self) -> InMemoryEventStore {
        InMemoryEventStore::new()
    }

    async fn lose_last_messages(&self, service: &ServiceId, messages: usize) {
        nats::lose_last_messages(&self.0, service, messages).await;
    }
}

eventcore::transport_conformance_tests!(
    || async { NatsHarness(nats::fresh_transport().await) },
    #[cfg_attr(
        not(nats_tests),
        ignore = "set NATS_URL (scripts/test starts a server) to run the NATS tests"
    )]
);

/// Publishers sharing a JetStream context share its bound on publishes in flight
/// (async-nats: 5,000 unanswered acknowledgements by default), and a publisher waiting
/// for room must take its answers meanwhile, or it waits for good for room its own
/// unanswered publishes hold: one publisher whose window is wider than a bound of 10,
/// then six sending 1,000 events each at once on the default bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(nats_tests),
    ignore = "set NATS_URL (scripts/test starts a server) to run the NATS tests"
)]
async fn publishers_sharing_a_context_beyond_its_bound_all_finish() {
    use eventcore::distributed::{DistributedEvent, Publication, Topic};
    use eventcore::{
        EventId, EventMetadata, EventPayload, EventType, GlobalPosition, RecordedEvent, StreamId,
        StreamVersion,
    };

    const SERVICES: usize = 6;
    const EVENTS: u64 = 1_000;
    let transport = nats::fresh_transport().await;
    let mut publishing = Vec::new();
    for n in 0..SERVICES {
        let service = ServiceId::try_new(format!("svc{n}")).expect("valid");
        let topic = Topic::try_new(format!("svc{n}-events")).expect("valid");
        let publisher = transport.publisher(service.clone());
        publisher
            .declare_topics(std::slice::from_ref(&topic))
            .await
            .expect("declares");
        let batch: Vec<Publication> = (1..=EVENTS)
            .map(|position| {
                let recorded = RecordedEvent::new(
                    EventId::new(),
                    StreamId::try_new(format!("s-{}", position % 7)).expect("valid"),
                    StreamVersion::new(position),
                    GlobalPosition::new(position),
                    EventType::try_new("Happened").expect("valid"),
                    EventPayload::from_json(format!(r#"{{"n":{position}}}"#)).expect("valid"),
                    Arc::new(EventMetadata::default()),
                    chrono::Utc::now(),
                );
                let event =
                    DistributedEvent::from_recorded(&recorded, &service, chrono::Utc::now())
                        .expect("readable");
                Publication::new(topic.clone(), event)
            })
            .collect();
        publishing.push(async move {
            publisher.publish(&batch).await?;
            publisher.last_published().await
        });
    }
    // And one publisher alone whose window is wider than its context's bound.
    let client = async_nats::connect(nats::nats_url())
        .await
        .expect("connects");
    let narrow = async_nats::jetstream::ContextBuilder::new()
        .max_ack_inflight(10)
        .build(client);
    let lone = eventcore_nats::NatsTransport::with_context(narrow, transport.config().clone())
        .publisher(ServiceId::try_new("lone").expect("valid"));
    let topic = Topic::try_new("lone-events").expect("valid");
    lone.declare_topics(std::slice::from_ref(&topic))
        .await
        .expect("declares");
    let batch: Vec<Publication> = (1..=50)
        .map(|position| {
            let recorded = RecordedEvent::new(
                EventId::new(),
                StreamId::try_new("lone").expect("valid"),
                StreamVersion::new(position),
                GlobalPosition::new(position),
                EventType::try_new("Happened").expect("valid"),
                EventPayload::from_json("{}").expect("valid"),
                Arc::new(EventMetadata::default()),
                chrono::Utc::now(),
            );
            let service = ServiceId::try_new("lone").expect("valid");
            let event = DistributedEvent::from_recorded(&recorded, &service, chrono::Utc::now())
                .expect("readable");
            Publication::new(topic.clone(), event)
        })
        .collect();
    tokio::time::timeout(std::time::Duration::from_secs(60), lone.publish(&batch))
        .await
        .expect("the publisher waited for room its own unanswered publishes held")
        .expect("publishes");
    assert_eq!(
        lone.last_published().await.expect("reads"),
        Some(GlobalPosition::new(50))
    );

    let ends = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        futures::future::join_all(publishing),
    )
    .await
    .expect("the publishers waited for each other's places in flight");
    for end in ends {
        assert_eq!(
            end.expect("publishes"),
            Some(GlobalPosition::new(EVENTS)),
            "every event held"
        );
    }
}
