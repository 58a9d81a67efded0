//! HTTP endpoints for an EventCore service process, on [axum](https://docs.rs/axum):
//!
//! | path | answers |
//! |---|---|
//! | `GET /metrics` | every metric the process records, in the Prometheus text format (`metrics-exporter-prometheus`); 404 when no Prometheus handle was given |
//! | `GET /health` | liveness: `200 ok` whenever the process serves HTTP at all |
//! | `GET /ready` | readiness: the [`HealthReport`] as JSON, `200` when it [is ready](HealthReport::is_ready) (every component up or degraded), `503` when a component is down |
//!
//! The library emits metrics through the `metrics` facade; [`install_prometheus`] makes
//! Prometheus the process's recorder (with histogram buckets for EventCore's `_seconds`
//! metrics) and keeps its upkeep running. [`Endpoints::router`] gives the routes to merge
//! into an application's own router; [`Endpoints::serve`] serves them alone.
//!
//! ```no_run
//! use eventcore::health::{HealthChecks, StoreHealth};
//! use eventcore_http::{Endpoints, install_prometheus};
//! use eventcore_memory::InMemoryEventStore;
//! use std::sync::Arc;
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let prometheus = install_prometheus()?;
//! let store = InMemoryEventStore::new();
//! let health = HealthChecks::new("orders").with_check(StoreHealth::new(Arc::new(store)));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:9464").await?;
//! Endpoints::new(health)
//!     .with_prometheus(prometheus)
//!     .serve(listener, async { let _ = tokio::signal::ctrl_c().await; })
//!     .await?;
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use eventcore::health::HealthChecks;
pub use eventcore::health::HealthReport;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// The content type of the Prometheus text exposition format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Bucket bounds, in seconds, for EventCore's `_seconds` histograms (command durations,
/// consumer lag): 0.5 ms to 60 s.
pub const SECONDS_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// How often [`install_prometheus`]'s upkeep task drains histogram samples.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The Prometheus recorder could not be made the process's recorder.
#[derive(Debug, thiserror::Error)]
#[error("cannot install the Prometheus recorder: {0}")]
pub struct InstallError(#[from] metrics_exporter_prometheus::BuildError);

/// Makes a Prometheus recorder the process's global `metrics` recorder, with
/// [`SECONDS_BUCKETS`] for every metric ending in `_seconds` (rendered as Prometheus
/// histograms, not summaries), and spawns a task that runs its upkeep every
/// [`UPKEEP_INTERVAL`], so histogram samples do not pile up between scrapes.
///
/// Call it once, from within a Tokio runtime, before the first metric is emitted
/// (handles registered earlier stay with the recorder they were registered with).
///
/// # Errors
///
/// [`InstallError`] when a global recorder is installed already.
///
/// # Panics
///
/// Outside a Tokio runtime (the upkeep task is spawned on it).
pub fn install_prometheus() -> Result<PrometheusHandle, InstallError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), &SECONDS_BUCKETS)?
        .install_recorder()?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(UPKEEP_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

#[derive(Clone)]
struct Shared {
    prometheus: Option<PrometheusHandle>,
    health: Arc<HealthChecks>,
}

/// The endpoints of one service process: its health checks, and the Prometheus handle
/// to render metrics from.
#[derive(Clone)]
pub struct Endpoints {
    shared: Shared,
}

impl std::fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoints")
            .field("health", &self.shared.health)
            .field("prometheus", &self.shared.prometheus.is_some())
            .finish()
    }
}

impl Endpoints {
    /// Endpoints answering `/ready` from `health`; `/metrics` answers 404 until
    /// [`Endpoints::with_prometheus`].
    pub fn new(health: HealthChecks) -> Self {
        Endpoints {
            shared: Shared {
                prometheus: None,
                health: Arc::new(health),
            },
        }
    }

    /// Renders `/metrics` from `handle` (see [`install_prometheus`]).
    pub fn with_prometheus(mut self, handle: PrometheusHandle) -> Self {
        self.shared.prometheus = Some(handle);
        self
    }

    /// The routes, to serve alone or merge into an application's router.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/metrics", get(metrics))
            .route("/health", get(health))
            .route("/ready", get(ready))
            .with_state(self.shared.clone())
    }

    /// Serves the routes on `listener` until `shutdown` completes, then finishes the
    /// requests under way.
    ///
    /// # Errors
    ///
    /// The listener's I/O error.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let address = listener.local_addr()?;
        tracing::info!(
            target: "eventcore::http",
            service = self.shared.health.service(),
            %address,
            "serving /metrics, /health and /ready"
        );
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
    }
}

async fn metrics(State(shared): State<Shared>) -> Response {
    match &shared.prometheus {
        Some(handle) => (
            [(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)],
            handle.render(),
        )
            .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            "no metrics recorder is exported by this process\n",
        )
            .into_response(),
    }
}

async fn health() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "ok\n",
    )
        .into_response()
}

async fn ready(State(shared): State<Shared>) -> Response {
    let report = shared.health.report().await;
    let status = if report.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    match serde_json::to_string(&report) {
        Ok(body) => (status, [(header::CONTENT_TYPE, "application/json")], body).into_response(),
        // A report is strings, numbers and enums: it always serializes.
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the health report cannot be written: {error}\n"),
        )
            .into_response(),
    }
}
