//! Where time comes from for the components that wait for deadlines: the saga timer
//! today, the distribution runners next. Commands never read a clock; whoever dispatches
//! them passes the time in.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;

/// A future returned by [`Clock::sleep_until`].
pub type SleepFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// Where saga deadlines get the time from. Commands never read it: the components that
/// dispatch them pass the time in.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> DateTime<Utc>;

    /// Completes once [`Clock::now`] has reached `deadline`.
    fn sleep_until(&self, deadline: DateTime<Utc>) -> SleepFuture<'_>;
}

/// The system's wall clock, with Tokio's timer for waiting.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn sleep_until(&self, deadline: DateTime<Utc>) -> SleepFuture<'_> {
        Box::pin(async move {
            loop {
                let left = deadline - Utc::now();
                match left.to_std() {
                    Ok(left) if !left.is_zero() => tokio::time::sleep(left).await,
                    _ => return,
                }
            }
        })
    }
}

/// The system's time as Tokio's timer sees it: it starts at the wall-clock time of its
/// creation and moves with [`tokio::time::Instant`], so under `tokio::time::pause` it
/// stands still and jumps with `tokio::time::advance` (and with the paused runtime's
/// auto-advance). The default clock of the [`crate::circuit_breaker::CircuitBreaker`],
/// which tests drive with paused time. Copies share the origin.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    origin_utc: DateTime<Utc>,
    origin: tokio::time::Instant,
}

impl TokioClock {
    /// A clock reading the wall-clock time now, and moving with Tokio's timer from here.
    pub fn new() -> Self {
        TokioClock {
            origin_utc: Utc::now(),
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        TokioClock::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> DateTime<Utc> {
        let elapsed = tokio::time::Instant::now().saturating_duration_since(self.origin);
        chrono::Duration::from_std(elapsed)
            .ok()
            .and_then(|elapsed| self.origin_utc.checked_add_signed(elapsed))
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
    }

    fn sleep_until(&self, deadline: DateTime<Utc>) -> SleepFuture<'_> {
        let at = match (deadline - self.origin_utc).to_std() {
            // Before the origin: due already.
            Err(_) => return Box::pin(std::future::ready(())),
            Ok(after) => self.origin.checked_add(after),
        };
        Box::pin(async move {
            match at {
                Some(at) => tokio::time::sleep_until(at).await,
                // Beyond what the timer can represent: never.
                None => std::future::pending().await,
            }
        })
    }
}

/// A clock that only moves when told to: tests advance it past a deadline instead of
/// sleeping. Clones share the time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<watch::Sender<DateTime<Utc>>>,
}

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: DateTime<Utc>) -> Self {
        ManualClock {
            now: Arc::new(watch::Sender::new(start)),
        }
    }

    /// Moves the time forward by `by`, waking whoever waits for a deadline it reaches.
    pub fn advance(&self, by: Duration) {
        let by = chrono::Duration::from_std(by).unwrap_or(chrono::Duration::MAX);
        self.now.send_modify(|now| {
            *now = now
                .checked_add_signed(by)
                .unwrap_or(DateTime::<Utc>::MAX_UTC);
        });
    }

    /// Sets the time; a time before the current one is ignored (the clock never goes
    /// back).
    pub fn set(&self, to: DateTime<Utc>) {
        self.now.send_if_modified(|now| {
            if to > *now {
                *now = to;
                true
            } else {
                false
            }
        });
    }
}

impl Default for ManualClock {
    /// A clock standing at the Unix epoch.
    fn default() -> Self {
        ManualClock::new(DateTime::<Utc>::UNIX_EPOCH)
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.borrow()
    }

    fn sleep_until(&self, deadline: DateTime<Utc>) -> SleepFuture<'_> {
        let mut receiver = self.now.subscribe();
        Box::pin(async move {
            // The sender lives in `self`, which outlives this future: the wait cannot
            // fail for a closed channel.
            let _ = receiver.wait_for(|now| *now >= deadline).await;
        })
    }
}
