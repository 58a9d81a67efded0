//! Events: the user-facing typed form and the serialized forms the stores work on.

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result, check_name, truncate_for_error};
use crate::metadata::EventMetadata;
use crate::types::{EventId, GlobalPosition, StreamId, StreamVersion};

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

/// A payload serialized as JSON text. Always valid JSON; cheap to clone.
#[derive(Clone, PartialEq, Eq)]
pub struct EventPayload(Arc<str>);

impl EventPayload {
    /// Serializes a value.
    ///
    /// # Errors
    ///
    /// [`Error::Serialization`] if serde refuses the value (for example a map whose keys
    /// are not strings); [`Error::InvalidPayload`] if the JSON contains a NUL character.
    pub fn serialize<T: Serialize + ?Sized>(value: &T, event_type: &str) -> Result<Self> {
        let json = serde_json::to_string(value).map_err(|source| Error::Serialization {
            event_type: event_type.to_owned(),
            source,
        })?;
        check_no_nul(&json)?;
        Ok(EventPayload(json.into()))
    }

    /// Takes JSON text as it is, after checking that every backend can store it.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidPayload`] if `json` is not valid JSON, contains a NUL character,
    /// a lone surrogate (`"\ud800"`), or a number out of the range of an `f64`
    /// (PostgreSQL's `jsonb` refuses the first two; the last cannot be read back into
    /// Rust types).
    pub fn from_json(json: impl Into<Arc<str>>) -> Result<Self> {
        let json = json.into();
        // A full parse, not a syntax check: only decoding strings and numbers finds lone
        // surrogates and out-of-range numbers.
        serde_json::from_str::<serde_json::Value>(&json).map_err(|error| {
            Error::InvalidPayload {
                reason: error.to_string(),
            }
        })?;
        check_no_nul(&json)?;
        Ok(EventPayload(json))
    }

    /// Takes JSON text a backend read back from its storage, without checking it again.
    ///
    /// For backends only: the text was checked by [`EventPayload::from_json`] or
    /// produced by [`EventPayload::serialize`] when it was appended, and the storage
    /// kept it valid (PostgreSQL's `jsonb` does). Anything else goes through
    /// [`EventPayload::from_json`]. If the text were not valid JSON after all, decoding
    /// it would still fail with a typed [`Error::Deserialization`], never a panic.
    pub fn from_stored_json(json: impl Into<Arc<str>>) -> Self {
        EventPayload(json.into())
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for EventPayload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventPayload({})", &*self.0)
    }
}

/// Refuses JSON text holding a NUL character, that is a `\u0000` escape (a backslash
/// that is not itself escaped, then `u0000`); valid JSON cannot hold a raw NUL byte.
fn check_no_nul(json: &str) -> Result<()> {
    let bytes = json.as_bytes();
    let mut backslashes = 0usize;
    for (i, &byte) in bytes.iter().enumerate() {
        if byte == b'\\' {
            backslashes += 1;
            continue;
        }
        if backslashes % 2 == 1 && bytes[i..].starts_with(b"u0000") {
            return Err(Error::InvalidPayload {
                reason: format!("it contains a NUL character (\\u0000) at byte {}", i - 1),
            });
        }
        backslashes = 0;
    }
    Ok(())
}

/// A validated event type name (same rules as a [`StreamId`]).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventType(Arc<str>);

impl EventType {
    /// Validates `name`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidEventType`] when `name` is empty, longer than 255 bytes or contains
    /// a control character.
    pub fn try_new(name: impl AsRef<str> + Into<Arc<str>>) -> Result<Self> {
        match check_name(name.as_ref()) {
            Ok(()) => Ok(EventType(name.into())),
            Err(problem) => Err(Error::InvalidEventType {
                name: truncate_for_error(name.as_ref()),
                problem,
            }),
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventType({:?})", &*self.0)
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
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
        }
    }

    /// Deserializes the payload into `E`.
    ///
    /// # Errors
    ///
    /// [`Error::Deserialization`] naming the stream, version and type when the payload
    /// does not fit `E`. The event stays stored; nothing is dropped.
    pub fn decode<E: DeserializeOwned>(&self) -> Result<StoredEvent<E>> {
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
