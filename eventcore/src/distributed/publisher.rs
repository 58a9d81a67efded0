//! The publisher: the service's event store is the outbox.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use chrono::Utc;
use tracing::Instrument;

use super::envelope::DistributedEvent;
use super::names::ServiceId;
use super::policy::PublicationPolicy;
use super::transport::{EventPublisher, Publication};
use crate::error::Result;
use crate::executor::RetryPolicy;
use crate::leadership::LeaderElection;
use crate::names::ProjectionName;
use crate::projection::CheckpointStore;
use crate::store::{EventStore, LogQuery};
use crate::types::GlobalPosition;

/// What one [`PublisherRunner::publish_available`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PublishSummary {
    /// Events published (acknowledged by the broker) by this call.
    pub published: u64,
    /// Where the publisher's reading of the log stands: every public event at or below
    /// it is held by the broker.
    pub position: Option<GlobalPosition>,
}

/// Live figures of a publisher, readable while it runs (cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct PublisherMetrics {
    inner: Arc<MetricsInner>,
}

#[derive(Debug, Default)]
struct MetricsInner {
    published: AtomicU64,
    position: AtomicU64,
    leading: AtomicBool,
}

impl PublisherMetrics {
    /// Events published since the runner was made.
    pub fn published(&self) -> u64 {
        self.inner.published.load(Ordering::Relaxed)
    }

    /// The log position up to which every public event is held by the broker (0 before
    /// the first).
    pub fn position(&self) -> u64 {
        self.inner.position.load(Ordering::Relaxed)
    }

    /// Whether this runner is the elected publisher now.
    pub fn is_leading(&self) -> bool {
        self.inner.leading.load(Ordering::Relaxed)
    }
}

/// Publishes a service's public events, in the order of its store's global log.
///
/// The store is the outbox: the runner reads the log (there is no second write to
/// forget), selects public events with a [`PublicationPolicy`] and hands them to an
/// [`EventPublisher`] in batches (one wait for the broker's acknowledgements per batch,
/// not per event). Where it starts is the broker's answer, not its own checkpoint: on
/// start and after any failure it asks [`EventPublisher::last_published`] and goes on
/// right after the last event the broker holds, so acknowledged events a broker lost in
/// a crash are published again, and events published just before a crash of the runner
/// are not. Its checkpoint (under `publisher-<service>` in the [`CheckpointStore`]) never
/// passes an event the broker has not acknowledged; it is what the metrics and a
/// restart read.
///
/// Run one per service ([`PublisherRunner::run_as_leader`] elects one among instances).
pub struct PublisherRunner {
    store: Arc<dyn EventStore>,
    checkpoints: Arc<dyn CheckpointStore>,
    publisher: Arc<dyn EventPublisher>,
    policy: PublicationPolicy,
    key: ProjectionName,
    batch_size: usize,
    retry: RetryPolicy,
    /// `Some(position)` once reconciled with the broker: every public event at or below
    /// `position` is held. `None`: ask the broker first.
    cursor: Option<Option<GlobalPosition>>,
    /// The position of the last event the broker acknowledged (or held when asked):
    /// what `last_published` must answer while nothing was lost.
    last_public: Option<GlobalPosition>,
    reconcile_interval: std::time::Duration,
    metrics: PublisherMetrics,
}

impl PublisherRunner {
    /// A publisher of `store`'s public events through `publisher`, keeping its
    /// checkpoint in `checkpoints`.
    ///
    /// # Errors
    ///
    /// [`crate::Error::InvalidProjectionName`] if `publisher-<service>` is not a valid name (it
    /// always is for a valid [`super::ServiceId`]).
    pub fn new(
        store: Arc<dyn EventStore>,
        checkpoints: Arc<dyn CheckpointStore>,
        publisher: Arc<dyn EventPublisher>,
        policy: PublicationPolicy,
    ) -> Result<Self> {
        let key = ProjectionName::try_new(format!("publisher-{}", publisher.service()))?;
        Ok(PublisherRunner {
            store,
            checkpoints,
            publisher,
            policy,
            key,
            batch_size: 5_000,
            retry: RetryPolicy::default(),
            cursor: None,
            last_public: None,
            reconcile_interval: std::time::Duration::from_secs(10),
            metrics: PublisherMetrics::default(),
        })
    }

