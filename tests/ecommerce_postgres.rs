//! The distributed e-commerce scenarios and crash-resume on PostgreSQL, each run in a
//! fresh schema.

eventcore_tests::ecommerce_tests!(
    eventcore_tests::ecommerce::postgres_stores,
    60,
    #[cfg_attr(
        not(postgres_tests),
        ignore = "set DATABASE_URL (scripts/test provisions one) to run the PostgreSQL tests"
    )]
);
