//! What a service process tells its operators and orchestrator about itself: whether
//! the event store and the broker answer, and how far behind its projections, process
//! managers, publisher and subscriptions are.
//!
//! A [`HealthChecks`] holds a service's checks ([`HealthCheck`]); [`HealthChecks::report`]
//! runs them all at once, each under a timeout, and returns a [`HealthReport`] whose
//! status is the worst of its components'. Built-in checks:
//!
//! - [`StoreHealth`]: the store answers a read of its head.
//! - [`CheckpointLag`]: a projection's (or process manager's) checkpoint against the
//!   store's head: positions behind, and the age of the oldest event it has not passed.
//! - `PublisherHealth` (feature `distributed`): the broker answers, and what it holds of
//!   the service's publication against the store's head.
//! - `SubscriptionHealth` (feature `distributed`): the broker answers, and what a
//!   subscription of the service has not acknowledged yet, and how old the oldest of
//!   that is.
//!
//! Statuses: [`HealthStatus::Up`]; [`HealthStatus::Degraded`] (working, but behind more
//! than its limit: ready to serve, worth an alert); [`HealthStatus::Down`] (a dependency
//! does not answer, or the check failed or timed out). A readiness probe should fail only
//! on `Down`.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use eventcore::health::{CheckpointLag, HealthChecks, HealthStatus, StoreHealth};
//! use eventcore::ProjectionName;
//! use eventcore_memory::InMemoryEventStore;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> eventcore::Result<()> {
//! let store = InMemoryEventStore::new();
//! let checks = HealthChecks::new("orders")
//!     .with_check(StoreHealth::new(Arc::new(store.clone())))
//!     .with_check(
//!         CheckpointLag::new(ProjectionName::try_new("order-view")?, Arc::new(store.clone()), Arc::new(store))
//!             .with_max_lag(Duration::from_secs(30)),
//!     );
//! let report = checks.report().await;
//! assert_eq!(report.status, HealthStatus::Up);
//! assert_eq!(report.components.len(), 2);
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ProjectionName;
use crate::projection::{CheckpointStore, ProjectionFilter};
use crate::store::EventStore;
use crate::types::GlobalPosition;

/// How a component, or the whole service, stands. Ordered from best to worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    /// Working and within its limits.
    Up,
    /// Working, but behind more than its limit.
    Degraded,
    /// Not working: a dependency does not answer, or the check failed or timed out.
    Down,
}

impl HealthStatus {
    /// `up`, `degraded` or `down`.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthStatus::Up => "up",
            HealthStatus::Degraded => "degraded",
            HealthStatus::Down => "down",
        }
    }
}

impl fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one check found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ComponentHealth {
    /// What was checked (`store`, `projection order-view`, `publisher orders`, ...).
    pub name: String,
    /// How it stands.
    pub status: HealthStatus,
    /// Why, when it is not up (an error's text, the limit passed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Global log positions between what it has passed and the store's head: an upper
    /// bound on the events it still has to look at (positions of events it skips, and
    /// gaps, count too); 0 when nothing it selects lies beyond. For a subscription, the
    /// events the broker holds for it that it has not acknowledged. `None` where it
    /// does not apply.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag_positions: Option<u64>,
    /// How long ago the store recorded the oldest event it has still to handle; 0 when
    /// it is caught up. `None` where it does not apply.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag_seconds: Option<f64>,
}

impl ComponentHealth {
    /// `name` is up.
    pub fn up(name: impl Into<String>) -> Self {
        ComponentHealth {
            name: name.into(),
            status: HealthStatus::Up,
            detail: None,
            lag_positions: None,
            lag_seconds: None,
        }
    }

    /// `name` is degraded, because of `detail`.
    pub fn degraded(name: impl Into<String>, detail: impl Into<String>) -> Self {
        ComponentHealth {
            status: HealthStatus::Degraded,
            detail: Some(detail.into()),
            ..ComponentHealth::up(name)
        }
    }

    /// `name` is down, because of `detail`.
    pub fn down(name: impl Into<String>, detail: impl Into<String>) -> Self {
        ComponentHealth {
            status: HealthStatus::Down,
            detail: Some(detail.into()),
            ..ComponentHealth::up(name)
        }
    }

    /// With its lag.
    pub fn with_lag(mut self, positions: u64, seconds: f64) -> Self {
        self.lag_positions = Some(positions);
        self.lag_seconds = Some(seconds);
        self
    }
}