    /// The most events read from the log and published per batch (default 5,000; at
    /// least 1). Each batch is one wait for the broker's acknowledgements; while
    /// catching up it overlaps the read of the next page and the save of the last
    /// checkpoint. Larger batches keep a broker's publish window full for longer (W6 in
    /// `docs/performance.md`), at the cost of memory: two pages of events and one batch
    /// of envelopes are held at once (with 10 KiB payloads and the default, some
    /// 150 MB). Lower it for large events.
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// The backoff between attempts after a retryable failure of the broker or the
    /// store, in [`PublisherRunner::run`].
    pub fn with_retry_policy(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// How often [`PublisherRunner::run`] asks the broker whether its publication still
    /// ends where it should (default 10 s): a broker that lost acknowledged events in a
    /// crash gets them again within this interval even when the service writes nothing
    /// new, or only private events. (A new public event finds the loss sooner: its
    /// publish is refused, and the run reconciles.)
    pub fn with_reconcile_interval(mut self, interval: std::time::Duration) -> Self {
        self.reconcile_interval = interval;
        self
    }

    /// The log's next page after `after`, as far as the store lets readers see.
    async fn read_page(&self, after: Option<GlobalPosition>) -> Result<crate::store::LogRead> {
        self.store
            .read_log(
                &LogQuery::new()
                    .with_after(after)
                    .with_limit(self.batch_size),
            )
            .await
    }

    /// Publishes `batch` (nothing when it is empty).
    async fn publish_batch(&self, service: &ServiceId, batch: &[Publication]) -> Result<()> {
        let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
            return Ok(());
        };
        // OpenTelemetry's messaging conventions: a producer span "send <service>" for
        // the batch, linked to the context each event was written in.
        let span = tracing::info_span!(
            "eventcore.publish",
            otel.name = %format_args!("send {service}"),
            otel.kind = "producer",
            messaging.operation.type = "send",
            messaging.batch.message_count = batch.len(),
            service = %service,
            events = batch.len(),
            first = first.event.global_position.value(),
            last = last.event.global_position.value(),
        );
        #[cfg(feature = "opentelemetry")]
        for publication in batch {
            if let Some(context) = &publication.event.trace_context {
                crate::otel::link_to(&span, context);
            }
        }
        self.publisher.publish(batch).instrument(span).await?;
        // Counted per run of one topic (a page is mostly one topic or a few).
        let service = service.as_str();
        let mut from = 0;
        while let Some(first) = batch.get(from) {
            let run = batch[from..]
                .iter()
                .take_while(|p| p.topic == first.topic)
                .count();
            crate::metrics::events_published(service, first.topic.as_str(), run as u64);
            from += run;
        }
        Ok(())
    }

    /// Saves the checkpoint at `position` (every public event up to it acknowledged).
    async fn save_checkpoint(&self, position: GlobalPosition) -> Result<()> {
        self.checkpoints
            .save_checkpoint(&self.key, position)
            .await?;
        self.metrics
            .inner
            .position
            .store(position.value(), Ordering::Relaxed);
        crate::metrics::publisher_position(self.publisher.service().as_str(), position.value());
        Ok(())
    }

    /// The live figures.
    pub fn metrics(&self) -> PublisherMetrics {
        self.metrics.clone()
    }

    /// The name its checkpoint and leadership are kept under.
    pub fn name(&self) -> &ProjectionName {
        &self.key
    }

    /// Asks the broker where the service's publication ends and goes on from there.
    async fn reconcile(&mut self) -> Result<Option<GlobalPosition>> {
        self.publisher.declare_topics(&self.policy.topics()).await?;
        let held = self.publisher.last_published().await?;
        let checkpoint = self.checkpoints.load_checkpoint(&self.key).await?;
        if checkpoint > held {
            tracing::warn!(
                service = %self.publisher.service(),
                checkpoint = ?checkpoint.map(GlobalPosition::value),
                held = ?held.map(GlobalPosition::value),
                "the broker holds less than was acknowledged; publishing the difference again"
            );
        }
        self.cursor = Some(held);
        self.last_public = held;
        Ok(held)
    }

