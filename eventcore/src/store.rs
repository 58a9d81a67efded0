//! The event store contract every backend implements.

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::error::{AppendLimit, Error, JsonProblem, Result};
use crate::event::{EventData, EventType, RecordedEvent};
use crate::limits::{
    MAX_APPEND_BYTES, MAX_EVENTS_PER_APPEND, MAX_JSON_DEPTH, MAX_METADATA_BYTES,
    MAX_STREAMS_PER_APPEND,
};
use crate::types::{
    EventId, ExpectedVersion, GlobalPosition, IdempotencyKey, StreamId, StreamVersion,
};

/// The storage contract: streams of serialized events, a global log, atomic
/// multi-stream appends under optimistic concurrency.
///
/// Backends work on serialized events ([`EventData`] in, [`RecordedEvent`] out) so they
/// are not generic over user types, and the trait is object safe:
/// `Arc<dyn EventStore>` is what the [`crate::CommandExecutor`] holds.
///
/// Every backend must pass the public conformance suite
/// (`eventcore::testing::conformance`, feature `testing`); the semantics below are what
/// it checks.
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Reads every event of the given streams and their current versions, as one
    /// consistent snapshot: an append that touched several of them is seen entirely or
    /// not at all.
    ///
    /// Events come back in global-position order across all the streams. A stream that
    /// does not exist reads as empty at [`StreamVersion::INITIAL`]. Duplicates in
    /// `streams` are read once.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] when the backend fails.
    async fn read_streams(&self, streams: &[StreamId]) -> Result<StreamsSnapshot>;

    /// Like [`EventStore::read_streams`], but returns only the events of each stream
    /// after the version given for it, with every stream's *current* version; one
    /// consistent snapshot, events in global-position order.
    ///
    /// A version past the stream's end returns no events: `StreamVersion::new(u64::MAX)`
    /// reads only the version. The executor uses this to bring a cached state up to date
    /// without reading whole streams again. The provided implementation reads the whole
    /// streams and drops what is not wanted; backends override it to read less.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] when the backend fails.
    async fn read_streams_after(
        &self,
        streams: &[(StreamId, StreamVersion)],
    ) -> Result<StreamsSnapshot> {
        let ids: Vec<StreamId> = streams.iter().map(|(id, _)| id.clone()).collect();
        let mut snapshot = self.read_streams(&ids).await?;
        snapshot.events.retain(|event| {
            streams
                .iter()
                .find(|(id, _)| *id == event.stream_id)
                .is_none_or(|(_, after)| event.stream_version > *after)
        });
        Ok(snapshot)
    }

    /// Appends events to one or more streams atomically: either every event becomes
    /// visible, or none does.
    ///
    /// Every [`StreamAppend`] carries an expectation that is checked under the same atomic
    /// unit, including the entries with no events (streams a command only read). If the
    /// request carries an [`IdempotencyKey`] that the store already holds, nothing is
    /// written and the outcome of the first append is returned with
    /// [`AppendOutcome::deduplicated`] set; the key is checked before any version.
    ///
    /// # Errors
    ///
    /// [`Error::VersionConflict`] naming every stream whose expectation failed;
    /// [`Error::InvalidAppend`] for a malformed request; [`Error::Backend`] when the
    /// backend fails, in which case nothing was written; [`Error::OutcomeUnknown`] when
    /// the backend lost contact while the append was in flight and could not find out
    /// whether it committed. Sending the same request again is safe then (event ids
    /// are unique: nothing is stored twice); with an idempotency key it also tells the
    /// outcome, as the key is checked before any version. Without one, a repeat whose
    /// first call committed may answer [`Error::VersionConflict`] (the stream moved);
    /// read the streams to see whether the events are there.
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome>;

    /// Reads the global log in position order, after `query`'s position, at most
    /// `query`'s limit of events, with its filters applied before the limit.
    ///
    /// What a reader sees is always a prefix of the final global order: once a position
    /// has been returned, no event with a lower position will appear later.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] when the backend fails.
    async fn read_all(&self, query: &LogQuery) -> Result<Vec<RecordedEvent>>;

    /// Reads like [`EventStore::read_all`], and also says how far the read looked:
    /// [`LogRead::scanned`]. Readers that follow the log wait for events after
    /// `scanned`, not after a head they read before: with filters, the log may end in
    /// events they do not want; and a backend whose visible log can briefly shrink
    /// (PostgreSQL's horizon, ADR 0003) may read fewer events than a head read earlier
    /// promised.
    ///
    /// The provided implementation reads [`EventStore::head_position`] first, then
    /// the events. That is correct for backends whose visible log only grows (what was
    /// visible stays visible); backends where it can shrink must override this.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] when the backend fails.
    async fn read_log(&self, query: &LogQuery) -> Result<LogRead> {
        let head = self.head_position().await?;
        let events = self.read_all(query).await?;
        Ok(LogRead::new(query, events, head))
    }

    /// The position of the last visible event, `None` when the log is empty.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] when the backend fails.
    async fn head_position(&self) -> Result<Option<GlobalPosition>>;

    /// Waits, without polling, until an event after `after` is visible (returns at once
    /// if one already is). `None` waits for the first event.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] when the backend fails or its notification source is gone.
    async fn wait_for_events(&self, after: Option<GlobalPosition>) -> Result<()>;

    /// The outcome of the append that stored `key`, if any.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] when the backend fails.
    async fn idempotent_outcome(&self, key: &IdempotencyKey) -> Result<Option<AppendOutcome>>;

    /// At most `limit` events of the log after `after`, in position order, **without
    /// the prefix guarantee** of [`EventStore::read_all`]: an event whose position was
    /// drawn before a later one's but whose commit is not yet visible may be missing,
    /// and never be returned by a later peek past it. For readers that check what they
    /// use and can do without what is missing (the executor's log feed,
    /// [`crate::CommandExecutor::with_log_feed`]); projections and subscriptions use
    /// `read_all`. The provided implementation is `read_all`; a backend whose `read_all`
    /// pays for the guarantee (PostgreSQL's horizon, ADR 0003) overrides it, and a store
    /// that wraps another should forward it (or its feed falls back to `read_all`).
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] when the backend fails.
    async fn peek_log(
        &self,
        after: Option<GlobalPosition>,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>> {
        self.read_all(&LogQuery::new().with_after(after).with_limit(limit))
            .await
    }

    /// Where this store keeps snapshots of command states
    /// ([`crate::StateCache::with_snapshots`]); `None` (the provided implementation)
    /// for a store that keeps none, whose executors then always fold from the start
    /// when nothing is cached. A store that wraps another should forward it.
    fn snapshots(&self) -> Option<&dyn crate::snapshot::SnapshotStore> {
        None
    }
}

