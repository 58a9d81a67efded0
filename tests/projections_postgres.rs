//! Checkpoints and the projection runner on PostgreSQL, each check in a fresh schema.

mod projections {
    eventcore::projection_conformance_tests!(
        eventcore_tests::postgres::fresh_store,
        #[cfg_attr(
            not(postgres_tests),
            ignore = "set DATABASE_URL (scripts/test provisions one) to run the PostgreSQL tests"
        )]
    );
}
