//! The serialized forms the stores work on ([`EventData`] to append, [`RecordedEvent`]
//! read back) and the typed form commands and projections see ([`StoredEvent`]).

use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::{Event, EventPayload};
use crate::error::{Error, Result};
use crate::metadata::EventMetadata;
use crate::names::EventType;
use crate::types::{CorrelationId, EventId, GlobalPosition, StreamId, StreamVersion};

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
    /// Encodes a typed event ([`Event::event_type`], [`Event::encode`]), with a fresh
    /// [`EventId`].
    ///
    /// # Errors
    ///
    /// [`Error::InvalidEventType`] if the event's type name is invalid, and what
    /// [`Event::encode`] reports ([`Error::Serialization`] if serde refuses the payload,
    /// [`Error::InvalidPayload`] if it breaks the rule at the door).
    pub fn from_event<E: Event>(event: &E, metadata: EventMetadata) -> Result<Self> {
        let event_type = EventType::try_new(event.event_type())?;
        let payload = event.encode()?;
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

    /// Decodes the event into `E` by its stored type name ([`Event::decode`]).
    ///
    /// # Errors
    ///
    /// [`Error::Deserialization`] naming the stream, version and type, with the reason as
    /// its source ([`super::DecodeError`]): `E` has no event of this type name, the
    /// payload does not fit, or an upcaster failed; [`Error::UnreadableEvent`] for a
    /// damaged event ([`RecordedEvent::damage`]). The event stays stored; nothing is
    /// dropped.
    pub fn decode<E: Event>(&self) -> Result<StoredEvent<E>> {
        self.check_readable()?;
        let payload = decode_payload(
            &self.stream_id,
            self.stream_version,
            &self.event_type,
            &self.payload,
        )?;
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

/// Decodes the payload of an event of type `event_type` at `version` of `stream`: the one
/// place a decoding failure becomes [`Error::Deserialization`] (for stored, redelivered
/// and published events alike).
pub(crate) fn decode_payload<E: Event>(
    stream: &StreamId,
    version: StreamVersion,
    event_type: &EventType,
    payload: &EventPayload,
) -> Result<E> {
    E::decode(event_type, payload).map_err(|source| Error::Deserialization {
        stream: stream.clone(),
        version,
        event_type: event_type.as_str().to_owned(),
        source,
    })
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

impl<E: Event> StoredEvent<E> {
    /// A stored event as a store would return it, for unit tests of `apply` functions
    /// and projections: a fresh event id, the event's own type name, empty metadata
    /// (a fresh correlation id), recorded now, at global position `version`.
    ///
    /// ```
    /// use eventcore::{Event, StoredEvent, StreamId};
    /// # #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize, Event)]
    /// # enum AccountEvent { Deposited { amount: u64 } }
    ///
    /// let event = StoredEvent::for_test(
    ///     StreamId::from_static("account-1"),
    ///     3,
    ///     AccountEvent::Deposited { amount: 5 },
    /// )?;
    /// assert_eq!(event.stream_version.value(), 3);
    /// assert_eq!(event.event_type.as_str(), "Deposited");
    /// # Ok::<(), eventcore::Error>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidEventType`] if the event's type name is not a valid stored name.
    pub fn for_test(stream_id: StreamId, version: u64, payload: E) -> Result<Self> {
        let event_type = EventType::try_new(payload.event_type())?;
        Ok(StoredEvent {
            event_id: EventId::new(),
            stream_id,
            stream_version: StreamVersion::new(version),
            global_position: GlobalPosition::new(version),
            event_type,
            payload,
            metadata: EventMetadata::default(),
            recorded_at: Utc::now(),
        })
    }
}

impl<E> StoredEvent<E> {
    /// The same event with another payload (a decoded form of this one).
    pub(crate) fn with_payload<F>(&self, payload: F) -> StoredEvent<F> {
        StoredEvent {
            event_id: self.event_id,
            stream_id: self.stream_id.clone(),
            stream_version: self.stream_version,
            global_position: self.global_position,
            event_type: self.event_type.clone(),
            payload,
            metadata: self.metadata.clone(),
            recorded_at: self.recorded_at,
        }
    }

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
