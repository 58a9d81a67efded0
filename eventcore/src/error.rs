//! The crate's error type.

use std::fmt;

use crate::names::{
    InvalidEventType, InvalidIdempotencyKey, InvalidProjectionName, InvalidStreamId,
};
use crate::types::{StreamId, StreamVersion};

/// The result type used throughout EventCore.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The result of a command's `handle`: the same [`Result`], named as users know it.
pub type CommandResult<T> = Result<T>;

/// A boxed error from user code or a backend.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in EventCore.
///
/// Match on the variants you can act on and treat the rest as failures; the enum is
/// `#[non_exhaustive]` so new failure modes can be added without a breaking release.
/// [`Error::is_retryable`] tells whether repeating the same operation may succeed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A string was not a valid [`StreamId`]. Fix the input; retrying cannot help.
    #[error(transparent)]
    InvalidStreamId(#[from] InvalidStreamId),

    /// An event type name was empty, too long or contained control characters.
    /// Event type names are part of the stored data; fix the [`crate::Event`] impl.
    #[error(transparent)]
    InvalidEventType(#[from] InvalidEventType),

    /// An idempotency key was empty, too long or contained control characters.
    #[error(transparent)]
    InvalidIdempotencyKey(#[from] InvalidIdempotencyKey),

    /// An event payload breaks the rule at the door (see [`crate::limits`]): it is not
    /// JSON, or is too large or too deep, repeats a key, holds a NUL character or a lone
    /// surrogate, or (when serializing) a NaN or infinite number. Every backend refuses
    /// it the same way, before anything is written.
    #[error("invalid event payload: {problem}")]
    InvalidPayload {
        /// Which rule the payload breaks.
        problem: JsonProblem,
    },

    /// Event metadata breaks the rule at the door (see [`crate::limits`]): too large or
    /// too deep, or a NUL character in the actor or a custom field. Nothing was written.
    #[error("invalid event metadata: {problem}")]
    InvalidMetadata {
        /// Which rule the metadata breaks.
        problem: JsonProblem,
    },

    /// An append carries more than one request may (see [`crate::limits`]): too many
    /// streams, events or bytes. Nothing was written; split the work into several
    /// appends (each atomic on its own) or make the events smaller.
    #[error("append too large: {actual} {limit}, the limit is {max}")]
    AppendTooLarge {
        /// Which limit was hit.
        limit: AppendLimit,
        /// What the request carries.
        actual: usize,
        /// The limit.
        max: usize,
    },

    /// A position or version no backend can store: above [`crate::limits::MAX_POSITION`],
    /// or a checkpoint at position 0 (positions start at 1; reset a checkpoint with
    /// [`crate::CheckpointStore::reset_checkpoint`]). Nothing was stored.
    #[error("invalid {what} {value}: {reason}")]
    InvalidPosition {
        /// What the value was meant to be.
        what: &'static str,
        /// The value.
        value: u64,
        /// Why it is refused.
        reason: &'static str,
    },

    /// A snapshot (or its key) cannot be stored: see [`crate::snapshot::Snapshot::new`]
    /// and [`crate::snapshot::SnapshotKey::new`]. Nothing was stored.
    #[error("invalid snapshot: {reason}")]
    InvalidSnapshot {
        /// What is wrong with it.
        reason: String,
    },

    /// A parked event cannot be stored: its time is outside the range every backend
    /// keeps (years 1 to 9999). Nothing was stored.
    #[error("invalid parked event: {reason}")]
    InvalidParkedEvent {
        /// What is wrong with it.
        reason: String,
    },

    /// A stored event cannot be read as an event at all (its metadata does not decode,
    /// its payload is not readable JSON): written by hand or by an older version that
    /// did not check what it stored. The read returned it in its place, marked (see
    /// [`crate::RecordedEvent::damage`]), and every other event as usual; commands over
    /// its stream fail with this error and projections stop or park it by their policy.
    #[error(
        "stored event {event_id} at position {position} ({stream}@{version}) is unreadable: {reason}"
    )]
    UnreadableEvent {
        /// The stored event's id.
        event_id: crate::EventId,
        /// Its stream.
        stream: StreamId,
        /// Its version in the stream.
        version: StreamVersion,
        /// Its global position.
        position: crate::GlobalPosition,
        /// What cannot be read, with the decoder's reason.
        reason: String,
    },

    /// An append request was malformed (no streams, the same stream twice, ...).
    /// Nothing was written. This is a programming error on the caller's side.
    #[error("invalid append request: {reason}")]
    InvalidAppend {
        /// Why the request was refused.
        reason: String,
    },

    /// One or more streams were not at the version the writer expected, so nothing was
    /// written. The [`crate::CommandExecutor`] retries these under its
    /// [`crate::RetryPolicy`]; direct callers of [`crate::EventStore::append`] should
    /// re-read and decide again.
    #[error("version conflict on {}", DisplayConflicts(.conflicts))]
    VersionConflict {
        /// One entry per stream whose expectation did not hold.
        conflicts: Vec<StreamConflict>,
    },

    /// A stored event could not be decoded into the requested type: the type has no
    /// event of its stored type name, or the payload does not fit (the source says
    /// which). The event is still stored and is never dropped; the usual cause is a
    /// renamed event without an alias, or a changed shape that needs an upcaster (see
    /// the schema evolution chapter).
    #[error("cannot deserialize event `{event_type}` at version {version} of stream `{stream}`")]
    Deserialization {
        /// The stream holding the event.
        stream: StreamId,
        /// The event's version in that stream.
        version: StreamVersion,
        /// The stored event type name.
        event_type: String,
        /// Why: no event of this type name in the Rust type, a payload that does not
        /// fit, or an upcaster that refused it.
        #[source]
        source: crate::event::DecodeError,
    },

    /// An event could not be serialized to JSON. Usually a map with non-string keys.
    #[error("cannot serialize event `{event_type}`")]
    Serialization {
        /// The event type name being serialized.
        event_type: String,
        /// What serde reported.
        #[source]
        source: serde_json::Error,
    },

    /// A command produced a write to a stream it neither declared with `#[stream]` nor
    /// requested through the [`crate::StreamResolver`]. Nothing was written.
    #[error("command wrote to stream `{stream}`, which it neither declared nor resolved")]
    UndeclaredStream {
        /// The stream the command tried to write to.
        stream: StreamId,
    },

    /// A command kept asking the [`crate::StreamResolver`] for new streams for more rounds
    /// than the executor allows. Usually a resolver request that depends on itself.
    #[error("command requested additional streams in more than {limit} rounds")]
    TooManyStreamResolutions {
        /// The configured bound.
        limit: u32,
    },

    /// A business rule in `handle` refused the command (see [`crate::require!`]).
    /// Never retried.
    #[error("business rule violated: {0}")]
    BusinessRuleViolation(String),

    /// `handle` refused the command with a domain error of the user's own type.
    /// Never retried; use `downcast_ref` on the inner error to recover it.
    #[error("command rejected: {0}")]
    Rejected(BoxError),

    /// The executor gave up after the retry policy's last attempt; the last error is the
    /// source. Nothing was written by the failed attempts.
    #[error("{}", retries_exhausted(*attempts, last))]
    RetriesExhausted {
        /// Attempts made, the first included.
        attempts: u32,
        /// The error of the last attempt.
        #[source]
        last: Box<Error>,
    },

    /// A projection could not process an event (its `apply` kept failing, or the event
    /// does not decode into the projection's type) and its error policy says stop. The
    /// checkpoint stays just before this event, so nothing is skipped: fix the cause and
    /// run again, or park such events (see `ProjectionErrorPolicy`).
    #[error("projection `{projection}` failed at event {position} ({stream}@{version}): {message}")]
    ProjectionFailed {
        /// The projection's name.
        projection: String,
        /// The event's stream.
        stream: StreamId,
        /// The event's version in its stream.
        version: StreamVersion,
        /// The event's global position.
        position: crate::GlobalPosition,
        /// The last failure, for humans, with its whole cause chain.
        message: String,
        /// The last failure itself, when it was an error value.
        #[source]
        source: Option<BoxError>,
    },

    /// A projection (process manager, saga) name was empty, too long or contained
    /// control characters.
    #[error(transparent)]
    InvalidProjectionName(#[from] InvalidProjectionName),

    /// A filter's event type name looks like a pattern (it holds `*`): filters select
    /// exact type names, so `"User*"` would silently select nothing. List the types (the
    /// federation's routing rules take patterns: `distributed::federation::EventPattern`).
    #[error("event type filter {name:?} holds `*`: filters select exact type names, not patterns")]
    EventTypePattern {
        /// The refused name (cut to 300 bytes).
        name: String,
    },

    /// A saga definition or a stored saga cannot be used: a plan with an empty or
    /// repeated step name, or an input that does not decode into the saga's input type.
    #[error("invalid saga `{saga}`: {reason}")]
    InvalidSaga {
        /// The saga (or instance) concerned.
        saga: String,
        /// What is wrong.
        reason: String,
    },

    /// The backend lost contact (a dropped connection, a crashed server) while an
    /// append was in flight, and could not find out whether it committed: its events
    /// may be stored, or not. Not [`Error::is_retryable`]: deciding again could write a
    /// second time. Sending the same [`crate::AppendRequest`] again is safe (event ids
    /// are unique, so nothing is stored twice), and with an idempotency key it tells the
    /// outcome (see [`crate::EventStore::append`]). The [`crate::CommandExecutor`] asks
    /// again itself for an execution with an idempotency key; without one it returns
    /// this error.
    #[error("the outcome of the append is unknown: {message}")]
    OutcomeUnknown {
        /// What happened, for humans.
        message: String,
        /// The ids of the events the append carried: what to look for.
        event_ids: Vec<crate::EventId>,
        /// The backend's own error, if any.
        #[source]
        source: Option<BoxError>,
    },

    /// A service id, topic or subscription name is not a valid token.
    #[cfg(feature = "distributed")]
    #[error(transparent)]
    InvalidDistributedName(#[from] crate::distributed::InvalidDistributedName),

    /// A publication policy that cannot be used.
    #[cfg(feature = "distributed")]
    #[error("invalid publication policy: {reason}")]
    InvalidPublicationPolicy {
        /// What is wrong with it.
        reason: String,
    },

    /// Federation routing rules that cannot be used, or a transformation that failed
    /// on an event (which the hub parks).
    #[cfg(feature = "distributed")]
    #[error(transparent)]
    Federation(crate::distributed::federation::FederationError),

    /// The transport (broker) between services failed; `TransportError::is_retryable`
    /// says whether trying again may help.
    #[cfg(feature = "distributed")]
    #[error("transport failure")]
    Transport(#[from] crate::distributed::TransportError),

    /// The storage backend failed. `retryable` says whether the same request may succeed
    /// later (a lost connection, a serialization failure) or not (a permission error).
    /// A failed append never leaves anything half-written.
    #[error("event store failure: {message}")]
    Backend {
        /// What failed, for humans.
        message: String,
        /// Whether repeating the operation may succeed.
        retryable: bool,
        /// The backend's own error, if any.
        #[source]
        source: Option<BoxError>,
    },
}

impl Error {
    /// A stable snake_case name of the error's variant: the `kind` label of
    /// [`crate::metrics::COMMAND_ERRORS_TOTAL`], for logs and dashboards. A
    /// [`Error::RetriesExhausted`] is `retries_exhausted` whatever the last error was.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::InvalidStreamId(_) => "invalid_stream_id",
            Error::InvalidEventType(_) => "invalid_event_type",
            Error::InvalidIdempotencyKey(_) => "invalid_idempotency_key",
            Error::InvalidPayload { .. } => "invalid_payload",
            Error::InvalidMetadata { .. } => "invalid_metadata",
            Error::AppendTooLarge { .. } => "append_too_large",
            Error::InvalidPosition { .. } => "invalid_position",
            Error::InvalidParkedEvent { .. } => "invalid_parked_event",
            Error::InvalidSnapshot { .. } => "invalid_snapshot",
            Error::UnreadableEvent { .. } => "unreadable_event",
            Error::InvalidAppend { .. } => "invalid_append",
            Error::VersionConflict { .. } => "version_conflict",
            Error::Deserialization { .. } => "deserialization",
            Error::Serialization { .. } => "serialization",
            Error::UndeclaredStream { .. } => "undeclared_stream",
            Error::TooManyStreamResolutions { .. } => "too_many_stream_resolutions",
            Error::BusinessRuleViolation(_) => "business_rule_violation",
            Error::Rejected(_) => "rejected",
            Error::RetriesExhausted { .. } => "retries_exhausted",
            Error::ProjectionFailed { .. } => "projection_failed",
            Error::InvalidProjectionName(_) => "invalid_projection_name",
            Error::InvalidSaga { .. } => "invalid_saga",
            Error::EventTypePattern { .. } => "event_type_pattern",
            Error::OutcomeUnknown { .. } => "outcome_unknown",
            #[cfg(feature = "distributed")]
            Error::InvalidDistributedName(_) => "invalid_distributed_name",
            #[cfg(feature = "distributed")]
            Error::InvalidPublicationPolicy { .. } => "invalid_publication_policy",
            #[cfg(feature = "distributed")]
            Error::Transport(_) => "transport",
            #[cfg(feature = "distributed")]
            Error::Federation(_) => "federation",
            Error::Backend { .. } => "backend",
        }
    }

    /// Whether the same operation may succeed if tried again: version conflicts and
    /// retryable backend failures. Business errors and bad input never are.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::VersionConflict { .. } => true,
            Error::Backend { retryable, .. } => *retryable,
            #[cfg(feature = "distributed")]
            Error::Transport(error) => error.is_retryable(),
            _ => false,
        }
    }

    /// The conflicts of a [`Error::VersionConflict`], looking through
    /// [`Error::RetriesExhausted`]; `None` for every other error.
    pub fn version_conflicts(&self) -> Option<&[StreamConflict]> {
        match self {
            Error::VersionConflict { conflicts } => Some(conflicts),
            Error::RetriesExhausted { last, .. } => last.version_conflicts(),
            _ => None,
        }
    }

    /// A backend failure that repeating the operation may get past (a lost
    /// connection, a timeout, a server shutting down), with an optional cause.
    pub fn retryable_backend(
        message: impl Into<String>,
        source: impl Into<Option<BoxError>>,
    ) -> Self {
        Error::Backend {
            message: message.into(),
            retryable: true,
            source: source.into(),
        }
    }

    /// A backend failure that repeating the same operation cannot get past (a
    /// misconfiguration, corrupt data, a refused request), with an optional cause.
    pub fn permanent_backend(
        message: impl Into<String>,
        source: impl Into<Option<BoxError>>,
    ) -> Self {
        Error::Backend {
            message: message.into(),
            retryable: false,
            source: source.into(),
        }
    }

    /// A command rejection carrying a domain error of the caller's own type.
    pub fn rejected(error: impl Into<BoxError>) -> Self {
        Error::Rejected(error.into())
    }
}

