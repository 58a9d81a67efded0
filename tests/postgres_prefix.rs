//! The prefix property of the PostgreSQL global log under forced interleavings, and the
//! answers an append gives after its connection is lost.
//!
//! Interleavings are forced, not hoped for: a test holds a stream's advisory lock or a
//! gate that a trigger waits on, waits until the backend under test is seen waiting in
//! `pg_locks`, and only then lets it go on.

use std::sync::Arc;
use std::time::Duration;

use eventcore::{
    AppendRequest, CheckpointStore, Error, EventData, EventMetadata, EventStore, ExpectedVersion,
    GlobalPosition, IdempotencyKey, LogQuery, Projection, ProjectionRunner, RecordedEvent,
    StoredEvent, StreamAppend, StreamId,
};
use eventcore_postgres::sqlx::postgres::PgConnectOptions;
use eventcore_postgres::sqlx::{self, Connection, PgConnection, Row};
use eventcore_postgres::{
    PostgresConfig, PostgresEventStore, SchemaName, TransactionalProjection,
    TransactionalProjectionRunner,
};
use eventcore_tests::bank::BankEvent;
use eventcore_tests::postgres::{database_url, fresh_schema, store_in};
use eventcore_tests::proxy::{Cut, Proxy};
use tokio::sync::{oneshot, watch};

/// A failure detector, never a synchronisation: a correct store finishes long before.
const HANG_GUARD: Duration = Duration::from_secs(60);

fn stream(name: &str) -> StreamId {
    StreamId::try_new(name).expect("valid")
}

fn deposit(amount: i64) -> EventData {
    EventData::from_event(&BankEvent::Deposited { amount }, EventMetadata::default())
        .expect("serializes")
}

fn positions(events: &[RecordedEvent]) -> Vec<u64> {
    events.iter().map(|e| e.global_position.value()).collect()
}

async fn raw_connection() -> PgConnection {
    PgConnection::connect(&database_url())
        .await
        .expect("connect")
}

