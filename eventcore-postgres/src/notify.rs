//! LISTEN/NOTIFY: how live readers learn about new events without polling.
//!
//! Appends do not NOTIFY inside their own transaction: PostgreSQL serializes the commits
//! of notifying transactions on a global lock held until the commit is durable, which
//! would stop concurrent appends from sharing a WAL flush. Instead a notifier task sends
//! one NOTIFY after appends of this process ended (committed or not: an append that
//! rolled back releases its mark too, and readers held back by it may go on), with the
//! newest position this process appended, coalescing bursts and at most one per
//! `PostgresConfig::with_notify_interval`, on a connection of its own that does not
//! wait for WAL flushes. A listener task turns notifications into a wake-up counter. A
//! lost notification (the process died between commit and NOTIFY, the listening
//! connection dropped) only delays readers until their fallback poll.
//!
//! Each task uses one connection of its own, outside the store's pool: a store opens at
//! most `max_connections + 2` connections.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// What this process's appends did: for its own live readers (woken at once) and for
/// the notifier task (which tells other processes').
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Appends {
    /// The newest position appended.
    pub(crate) last_position: u64,
    /// How many appends ended, committed or not (wrapping).
    pub(crate) ended: u64,
}

/// What the listener task shows of itself.
#[derive(Debug, Default)]
pub(crate) struct ListenerState {
    /// Whether it listens now.
    pub(crate) listening: AtomicBool,
    /// The newest position a notification announced.
    pub(crate) notified: AtomicU64,
}

/// The background tasks of one store; aborted when the store is dropped.
pub(crate) struct Tasks {
    handles: Vec<JoinHandle<()>>,
}

impl Tasks {
    pub(crate) fn start(
        runtime: &Handle,
        pool: PgPool,
        channel: String,
        interval: Duration,
        appended: watch::Receiver<Appends>,
        wake: watch::Sender<u64>,
        listener: Arc<ListenerState>,
    ) -> Self {
        let listener = runtime.spawn(listen(pool.clone(), channel.clone(), wake, listener));
        let notifier = runtime.spawn(notify(pool, channel, interval, appended));
        Tasks {
            handles: vec![listener, notifier],
        }
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for handle in &self.handles {
            handle.abort();
        }
    }
}

const RECONNECT_DELAY: Duration = Duration::from_millis(500);

/// The first pause before a notification that could not be sent is tried again
/// (doubling up to `RECONNECT_DELAY` while the server cannot be reached).
const RETRY_DELAY: Duration = Duration::from_millis(50);

async fn listen(
    pool: PgPool,
    channel: String,
    wake: watch::Sender<u64>,
    state: Arc<ListenerState>,
) {
    let bump = || wake.send_modify(|n| *n = n.wrapping_add(1));
    // The listener keeps its connection for good: it gets a pool of one of its own so
    // that it never takes a connection from the store's pool.
    let own = PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy_with((*pool.connect_options()).clone());
    loop {
        let mut listener = match PgListener::connect_with(&own).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::warn!(%error, "eventcore: cannot open the LISTEN connection; readers poll meanwhile");
                tokio::time::sleep(RECONNECT_DELAY).await;
                continue;
            }
        };
        if let Err(error) = listener.listen(&channel).await {
            tracing::warn!(%error, "eventcore: LISTEN failed; readers poll meanwhile");
            tokio::time::sleep(RECONNECT_DELAY).await;
            continue;
        }
        state.listening.store(true, Ordering::Relaxed);
        // Whatever was notified while we were not listening is unknown: wake everyone to
        // look.
        bump();
        loop {
            match listener.try_recv().await {
                Ok(Some(notification)) => {
                    state.listening.store(true, Ordering::Relaxed);
                    if let Ok(position) = notification.payload().parse::<u64>() {
                        state.notified.fetch_max(position, Ordering::Relaxed);
                    }
                    bump();
                }
                // The connection was lost; the next call reconnects and listens again
                // (shown as listening once a notification arrives).
                Ok(None) => {
                    state.listening.store(false, Ordering::Relaxed);
                    bump();
                }
                Err(error) => {
                    state.listening.store(false, Ordering::Relaxed);
                    tracing::warn!(%error, "eventcore: the LISTEN connection failed; reconnecting");
                    bump();
                    break;
                }
            }
        }
        tokio::time::sleep(RECONNECT_DELAY).await;
    }
}

async fn notify(
    pool: PgPool,
    channel: String,
    interval: Duration,
    mut appended: watch::Receiver<Appends>,
) {
    // The count of ended appends the last notification covered.
    let mut sent = 0;
    let mut last_sent: Option<Instant> = None;
    let mut connection: Option<PgConnection> = None;
    // A notification that could not be sent is tried again after a pause, not only
    // when another append ends: held-back readers elsewhere may wait for it.
    let mut retry = false;
    let mut retry_delay = RETRY_DELAY;
    loop {
        if retry {
            tokio::time::sleep(retry_delay).await;
            retry_delay = (retry_delay * 2).min(RECONNECT_DELAY);
        } else if appended.changed().await.is_err() {
            return;
        }
        retry = false;
        // Rate, not synchronisation: appends arriving before the interval is over share
        // the next notification.
        if let Some(last) = last_sent {
            // An interval too long to add to an instant (Duration::MAX) is simply a
            // long sleep; tokio caps it.
            match last.checked_add(interval) {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => tokio::time::sleep(interval).await,
            }
        }
        let Appends {
            last_position,
            ended,
        } = *appended.borrow_and_update();
        if ended == sent {
            continue;
        }
        if connection.is_none() {
            connection = notifier_connection(&pool).await;
        }
        let Some(conn) = connection.as_mut() else {
            retry = true;
            continue;
        };
        match sqlx::query("SELECT pg_notify($1, $2)")
            .bind(&channel)
            .bind(last_position.to_string())
            .execute(&mut *conn)
            .await
        {
            Ok(_) => {
                sent = ended;
                last_sent = Some(Instant::now());
                retry_delay = RETRY_DELAY;
            }
            Err(error) => {
                tracing::debug!(%error, "eventcore: NOTIFY failed; trying again");
                connection = None;
                retry = true;
            }
        }
    }
}

/// A connection of the notifier's own. A transaction that notifies gets a transaction id
/// and so a commit record; nothing it writes needs to be durable, so it commits without
/// waiting for a WAL flush (`synchronous_commit = off`, on this connection only). The
/// events themselves were committed durably before.
async fn notifier_connection(pool: &PgPool) -> Option<PgConnection> {
    let connect = async {
        let mut conn = PgConnection::connect_with(&pool.connect_options()).await?;
        sqlx::query("SET synchronous_commit TO off")
            .execute(&mut conn)
            .await?;
        Ok::<_, sqlx::Error>(conn)
    };
    match connect.await {
        Ok(conn) => Some(conn),
        Err(error) => {
            tracing::debug!(%error, "eventcore: no NOTIFY connection; readers will poll");
            None
        }
    }
}
