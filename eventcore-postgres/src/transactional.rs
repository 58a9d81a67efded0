//! Exactly-once projections into PostgreSQL: the read model and the checkpoint change
//! in one transaction.

use std::future::Future;
use std::time::Duration;

use eventcore::{
    GlobalPosition, InvalidProjectionName, OnFailure, ParkedEvent, ProjectionErrorPolicy,
    ProjectionFilter, ProjectionName, RecordedEvent, RunSummary, StoredEvent,
};
use sqlx::{Connection, PgConnection};
use tracing::Instrument;

use crate::error::map_sqlx_error;
use crate::store::{PostgresEventStore, log_read_from_rows};

/// A projection whose read model lives in the store's database. `apply` gets the open
/// transaction of the batch; the runner saves the checkpoint in the same transaction, so
/// each event changes the read model exactly once, whatever crashes.
pub trait TransactionalProjection: Send + 'static {
    /// What the events decode into.
    type Event: eventcore::Event;
    /// What `apply` can fail with.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The projection's name (its checkpoint is kept under it).
    fn name(&self) -> &str;

    /// Which events to receive; every event by default.
    fn filter(&self) -> ProjectionFilter {
        ProjectionFilter::all()
    }

    /// Applies one event inside the batch's transaction. Do not commit or roll back.
    fn apply(
        &mut self,
        tx: &mut PgConnection,
        event: &StoredEvent<Self::Event>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Empties the read model, inside the rebuild's transaction (which also resets the
    /// checkpoint). Nothing by default.
    fn reset(
        &mut self,
        tx: &mut PgConnection,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send {
        let _ = tx;
        async { Ok(()) }
    }
}

/// How a batch ended.
enum Batch {
    /// Events were processed.
    Applied,
    /// None were found; the read looked up to `scanned`.
    Empty { scanned: Option<GlobalPosition> },
}

/// Runs a [`TransactionalProjection`]: each batch reads the checkpoint under a row lock,
/// applies the events and moves the checkpoint in one transaction. Two runners of the
/// same projection never apply the same event twice: the second waits for the first's
/// batch, then continues after it.
pub struct TransactionalProjectionRunner<P: TransactionalProjection> {
    store: PostgresEventStore,
    projection: P,
    /// The projection's name as given, for messages and SQL parameters.
    name: String,
    /// The name, checked once here; an invalid one fails every operation.
    key: Result<ProjectionName, InvalidProjectionName>,
    batch_size: usize,
    policy: ProjectionErrorPolicy,
}

impl<P: TransactionalProjection> std::fmt::Debug for TransactionalProjectionRunner<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransactionalProjectionRunner")
            .field("name", &self.name)
            .field("batch_size", &self.batch_size)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl<P: TransactionalProjection> TransactionalProjectionRunner<P> {
    /// A runner for `projection` over `store`.
    pub fn new(store: PostgresEventStore, projection: P) -> Self {
        let name = projection.name().to_owned();
        let key = ProjectionName::try_new(name.as_str());
        TransactionalProjectionRunner {
            store,
            projection,
            name,
            key,
            batch_size: 500,
            policy: ProjectionErrorPolicy::default(),
        }
    }

    /// Events per transaction (at least 1).
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// What to do with events that cannot be processed.
    pub fn with_error_policy(mut self, policy: ProjectionErrorPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The projection.
    pub fn projection(&self) -> &P {
        &self.projection
    }

    /// The checked name (a cheap clone).
    fn key(&self) -> eventcore::Result<ProjectionName> {
        self.key.clone().map_err(eventcore::Error::from)
    }

    /// Processes batches until the log is exhausted.
    ///
    /// # Errors
    ///
    /// [`eventcore::Error::ProjectionFailed`] when an event cannot be processed and the
    /// policy says stop (everything before it is committed); database errors.
    pub async fn catch_up(&mut self) -> eventcore::Result<RunSummary> {
        self.key()?;
        let mut summary = RunSummary::default();
        loop {
            let span =
                tracing::info_span!("eventcore.postgres.projection.batch", projection = %self.name);
            if let Batch::Empty { .. } = self.batch(&mut summary).instrument(span).await? {
                return Ok(summary);
            }
        }
    }

    /// Empties the read model and resets the checkpoint and parked events in one
    /// transaction, then replays the log from position 0.
    ///
    /// # Errors
    ///
    /// The projection's `reset` error as [`eventcore::Error::Rejected`]; as
    /// [`TransactionalProjectionRunner::catch_up`].
    pub async fn rebuild(&mut self) -> eventcore::Result<RunSummary> {
        self.key()?;
        let store = self.store.clone();
        let mut tx = store
            .pool()
            .begin()
            .await
            .map_err(|e| map_sqlx_error(e, "starting a rebuild", None))?;
        self.projection
            .reset(&mut tx)
            .await
            .map_err(eventcore::Error::rejected)?;
        sqlx::query(&store.sql().reset_checkpoint)
            .bind(&self.name)
            .execute(&mut *tx)
            .await
            .map_err(|e| map_sqlx_error(e, "resetting the checkpoint", None))?;
        tx.commit()
            .await
            .map_err(|e| map_sqlx_error(e, "committing a rebuild", None))?;
        self.catch_up().await
    }

    /// Catches up, then follows the log live until `shutdown` completes (between
    /// batches: a batch in flight commits or rolls back whole).
    ///
    /// # Errors
    ///
    /// As [`TransactionalProjectionRunner::catch_up`].
    pub async fn run(
        &mut self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> eventcore::Result<RunSummary> {
        use eventcore::EventStore;
        self.key()?;
        let mut shutdown = std::pin::pin!(shutdown);
        let mut total = RunSummary::default();
        loop {
            let scanned = loop {
                // A shutdown request is honoured between batches, also under a
                // sustained stream of writes.
                if stopped(&mut shutdown).await {
                    return Ok(total);
                }
                let span = tracing::info_span!("eventcore.postgres.projection.batch", projection = %self.name);
                if let Batch::Empty { scanned } = self.batch(&mut total).instrument(span).await? {
                    break scanned;
                }
            };
            // Wait after what the empty read looked at, not after the checkpoint: if the
            // log ends in events the filter does not want, waiting after the checkpoint
            // would return at once, forever. And not after a head read earlier: the
            // read may have looked less far than it (the horizon can briefly move back,
            // ADR 0003), and what lies between would wait for some later append.
            let checkpoint =
                eventcore::CheckpointStore::load_checkpoint(&self.store, &self.key()?).await?;
            tokio::select! {
                waited = self.store.wait_for_events(checkpoint.max(scanned)) => waited?,
                () = &mut shutdown => return Ok(total),
            }
        }
    }

    /// One transaction. Says whether it found events, and how far an empty read looked.
    async fn batch(&mut self, summary: &mut RunSummary) -> eventcore::Result<Batch> {
        // A clone shares the pool and the SQL; it frees `self` for the projection below.
        let store = self.store.clone();
        let sql = store.sql();
        let mut conn = store
            .pool()
            .acquire()
            .await
            .map_err(|e| map_sqlx_error(e, "starting a projection batch", None))?;
        let mut tx = conn
            .begin()
            .await
            .map_err(|e| map_sqlx_error(e, "starting a projection batch", None))?;
        sqlx::query(&sql.claim_checkpoint)
            .bind(&self.name)
            .execute(&mut *tx)
            .await
            .map_err(|e| map_sqlx_error(e, "claiming the checkpoint", None))?;
        let (position,): (i64,) = sqlx::query_as(&sql.lock_checkpoint)
            .bind(&self.name)
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| map_sqlx_error(e, "locking the checkpoint", None))?;
        let query = self.projection.filter().query(
            (position > 0).then(|| GlobalPosition::new(position as u64)),
            self.batch_size,
        );
        let types: Option<Vec<&str>> = query
            .event_types()
            .map(|types| types.iter().map(|t| t.as_str()).collect());
        let rows = sqlx::query(&sql.read_all)
            .bind(position)
            .bind(crate::store::prefix_param(&query))
            .bind(types)
            .bind(i64::try_from(self.batch_size).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| map_sqlx_error(e, "reading the global log", None))?;
        let read = log_read_from_rows(&query, &rows)?;
        if read.events.is_empty() {
            return Ok(Batch::Empty {
                scanned: read.scanned,
            });
        }
        let events = read.events;
        let mut processed: Option<GlobalPosition> = None;
        let mut failure = None;
        for event in &events {
            match self.process(&mut tx, event).await? {
                Ok(applied) => {
                    if applied {
                        summary.applied += 1;
                    } else {
                        summary.parked += 1;
                    }
                    processed = Some(event.global_position);
                }
                Err(error) => {
                    failure = Some(error);
                    break;
                }
            }
        }
        if let Some(position) = processed {
            sqlx::query(&sql.advance_checkpoint)
                .bind(&self.name)
                .bind(i64::try_from(position.value()).unwrap_or(i64::MAX))
                .execute(&mut *tx)
                .await
                .map_err(|e| map_sqlx_error(e, "saving the checkpoint", None))?;
        }
        tx.commit()
            .await
            .map_err(|e| map_sqlx_error(e, "committing a projection batch", None))?;
        match failure {
            Some(error) => Err(error),
            None => Ok(Batch::Applied),
        }
    }

    /// Applies one event under a savepoint, retrying per the policy. `Ok(Ok(true))`
    /// applied, `Ok(Ok(false))` parked, `Ok(Err(_))` stop here.
    async fn process(
        &mut self,
        tx: &mut PgConnection,
        event: &RecordedEvent,
    ) -> eventcore::Result<Result<bool, eventcore::Error>> {
        let decoded = match event.decode::<P::Event>() {
            Ok(decoded) => decoded,
            Err(error) => return self.give_up(tx, event, Box::new(error)).await,
        };
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let mut savepoint = tx
                .begin()
                .await
                .map_err(|e| map_sqlx_error(e, "opening a savepoint", None))?;
            match self.projection.apply(&mut savepoint, &decoded).await {
                Ok(()) => {
                    savepoint
                        .commit()
                        .await
                        .map_err(|e| map_sqlx_error(e, "releasing a savepoint", None))?;
                    return Ok(Ok(true));
                }
                Err(error) => {
                    savepoint
                        .rollback()
                        .await
                        .map_err(|e| map_sqlx_error(e, "rolling back a savepoint", None))?;
                    if attempt >= self.policy_attempts() {
                        return self.give_up(tx, event, Box::new(error)).await;
                    }
                    let delay = self.policy_delay(attempt);
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                }
            }
        }
    }

    async fn give_up(
        &mut self,
        tx: &mut PgConnection,
        event: &RecordedEvent,
        error: eventcore::BoxError,
    ) -> eventcore::Result<Result<bool, eventcore::Error>> {
        let message = eventcore::error_chain(&*error);
        match self.policy_on_failure() {
            OnFailure::Stop => Ok(Err(eventcore::Error::ProjectionFailed {
                projection: self.name.clone(),
                stream: event.stream_id.clone(),
                version: event.stream_version,
                position: event.global_position,
                message,
                source: Some(error),
            })),
            OnFailure::Park => {
                self.store
                    .park_on(tx, ParkedEvent::new(&self.key()?, event, message))
                    .await?;
                Ok(Ok(false))
            }
        }
    }

    fn policy_attempts(&self) -> u32 {
        self.policy.max_attempts()
    }

    fn policy_delay(&self, attempt: u32) -> Duration {
        self.policy.delay_before_retry(attempt)
    }

    fn policy_on_failure(&self) -> OnFailure {
        self.policy.on_failure()
    }
}

/// Whether `shutdown` has completed, without waiting for it.
async fn stopped<F: Future<Output = ()> + Unpin>(shutdown: &mut F) -> bool {
    tokio::select! {
        biased;
        () = shutdown => true,
        () = std::future::ready(()) => false,
    }
}
