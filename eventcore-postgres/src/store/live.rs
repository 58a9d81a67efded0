//! Waiting for the log to grow: the heads, and the LISTEN/NOTIFY tasks (`notify.rs`)
//! started on first use, with polling as the fallback.

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
        let mut held_back_poll = Duration::from_millis(2);
        loop {
            // Marked seen before looking, so a notification or an append arriving during
            // the query is not lost.
            wake.borrow_and_update();
            local.borrow_and_update();
            let Heads { visible, committed } = self.heads().await?;
            if visible.is_some_and(|v| v > after) {
                return Ok(());
            }
            if committed.is_some_and(|c| c > after) {
                // Committed events are held back by an older transaction still running.
                // When it ends, no notification says so: poll, backing off.
                tokio::time::sleep(held_back_poll).await;
                held_back_poll = (held_back_poll * 2).min(fallback);
                continue;
            }
            if listening {
                let woken = async {
                    tokio::select! {
                        _ = wake.changed() => {}
                        _ = local.changed() => {}
                    }
                };
                let _ = tokio::time::timeout(fallback, woken).await;
            } else {
                tokio::time::sleep(fallback).await;
            }
        }
    }
}
