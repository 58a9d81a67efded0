//! Snapshots of command states, in the store's schema (migration 0008): one row per
//! key, the one folded further kept.

use chrono::{DateTime, Utc};
use eventcore::{EventId, Snapshot, SnapshotKey, SnapshotVersion};
use sqlx::Row;
use tracing::Instrument;
use uuid::Uuid;

use super::PostgresEventStore;
use super::checkpoints::position_param;
use super::rows::{corrupt, decode_error, position_from, version_from};
use crate::error::map_sqlx_error;

impl PostgresEventStore {
    pub(super) async fn load_snapshot_impl(
        &self,
        key: &SnapshotKey,
    ) -> eventcore::Result<Option<Snapshot>> {
        let span = tracing::debug_span!("eventcore.postgres.load_snapshot", snapshot = key.name());
        let row = sqlx::query(&self.inner.sql.load_snapshot)
            .bind(key.canonical())
            .fetch_optional(&self.inner.pool)
            .instrument(span)
            .await
            .map_err(|e| map_sqlx_error(e, "loading a snapshot", None))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let versions: Vec<i64> = row.try_get("versions").map_err(decode_error)?;
        let event_ids: Vec<Option<Uuid>> = row.try_get("event_ids").map_err(decode_error)?;
        let last_position: Option<i64> = row.try_get("last_position").map_err(decode_error)?;
        let state: Vec<u8> = row.try_get("state").map_err(decode_error)?;
        let taken_at: DateTime<Utc> = row.try_get("taken_at").map_err(decode_error)?;
        if versions.len() != event_ids.len() {
            return Err(corrupt(format!(
                "stored snapshot `{}` has {} versions and {} event ids",
                key.name(),
                versions.len(),
                event_ids.len()
            )));
        }
        let versions = versions
            .into_iter()
            .zip(event_ids)
            .map(|(version, event_id)| {
                Ok(SnapshotVersion {
                    version: version_from(version)?,
                    event_id: event_id.map(EventId::from_uuid),
                })
            })
            .collect::<eventcore::Result<Vec<_>>>()?;
        let last_position = last_position.map(position_from).transpose()?;
        Snapshot::new(key.clone(), versions, last_position, state, taken_at)
            .map(Some)
            .map_err(|e| corrupt(format!("stored snapshot `{}` is invalid: {e}", key.name())))
    }

    pub(super) async fn save_snapshot_impl(&self, snapshot: &Snapshot) -> eventcore::Result<bool> {
        let key = snapshot.key();
        let span = tracing::debug_span!("eventcore.postgres.save_snapshot", snapshot = key.name());
        let streams: Vec<&str> = key.streams().iter().map(|s| s.as_str()).collect();
        let versions = snapshot
            .versions()
            .iter()
            .map(|at| {
                i64::try_from(at.version.value()).map_err(|_| {
                    eventcore::Error::permanent_backend("snapshot version out of range", None)
                })
            })
            .collect::<eventcore::Result<Vec<i64>>>()?;
        let event_ids: Vec<Option<Uuid>> = snapshot
            .versions()
            .iter()
            .map(|at| at.event_id.map(|id| id.as_uuid()))
            .collect();
        let last_position = snapshot.last_position().map(position_param).transpose()?;
        let saved = sqlx::query(&self.inner.sql.save_snapshot)
            .bind(key.canonical())
            .bind(key.name())
            .bind(i64::from(key.schema_version()))
            .bind(&streams)
            .bind(&versions)
            .bind(&event_ids)
            .bind(last_position)
            .bind(snapshot.state())
            .bind(snapshot.taken_at())
            .fetch_optional(&self.inner.pool)
            .instrument(span)
            .await
            .map_err(|e| map_sqlx_error(e, "saving a snapshot", None))?;
        Ok(saved.is_some())
    }

    pub(super) async fn delete_snapshot_impl(
        &self,
        snapshot: &Snapshot,
    ) -> eventcore::Result<bool> {
        let last_position = snapshot.last_position().map(position_param).transpose()?;
        let done = sqlx::query(&self.inner.sql.delete_snapshot)
            .bind(snapshot.key().canonical())
            .bind(last_position)
            .bind(snapshot.taken_at())
            .execute(&self.inner.pool)
            .await
            .map_err(|e| map_sqlx_error(e, "deleting a snapshot", None))?;
        Ok(done.rows_affected() > 0)
    }

    pub(super) async fn delete_snapshots_impl(&self, name: &str) -> eventcore::Result<u64> {
        // No key has such a name (SnapshotKey::new refuses it), and PostgreSQL cannot
        // take a NUL in a text parameter.
        if name.is_empty() || name.chars().any(char::is_control) {
            return Ok(0);
        }
        let done = sqlx::query(&self.inner.sql.delete_snapshots)
            .bind(name)
            .execute(&self.inner.pool)
            .await
            .map_err(|e| map_sqlx_error(e, "deleting snapshots", None))?;
        Ok(done.rows_affected())
    }
}
