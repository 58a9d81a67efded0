//! Checkpoints and the projection runner on the in-memory store.

mod projections {
    eventcore::projection_conformance_tests!(|| async {
        eventcore_memory::InMemoryEventStore::new()
    });
}
