//! Connections the store keeps out of its pool between statements.
//!
//! sqlx checks a connection with a round trip to the server (a `Sync` message) every time
//! it goes back to the pool, and by default again when it is taken out. For a store whose
//! every operation is one statement, those checks cost more than the statement: one
//! INSERT per transaction through a sqlx pool measured 1,973 / 7,681 a second (C=1 / C=8)
//! where the same statements on connections held by each task did 3,749 / 11,353. So the
//! store keeps up to a set number of connections out of the pool once they have served a
//! statement, and takes them back for the next one without a check. A connection whose
//! statement failed other than with a database error (the connection broke, the future
//! was dropped mid-statement) is not kept: it goes back to the pool, which checks it;
//! when it broke, every kept connection goes back with it, so that a restarted server
//! costs one failed statement, not one per kept connection.
//!
//! The store holds at most `capacity` connections this way, idle or in use, and the
//! capacity is below the pool's size: the other connections go back to the pool after
//! every statement, so whoever waits on the pool (checkpoints, transactions, the
//! application) is served.

use std::ops::{Deref, DerefMut};

use parking_lot::Mutex;
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};

/// The connections the store holds out of its pool, at most `capacity`.
pub(crate) struct KeptConnections {
    pool: PgPool,
    state: Mutex<Held>,
    capacity: usize,
}

struct Held {
    /// Kept between statements.
    idle: Vec<PoolConnection<Postgres>>,
    /// Held in all: the idle ones and those leased as held.
    count: usize,
}

impl KeptConnections {
    pub(crate) fn new(pool: PgPool, capacity: usize) -> Self {
        KeptConnections {
            pool,
            state: Mutex::new(Held {
                idle: Vec::with_capacity(capacity),
                count: 0,
            }),
            capacity,
        }
    }

    /// A kept connection, or one from the pool (held from now on while fewer than the
    /// capacity are held).
    pub(crate) async fn lease(&self) -> Result<Lease<'_>, sqlx::Error> {
        if let Some(conn) = self.state.lock().idle.pop() {
            return Ok(Lease {
                conn: Some(conn),
                held: true,
                home: self,
            });
        }
        let conn = self.pool.acquire().await?;
        let held = {
            let mut state = self.state.lock();
            let hold = state.count < self.capacity;
            if hold {
                state.count += 1;
            }
            hold
        };
        Ok(Lease {
            conn: Some(conn),
            held,
            home: self,
        })
    }

    /// Gives every idle connection back to the pool.
    pub(crate) fn release_idle(&self) {
        let idle = {
            let mut state = self.state.lock();
            let idle = std::mem::take(&mut state.idle);
            state.count -= idle.len();
            idle
        };
        drop(idle);
    }

    /// Gives the idle connections back and closes the pool (waiting for the connections
    /// in use to come back).
    pub(crate) async fn close(&self) {
        self.release_idle();
        self.pool.close().await;
    }
}

impl Drop for KeptConnections {
    fn drop(&mut self) {
        let idle = std::mem::take(&mut self.state.get_mut().idle);
        if tokio::runtime::Handle::try_current().is_ok() {
            // Back to the pool, which checks them (sqlx spawns that on the runtime).
            drop(idle);
        } else {
            // Without a runtime, a pooled connection cannot go back (sqlx would need to
            // spawn a task): closed here instead.
            for conn in idle {
                drop(conn.detach());
            }
        }
    }
}

/// A connection for one statement. Dropped, it goes back to the pool; see
/// [`Lease::done`].
pub(crate) struct Lease<'a> {
    /// Present until [`Lease::done`].
    conn: Option<PoolConnection<Postgres>>,
    held: bool,
    home: &'a KeptConnections,
}

impl Lease<'_> {
    /// The statement ended with `result`: a held connection that answered (rows or a
    /// database error) is kept for the next statement; any other goes back to the pool.
    pub(crate) fn done<T>(mut self, result: &Result<T, sqlx::Error>) {
        // A database error leaves the connection ready for the next statement, except
        // one that ends the session (the server shutting down, a terminated backend).
        let answered = match result {
            Ok(_) => true,
            Err(error @ sqlx::Error::Database(_)) => !crate::error::is_connection_failure(error),
            Err(_) => false,
        };
        let Some(conn) = self.conn.take() else {
            return;
        };
        let held = std::mem::replace(&mut self.held, false);
        let home = self.home;
        if held && answered && !home.pool.is_closed() {
            home.state.lock().idle.push(conn);
            return;
        }
        if held {
            home.state.lock().count -= 1;
        }
        drop(conn);
        if let Err(error) = result
            && crate::error::is_connection_failure(error)
        {
            // The others most likely share its fate (a restarted server): they go back
            // to the pool, which checks them, rather than fail one statement each.
            home.release_idle();
        }
    }
}

impl Lease<'_> {
    /// As [`Lease::done`], once the server has ended the statement's transaction. A
    /// statement that failed is answered with its error *before* the server rolls its
    /// transaction back and releases its locks (PostgreSQL sends the error, then
    /// aborts, then says it is ready): whoever learns of the failure at once may find
    /// the locks still held. An append's end wakes live readers held back by its mark,
    /// so an append waits for the server's "ready" (a ping, one round trip, on failures
    /// only) before it says it ended.
    pub(crate) async fn done_after_rollback<T>(mut self, result: &Result<T, sqlx::Error>) {
        if let Err(error @ sqlx::Error::Database(_)) = result
            && !crate::error::is_connection_failure(error)
            && let Err(broken) = sqlx::Connection::ping(&mut *self).await
        {
            self.done(&Err::<(), _>(broken));
            return;
        }
        self.done(result);
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        // Dropped before `done` (the statement's future was dropped): the connection
        // goes back to the pool, which checks it.
        if self.conn.is_some() && self.held {
            self.home.state.lock().count -= 1;
        }
    }
}

impl Deref for Lease<'_> {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        // Present until `done`, which consumes the lease.
        self.conn
            .as_deref()
            .unwrap_or_else(|| unreachable!("a lease holds its connection until done"))
    }
}

impl DerefMut for Lease<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn
            .as_deref_mut()
            .unwrap_or_else(|| unreachable!("a lease holds its connection until done"))
    }
}
