//! Appends: the one-statement paths for a single event at an exact version
//! (`sql/append_one.sql`) and for any request whose streams all have exact versions
//! (`sql/append_many.sql`), the general path through `eventcore_append`, and what an
//! append answers after its connection failed (found, deduplicated, or an unknown
//! outcome).

use chrono::{DateTime, Utc};
use eventcore::{
    AppendOutcome, AppendRequest, AppendedEvent, EventId, EventMetadata, ExpectedVersion,
    IdempotencyKey, StreamId,
};
use sqlx::Row;
use sqlx::postgres::PgRow;
use uuid::Uuid;

use super::PostgresEventStore;
use super::rows::{
    appended_from_row, corrupt, decode_error, position_from, stream_from, version_from,
};
use crate::error::{
    is_connection_failure, is_duplicate_event_id, is_ended_by_server, is_stream_version_taken,
    map_sqlx_error,
};

/// Why an append statement did not answer.
pub(super) enum AppendFailure {
    /// No connection could be had: nothing was sent.
    NotSent(sqlx::Error),
    /// The statement was sent and failed, or its answer was lost.
    Failed(sqlx::Error),
}

/// A request the one-statement path takes: one event to one stream at an exact version
/// (or no stream yet), without an idempotency key.
pub(super) struct SingleAppend<'r> {
    stream: &'r StreamId,
    /// The exact version expected; 0 for no stream.
    expected: i64,
    expected_version: ExpectedVersion,
    event: &'r eventcore::EventData,
    metadata: String,
}

pub(super) fn single_exact(request: &AppendRequest) -> eventcore::Result<Option<SingleAppend<'_>>> {
    let [stream] = request.streams.as_slice() else {
        return Ok(None);
    };
    let [event] = stream.events.as_slice() else {
        return Ok(None);
    };
    if request.idempotency_key.is_some() {
        return Ok(None);
    }
    let expected = match stream.expected_version {
        ExpectedVersion::Any => return Ok(None),
        ExpectedVersion::NoStream => 0,
        ExpectedVersion::Exact(_) => expected_code(stream.expected_version),
    };
    Ok(Some(SingleAppend {
        stream: &stream.stream_id,
        expected,
        expected_version: stream.expected_version,
        event,
        metadata: metadata_json(&event.metadata)?,
    }))
}

/// A request the one-statement path for several streams takes: every stream at an exact
/// version (or no stream yet), without an idempotency key, with at least one event.
/// Built only for requests the single-event path does not take.
pub(super) struct ManyAppend<'r> {
    request: &'r AppendRequest,
    streams: Vec<&'r str>,
    /// Each stream's exact version expected; 0 for no stream.
    expected: Vec<i64>,
    written: Vec<bool>,
    event_streams: Vec<&'r str>,
    event_versions: Vec<i64>,
    event_ids: Vec<Uuid>,
    event_types: Vec<&'r str>,
    payloads: Vec<&'r str>,
    metadata: Vec<String>,
}

pub(super) fn many_exact(request: &AppendRequest) -> eventcore::Result<Option<ManyAppend<'_>>> {
    let n = request.event_count();
    // Without events there is nothing to write; the general path answers the check.
    if request.idempotency_key.is_some() || n == 0 {
        return Ok(None);
    }
    let mut many = ManyAppend {
        request,
        streams: Vec::with_capacity(request.streams.len()),
        expected: Vec::with_capacity(request.streams.len()),
        written: Vec::with_capacity(request.streams.len()),
        event_streams: Vec::with_capacity(n),
        event_versions: Vec::with_capacity(n),
        event_ids: Vec::with_capacity(n),
        event_types: Vec::with_capacity(n),
        payloads: Vec::with_capacity(n),
        metadata: Vec::with_capacity(n),
    };
    for stream in &request.streams {
        let expected = match stream.expected_version {
            ExpectedVersion::Any => return Ok(None),
            ExpectedVersion::NoStream => 0,
            ExpectedVersion::Exact(version) => match i64::try_from(version.value()) {
                Ok(version) => version,
                // No stream reaches such a version: the general path reports the
                // conflict.
                Err(_) => return Ok(None),
            },
        };
        many.streams.push(stream.stream_id.as_str());
        many.expected.push(expected);
        many.written.push(!stream.events.is_empty());
        for (offset, event) in (1_i64..).zip(&stream.events) {
            let Some(version) = expected.checked_add(offset) else {
                return Ok(None);
            };
            many.event_streams.push(stream.stream_id.as_str());
            many.event_versions.push(version);
            many.event_ids.push(event.event_id.as_uuid());
            many.event_types.push(event.event_type.as_str());
            many.payloads.push(event.payload.as_str());
            many.metadata.push(metadata_json(&event.metadata)?);
        }
    }
    Ok(Some(many))
}