async fn exec(conn: &mut PgConnection, sql: &str) {
    sqlx::query(sql)
        .execute(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// The advisory lock key of `stream` in `schema` (as the store computes it).
async fn stream_key(conn: &mut PgConnection, schema: &SchemaName, stream: &StreamId) -> i64 {
    sqlx::query_scalar("SELECT hashtextextended('eventcore.stream.' || $1 || '/' || $2, 0)")
        .bind(schema.as_str())
        .bind(stream.as_str())
        .fetch_one(&mut *conn)
        .await
        .expect("key")
}

/// Waits until some backend waits for the advisory lock `key`; returns its pid. Polls
/// `pg_locks`: the condition, not the time, ends the wait.
async fn backend_waiting_for(conn: &mut PgConnection, key: i64) -> i32 {
    let wait = async {
        loop {
            let pid: Option<i32> = sqlx::query_scalar(
                "SELECT l.pid FROM pg_locks l
                  WHERE l.locktype = 'advisory' AND NOT l.granted AND l.objsubid = 1
                    AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                    AND l.classid::bigint = (($1::bigint >> 32) & 4294967295)
                    AND l.objid::bigint = ($1::bigint & 4294967295)
                  LIMIT 1",
            )
            .bind(key)
            .fetch_optional(&mut *conn)
            .await
            .expect("pg_locks");
            if let Some(pid) = pid {
                return pid;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    tokio::time::timeout(HANG_GUARD, wait)
        .await
        .expect("the backend under test never queued for the lock")
}

/// Takes, in an open transaction on `conn`, the mark an append whose read of the
/// sequence came back at `position` would take: readers stop below it until `conn`
/// ends its transaction. This is the state a mark read before a wait (or a read that
/// raced a concurrent `nextval`) leaves behind: the horizon below what readers saw.
async fn take_mark(conn: &mut PgConnection, schema: &SchemaName, position: u64) {
    exec(conn, "BEGIN").await;
    let slot = (position % (1 << 32)) as i64;
    let slot = if slot >= 1 << 31 {
        slot - (1 << 32)
    } else {
        slot
    };
    sqlx::query(
        "SELECT pg_advisory_xact_lock_shared(hashtext('eventcore.reserved.' || $1), $2::integer)",
    )
    .bind(schema.as_str())
    .bind(slot as i32)
    .execute(&mut *conn)
    .await
    .expect("mark");
}

/// A trigger on the store's events table that, for events of `stream`, waits for the
/// advisory lock `gate` (held by the test) and then fails: the append holds its mark
/// and its positions while it waits, and rolls back.
async fn install_gate(conn: &mut PgConnection, schema: &SchemaName, stream: &StreamId, gate: i64) {
    exec(
        conn,
        &format!(
            "CREATE FUNCTION \"{schema}\".test_gate() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 PERFORM pg_advisory_xact_lock_shared({gate});
                 RAISE EXCEPTION 'rolled back by the test gate';
             END $$"
        ),
    )
    .await;
    exec(
        conn,
        &format!(
            "CREATE TRIGGER test_gate BEFORE INSERT ON \"{schema}\".events FOR EACH ROW
             WHEN (NEW.stream_id = '{}') EXECUTE FUNCTION \"{schema}\".test_gate()",
            stream.as_str()
        ),
    )
    .await;
}

/// An append that read the sequence, then waited for its stream, must not take a mark
/// below positions committed (and seen by readers) while it waited: the horizon would
/// move backwards, hiding events readers already returned.
/// Which of the store's three append paths a scenario's request takes.
#[derive(Clone, Copy)]
enum AppendPath {
    /// One event to one stream at an exact version (`sql/append_one.sql`).
    OneEvent,
    /// Every stream at an exact version (`sql/append_many.sql`).
    ManyStreams,
    /// Anything else (`eventcore_append`).
    General,
}

async fn mark_after_wait_scenario(path: AppendPath) {
    let schema = fresh_schema();
    let store = store_in(&schema).await;
    let (a, b, s) = (stream("a"), stream("b"), stream("s"));
    store
        .append(AppendRequest::single(
            a,
            ExpectedVersion::Any,
            vec![deposit(1)],
        ))
        .await
        .expect("first");

    let mut control = raw_connection().await;
    let gate: i64 = rand::random();
    install_gate(&mut control, &schema, &s, gate).await;
    let mut gate_holder = raw_connection().await;
    exec(&mut gate_holder, "BEGIN").await;
    exec(
        &mut gate_holder,
        &format!("SELECT pg_advisory_xact_lock({gate})"),
    )
    .await;

    // The stream lock is held, so the append under test queues for it.
    let key = stream_key(&mut control, &schema, &s).await;
    let mut stream_holder = raw_connection().await;
    exec(&mut stream_holder, "BEGIN").await;
    exec(
        &mut stream_holder,
        &format!("SELECT pg_advisory_xact_lock({key})"),
    )
    .await;
    let request = match path {
        AppendPath::OneEvent => {
            AppendRequest::single(s.clone(), ExpectedVersion::NoStream, vec![deposit(2)])
        }
        AppendPath::ManyStreams => AppendRequest::new()
            .with_stream(StreamAppend::new(
                s.clone(),
                ExpectedVersion::NoStream,
                vec![deposit(2)],
            ))
            .with_stream(StreamAppend::new(
                stream("t"),
                ExpectedVersion::NoStream,
                vec![deposit(3)],
            )),
        AppendPath::General => AppendRequest::single(
            s.clone(),
            ExpectedVersion::Any,
            vec![deposit(2), deposit(3)],
        ),
    };
    let waiting = {
        let store = store.clone();
        tokio::spawn(async move { store.append(request).await })
    };
    let pid = backend_waiting_for(&mut control, key).await;
    if matches!(path, AppendPath::ManyStreams) {
        runs_the_one_statement_append(&mut control, pid).await;
    }

    // Meanwhile another append commits, and readers see it.
    store
        .append(AppendRequest::single(
            b,
            ExpectedVersion::Any,
            vec![deposit(4)],
        ))
        .await
        .expect("second");
    let before = store.read_all(&LogQuery::new()).await.expect("read");
    assert_eq!(positions(&before), vec![1, 2]);

    // Let the waiting append go on: it takes its mark and its positions, then waits at
    // the gate, holding them.
    exec(&mut stream_holder, "COMMIT").await;
    backend_waiting_for(&mut control, gate).await;
    let during = store.read_all(&LogQuery::new()).await.expect("read");
    assert_eq!(
        positions(&during),
        vec![1, 2],
        "what readers saw must stay visible: the waiting append's mark is below position 2"
    );
    assert_eq!(
        store.head_position().await.expect("head"),
        Some(GlobalPosition::new(2))
    );

    exec(&mut gate_holder, "COMMIT").await;
    let refused = tokio::time::timeout(HANG_GUARD, waiting)
        .await
        .expect("the gated append ends")
        .expect("task");
    assert!(
        refused.is_err(),
        "the gate rolls the append back: {refused:?}"
    );
    let after = store.read_all(&LogQuery::new()).await.expect("read");
    assert_eq!(positions(&after), vec![1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs PostgreSQL: set DATABASE_URL (scripts/test provisions one)"
)]
async fn a_single_event_append_marks_after_it_waited_for_its_stream() {
    mark_after_wait_scenario(AppendPath::OneEvent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs PostgreSQL: set DATABASE_URL (scripts/test provisions one)"
)]
async fn a_one_statement_append_of_several_streams_marks_after_it_waited_for_them() {
    mark_after_wait_scenario(AppendPath::ManyStreams).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs PostgreSQL: set DATABASE_URL (scripts/test provisions one)"
)]
async fn a_general_append_marks_after_it_waited_for_its_streams() {
    mark_after_wait_scenario(AppendPath::General).await;
}

/// Asserts that backend `pid` is running the one-statement append of several streams
/// (`sql/append_many.sql`), not `eventcore_append`.
async fn runs_the_one_statement_append(control: &mut PgConnection, pid: i32) {
    let query: String = sqlx::query_scalar("SELECT query FROM pg_stat_activity WHERE pid = $1")
        .bind(pid)
        .fetch_one(&mut *control)
        .await
        .expect("pg_stat_activity");
    assert!(
        query.trim_start().starts_with("WITH wanted AS"),
        "the append under test took another path: {query}"
    );
}

/// Holds `stream`'s lock exclusively in an open transaction on `writer` and writes its
/// next event there, as a concurrent append would, uncommitted until the caller says.
async fn write_under_lock(
    writer: &mut PgConnection,
    control: &mut PgConnection,
    schema: &SchemaName,
    stream: &StreamId,
    version: u64,
) -> i64 {
    let key = stream_key(control, schema, stream).await;
    exec(writer, "BEGIN").await;
    exec(writer, &format!("SELECT pg_advisory_xact_lock({key})")).await;
    sqlx::query(&format!(
        "INSERT INTO \"{schema}\".events (global_position, event_id, stream_id, stream_version,
                                          event_type, payload, metadata)
         VALUES (nextval('\"{schema}\".global_position_seq'), gen_random_uuid(), $1, $2,
                 'Deposited', '{{\"amount\":5}}', '{{}}')"
    ))
    .bind(stream.as_str())
    .bind(i64::try_from(version).expect("small"))
    .execute(&mut *writer)
    .await
    .expect("the concurrent write");
    key
}

/// An append of several streams at exact versions reads their versions in its
/// statement's snapshot and only then queues for their locks. A stream it only reads
/// that another append writes meanwhile (committed after the snapshot, before the lock
/// was granted) must fail the append with a conflict: nothing is written, and no
/// decision is committed on the stale read.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs PostgreSQL: set DATABASE_URL (scripts/test provisions one)"
)]
async fn a_read_only_participant_written_while_the_append_queued_is_a_conflict() {
    let schema = fresh_schema();
    let store = store_in(&schema).await;
    let (read_only, written) = (stream("limits"), stream("account"));
    store
        .append(AppendRequest::single(
            read_only.clone(),
            ExpectedVersion::NoStream,
            vec![deposit(1)],
        ))
        .await
        .expect("setup");

    let mut control = raw_connection().await;
    let mut writer = raw_connection().await;
    let key = write_under_lock(&mut writer, &mut control, &schema, &read_only, 2).await;
    let request = AppendRequest::new()
        .with_stream(StreamAppend::check_only(
            read_only.clone(),
            ExpectedVersion::Exact(eventcore::StreamVersion::new(1)),
        ))
        .with_stream(StreamAppend::new(
            written.clone(),
            ExpectedVersion::NoStream,
            vec![deposit(2)],
        ));
    let waiting = {
        let store = store.clone();
        tokio::spawn(async move { store.append(request).await })
    };
    // The append read version 1 (the write is not committed) and queues for the lock.
    let pid = backend_waiting_for(&mut control, key).await;
    runs_the_one_statement_append(&mut control, pid).await;
    exec(&mut writer, "COMMIT").await;

    let outcome = tokio::time::timeout(HANG_GUARD, waiting)
        .await
        .expect("the append ends")
        .expect("task");
    match outcome {
        Err(Error::VersionConflict { conflicts }) => {
            assert_eq!(conflicts.len(), 1, "{conflicts:?}");
            assert_eq!(conflicts[0].stream, read_only);
            assert_eq!(conflicts[0].actual.value(), 2);
        }
        other => panic!("a decision on a stale read was committed: {other:?}"),
    }
    let read = store.read_streams(&[written]).await.expect("read");
    assert!(
        read.events.is_empty(),
        "nothing is written: {:?}",
        read.events
    );
}

/// The same for a stream the append writes: a version taken after the statement's
/// snapshot fails the whole append (the other stream gets nothing) with a conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs PostgreSQL: set DATABASE_URL (scripts/test provisions one)"
)]
async fn a_written_stream_taken_while_the_append_queued_is_a_conflict() {
    let schema = fresh_schema();
    let store = store_in(&schema).await;
    let (from, to) = (stream("from"), stream("to"));
    let mut control = raw_connection().await;
    let mut writer = raw_connection().await;
    let key = write_under_lock(&mut writer, &mut control, &schema, &from, 1).await;
    let request = AppendRequest::new()
        .with_stream(StreamAppend::new(
            from.clone(),
            ExpectedVersion::NoStream,
            vec![deposit(-2)],
        ))
        .with_stream(StreamAppend::new(
            to.clone(),
            ExpectedVersion::NoStream,
            vec![deposit(2)],
        ));
    let waiting = {
        let store = store.clone();
        tokio::spawn(async move { store.append(request).await })
    };
    let pid = backend_waiting_for(&mut control, key).await;
    runs_the_one_statement_append(&mut control, pid).await;
    exec(&mut writer, "COMMIT").await;

    let outcome = tokio::time::timeout(HANG_GUARD, waiting)
        .await
        .expect("the append ends")
        .expect("task");
    match outcome {
        Err(Error::VersionConflict { conflicts }) => {
            assert_eq!(conflicts.len(), 1, "{conflicts:?}");
            assert_eq!(conflicts[0].stream, from);
            assert_eq!(conflicts[0].actual.value(), 1);
        }
        other => panic!("expected a conflict on `from`: {other:?}"),
    }
    let read = store.read_streams(&[from, to]).await.expect("read");
    assert_eq!(
        read.events.len(),
        1,
        "only the concurrent write: {:?}",
        read.events
    );
}

