//! The validated names EventCore stores: stream ids, event types, idempotency keys and
//! projection names. They share one rule ([`check_name`]: non-empty, at most
//! [`MAX_NAME_LEN`] bytes, no control character), one shape (a cheap-to-clone
//! `Arc<str>`) and one way to fail: `try_new` returns the type's own error
//! (`InvalidStreamId`, ...), with the rejected input and the [`NameProblem`], which
//! converts into the matching [`crate::Error`] variant with `?`.

use std::borrow::Borrow;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::truncate_for_error;

/// Why a name (stream id, event type, idempotency key, projection name) was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameProblem {
    /// The name was empty.
    #[error("it is empty")]
    Empty,
    /// The name was longer than the limit, in bytes of UTF-8.
    #[error("it is {len} bytes long, the limit is {max}")]
    TooLong {
        /// The name's length in bytes.
        len: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// The name contained a control character at this byte offset.
    #[error("it contains a control character at byte {at}")]
    ControlCharacter {
        /// Byte offset of the first control character.
        at: usize,
    },
}

/// The longest name (stream id, event type, idempotency key, projection name) accepted,
/// in bytes.
pub const MAX_NAME_LEN: usize = 255;

/// Checks the rules shared by every identifier EventCore stores.
pub(crate) fn check_name(value: &str) -> Result<(), NameProblem> {
    if value.is_empty() {
        return Err(NameProblem::Empty);
    }
    if value.len() > MAX_NAME_LEN {
        return Err(NameProblem::TooLong {
            len: value.len(),
            max: MAX_NAME_LEN,
        });
    }
    if let Some((at, _)) = value.char_indices().find(|(_, c)| c.is_control()) {
        return Err(NameProblem::ControlCharacter { at });
    }
    Ok(())
}