#[async_trait]
impl<S: EventStore + ?Sized> EventStore for Arc<S> {
    async fn read_streams(&self, streams: &[StreamId]) -> Result<StreamsSnapshot> {
        (**self).read_streams(streams).await
    }

    async fn read_streams_after(
        &self,
        streams: &[(StreamId, StreamVersion)],
    ) -> Result<StreamsSnapshot> {
        (**self).read_streams_after(streams).await
    }

    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome> {
        (**self).append(request).await
    }

    async fn read_all(&self, query: &LogQuery) -> Result<Vec<RecordedEvent>> {
        (**self).read_all(query).await
    }

    async fn read_log(&self, query: &LogQuery) -> Result<LogRead> {
        (**self).read_log(query).await
    }

    async fn head_position(&self) -> Result<Option<GlobalPosition>> {
        (**self).head_position().await
    }

    async fn wait_for_events(&self, after: Option<GlobalPosition>) -> Result<()> {
        (**self).wait_for_events(after).await
    }

    async fn idempotent_outcome(&self, key: &IdempotencyKey) -> Result<Option<AppendOutcome>> {
        (**self).idempotent_outcome(key).await
    }

    async fn peek_log(
        &self,
        after: Option<GlobalPosition>,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>> {
        (**self).peek_log(after, limit).await
    }

    fn snapshots(&self) -> Option<&dyn crate::snapshot::SnapshotStore> {
        (**self).snapshots()
    }
}

/// The events of several streams and their versions, as read together.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamsSnapshot {
    /// Every event of the streams, in global-position order.
    pub events: Vec<RecordedEvent>,
    /// Each requested stream's version at the time of the read (0 if it has no events).
    pub versions: Vec<(StreamId, StreamVersion)>,
}

impl StreamsSnapshot {
    /// The version read for `stream`, [`StreamVersion::INITIAL`] if it was not read.
    pub fn version_of(&self, stream: &StreamId) -> StreamVersion {
        self.versions
            .iter()
            .find(|(id, _)| id == stream)
            .map_or(StreamVersion::INITIAL, |(_, version)| *version)
    }
}

/// One stream's part of an [`AppendRequest`].
#[derive(Debug, Clone, PartialEq)]
pub struct StreamAppend {
    /// The stream.
    pub stream_id: StreamId,
    /// What the stream's version must be for the append to go ahead.
    pub expected_version: ExpectedVersion,
    /// The events to append, in order; empty for a stream that is only checked.
    pub events: Vec<EventData>,
}