/// The answer of `sql/append_many.sql`: one row per event written (its position,
/// recording time and id); a version conflict when streams were not at their expected
/// versions in the statement's snapshot (a row each, with its version); or none when a
/// later check failed and nothing was written. Positions are drawn in request order, so
/// sorted they pair with the request's events; the ids prove it.
pub(super) fn many_outcome(
    rows: &[PgRow],
    many: &ManyAppend<'_>,
) -> eventcore::Result<Option<AppendOutcome>> {
    if rows.is_empty() {
        return Ok(None);
    }
    let mut conflicts = Vec::new();
    for row in rows {
        let stream: Option<&str> = row.try_get(4).map_err(decode_error)?;
        let Some(stream) = stream else { continue };
        let actual: i64 = row.try_get(5).map_err(decode_error)?;
        let Some(asked) = many
            .request
            .streams
            .iter()
            .find(|s| s.stream_id.as_str() == stream)
        else {
            return Err(corrupt(format!(
                "the append reported a conflict on {stream:?}, which it was not asked for"
            )));
        };
        conflicts.push(eventcore::StreamConflict {
            stream: asked.stream_id.clone(),
            expected: asked.expected_version,
            actual: version_from(actual)?,
        });
    }
    if !conflicts.is_empty() {
        if conflicts.len() != rows.len() {
            return Err(corrupt(
                "the append answered both written events and conflicts".to_owned(),
            ));
        }
        return Err(eventcore::Error::VersionConflict { conflicts });
    }
    if rows.len() != many.event_ids.len() {
        return Err(corrupt(format!(
            "the append answered {} rows for {} events",
            rows.len(),
            many.event_ids.len()
        )));
    }
    let mut written = rows
        .iter()
        .map(|row| {
            let position: i64 = row.try_get(0).map_err(decode_error)?;
            let recorded_at: DateTime<Utc> = row.try_get(1).map_err(decode_error)?;
            let id: Uuid = row.try_get(2).map_err(decode_error)?;
            Ok((position_from(position)?, recorded_at, id))
        })
        .collect::<eventcore::Result<Vec<_>>>()?;
    written.sort_unstable_by_key(|(position, _, _)| *position);
    let events = many
        .request
        .streams
        .iter()
        .flat_map(|stream| std::iter::repeat(stream).zip(&stream.events))
        .zip(&many.event_versions)
        .zip(written)
        .map(|(((stream, event), version), (position, recorded_at, id))| {
            if id != event.event_id.as_uuid() {
                return Err(corrupt(format!(
                    "the append drew positions out of request order (event {id} where {} was due)",
                    event.event_id
                )));
            }
            Ok(AppendedEvent::new(
                event.event_id,
                stream.stream_id.clone(),
                version_from(*version)?,
                position,
            )
            .with_recorded_at(recorded_at))
        })
        .collect::<eventcore::Result<Vec<_>>>()?;
    Ok(Some(AppendOutcome::written(events)))
}

pub(super) fn metadata_json(metadata: &EventMetadata) -> eventcore::Result<String> {
    serde_json::to_string(metadata).map_err(|source| eventcore::Error::Serialization {
        event_type: "EventMetadata".to_owned(),
        source,
    })
}

