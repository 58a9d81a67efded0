//! What the PostgreSQL store guarantees beyond the shared conformance suite: the prefix
//! property with a transaction held open after it reserved its positions, several pools
//! writing at once, migrations, schema isolation, immutability, and typed errors for a
//! refused or lost connection.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use eventcore::{
    AppendRequest, CommandExecutor, Error, EventData, EventId, EventMetadata, EventStore,
    ExecutionOptions, ExpectedVersion, GlobalPosition, IdempotencyKey, LogQuery, RecordedEvent,
    StreamAppend, StreamId,
};
use eventcore_postgres::sqlx::{self, Connection, PgConnection, Row};
use eventcore_postgres::{PostgresConfig, PostgresEventStore, SchemaName};
use eventcore_tests::bank::{BankEvent, Open, Transfer, account, audit, read_log};
use eventcore_tests::postgres::{database_url, fresh_schema, fresh_store, store_in};

const HANG_GUARD: Duration = Duration::from_secs(120);
/// How long a wait that must not complete is watched. A correct store never completes
/// it, whatever the time.
const PENDING_WINDOW: Duration = Duration::from_millis(300);

fn stream(name: &str) -> StreamId {
    StreamId::try_new(name).expect("valid")
}

fn deposit(amount: i64) -> EventData {
    EventData::from_event(&BankEvent::Deposited { amount }, EventMetadata::default())
        .expect("serializes")
}

async fn append_any(
    store: &impl EventStore,
    s: &StreamId,
    events: Vec<EventData>,
) -> Vec<GlobalPosition> {
    store
        .append(AppendRequest::single(
            s.clone(),
            ExpectedVersion::Any,
            events,
        ))
        .await
        .expect("append")
        .events
        .iter()
        .map(|e| e.global_position)
        .collect()
}

fn positions(events: &[RecordedEvent]) -> Vec<u64> {
    events.iter().map(|e| e.global_position.value()).collect()
}

/// Calls the append function inside a transaction the test controls, so the
/// transaction can be held open after it reserved its positions.
async fn append_in_open_transaction(
    conn: &mut PgConnection,
    schema: &SchemaName,
    s: &StreamId,
    event: &EventData,
) -> i64 {
    sqlx::query("BEGIN")
        .execute(&mut *conn)
        .await
        .expect("begin");
    let sql = format!(
        "SELECT positions FROM \"{schema}\".eventcore_append($1, $2, NULL, $3, $4, $5, $6::text[]::jsonb[], $7::text[]::jsonb[])"
    );
    let row: (Vec<i64>,) = sqlx::query_as(&sql)
        .bind(vec![s.as_str()])
        .bind(vec![-1_i64])
        .bind(vec![1_i32])
        .bind(vec![event.event_id.as_uuid()])
        .bind(vec![event.event_type.as_str()])
        .bind(vec![event.payload.as_str()])
        .bind(vec![
            serde_json::to_string(&event.metadata).expect("metadata"),
        ])
        .fetch_one(&mut *conn)
        .await
        .expect("append in the open transaction");
    row.0[0]
}

/// The same, through the one statement the store sends for a single event at an exact
/// version (`sql/append_one.sql`), to a stream that has no events yet.
async fn append_one_in_open_transaction(
    conn: &mut PgConnection,
    schema: &SchemaName,
    s: &StreamId,
    event: &EventData,
) -> i64 {
    sqlx::query("BEGIN")
        .execute(&mut *conn)
        .await
        .expect("begin");
    let sql = include_str!("../eventcore-postgres/src/sql/append_one.sql")
        .replace("{schema}", &format!("\"{schema}\""))
        .replace("{schema_name}", schema.as_str());
    let row = sqlx::query(&sql)
        .bind(s.as_str())
        .bind(0_i64)
        .bind(event.event_id.as_uuid())
        .bind(event.event_type.as_str())
        .bind(event.payload.as_str())
        .bind(serde_json::to_string(&event.metadata).expect("metadata"))
        .fetch_one(&mut *conn)
        .await
        .expect("append in the open transaction");
    let actual: i64 = row.try_get(0).expect("actual");
    assert_eq!(actual, 0, "the stream was empty");
    let position: Option<i64> = row.try_get(1).expect("position");
    position.expect("appended")
}