    /// Publishes every public event available now, then returns. After a failure the
    /// next call starts by asking the broker where its publication ends.
    ///
    /// # Errors
    ///
    /// [`crate::Error::Transport`] when the broker fails (retryable or not, as its
    /// [`super::TransportError`] says); the store's errors; [`crate::Error::UnreadableEvent`]
    /// for a damaged public event (it is never skipped: publishing stops at it).
    pub async fn publish_available(&mut self) -> Result<PublishSummary> {
        self.pass(true).await
    }

    /// One pass; `verify`: first ask the broker whether its publication still ends where
    /// it did. Without it (a live pass woken by new events), a broker that lost events
    /// refuses the first publish instead (every transport refuses a publish chained on
    /// an end it no longer holds: the conformance suite checks it), and the run
    /// reconciles after that failure: one round trip to the broker less per pass.
    async fn pass(&mut self, verify: bool) -> Result<PublishSummary> {
        let result = self.pass_inner(verify).await;
        if result.is_err() {
            self.cursor = None;
        }
        result
    }

    async fn pass_inner(&mut self, verify: bool) -> Result<PublishSummary> {
        if verify && self.cursor.is_some() {
            // The broker may have lost acknowledged events since (a crash before it
            // synced them): check where the publication ends before going on.
            let held = self.publisher.last_published().await?;
            if held != self.last_public {
                tracing::warn!(
                    service = %self.publisher.service(),
                    expected = ?self.last_public.map(GlobalPosition::value),
                    held = ?held.map(GlobalPosition::value),
                    "the broker's publication does not end where it did; publishing from there"
                );
                self.cursor = None;
            }
        }
        let mut cursor = match self.cursor {
            Some(cursor) => cursor,
            None => self.reconcile().await?,
        };
        let mut published = 0;
        let mut read = self.read_page(cursor).await?;
        // The page published before this one, when its checkpoint is saved while this
        // one is published (it never passes what the broker acknowledged).
        let mut unsaved: Option<GlobalPosition> = None;
        while let Some(scanned) = read.scanned {
            let service = self.publisher.service().clone();
            let now = Utc::now();
            let mut batch = Vec::new();
            for event in &read.events {
                if let Some(topic) = self.policy.topic_of(event) {
                    let envelope = DistributedEvent::from_recorded(event, &service, now)?;
                    batch.push(Publication::new(topic.clone(), envelope));
                }
            }
            // A full page means more is waiting (catching up): the broker is kept busy,
            // the next page read and the last checkpoint saved while this one is
            // published. At the head of the log (a live pass), one step after another:
            // the next read then sees what committed during this publish.
            let next = if read.events.len() >= self.batch_size {
                let save = async {
                    match unsaved {
                        Some(position) => self.save_checkpoint(position).await,
                        None => Ok(()),
                    }
                };
                let (sent, next, saved) = tokio::join!(
                    self.publish_batch(&service, &batch),
                    self.read_page(Some(scanned)),
                    save
                );
                sent?;
                saved?;
                unsaved = Some(scanned);
                Some(next)
            } else {
                self.publish_batch(&service, &batch).await?;
                // Everything public up to `scanned` is acknowledged now.
                self.save_checkpoint(scanned).await?;
                unsaved = None;
                None
            };
            if let Some(last) = batch.last() {
                self.last_public = Some(last.event.global_position);
                published += batch.len() as u64;
                // More is waiting after a full page: the broker's copy is as old as this.
                crate::metrics::publisher_lag(
                    service.as_str(),
                    next.is_some().then_some(last.event.occurred_at),
                );
                self.metrics
                    .inner
                    .published
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
            cursor = Some(scanned);
            self.cursor = Some(cursor);
            read = match next {
                Some(next) => next?,
                None => self.read_page(Some(scanned)).await?,
            };
        }
        if let Some(position) = unsaved {
            self.save_checkpoint(position).await?;
        }
        Ok(PublishSummary {
            published,
            position: cursor,
        })
    }

    /// Publishes what is there, then follows the log live until `shutdown` completes.
    /// Retryable failures (of the broker or the store) are retried with backoff, after
    /// asking the broker where its publication ends; others end the run.
    ///
    /// # Errors
    ///
    /// A failure that is not retryable.
    pub async fn run(&mut self, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut failures = 0;
        // The first pass asks the broker first (see `pass`), and then one pass per
        // reconcile interval, whatever the log does meanwhile: a deadline, not a timer
        // re-armed on every wake-up (private events alone publish nothing, so no
        // refused publish would reveal a loss while they keep coming).
        let mut next_check = tokio::time::Instant::now();
        loop {
            let now = tokio::time::Instant::now();
            let verify = now >= next_check;
            if verify {
                next_check = now
                    .checked_add(self.reconcile_interval)
                    .unwrap_or_else(|| now + std::time::Duration::from_secs(60 * 60 * 24 * 365));
            }
            // Cancelling a pass at shutdown is safe: what the broker acknowledged is
            // found again by the next start, which asks the broker.
            let passed = tokio::select! {
                passed = self.pass(verify) => passed.map(|_| ()),
                () = &mut shutdown => return Ok(()),
            };
            let waited = match passed {
                Ok(()) => {
                    let after = self.cursor.flatten();
                    tokio::select! {
                        waited = self.store.wait_for_events(after) => waited,
                        () = tokio::time::sleep_until(next_check) => Ok(()),
                        () = &mut shutdown => return Ok(()),
                    }
                }
                Err(error) => Err(error),
            };
            match waited {
                Ok(()) => failures = 0,
                Err(error) if error.is_retryable() => {
                    failures += 1;
                    self.cursor = None;
                    tracing::warn!(service = %self.publisher.service(), %error, failures, "publishing failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(self.retry.delay_before_retry(failures)) => {}
                        () = &mut shutdown => return Ok(()),
                    }
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Like [`PublisherRunner::run`], as the one elected publisher of the service among
    /// its instances: waits to be elected, publishes while it leads, and waits again
    /// when it loses the leadership, until `shutdown` completes.
    ///
    /// # Errors
    ///
    /// As [`PublisherRunner::run`], and the election's errors that are not retryable.
    pub async fn run_as_leader(
        &mut self,
        election: &dyn LeaderElection,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<()> {
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let retry = &self.retry;
            let Some(mut leadership) = crate::leadership::elected(
                election,
                &self.key,
                |failures| retry.delay_before_retry(failures),
                &mut shutdown,
            )
            .await?
            else {
                return Ok(());
            };
            tracing::info!(service = %self.publisher.service(), "elected publisher");
            self.metrics.inner.leading.store(true, Ordering::Relaxed);
            crate::metrics::leadership("publisher", self.publisher.service().as_str(), true);
            // Another instance published meanwhile: ask the broker again.
            self.cursor = None;
            let stopped = {
                let lost = leadership.lost();
                let either = async {
                    tokio::select! {
                        () = &mut shutdown => true,
                        () = lost => false,
                    }
                };
                let mut either = std::pin::pin!(either);
                let result = tokio::select! {
                    result = self.run(std::future::pending()) => result.map(|()| true),
                    stopped = &mut either => Ok(stopped),
                };
                self.metrics.inner.leading.store(false, Ordering::Relaxed);
                crate::metrics::leadership("publisher", self.publisher.service().as_str(), false);
                result?
            };
            if stopped {
                return Ok(());
            }
            tracing::warn!(service = %self.publisher.service(), "publisher leadership lost");
        }
    }
}

impl std::fmt::Debug for PublisherRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublisherRunner")
            .field("service", self.publisher.service())
            .field("policy", &self.policy)
            .field("batch_size", &self.batch_size)
            .field("cursor", &self.cursor)
            .finish_non_exhaustive()
    }
}