/// The answer of `sql/append_one.sql`: the stream's version, and where the event landed
/// (NULL when the version was not the one expected: nothing was written).
pub(super) fn single_outcome(
    row: &PgRow,
    single: &SingleAppend<'_>,
) -> eventcore::Result<AppendOutcome> {
    let actual = version_from(row.try_get(0).map_err(decode_error)?)?;
    let position: Option<i64> = row.try_get(1).map_err(decode_error)?;
    let recorded_at: Option<DateTime<Utc>> = row.try_get(2).map_err(decode_error)?;
    let (Some(position), Some(recorded_at)) = (position, recorded_at) else {
        return Err(eventcore::Error::VersionConflict {
            conflicts: vec![eventcore::StreamConflict {
                stream: single.stream.clone(),
                expected: single.expected_version,
                actual,
            }],
        });
    };
    let event = AppendedEvent::new(
        single.event.event_id,
        single.stream.clone(),
        actual.next(),
        position_from(position)?,
    )
    .with_recorded_at(recorded_at);
    Ok(AppendOutcome::written(vec![event]))
}

/// The answer of `eventcore_append`.
pub(super) fn general_outcome(row: &PgRow) -> eventcore::Result<AppendOutcome> {
    let deduplicated: bool = row.try_get("deduplicated").map_err(decode_error)?;
    let ids: Vec<Uuid> = row.try_get("event_ids").map_err(decode_error)?;
    let stream_ids: Vec<String> = row.try_get("stream_ids").map_err(decode_error)?;
    let versions: Vec<i64> = row.try_get("versions").map_err(decode_error)?;
    let positions: Vec<i64> = row.try_get("positions").map_err(decode_error)?;
    let recorded_at: Vec<DateTime<Utc>> = row.try_get("recorded_at").map_err(decode_error)?;
    if ids.len() != stream_ids.len()
        || ids.len() != versions.len()
        || ids.len() != positions.len()
        || ids.len() != recorded_at.len()
    {
        return Err(corrupt(
            "eventcore_append returned arrays of different lengths".to_owned(),
        ));
    }
    let events = ids
        .into_iter()
        .zip(stream_ids)
        .zip(versions.into_iter().zip(positions))
        .zip(recorded_at)
        .map(|(((id, stream), (version, position)), recorded_at)| {
            Ok(AppendedEvent::new(
                EventId::from_uuid(id),
                stream_from(stream)?,
                version_from(version)?,
                position_from(position)?,
            )
            .with_recorded_at(recorded_at))
        })
        .collect::<eventcore::Result<Vec<_>>>()?;
    let outcome = AppendOutcome::written(events);
    Ok(if deduplicated {
        outcome.into_deduplicated()
    } else {
        outcome
    })
}

pub(super) fn expected_code(expected: ExpectedVersion) -> i64 {
    match expected {
        ExpectedVersion::Any => -1,
        ExpectedVersion::NoStream => -2,
        // No stream can reach a version above i64::MAX (the column's type), so such an
        // expectation fails as a conflict, as on every backend; i64::MAX itself is as
        // unreachable, and the conflict reports the expectation as given.
        ExpectedVersion::Exact(version) => i64::try_from(version.value()).unwrap_or(i64::MAX),
    }
}

/// Tells this process's live readers and its notifier that an append ended, when
/// dropped (see `append_traced`).
struct AppendEnded<'a> {
    appended: &'a tokio::sync::watch::Sender<crate::notify::Appends>,
    /// The newest position it wrote, if it wrote.
    position: Option<u64>,
}

impl Drop for AppendEnded<'_> {
    fn drop(&mut self) {
        let position = self.position;
        self.appended.send_modify(|appends| {
            appends.ended = appends.ended.wrapping_add(1);
            if let Some(position) = position {
                appends.last_position = appends.last_position.max(position);
            }
        });
    }
}

