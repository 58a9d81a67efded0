//! Events: the user-facing typed form and the serialized forms the stores work on.
//!
//! The stored *type name* is the tag: an event is stored as its type name and a payload,
//! and decoding dispatches on the stored name ([`Event::decode`]), so one stream set can
//! hold the events of several enums and each decodes into the one that has its name.

mod content;
mod payload;
mod recorded;

use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use self::payload::EventPayload;
pub(crate) use self::recorded::decode_payload;
pub use self::recorded::{EventDamage, EventData, RecordedEvent, StoredEvent};
pub(crate) use crate::names::EventType;

use crate::error::{BoxError, Result};

/// A domain event type: a stable type name for each value, and how a value is stored
/// as a payload and decoded again by its stored type name.
///
/// Derive it: `#[derive(Event)]` on an enum gives each variant a type name (its name,
/// or `#[event(name = "...")]`), stores a variant's content as the payload and decodes
/// by the stored name, so a variant whose name is pinned with `#[event(name)]` can be
/// renamed without orphaning stored events. See [`derive@crate::Event`] for the
/// attributes (type names, aliases, upcasters, enums of other event enums).
///
/// ```
/// use eventcore::Event;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Clone, Serialize, Deserialize, Event)]
/// enum AccountEvent {
///     Opened { owner: String },
///     #[event(name = "AccountDeposited")]
///     Deposited { amount: u64 },
/// }
///
/// let event = AccountEvent::Deposited { amount: 5 };
/// assert_eq!(event.event_type(), "AccountDeposited");
/// // The payload is the variant's content; the type name is stored beside it.
/// assert_eq!(event.encode()?.as_str(), r#"{"amount":5}"#);
/// # Ok::<(), eventcore::Error>(())
/// ```
///
/// # Writing it by hand
///
/// Only [`Event::event_type`] is required. The provided [`Event::encode`] and
/// [`Event::decode`] store the whole value with serde and decode it with serde whatever
/// the stored name is (how EventCore worked before the derive existed: the variant tag
/// is then inside the payload). Override both, and [`Event::decodes`], to dispatch on the
/// name yourself:
///
/// ```
/// use eventcore::{DecodeError, Event, EventPayload, EventType};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Serialize, Deserialize)]
/// struct Deposited { amount: u64 }
///
/// #[derive(Debug, Serialize, Deserialize)]
/// #[serde(untagged)]
/// enum Ledger { Deposited(Deposited) }
///
/// impl Event for Ledger {
///     fn event_type(&self) -> &str {
///         "Deposited"
///     }
///
///     fn encode(&self) -> eventcore::Result<EventPayload> {
///         let Ledger::Deposited(content) = self;
///         EventPayload::serialize(content, self.event_type())
///     }
///
///     fn decode(event_type: &EventType, payload: &EventPayload) -> Result<Self, DecodeError> {
///         match event_type.as_str() {
///             "Deposited" => Ok(Ledger::Deposited(payload.deserialize_as()?)),
///             _ => Err(DecodeError::unknown_type::<Self>(event_type)),
///         }
///     }
///
///     fn decodes(event_type: &str) -> bool {
///         event_type == "Deposited"
///     }
/// }
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an EventCore event",
    label = "not an event",
    note = "derive it: `#[derive(Serialize, Deserialize, eventcore::Event)]`, or implement `eventcore::Event` by hand"
)]
pub trait Event: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The stable name stored with this value (at most 255 bytes, no control
    /// characters). A literal for a user enum; data for events whose type is data
    /// ([`RawEvent`]).
    fn event_type(&self) -> &str;

    /// The payload stored for this value.
    ///
    /// Provided: the whole value, serialized with serde ([`EventPayload::serialize`]).
    ///
    /// # Errors
    ///
    /// [`crate::Error::Serialization`] when serde refuses the value,
    /// [`crate::Error::InvalidPayload`] when the JSON breaks the rule at the door
    /// ([`crate::limits`]).
    fn encode(&self) -> Result<EventPayload> {
        EventPayload::serialize(self, self.event_type())
    }

    /// Decodes a stored event of type `event_type`.
    ///
    /// Provided: the whole payload, deserialized with serde; the name is not looked at.
    ///
    /// # Errors
    ///
    /// [`DecodeError::UnknownType`] when `Self` has no event of this name,
    /// [`DecodeError::Payload`] when the payload does not fit,
    /// [`DecodeError::Upcast`] when an upcaster refused an old event.
    fn decode(event_type: &EventType, payload: &EventPayload) -> Result<Self, DecodeError> {
        let _ = event_type;
        payload.deserialize_as().map_err(DecodeError::Payload)
    }

    /// Whether [`Event::decode`] accepts events of this type name, without looking at
    /// a payload (an enum of event enums asks each of them in turn).
    ///
    /// Provided: `true` for every name, as the provided `decode` tries every payload.
    fn decodes(event_type: &str) -> bool {
        let _ = event_type;
        true
    }
}

