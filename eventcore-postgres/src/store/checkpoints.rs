//! Checkpoints and parked events, in the store's schema (migration 0002), so a read
//! model in the same database can commit with its checkpoint.

use eventcore::{EventId, GlobalPosition, ParkedEvent, ProjectionName, check_checkpoint_position};
use sqlx::Row;

use super::PostgresEventStore;
use super::rows::{corrupt, decode_error, position_from, stream_from, version_from};
use crate::error::map_sqlx_error;

pub(super) fn park_query<'q>(
    sql: &'q str,
    parked: &'q ParkedEvent,
) -> eventcore::Result<sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>> {
    let version = i64::try_from(parked.stream_version.value())
        .map_err(|_| eventcore::Error::permanent_backend("stream version out of range", None))?;
    Ok(sqlx::query(sql)
        .bind(parked.projection.as_str())
        .bind(parked.event_id.as_uuid())
        .bind(position_param(parked.global_position)?)
        .bind(parked.stream_id.as_str())
        .bind(version)
        .bind(&parked.event_type)
        .bind(&parked.error)
        .bind(parked.parked_at))
}

pub(super) fn position_param(position: GlobalPosition) -> eventcore::Result<i64> {
    i64::try_from(position.value()).map_err(|_| {
        eventcore::Error::permanent_backend(format!("position {position} is out of range"), None)
    })
}

impl PostgresEventStore {
    /// Parks an event on `conn` (inside the caller's transaction).
    pub(crate) async fn park_on(
        &self,
        conn: &mut sqlx::PgConnection,
        parked: ParkedEvent,
    ) -> eventcore::Result<()> {
        let parked = parked.checked()?;
        park_query(&self.inner.sql.park, &parked)?
            .execute(conn)
            .await
            .map_err(|e| map_sqlx_error(e, "parking an event", None))?;
        Ok(())
    }

    pub(super) async fn load_checkpoint_impl(
        &self,
        projection: &ProjectionName,
    ) -> eventcore::Result<Option<GlobalPosition>> {
        let row: Option<(i64,)> = sqlx::query_as(&self.inner.sql.load_checkpoint)
            .bind(projection.as_str())
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(|e| map_sqlx_error(e, "loading a checkpoint", None))?;
        row.map(|(position,)| position_from(position)).transpose()
    }

    pub(super) async fn save_checkpoint_impl(
        &self,
        projection: &ProjectionName,
        position: GlobalPosition,
    ) -> eventcore::Result<()> {
        check_checkpoint_position(position)?;
        sqlx::query(&self.inner.sql.save_checkpoint)
            .bind(projection.as_str())
            .bind(position_param(position)?)
            .execute(&self.inner.pool)
            .await
            .map_err(|e| map_sqlx_error(e, "saving a checkpoint", None))?;
        Ok(())
    }

    pub(super) async fn reset_checkpoint_impl(
        &self,
        projection: &ProjectionName,
    ) -> eventcore::Result<()> {
        sqlx::query(&self.inner.sql.reset_checkpoint)
            .bind(projection.as_str())
            .execute(&self.inner.pool)
            .await
            .map_err(|e| map_sqlx_error(e, "resetting a checkpoint", None))?;
        Ok(())
    }

    pub(super) async fn park_impl(&self, parked: ParkedEvent) -> eventcore::Result<()> {
        let parked = parked.checked()?;
        park_query(&self.inner.sql.park, &parked)?
            .execute(&self.inner.pool)
            .await
            .map_err(|e| map_sqlx_error(e, "parking an event", None))?;
        Ok(())
    }

    pub(super) async fn parked_impl(
        &self,
        projection: &ProjectionName,
    ) -> eventcore::Result<Vec<ParkedEvent>> {
        let rows = sqlx::query(&self.inner.sql.parked)
            .bind(projection.as_str())
            .fetch_all(&self.inner.pool)
            .await
            .map_err(|e| map_sqlx_error(e, "reading parked events", None))?;
        rows.iter()
            .map(|row| {
                Ok(ParkedEvent::from_parts(
                    ProjectionName::try_new(
                        row.try_get::<String, _>("projection")
                            .map_err(decode_error)?,
                    )
                    .map_err(|e| corrupt(format!("stored projection name: {e}")))?,
                    EventId::from_uuid(row.try_get("event_id").map_err(decode_error)?),
                    stream_from(row.try_get("stream_id").map_err(decode_error)?)?,
                    version_from(row.try_get("stream_version").map_err(decode_error)?)?,
                    position_from(row.try_get("global_position").map_err(decode_error)?)?,
                    row.try_get("event_type").map_err(decode_error)?,
                    row.try_get("error").map_err(decode_error)?,
                    row.try_get("parked_at").map_err(decode_error)?,
                ))
            })
            .collect()
    }
}
