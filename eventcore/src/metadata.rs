//! What is stored beside every event's payload.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::trace::TraceContext;
use crate::types::{CausationId, CorrelationId};

/// Metadata stored with every event: who and what caused it, and free-form fields.
///
/// The [`crate::CommandExecutor`] fills `correlation_id` and `causation_id` for every
/// event a command writes, so a chain of commands across services can be followed.
///
/// # Examples
///
/// ```
/// use eventcore::{CorrelationId, EventMetadata};
///
/// let metadata = EventMetadata::new(CorrelationId::new())
///     .with_actor("user-17")
///     .with_custom("channel", "web");
/// assert_eq!(metadata.actor.as_deref(), Some("user-17"));
/// assert_eq!(metadata.custom["channel"], "web");
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct EventMetadata {
    /// Groups every event of one business request.
    pub correlation_id: CorrelationId,
    /// The event or command execution that caused this event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<CausationId>,
    /// The user or system on whose behalf the event was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// Free-form fields (tenant, channel, client version, ...).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub custom: Map<String, Value>,
    /// The W3C trace context of the command that wrote the event, carried unchanged by
    /// published events to other services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_context: Option<TraceContext>,
}

impl EventMetadata {
    /// Metadata with this correlation id and nothing else.
    pub fn new(correlation_id: CorrelationId) -> Self {
        EventMetadata {
            correlation_id,
            causation_id: None,
            actor: None,
            custom: Map::new(),
            trace_context: None,
        }
    }

    /// Sets the causation id.
    pub fn with_causation_id(mut self, causation_id: CausationId) -> Self {
        self.causation_id = Some(causation_id);
        self
    }

    /// Sets the actor.
    pub fn with_actor(mut self, actor: impl Into<String>) -> Self {
        self.actor = Some(actor.into());
        self
    }

    /// Sets the trace context.
    pub fn with_trace_context(mut self, context: TraceContext) -> Self {
        self.trace_context = Some(context);
        self
    }

    /// Adds a custom field, replacing one of the same name.
    pub fn with_custom(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.custom.insert(key.into(), value.into());
        self
    }
}

impl Default for EventMetadata {
    /// Metadata with a fresh correlation id.
    fn default() -> Self {
        Self::new(CorrelationId::new())
    }
}
