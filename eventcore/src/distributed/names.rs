//! The names the distribution layer puts on the wire: services, topics, subscriptions.
//! Brokers build subjects, stream and consumer names from them, so they are tokens:
//! 1 to 64 bytes of ASCII letters, digits, `-` and `_` (nothing a broker reads as a
//! separator or a wildcard).

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest service id, topic or subscription name, in bytes.
pub const MAX_TOKEN_LEN: usize = 64;

/// What kind of name was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NameKind {
    /// A [`ServiceId`].
    Service,
    /// A [`Topic`].
    Topic,
    /// A [`SubscriptionName`].
    Subscription,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameKind::Service => "service id",
            NameKind::Topic => "topic",
            NameKind::Subscription => "subscription name",
        })
    }
}

/// A service id, topic or subscription name that is not a valid token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {value:?}: {problem}")]
pub struct InvalidDistributedName {
    /// What the name was for.
    pub kind: NameKind,
    /// The rejected input (cut to 300 bytes).
    pub value: String,
    /// What is wrong with it.
    pub problem: &'static str,
}

fn check_token(kind: NameKind, value: &str) -> Result<(), InvalidDistributedName> {
    let problem = if value.is_empty() {
        Some("it is empty")
    } else if value.len() > MAX_TOKEN_LEN {
        Some("it is longer than 64 bytes")
    } else if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Some("only ASCII letters, digits, `-` and `_` are allowed")
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(problem) => Err(InvalidDistributedName {
            kind,
            value: crate::error::truncate_for_error(value),
            problem,
        }),
    }
}

macro_rules! token_name {
    ($(#[$meta:meta])* $name:ident, $kind:expr) => {
        $(#[$meta])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(std::sync::Arc<str>);

        impl $name {
            /// Validates `value`.
            ///
            /// # Errors
            ///
            /// [`InvalidDistributedName`] when it is empty, longer than 64 bytes, or holds
            /// anything but ASCII letters, digits, `-` and `_`.
            pub fn try_new(value: impl AsRef<str>) -> Result<Self, InvalidDistributedName> {
                check_token($kind, value.as_ref())?;
                Ok($name(value.as_ref().into()))
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

        impl TryFrom<&str> for $name {
            type Error = InvalidDistributedName;
            fn try_from(value: &str) -> Result<Self, Self::Error> {
                Self::try_new(value)
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidDistributedName;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::try_new(value)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let value = String::deserialize(deserializer)?;
                Self::try_new(value).map_err(serde::de::Error::custom)
            }
        }
    };
}

token_name! {
    /// The id of a service: the owner of an event store and of the topics it publishes.
    ///
    /// ```
    /// use eventcore::distributed::ServiceId;
    ///
    /// assert!(ServiceId::try_new("order-service").is_ok());
    /// assert!(ServiceId::try_new("order.service").is_err());
    /// ```
    ServiceId, NameKind::Service
}

token_name! {
    /// A topic: a named part of one service's publication that other services subscribe
    /// to (`order-events`). A topic belongs to the one service that publishes it.
    Topic, NameKind::Topic
}

token_name! {
    /// The name of a durable subscription of a service (`customer-profiles`): its
    /// position at the broker and its dedup keys are kept under it.
    SubscriptionName, NameKind::Subscription
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_tokens_a_broker_can_use_as_they_are() {
        for good in ["a", "order-service", "A_1", &"x".repeat(64)] {
            assert!(Topic::try_new(good).is_ok(), "{good}");
        }
        for bad in ["", "a.b", "a*", ">", "a b", "é", "a\0", &"x".repeat(65)] {
            let error = Topic::try_new(bad).expect_err(bad);
            assert_eq!(error.kind, NameKind::Topic);
        }
        let error = ServiceId::try_new("a.b").expect_err("dot");
        assert_eq!(
            error.to_string(),
            "invalid service id \"a.b\": only ASCII letters, digits, `-` and `_` are allowed"
        );
        assert!(serde_json::from_str::<SubscriptionName>("\"a.b\"").is_err());
        let name: SubscriptionName = serde_json::from_str("\"profiles\"").expect("valid");
        assert_eq!(name.as_str(), "profiles");
    }
}