/// What a service's checks found, all together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HealthReport {
    /// The service.
    pub service: String,
    /// The worst of its components' statuses (`up` when it has none).
    pub status: HealthStatus,
    /// When the checks started.
    pub checked_at: DateTime<Utc>,
    /// Each check's finding, in the order the checks were added.
    pub components: Vec<ComponentHealth>,
}

impl HealthReport {
    /// Whether the service should receive work: every component is up or degraded.
    pub fn is_ready(&self) -> bool {
        self.status != HealthStatus::Down
    }

    /// The finding named `name`.
    pub fn component(&self, name: &str) -> Option<&ComponentHealth> {
        self.components.iter().find(|c| c.name == name)
    }
}

/// One thing a service checks about itself.
#[async_trait]
pub trait HealthCheck: Send + Sync + 'static {
    /// What it checks: the name of its [`ComponentHealth`], also when it times out.
    fn name(&self) -> String;

    /// Checks. A check never fails: it reports what went wrong as
    /// [`HealthStatus::Down`].
    async fn check(&self) -> ComponentHealth;
}

/// A service's health checks.
#[derive(Clone)]
pub struct HealthChecks {
    service: String,
    checks: Vec<Arc<dyn HealthCheck>>,
    timeout: Duration,
}

impl fmt::Debug for HealthChecks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthChecks")
            .field("service", &self.service)
            .field(
                "checks",
                &self.checks.iter().map(|c| c.name()).collect::<Vec<_>>(),
            )
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl HealthChecks {
    /// The default time a check may take before it counts as down.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

    /// No checks yet, for `service`.
    pub fn new(service: impl Into<String>) -> Self {
        HealthChecks {
            service: service.into(),
            checks: Vec::new(),
            timeout: Self::DEFAULT_TIMEOUT,
        }
    }

    /// Adds `check`.
    pub fn with_check(mut self, check: impl HealthCheck) -> Self {
        self.checks.push(Arc::new(check));
        self
    }

    /// Adds a check that is already shared.
    pub fn with_shared_check(mut self, check: Arc<dyn HealthCheck>) -> Self {
        self.checks.push(check);
        self
    }

    /// How long a check may take before it counts as down (Tokio's timer).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The service's name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Runs every check at once, each under the timeout.
    pub async fn report(&self) -> HealthReport {
        let checked_at = Utc::now();
        let runs = self.checks.iter().map(|check| {
            let check = Arc::clone(check);
            let timeout = self.timeout;
            async move {
                match tokio::time::timeout(timeout, check.check()).await {
                    Ok(found) => found,
                    Err(_) => ComponentHealth::down(
                        check.name(),
                        format!("the check did not answer within {timeout:?}"),
                    ),
                }
            }
        });
        let components = join_all(runs).await;
        let status = components
            .iter()
            .map(|c| c.status)
            .max()
            .unwrap_or(HealthStatus::Up);
        let report = HealthReport {
            service: self.service.clone(),
            status,
            checked_at,
            components,
        };
        if report.status != HealthStatus::Up {
            tracing::warn!(
                target: "eventcore::health",
                service = %report.service,
                status = %report.status,
                down = ?report.components.iter().filter(|c| c.status != HealthStatus::Up).map(|c| &c.name).collect::<Vec<_>>(),
                "service not healthy"
            );
        }
        report
    }
}

/// Polls every future to completion, concurrently, keeping their order (the core does
/// not depend on `futures`).
async fn join_all<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut set: Vec<std::pin::Pin<Box<F>>> = futures.map(Box::pin).collect();
    let mut done: Vec<Option<F::Output>> = set.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, slot) in set.iter_mut().zip(done.iter_mut()) {
            if slot.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(output) => *slot = Some(output),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    done.into_iter().flatten().collect()
}

/// The event store answers a read of its head.
#[derive(Clone)]
pub struct StoreHealth {
    store: Arc<dyn EventStore>,
}

impl fmt::Debug for StoreHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreHealth").finish_non_exhaustive()
    }
}

impl StoreHealth {
    /// A check of `store`.
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        StoreHealth { store }
    }
}

#[async_trait]
impl HealthCheck for StoreHealth {
    fn name(&self) -> String {
        "store".to_owned()
    }