impl PostgresEventStore {
    pub(super) async fn append_traced(
        &self,
        request: AppendRequest,
    ) -> eventcore::Result<AppendOutcome> {
        request.validate()?;
        // Every append that ends, committed or not, may let the log's visible head move
        // (its mark is gone): live readers held back by it look again, here at once and
        // in other processes through the notifier. Said on drop, so an append whose
        // future is cancelled says it too.
        let mut ended = self.ensure_background().then(|| AppendEnded {
            appended: &self.inner.appended,
            position: None,
        });
        let result = self.append_validated(request).await;
        if let Some(ended) = ended.as_mut() {
            ended.position = result
                .as_ref()
                .ok()
                .filter(|outcome| !outcome.deduplicated)
                .and_then(|outcome| outcome.events.last())
                .map(|event| event.global_position.value());
        }
        result
    }

    async fn append_validated(&self, request: AppendRequest) -> eventcore::Result<AppendOutcome> {
        // Stored with the key, so that after a lost answer this call can tell its own
        // write from an earlier call's.
        let attempt = Uuid::new_v4();
        let result = if let Some(single) = single_exact(&request)? {
            match self.append_one(&single).await {
                // Another append took the version after this statement's snapshot.
                // Nothing was written: the general path reports the conflict with the
                // stream's actual version.
                Err(AppendFailure::Failed(error)) if is_stream_version_taken(&error) => {
                    self.append_general(&request, attempt).await
                }
                result => result,
            }
        } else if let Some(many) = many_exact(&request)? {
            match self.append_many(&many).await {
                // A version not the one expected in the statement's snapshot is
                // reported by the statement itself (`Ok(Err(VersionConflict))`). A later
                // check that failed (a version taken after the snapshot, a stream only
                // read that moved before its lock): nothing was written, and the general
                // path, which checks after its locks, reports the conflict (or writes,
                // if the versions hold by then).
                Err(AppendFailure::Failed(error)) if is_stream_version_taken(&error) => {
                    self.append_general(&request, attempt).await
                }
                Ok(Ok(None)) => self.append_general(&request, attempt).await,
                Ok(Ok(Some(outcome))) => Ok(Ok(outcome)),
                Ok(Err(error)) => Ok(Err(error)),
                Err(failure) => Err(failure),
            }
        } else {
            self.append_general(&request, attempt).await
        };
        let outcome = match result {
            Ok(outcome) => outcome,
            // No connection, so nothing was sent.
            Err(AppendFailure::NotSent(error)) => {
                return Err(map_sqlx_error(error, "appending", Some(&request)));
            }
            // The answer was lost; the append may or may not have committed.
            Err(AppendFailure::Failed(error)) if is_connection_failure(&error) => {
                return self.recover(&request, attempt, error).await;
            }
            Err(AppendFailure::Failed(error)) if is_duplicate_event_id(&error) => {
                // The same events were appended before: this is a repeat of a request
                // that committed (its answer was lost). Its outcome is the answer.
                if let Some(events) = self.stored_events(&request).await? {
                    return Ok(AppendOutcome::written(events).into_deduplicated());
                }
                return Err(map_sqlx_error(error, "appending", Some(&request)));
            }
            Err(AppendFailure::Failed(error)) => {
                return Err(map_sqlx_error(error, "appending", Some(&request)));
            }
        }?;
        Ok(outcome)
    }

    /// One event to one stream at an exact version, in one plain statement
    /// (`sql/append_one.sql`). The outer error is the database's; the inner one a
    /// version conflict or a malformed answer.
    pub(super) async fn append_one(
        &self,
        single: &SingleAppend<'_>,
    ) -> Result<eventcore::Result<AppendOutcome>, AppendFailure> {
        let mut conn = self
            .inner
            .kept
            .lease()
            .await
            .map_err(AppendFailure::NotSent)?;
        let row = sqlx::query(&self.inner.sql.append_one)
            .bind(single.stream.as_str())
            .bind(single.expected)
            .bind(single.event.event_id.as_uuid())
            .bind(single.event.event_type.as_str())
            .bind(single.event.payload.as_str())
            .bind(single.metadata.as_str())
            .fetch_one(&mut *conn)
            .await;
        conn.done_after_rollback(&row).await;
        Ok(single_outcome(&row.map_err(AppendFailure::Failed)?, single))
    }

