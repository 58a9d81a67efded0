//! Identifiers and positions: the small validated value types everything else uses.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub(crate) use crate::names::{IdempotencyKey, StreamId};

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

impl CorrelationId {
    /// The namespace of [`CorrelationId::from_business_key`]'s name-based UUIDs. Fixed
    /// forever: changing it would give every business key a new id.
    pub const BUSINESS_KEY_NAMESPACE: Uuid =
        Uuid::from_u128(0x718d14ba_40a7_40d0_a7f6_e8cd3509f615);

    /// The correlation id of a business request named by a key of the caller's (an
    /// order id, a payment reference): the same key gives the same id in every process
    /// and every release, so events of one order can be correlated without passing the
    /// id around. A name-based UUID (version 5, SHA-1) of `key` in
    /// [`CorrelationId::BUSINESS_KEY_NAMESPACE`]; distinct keys give distinct ids.
    ///
    /// ```
    /// use eventcore::CorrelationId;
    ///
    /// let a = CorrelationId::from_business_key("order-7");
    /// assert_eq!(a, CorrelationId::from_business_key("order-7"));
    /// assert_ne!(a, CorrelationId::from_business_key("order-8"));
    /// assert_eq!(a.to_string(), "0960c927-9d9e-5782-828f-6cb5a7e10464");
    /// ```
    pub fn from_business_key(key: &str) -> Self {
        CorrelationId(Uuid::new_v5(&Self::BUSINESS_KEY_NAMESPACE, key.as_bytes()))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