/// Records what a projection applied, and publishes the last position.
struct Applied {
    name: &'static str,
    positions: Arc<parking_lot::Mutex<Vec<u64>>>,
    last: watch::Sender<u64>,
}

impl Applied {
    fn new(
        name: &'static str,
    ) -> (
        Self,
        Arc<parking_lot::Mutex<Vec<u64>>>,
        watch::Receiver<u64>,
    ) {
        let positions = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let (last, watch) = watch::channel(0);
        (
            Applied {
                name,
                positions: positions.clone(),
                last,
            },
            positions,
            watch,
        )
    }

    fn record(&self, position: GlobalPosition) {
        self.positions.lock().push(position.value());
        self.last.send_replace(position.value());
    }
}

impl Projection for Applied {
    type Event = BankEvent;
    type Error = std::convert::Infallible;

    fn name(&self) -> &str {
        self.name
    }

    async fn apply(&mut self, event: &StoredEvent<BankEvent>) -> Result<(), Self::Error> {
        self.record(event.global_position);
        Ok(())
    }
}

impl TransactionalProjection for Applied {
    type Event = BankEvent;
    type Error = std::convert::Infallible;

    fn name(&self) -> &str {
        self.name
    }

    async fn apply(
        &mut self,
        _tx: &mut PgConnection,
        event: &StoredEvent<BankEvent>,
    ) -> Result<(), Self::Error> {
        self.record(event.global_position);
        Ok(())
    }
}

