//! Identifiers and positions: the small validated value types everything else uses.

use std::borrow::Borrow;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use crate::error::{Error, InvalidStreamId, check_name, truncate_for_error};

/// The identity of an event stream: non-empty, at most 255 bytes of UTF-8, no control
/// characters.
///
/// Validation happens once, at construction; a `StreamId` that exists is valid, so no
/// backend ever sees a bad one. Cloning is cheap (a reference count).
///
/// # Examples
///
/// ```
/// use eventcore::StreamId;
///
/// let id = StreamId::try_new("account-42")?;
/// assert_eq!(id.as_str(), "account-42");
/// assert!(StreamId::try_new("").is_err());
/// assert!(StreamId::try_new("bad\nid").is_err());
/// # Ok::<(), eventcore::InvalidStreamId>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(Arc<str>);

impl StreamId {
    /// Validates `value` and makes it a stream id.
    ///
    /// # Errors
    ///
    /// [`InvalidStreamId`] when `value` is empty, longer than 255 bytes, or contains a
    /// control character.
    pub fn try_new(value: impl AsRef<str> + Into<Arc<str>>) -> Result<Self, InvalidStreamId> {
        match check_name(value.as_ref()) {
            Ok(()) => Ok(StreamId(value.into())),
            Err(problem) => Err(InvalidStreamId {
                value: truncate_for_error(value.as_ref()),
                problem,
            }),
        }
    }

    /// A stream id from a string literal known to be valid.
    ///
    /// # Panics
    ///
    /// When `value` is not a valid stream id. Use it only for literals written in code;
    /// anything that comes from input goes through [`StreamId::try_new`].
    pub fn from_static(value: &'static str) -> Self {
        match Self::try_new(value) {
            Ok(id) => id,
            Err(error) => panic!("StreamId::from_static: {error}"),
        }
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StreamId({:?})", &*self.0)
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl AsRef<str> for StreamId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for StreamId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl FromStr for StreamId {
    type Err = InvalidStreamId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::try_new(s)
    }
}

impl TryFrom<String> for StreamId {
    type Error = InvalidStreamId;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::try_new(value)
    }
}

impl TryFrom<&str> for StreamId {
    type Error = InvalidStreamId;

    fn try_from(value: &str) -> Result<Self, Self::Error> {
        Self::try_new(value)
    }
}

impl Serialize for StreamId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for StreamId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = String::deserialize(deserializer)?;
        StreamId::try_new(value).map_err(serde::de::Error::custom)
    }
}

/// The unique id of a stored event: a UUIDv7, so ids sort roughly by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventId(Uuid);

impl EventId {
    /// A fresh UUIDv7 event id.
    pub fn new() -> Self {
        EventId(Uuid::now_v7())
    }

    /// Wraps an existing UUID (for backends reading stored ids).
    pub fn from_uuid(uuid: Uuid) -> Self {
        EventId(uuid)
    }

    /// The underlying UUID.
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl Default for EventId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// How many events a stream holds: 0 for an empty stream, 1 after its first event.
///
/// Versions are contiguous: the n-th event of a stream has version n.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct StreamVersion(u64);

impl StreamVersion {
    /// The version of a stream that holds no events.
    pub const INITIAL: StreamVersion = StreamVersion(0);

    /// Wraps a raw version number.
    pub const fn new(value: u64) -> Self {
        StreamVersion(value)
    }

    /// The raw version number.
    pub const fn value(self) -> u64 {
        self.0
    }

    /// The version after this one.
    ///
    /// Saturates at `u64::MAX`; no stream can hold that many events.
    pub const fn next(self) -> Self {
        StreamVersion(self.0.saturating_add(1))
    }
}

impl fmt::Display for StreamVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// An event's place in the global log. Positions start at 1 and strictly increase in the
/// order events become visible; on some backends they may have gaps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct GlobalPosition(u64);

impl GlobalPosition {
    /// Wraps a raw position.
    pub const fn new(value: u64) -> Self {
        GlobalPosition(value)
    }

    /// The raw position.
    pub const fn value(self) -> u64 {
        self.0
    }
}

impl fmt::Display for GlobalPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// What a writer expects of a stream's version when appending to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ExpectedVersion {
    /// The stream must be at exactly this version (`Exact(StreamVersion::INITIAL)` is the
    /// same as [`ExpectedVersion::NoStream`]).
    Exact(StreamVersion),
    /// The stream must be empty.
    NoStream,
    /// No expectation: append whatever the version is.
    Any,
}

