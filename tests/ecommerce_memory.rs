//! The distributed e-commerce scenarios and crash-resume on the in-memory store.

eventcore_tests::ecommerce_tests!(eventcore_tests::ecommerce::memory_stores, 400);