async fn raw_connection() -> PgConnection {
    PgConnection::connect(&database_url())
        .await
        .expect("connect")
}

/// Whether `future` is still pending after the pending window.
async fn stays_pending<F: std::future::Future>(future: F) -> bool {
    tokio::time::timeout(PENDING_WINDOW, future).await.is_err()
}

async fn held_reservation_scenario(commit: bool, one_statement: bool) {
    let schema = fresh_schema();
    let store = store_in(&schema).await;
    let (a, b, held_stream) = (stream("a"), stream("b"), stream("held"));
    let first = append_any(&store, &a, vec![deposit(1)]).await[0];

    let mut conn = raw_connection().await;
    let held_event = deposit(100);
    let held_position = if one_statement {
        append_one_in_open_transaction(&mut conn, &schema, &held_stream, &held_event).await
    } else {
        append_in_open_transaction(&mut conn, &schema, &held_stream, &held_event).await
    };
    assert!(held_position as u64 > first.value());

    // Later appends commit while the earlier reservation is still open.
    let later = [
        append_any(&store, &b, vec![deposit(2)]).await[0],
        append_any(&store, &a, vec![deposit(3)]).await[0],
    ];
    assert!(later.iter().all(|p| p.value() > held_position as u64));

    let visible = store.read_all(&LogQuery::new()).await.expect("read");
    assert_eq!(
        positions(&visible),
        vec![first.value()],
        "nothing at or after an open reservation may be visible"
    );
    assert_eq!(store.head_position().await.expect("head"), Some(first));
    // A live reader after `first` must keep waiting: what is committed is held back.
    let mut waiter = std::pin::pin!(store.wait_for_events(Some(first)));
    assert!(stays_pending(&mut waiter).await);

    let reader = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut after = Some(first);
            let expected = if commit { 3 } else { 2 };
            while seen.len() < expected {
                let batch = store
                    .read_all(&LogQuery::new().with_after(after))
                    .await
                    .expect("read");
                if batch.is_empty() {
                    store.wait_for_events(after).await.expect("wait");
                    continue;
                }
                after = batch.last().map(|e| e.global_position);
                seen.extend(batch);
            }
            seen
        })
    };

    let end = if commit { "COMMIT" } else { "ROLLBACK" };
    sqlx::query(end)
        .execute(&mut conn)
        .await
        .expect("end the held transaction");
    tokio::time::timeout(HANG_GUARD, &mut waiter)
        .await
        .expect("the waiter wakes once the reservation ends")
        .expect("wait");

    let seen = tokio::time::timeout(HANG_GUARD, reader)
        .await
        .expect("the reader must not stall")
        .expect("reader");
    let mut expected = vec![];
    if commit {
        expected.push(held_position as u64);
    }
    expected.extend(later.iter().map(|p| p.value()));
    assert_eq!(positions(&seen), expected, "in position order, each once");
    if commit {
        assert_eq!(seen[0].event_id, held_event.event_id);
    }
    let everything = store.read_all(&LogQuery::new()).await.expect("read");
    assert_eq!(everything.len(), if commit { 4 } else { 3 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "set DATABASE_URL (scripts/test provisions one) to run the PostgreSQL tests"
)]
async fn a_reader_stops_below_an_open_reservation_and_gets_it_in_order_after_commit() {
    held_reservation_scenario(true, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "set DATABASE_URL (scripts/test provisions one) to run the PostgreSQL tests"
)]
async fn the_one_statement_append_holds_readers_back_the_same_way() {
    held_reservation_scenario(true, true).await;
    held_reservation_scenario(false, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "set DATABASE_URL (scripts/test provisions one) to run the PostgreSQL tests"
)]
async fn a_rolled_back_reservation_stalls_no_reader() {
    held_reservation_scenario(false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "set DATABASE_URL (scripts/test provisions one) to run the PostgreSQL tests"
)]
async fn writers_on_several_pools_and_a_live_reader_see_every_event_once_in_order() {
    const POOLS: usize = 3;
    const WRITERS_PER_POOL: usize = 4;
    const APPENDS: usize = 40;
    let schema = fresh_schema();
    let mut stores = Vec::new();
    for _ in 0..POOLS {
        stores.push(store_in(&schema).await);
    }
    let reader_store = store_in(&schema).await;
    let total = POOLS * WRITERS_PER_POOL * APPENDS * 2;

    let writers_done = Arc::new(tokio::sync::Notify::new());
    let reader = {
        let writers_done = writers_done.clone();
        tokio::spawn(async move {
            let mut seen: Vec<RecordedEvent> = Vec::new();
            let mut after = None;
            let mut done = std::pin::pin!(writers_done.notified());
            let mut finished = false;
            loop {
                let batch = reader_store
                    .read_all(&LogQuery::new().with_after(after).with_limit(50))
                    .await
                    .expect("read");
                if batch.is_empty() {
                    if finished {
                        return seen;
                    }
                    tokio::select! {
                        waited = reader_store.wait_for_events(after) => waited.expect("wait"),
                        () = &mut done => finished = true,
                    }
                    continue;
                }
                for event in batch {
                    if let Some(last) = after {
                        assert!(event.global_position > last, "out of order");
                    }
                    after = Some(event.global_position);
                    seen.push(event);
                }
            }
        })
    };

    let mut tasks = Vec::new();
    for (p, store) in stores.iter().enumerate() {
        for w in 0..WRITERS_PER_POOL {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..APPENDS {
                    let x = stream(&format!("acct-{}", (p + w + i) % 7));
                    let y = stream(&format!("acct-{}", (p * w + i) % 7 + 7));
                    let (ex, ey) = (deposit(1), deposit(-1));
                    ids.extend([ex.event_id, ey.event_id]);
                    store
                        .append(
                            AppendRequest::new()
                                .with_stream(StreamAppend::new(x, ExpectedVersion::Any, vec![ex]))
                                .with_stream(StreamAppend::new(y, ExpectedVersion::Any, vec![ey])),
                        )
                        .await
                        .expect("append");
                }
                ids
            }));
        }
    }
    let mut written: HashSet<EventId> = HashSet::new();
    for task in tasks {
        written.extend(task.await.expect("writer"));
    }
    writers_done.notify_one();
    let seen = tokio::time::timeout(HANG_GUARD, reader)
        .await
        .expect("reader finishes")
        .expect("reader");
    let seen_ids: HashSet<EventId> = seen.iter().map(|e| e.event_id).collect();
    assert_eq!(seen_ids.len(), seen.len(), "an event was delivered twice");
    assert_eq!(written.len(), total);
    assert_eq!(
        seen_ids, written,
        "the live reader missed or invented events"
    );
    let log = read_log(&stores[0]).await;
    assert_eq!(log, seen, "what the live reader saw is the final log");
    // Within each stream, versions follow global order.
    let mut last_version = std::collections::HashMap::new();
    for event in &log {
        let previous = last_version.insert(event.stream_id.clone(), event.stream_version.value());
        assert_eq!(
            previous.unwrap_or(0) + 1,
            event.stream_version.value(),
            "{}",
            event.stream_id
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "set DATABASE_URL (scripts/test provisions one) to run the PostgreSQL tests"
)]
async fn migrating_twice_and_from_two_processes_at_once_is_safe() {
    let schema = fresh_schema();
    let config = eventcore_tests::postgres::config(&schema);
    let one = PostgresEventStore::connect_with(config.clone())
        .await
        .expect("connect");
    let two = PostgresEventStore::connect_with(config)
        .await
        .expect("connect");
    let (a, b) = tokio::join!(one.migrate(), two.migrate());
    a.expect("first migrator");
    b.expect("second migrator");
    one.migrate().await.expect("again");
    append_any(&two, &stream("s"), vec![deposit(1)]).await;
    assert_eq!(read_log(&one).await.len(), 1);
}