impl StreamAppend {
    /// Events to append to `stream_id` if it is at `expected_version`.
    pub fn new(
        stream_id: StreamId,
        expected_version: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Self {
        StreamAppend {
            stream_id,
            expected_version,
            events,
        }
    }

    /// A stream that is only checked: the append fails unless it is at
    /// `expected_version`.
    pub fn check_only(stream_id: StreamId, expected_version: ExpectedVersion) -> Self {
        Self::new(stream_id, expected_version, Vec::new())
    }
}

/// An atomic append to one or more streams.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AppendRequest {
    /// The participating streams; each at most once. Global positions are assigned in
    /// this order, stream by stream.
    pub streams: Vec<StreamAppend>,
    /// Makes the append happen at most once (see [`IdempotencyKey`]).
    pub idempotency_key: Option<IdempotencyKey>,
}

impl AppendRequest {
    /// An empty request; add streams with [`AppendRequest::with_stream`].
    pub fn new() -> Self {
        Self::default()
    }

    /// A request that appends `events` to one stream.
    pub fn single(
        stream_id: StreamId,
        expected_version: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Self {
        Self::new().with_stream(StreamAppend::new(stream_id, expected_version, events))
    }

    /// Adds a participating stream.
    pub fn with_stream(mut self, stream: StreamAppend) -> Self {
        self.streams.push(stream);
        self
    }

    /// Sets the idempotency key.
    pub fn with_idempotency_key(mut self, key: IdempotencyKey) -> Self {
        self.idempotency_key = Some(key);
        self
    }

    /// The number of events the request would write.
    pub fn event_count(&self) -> usize {
        self.streams.iter().map(|s| s.events.len()).sum()
    }

    /// Checks the rules every backend enforces before touching storage: at least one
    /// stream, no stream twice, no event id twice, and the limits of
    /// [`crate::limits`] (streams, events and bytes per append; metadata size, depth
    /// and NUL characters). Payloads were checked when they were made
    /// ([`crate::EventPayload`]).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidAppend`], [`Error::AppendTooLarge`] or
    /// [`Error::InvalidMetadata`], saying which rule failed.
    pub fn validate(&self) -> Result<()> {
        if self.streams.is_empty() {
            return Err(Error::InvalidAppend {
                reason: "the request names no stream".to_owned(),
            });
        }
        too_large(
            AppendLimit::Streams,
            self.streams.len(),
            MAX_STREAMS_PER_APPEND,
        )?;
        too_large(
            AppendLimit::Events,
            self.event_count(),
            MAX_EVENTS_PER_APPEND,
        )?;
        let mut seen = HashSet::with_capacity(self.streams.len());
        for stream in &self.streams {
            if !seen.insert(&stream.stream_id) {
                return Err(Error::InvalidAppend {
                    reason: format!("stream `{}` appears more than once", stream.stream_id),
                });
            }
        }
        let mut ids = HashSet::with_capacity(self.event_count());
        let mut bytes = 0usize;
        for event in self.streams.iter().flat_map(|s| &s.events) {
            if !ids.insert(event.event_id) {
                return Err(Error::InvalidAppend {
                    reason: format!("event id {} appears more than once", event.event_id),
                });
            }
            let metadata = check_metadata(&event.metadata)
                .map_err(|problem| Error::InvalidMetadata { problem })?;
            bytes = bytes
                .saturating_add(event.payload.len())
                .saturating_add(metadata);
        }
        too_large(AppendLimit::Bytes, bytes, MAX_APPEND_BYTES)
    }
}

fn too_large(limit: AppendLimit, actual: usize, max: usize) -> Result<()> {
    if actual > max {
        return Err(Error::AppendTooLarge { limit, actual, max });
    }
    Ok(())
}

/// Checks metadata against the rule at the door (NUL characters, depth, size) and
/// returns the length of its JSON form.
pub(crate) fn check_metadata(metadata: &crate::EventMetadata) -> Result<usize, JsonProblem> {
    /// Depth of a custom value whose enclosing arrays and objects take `depth` levels;
    /// stops looking past the limit (a hostile value may be nested a million deep).
    fn check(value: &serde_json::Value, depth: usize) -> Result<(), JsonProblem> {
        match value {
            serde_json::Value::String(s) if s.contains('\0') => Err(JsonProblem::NulCharacter),
            serde_json::Value::Array(_) | serde_json::Value::Object(_)
                if depth >= MAX_JSON_DEPTH =>
            {
                Err(JsonProblem::TooDeep {
                    max: MAX_JSON_DEPTH,
                })
            }
            serde_json::Value::Array(items) => {
                items.iter().try_for_each(|item| check(item, depth + 1))
            }
            serde_json::Value::Object(map) => map.iter().try_for_each(|(key, item)| {
                if key.contains('\0') {
                    return Err(JsonProblem::NulCharacter);
                }
                check(item, depth + 1)
            }),
            _ => Ok(()),
        }
    }
    if metadata.actor.as_deref().is_some_and(|a| a.contains('\0')) {
        return Err(JsonProblem::NulCharacter);
    }
    // The metadata object is one level, its `custom` map another.
    for (key, value) in &metadata.custom {
        if key.contains('\0') {
            return Err(JsonProblem::NulCharacter);
        }
        check(value, 2)?;
    }
    // Without custom fields the size is bounded by the actor's (two ids and the field
    // names, every byte of the actor escaped at worst as `\u00XX`): no need to count.
    if metadata.custom.is_empty() {
        let bound = metadata
            .actor
            .as_ref()
            .map_or(0, |actor| actor.len().saturating_mul(6))
            .saturating_add(160);
        if bound <= MAX_METADATA_BYTES {
            return Ok(bound);
        }
    }
    let mut count = crate::json::ByteCount::default();
    serde_json::to_writer(&mut count, metadata).map_err(|error| JsonProblem::NotJson {
        message: error.to_string(),
    })?;
    if count.0 > MAX_METADATA_BYTES {
        return Err(JsonProblem::TooLarge {
            len: count.0,
            max: MAX_METADATA_BYTES,
        });
    }
    Ok(count.0)
}

/// Where one appended event landed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AppendedEvent {
    /// The event's id.
    pub event_id: EventId,
    /// Its stream.
    pub stream_id: StreamId,
    /// Its version in the stream.
    pub stream_version: StreamVersion,
    /// Its position in the global log.
    pub global_position: GlobalPosition,
    /// When the store recorded it, where the backend says (both stores of this
    /// workspace always do, deduplicated outcomes included). The [`crate::CommandExecutor`] uses it to
    /// keep a cached state up to date with its own writes
    /// ([`crate::CommandLogic::state_cache`]); without it, the next command reads them.
    pub recorded_at: Option<DateTime<Utc>>,
}

