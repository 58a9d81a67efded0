//! The transport conformance suite against the in-memory broker.

use std::sync::Arc;

use eventcore::distributed::{EventPublisher, EventSubscriber, ServiceId};
use eventcore::testing::transport_conformance::TransportHarness;
use eventcore_memory::InMemoryBroker;

/// A fresh broker per check.
struct MemoryHarness(InMemoryBroker);

#[async_trait::async_trait]
impl TransportHarness for MemoryHarness {
    async fn publisher(&self, service: &ServiceId) -> Arc<dyn EventPublisher> {
        Arc::new(self.0.publisher(service.clone()))
    }

    async fn subscriber(&self) -> Arc<dyn EventSubscriber> {
        Arc::new(self.0.clone())
    }
}

eventcore::transport_conformance_tests!(|| async { MemoryHarness(InMemoryBroker::new()) });