#[tokio::test]
#[cfg_attr(
    not(postgres_tests),
    ignore = "set DATABASE_URL (scripts/test provisions one) to run the PostgreSQL tests"
)]
async fn every_append_answer_carries_the_recording_time_reads_return() {
    let store = fresh_store().await;
    let (a, b) = (stream("rec-a"), stream("rec-b"));
    // One event at an exact version (the one-statement path), several streams (the
    // function), and a repeat under the same key (deduplicated).
    let single = store
        .append(AppendRequest::single(
            a.clone(),
            ExpectedVersion::NoStream,
            vec![deposit(1)],
        ))
        .await
        .expect("single");
    let key = IdempotencyKey::try_new("rec-key").expect("key");
    let request = AppendRequest::new()
        .with_stream(StreamAppend::new(
            a.clone(),
            ExpectedVersion::Exact(eventcore::StreamVersion::new(1)),
            vec![deposit(2), deposit(3)],
        ))
        .with_stream(StreamAppend::new(
            b.clone(),
            ExpectedVersion::NoStream,
            vec![deposit(4)],
        ))
        .with_idempotency_key(key);
    let multi = store.append(request.clone()).await.expect("multi");
    let repeat = store.append(request).await.expect("repeat");
    assert!(repeat.deduplicated);
    assert_eq!(repeat.events, multi.events);
    let log = store.read_all(&LogQuery::new()).await.expect("read");
    assert_eq!(log.len(), 4);
    for appended in single.events.iter().chain(&multi.events) {
        let read = log
            .iter()
            .find(|e| e.event_id == appended.event_id)
            .expect("stored");
        assert_eq!(appended.recorded_at, Some(read.recorded_at));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "set DATABASE_URL (scripts/test provisions one) to run the PostgreSQL tests"
)]
async fn connections_the_server_ended_cost_one_failed_statement_at_most() {
    // A pool of twelve, ten of them kept out of it between statements; this store's
    // connections carry a name of their own, so that only they are ended.
    let schema = fresh_schema();
    let name = format!("kept_{}", uuid::Uuid::new_v4().simple());
    let options = database_url()
        .parse::<sqlx::postgres::PgConnectOptions>()
        .expect("url")
        .application_name(&name);
    let store = PostgresEventStore::connect_with(
        PostgresConfig::from_options(options)
            .with_schema(schema.clone())
            .with_max_connections(12),
    )
    .await
    .expect("connect");
    store.migrate().await.expect("migrate");
    // Ten appends at once: ten connections end up kept.
    let appends: Vec<_> = (0..10)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move {
                append_any(&store, &stream(&format!("k-{n}")), vec![deposit(1)]).await
            })
        })
        .collect();
    for append in appends {
        append.await.expect("task");
    }
    let mut admin = raw_connection().await;
    let ended: Vec<(bool,)> = sqlx::query_as(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(&name)
    .fetch_all(&mut admin)
    .await
    .expect("terminate");
    assert!(ended.len() >= 2, "the store's connections were ended");
    // The first statement may find its connection ended (a retryable error); every kept
    // connection then goes back to the pool, which checks it: the next ones go through.
    let mut failures = 0;
    for n in 0..20 {
        let result = store
            .append(AppendRequest::single(
                stream(&format!("after-{n}")),
                ExpectedVersion::NoStream,
                vec![deposit(1)],
            ))
            .await;
        if let Err(error) = result {
            assert!(error.is_retryable(), "{error}");
            failures += 1;
        }
    }
    assert!(failures <= 1, "{failures} statements failed");
    // Commands retry through it.
    let executor = CommandExecutor::new(store.clone());
    executor
        .execute(&Open {
            account: account(1),
            initial: 10,
        })
        .await
        .expect("open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "set DATABASE_URL (scripts/test provisions one) to run the PostgreSQL tests"
)]
async fn kept_connections_leave_the_pool_to_its_other_users_and_close_with_the_store() {
    // Four connections, two kept at most: under eight appending tasks the pool still
    // serves the application (a short acquire timeout would fail it otherwise).
    let schema = fresh_schema();
    let store = PostgresEventStore::connect_with(
        eventcore_tests::postgres::config(&schema)
            .with_max_connections(4)
            .with_acquire_timeout(Duration::from_secs(5)),
    )
    .await
    .expect("connect");
    store.migrate().await.expect("migrate");
    let writers: Vec<_> = (0..8)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..40 {
                    append_any(&store, &stream(&format!("busy-{n}-{i}")), vec![deposit(1)]).await;
                }
            })
        })
        .collect();
    for _ in 0..40 {
        sqlx::query("SELECT 1")
            .execute(store.pool())
            .await
            .expect("the pool serves the application while the store is busy");
    }
    for writer in writers {
        writer.await.expect("writer");
    }
    let log = store.read_all(&LogQuery::new()).await.expect("read");
    assert_eq!(log.len(), 320);
    tokio::time::timeout(HANG_GUARD, store.close())
        .await
        .expect("closing does not wait for the kept connections");
    assert!(store.pool().is_closed());
}