    /// Every stream at an exact version, no key, in one plain statement
    /// (`sql/append_many.sql`); `None` when a check failed and nothing was written. The
    /// outer error is the database's.
    pub(super) async fn append_many(
        &self,
        many: &ManyAppend<'_>,
    ) -> Result<eventcore::Result<Option<AppendOutcome>>, AppendFailure> {
        let mut conn = self
            .inner
            .kept
            .lease()
            .await
            .map_err(AppendFailure::NotSent)?;
        let rows = sqlx::query(&self.inner.sql.append_many)
            .bind(&many.streams)
            .bind(&many.expected)
            .bind(&many.written)
            .bind(&many.event_streams)
            .bind(&many.event_versions)
            .bind(&many.event_ids)
            .bind(&many.event_types)
            .bind(&many.payloads)
            .bind(&many.metadata)
            .fetch_all(&mut *conn)
            .await;
        conn.done_after_rollback(&rows).await;
        Ok(many_outcome(&rows.map_err(AppendFailure::Failed)?, many))
    }

    /// Any request, through `eventcore_append` (migrations/0006).
    pub(super) async fn append_general(
        &self,
        request: &AppendRequest,
        attempt: Uuid,
    ) -> Result<eventcore::Result<AppendOutcome>, AppendFailure> {
        let n = request.event_count();
        let mut streams = Vec::with_capacity(request.streams.len());
        let mut expected = Vec::with_capacity(request.streams.len());
        let mut event_streams: Vec<i32> = Vec::with_capacity(n);
        let mut event_ids = Vec::with_capacity(n);
        let mut event_types = Vec::with_capacity(n);
        let mut payloads = Vec::with_capacity(n);
        let mut metadata = Vec::with_capacity(n);
        for (index, stream) in request.streams.iter().enumerate() {
            streams.push(stream.stream_id.as_str());
            expected.push(expected_code(stream.expected_version));
            let Ok(index) = i32::try_from(index + 1) else {
                return Ok(Err(eventcore::Error::InvalidAppend {
                    reason: "too many streams in one append".to_owned(),
                }));
            };
            for event in &stream.events {
                event_streams.push(index);
                event_ids.push(event.event_id.as_uuid());
                event_types.push(event.event_type.as_str());
                payloads.push(event.payload.as_str());
                match metadata_json(&event.metadata) {
                    Ok(json) => metadata.push(json),
                    Err(error) => return Ok(Err(error)),
                }
            }
        }
        let key = request.idempotency_key.as_ref().map(IdempotencyKey::as_str);

        let mut conn = self
            .inner
            .kept
            .lease()
            .await
            .map_err(AppendFailure::NotSent)?;
        let row = sqlx::query(&self.inner.sql.append)
            .bind(&streams)
            .bind(&expected)
            .bind(key)
            .bind(&event_streams)
            .bind(&event_ids)
            .bind(&event_types)
            .bind(&payloads)
            .bind(&metadata)
            .bind(key.map(|_| attempt))
            .fetch_one(&mut *conn)
            .await;
        conn.done_after_rollback(&row).await;
        Ok(general_outcome(&row.map_err(AppendFailure::Failed)?))
    }

    /// Where the events of `request` landed, after queueing behind any append still
    /// holding their streams; `None` unless every one of them is stored (and when the
    /// request carries none: there is nothing to find).
    pub(super) async fn stored_events(
        &self,
        request: &AppendRequest,
    ) -> eventcore::Result<Option<Vec<AppendedEvent>>> {
        let ids: Vec<Uuid> = request
            .streams
            .iter()
            .flat_map(|s| &s.events)
            .map(|e| e.event_id.as_uuid())
            .collect();
        if ids.is_empty() {
            return Ok(None);
        }
        let streams: Vec<&str> = request
            .streams
            .iter()
            .filter(|s| !s.events.is_empty())
            .map(|s| s.stream_id.as_str())
            .collect();
        let rows = sqlx::query(&self.inner.sql.events_by_id)
            .bind(&streams)
            .bind(&ids)
            .fetch_all(&self.inner.pool)
            .await
            .map_err(|e| map_sqlx_error(e, "checking an interrupted append", None))?;
        if rows.len() != ids.len() {
            return Ok(None);
        }
        rows.iter()
            .map(appended_from_row)
            .collect::<eventcore::Result<Vec<_>>>()
            .map(Some)
    }

