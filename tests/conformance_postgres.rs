//! The backend conformance suite against PostgreSQL, each check in a fresh schema.

mod conformance {
    eventcore::event_store_conformance_tests!(
        eventcore_tests::postgres::fresh_store,
        #[cfg_attr(
            not(postgres_tests),
            ignore = "set DATABASE_URL (scripts/test provisions one) to run the PostgreSQL tests"
        )]
    );
}
