//! The transport conformance suite against the in-memory broker, with in-memory stores
//! for the services of the runner checks.

use std::sync::Arc;

use eventcore::distributed::{EventPublisher, EventSubscriber, ServiceId};
use eventcore::testing::transport_conformance::TransportHarness;
use eventcore_memory::{InMemoryBroker, InMemoryEventStore};

/// A fresh broker per check.
struct MemoryHarness(InMemoryBroker);

#[async_trait::async_trait]
impl TransportHarness for MemoryHarness {
    type Store = InMemoryEventStore;

    async fn publisher(&self, service: &ServiceId) -> Arc<dyn EventPublisher> {
        Arc::new(self.0.publisher(service.clone()))
    }

    async fn subscriber(&self) -> Arc<dyn EventSubscriber> {
        Arc::new(self.0.clone())
    }

    async fn store(&self) -> InMemoryEventStore {
        InMemoryEventStore::new()
    }

    async fn lose_last_messages(&self, service: &ServiceId, messages: usize) {
        self.0.set_unsynced(service, messages);
        self.0.crash();
        self.0.set_unsynced(service, 0);
    }
}

eventcore::transport_conformance_tests!(|| async { MemoryHarness(InMemoryBroker::new()) });