/// One stream whose expected version did not hold during an append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamConflict {
    /// The stream.
    pub stream: StreamId,
    /// What the writer expected.
    pub expected: crate::ExpectedVersion,
    /// The version the stream was at.
    pub actual: StreamVersion,
}

impl fmt::Display for StreamConflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` (expected {}, actual {})",
            self.stream, self.expected, self.actual
        )
    }
}

/// "gave up after 3 attempts", naming what kept the last one from succeeding: the
/// conflicting streams, or that the backend failed (its error is the source).
fn retries_exhausted(attempts: u32, last: &Error) -> String {
    let tries = if attempts == 1 {
        "1 attempt".to_owned()
    } else {
        format!("{attempts} attempts")
    };
    match last.version_conflicts() {
        Some(conflicts) if !conflicts.is_empty() => format!(
            "gave up after {tries}; the last one conflicted on {}",
            DisplayConflicts(conflicts)
        ),
        _ => match last {
            Error::Backend { message, .. } => {
                format!("gave up after {tries}; the last one failed: {message}")
            }
            _ => format!("gave up after {tries}"),
        },
    }
}

struct DisplayConflicts<'a>(&'a [StreamConflict]);

impl fmt::Display for DisplayConflicts<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, conflict) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{conflict}")?;
        }
        Ok(())
    }
}

/// Which limit of one append was hit (see [`Error::AppendTooLarge`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AppendLimit {
    /// Streams named ([`crate::limits::MAX_STREAMS_PER_APPEND`]).
    #[error("streams")]
    Streams,
    /// Events carried ([`crate::limits::MAX_EVENTS_PER_APPEND`]).
    #[error("events")]
    Events,
    /// Bytes of payloads and metadata ([`crate::limits::MAX_APPEND_BYTES`]).
    #[error("bytes of payloads and metadata")]
    Bytes,
}

/// Why a JSON document (a payload, or metadata) was refused at the door.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JsonProblem {
    /// Not JSON that can be read back: a syntax error, a lone surrogate (`"\ud800"`),
    /// a number out of the range of an `f64`. The decoder's message says which.
    #[error("it is not valid JSON: {message}")]
    NotJson {
        /// What the JSON decoder reported.
        message: String,
    },
    /// Longer than the limit, in bytes of JSON text.
    #[error("it is {len} bytes long, the limit is {max}")]
    TooLarge {
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Arrays and objects nested deeper than the limit.
    #[error("it nests arrays and objects more than {max} levels deep")]
    TooDeep {
        /// The limit.
        max: usize,
    },
    /// An object names the same key twice (JSON decoders disagree on which value wins).
    #[error("an object repeats the key {key:?}")]
    DuplicateKey {
        /// The repeated key (cut for display).
        key: String,
    },
    /// A string or key contains a NUL character (`\u0000`).
    #[error("it contains a NUL character (\\u0000)")]
    NulCharacter,
    /// A number that JSON cannot express (NaN, infinity); serde_json would have written
    /// `null` in its place, and the value would never decode back.
    #[error("it contains a NaN or infinite number, which JSON cannot express")]
    NotFinite,
}

/// The whole cause chain of an error, for messages: `outer: cause: root cause`.
///
/// Keeps what `to_string()` alone drops (serde's reason behind
/// [`Error::Deserialization`], a driver's error behind [`Error::Backend`]).
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Some errors repeat their source in their own message.
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Cuts a rejected input for error messages, on a char boundary.
pub(crate) fn truncate_for_error(value: &str) -> String {
    const LIMIT: usize = 300;
    if value.len() <= LIMIT {
        return value.to_owned();
    }
    let mut end = LIMIT;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &value[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ExpectedVersion, StreamVersion};

    #[test]
    fn an_exhausted_retry_names_the_attempts_and_what_stopped_the_last() {
        let conflict = Error::VersionConflict {
            conflicts: vec![StreamConflict {
                stream: StreamId::from_static("account-1"),
                expected: ExpectedVersion::Exact(StreamVersion::new(3)),
                actual: StreamVersion::new(4),
            }],
        };
        let once = Error::RetriesExhausted {
            attempts: 1,
            last: Box::new(conflict),
        };
        assert_eq!(
            once.to_string(),
            "gave up after 1 attempt; the last one conflicted on `account-1` (expected version 3, actual 4)"
        );
        let backend = Error::RetriesExhausted {
            attempts: 3,
            last: Box::new(Error::retryable_backend("connection reset", None)),
        };
        assert_eq!(
            backend.to_string(),
            "gave up after 3 attempts; the last one failed: connection reset"
        );
    }
}
