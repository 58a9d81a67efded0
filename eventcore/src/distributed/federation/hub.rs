//! The running hub: a subscription that routes into the hub's store, and the
//! publisher of that store.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::watch;
use tracing::Instrument;

use super::FederationError;
use super::rules::{Router, Routing};
use crate::distributed::envelope::DistributedEvent;
use crate::distributed::names::ServiceId;
use crate::distributed::publisher::{PublishSummary, PublisherRunner};
use crate::distributed::subscriber::{EventHandler, ParkedDelivery, Processed, SubscriptionRunner};
use crate::distributed::transport::{Delivery, EventPublisher, EventSubscriber};
use crate::error::Result;
use crate::executor::{CommandExecutor, RetryPolicy};
use crate::leadership::LeaderElection;
use crate::names::{IdempotencyKey, ProjectionName, StreamId};
use crate::process::Dispatcher;
use crate::projection::{CheckpointStore, ProjectionErrorPolicy};
use crate::store::{AppendRequest, EventStore, StreamAppend};
use crate::types::ExpectedVersion;

/// Routes each delivered event into the hub's store.
struct HubHandler {
    router: Arc<Router>,
    hub: Arc<str>,
}

impl EventHandler for HubHandler {
    async fn handle(
        &mut self,
        event: &DistributedEvent,
        dispatcher: &mut Dispatcher<'_>,
    ) -> Result<()> {
        let span = tracing::info_span!(
            "eventcore.federation.route",
            hub = %self.hub,
            source = %event.service_id,
            event_type = %event.event_type,
            event_id = %event.event_id,
            outcome = tracing::field::Empty,
        );
        let _entered = span.enter();
        let forwarded = match self.router.route(event)? {
            Routing::Forward(forwarded) => forwarded,
            Routing::Unmatched => {
                span.record("outcome", "unmatched");
                crate::metrics::federation_event(&self.hub, "unmatched");
                return Ok(());
            }
            Routing::Loop => {
                span.record("outcome", "loop");
                tracing::warn!(hub = %self.hub, event_id = %event.event_id, "not forwarding an event this hub forwarded before (a loop)");
                crate::metrics::federation_event(&self.hub, "loop");
                return Ok(());
            }
            Routing::HopLimit => {
                span.record("outcome", "hop_limit");
                tracing::warn!(hub = %self.hub, event_id = %event.event_id, "not forwarding an event past the hop limit");
                crate::metrics::federation_event(&self.hub, "hop_limit");
                return Ok(());
            }
        };
        drop(_entered);
        // Every copy of this event in one atomic append, once: the key is committed with
        // them, so a redelivery (after a crash before the acknowledgement) writes nothing.
        // One participating stream per hub stream, in the order of its first copy.
        let mut streams: Vec<StreamAppend> = Vec::new();
        let mut targets: Vec<ServiceId> = Vec::new();
        for copy in forwarded {
            match streams.iter_mut().find(|s| s.stream_id == copy.stream) {
                Some(stream) => stream.events.push(copy.event),
                None => streams.push(StreamAppend::new(
                    copy.stream,
                    ExpectedVersion::Any,
                    vec![copy.event],
                )),
            }
            targets.push(copy.target);
        }
        let mut request =
            AppendRequest::new().with_idempotency_key(IdempotencyKey::try_new(format!(
                "federation/{}/{}/{}",
                self.hub, event.service_id, event.event_id
            ))?);
        for stream in streams {
            request = request.with_stream(stream);
        }
        let outcome = dispatcher
            .executor()
            .store()
            .append(request)
            .instrument(span.clone())
            .await?;
        span.record(
            "outcome",
            if outcome.deduplicated {
                "already_forwarded"
            } else {
                "forwarded"
            },
        );
        if !outcome.deduplicated {
            crate::metrics::federation_event(&self.hub, "forwarded");
            for target in &targets {
                crate::metrics::federation_forwarded(&self.hub, target.as_str());
            }
        }
        Ok(())
    }
}

/// A federation hub: consumes its sources' topics, routes each event by its
/// [`Router`] into its own store, and publishes that store to its targets' topics (see
/// the [module](super)).
pub struct FederationHub {
    router: Arc<Router>,
    subscription: SubscriptionRunner<HubHandler>,
    publisher: PublisherRunner,
    election_key: ProjectionName,
}

impl std::fmt::Debug for FederationHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FederationHub")
            .field("router", &self.router)
            .finish_non_exhaustive()
    }
}

impl FederationHub {
    /// The hub routing with `router`, writing to `store` (its own: the outbox its
    /// publisher reads, and where its subscription keeps its keys and parked events),
    /// with `checkpoints` for the publisher, consuming through `subscriber` and
    /// publishing through `publisher` (whose service must be the hub's).
    ///
    /// # Errors
    ///
    /// [`FederationError::WrongPublisher`] (as [`crate::Error::Federation`]), and the
    /// errors of [`SubscriptionRunner::new`] and [`PublisherRunner::new`].
    pub fn new(
        router: Router,
        store: Arc<dyn EventStore>,
        checkpoints: Arc<dyn CheckpointStore>,
        subscriber: Arc<dyn EventSubscriber>,
        publisher: Arc<dyn EventPublisher>,
    ) -> Result<Self> {
        if publisher.service() != router.hub() {
            return Err(FederationError::WrongPublisher {
                hub: router.hub().clone(),
                publisher: publisher.service().clone(),
            }
            .into());
        }
        let router = Arc::new(router);
        let handler = HubHandler {
            router: Arc::clone(&router),
            hub: Arc::from(router.hub().as_str()),
        };
        let subscription = SubscriptionRunner::new(
            subscriber,
            router.subscription_spec(),
            handler,
            CommandExecutor::new(Arc::clone(&store)),
        )?;
        let publisher =
            PublisherRunner::new(store, checkpoints, publisher, router.publication_policy()?)?;
        let election_key = ProjectionName::try_new(format!("federation-{}", router.hub()))?;
        Ok(FederationHub {
            router,
            subscription,
            publisher,
            election_key,
        })
    }

