//! [`DistributedEvent`]: a published event as it travels between services.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::names::ServiceId;
use crate::error::Result;
use crate::event::{Event, EventPayload, RawEvent, RecordedEvent, StoredEvent, decode_payload};
use crate::metadata::EventMetadata;
use crate::names::EventType;
use crate::trace::TraceContext;
use crate::types::{EventId, GlobalPosition, StreamId, StreamVersion};

/// A published event: what one service's store recorded, as another service receives
/// it. Built by the publisher from the recorded event; its payload is the stored JSON,
/// byte for byte, and it decodes into a typed event by its type name, as a stored event
/// does ([`DistributedEvent::decode`]).
///
/// ```
/// use eventcore::distributed::{DistributedEvent, ServiceId};
/// use eventcore::Event;
/// # use eventcore::{EventId, EventMetadata, EventPayload, EventType, GlobalPosition, RecordedEvent, StreamId, StreamVersion};
/// # use std::sync::Arc;
/// # #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize, Event)]
/// # enum UserEvent { UserRegistered { user_id: String } }
/// # let recorded = RecordedEvent::new(EventId::new(), StreamId::try_new("user-u1")?, StreamVersion::new(1),
/// #     GlobalPosition::new(7), EventType::try_new("UserRegistered")?,
/// #     EventPayload::from_json(r#"{"user_id":"u1"}"#)?, Arc::new(EventMetadata::default()), chrono::Utc::now());
///
/// let published = DistributedEvent::from_recorded(&recorded, &ServiceId::try_new("users")?, chrono::Utc::now())?;
/// let json = serde_json::to_string(&published)?;
/// let received: DistributedEvent = serde_json::from_str(&json)?;
/// assert_eq!(received, published);
/// let user = received.decode::<UserEvent>()?;
/// assert_eq!(user.payload, UserEvent::UserRegistered { user_id: "u1".into() });
/// assert_eq!(user.stream_id.as_str(), "user-u1");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DistributedEvent {
    /// The event's id in its source store: the broker's dedup id, and the root of the
    /// idempotency keys of the effects it causes.
    pub event_id: EventId,
    /// The stored type name.
    pub event_type: EventType,
    /// The stream it was written to, in the source service.
    pub stream_id: StreamId,
    /// Its version in that stream.
    pub stream_version: StreamVersion,
    /// Its position in the source store's global log.
    pub global_position: GlobalPosition,
    /// The payload, as stored.
    pub payload: EventPayload,
    /// The metadata (correlation, causation, actor, custom fields, trace context).
    pub metadata: EventMetadata,
    /// When the source store recorded it.
    pub occurred_at: DateTime<Utc>,
    /// When it was published.
    pub published_at: DateTime<Utc>,
    /// The service that published it.
    pub service_id: ServiceId,
    /// The trace context of the command that wrote it (`None` when there was none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_context: Option<TraceContext>,
}

impl DistributedEvent {
    /// The envelope of a recorded event published by `service` at `published_at`.
    ///
    /// # Errors
    ///
    /// [`crate::Error::UnreadableEvent`] for a damaged event ([`RecordedEvent::damage`]): what
    /// cannot be read cannot be published.
    pub fn from_recorded(
        event: &RecordedEvent,
        service: &ServiceId,
        published_at: DateTime<Utc>,
    ) -> Result<Self> {
        event.check_readable()?;
        Ok(DistributedEvent {
            event_id: event.event_id,
            event_type: event.event_type.clone(),
            stream_id: event.stream_id.clone(),
            stream_version: event.stream_version,
            global_position: event.global_position,
            payload: event.payload.clone(),
            metadata: (*event.metadata).clone(),
            occurred_at: event.recorded_at,
            published_at,
            service_id: service.clone(),
            trace_context: event.metadata.trace_context.clone(),
        })
    }

    /// Decodes the payload by its type name into a stored event of `E` (whose
    /// `global_position` is the position in the *source* store).
    ///
    /// # Errors
    ///
    /// [`crate::Error::Deserialization`] naming the source stream, version and type, as for a
    /// stored event.
    pub fn decode<E: Event>(&self) -> Result<StoredEvent<E>> {
        let payload = decode_payload(
            &self.stream_id,
            self.stream_version,
            &self.event_type,
            &self.payload,
        )?;
        Ok(StoredEvent::new(
            self.event_id,
            self.stream_id.clone(),
            self.stream_version,
            self.global_position,
            self.event_type.clone(),
            payload,
            self.metadata.clone(),
            self.occurred_at,
        ))
    }

    /// The event as a [`RawEvent`] (type name and payload), for handing it on as it is.
    pub fn to_raw(&self) -> RawEvent {
        RawEvent::new(self.event_type.clone(), self.payload.clone())
    }
}
