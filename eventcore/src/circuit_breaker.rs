//! A circuit breaker for calls out of a service (a card gateway, an HTTP API): after
//! enough failures in a row it stops calling for a while and fails fast instead, then
//! lets one trial call through to see whether the other side is back.
//!
//! - **Closed**: calls go through. Each call that fails or takes longer than the call
//!   timeout adds to a count of consecutive failures, each success resets it; when the
//!   count reaches the failure threshold the circuit opens.
//! - **Open**: calls fail at once with [`CircuitBreakerError::Open`], without calling,
//!   until the open period has passed since the circuit opened.
//! - **Half-open**: the first call after the open period is the trial, and the only call
//!   let through: concurrent calls fail fast as if open. The trial's success closes the
//!   circuit; its failure (or timeout) opens it for another period. A trial that is
//!   cancelled (its future dropped) decides nothing: the next call is the trial.
//!
//! Only outcomes of calls admitted in the current state count: a slow call admitted
//! while closed that fails after the circuit opened does not open it again, and one
//! that succeeds does not close it.
//!
//! What counts as a failure is the call's `Err`: return a business refusal (a declined
//! card) as `Ok`, or classify with [`CircuitBreaker::call_with`].
//!
//! Time comes from a [`Clock`]: by default [`TokioClock`], so tests drive the breaker
//! with `tokio::time::pause` and `advance`; [`CircuitBreaker::with_clock`] puts it on the
//! clock the rest of the service uses (a [`crate::ManualClock`] in the example).
//!
//! Every state change is logged (`tracing`, target `eventcore::circuit_breaker`: a
//! warning when it opens) and counted in [`STATE_CHANGES_TOTAL`]; the state is the
//! gauge [`STATE`], and every call's outcome is counted in [`CALLS_TOTAL`].
//!
//! ```
//! use std::time::Duration;
//! use eventcore::circuit_breaker::{CircuitBreaker, CircuitBreakerConfig, CircuitBreakerError, CircuitState};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = CircuitBreakerConfig::new(2, Duration::from_secs(30), Duration::from_secs(5))?;
//! let gateway = CircuitBreaker::new("card-gateway", config);
//!
//! for _ in 0..2 {
//!     let failed = gateway
//!         .call(|| async { Err::<(), _>(std::io::Error::other("connection refused")) })
//!         .await;
//!     assert!(matches!(failed, Err(CircuitBreakerError::Failed(_))));
//! }
//! assert_eq!(gateway.state(), CircuitState::Open);
//!
//! // Open: the call is not made.
//! let refused = gateway.call(|| async { Ok::<_, std::io::Error>("charged") }).await;
//! assert!(matches!(refused, Err(CircuitBreakerError::Open { .. })));
//!
//! // After the open period, one trial; its success closes the circuit.
//! tokio::time::advance(Duration::from_secs(30)).await;
//! let charged = gateway.call(|| async { Ok::<_, std::io::Error>("charged") }).await?;
//! assert_eq!(charged, "charged");
//! assert_eq!(gateway.state(), CircuitState::Closed);
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use metrics::{counter, gauge};
use tokio::sync::watch;

use crate::clock::{Clock, TokioClock};

/// State changes of a breaker (counter; labels `breaker`, `from`, `to`).
pub const STATE_CHANGES_TOTAL: &str = "eventcore_circuit_breaker_state_changes_total";
/// A breaker's state (gauge; label `breaker`): 0 closed, 1 open, 2 half-open.
pub const STATE: &str = "eventcore_circuit_breaker_state";
/// Calls through a breaker (counter; labels `breaker`, `outcome`: `success`, `failure`,
/// `timeout`, `rejected`).
pub const CALLS_TOTAL: &str = "eventcore_circuit_breaker_calls_total";

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CircuitState {
    /// Calls go through.
    Closed,
    /// Calls fail fast. A circuit whose open period has passed still reads `Open` until
    /// the next call, which becomes the trial.
    Open,
    /// One trial call is deciding.
    HalfOpen,
}

impl CircuitState {
    /// `closed`, `open` or `half_open`: the label used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }

    fn gauge_value(self) -> f64 {
        match self {
            CircuitState::Closed => 0.0,
            CircuitState::Open => 1.0,
            CircuitState::HalfOpen => 2.0,
        }
    }
}

impl fmt::Display for CircuitState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A breaker setting that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidCircuitBreakerConfig {
    /// A threshold of 0 would open the circuit before any call.
    #[error("the failure threshold must be at least 1")]
    ZeroFailureThreshold,
    /// An open period of 0 would never fail fast.
    #[error("the open period must be longer than 0")]
    ZeroOpenPeriod,
    /// A call timeout of 0 would time out every call.
    #[error("the call timeout must be longer than 0")]
    ZeroCallTimeout,
    /// A period too long to add to a date (over 2^43 seconds, some 278,000 years).
    #[error("{what} of {value:?} is too long")]
    TooLong {
        /// Which setting.
        what: &'static str,
        /// Its value.
        value: Duration,
    },
}

/// How a [`CircuitBreaker`] decides: consecutive failures to open, how long it stays
/// open, and how long a call may take before it counts as failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitBreakerConfig {
    failure_threshold: u32,
    open_period: Duration,
    call_timeout: Duration,
}

impl CircuitBreakerConfig {
    /// Opens after `failure_threshold` consecutive failures, stays open for
    /// `open_period`, and counts a call longer than `call_timeout` as failed (it is
    /// cancelled).
    pub fn new(
        failure_threshold: u32,
        open_period: Duration,
        call_timeout: Duration,
    ) -> Result<Self, InvalidCircuitBreakerConfig> {
        if failure_threshold == 0 {
            return Err(InvalidCircuitBreakerConfig::ZeroFailureThreshold);
        }
        if open_period.is_zero() {
            return Err(InvalidCircuitBreakerConfig::ZeroOpenPeriod);
        }
        if call_timeout.is_zero() {
            return Err(InvalidCircuitBreakerConfig::ZeroCallTimeout);
        }
        for (what, value) in [
            ("the open period", open_period),
            ("the call timeout", call_timeout),
        ] {
            if chrono::Duration::from_std(value).is_err() || value > Duration::from_secs(1 << 43) {
                return Err(InvalidCircuitBreakerConfig::TooLong { what, value });
            }
        }
        Ok(CircuitBreakerConfig {
            failure_threshold,
            open_period,
            call_timeout,
        })
    }

    /// Consecutive failures that open the circuit.
    pub fn failure_threshold(&self) -> u32 {
        self.failure_threshold
    }

    /// How long the circuit stays open before a trial.
    pub fn open_period(&self) -> Duration {
        self.open_period
    }

    /// How long a call may take.
    pub fn call_timeout(&self) -> Duration {
        self.call_timeout
    }
}

impl Default for CircuitBreakerConfig {
    /// Five failures, thirty seconds open, ten seconds per call.
    fn default() -> Self {
        CircuitBreakerConfig {
            failure_threshold: 5,
            open_period: Duration::from_secs(30),
            call_timeout: Duration::from_secs(10),
        }
    }
}

/// Why a call through a breaker did not return the callee's value.
#[derive(Debug, thiserror::Error)]
pub enum CircuitBreakerError<E> {
    /// The circuit is open (or half-open with its trial under way): the call was not
    /// made.
    #[error("circuit {breaker} is open: the call was not made")]
    Open {
        /// The breaker's name.
        breaker: Arc<str>,
        /// How long until the circuit admits a trial; `None` while a trial is deciding.
        retry_after: Option<Duration>,
    },
    /// The call took longer than the call timeout and was cancelled: whether it took
    /// effect on the other side is unknown.
    #[error("call through circuit {breaker} timed out after {after:?}")]
    Timeout {
        /// The breaker's name.
        breaker: Arc<str>,
        /// The call timeout.
        after: Duration,
    },
    /// The call was made and failed.
    #[error("call failed: {0}")]
    Failed(#[source] E),
}

impl<E> CircuitBreakerError<E> {
    /// The call was not made: retrying it elsewhere or later is safe.
    pub fn is_rejected(&self) -> bool {
        matches!(self, CircuitBreakerError::Open { .. })
    }

