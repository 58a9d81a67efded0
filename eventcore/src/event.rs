//! Events: the user-facing typed form and the serialized forms the stores work on.

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;

use serde::Deserialize;

use crate::error::{Error, JsonProblem, Result};
use crate::limits::MAX_PAYLOAD_BYTES;
use crate::metadata::EventMetadata;
pub(crate) use crate::names::EventType;
use crate::types::{CorrelationId, EventId, GlobalPosition, StreamId, StreamVersion};

/// A domain event type.
///
/// Payloads are stored as JSON through serde. [`Event::event_type`] names each value's
/// type explicitly and that name is stored beside the payload, so renaming a Rust type
/// does not orphan stored events, and projections can filter by type without decoding.
///
/// # Examples
///
/// ```
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Clone, Serialize, Deserialize)]
/// enum AccountEvent {
///     Opened { owner: String },
///     Deposited { amount: u64 },
/// }
///
/// impl eventcore::Event for AccountEvent {
///     fn event_type(&self) -> &'static str {
///         match self {
///             AccountEvent::Opened { .. } => "AccountOpened",
///             AccountEvent::Deposited { .. } => "AccountDeposited",
///         }
///     }
/// }
/// ```
pub trait Event: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The stable name stored with this event (at most 255 bytes, no control characters).
    fn event_type(&self) -> &'static str;
}

/// A payload serialized as JSON text that meets the rule at the door
/// ([`crate::limits`]): every backend stores it and gives back these very bytes. Cheap
/// to clone.
#[derive(Clone, PartialEq, Eq)]
pub struct EventPayload(Arc<str>);

impl EventPayload {
    /// Serializes a value.
    ///
    /// # Errors
    ///
    /// [`Error::Serialization`] if serde refuses the value (for example a map whose keys
    /// are not strings); [`Error::InvalidPayload`] if the result breaks the rule at the
    /// door ([`crate::limits`]): a NaN or infinite float (serde_json would write `null`
    /// for it), a string with a NUL character, nesting deeper than
    /// [`crate::limits::MAX_JSON_DEPTH`], a key twice in one object (a custom `Serialize`
    /// or `#[serde(flatten)]` can produce that), more than
    /// [`crate::limits::MAX_PAYLOAD_BYTES`].
    pub fn serialize<T: Serialize + ?Sized>(value: &T, event_type: &str) -> Result<Self> {
        let json = serde_json::to_string(value).map_err(|source| Error::Serialization {
            event_type: event_type.to_owned(),
            source,
        })?;
        // NaN and infinities come out as `null`; only then is the value walked again.
        if json.contains("null") && crate::json::has_non_finite(value) {
            return Err(Error::InvalidPayload {
                problem: JsonProblem::NotFinite,
            });
        }
        crate::json::check_document(&json, MAX_PAYLOAD_BYTES, 0)
            .map_err(|problem| Error::InvalidPayload { problem })?;
        Ok(EventPayload(json.into()))
    }

    /// Takes JSON text as it is (its bytes are what every read returns), after checking
    /// it against the rule at the door.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidPayload`] if `json` is not valid JSON (a lone surrogate such as
    /// `"\ud800"` and numbers out of the range of an `f64` count as invalid), holds a
    /// NUL character, repeats a key in an object, nests deeper than
    /// [`crate::limits::MAX_JSON_DEPTH`] or is longer than
    /// [`crate::limits::MAX_PAYLOAD_BYTES`].
    pub fn from_json(json: impl Into<Arc<str>>) -> Result<Self> {
        let json = json.into();
        crate::json::check_document(&json, MAX_PAYLOAD_BYTES, 0)
            .map_err(|problem| Error::InvalidPayload { problem })?;
        Ok(EventPayload(json))
    }

    /// Takes JSON text a backend read back from its storage: checks only that it is
    /// JSON a decoder can read, not the rest of the rule (rows written before a limit
    /// existed stay readable).
    ///
    /// For backends. A row whose payload fails this is returned as a damaged event
    /// ([`RecordedEvent::damaged`]), never as a failed read.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidPayload`] with [`JsonProblem::NotJson`] when `json` is not
    /// readable JSON (not JSON at all, or nested deeper than serde_json reads).
    pub fn from_stored_json(json: impl Into<Arc<str>>) -> Result<Self> {
        let json = json.into();
        let mut deserializer = serde_json::Deserializer::from_str(&json);
        serde::de::IgnoredAny::deserialize(&mut deserializer)
            .and_then(|_| deserializer.end())
            .map_err(|error| Error::InvalidPayload {
                problem: JsonProblem::NotJson {
                    message: error.to_string(),
                },
            })?;
        Ok(EventPayload(json))
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The length of the JSON text in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the JSON text is empty (never, for a payload that exists).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for EventPayload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventPayload({})", &*self.0)
    }
}