/// Defines a validated name type and its error type.
macro_rules! validated_name {
    (
        $(#[$meta:meta])*
        $name:ident, $error:ident, $what:literal
    ) => {
        $(#[$meta])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        #[doc = concat!("A string that is not a valid [`", stringify!($name), "`].")]
        #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
        #[error("invalid {} {value:?}: {problem}", $what)]
        pub struct $error {
            /// The rejected input (cut to 300 bytes so a huge input does not flood logs).
            pub value: String,
            /// What is wrong with it.
            pub problem: NameProblem,
        }

        impl $name {
            #[doc = concat!("Validates `value` and makes it a ", $what, ".")]
            ///
            /// # Errors
            ///
            #[doc = concat!("[`", stringify!($error), "`]")]
            /// when `value` is empty, longer than 255 bytes, or contains a control
            /// character.
            pub fn try_new(value: impl AsRef<str> + Into<Arc<str>>) -> Result<Self, $error> {
                match check_name(value.as_ref()) {
                    Ok(()) => Ok($name(value.into())),
                    Err(problem) => Err($error {
                        value: truncate_for_error(value.as_ref()),
                        problem,
                    }),
                }
            }

            #[doc = concat!("A ", $what, " from a string literal known to be valid.")]
            ///
            /// # Panics
            ///
            /// When `value` is not valid. Use it only for literals written in code;
            /// anything that comes from input goes through `try_new`.
            pub fn from_static(value: &'static str) -> Self {
                match Self::try_new(value) {
                    Ok(name) => name,
                    Err(error) => panic!("{}::from_static: {error}", stringify!($name)),
                }
            }

            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), &*self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = $error;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::try_new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = $error;

            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::try_new(value)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = $error;

            fn try_from(value: &str) -> Result<Self, Self::Error> {
                Self::try_new(value)
            }
        }

        impl From<$name> for String {
            fn from(name: $name) -> Self {
                name.0.to_string()
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        /// Deserializing validates: an invalid name is a deserialization error.
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let value = String::deserialize(deserializer)?;
                $name::try_new(value).map_err(serde::de::Error::custom)
            }
        }
    };
}

validated_name! {
    /// The identity of an event stream: non-empty, at most 255 bytes of UTF-8, no
    /// control characters.
    ///
    /// Validation happens once, at construction; a `StreamId` that exists is valid, so
    /// no backend ever sees a bad one. Cloning is cheap (a reference count).
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
    StreamId, InvalidStreamId, "stream id"
}

validated_name! {
    /// A validated event type name (same rules as a [`StreamId`]): the name stored
    /// beside every payload.
    EventType, InvalidEventType, "event type name"
}

validated_name! {
    /// A caller-chosen key that makes a command execution happen at most once.
    ///
    /// The store keeps the key with the events it wrote; executing again with the same
    /// key writes nothing and returns the first outcome, also from another process or
    /// after a restart. Same rules as a [`StreamId`].
    IdempotencyKey, InvalidIdempotencyKey, "idempotency key"
}

validated_name! {
    /// The name a projection (or a process manager, or a saga) keeps its checkpoint,
    /// its parked events and its leadership under (same rules as a [`StreamId`]).
    ///
    /// [`crate::CheckpointStore`] and [`crate::LeaderElection`] take this type, so a
    /// backend never sees a name that was not checked. The runners check a
    /// [`crate::Projection::name`] once, when they start.
    ///
    /// ```
    /// use eventcore::ProjectionName;
    ///
    /// let name = ProjectionName::try_new("balances")?;
    /// assert_eq!(name.as_str(), "balances");
    /// assert!(ProjectionName::try_new("").is_err());
    /// # Ok::<(), eventcore::InvalidProjectionName>(())
    /// ```
    ProjectionName, InvalidProjectionName, "projection name"
}

// The docs of `try_new` say "255 bytes".
const _: () = assert!(MAX_NAME_LEN == 255);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_type_fails_the_same_way() {
        let long = "x".repeat(256);
        for (input, problem) in [
            ("", NameProblem::Empty),
            (long.as_str(), NameProblem::TooLong { len: 256, max: 255 }),
            ("ab\u{7}", NameProblem::ControlCharacter { at: 2 }),
        ] {
            assert_eq!(StreamId::try_new(input).unwrap_err().problem, problem);
            assert_eq!(EventType::try_new(input).unwrap_err().problem, problem);
            assert_eq!(IdempotencyKey::try_new(input).unwrap_err().problem, problem);
            assert_eq!(ProjectionName::try_new(input).unwrap_err().problem, problem);
        }
        assert!(StreamId::try_new("x".repeat(255)).is_ok());
        assert!(StreamId::try_new("konto-ü-✓").is_ok());
        assert!(matches!(
            crate::Error::from(IdempotencyKey::try_new("").unwrap_err()),
            crate::Error::InvalidIdempotencyKey(_)
        ));
        assert!(matches!(
            crate::Error::from(ProjectionName::try_new("").unwrap_err()),
            crate::Error::InvalidProjectionName(_)
        ));
        assert!(matches!(
            crate::Error::from(EventType::try_new("").unwrap_err()),
            crate::Error::InvalidEventType(_)
        ));
    }

    #[test]
    fn deserialization_validates() {
        let ok: StreamId = serde_json::from_str("\"a-1\"").unwrap();
        assert_eq!(ok.as_str(), "a-1");
        assert!(serde_json::from_str::<StreamId>("\"\"").is_err());
        assert!(serde_json::from_str::<StreamId>("\"a\\u0000b\"").is_err());
        assert!(serde_json::from_str::<IdempotencyKey>("\"\"").is_err());
        assert!(serde_json::from_str::<ProjectionName>("\"p\\u0007\"").is_err());
        let key: IdempotencyKey = serde_json::from_str("\"order-1/charge\"").unwrap();
        assert_eq!(serde_json::to_string(&key).unwrap(), "\"order-1/charge\"");
    }

    #[test]
    fn huge_invalid_input_is_cut_in_the_error() {
        let huge = "é".repeat(10_000);
        let error = StreamId::try_new(huge.as_str()).unwrap_err();
        assert!(error.value.len() <= 303);
    }
}