    async fn check(&self) -> ComponentHealth {
        match self.store.head_position().await {
            Ok(_) => ComponentHealth::up(self.name()),
            Err(error) => ComponentHealth::down(self.name(), error.to_string()),
        }
    }
}

/// How far `passed` is behind the store's head: positions, and the age of the first
/// event after it that `filter` selects. Nothing selected after it: caught up (0, 0),
/// however many positions of other events lie beyond.
pub(crate) async fn lag_behind(
    store: &dyn EventStore,
    passed: Option<GlobalPosition>,
    filter: &ProjectionFilter,
) -> crate::Result<(u64, f64)> {
    let head = store.head_position().await?;
    let positions = match (head, passed) {
        (None, _) => 0,
        (Some(head), None) => head.value(),
        (Some(head), Some(passed)) => head.value().saturating_sub(passed.value()),
    };
    if positions == 0 {
        return Ok((0, 0.0));
    }
    let oldest = store.read_log(&filter.query(passed, 1)).await?;
    Ok(match oldest.events.first() {
        Some(event) => (
            positions,
            (Utc::now() - event.recorded_at)
                .to_std()
                .unwrap_or_default()
                .as_secs_f64(),
        ),
        None => (0, 0.0),
    })
}

/// A projection's or process manager's checkpoint against the store's head: down when
/// either cannot be read, degraded when the oldest event it has still to handle is
/// older than its limit (or it is more positions behind than its position limit).
///
/// Give it the projection's filter ([`CheckpointLag::with_filter`]): a runner saves its
/// checkpoint at events it handles, so a projection that selects few events keeps a
/// checkpoint far behind the head while it is in fact caught up; with its filter the
/// check sees that nothing it selects lies beyond (lag 0).
#[derive(Clone)]
pub struct CheckpointLag {
    projection: ProjectionName,
    store: Arc<dyn EventStore>,
    checkpoints: Arc<dyn CheckpointStore>,
    filter: ProjectionFilter,
    limits: LagLimits,
}

impl fmt::Debug for CheckpointLag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckpointLag")
            .field("projection", &self.projection)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl CheckpointLag {
    /// A check of `projection`'s checkpoint in `checkpoints` against `store`, with no
    /// limit (up whenever both answer).
    pub fn new(
        projection: ProjectionName,
        store: Arc<dyn EventStore>,
        checkpoints: Arc<dyn CheckpointStore>,
    ) -> Self {
        CheckpointLag {
            projection,
            store,
            checkpoints,
            filter: ProjectionFilter::all(),
            limits: LagLimits::default(),
        }
    }

    /// Measures against the events `filter` selects (the projection's
    /// [`crate::Projection::filter`]); every event by default.
    pub fn with_filter(mut self, filter: ProjectionFilter) -> Self {
        self.filter = filter;
        self
    }

    /// Degraded when the oldest event not passed was recorded longer ago than `max`.
    pub fn with_max_lag(mut self, max: Duration) -> Self {
        self.limits.max_lag = Some(max);
        self
    }

    /// Degraded when more than `max` log positions behind.
    pub fn with_max_positions(mut self, max: u64) -> Self {
        self.limits.max_positions = Some(max);
        self
    }
}

/// The limits of a lag check, past which it is degraded (none by default).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct LagLimits {
    /// The oldest event not passed may be this old.
    pub(crate) max_lag: Option<Duration>,
    /// It may be this many positions (events, for a subscription) behind.
    pub(crate) max_positions: Option<u64>,
}

impl LagLimits {
    /// Applies the limits to a lag of `positions` (`unit`: "positions", "events")
    /// whose oldest event is `seconds` old.
    pub(crate) fn judge(
        &self,
        name: String,
        (positions, seconds): (u64, f64),
        unit: &str,
    ) -> ComponentHealth {
        let too_old = self.max_lag.filter(|max| seconds > max.as_secs_f64());
        let too_far = self.max_positions.filter(|max| positions > *max);
        let found = match (too_old, too_far) {
            (Some(max), _) => ComponentHealth::degraded(
                name,
                format!(
                    "its oldest event not passed is {seconds:.1} s old, over the {max:?} limit"
                ),
            ),
            (None, Some(max)) => ComponentHealth::degraded(
                name,
                format!("{positions} {unit} behind, over the limit of {max}"),
            ),
            (None, None) => ComponentHealth::up(name),
        };
        found.with_lag(positions, seconds)
    }
}

