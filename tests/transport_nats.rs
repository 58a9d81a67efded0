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