    /// Retries of a failing transformation, and what happens after the last (default:
    /// 5 attempts, then park).
    pub fn with_error_policy(mut self, policy: ProjectionErrorPolicy) -> Self {
        self.subscription = self.subscription.with_error_policy(policy);
        self
    }

    /// The publisher's batch size.
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.publisher = self.publisher.with_batch_size(batch_size);
        self
    }

    /// The router.
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// Routes one delivery into the store (what [`FederationHub::run`] does with each;
    /// acknowledge it after this returns).
    ///
    /// # Errors
    ///
    /// As [`SubscriptionRunner::process`].
    pub async fn process(&mut self, delivery: &Delivery) -> Result<Processed> {
        self.subscription.process(delivery).await
    }

    /// Opens the hub's subscription to its sources (see
    /// [`SubscriptionRunner::open`]).
    ///
    /// # Errors
    ///
    /// The transport's errors.
    pub async fn open(&mut self) -> Result<()> {
        self.subscription.open().await
    }

    /// Routes every source event the subscription holds now, and returns how many (a
    /// step-by-step driver: [`SubscriptionRunner::process_available`]).
    ///
    /// # Errors
    ///
    /// As [`SubscriptionRunner::process_available`].
    pub async fn process_available(&mut self) -> Result<u64> {
        self.subscription.process_available().await
    }

    /// Publishes what the store holds and the broker does not yet.
    ///
    /// # Errors
    ///
    /// As [`PublisherRunner::publish_available`].
    pub async fn publish_available(&mut self) -> Result<PublishSummary> {
        self.publisher.publish_available().await
    }

    /// The source events parked (a transformation kept failing) or held behind one.
    ///
    /// # Errors
    ///
    /// The store's errors.
    pub async fn parked(&mut self) -> Result<Vec<ParkedDelivery>> {
        self.subscription.parked().await
    }

    /// Routes the parked and held events of one source stream again (after the
    /// transformation was fixed) and releases it; returns how many were routed.
    ///
    /// # Errors
    ///
    /// As [`SubscriptionRunner::redrive`].
    pub async fn redrive(&mut self, service: &ServiceId, stream: &StreamId) -> Result<usize> {
        self.subscription.redrive(service, stream).await
    }

    /// Consumes, routes and publishes until `shutdown` completes (or either half fails
    /// for good, which stops the other).
    ///
    /// # Errors
    ///
    /// What [`SubscriptionRunner::run`] or [`PublisherRunner::run`] returns.
    pub async fn run(&mut self, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
        let (stop, stopped) = watch::channel(false);
        let wait = |mut stopped: watch::Receiver<bool>| async move {
            let _ = stopped.wait_for(|s| *s).await;
        };
        let FederationHub {
            subscription,
            publisher,
            ..
        } = self;
        let consuming = async {
            let result = subscription.run(wait(stopped.clone())).await;
            let _ = stop.send(true);
            result
        };
        let publishing = async {
            let result = publisher.run(wait(stopped.clone())).await;
            let _ = stop.send(true);
            result
        };
        let outer = async {
            tokio::select! {
                () = shutdown => { let _ = stop.send(true); }
                () = wait(stopped.clone()) => {}
            }
        };
        let (consumed, published, ()) = tokio::join!(consuming, publishing, outer);
        match (consumed, published) {
            (Err(consuming), Err(publishing)) => {
                tracing::error!(
                    error = %crate::error::error_chain(&publishing),
                    "the federation hub's publisher failed too"
                );
                Err(consuming)
            }
            (consumed, published) => consumed.and(published),
        }
    }

    /// Like [`FederationHub::run`], as the one active hub of its name among its
    /// instances (election name `federation-<hub>`): waits to be elected, runs while it
    /// leads, and waits again when it loses the leadership, until `shutdown`
    /// completes.
    ///
    /// # Errors
    ///
    /// As [`FederationHub::run`], and the election's errors that are not retryable.
    pub async fn run_as_leader(
        &mut self,
        election: &dyn LeaderElection,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<()> {
        let mut shutdown = std::pin::pin!(shutdown);
        let retry = RetryPolicy::default();
        loop {
            let Some(mut leadership) = crate::leadership::elected(
                election,
                &self.election_key,
                |failures| retry.delay_before_retry(failures),
                &mut shutdown,
            )
            .await?
            else {
                return Ok(());
            };
            let hub = self.router.hub().clone();
            tracing::info!(%hub, "elected federation hub");
            crate::metrics::leadership("federation", hub.as_str(), true);
            let (ended, mut ending) = watch::channel(false);
            let mut running = std::pin::pin!(self.run(async move {
                let _ = ending.wait_for(|ended| *ended).await;
            }));
            let for_good = tokio::select! {
                // It ends by itself only when a half failed for good.
                result = &mut running => result.map(|()| true),
                () = &mut shutdown => {
                    let _ = ended.send(true);
                    running.await.map(|()| true)
                }
                () = leadership.lost() => {
                    let _ = ended.send(true);
                    running.await.map(|()| false)
                }
            };
            crate::metrics::leadership("federation", hub.as_str(), false);
            if for_good? {
                return Ok(());
            }
            tracing::warn!(%hub, "lost the federation hub's leadership; waiting to be elected again");
        }
    }
}