/// Why a stored event did not decode into the requested type. The source of
/// [`crate::Error::Deserialization`], which adds the stream and version.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The Rust type has no event of this type name (nor an alias or upcaster for it).
    #[error("`{rust_type}` has no event type `{event_type}`")]
    UnknownType {
        /// The stored type name.
        event_type: String,
        /// The Rust type asked to decode it.
        rust_type: &'static str,
    },
    /// The payload does not fit the type the name maps to.
    #[error("the payload does not fit")]
    Payload(#[source] serde_json::Error),
    /// An upcaster refused an event of an old type.
    #[error("the upcaster for `{event_type}` refused it")]
    Upcast {
        /// The stored (old) type name.
        event_type: String,
        /// The upcaster's reason.
        #[source]
        source: BoxError,
    },
}

impl DecodeError {
    /// `T` has no event of type `event_type`.
    pub fn unknown_type<T: ?Sized>(event_type: impl AsRef<str>) -> Self {
        DecodeError::UnknownType {
            event_type: event_type.as_ref().to_owned(),
            rust_type: std::any::type_name::<T>(),
        }
    }

    /// An upcaster for `event_type` refused an event.
    pub fn upcast(event_type: impl AsRef<str>, source: impl Into<BoxError>) -> Self {
        DecodeError::Upcast {
            event_type: event_type.as_ref().to_owned(),
            source: source.into(),
        }
    }
}

impl From<serde_json::Error> for DecodeError {
    fn from(error: serde_json::Error) -> Self {
        DecodeError::Payload(error)
    }
}

/// An event whose type name and payload are data, not a Rust type: what a process that
/// does not know the types handles (copying, routing, federating events; reading any
/// event as JSON). Stored as it is, byte for byte; decodes from every type name.
///
/// ```
/// use eventcore::{Event, EventPayload, EventType, RawEvent};
///
/// let raw = RawEvent::new(
///     EventType::try_new("UserRegistered")?,
///     EventPayload::from_json(r#"{"user_id":"u1"}"#)?,
/// );
/// assert_eq!(raw.event_type(), "UserRegistered");
/// let value: serde_json::Value = raw.payload().deserialize_as()?;
/// assert_eq!(value["user_id"], "u1");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawEvent {
    event_type: EventType,
    payload: EventPayload,
}

impl RawEvent {
    /// An event of type `event_type` with this payload.
    pub fn new(event_type: EventType, payload: EventPayload) -> Self {
        RawEvent {
            event_type,
            payload,
        }
    }

    /// The type name, validated.
    pub fn stored_type(&self) -> &EventType {
        &self.event_type
    }

    /// The payload.
    pub fn payload(&self) -> &EventPayload {
        &self.payload
    }

    /// Decodes this event into a typed event by its type name, as a store read would.
    ///
    /// # Errors
    ///
    /// What [`Event::decode`] reports.
    pub fn decode_as<E: Event>(&self) -> Result<E, DecodeError> {
        E::decode(&self.event_type, &self.payload)
    }
}

