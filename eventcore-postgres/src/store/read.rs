//! Reads: streams whole or after known versions, and pages of the global log with the
//! horizon the same statement saw (ADR 0003).

use eventcore::{
    EventType, GlobalPosition, LogQuery, LogRead, RecordedEvent, StreamId, StreamVersion,
    StreamsSnapshot,
};
use sqlx::Row;

use super::PostgresEventStore;
use super::rows::{
    RowDecoder, decode_error, log_read_from_rows, recorded_from_rows, stream_from, version_from,
};
use crate::error::map_sqlx_error;

/// The stream prefix of `query` as a text parameter. PostgreSQL text cannot hold NUL;
/// a prefix holding one selects nothing on every backend (no stream id holds a control
/// character), and so does the same prefix with U+0001 in its place.
pub(crate) fn prefix_param(query: &LogQuery) -> Option<std::borrow::Cow<'_, str>> {
    query.stream_prefix().map(|prefix| {
        if prefix.contains('\0') {
            std::borrow::Cow::Owned(prefix.replace('\0', "\u{1}"))
        } else {
            std::borrow::Cow::Borrowed(prefix)
        }
    })
}

impl PostgresEventStore {
    pub(super) async fn read_streams_impl(
        &self,
        streams: &[StreamId],
    ) -> eventcore::Result<StreamsSnapshot> {
        let mut ids: Vec<&str> = streams.iter().map(StreamId::as_str).collect();
        ids.sort_unstable();
        ids.dedup();
        let op = "reading streams";
        let mut conn = self.lease(op).await?;
        let rows = sqlx::query(&self.inner.sql.read_streams)
            .bind(&ids)
            .fetch_all(&mut *conn)
            .await;
        conn.done(&rows);
        let rows = rows.map_err(|e| map_sqlx_error(e, op, None))?;
        let events = recorded_from_rows(&rows)?;
        let mut versions: Vec<(StreamId, StreamVersion)> = Vec::with_capacity(streams.len());
        for stream in streams {
            if versions.iter().any(|(id, _)| id == stream) {
                continue;
            }
            // Versions are contiguous, so the last event's version is the stream's.
            let version = events
                .iter()
                .filter(|e| &e.stream_id == stream)
                .map(|e| e.stream_version)
                .max()
                .unwrap_or(StreamVersion::INITIAL);
            versions.push((stream.clone(), version));
        }
        Ok(StreamsSnapshot { events, versions })
    }

    pub(super) async fn read_streams_after_impl(
        &self,
        streams: &[(StreamId, StreamVersion)],
    ) -> eventcore::Result<StreamsSnapshot> {
        let mut wanted: Vec<(&str, i64)> = Vec::with_capacity(streams.len());
        for (stream, after) in streams {
            if wanted.iter().any(|(id, _)| *id == stream.as_str()) {
                continue;
            }
            // No stream reaches past i64::MAX: nothing comes after such a version.
            wanted.push((
                stream.as_str(),
                i64::try_from(after.value()).unwrap_or(i64::MAX),
            ));
        }
        let ids: Vec<&str> = wanted.iter().map(|(id, _)| *id).collect();
        let afters: Vec<i64> = wanted.iter().map(|(_, after)| *after).collect();
        let op = "reading streams";
        let mut conn = self.lease(op).await?;
        let rows = sqlx::query(&self.inner.sql.read_streams_after)
            .bind(&ids)
            .bind(&afters)
            .fetch_all(&mut *conn)
            .await;
        conn.done(&rows);
        let rows = rows.map_err(|e| map_sqlx_error(e, op, None))?;
        let mut decoder = RowDecoder::default();
        let mut events = Vec::with_capacity(rows.len());
        let mut current: Vec<(StreamId, StreamVersion)> = Vec::with_capacity(wanted.len());
        for row in &rows {
            let stream = stream_from(row.try_get(2).map_err(decode_error)?)?;
            // The stream's current version, on every row (NULL: no events at all).
            let version: Option<i64> = row.try_get(8).map_err(decode_error)?;
            let version = match version {
                Some(version) => version_from(version)?,
                None => StreamVersion::INITIAL,
            };
            if !current.iter().any(|(id, _)| *id == stream) {
                current.push((stream, version));
            }
            let position: Option<i64> = row.try_get(0).map_err(decode_error)?;
            if position.is_some() {
                events.push(decoder.decode(row)?);
            }
        }
        let mut versions: Vec<(StreamId, StreamVersion)> = Vec::with_capacity(streams.len());
        for (stream, _) in streams {
            if versions.iter().any(|(id, _)| id == stream) {
                continue;
            }
            let version = current
                .iter()
                .find(|(id, _)| id == stream)
                .map_or(StreamVersion::INITIAL, |(_, version)| *version);
            versions.push((stream.clone(), version));
        }
        Ok(StreamsSnapshot { events, versions })
    }

    /// The log after `after` without the horizon (`sql/peek_log.sql`).
    pub(super) async fn peek_log_impl(
        &self,
        after: Option<GlobalPosition>,
        limit: usize,
    ) -> eventcore::Result<Vec<RecordedEvent>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let after = after.map_or(0, |p| i64::try_from(p.value()).unwrap_or(i64::MAX));
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let op = "peeking at the global log";
        let mut conn = self.lease(op).await?;
        let rows = sqlx::query(&self.inner.sql.peek_log)
            .bind(after)
            .bind(limit)
            .fetch_all(&mut *conn)
            .await;
        conn.done(&rows);
        let rows = rows.map_err(|e| map_sqlx_error(e, op, None))?;
        recorded_from_rows(&rows)
    }

    pub(super) async fn read_log_impl(&self, query: &LogQuery) -> eventcore::Result<LogRead> {
        if query.limit() == 0 {
            return Ok(LogRead::new(query, Vec::new(), None));
        }
        let after = query
            .after()
            .map_or(0, |p| i64::try_from(p.value()).unwrap_or(i64::MAX));
        let limit = i64::try_from(query.limit()).unwrap_or(i64::MAX);
        let types: Option<Vec<&str>> = query
            .event_types()
            .map(|types| types.iter().map(EventType::as_str).collect());
        let op = "reading the global log";
        let mut conn = self.lease(op).await?;
        let rows = sqlx::query(&self.inner.sql.read_all)
            .bind(after)
            .bind(prefix_param(query))
            .bind(types)
            .bind(limit)
            .fetch_all(&mut *conn)
            .await;
        conn.done(&rows);
        let rows = rows.map_err(|e| map_sqlx_error(e, op, None))?;
        log_read_from_rows(query, &rows)
    }
}