/// An event to be appended: id, type name, serialized payload and metadata.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct EventData {
    /// The id the stored event will have.
    pub event_id: EventId,
    /// The stored type name.
    pub event_type: EventType,
    /// The JSON payload.
    pub payload: EventPayload,
    /// The metadata.
    pub metadata: EventMetadata,
}

impl EventData {
    /// Serializes a typed event, with a fresh [`EventId`].
    ///
    /// # Errors
    ///
    /// [`Error::InvalidEventType`] if the event's type name is invalid, and
    /// [`Error::Serialization`] if serde refuses the payload.
    pub fn from_event<E: Event>(event: &E, metadata: EventMetadata) -> Result<Self> {
        let event_type = EventType::try_new(event.event_type())?;
        let payload = EventPayload::serialize(event, event_type.as_str())?;
        Ok(EventData {
            event_id: EventId::new(),
            event_type,
            payload,
            metadata,
        })
    }

    /// An event from parts already serialized, with a fresh [`EventId`].
    pub fn new(event_type: EventType, payload: EventPayload, metadata: EventMetadata) -> Self {
        EventData {
            event_id: EventId::new(),
            event_type,
            payload,
            metadata,
        }
    }

    /// Replaces the event id (for callers that derive ids deterministically).
    pub fn with_event_id(mut self, event_id: EventId) -> Self {
        self.event_id = event_id;
        self
    }
}

/// A stored event in serialized form, as backends return it. Cheap to clone.
///
/// Decode it into a typed [`StoredEvent`] with [`RecordedEvent::decode`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RecordedEvent {
    /// The event's unique id.
    pub event_id: EventId,
    /// The stream it belongs to.
    pub stream_id: StreamId,
    /// Its version in that stream (1 for the first event).
    pub stream_version: StreamVersion,
    /// Its position in the global log.
    pub global_position: GlobalPosition,
    /// The stored type name.
    pub event_type: EventType,
    /// The JSON payload.
    pub payload: EventPayload,
    /// The metadata.
    pub metadata: Arc<EventMetadata>,
    /// When the store recorded it.
    pub recorded_at: DateTime<Utc>,
    /// Set when the stored row cannot be read as an event (see [`RecordedEvent::damage`]).
    damage: Option<Arc<EventDamage>>,
}

/// What makes a stored event unreadable, and what was stored, unchanged (see
/// [`RecordedEvent::damage`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EventDamage {
    /// What cannot be read, with the decoder's reason.
    pub reason: String,
    /// The payload as stored.
    pub stored_payload: String,
    /// The metadata as stored.
    pub stored_metadata: String,
}

impl EventDamage {
    /// A description of the damage and the stored text (for backends).
    pub fn new(
        reason: impl Into<String>,
        stored_payload: impl Into<String>,
        stored_metadata: impl Into<String>,
    ) -> Self {
        EventDamage {
            reason: reason.into(),
            stored_payload: stored_payload.into(),
            stored_metadata: stored_metadata.into(),
        }
    }
}