#[tokio::test]
#[cfg_attr(
    not(postgres_tests),
    ignore = "set DATABASE_URL (scripts/test provisions one) to run the PostgreSQL tests"
)]
async fn two_schemas_in_one_database_do_not_see_each_other() {
    let (left, right) = (fresh_store().await, fresh_store().await);
    let s = stream("shared-name");
    append_any(&left, &s, vec![deposit(1), deposit(2)]).await;
    assert!(
        right
            .read_all(&LogQuery::new())
            .await
            .expect("read")
            .is_empty()
    );
    assert_eq!(right.head_position().await.expect("head"), None);
    assert!(
        right
            .read_streams(std::slice::from_ref(&s))
            .await
            .expect("read")
            .events
            .is_empty()
    );
    // Each schema numbers its own log.
    assert_eq!(append_any(&right, &s, vec![deposit(3)]).await[0].value(), 1);
}

#[tokio::test]
#[cfg_attr(
    not(postgres_tests),
    ignore = "set DATABASE_URL (scripts/test provisions one) to run the PostgreSQL tests"
)]
async fn the_database_refuses_to_change_or_remove_stored_events() {
    let store = fresh_store().await;
    let s = stream("ledger");
    append_any(&store, &s, vec![deposit(5)]).await;
    let table = format!("\"{}\".events", store.schema());
    for statement in [
        format!("UPDATE {table} SET payload = '{{}}'"),
        format!("DELETE FROM {table}"),
        format!("TRUNCATE {table}"),
    ] {
        let error = sqlx::query(&statement)
            .execute(store.pool())
            .await
            .expect_err("must be refused");
        let code = error
            .as_database_error()
            .and_then(|e| e.code())
            .map(|c| c.into_owned());
        assert_eq!(code.as_deref(), Some("ECI01"), "{statement}: {error}");
    }
    let events = read_log(&store).await;
    assert_eq!(events.len(), 1);
    assert_eq!(
        events[0].decode::<BankEvent>().expect("decode").payload,
        BankEvent::Deposited { amount: 5 }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "set DATABASE_URL (scripts/test provisions one) to run the PostgreSQL tests"
)]
async fn a_connection_lost_mid_append_is_a_retryable_error_and_writes_nothing() {
    let schema = fresh_schema();
    let store = store_in(&schema).await;
    let s = stream("cut");
    // Hold the stream's lock from outside, so the append blocks inside the database.
    let mut blocker = raw_connection().await;
    sqlx::query(
        "SELECT pg_advisory_lock(hashtextextended('eventcore.stream.' || $1 || '/' || $2, 0))",
    )
    .bind(schema.as_str())
    .bind(s.as_str())
    .execute(&mut blocker)
    .await
    .expect("lock");
    let append = {
        let (store, s) = (store.clone(), s.clone());
        tokio::spawn(async move {
            store
                .append(AppendRequest::single(
                    s,
                    ExpectedVersion::NoStream,
                    vec![deposit(1)],
                ))
                .await
        })
    };
    // Observe (not time) the append waiting for the lock, then cut its connection.
    let pid: i32 = loop {
        // The store's statement (either append path) names the schema.
        let found: Option<(i32,)> = sqlx::query_as(
            "SELECT pid FROM pg_stat_activity
              WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid()
                AND position($1 IN query) > 0",
        )
        .bind(schema.as_str())
        .fetch_optional(&mut blocker)
        .await
        .expect("pg_stat_activity");
        if let Some((pid,)) = found {
            break pid;
        }
        tokio::task::yield_now().await;
    };
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .execute(&mut blocker)
        .await
        .expect("terminate");
    // The store now looks whether the append committed, queueing behind whoever holds
    // the stream (this blocker): let go.
    sqlx::query("SELECT pg_advisory_unlock_all()")
        .execute(&mut blocker)
        .await
        .expect("unlock");
    let result = tokio::time::timeout(HANG_GUARD, append)
        .await
        .expect("the append returns")
        .expect("task");
    match result {
        Err(error @ Error::Backend { .. }) => assert!(error.is_retryable(), "{error}"),
        other => panic!("expected a retryable backend error, got {other:?}"),
    }
    assert!(read_log(&store).await.is_empty(), "nothing half-written");
    assert_eq!(store.head_position().await.expect("head"), None);
    // The pool recovers: the next append works.
    append_any(&store, &s, vec![deposit(2)]).await;
}