async fn wait_applied(watch: &mut watch::Receiver<u64>, position: u64, what: &str) {
    tokio::time::timeout(HANG_GUARD, watch.wait_for(|last| *last >= position))
        .await
        .unwrap_or_else(|_| panic!("{what}: position {position} was never applied"))
        .expect("projection alive");
}

/// One read of the log to interrupt: before it, the test is told and waits for a go;
/// after it, the test is told again.
struct ReadHook {
    reached: oneshot::Sender<()>,
    go: oneshot::Receiver<()>,
    done: oneshot::Sender<()>,
}

/// A PostgreSQL store whose next log read can be held at its start.
struct Hooked {
    inner: PostgresEventStore,
    hook: parking_lot::Mutex<Option<ReadHook>>,
}

impl Hooked {
    async fn around<T>(&self, read: impl std::future::Future<Output = T>) -> T {
        let hook = self.hook.lock().take();
        let Some(hook) = hook else {
            return read.await;
        };
        let _ = hook.reached.send(());
        let _ = hook.go.await;
        let result = read.await;
        let _ = hook.done.send(());
        result
    }
}

#[async_trait::async_trait]
impl EventStore for Hooked {
    async fn read_streams(
        &self,
        streams: &[StreamId],
    ) -> eventcore::Result<eventcore::StreamsSnapshot> {
        self.inner.read_streams(streams).await
    }

    async fn append(&self, request: AppendRequest) -> eventcore::Result<eventcore::AppendOutcome> {
        self.inner.append(request).await
    }

    async fn read_all(&self, query: &LogQuery) -> eventcore::Result<Vec<RecordedEvent>> {
        self.around(self.inner.read_all(query)).await
    }

    async fn read_log(&self, query: &LogQuery) -> eventcore::Result<eventcore::LogRead> {
        self.around(self.inner.read_log(query)).await
    }

    async fn head_position(&self) -> eventcore::Result<Option<GlobalPosition>> {
        self.inner.head_position().await
    }

    async fn wait_for_events(&self, after: Option<GlobalPosition>) -> eventcore::Result<()> {
        self.inner.wait_for_events(after).await
    }

    async fn idempotent_outcome(
        &self,
        key: &IdempotencyKey,
    ) -> eventcore::Result<Option<eventcore::AppendOutcome>> {
        self.inner.idempotent_outcome(key).await
    }
}

/// A live runner whose read finds the horizon lower than the head it knew of (a mark
/// taken below a visible event) must not wait for events after that head: when the mark
/// goes away without an append after it, the event below must still be applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs PostgreSQL: set DATABASE_URL (scripts/test provisions one)"
)]
async fn a_live_runner_does_not_stall_when_the_horizon_moves_back() {
    let schema = fresh_schema();
    let store = store_in(&schema).await;
    let a = stream("a");
    store
        .append(AppendRequest::single(
            a.clone(),
            ExpectedVersion::Any,
            vec![deposit(1)],
        ))
        .await
        .expect("first");
    let hooked = Arc::new(Hooked {
        inner: store.clone(),
        hook: parking_lot::Mutex::new(None),
    });
    let (projection, applied, mut last) = Applied::new("follower");
    let mut runner = ProjectionRunner::new(
        projection,
        hooked.clone(),
        Arc::new(store.clone()) as Arc<dyn CheckpointStore>,
    );
    runner.catch_up().await.expect("catch up");
    assert_eq!(*applied.lock(), vec![1]);

    // The next event commits; the runner's first read after it is held, and a mark
    // below it is taken before the read goes on.
    store
        .append(AppendRequest::single(
            a,
            ExpectedVersion::Any,
            vec![deposit(2)],
        ))
        .await
        .expect("second");
    let (reached_tx, reached) = oneshot::channel();
    let (go, go_rx) = oneshot::channel();
    let (done_tx, done) = oneshot::channel();
    *hooked.hook.lock() = Some(ReadHook {
        reached: reached_tx,
        go: go_rx,
        done: done_tx,
    });
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(async move {
        runner
            .run(async {
                let _ = stopped.await;
            })
            .await
    });
    tokio::time::timeout(HANG_GUARD, reached)
        .await
        .expect("the runner reads the log")
        .expect("hook");
    let mut marker = raw_connection().await;
    take_mark(&mut marker, &schema, 2).await;
    go.send(()).expect("runner waits");
    tokio::time::timeout(HANG_GUARD, done)
        .await
        .expect("the read ends")
        .expect("hook");
    // The mark goes away; no append follows.
    exec(&mut marker, "ROLLBACK").await;

    wait_applied(&mut last, 2, "following live").await;
    assert_eq!(*applied.lock(), vec![1, 2]);
    stop.send(()).expect("runner alive");
    running.await.expect("task").expect("run");
}

