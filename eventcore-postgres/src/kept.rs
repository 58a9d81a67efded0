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

use std::ops::{Deref, DerefMut};

use parking_lot::Mutex;
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};

/// The connections kept, at most `capacity`.
pub(crate) struct KeptConnections {
    pool: PgPool,
    kept: Mutex<Vec<PoolConnection<Postgres>>>,
    capacity: usize,
}

impl KeptConnections {
    pub(crate) fn new(pool: PgPool, capacity: usize) -> Self {
        KeptConnections {
            pool,
            kept: Mutex::new(Vec::with_capacity(capacity)),
            capacity,
        }
    }

    /// A kept connection, or one from the pool.
    pub(crate) async fn lease(&self) -> Result<Lease<'_>, sqlx::Error> {
        let kept = self.kept.lock().pop();
        let conn = match kept {
            Some(conn) => conn,
            None => self.pool.acquire().await?,
        };
        Ok(Lease { conn, home: self })
    }
}

/// A connection for one statement. Dropped, it goes back to the pool; see
/// [`Lease::done`].
pub(crate) struct Lease<'a> {
    conn: PoolConnection<Postgres>,
    home: &'a KeptConnections,
}

impl Lease<'_> {
    /// The statement ended with `result`: a connection that answered (rows or a database
    /// error) is kept for the next statement while fewer than the capacity are kept;
    /// otherwise it goes back to the pool.
    pub(crate) fn done<T>(self, result: &Result<T, sqlx::Error>) {
        // A database error leaves the connection ready for the next statement, except
        // one that ends the session (the server shutting down, a terminated backend).
        let answered = match result {
            Ok(_) => true,
            Err(error @ sqlx::Error::Database(_)) => !crate::error::is_connection_failure(error),
            Err(_) => false,
        };
        let Lease { conn, home } = self;
        if !answered {
            if let Err(error) = result
                && crate::error::is_connection_failure(error)
            {
                // The others most likely share its fate (a restarted server): they go
                // back to the pool, which checks them, rather than fail one statement
                // each.
                let others = std::mem::take(&mut *home.kept.lock());
                drop(others);
            }
            return;
        }
        let mut kept = home.kept.lock();
        if kept.len() < home.capacity {
            kept.push(conn);
        } else {
            drop(kept);
            drop(conn);
        }
    }
}

impl Deref for Lease<'_> {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        &self.conn
    }
}

impl DerefMut for Lease<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.conn
    }
}