#[tokio::test]
#[cfg_attr(
    not(postgres_tests),
    ignore = "set DATABASE_URL (scripts/test provisions one) to run the PostgreSQL tests"
)]
async fn refused_connections_bad_urls_and_unmigrated_schemas_are_typed_errors() {
    // Nothing listens on port 1.
    let refused = PostgresEventStore::connect("postgres://eventcore@127.0.0.1:1/postgres").await;
    assert!(
        matches!(refused, Err(eventcore_postgres::Error::Connect { .. })),
        "{refused:?}"
    );
    assert!(matches!(
        PostgresEventStore::connect("postgres://[::1:bad").await,
        Err(eventcore_postgres::Error::InvalidUrl { .. })
    ));
    assert!(matches!(
        SchemaName::try_new("Robert'); DROP TABLE events;--"),
        Err(eventcore_postgres::Error::InvalidSchemaName { .. })
    ));

    // A pool that cannot reach its server: operations fail with retryable errors.
    let unreachable = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy("postgres://eventcore@127.0.0.1:1/postgres")
        .expect("lazy pool");
    let store = PostgresEventStore::from_pool(unreachable, SchemaName::default());
    let error = store
        .append(AppendRequest::single(
            stream("s"),
            ExpectedVersion::Any,
            vec![deposit(1)],
        ))
        .await
        .expect_err("no server");
    assert!(error.is_retryable(), "{error}");

    // A schema that was never migrated: a clear, non-retryable error.
    let config = PostgresConfig::from_url(&database_url())
        .expect("url")
        .with_schema(fresh_schema());
    let unmigrated = PostgresEventStore::connect_with(config)
        .await
        .expect("connect");
    let error = unmigrated
        .read_streams(&[stream("s")])
        .await
        .expect_err("no tables");
    assert!(!error.is_retryable());
    assert!(error.to_string().contains("not migrated"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "set DATABASE_URL (scripts/test provisions one) to run the PostgreSQL tests"
)]
async fn racing_executions_with_one_key_on_two_pools_charge_once() {
    let schema = fresh_schema();
    let (one, two) = (store_in(&schema).await, store_in(&schema).await);
    // Racing within each pool too, so that executions of one executor conflict.
    let executor_one = CommandExecutor::new(one.clone()).with_stream_queue(false);
    let executor_two = CommandExecutor::new(two).with_stream_queue(false);
    for n in 0..2 {
        executor_one
            .execute(&Open {
                account: account(n),
                initial: 100,
            })
            .await
            .expect("open");
    }
    let key = IdempotencyKey::try_new("invoice-7").expect("valid");
    let barrier = Arc::new(tokio::sync::Barrier::new(8));
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let executor = if i % 2 == 0 {
                executor_one.clone()
            } else {
                executor_two.clone()
            };
            let (key, barrier) = (key.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                executor
                    .execute_with(
                        &Transfer {
                            from: account(0),
                            to: account(1),
                            amount: 30,
                        },
                        ExecutionOptions::new().with_idempotency_key(key),
                    )
                    .await
            })
        })
        .collect();
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.expect("task").expect("execution"));
    }
    assert_eq!(results.iter().filter(|r| !r.deduplicated).count(), 1);
    assert!(
        results
            .iter()
            .all(|r| r.events_written == results[0].events_written)
    );
    let audit = audit(&one, 2).await;
    assert_eq!(audit.total, 200);
    assert_eq!(audit.events, 4, "two opens and one transfer");
}