/// The same for the transactional runner: its batch is held on the checkpoint's row
/// lock, and the mark is taken before it reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs PostgreSQL: set DATABASE_URL (scripts/test provisions one)"
)]
async fn a_transactional_runner_does_not_stall_when_the_horizon_moves_back() {
    let schema = fresh_schema();
    let store = store_in(&schema).await;
    let a = stream("a");
    store
        .append(AppendRequest::single(
            a.clone(),
            ExpectedVersion::Any,
            vec![deposit(1)],
        ))
        .await
        .expect("first");
    let (projection, applied, mut last) = Applied::new("tx_follower");
    let mut runner = TransactionalProjectionRunner::new(store.clone(), projection);
    runner.catch_up().await.expect("catch up");
    assert_eq!(*applied.lock(), vec![1]);

    // The next event commits; the runner starts while the checkpoint row is locked, so
    // its first batch waits, and a mark below the event is taken before it reads.
    store
        .append(AppendRequest::single(
            a,
            ExpectedVersion::Any,
            vec![deposit(2)],
        ))
        .await
        .expect("second");
    let mut row_holder = raw_connection().await;
    exec(&mut row_holder, "BEGIN").await;
    exec(
        &mut row_holder,
        &format!(
            "SELECT 1 FROM \"{schema}\".projection_checkpoints WHERE projection = 'tx_follower' FOR UPDATE"
        ),
    )
    .await;
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(async move {
        runner
            .run(async {
                let _ = stopped.await;
            })
            .await
    });
    let mut control = raw_connection().await;
    let pattern = format!("%\"{schema}\".projection_checkpoints%FOR UPDATE%");
    let find = async {
        loop {
            let pid: Option<i32> = sqlx::query_scalar(
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE $1 LIMIT 1",
            )
            .bind(&pattern)
            .fetch_optional(&mut control)
            .await
            .expect("pg_stat_activity");
            if let Some(pid) = pid {
                return pid;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    let pid = tokio::time::timeout(HANG_GUARD, find)
        .await
        .expect("the runner's batch waits for the checkpoint row");
    let mut marker = raw_connection().await;
    take_mark(&mut marker, &schema, 2).await;
    exec(&mut row_holder, "COMMIT").await;
    // The batch has read and committed once its connection is idle again.
    let idle = async {
        loop {
            let state: Option<String> =
                sqlx::query_scalar("SELECT state FROM pg_stat_activity WHERE pid = $1")
                    .bind(pid)
                    .fetch_optional(&mut control)
                    .await
                    .expect("pg_stat_activity");
            if state.as_deref() == Some("idle") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    tokio::time::timeout(HANG_GUARD, idle)
        .await
        .expect("the batch ends");
    exec(&mut marker, "ROLLBACK").await;

    wait_applied(&mut last, 2, "following live").await;
    assert_eq!(*applied.lock(), vec![1, 2]);
    stop.send(()).expect("runner alive");
    running.await.expect("task").expect("run");
}

/// A keyed request that was acknowledged, sent again, and whose second answer was lost
/// (its backend killed while it waited): the second call wrote nothing, and must say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs PostgreSQL: set DATABASE_URL (scripts/test provisions one)"
)]
async fn a_repeated_keyed_append_whose_answer_was_lost_reports_deduplicated() {
    let schema = fresh_schema();
    let store = store_in(&schema).await;
    let (s, t) = (stream("s"), stream("t"));
    let request = AppendRequest::new()
        .with_stream(StreamAppend::new(
            s.clone(),
            ExpectedVersion::NoStream,
            vec![deposit(1)],
        ))
        .with_stream(StreamAppend::new(
            t,
            ExpectedVersion::NoStream,
            vec![deposit(2)],
        ))
        .with_idempotency_key(IdempotencyKey::try_new("repeat-me").expect("key"));
    let first = store.append(request.clone()).await.expect("first");
    assert!(!first.deduplicated);

    let mut control = raw_connection().await;
    let key = stream_key(&mut control, &schema, &s).await;
    let mut stream_holder = raw_connection().await;
    exec(&mut stream_holder, "BEGIN").await;
    exec(
        &mut stream_holder,
        &format!("SELECT pg_advisory_xact_lock({key})"),
    )
    .await;
    let repeat = {
        let store = store.clone();
        tokio::spawn(async move { store.append(request).await })
    };
    let pid = backend_waiting_for(&mut control, key).await;
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&mut control)
        .await
        .expect("terminate");
    assert!(killed);
    exec(&mut stream_holder, "COMMIT").await;

    let second = tokio::time::timeout(HANG_GUARD, repeat)
        .await
        .expect("the repeat ends")
        .expect("task")
        .expect("the outcome is known: the first call stored it");
    assert!(second.deduplicated, "the repeat wrote nothing");
    assert_eq!(second.events, first.events);
    let log = store.read_all(&LogQuery::new()).await.expect("read");
    assert_eq!(log.len(), 2, "written once");
}

/// A store that reaches PostgreSQL through `proxy`.
async fn store_behind(proxy: &Proxy, schema: &SchemaName) -> PostgresEventStore {
    let options: PgConnectOptions = database_url().parse().expect("DATABASE_URL parses");
    let options = options
        .host(&proxy.addr().ip().to_string())
        .port(proxy.addr().port());
    let config = PostgresConfig::from_options(options)
        .with_schema(schema.clone())
        .with_max_connections(2)
        .with_acquire_timeout(Duration::from_secs(2));
    PostgresEventStore::connect_with(config)
        .await
        .expect("connect through the proxy")
}

async fn upstream() -> std::net::SocketAddr {
    let options: PgConnectOptions = database_url().parse().expect("DATABASE_URL parses");
    let host = options.get_host().to_owned();
    let port = options.get_port();
    tokio::net::lookup_host((host.as_str(), port))
        .await
        .expect("resolve")
        .next()
        .expect("an address")
}

/// The append committed, its answer was lost and the server stays unreachable: the
/// store cannot know the outcome and must say exactly that, not "nothing was written".
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs PostgreSQL: set DATABASE_URL (scripts/test provisions one)"
)]
async fn an_append_whose_answer_and_server_are_lost_has_an_unknown_outcome() {
    for one_statement in [true, false] {
        let schema = fresh_schema();
        let direct = store_in(&schema).await;
        let proxy = Proxy::start(upstream().await).await;
        let store = store_behind(&proxy, &schema).await;
        let request = if one_statement {
            AppendRequest::single(stream("s"), ExpectedVersion::NoStream, vec![deposit(1)])
        } else {
            AppendRequest::single(stream("s"), ExpectedVersion::Any, vec![deposit(1)])
                .with_idempotency_key(IdempotencyKey::try_new("k").expect("key"))
        };
        proxy.arm(Cut::AnswerAndServer);
        let error = store
            .append(request.clone())
            .await
            .expect_err("the answer was lost and the server is unreachable");
        assert_eq!(proxy.cuts(), 1, "the answer was cut");
        let log = direct.read_all(&LogQuery::new()).await.expect("read");
        assert_eq!(log.len(), 1, "the append committed");
        assert!(
            matches!(error, Error::OutcomeUnknown { .. }),
            "an error after a lost answer must say the outcome is unknown, got {error:?}"
        );
        assert!(!error.is_retryable());

        // Once the server is back, sending the same request again never stores it
        // twice. With a key, it tells the outcome: the key is checked first. Without
        // one, the expectation is: the stream moved (the first call's write).
        proxy.heal();
        let again = store.append(request).await;
        if one_statement {
            let error = again.expect_err("the stream is no longer empty");
            assert!(
                matches!(error, Error::VersionConflict { .. }),
                "the repeat: {error:?}"
            );
        } else {
            let again = again.expect("the repeat");
            assert!(again.deduplicated, "the first call wrote it");
            assert_eq!(
                again.events[0].event_id, log[0].event_id,
                "the outcome is the stored event"
            );
        }
        let log = direct.read_all(&LogQuery::new()).await.expect("read");
        assert_eq!(log.len(), 1, "stored once");
    }
}

