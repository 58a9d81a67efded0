//! A full lock table (SQLSTATE 53200, "out of shared memory") is not a failure that a
//! retry fixes: the same request fails the same way until an operator acts, and the
//! executor's retries only add load. It is reported as a non-retryable error, and the
//! command fails at once instead of being resent for seconds.
//!
//! A binary of its own: filling the server's lock table would disturb any test running
//! beside it (cargo runs test binaries one after another).

use eventcore::{AppendRequest, CommandExecutor, Error, EventData, EventMetadata, EventStore};
use eventcore::{ExpectedVersion, StreamAppend, StreamId};
use eventcore_postgres::sqlx::{self, Connection, PgConnection};
use eventcore_tests::bank::{BankEvent, Open};
use eventcore_tests::postgres::{database_url, fresh_store};

fn stream(name: &str) -> StreamId {
    StreamId::try_new(name).expect("valid")
}

fn deposit(amount: i64) -> EventData {
    EventData::from_event(&BankEvent::Deposited { amount }, EventMetadata::default())
        .expect("serializes")
}

fn two_streams() -> AppendRequest {
    AppendRequest::new()
        .with_stream(StreamAppend::new(
            stream("lt-a"),
            ExpectedVersion::Any,
            vec![deposit(1)],
        ))
        .with_stream(StreamAppend::new(
            stream("lt-b"),
            ExpectedVersion::Any,
            vec![deposit(1)],
        ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs PostgreSQL: set DATABASE_URL (scripts/test provisions one)"
)]
async fn a_full_lock_table_is_reported_as_not_retryable() {
    let store = fresh_store().await;
    store.append(two_streams()).await.expect("room to append");
    let executor = CommandExecutor::new(store.clone());

    // Another session takes session-level advisory locks until the server refuses one:
    // the shared lock table is then full (session locks outlive the failed attempt).
    let mut hog = PgConnection::connect(&database_url())
        .await
        .expect("connect");
    sqlx::query(
        "CREATE FUNCTION pg_temp.fill_lock_table() RETURNS bigint LANGUAGE plpgsql AS $$
         DECLARE n bigint := 0;
         BEGIN
             LOOP
                 BEGIN
                     PERFORM pg_advisory_lock(917, n::integer);
                     n := n + 1;
                 EXCEPTION WHEN out_of_memory THEN
                     RETURN n;
                 END;
             END LOOP;
         END $$",
    )
    .execute(&mut hog)
    .await
    .expect("create");
    let taken: i64 = sqlx::query_scalar("SELECT pg_temp.fill_lock_table()")
        .fetch_one(&mut hog)
        .await
        .expect("fill");
    assert!(taken > 100, "took {taken} locks before the table was full");

    let refused = store.append(two_streams()).await;
    let executed = executor
        .execute(&Open {
            account: stream("lt-new"),
            initial: 5,
        })
        .await;
    // Free the table before asserting, so a failure here disturbs nothing else.
    sqlx::query("SELECT pg_advisory_unlock_all()")
        .execute(&mut hog)
        .await
        .expect("unlock");
    assert!(
        matches!(
            refused,
            Err(Error::Backend {
                retryable: false,
                ..
            })
        ),
        "{refused:?}"
    );
    let sqlstate = match &refused {
        Err(error) => std::error::Error::source(error)
            .and_then(|source| source.downcast_ref::<sqlx::Error>())
            .and_then(|e| e.as_database_error())
            .and_then(|e| e.code().map(|c| c.into_owned())),
        Ok(_) => None,
    };
    assert_eq!(sqlstate.as_deref(), Some("53200"));
    assert!(
        matches!(
            executed,
            Err(Error::Backend {
                retryable: false,
                ..
            })
        ),
        "the executor does not resend it: {executed:?}"
    );
    store
        .append(two_streams())
        .await
        .expect("appends again once the table has room");
}