impl RecordedEvent {
    /// Assembles a recorded event (for backends).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        event_id: EventId,
        stream_id: StreamId,
        stream_version: StreamVersion,
        global_position: GlobalPosition,
        event_type: EventType,
        payload: EventPayload,
        metadata: Arc<EventMetadata>,
        recorded_at: DateTime<Utc>,
    ) -> Self {
        RecordedEvent {
            event_id,
            stream_id,
            stream_version,
            global_position,
            event_type,
            payload,
            metadata,
            recorded_at,
            damage: None,
        }
    }

    /// A stored event whose row cannot be read as an event (metadata that does not
    /// decode, a payload that is not readable JSON), for backends: a read returns it in
    /// its place instead of failing, so the rest of the stream and of the log stay
    /// readable. Its `payload` is `null` and its `metadata` empty (a nil correlation
    /// id): placeholders, not data; so are a stream id or type name that were invalid in
    /// storage (a backend puts a valid stand-in there and says so in the reason).
    /// [`RecordedEvent::decode`] refuses it with [`Error::UnreadableEvent`]; the stored
    /// text is in [`RecordedEvent::damage`].
    #[allow(clippy::too_many_arguments)]
    pub fn damaged(
        event_id: EventId,
        stream_id: StreamId,
        stream_version: StreamVersion,
        global_position: GlobalPosition,
        event_type: EventType,
        recorded_at: DateTime<Utc>,
        damage: EventDamage,
    ) -> Self {
        RecordedEvent {
            event_id,
            stream_id,
            stream_version,
            global_position,
            event_type,
            payload: EventPayload(Arc::from("null")),
            metadata: Arc::new(EventMetadata::new(CorrelationId::from_uuid(
                uuid::Uuid::nil(),
            ))),
            recorded_at,
            damage: Some(Arc::new(damage)),
        }
    }

    /// What makes this stored event unreadable, `None` for every event that reads
    /// normally. Code that reads [`RecordedEvent::payload`] or
    /// [`RecordedEvent::metadata`] without [`RecordedEvent::decode`] checks this first.
    pub fn damage(&self) -> Option<&EventDamage> {
        self.damage.as_deref()
    }

    /// `Ok` unless the event is damaged: then [`Error::UnreadableEvent`].
    ///
    /// # Errors
    ///
    /// [`Error::UnreadableEvent`] naming the event and what cannot be read.
    pub fn check_readable(&self) -> Result<()> {
        match &self.damage {
            None => Ok(()),
            Some(damage) => Err(Error::UnreadableEvent {
                event_id: self.event_id,
                stream: self.stream_id.clone(),
                version: self.stream_version,
                position: self.global_position,
                reason: damage.reason.clone(),
            }),
        }
    }

    /// Deserializes the payload into `E`.
    ///
    /// # Errors
    ///
    /// [`Error::Deserialization`] naming the stream, version and type when the payload
    /// does not fit `E` (serde's reason is its source); [`Error::UnreadableEvent`] for
    /// a damaged event ([`RecordedEvent::damage`]). The event stays stored; nothing is
    /// dropped.
    pub fn decode<E: DeserializeOwned>(&self) -> Result<StoredEvent<E>> {
        self.check_readable()?;
        let payload = serde_json::from_str(self.payload.as_str()).map_err(|source| {
            Error::Deserialization {
                stream: self.stream_id.clone(),
                version: self.stream_version,
                event_type: self.event_type.as_str().to_owned(),
                source,
            }
        })?;
        Ok(StoredEvent {
            event_id: self.event_id,
            stream_id: self.stream_id.clone(),
            stream_version: self.stream_version,
            global_position: self.global_position,
            event_type: self.event_type.clone(),
            payload,
            metadata: (*self.metadata).clone(),
            recorded_at: self.recorded_at,
        })
    }
}

/// A stored event with its payload decoded into the user's type.
///
/// This is what [`crate::CommandLogic::apply`] folds and projections consume.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct StoredEvent<E> {
    /// The event's unique id.
    pub event_id: EventId,
    /// The stream it belongs to.
    pub stream_id: StreamId,
    /// Its version in that stream (1 for the first event).
    pub stream_version: StreamVersion,
    /// Its position in the global log.
    pub global_position: GlobalPosition,
    /// The stored type name.
    pub event_type: EventType,
    /// The decoded payload.
    pub payload: E,
    /// The metadata.
    pub metadata: EventMetadata,
    /// When the store recorded it.
    pub recorded_at: DateTime<Utc>,
}

impl<E> StoredEvent<E> {
    /// Assembles a stored event (for test harnesses and backends).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        event_id: EventId,
        stream_id: StreamId,
        stream_version: StreamVersion,
        global_position: GlobalPosition,
        event_type: EventType,
        payload: E,
        metadata: EventMetadata,
        recorded_at: DateTime<Utc>,
    ) -> Self {
        StoredEvent {
            event_id,
            stream_id,
            stream_version,
            global_position,
            event_type,
            payload,
            metadata,
            recorded_at,
        }
    }
}