    /// After the connection failed with `request` in flight: what it did, if that can
    /// be known now. `attempt` is the id this call stored with the request's key.
    pub(super) async fn interrupted_outcome(
        &self,
        request: &AppendRequest,
        attempt: Uuid,
    ) -> eventcore::Result<Option<AppendOutcome>> {
        let stored = self.stored_events(request).await?;
        let Some(key) = &request.idempotency_key else {
            // Without a key, the event ids are the request's identity: found means
            // stored (by this call, or an identical earlier one whose answer was lost
            // too; they cannot be told apart here). A request without events and
            // without a key leaves no trace: whether its expectations held is unknown.
            return Ok(stored.map(AppendOutcome::written));
        };
        let carries_events = request.event_count() > 0;
        // The key's row says which attempt stored it; it is written in the same
        // transaction as the events, after the stream locks stored_events waited for.
        let row: Option<(Option<Uuid>,)> = sqlx::query_as(&self.inner.sql.key_attempt)
            .bind(key.as_str())
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(|e| map_sqlx_error(e, "checking an interrupted append", None))?;
        match row {
            // Not stored yet: the append may still be running, or may never commit.
            None => Ok(None),
            // This call stored the key, and its events in the same transaction.
            Some((Some(stored_by),)) if stored_by == attempt => Ok(if carries_events {
                stored.map(AppendOutcome::written)
            } else {
                Some(AppendOutcome::written(Vec::new()))
            }),
            // An earlier call stored the key: this one wrote nothing.
            Some(_) => self.idempotent_outcome_impl(key).await,
        }
    }

    /// The answer to an append whose connection failed after the request was sent.
    pub(super) async fn recover(
        &self,
        request: &AppendRequest,
        attempt: Uuid,
        error: sqlx::Error,
    ) -> eventcore::Result<AppendOutcome> {
        tracing::warn!(%error, "connection failed during an append; checking whether it committed");
        let event_ids = request
            .streams
            .iter()
            .flat_map(|s| &s.events)
            .map(|e| e.event_id)
            .collect();
        let message = match self.interrupted_outcome(request, attempt).await {
            Ok(Some(outcome)) => return Ok(outcome),
            // The server itself ended the backend that ran the statement (it said so,
            // in place of the answer): that backend is exiting, so its transaction
            // committed before (and was found, after its locks were released) or never
            // will. Nothing was written.
            Ok(None) if is_ended_by_server(&error) => {
                return Err(map_sqlx_error(error, "appending", Some(request)));
            }
            // The connection broke without a word from the server: the statement may
            // still be running, or still on its way.
            Ok(None) => "the connection failed while the append was in flight, and its events \
                         are not stored (yet): it may still commit, or never"
                .to_owned(),
            Err(check) => format!(
                "the connection failed while the append was in flight, and checking whether \
                 it committed failed too ({check})"
            ),
        };
        Err(eventcore::Error::OutcomeUnknown {
            message,
            event_ids,
            source: Some(Box::new(error)),
        })
    }

    pub(super) async fn idempotent_outcome_impl(
        &self,
        key: &IdempotencyKey,
    ) -> eventcore::Result<Option<AppendOutcome>> {
        let rows = sqlx::query(&self.inner.sql.idempotent_outcome)
            .bind(key.as_str())
            .fetch_all(&self.inner.pool)
            .await
            .map_err(|e| map_sqlx_error(e, "looking up an idempotency key", None))?;
        if rows.is_empty() {
            return Ok(None);
        }
        let mut events = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: Option<Uuid> = row.try_get("event_id").map_err(decode_error)?;
            if id.is_some() {
                events.push(appended_from_row(row)?);
            }
        }
        Ok(Some(AppendOutcome::written(events).into_deduplicated()))
    }
}
