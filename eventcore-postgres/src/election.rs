//! Leader election across processes: a PostgreSQL advisory lock held by a connection of
//! the leader's own.

use std::time::Duration;

use async_trait::async_trait;
use eventcore::{LeaderElection, Leadership, ProjectionName};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::map_sqlx_error;
use crate::store::PostgresEventStore;

/// One leader per name across every process using the same schema. The leader holds a
/// session advisory lock on a dedicated connection; when that connection dies (the
/// process crashed, the network failed, the session was terminated) PostgreSQL releases
/// the lock, the next candidate — blocked in `pg_advisory_lock`, not polling — gets it,
/// and the old leader learns of the loss at its next liveness check.
#[derive(Debug, Clone)]
pub struct PostgresLeaderElection {
    connect: PgConnectOptions,
    schema: String,
    check_interval: Duration,
}

impl PostgresLeaderElection {
    /// Elections among the users of `store`'s database and schema.
    pub fn new(store: &PostgresEventStore) -> Self {
        PostgresLeaderElection {
            connect: (*store.pool().connect_options()).clone(),
            schema: store.schema().to_string(),
            check_interval: Duration::from_secs(1),
        }
    }

    /// How often a leader checks that its connection, and so its lock, is alive
    /// (default 1 s): the longest a dead leader's successor and the dead leader can both
    /// believe they lead.
    pub fn with_check_interval(mut self, interval: Duration) -> Self {
        self.check_interval = interval.max(Duration::from_millis(10));
        self
    }
}

struct Hold {
    monitor: JoinHandle<()>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        // Dropping the task drops the connection, which ends the session and releases
        // the lock.
        self.monitor.abort();
    }
}

#[async_trait]
impl LeaderElection for PostgresLeaderElection {
    async fn acquire(&self, name: &ProjectionName) -> eventcore::Result<Leadership> {
        let mut conn = PgConnection::connect_with(&self.connect)
            .await
            .map_err(|e| map_sqlx_error(e, "opening the election connection", None))?;
        // Waiting for the lock may take as long as the current leader lives.
        for setting in ["SET statement_timeout TO 0", "SET lock_timeout TO 0"] {
            sqlx::query(setting)
                .execute(&mut conn)
                .await
                .map_err(|e| map_sqlx_error(e, "preparing the election connection", None))?;
        }
        // Two 32-bit hashes, of the schema and of the name: a 64-bit key.
        sqlx::query("SELECT pg_advisory_lock(hashtext('eventcore.leader.' || $1), hashtext($2))")
            .bind(&self.schema)
            .bind(name.as_str())
            .execute(&mut conn)
            .await
            .map_err(|e| map_sqlx_error(e, "waiting for leadership", None))?;
        let (lost, watch) = watch::channel(false);
        let interval = self.check_interval;
        let monitor = tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                // A partitioned network can leave a ping hanging for minutes while the
                // server has already given the lock away: no answer in time is a loss.
                let alive = matches!(
                    tokio::time::timeout(interval, conn.ping()).await,
                    Ok(Ok(()))
                );
                if !alive {
                    lost.send_replace(true);
                    return;
                }
            }
        });
        Ok(Leadership::new(name, watch, Hold { monitor }))
    }
}