#[async_trait]
impl HealthCheck for CheckpointLag {
    fn name(&self) -> String {
        format!("projection {}", self.projection)
    }

    async fn check(&self) -> ComponentHealth {
        let checkpoint = match self.checkpoints.load_checkpoint(&self.projection).await {
            Ok(checkpoint) => checkpoint,
            Err(error) => {
                return ComponentHealth::down(
                    self.name(),
                    format!("its checkpoint cannot be read: {error}"),
                );
            }
        };
        match lag_behind(&*self.store, checkpoint, &self.filter).await {
            Ok(lag) => self.limits.judge(self.name(), lag, "positions"),
            Err(error) => ComponentHealth::down(self.name(), error.to_string()),
        }
    }
}

#[cfg(feature = "distributed")]
pub use self::publisher::{PublisherHealth, SubscriptionHealth};

#[cfg(feature = "distributed")]
mod publisher {
    use super::*;
    use crate::distributed::{EventPublisher, EventSubscriber, SubscriptionSpec};

    /// The broker answers, and what it holds of the service's publication against the
    /// store's head (feature `distributed`): down when the broker or the store does not
    /// answer, degraded past its limits. Positions behind are an upper bound: events
    /// after the last published one that are not public count too; the age is that of
    /// the oldest event after it that its filter selects.
    #[derive(Clone)]
    pub struct PublisherHealth {
        publisher: Arc<dyn EventPublisher>,
        store: Arc<dyn EventStore>,
        filter: ProjectionFilter,
        limits: LagLimits,
    }