/// The answer is lost but the server is still there: the store finds out what its own
/// call wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs PostgreSQL: set DATABASE_URL (scripts/test provisions one)"
)]
async fn an_append_whose_answer_was_lost_reports_what_it_wrote() {
    for keyed in [false, true] {
        let schema = fresh_schema();
        let direct = store_in(&schema).await;
        let proxy = Proxy::start(upstream().await).await;
        let store = store_behind(&proxy, &schema).await;
        let mut request =
            AppendRequest::single(stream("s"), ExpectedVersion::NoStream, vec![deposit(1)]);
        if keyed {
            request = request.with_idempotency_key(IdempotencyKey::try_new("k").expect("key"));
        }
        proxy.arm(Cut::Answer);
        let outcome = store.append(request).await.expect("the outcome is found");
        assert_eq!(proxy.cuts(), 1, "the answer was cut");
        assert!(!outcome.deduplicated, "this call wrote it");
        let log = direct.read_all(&LogQuery::new()).await.expect("read");
        assert_eq!(log.len(), 1);
        assert_eq!(outcome.events[0].event_id, log[0].event_id);
        assert_eq!(outcome.events[0].global_position, log[0].global_position);
    }
}

/// Every append checks that its mark is not above the first position it drew. A
/// sequence that goes backwards (here: altered by hand) must make the append fail, not
/// write an event that readers may already have passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs PostgreSQL: set DATABASE_URL (scripts/test provisions one)"
)]
async fn an_append_refuses_a_mark_above_its_positions() {
    let schema = fresh_schema();
    let store = store_in(&schema).await;
    store
        .append(AppendRequest::single(
            stream("a"),
            ExpectedVersion::Any,
            vec![deposit(1)],
        ))
        .await
        .expect("first");
    let mut control = raw_connection().await;
    exec(
        &mut control,
        &format!("SELECT setval('\"{schema}\".global_position_seq', 100)"),
    )
    .await;
    exec(
        &mut control,
        &format!("ALTER SEQUENCE \"{schema}\".global_position_seq INCREMENT BY -1"),
    )
    .await;

    let one = store
        .append(AppendRequest::single(
            stream("b"),
            ExpectedVersion::NoStream,
            vec![deposit(2)],
        ))
        .await;
    let general = store
        .append(AppendRequest::single(
            stream("c"),
            ExpectedVersion::Any,
            vec![deposit(3)],
        ))
        .await;
    for (what, result) in [("single-event", one), ("general", general)] {
        let error = result.expect_err(what);
        assert!(
            matches!(
                error,
                Error::Backend {
                    retryable: false,
                    ..
                }
            ),
            "{what}: {error:?}"
        );
        assert!(error.to_string().contains("mark"), "{what}: {error}");
    }
    let log = store.read_all(&LogQuery::new()).await.expect("read");
    assert_eq!(positions(&log), vec![1], "nothing was written");
}

