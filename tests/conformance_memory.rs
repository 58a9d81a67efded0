//! The backend conformance suite against the in-memory store.

mod conformance {
    eventcore::event_store_conformance_tests!(|| async {
        eventcore_memory::InMemoryEventStore::new()
    });
}