impl AppendedEvent {
    /// Assembles an appended event (for backends), without a recording time.
    pub fn new(
        event_id: EventId,
        stream_id: StreamId,
        stream_version: StreamVersion,
        global_position: GlobalPosition,
    ) -> Self {
        AppendedEvent {
            event_id,
            stream_id,
            stream_version,
            global_position,
            recorded_at: None,
        }
    }

    /// Sets when the store recorded the event: the very time a later read returns.
    pub fn with_recorded_at(mut self, recorded_at: DateTime<Utc>) -> Self {
        self.recorded_at = Some(recorded_at);
        self
    }
}

/// What an append wrote.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct AppendOutcome {
    /// The events written, in the order of the request.
    pub events: Vec<AppendedEvent>,
    /// `true` when the request's idempotency key was already stored: nothing was written
    /// now and `events` are those of the first append with that key.
    pub deduplicated: bool,
}

impl AppendOutcome {
    /// The outcome of an append that wrote `events`.
    pub fn written(events: Vec<AppendedEvent>) -> Self {
        AppendOutcome {
            events,
            deduplicated: false,
        }
    }

    /// The same outcome marked as a replay of an earlier append.
    pub fn into_deduplicated(mut self) -> Self {
        self.deduplicated = true;
        self
    }
}

/// What to read from the global log: a start, a batch size and optional filters.
///
/// # Examples
///
/// ```
/// use eventcore::{GlobalPosition, LogQuery};
///
/// let query = LogQuery::new()
///     .with_after(GlobalPosition::new(41))
///     .with_limit(500)
///     .with_stream_prefix("account-")
///     .with_event_types(["Deposited", "Withdrawn"])?;
/// assert_eq!(query.after(), Some(GlobalPosition::new(41)));
/// assert_eq!(query.limit(), 500);
/// # Ok::<(), eventcore::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogQuery {
    after: Option<GlobalPosition>,
    limit: usize,
    stream_prefix: Option<String>,
    event_types: Option<Vec<EventType>>,
}

impl LogQuery {
    /// The batch size used when none is given.
    pub const DEFAULT_LIMIT: usize = 1_000;

    /// Every event from the first one of the log, at most [`LogQuery::DEFAULT_LIMIT`]
    /// of them; narrowed with the `with_*` methods.
    pub fn new() -> Self {
        LogQuery {
            after: None,
            limit: Self::DEFAULT_LIMIT,
            stream_prefix: None,
            event_types: None,
        }
    }