    /// The callee's error, if the call was made and failed.
    pub fn into_failed(self) -> Option<E> {
        match self {
            CircuitBreakerError::Failed(error) => Some(error),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    Closed { failures: u32 },
    Open { until: DateTime<Utc> },
    HalfOpen { trial_running: bool },
}

impl Phase {
    fn state(self) -> CircuitState {
        match self {
            Phase::Closed { .. } => CircuitState::Closed,
            Phase::Open { .. } => CircuitState::Open,
            Phase::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }
}

#[derive(Debug)]
struct Inner {
    phase: Phase,
    /// Moves on at every state change: an outcome of a call admitted under an earlier
    /// one is not counted.
    generation: u64,
}

struct Shared {
    name: Arc<str>,
    config: CircuitBreakerConfig,
    clock: Arc<dyn Clock>,
    inner: Mutex<Inner>,
    changes: watch::Sender<CircuitState>,
}

/// A circuit breaker (see the [module](self)). Clones share the circuit.
#[derive(Clone)]
pub struct CircuitBreaker {
    shared: Arc<Shared>,
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("name", &self.shared.name)
            .field("config", &self.shared.config)
            .field("state", &self.state())
            .finish()
    }
}

/// The right to make one call, and what the outcome applies to.
struct Permit<'a> {
    breaker: &'a Shared,
    generation: u64,
    trial: bool,
    decided: bool,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        // A trial cancelled before its outcome: the next call may try instead.
        if self.trial && !self.decided {
            let mut inner = self.breaker.lock();
            if inner.generation == self.generation
                && let Phase::HalfOpen { trial_running } = &mut inner.phase
            {
                *trial_running = false;
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Success,
    Failure,
    Timeout,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The state is consistent at every unlock: a panic elsewhere does not spoil it.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn open_until(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        // The config bounds the period, so this only saturates at the end of time.
        chrono::Duration::from_std(self.config.open_period)
            .ok()
            .and_then(|period| now.checked_add_signed(period))
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
    }

    /// Moves to `to`, under the lock.
    fn change(&self, inner: &mut Inner, to: Phase, why: &'static str) {
        let from = inner.phase.state();
        inner.phase = to;
        inner.generation += 1;
        let to = to.state();
        if from == to {
            return;
        }
        match to {
            CircuitState::Open => tracing::warn!(
                target: "eventcore::circuit_breaker",
                breaker = %self.name, %from, %to, why,
                open_for = ?self.config.open_period,
                "circuit opened: calls fail fast"
            ),
            _ => tracing::info!(
                target: "eventcore::circuit_breaker",
                breaker = %self.name, %from, %to, why,
                "circuit state changed"
            ),
        }
        counter!(
            STATE_CHANGES_TOTAL,
            "breaker" => Arc::clone(&self.name),
            "from" => from.as_str(),
            "to" => to.as_str()
        )
        .increment(1);
        gauge!(STATE, "breaker" => Arc::clone(&self.name)).set(to.gauge_value());
        self.changes.send_replace(to);
    }

    fn admit(&self) -> Result<Permit<'_>, Option<Duration>> {
        let mut inner = self.lock();
        let trial = match inner.phase {
            Phase::Closed { .. } => false,
            Phase::HalfOpen {
                trial_running: true,
            } => return Err(None),
            Phase::HalfOpen {
                trial_running: false,
            } => {
                inner.phase = Phase::HalfOpen {
                    trial_running: true,
                };
                true
            }
            Phase::Open { until } => {
                let now = self.clock.now();
                if now < until {
                    return Err(Some((until - now).to_std().unwrap_or_default()));
                }
                self.change(
                    &mut inner,
                    Phase::HalfOpen {
                        trial_running: true,
                    },
                    "the open period has passed",
                );
                true
            }
        };
        Ok(Permit {
            breaker: self,
            generation: inner.generation,
            trial,
            decided: false,
        })
    }

    fn record(&self, permit: &mut Permit<'_>, outcome: Outcome) {
        permit.decided = true;
        let mut inner = self.lock();
        if inner.generation != permit.generation {
            return;
        }
        match (inner.phase, outcome) {
            (Phase::Closed { .. }, Outcome::Success) => {
                inner.phase = Phase::Closed { failures: 0 };
            }
            (Phase::Closed { failures }, Outcome::Failure | Outcome::Timeout) => {
                let failures = failures.saturating_add(1);
                if failures >= self.config.failure_threshold {
                    let until = self.open_until(self.clock.now());
                    self.change(
                        &mut inner,
                        Phase::Open { until },
                        "the failure threshold was reached",
                    );
                } else {
                    inner.phase = Phase::Closed { failures };
                }
            }
            (Phase::HalfOpen { .. }, Outcome::Success) => {
                self.change(
                    &mut inner,
                    Phase::Closed { failures: 0 },
                    "the trial call succeeded",
                );
            }
            (Phase::HalfOpen { .. }, Outcome::Failure | Outcome::Timeout) => {
                let until = self.open_until(self.clock.now());
                self.change(&mut inner, Phase::Open { until }, "the trial call failed");
            }
            // An open circuit admits nothing, so no permit of its generation exists.
            (Phase::Open { .. }, _) => {}
        }
    }

    fn count(&self, outcome: &'static str) {
        counter!(CALLS_TOTAL, "breaker" => Arc::clone(&self.name), "outcome" => outcome)
            .increment(1);
    }
}

impl CircuitBreaker {
    /// A closed breaker named `name` (the `breaker` label of its metrics and logs), on
    /// Tokio's clock ([`TokioClock`]).
    pub fn new(name: impl Into<Arc<str>>, config: CircuitBreakerConfig) -> Self {
        CircuitBreaker::with_clock(name, config, Arc::new(TokioClock::new()))
    }

    /// A closed breaker on `clock`: the open period is measured on it, and the call
    /// timeout waits on it.
    pub fn with_clock(
        name: impl Into<Arc<str>>,
        config: CircuitBreakerConfig,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let name = name.into();
        gauge!(STATE, "breaker" => Arc::clone(&name)).set(CircuitState::Closed.gauge_value());
        CircuitBreaker {
            shared: Arc::new(Shared {
                name,
                config,
                clock,
                inner: Mutex::new(Inner {
                    phase: Phase::Closed { failures: 0 },
                    generation: 0,
                }),
                changes: watch::Sender::new(CircuitState::Closed),
            }),
        }
    }

    /// The breaker's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Its settings.
    pub fn config(&self) -> CircuitBreakerConfig {
        self.shared.config
    }

    /// Where it stands now.
    pub fn state(&self) -> CircuitState {
        self.shared.lock().phase.state()
    }

    /// A receiver that sees every state change (the latest state when several happen
    /// before it looks), for health reports and for tests to wait on.
    pub fn watch(&self) -> watch::Receiver<CircuitState> {
        self.shared.changes.subscribe()
    }

    /// Makes the call `call` builds, unless the circuit is open; every `Err` counts as a
    /// failure.
    pub async fn call<F, Fut, T, E>(&self, call: F) -> Result<T, CircuitBreakerError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.call_with(call, |_| true).await
    }

    /// Makes the call `call` builds, unless the circuit is open; an `Err` counts as a
    /// failure when `is_failure` says so (one that does not is returned as
    /// [`CircuitBreakerError::Failed`] all the same, and counts as a success: the other
    /// side answered).
    pub async fn call_with<F, Fut, T, E>(
        &self,
        call: F,
        is_failure: impl FnOnce(&E) -> bool,
    ) -> Result<T, CircuitBreakerError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let shared = &*self.shared;
        let mut permit = match shared.admit() {
            Ok(permit) => permit,
            Err(retry_after) => {
                shared.count("rejected");
                return Err(CircuitBreakerError::Open {
                    breaker: Arc::clone(&shared.name),
                    retry_after,
                });
            }
        };
        let timeout = shared.config.call_timeout;
        let deadline = chrono::Duration::from_std(timeout)
            .ok()
            .and_then(|timeout| shared.clock.now().checked_add_signed(timeout))
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        let result = tokio::select! {
            biased;
            result = call() => Some(result),
            () = shared.clock.sleep_until(deadline) => None,
        };
        match result {
            Some(Ok(value)) => {
                shared.record(&mut permit, Outcome::Success);
                shared.count("success");
                Ok(value)
            }
            Some(Err(error)) => {
                if is_failure(&error) {
                    shared.record(&mut permit, Outcome::Failure);
                    shared.count("failure");
                } else {
                    shared.record(&mut permit, Outcome::Success);
                    shared.count("success");
                }
                Err(CircuitBreakerError::Failed(error))
            }
            None => {
                shared.record(&mut permit, Outcome::Timeout);
                shared.count("timeout");
                Err(CircuitBreakerError::Timeout {
                    breaker: Arc::clone(&shared.name),
                    after: timeout,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use tokio::sync::oneshot;

    use super::*;

    const OPEN: Duration = Duration::from_secs(30);
    const TIMEOUT: Duration = Duration::from_secs(5);

    fn breaker(threshold: u32) -> CircuitBreaker {
        CircuitBreaker::new(
            "gateway",
            CircuitBreakerConfig::new(threshold, OPEN, TIMEOUT).expect("a valid config"),
        )
    }

    async fn fail(breaker: &CircuitBreaker) -> CircuitBreakerError<&'static str> {
        breaker
            .call(|| async { Err::<(), _>("down") })
            .await
            .expect_err("the call fails")
    }

    async fn succeed(breaker: &CircuitBreaker) -> Result<u32, CircuitBreakerError<&'static str>> {
        breaker.call(|| async { Ok(7) }).await
    }

    #[test]
    fn settings_that_cannot_work_are_refused() {
        assert_eq!(
            CircuitBreakerConfig::new(0, OPEN, TIMEOUT),
            Err(InvalidCircuitBreakerConfig::ZeroFailureThreshold)
        );
        assert_eq!(
            CircuitBreakerConfig::new(1, Duration::ZERO, TIMEOUT),
            Err(InvalidCircuitBreakerConfig::ZeroOpenPeriod)
        );
        assert_eq!(
            CircuitBreakerConfig::new(1, OPEN, Duration::ZERO),
            Err(InvalidCircuitBreakerConfig::ZeroCallTimeout)
        );
        assert!(matches!(
            CircuitBreakerConfig::new(1, Duration::MAX, TIMEOUT),
            Err(InvalidCircuitBreakerConfig::TooLong {
                what: "the open period",
                ..
            })
        ));
        assert!(matches!(
            CircuitBreakerConfig::new(1, OPEN, Duration::MAX),
            Err(InvalidCircuitBreakerConfig::TooLong {
                what: "the call timeout",
                ..
            })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_open_the_circuit_and_a_success_resets_the_count() {
        let breaker = breaker(3);
        fail(&breaker).await;
        fail(&breaker).await;
        assert_eq!(succeed(&breaker).await.expect("closed"), 7);
        fail(&breaker).await;
        fail(&breaker).await;
        assert_eq!(
            breaker.state(),
            CircuitState::Closed,
            "two in a row, not three"
        );
        assert!(matches!(
            fail(&breaker).await,
            CircuitBreakerError::Failed("down")
        ));
        assert_eq!(breaker.state(), CircuitState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_circuit_fails_fast_without_calling_until_its_period_has_passed() {
        let breaker = breaker(1);
        fail(&breaker).await;
        let calls = AtomicU32::new(0);
        let call = || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok::<_, &str>(1)
        };
        let refused = breaker.call(call).await.expect_err("open");
        let CircuitBreakerError::Open {
            breaker: name,
            retry_after,
        } = &refused
        else {
            panic!("expected Open, got {refused:?}");
        };
        assert_eq!(&**name, "gateway");
        assert_eq!(*retry_after, Some(OPEN));
        assert!(refused.is_rejected());

        tokio::time::advance(OPEN - Duration::from_millis(1)).await;
        let refused = breaker.call(call).await.expect_err("still open");
        assert!(matches!(
            refused,
            CircuitBreakerError::Open { retry_after: Some(left), .. } if left == Duration::from_millis(1)
        ));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            0,
            "an open circuit calls nothing"
        );

        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(breaker.call(call).await.expect("the trial succeeds"), 1);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(breaker.state(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_trial_opens_the_circuit_for_another_full_period() {
        let breaker = breaker(2);
        fail(&breaker).await;
        fail(&breaker).await;
        tokio::time::advance(OPEN).await;
        fail(&breaker).await;
        assert_eq!(
            breaker.state(),
            CircuitState::Open,
            "one failed trial reopens it"
        );
        tokio::time::advance(OPEN - Duration::from_millis(1)).await;
        assert!(succeed(&breaker).await.expect_err("open").is_rejected());
        tokio::time::advance(Duration::from_millis(1)).await;
        succeed(&breaker).await.expect("the second trial succeeds");
        assert_eq!(breaker.state(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_admits_exactly_one_trial_under_concurrency() {
        let breaker = breaker(1);
        fail(&breaker).await;
        tokio::time::advance(OPEN).await;

        let calls = Arc::new(AtomicU32::new(0));
        let (release, gate) = oneshot::channel::<()>();
        let (started, trial_started) = oneshot::channel::<()>();
        let trial = tokio::spawn({
            let breaker = breaker.clone();
            let calls = Arc::clone(&calls);
            async move {
                breaker
                    .call(|| async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        let _ = started.send(());
                        gate.await.map_err(|_| "gate dropped")?;
                        Ok::<_, &str>("trial")
                    })
                    .await
            }
        });
        trial_started.await.expect("the trial starts");
        assert_eq!(breaker.state(), CircuitState::HalfOpen);

        let others: Vec<_> = (0..16)
            .map(|_| {
                let breaker = breaker.clone();
                let calls = Arc::clone(&calls);
                tokio::spawn(async move {
                    breaker
                        .call(|| async move {
                            calls.fetch_add(1, Ordering::SeqCst);
                            Ok::<_, &str>("other")
                        })
                        .await
                })
            })
            .collect();
        for other in others {
            let refused = other.await.expect("no panic").expect_err("fails fast");
            assert!(
                matches!(
                    refused,
                    CircuitBreakerError::Open {
                        retry_after: None,
                        ..
                    }
                ),
                "{refused:?}"
            );
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1, "only the trial was called");

        release.send(()).expect("the trial waits");
        assert_eq!(trial.await.expect("no panic").expect("succeeds"), "trial");
        assert_eq!(breaker.state(), CircuitState::Closed);
        assert_eq!(succeed(&breaker).await.expect("closed"), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_over_its_timeout_is_cancelled_and_counts_as_a_failure() {
        struct Dropped(Arc<AtomicU32>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let breaker = breaker(2);
        let dropped = Arc::new(AtomicU32::new(0));
        for round in 1..=2 {
            let guard = Dropped(Arc::clone(&dropped));
            let started = tokio::time::Instant::now();
            let timed_out = breaker
                .call(|| async move {
                    let _guard = guard;
                    std::future::pending::<Result<(), &str>>().await
                })
                .await
                .expect_err("times out");
            assert!(
                matches!(timed_out, CircuitBreakerError::Timeout { after, .. } if after == TIMEOUT)
            );
            assert_eq!(started.elapsed(), TIMEOUT);
            assert_eq!(
                dropped.load(Ordering::SeqCst),
                round,
                "the call is cancelled"
            );
        }
        assert_eq!(breaker.state(), CircuitState::Open, "two timeouts open it");
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_trial_lets_the_next_call_try() {
        let breaker = breaker(1);
        fail(&breaker).await;
        tokio::time::advance(OPEN).await;
        let (started, trial_started) = oneshot::channel::<()>();
        let trial = tokio::spawn({
            let breaker = breaker.clone();
            async move {
                breaker
                    .call(|| async move {
                        let _ = started.send(());
                        std::future::pending::<Result<(), &str>>().await
                    })
                    .await
            }
        });
        trial_started.await.expect("the trial starts");
        assert!(
            succeed(&breaker)
                .await
                .expect_err("trial running")
                .is_rejected()
        );
        trial.abort();
        assert!(trial.await.expect_err("aborted").is_cancelled());
        assert_eq!(breaker.state(), CircuitState::HalfOpen);
        assert_eq!(
            succeed(&breaker).await.expect("the next call is the trial"),
            7
        );
        assert_eq!(breaker.state(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn outcomes_of_calls_admitted_before_a_change_are_not_counted() {
        let breaker = breaker(1);
        let (fail_slow, slow_failure) = oneshot::channel::<()>();
        let (succeed_slow, slow_success) = oneshot::channel::<()>();
        let (started_a, a_started) = oneshot::channel::<()>();
        let (started_b, b_started) = oneshot::channel::<()>();
        let slow_fail = tokio::spawn({
            let breaker = breaker.clone();
            async move {
                breaker
                    .call(|| async move {
                        let _ = started_a.send(());
                        let _ = slow_failure.await;
                        Err::<(), _>("late failure")
                    })
                    .await
            }
        });
        let slow_ok = tokio::spawn({
            let breaker = breaker.clone();
            async move {
                breaker
                    .call(|| async move {
                        let _ = started_b.send(());
                        let _ = slow_success.await;
                        Ok::<_, &str>(())
                    })
                    .await
            }
        });
        a_started.await.expect("started");
        b_started.await.expect("started");
        fail(&breaker).await;
        assert_eq!(breaker.state(), CircuitState::Open);
        let opened_at = tokio::time::Instant::now();

        // A success admitted while closed does not close the open circuit.
        succeed_slow.send(()).expect("waiting");
        slow_ok.await.expect("no panic").expect("succeeds");
        assert_eq!(breaker.state(), CircuitState::Open);

        // The trial succeeds; a failure admitted long before does not open it again.
        tokio::time::advance(OPEN - opened_at.elapsed()).await;
        succeed(&breaker).await.expect("the trial");
        fail_slow.send(()).expect("waiting");
        slow_fail.await.expect("no panic").expect_err("fails");
        assert_eq!(breaker.state(), CircuitState::Closed);
        assert_eq!(succeed(&breaker).await.expect("closed"), 7);
    }

    #[tokio::test(start_paused = true)]
    async fn errors_that_are_answers_do_not_open_the_circuit() {
        let breaker = breaker(1);
        for _ in 0..3 {
            let declined = breaker
                .call_with(|| async { Err::<(), _>("declined") }, |e| *e != "declined")
                .await
                .expect_err("an error all the same");
            assert_eq!(declined.into_failed(), Some("declined"));
        }
        assert_eq!(breaker.state(), CircuitState::Closed);
        breaker
            .call_with(|| async { Err::<(), _>("down") }, |e| *e != "declined")
            .await
            .expect_err("fails");
        assert_eq!(breaker.state(), CircuitState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn watchers_see_every_state_change() {
        let breaker = breaker(1);
        let mut changes = breaker.watch();
        assert_eq!(*changes.borrow_and_update(), CircuitState::Closed);
        fail(&breaker).await;
        assert!(changes.has_changed().expect("open"));
        assert_eq!(*changes.borrow_and_update(), CircuitState::Open);
        tokio::time::advance(OPEN).await;
        let (release, gate) = oneshot::channel::<()>();
        let trial = tokio::spawn({
            let breaker = breaker.clone();
            async move {
                breaker
                    .call(|| async move { gate.await.map_err(|_| "dropped") })
                    .await
            }
        });
        changes.changed().await.expect("half-open");
        assert_eq!(*changes.borrow_and_update(), CircuitState::HalfOpen);
        release.send(()).expect("waiting");
        trial.await.expect("no panic").expect("succeeds");
        changes.changed().await.expect("closed");
        assert_eq!(*changes.borrow_and_update(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn the_breaker_runs_on_the_clock_it_is_given() {
        let clock = crate::ManualClock::default();
        let breaker = CircuitBreaker::with_clock(
            "gateway",
            CircuitBreakerConfig::new(1, OPEN, TIMEOUT).expect("valid"),
            Arc::new(clock.clone()),
        );
        fail(&breaker).await;
        // Tokio's time alone does not end the open period of a breaker on another clock.
        tokio::time::advance(OPEN * 2).await;
        assert!(succeed(&breaker).await.expect_err("open").is_rejected());
        clock.advance(OPEN);
        succeed(&breaker).await.expect("the trial");
        assert_eq!(breaker.state(), CircuitState::Closed);
    }
}
