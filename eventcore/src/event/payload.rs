//! [`EventPayload`]: JSON text that passed the rule at the door.

use std::fmt;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, JsonProblem, Result};
use crate::limits::MAX_PAYLOAD_BYTES;

#[cfg(doc)]
use super::Event;

/// A payload serialized as JSON text that meets the rule at the door
/// ([`crate::limits`]): every backend stores it and gives back these very bytes. Cheap
/// to clone.
#[derive(Clone, PartialEq, Eq)]
pub struct EventPayload(pub(super) Arc<str>);

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
        Self::checked(value, json)
    }

    /// Serializes only the content of `value`'s enum variant (what `#[derive(Event)]`
    /// stores): the fields of a struct variant, the value of a newtype variant, `{}` for
    /// a unit variant; the same errors as [`EventPayload::serialize`].
    pub(crate) fn serialize_content<T: Serialize + ?Sized>(
        value: &T,
        event_type: &str,
    ) -> Result<Self> {
        let mut json = Vec::with_capacity(128);
        super::content::write_content(value, &mut json).map_err(|source| Error::Serialization {
            event_type: event_type.to_owned(),
            source,
        })?;
        // serde_json writes UTF-8 only; checked all the same, it costs little.
        let json = String::from_utf8(json).map_err(|_| Error::InvalidPayload {
            problem: JsonProblem::NotJson {
                message: "the serializer wrote bytes that are not UTF-8".to_owned(),
            },
        })?;
        Self::checked(value, json)
    }

    /// The rule at the door, on what serde_json wrote for `value`.
    fn checked<T: Serialize + ?Sized>(value: &T, json: String) -> Result<Self> {
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
    /// ([`super::RecordedEvent::damaged`]), never as a failed read.
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

    /// Deserializes the payload into `T` with serde (for hand-written
    /// [`Event::decode`] impls and for reading a payload as a `serde_json::Value`).
    ///
    /// # Errors
    ///
    /// serde's error when the payload does not fit `T`.
    pub fn deserialize_as<T: DeserializeOwned>(&self) -> std::result::Result<T, serde_json::Error> {
        serde_json::from_str(&self.0)
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

/// Embedded as JSON, byte for byte (not as a string holding JSON): an envelope that
/// carries a payload shows it as the document it is.
impl Serialize for EventPayload {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        let raw: &serde_json::value::RawValue =
            serde_json::from_str(&self.0).map_err(serde::ser::Error::custom)?;
        raw.serialize(serializer)
    }
}

/// Reads an embedded JSON document, checked against the rule at the door like
/// [`EventPayload::from_json`].
impl<'de> Deserialize<'de> for EventPayload {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        let raw = Box::<serde_json::value::RawValue>::deserialize(deserializer)?;
        EventPayload::from_json(raw.get()).map_err(serde::de::Error::custom)
    }
}