#[tokio::test]
#[cfg_attr(
    not(postgres_tests),
    ignore = "set DATABASE_URL (scripts/test provisions one) to run the PostgreSQL tests"
)]
async fn a_mark_taken_after_the_reader_looked_does_not_hide_the_log() {
    // A reader reads the sequence, then the marks. A mark above what it read (an append
    // that took its mark in between) must not hide anything the reader may see.
    let schema = fresh_schema();
    let store = store_in(&schema).await;
    let s = stream("visible");
    let written = append_any(&store, &s, vec![deposit(1), deposit(2)]).await;
    let mut conn = raw_connection().await;
    sqlx::query("BEGIN")
        .execute(&mut conn)
        .await
        .expect("begin");
    sqlx::query("SELECT pg_advisory_xact_lock_shared(hashtext('eventcore.reserved.' || $1), $2)")
        .bind(schema.as_str())
        .bind(i32::try_from(written[1].value() + 5).expect("small"))
        .execute(&mut conn)
        .await
        .expect("mark");
    let seen = store.read_all(&LogQuery::new()).await.expect("read");
    assert_eq!(
        positions(&seen),
        written.iter().map(|p| p.value()).collect::<Vec<_>>()
    );
    assert_eq!(store.head_position().await.expect("head"), Some(written[1]));
    sqlx::query("ROLLBACK")
        .execute(&mut conn)
        .await
        .expect("rollback");
}