/// Reading the sequence relation as a table is not atomic against a concurrent
/// `nextval` (the page can briefly hold the value logged ahead), so every read of
/// `global_position_seq` in the installed functions and in the statements the store
/// sends must be `nextval` or `pg_sequence_last_value`, which read under the buffer lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs PostgreSQL: set DATABASE_URL (scripts/test provisions one)"
)]
async fn every_read_of_the_sequence_is_atomic() {
    let schema = fresh_schema();
    let _store = store_in(&schema).await;
    let mut control = raw_connection().await;
    let rows = sqlx::query(
        "SELECT p.proname::text, p.prosrc FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
          WHERE n.nspname = $1",
    )
    .bind(schema.as_str())
    .fetch_all(&mut control)
    .await
    .expect("functions");
    let mut sources: Vec<(String, String)> = rows
        .iter()
        .map(|row| (row.get::<String, _>(0), row.get::<String, _>(1)))
        .collect();
    assert!(sources.iter().any(|(name, _)| name == "eventcore_horizon"));
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../eventcore-postgres/src/sql");
    for entry in std::fs::read_dir(dir).expect("sql dir") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("read");
        sources.push((path.display().to_string(), text));
    }
    let mut offenders = Vec::new();
    for (name, source) in &sources {
        let code: String = source
            .lines()
            .filter(|line| !line.trim_start().starts_with("--"))
            .collect::<Vec<_>>()
            .join("\n");
        for (at, _) in code.match_indices("global_position_seq") {
            let before = code[..at]
                .trim_end_matches("{schema}.")
                .trim_end_matches(&format!("\"{schema}\"."));
            let atomic = ["nextval('", "pg_sequence_last_value('"]
                .iter()
                .any(|call| before.ends_with(call));
            if !atomic {
                let line = code[..at].lines().count();
                offenders.push(format!("{name}, line {line}"));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "reads of global_position_seq that are not atomic: {offenders:?}"
    );
}

/// A trigger on the store's events table that, for events of `stream`, waits for the
/// advisory lock `gate` (held by the test) and then lets the insert go on: the append
/// holds its mark and its positions while it waits, and commits.
async fn install_pause(conn: &mut PgConnection, schema: &SchemaName, stream: &StreamId, gate: i64) {
    exec(
        conn,
        &format!(
            "CREATE FUNCTION \"{schema}\".test_pause() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 PERFORM pg_advisory_xact_lock_shared({gate});
                 RETURN NEW;
             END $$"
        ),
    )
    .await;
    exec(
        conn,
        &format!(
            "CREATE TRIGGER test_pause BEFORE INSERT ON \"{schema}\".events FOR EACH ROW
             WHEN (NEW.stream_id = '{}') EXECUTE FUNCTION \"{schema}\".test_pause()",
            stream.as_str()
        ),
    )
    .await;
}

/// A store in `schema` whose live readers would poll only once a day: a reader that
/// returns did so because it was told.
async fn store_without_polling(schema: &SchemaName) -> PostgresEventStore {
    let store = PostgresEventStore::connect_with(
        eventcore_tests::postgres::config(schema)
            .with_fallback_poll_interval(eventcore_postgres::MAX_WAIT),
    )
    .await
    .expect("connect");
    store.migrate().await.expect("migrate");
    store
}

/// Waits until `reader` has found committed events held back `times` times (its
/// counter, not the time, ends the wait).
async fn held_back(reader: &PostgresEventStore, times: u64) {
    let wait = async {
        while reader.live_wait_metrics().held_back < times {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(HANG_GUARD, wait)
        .await
        .expect("the reader never found events held back");
}

/// Starts `store`'s listening (a live read starts it) and waits until it listens.
async fn listening(store: &PostgresEventStore) {
    let starting = {
        let store = store.clone();
        tokio::spawn(async move { store.wait_for_events(None).await })
    };
    let wait = async {
        while !store.live_wait_metrics().listening {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(HANG_GUARD, wait)
        .await
        .expect("the store never listened");
    starting.abort();
}

/// Waits until a notification announcing `position` reached `reader`.
async fn notified(reader: &PostgresEventStore, position: u64) {
    let wait = async {
        while reader.live_wait_metrics().notified_position < position {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(HANG_GUARD, wait)
        .await
        .expect("no notification announced the position");
}

/// The held-back scenario: `writer` appends to `s`, which pauses (or fails, with
/// `fail`) at a gate holding position 2, while an append to `b` commits at position 3;
/// `reader` waits for events after position 1, is held back, and the gate opens. The
/// reader must return, told by the append's end, never by a timer.
async fn held_back_scenario(reader: &PostgresEventStore, writer: &PostgresEventStore, fail: bool) {
    let schema = writer.schema().clone();
    let (a, b, s) = (stream("a"), stream("b"), stream("s"));
    // The reader listens before anything is appended.
    listening(reader).await;
    writer
        .append(AppendRequest::single(
            a,
            ExpectedVersion::Any,
            vec![deposit(1)],
        ))
        .await
        .expect("first");
    let mut control = raw_connection().await;
    let gate: i64 = rand::random();
    if fail {
        install_gate(&mut control, &schema, &s, gate).await;
    } else {
        install_pause(&mut control, &schema, &s, gate).await;
    }
    let mut gate_holder = raw_connection().await;
    exec(&mut gate_holder, "BEGIN").await;
    exec(
        &mut gate_holder,
        &format!("SELECT pg_advisory_xact_lock({gate})"),
    )
    .await;
    let paused = {
        let writer = writer.clone();
        tokio::spawn(async move {
            writer
                .append(AppendRequest::single(
                    s,
                    ExpectedVersion::Any,
                    vec![deposit(2)],
                ))
                .await
        })
    };
    backend_waiting_for(&mut control, gate).await;
    writer
        .append(AppendRequest::single(
            b,
            ExpectedVersion::Any,
            vec![deposit(3)],
        ))
        .await
        .expect("third");
    // Every notification sent so far has reached the reader: from here on, only the
    // paused append's end can tell it anything.
    notified(reader, 3).await;
    assert_eq!(
        reader.head_position().await.expect("head"),
        Some(GlobalPosition::new(1)),
        "position 3 is committed but held back behind position 2"
    );

    let before = reader.live_wait_metrics();
    let waiting = {
        let reader = reader.clone();
        tokio::spawn(async move { reader.wait_for_events(Some(GlobalPosition::new(1))).await })
    };
    held_back(reader, before.held_back + 1).await;
    exec(&mut gate_holder, "COMMIT").await;
    let appended = tokio::time::timeout(HANG_GUARD, paused)
        .await
        .expect("the paused append ends")
        .expect("task");
    assert_eq!(appended.is_err(), fail, "{appended:?}");
    tokio::time::timeout(HANG_GUARD, waiting)
        .await
        .expect("the held-back reader was never told the append ended")
        .expect("task")
        .expect("waits");
    let after = reader.live_wait_metrics();
    assert_eq!(
        after.found_by_poll, before.found_by_poll,
        "the reader found the events on a timer: {after:?}"
    );
    let visible = reader.head_position().await.expect("head");
    assert_eq!(
        visible,
        Some(GlobalPosition::new(3)),
        "position 2 committed or rolled back, position 3 is visible"
    );
}

/// A live reader held back by an older append of its own process is woken by that
/// append's commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs PostgreSQL: set DATABASE_URL (scripts/test provisions one)"
)]
async fn a_reader_held_back_by_its_own_process_wakes_when_the_append_commits() {
    let store = store_without_polling(&fresh_schema()).await;
    held_back_scenario(&store, &store, false).await;
}

/// A live reader held back by an older append of its own process is woken by that
/// append's rollback, once the server has released the append's mark (the error
/// reaches the client before the server rolls back).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs PostgreSQL: set DATABASE_URL (scripts/test provisions one)"
)]
async fn a_reader_held_back_by_its_own_process_wakes_when_the_append_rolls_back() {
    let store = store_without_polling(&fresh_schema()).await;
    held_back_scenario(&store, &store, true).await;
}

/// A live reader held back by an older append of another process is woken, through
/// that process's notification, when the append rolls back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs PostgreSQL: set DATABASE_URL (scripts/test provisions one)"
)]
async fn a_reader_held_back_by_another_process_wakes_when_the_append_rolls_back() {
    let schema = fresh_schema();
    let writer = store_in(&schema).await;
    let reader = store_without_polling(&schema).await;
    held_back_scenario(&reader, &writer, true).await;
}