    impl fmt::Debug for PublisherHealth {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("PublisherHealth")
                .field("service", self.publisher.service())
                .field("limits", &self.limits)
                .finish_non_exhaustive()
        }
    }

    impl PublisherHealth {
        /// A check of `publisher`'s broker and of its publication of `store`'s log.
        pub fn new(publisher: Arc<dyn EventPublisher>, store: Arc<dyn EventStore>) -> Self {
            PublisherHealth {
                publisher,
                store,
                filter: ProjectionFilter::all(),
                limits: LagLimits::default(),
            }
        }

        /// Measures against the events `filter` selects (those the publication policy
        /// can publish: a stream prefix, event types); every event by default.
        pub fn with_filter(mut self, filter: ProjectionFilter) -> Self {
            self.filter = filter;
            self
        }

        /// Degraded when the oldest event after the last published one was recorded
        /// longer ago than `max`.
        pub fn with_max_lag(mut self, max: Duration) -> Self {
            self.limits.max_lag = Some(max);
            self
        }

        /// Degraded when more than `max` log positions behind.
        pub fn with_max_positions(mut self, max: u64) -> Self {
            self.limits.max_positions = Some(max);
            self
        }
    }

    #[async_trait]
    impl HealthCheck for PublisherHealth {
        fn name(&self) -> String {
            format!("publisher {}", self.publisher.service())
        }

        async fn check(&self) -> ComponentHealth {
            let published = match self.publisher.last_published().await {
                Ok(published) => published,
                Err(error) => {
                    return ComponentHealth::down(
                        self.name(),
                        format!("the broker does not answer: {error}"),
                    );
                }
            };
            match lag_behind(&*self.store, published, &self.filter).await {
                Ok(lag) => self.limits.judge(self.name(), lag, "positions"),
                Err(error) => ComponentHealth::down(
                    self.name(),
                    format!("the store does not answer: {error}"),
                ),
            }
        }
    }

    /// What a durable subscription has still to consume, as the broker sees it
    /// ([`EventSubscriber::backlog`], feature `distributed`): down when the broker does
    /// not answer, degraded when it does not exist yet (no runner opened it) or is past
    /// its limits. The events behind are those held for it that it has not
    /// acknowledged (in [`ComponentHealth::lag_positions`]); the age is that of the
    /// oldest of them, from when the publishing service recorded it (so it includes
    /// the publisher's own lag, and the skew between the two clocks).
    ///
    /// One check per partition of a split subscription: each has its own backlog.
    #[derive(Clone)]
    pub struct SubscriptionHealth {
        subscriber: Arc<dyn EventSubscriber>,
        spec: SubscriptionSpec,
        limits: LagLimits,
    }

    impl fmt::Debug for SubscriptionHealth {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("SubscriptionHealth")
                .field("spec", &self.spec)
                .field("limits", &self.limits)
                .finish_non_exhaustive()
        }
    }

    impl SubscriptionHealth {
        /// A check of subscription `spec` through `subscriber` (the runner's
        /// transport), with no limit: up whenever the broker answers and the
        /// subscription exists.
        pub fn new(subscriber: Arc<dyn EventSubscriber>, spec: SubscriptionSpec) -> Self {
            SubscriptionHealth {
                subscriber,
                spec,
                limits: LagLimits::default(),
            }
        }

        /// Degraded when the oldest event not acknowledged was recorded longer ago
        /// than `max`.
        pub fn with_max_lag(mut self, max: Duration) -> Self {
            self.limits.max_lag = Some(max);
            self
        }

        /// Degraded when more than `max` events are not acknowledged.
        pub fn with_max_events(mut self, max: u64) -> Self {
            self.limits.max_positions = Some(max);
            self
        }
    }

    #[async_trait]
    impl HealthCheck for SubscriptionHealth {
        fn name(&self) -> String {
            if self.spec.partition.is_whole() {
                format!("subscription {}", self.spec.name)
            } else {
                format!(
                    "subscription {} partition {}",
                    self.spec.name, self.spec.partition
                )
            }
        }

        async fn check(&self) -> ComponentHealth {
            match self.subscriber.backlog(&self.spec).await {
                Ok(Some(backlog)) => {
                    let seconds = backlog
                        .oldest_occurred_at
                        .and_then(|oldest| (Utc::now() - oldest).to_std().ok())
                        .unwrap_or_default()
                        .as_secs_f64();
                    self.limits
                        .judge(self.name(), (backlog.events, seconds), "events")
                }
                Ok(None) => ComponentHealth::degraded(
                    self.name(),
                    "the subscription does not exist yet: no runner has opened it",
                ),
                Err(error) => ComponentHealth::down(
                    self.name(),
                    format!("the broker does not answer: {error}"),
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(ComponentHealth);

    #[async_trait]
    impl HealthCheck for Fixed {
        fn name(&self) -> String {
            self.0.name.clone()
        }
        async fn check(&self) -> ComponentHealth {
            self.0.clone()
        }
    }

    struct Hangs;

    #[async_trait]
    impl HealthCheck for Hangs {
        fn name(&self) -> String {
            "broker".to_owned()
        }
        async fn check(&self) -> ComponentHealth {
            std::future::pending().await
        }
    }

    #[test]
    fn lag_limits_degrade_only_past_them() {
        let judge = |lag, max_lag, max_positions| {
            LagLimits {
                max_lag,
                max_positions,
            }
            .judge("p".into(), lag, "positions")
        };
        let minute = Some(Duration::from_secs(60));
        assert_eq!(judge((10, 60.0), minute, Some(10)).status, HealthStatus::Up);
        let old = judge((10, 60.5), minute, Some(10));
        assert_eq!(old.status, HealthStatus::Degraded);
        assert_eq!((old.lag_positions, old.lag_seconds), (Some(10), Some(60.5)));
        assert_eq!(
            judge((11, 1.0), minute, Some(10)).status,
            HealthStatus::Degraded
        );
        assert_eq!(judge((u64::MAX, 1e9), None, None).status, HealthStatus::Up);
    }

    #[tokio::test(start_paused = true)]
    async fn the_report_is_the_worst_finding_and_a_check_that_hangs_is_down() {
        let checks = HealthChecks::new("orders")
            .with_check(Fixed(ComponentHealth::up("store")))
            .with_check(Fixed(ComponentHealth::degraded("projection v", "behind")))
            .with_timeout(Duration::from_secs(2));
        let report = checks.report().await;
        assert_eq!(report.status, HealthStatus::Degraded);
        assert!(report.is_ready());

        let started = tokio::time::Instant::now();
        let report = checks.with_check(Hangs).report().await;
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(2),
            "checks run at once"
        );
        assert_eq!(report.status, HealthStatus::Down);
        assert!(!report.is_ready());
        let names: Vec<_> = report.components.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            ["store", "projection v", "broker"],
            "in the order added"
        );
        let broker = report.component("broker").expect("reported");
        assert_eq!(broker.status, HealthStatus::Down);
        assert_eq!(
            broker.detail.as_deref(),
            Some("the check did not answer within 2s")
        );
        assert!(HealthChecks::new("none").report().await.is_ready());
    }
}