    /// Only the events after `position` (exclusive); from the start with `None`.
    pub fn with_after(mut self, position: impl Into<Option<GlobalPosition>>) -> Self {
        self.after = position.into();
        self
    }

    /// At most `limit` events (the first ones after the start).
    pub fn with_limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }

    /// Only events whose stream id starts with `prefix`. A prefix no stream id can
    /// start with (one holding a control character such as NUL, or longer than
    /// [`crate::MAX_NAME_LEN`]) selects nothing, on every backend.
    pub fn with_stream_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.stream_prefix = Some(prefix.into());
        self
    }

    /// Only events of these types (exact names).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidEventType`] if a name is not a valid event type name;
    /// [`Error::EventTypePattern`] if it holds `*` (a pattern such as `"User*"`, which
    /// would select nothing).
    pub fn with_event_types<I>(mut self, types: I) -> Result<Self>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        self.event_types = Some(exact_event_types(types)?);
        Ok(self)
    }

    /// The exclusive start position.
    pub fn after(&self) -> Option<GlobalPosition> {
        self.after
    }

    /// The batch size.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The stream prefix filter.
    pub fn stream_prefix(&self) -> Option<&str> {
        self.stream_prefix.as_deref()
    }

    /// The event type filter.
    pub fn event_types(&self) -> Option<&[EventType]> {
        self.event_types.as_deref()
    }

    /// Whether `event` passes the filters (not the position or the limit).
    pub fn matches(&self, event: &RecordedEvent) -> bool {
        self.stream_prefix
            .as_deref()
            .is_none_or(|prefix| event.stream_id.as_str().starts_with(prefix))
            && self
                .event_types
                .as_deref()
                .is_none_or(|types| types.contains(&event.event_type))
    }
}

/// What [`EventStore::read_log`] returns: the events, and how far the read looked.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct LogRead {
    /// The events read, in position order, as [`EventStore::read_all`] returns them.
    pub events: Vec<RecordedEvent>,
    /// Every event the query selects after its position and at or below `scanned` is
    /// in `events`, now and forever: none will appear there later. `None` when the read
    /// looked at nothing (the visible log ends at or before the query's position).
    /// When the limit was reached, this is the last event's position.
    pub scanned: Option<GlobalPosition>,
}

impl LogRead {
    /// The answer to `query` of a read that found `events` and looked at every
    /// visible position up to `bound` (at least; a full batch stops at its last
    /// event, whatever `bound` says).
    pub fn new(
        query: &LogQuery,
        events: Vec<RecordedEvent>,
        bound: Option<GlobalPosition>,
    ) -> Self {
        let last = events.last().map(|event| event.global_position);
        let scanned = if events.len() >= query.limit() {
            last
        } else {
            last.max(bound)
        };
        // Below the query's start, nothing was looked at.
        let scanned = scanned.filter(|s| query.after().is_none_or(|after| *s > after));
        LogRead { events, scanned }
    }
}

impl Default for LogQuery {
    fn default() -> Self {
        Self::new()
    }
}

/// Exact event type names for a filter: valid, and none holding `*` (what reads as a
/// pattern is refused rather than silently selecting nothing).
pub(crate) fn exact_event_types<I>(types: I) -> Result<Vec<EventType>>
where
    I: IntoIterator,
    I::Item: AsRef<str>,
{
    types
        .into_iter()
        .map(|t| {
            let name = t.as_ref();
            if name.contains('*') {
                return Err(Error::EventTypePattern {
                    name: crate::error::truncate_for_error(name),
                });
            }
            EventType::try_new(name).map_err(Error::from)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pattern_in_an_event_type_filter_is_refused_not_left_to_select_nothing() {
        for pattern in ["User*", "*", "*Created", "A*B"] {
            let refused = LogQuery::new().with_event_types([pattern]).unwrap_err();
            assert!(
                matches!(&refused, Error::EventTypePattern { name } if name == pattern),
                "{pattern}: {refused:?}"
            );
            assert!(
                crate::ProjectionFilter::all()
                    .with_event_types(["Exact", pattern])
                    .is_err()
            );
        }
        let exact = LogQuery::new()
            .with_event_types(["UserRegistered"])
            .expect("an exact name");
        assert_eq!(exact.event_types().map(<[EventType]>::len), Some(1));
        #[cfg(feature = "distributed")]
        assert!(matches!(
            crate::distributed::PublicationRule::new(
                crate::distributed::Topic::try_new("t").expect("valid")
            )
            .with_event_types(["User*"]),
            Err(Error::EventTypePattern { .. })
        ));
    }
}