impl ExpectedVersion {
    /// Whether a stream at `actual` satisfies this expectation.
    pub fn is_satisfied_by(self, actual: StreamVersion) -> bool {
        match self {
            ExpectedVersion::Exact(expected) => expected == actual,
            ExpectedVersion::NoStream => actual == StreamVersion::INITIAL,
            ExpectedVersion::Any => true,
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedVersion::Exact(v) => write!(f, "version {v}"),
            ExpectedVersion::NoStream => f.write_str("no stream"),
            ExpectedVersion::Any => f.write_str("any version"),
        }
    }
}

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// A fresh UUIDv7 id.
            pub fn new() -> Self {
                $name(Uuid::now_v7())
            }

            /// Wraps an existing UUID.
            pub fn from_uuid(uuid: Uuid) -> Self {
                $name(uuid)
            }

            /// The underlying UUID.
            pub fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
    };
}

uuid_id! {
    /// Groups every event written on behalf of one business request, across commands and
    /// services. The executor takes it from the caller or makes a fresh one.
    CorrelationId
}

uuid_id! {
    /// The event or command execution that caused an event. The executor fills it with the
    /// caller's value, or with the id of the command execution.
    CausationId
}

impl From<EventId> for CausationId {
    fn from(id: EventId) -> Self {
        CausationId(id.as_uuid())
    }
}

/// A caller-chosen key that makes a command execution happen at most once.
///
/// The store keeps the key with the events it wrote; executing again with the same key
/// writes nothing and returns the first outcome, also from another process or after a
/// restart. Same rules as a [`StreamId`]: non-empty, at most 255 bytes, no control
/// characters.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IdempotencyKey(Arc<str>);

impl IdempotencyKey {
    /// Validates `value` and makes it a key.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidIdempotencyKey`] when `value` is empty, longer than 255 bytes or
    /// contains a control character.
    pub fn try_new(value: impl AsRef<str> + Into<Arc<str>>) -> Result<Self, Error> {
        match check_name(value.as_ref()) {
            Ok(()) => Ok(IdempotencyKey(value.into())),
            Err(problem) => Err(Error::InvalidIdempotencyKey {
                key: truncate_for_error(value.as_ref()),
                problem,
            }),
        }
    }

    /// The key as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdempotencyKey({:?})", &*self.0)
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl TryFrom<String> for IdempotencyKey {
    type Error = Error;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::try_new(value)
    }
}

impl From<IdempotencyKey> for String {
    fn from(key: IdempotencyKey) -> Self {
        key.0.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::NameProblem;

    #[test]
    fn stream_id_rejects_empty_long_and_control_characters() {
        assert_eq!(
            StreamId::try_new("").unwrap_err().problem,
            NameProblem::Empty
        );
        let long = "x".repeat(256);
        assert_eq!(
            StreamId::try_new(long.as_str()).unwrap_err().problem,
            NameProblem::TooLong { len: 256, max: 255 }
        );
        assert!(StreamId::try_new("x".repeat(255)).is_ok());
        assert_eq!(
            StreamId::try_new("ab\u{7}").unwrap_err().problem,
            NameProblem::ControlCharacter { at: 2 }
        );
        assert!(StreamId::try_new("konto-ü-✓").is_ok());
    }

    #[test]
    fn stream_id_deserialization_validates() {
        let ok: StreamId = serde_json::from_str("\"a-1\"").unwrap();
        assert_eq!(ok.as_str(), "a-1");
        assert!(serde_json::from_str::<StreamId>("\"\"").is_err());
        assert!(serde_json::from_str::<StreamId>("\"a\\u0000b\"").is_err());
    }

    #[test]
    fn huge_invalid_input_is_cut_in_the_error() {
        let huge = "é".repeat(10_000);
        let error = StreamId::try_new(huge.as_str()).unwrap_err();
        assert!(error.value.len() <= 303);
    }

    #[test]
    fn expected_version_semantics() {
        let v0 = StreamVersion::INITIAL;
        let v2 = StreamVersion::new(2);
        assert!(ExpectedVersion::NoStream.is_satisfied_by(v0));
        assert!(!ExpectedVersion::NoStream.is_satisfied_by(v2));
        assert!(ExpectedVersion::Any.is_satisfied_by(v2));
        assert!(ExpectedVersion::Exact(v2).is_satisfied_by(v2));
        assert!(!ExpectedVersion::Exact(v2).is_satisfied_by(v0));
    }

    #[test]
    fn idempotency_keys_are_validated() {
        assert!(IdempotencyKey::try_new("order-1/charge").is_ok());
        assert!(matches!(
            IdempotencyKey::try_new(""),
            Err(Error::InvalidIdempotencyKey { .. })
        ));
    }
}