#[tokio::test]
#[cfg_attr(
    not(postgres_tests),
    ignore = "set DATABASE_URL (scripts/test provisions one) to run the PostgreSQL tests"
)]
async fn a_session_that_is_not_read_committed_is_refused() {
    let schema = fresh_schema();
    let store = store_in(&schema).await;
    append_any(&store, &stream("s"), vec![deposit(1)]).await;
    // A pool the user built, whose sessions default to REPEATABLE READ: readers could
    // skip events, so the store refuses to read or append through it.
    let options = PostgresConfig::from_url(&database_url())
        .expect("url")
        .with_schema(schema.clone());
    let connect: sqlx::postgres::PgConnectOptions = database_url()
        .parse::<sqlx::postgres::PgConnectOptions>()
        .expect("url")
        .options([("default_transaction_isolation", "repeatable\\ read")]);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(connect)
        .await
        .expect("connect");
    let strict = PostgresEventStore::from_pool(pool, options.schema().clone());
    for error in [
        strict
            .read_all(&LogQuery::new())
            .await
            .expect_err("refused"),
        strict
            .append(AppendRequest::single(
                stream("s"),
                ExpectedVersion::Any,
                vec![deposit(2)],
            ))
            .await
            .expect_err("refused"),
    ] {
        assert!(!error.is_retryable());
        assert!(error.to_string().contains("READ COMMITTED"), "{error}");
    }
    assert_eq!(read_log(&store).await.len(), 1);
}

