//! Waiting for the log to grow: the heads, and the LISTEN/NOTIFY tasks (`notify.rs`)
//! started on first use, with polling as the safety net only.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use eventcore::GlobalPosition;
use sqlx::Row;

use super::PostgresEventStore;
use super::rows::decode_error;
use crate::error::map_sqlx_error;
use crate::notify;

/// The two heads of the log (`eventcore_heads`).
pub(super) struct Heads {
    /// The last position readers may see.
    pub(super) visible: Option<u64>,
    /// The last committed position: higher while an older append still holds its mark.
    pub(super) committed: Option<u64>,
}

impl PostgresEventStore {
    /// Starts the LISTEN and NOTIFY tasks on first use. They need a Tokio runtime; without
    /// one, live readers fall back to polling instead of failing.
    pub(super) fn ensure_background(&self) -> bool {
        if self.inner.background.get().is_some() {
            return true;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        let _ = self.inner.background.get_or_init(|| {
            notify::Tasks::start(
                &runtime,
                self.inner.pool.clone(),
                self.inner.channel.clone(),
                self.inner.notify_interval,
                self.inner.appended.subscribe(),
                self.inner.wake.clone(),
                self.inner.live.listener.clone(),
            )
        });
        true
    }

    pub(super) async fn heads(&self) -> eventcore::Result<Heads> {
        let op = "reading the head";
        let mut conn = self.lease(op).await?;
        let row = sqlx::query(&self.inner.sql.heads)
            .fetch_one(&mut *conn)
            .await;
        conn.done(&row);
        let row = row.map_err(|e| map_sqlx_error(e, op, None))?;
        let visible: Option<i64> = row.try_get("visible").map_err(decode_error)?;
        let committed: Option<i64> = row.try_get("committed").map_err(decode_error)?;
        Ok(Heads {
            visible: visible.map(|p| p.max(0) as u64),
            committed: committed.map(|p| p.max(0) as u64),
        })
    }

    pub(super) async fn wait_for_events_impl(
        &self,
        after: Option<GlobalPosition>,
    ) -> eventcore::Result<()> {
        let after = after.map_or(0, GlobalPosition::value);
        let listening = self.ensure_background();
        let mut wake = self.inner.wake.subscribe();
        // This process's own appends wake its readers at once, without waiting for their
        // notification (rate-limited, and meant for other processes).
        let mut local = self.inner.appended.subscribe();
        let fallback = self.inner.fallback_poll_interval;
        let mut held_back_net = held_back_safety_net(fallback);
        let mut polled = false;
        loop {
            // Marked seen before looking, so a notification or an append arriving during
            // the query is not lost.
            wake.borrow_and_update();
            local.borrow_and_update();
            self.inner.live.checks.fetch_add(1, Ordering::Relaxed);
            let Heads { visible, committed } = self.heads().await?;
            if visible.is_some_and(|v| v > after) {
                if polled {
                    self.inner
                        .live
                        .found_by_poll
                        .fetch_add(1, Ordering::Relaxed);
                }
                return Ok(());
            }
            // Committed events held back by an older append still running: it ends by
            // committing or rolling back, and either wakes this reader (at once from
            // this process, by notification from another). The timer is the safety net
            // for an append that ends without a word (its process died), shorter than
            // the fallback at first.
            let held_back = committed.is_some_and(|c| c > after);
            let net = if held_back {
                self.inner.live.held_back.fetch_add(1, Ordering::Relaxed);
                let net = held_back_net;
                held_back_net = (held_back_net * 2).min(fallback);
                net
            } else {
                fallback
            };
            polled = if listening {
                let woken = async {
                    tokio::select! {
                        _ = wake.changed() => {}
                        _ = local.changed() => {}
                    }
                };
                tokio::time::timeout(net, woken).await.is_err()
            } else {
                tokio::time::sleep(net).await;
                true
            };
        }
    }

    /// How this store's live readers learned of new events.
    pub(super) fn live_wait_metrics_impl(&self) -> LiveWaitMetrics {
        LiveWaitMetrics {
            checks: self.inner.live.checks.load(Ordering::Relaxed),
            held_back: self.inner.live.held_back.load(Ordering::Relaxed),
            found_by_poll: self.inner.live.found_by_poll.load(Ordering::Relaxed),
            notified_position: self.inner.live.listener.notified.load(Ordering::Relaxed),
            listening: self.inner.live.listener.listening.load(Ordering::Relaxed),
        }
    }
}

/// The first safety-net wait of a reader held back by an older append: a twentieth of
/// the fallback poll (50 ms by default), doubling up to it.
fn held_back_safety_net(fallback: Duration) -> Duration {
    (fallback / 20).max(Duration::from_millis(1))
}

/// The counters behind [`LiveWaitMetrics`].
#[derive(Debug, Default)]
pub(super) struct LiveCounters {
    checks: AtomicU64,
    held_back: AtomicU64,
    found_by_poll: AtomicU64,
    /// Written by the listener task.
    listener: Arc<notify::ListenerState>,
}

/// How the live readers of a store ([`eventcore::EventStore::wait_for_events`]) found
/// out about new events, since the store was opened
/// ([`crate::PostgresEventStore::live_wait_metrics`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LiveWaitMetrics {
    /// Times a waiting reader looked at the heads of the log (one statement each).
    pub checks: u64,
    /// Of those, the looks that found committed events held back behind an older
    /// append still running (the reader then waits for it to end).
    pub held_back: u64,
    /// Waits that ended on a timer finding new events, rather than on being told (a
    /// notification, or an append of this process ending): a notification was lost (a
    /// listening connection dropped, a process died during an append, no Tokio
    /// runtime). A count that grows means live readers learn late.
    pub found_by_poll: u64,
    /// The newest position a notification received announced (from any process
    /// appending to the store's schema, this one included); 0 before the first.
    pub notified_position: u64,
    /// Whether the store listens for notifications now: set once its listening
    /// connection is up (it starts with the first live read or append), cleared when
    /// that connection is lost, and set again by the next notification after it.
    pub listening: bool,
}