impl fmt::Debug for RawEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawEvent")
            .field("event_type", &self.event_type.as_str())
            .field("payload", &self.payload.as_str())
            .finish()
    }
}

impl Event for RawEvent {
    fn event_type(&self) -> &str {
        self.event_type.as_str()
    }

    fn encode(&self) -> Result<EventPayload> {
        Ok(self.payload.clone())
    }

    fn decode(event_type: &EventType, payload: &EventPayload) -> Result<Self, DecodeError> {
        Ok(RawEvent::new(event_type.clone(), payload.clone()))
    }
}

/// Support for `#[derive(Event)]`'s generated code. Not public API.
pub(crate) mod derive_support {
    use serde::Serialize;
    use serde::de::DeserializeOwned;

    use super::{DecodeError, EventPayload, EventType};
    use crate::error::Result;

    /// What an upcaster (`#[event(upcast(from = "...", with = f))]`) may return: the new
    /// event, or a `Result` with it.
    #[diagnostic::on_unimplemented(
        message = "an upcaster of `{T}` returns `{Self}`",
        label = "this upcaster",
        note = "an upcaster returns the new event (`{T}`) or a `Result<{T}, E>` whose error converts into a boxed error"
    )]
    pub trait UpcastOutput<T> {
        /// The new event, or the upcaster's reason.
        fn into_upcast(self) -> std::result::Result<T, crate::error::BoxError>;
    }

    impl<T: super::Event> UpcastOutput<T> for T {
        fn into_upcast(self) -> std::result::Result<T, crate::error::BoxError> {
            Ok(self)
        }
    }

    impl<T, E: Into<crate::error::BoxError>> UpcastOutput<T> for std::result::Result<T, E> {
        fn into_upcast(self) -> std::result::Result<T, crate::error::BoxError> {
            self.map_err(Into::into)
        }
    }

    /// The payload of an enum variant: its content, without serde's tag.
    pub fn encode_content<T: Serialize>(value: &T, event_type: &str) -> Result<EventPayload> {
        EventPayload::serialize_content(value, event_type)
    }

    /// Decodes a variant's content into the variant at `index` (its position in the
    /// enum).
    pub fn decode_content<T: DeserializeOwned>(
        payload: &EventPayload,
        index: u64,
    ) -> std::result::Result<T, DecodeError> {
        super::content::read_content(payload.as_str(), index).map_err(DecodeError::Payload)
    }

    /// Decodes a whole payload (a struct event).
    pub fn decode_whole<T: DeserializeOwned>(
        payload: &EventPayload,
    ) -> std::result::Result<T, DecodeError> {
        payload.deserialize_as().map_err(DecodeError::Payload)
    }

    /// Decodes a whole payload of an enum (`#[event(payload = "whole")]`) and checks
    /// that serde's tag inside it agrees with the stored type name `expected`.
    pub fn decode_whole_as<T: super::Event>(
        payload: &EventPayload,
        expected: &str,
    ) -> std::result::Result<T, DecodeError> {
        let value: T = decode_whole(payload)?;
        if value.event_type() == expected {
            Ok(value)
        } else {
            Err(DecodeError::Payload(serde::de::Error::custom(
                format_args!(
                    "the payload holds a `{}`, not a `{expected}` as its stored type says",
                    value.event_type()
                ),
            )))
        }
    }

    /// Decodes an old event with its upcaster.
    pub fn upcast<Old, Out, T>(
        event_type: &EventType,
        payload: &EventPayload,
        upcaster: impl FnOnce(Old) -> Out,
    ) -> std::result::Result<T, DecodeError>
    where
        Old: DeserializeOwned,
        Out: UpcastOutput<T>,
    {
        let old: Old = payload.deserialize_as()?;
        upcaster(old)
            .into_upcast()
            .map_err(|source| DecodeError::upcast(event_type.as_str(), source))
    }

    /// `T` has no event of this type.
    pub fn unknown<T>(event_type: &EventType) -> DecodeError {
        DecodeError::unknown_type::<T>(event_type.as_str())
    }
}