/// The statement in `eventcore-postgres/src/sql/<file>` as the store sends it for
/// `schema` (comment lines dropped, the schema filled in).
fn store_statement(file: &str, schema: &SchemaName) -> String {
    let path = format!(
        "{}/../eventcore-postgres/src/sql/{file}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .lines()
        .filter(|line| !line.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("{schema}", &format!("\"{}\"", schema.as_str()))
        .replace("{schema_name}", schema.as_str())
}

/// The store's statements are prepared, and PostgreSQL may keep a generic plan for a
/// connection's life, made while the table was small and not analyzed yet. The reads of
/// streams must reach each stream through its index in such a plan too, not scan the
/// whole table and join it by hash (measured before: 1.9 ms a read of one stream in a
/// table of 64,000 events, 60 times the indexed read). And the server must keep the
/// generic plan rather than plan every call again (measured before: 70–95 µs of
/// planning a call, more than the execution).
#[tokio::test]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs PostgreSQL: set DATABASE_URL (scripts/test provisions one)"
)]
async fn stream_statements_keep_a_generic_plan_that_uses_the_index() {
    let schema = fresh_schema();
    let store = store_in(&schema).await;
    for n in 0..12 {
        append_any(
            &store,
            &stream(&format!("plan-{n}")),
            (0..100).map(|_| deposit(1)).collect(),
        )
        .await;
    }
    let reads = [
        ("read_streams.sql", "ARRAY['plan-1', 'plan-2']".to_owned()),
        (
            "read_streams_after.sql",
            "ARRAY['plan-1', 'plan-2'], ARRAY[5, 9223372036854775807]::bigint[]".to_owned(),
        ),
    ];

    // Left to choose (plan_cache_mode = auto), the server keeps the generic plan after
    // its five trial calls.
    let mut conn = PgConnection::connect(&database_url())
        .await
        .expect("connect");
    let appends = (0..8).map(|n| {
        let (a, b) = (format!("gen-{n}-a"), format!("gen-{n}-b"));
        format!(
            "ARRAY['{a}', '{b}'], ARRAY[0, 0]::bigint[], ARRAY[true, true], ARRAY['{a}', '{b}'],
             ARRAY[1, 1]::bigint[], ARRAY[gen_random_uuid(), gen_random_uuid()],
             ARRAY['Deposited', 'Deposited'], ARRAY['{{\"amount\":1}}', '{{\"amount\":1}}'],
             ARRAY['{{}}', '{{}}']"
        )
    });
    let cases: Vec<(&str, Vec<String>)> = reads
        .iter()
        .map(|(file, arguments)| (*file, vec![arguments.clone(); 8]))
        .chain(std::iter::once(("append_many.sql", appends.collect())))
        .collect();
    for (file, calls) in &cases {
        let statement = store_statement(file, &schema);
        sqlx::raw_sql(&format!("PREPARE plan_test AS {statement}"))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        for arguments in calls {
            sqlx::raw_sql(&format!("EXECUTE plan_test({arguments})"))
                .execute(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("{file}: {e}"));
        }
        let (generic, custom): (i64, i64) = sqlx::query_as(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE name = 'plan_test'",
        )
        .fetch_one(&mut conn)
        .await
        .expect("plan counts");
        sqlx::raw_sql("DEALLOCATE plan_test")
            .execute(&mut conn)
            .await
            .expect("deallocate");
        assert!(
            generic >= 3 && custom <= 5,
            "{file}: planned for every call ({custom} custom plans, {generic} generic)"
        );
    }

    // The generic plan reads each stream through its index.
    sqlx::query("SET plan_cache_mode = force_generic_plan")
        .execute(&mut conn)
        .await
        .expect("set");
    for (file, arguments) in &reads {
        let statement = store_statement(file, &schema);
        sqlx::raw_sql(&format!("PREPARE plan_test AS {statement}"))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        let plan: Vec<String> = sqlx::query_scalar(&format!(
            "EXPLAIN (COSTS OFF) EXECUTE plan_test({arguments})"
        ))
        .fetch_all(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{file}: {e}"));
        sqlx::raw_sql("DEALLOCATE plan_test")
            .execute(&mut conn)
            .await
            .expect("deallocate");
        let plan = plan.join("\n");
        assert!(
            !plan.contains("Seq Scan") && !plan.contains("Hash"),
            "{file} scans the table in a generic plan:\n{plan}"
        );
        assert!(
            plan.contains("events_stream_version_key"),
            "{file} does not read through the stream index:\n{plan}"
        );
    }
    // The reads answer as before, and the statement's appends are there.
    let read = store
        .read_streams(&[stream("plan-1"), stream("plan-2"), stream("gen-7-b")])
        .await
        .expect("read");
    assert_eq!(read.events.len(), 201);
}
