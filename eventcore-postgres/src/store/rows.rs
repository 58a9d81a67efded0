//! Rows to values: events, appended events and stored numbers, read the same way by
//! every operation. A row that cannot be read as an event comes back damaged, in its
//! place (see `RowDecoder`); a row of the wrong shape is a non-retryable error.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use eventcore::{
    AppendedEvent, EventDamage, EventId, EventMetadata, EventPayload, EventType, GlobalPosition,
    LogQuery, LogRead, RecordedEvent, StreamId, StreamVersion,
};
use sqlx::Row;
use sqlx::postgres::PgRow;

pub(super) fn decode_error(error: sqlx::Error) -> eventcore::Error {
    eventcore::Error::permanent_backend(
        "unexpected row shape from PostgreSQL",
        Some(Box::new(error) as eventcore::BoxError),
    )
}

pub(super) fn corrupt(what: String) -> eventcore::Error {
    eventcore::Error::permanent_backend(what, None)
}

pub(super) fn position_from(value: i64) -> eventcore::Result<GlobalPosition> {
    u64::try_from(value)
        .map(GlobalPosition::new)
        .map_err(|_| corrupt(format!("stored global position {value} is negative")))
}

pub(super) fn version_from(value: i64) -> eventcore::Result<StreamVersion> {
    u64::try_from(value)
        .map(StreamVersion::new)
        .map_err(|_| corrupt(format!("stored stream version {value} is negative")))
}

pub(super) fn stream_from(value: String) -> eventcore::Result<StreamId> {
    StreamId::try_new(value).map_err(|e| corrupt(format!("stored stream id is invalid: {e}")))
}

/// Decodes the rows of one read into events.
pub(crate) fn recorded_from_rows(rows: &[PgRow]) -> eventcore::Result<Vec<RecordedEvent>> {
    let mut decoder = RowDecoder::default();
    rows.iter().map(|row| decoder.decode(row)).collect()
}

/// Decodes the rows of `sql/read_all.sql`: events, then one row that carries only the
/// horizon the read stopped at. Every position below the horizon belongs to a
/// transaction that has ended, so the read looked at every position up to
/// `horizon - 1`.
pub(crate) fn log_read_from_rows(query: &LogQuery, rows: &[PgRow]) -> eventcore::Result<LogRead> {
    let Some((last, events)) = rows.split_last() else {
        return Err(corrupt("the log read returned no horizon row".to_owned()));
    };
    let horizon: Option<i64> = last.try_get(8).map_err(decode_error)?;
    let Some(horizon) = horizon else {
        return Err(corrupt("the log read's last row has no horizon".to_owned()));
    };
    let events = recorded_from_rows(events)?;
    let bound = u64::try_from(horizon.saturating_sub(1))
        .ok()
        .filter(|bound| *bound > 0)
        .map(GlobalPosition::new);
    Ok(LogRead::new(query, events, bound))
}

/// Turns event rows into [`RecordedEvent`]s. Every query that reads events returns the
/// same columns in the same order: `global_position, event_id, stream_id,
/// stream_version, event_type, payload (text), metadata (text), recorded_at`; they are
/// read by index and borrowed, and the stream ids and type names of one read are
/// validated and allocated once each.
#[derive(Default)]
pub(super) struct RowDecoder {
    streams: HashMap<String, StreamId>,
    types: HashMap<String, EventType>,
}

impl RowDecoder {
    pub(super) fn decode(&mut self, row: &PgRow) -> eventcore::Result<RecordedEvent> {
        // What cannot be read about the row; it comes back damaged, in its place.
        let mut problems: Vec<String> = Vec::new();
        let stream: &str = row.try_get(2).map_err(decode_error)?;
        let stream_id = match self.streams.get(stream) {
            Some(id) => id.clone(),
            None => match StreamId::try_new(stream) {
                Ok(id) => {
                    self.streams.insert(stream.to_owned(), id.clone());
                    id
                }
                Err(e) => {
                    problems.push(format!("the stored stream id is invalid: {e}"));
                    StreamId::try_new(placeholder_name(stream))
                        .map_err(|e| corrupt(format!("placeholder stream id: {e}")))?
                }
            },
        };
        let stream_version = version_from(row.try_get(3).map_err(decode_error)?)?;
        let type_name: &str = row.try_get(4).map_err(decode_error)?;
        let event_type = match self.types.get(type_name) {
            Some(event_type) => event_type.clone(),
            None => match EventType::try_new(type_name) {
                Ok(event_type) => {
                    self.types.insert(type_name.to_owned(), event_type.clone());
                    event_type
                }
                Err(e) => {
                    problems.push(format!("the stored event type is invalid: {e}"));
                    EventType::try_new(placeholder_name(type_name))
                        .map_err(|e| corrupt(format!("placeholder event type: {e}")))?
                }
            },
        };
        let event_id = EventId::from_uuid(row.try_get(1).map_err(decode_error)?);
        let global_position = position_from(row.try_get(0).map_err(decode_error)?)?;
        let recorded_at: DateTime<Utc> = row.try_get(7).map_err(decode_error)?;
        // The column type keeps the text JSON, and the rule at the door was checked on
        // the way in; rows written otherwise (by hand, by an older release) that cannot
        // be read come back marked as damaged, in their place, never as a failed read.
        let payload_text: &str = row.try_get(5).map_err(decode_error)?;
        let metadata_text: &str = row.try_get(6).map_err(decode_error)?;
        let payload = EventPayload::from_stored_json(payload_text)
            .map_err(|e| format!("the stored payload cannot be read: {e}"));
        let metadata = serde_json::from_str::<EventMetadata>(metadata_text)
            .map_err(|e| format!("the stored metadata is not EventMetadata: {e}"));
        match (payload, metadata) {
            (Ok(payload), Ok(metadata)) if problems.is_empty() => Ok(RecordedEvent::new(
                event_id,
                stream_id,
                stream_version,
                global_position,
                event_type,
                payload,
                Arc::new(metadata),
                recorded_at,
            )),
            (payload, metadata) => {
                problems.extend([payload.err(), metadata.err()].into_iter().flatten());
                let reason = problems.join("; ");
                tracing::error!(%event_id, %global_position, stream = %stream_id, %reason, "a stored event cannot be read");
                Ok(RecordedEvent::damaged(
                    event_id,
                    stream_id,
                    stream_version,
                    global_position,
                    event_type,
                    recorded_at,
                    EventDamage::new(reason, payload_text, metadata_text),
                ))
            }
        }
    }
}

/// A valid name standing in for an invalid stored one in a damaged event: control
/// characters replaced with U+FFFD, cut to 255 bytes; U+FFFD alone for an empty one.
pub(super) fn placeholder_name(stored: &str) -> String {
    let mut name = String::with_capacity(stored.len().min(255));
    for c in stored.chars() {
        let c = if c.is_control() { '\u{fffd}' } else { c };
        if name.len() + c.len_utf8() > eventcore::MAX_NAME_LEN {
            break;
        }
        name.push(c);
    }
    if name.is_empty() {
        name.push('\u{fffd}');
    }
    name
}

pub(super) fn appended_from_row(row: &PgRow) -> eventcore::Result<AppendedEvent> {
    Ok(AppendedEvent::new(
        EventId::from_uuid(row.try_get("event_id").map_err(decode_error)?),
        stream_from(row.try_get("stream_id").map_err(decode_error)?)?,
        version_from(row.try_get("stream_version").map_err(decode_error)?)?,
        position_from(row.try_get("global_position").map_err(decode_error)?)?,
    )
    .with_recorded_at(row.try_get("recorded_at").map_err(decode_error)?))
}
