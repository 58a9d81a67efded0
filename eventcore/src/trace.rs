//! The W3C trace context of the command that wrote an event, stored in its metadata and
//! carried unchanged through every hop to other services.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// A W3C Trace Context (`traceparent`, and `tracestate` when there is one), as the
/// command that wrote an event saw it. Stored in [`crate::EventMetadata::trace_context`]
/// and carried by published events, so one trace follows a business transaction across
/// services.
///
/// Only well-formed values are accepted: a `traceparent` of version `00`
/// (`00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`, lowercase, ids not all
/// zero), and a `tracestate` of at most 512 printable ASCII characters.
///
/// ```
/// use eventcore::TraceContext;
///
/// let context = TraceContext::new("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")?
///     .with_tracestate("congo=t61rcWkgMzE")?;
/// assert_eq!(context.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
/// assert!(TraceContext::new("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_err());
/// # Ok::<(), eventcore::InvalidTraceContext>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, Serialize)]
pub struct TraceContext {
    traceparent: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    tracestate: Option<String>,
}

/// A `traceparent` or `tracestate` that is not well-formed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid trace context {value:?}: {problem}")]
pub struct InvalidTraceContext {
    /// The rejected input (cut to 300 bytes).
    pub value: String,
    /// What is wrong with it.
    pub problem: &'static str,
}

/// The longest `tracestate` accepted (W3C: 512 characters at most).
const MAX_TRACESTATE_LEN: usize = 512;

impl TraceContext {
    /// A context from a `traceparent` header value.
    ///
    /// # Errors
    ///
    /// [`InvalidTraceContext`] when it is not a well-formed version-00 `traceparent`.
    pub fn new(traceparent: impl Into<String>) -> Result<Self, InvalidTraceContext> {
        let traceparent = traceparent.into();
        check_traceparent(&traceparent).map_err(|problem| InvalidTraceContext {
            value: crate::error::truncate_for_error(&traceparent),
            problem,
        })?;
        Ok(TraceContext {
            traceparent,
            tracestate: None,
        })
    }

    /// Adds a `tracestate` header value (an empty one is the same as none).
    ///
    /// # Errors
    ///
    /// [`InvalidTraceContext`] when it is longer than 512 characters or holds anything
    /// but printable ASCII.
    pub fn with_tracestate(
        mut self,
        tracestate: impl Into<String>,
    ) -> Result<Self, InvalidTraceContext> {
        let tracestate = tracestate.into();
        check_tracestate(&tracestate).map_err(|problem| InvalidTraceContext {
            value: crate::error::truncate_for_error(&tracestate),
            problem,
        })?;
        self.tracestate = (!tracestate.is_empty()).then_some(tracestate);
        Ok(self)
    }

    /// The `traceparent` header value.
    pub fn traceparent(&self) -> &str {
        &self.traceparent
    }

    /// The `tracestate` header value, if there is one.
    pub fn tracestate(&self) -> Option<&str> {
        self.tracestate.as_deref()
    }

    /// The trace id (32 lowercase hex digits).
    pub fn trace_id(&self) -> &str {
        &self.traceparent[3..35]
    }

    /// The parent span id (16 lowercase hex digits).
    pub fn parent_id(&self) -> &str {
        &self.traceparent[36..52]
    }
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("TraceContext");
        debug.field("traceparent", &self.traceparent);
        if let Some(state) = &self.tracestate {
            debug.field("tracestate", state);
        }
        debug.finish()
    }
}

/// Read back checked, like every other stored name.
impl<'de> Deserialize<'de> for TraceContext {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            traceparent: String,
            #[serde(default)]
            tracestate: Option<String>,
        }
        let raw = Raw::deserialize(deserializer)?;
        let context = TraceContext::new(raw.traceparent).map_err(serde::de::Error::custom)?;
        match raw.tracestate {
            Some(state) => context
                .with_tracestate(state)
                .map_err(serde::de::Error::custom),
            None => Ok(context),
        }
    }
}

fn check_traceparent(value: &str) -> Result<(), &'static str> {
    let bytes = value.as_bytes();
    if bytes.len() != 55 {
        return Err("a traceparent is 55 characters: 00-<32 hex>-<16 hex>-<2 hex>");
    }
    if &bytes[..3] != b"00-" || bytes[35] != b'-' || bytes[52] != b'-' {
        return Err("a traceparent reads 00-<trace id>-<parent id>-<flags>");
    }
    let hex = |range: std::ops::Range<usize>| {
        bytes[range]
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
    };
    if !(hex(3..35) && hex(36..52) && hex(53..55)) {
        return Err("the ids and flags of a traceparent are lowercase hex digits");
    }
    if bytes[3..35].iter().all(|b| *b == b'0') || bytes[36..52].iter().all(|b| *b == b'0') {
        return Err("a trace id or parent id of all zeros is invalid");
    }
    Ok(())
}

fn check_tracestate(value: &str) -> Result<(), &'static str> {
    if value.len() > MAX_TRACESTATE_LEN {
        return Err("a tracestate is at most 512 characters");
    }
    if !value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err("a tracestate holds printable ASCII only");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn malformed_contexts_are_refused_and_valid_ones_round_trip() {
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
        ] {
            assert!(TraceContext::new(bad).is_err(), "{bad:?}");
        }
        let context = TraceContext::new(VALID)
            .expect("valid")
            .with_tracestate("a=1,b=2")
            .expect("valid");
        assert_eq!(context.parent_id(), "00f067aa0ba902b7");
        assert!(context.clone().with_tracestate("x\ny").is_err());
        assert!(context.clone().with_tracestate("a".repeat(513)).is_err());
        let json = serde_json::to_string(&context).expect("serializes");
        let back: TraceContext = serde_json::from_str(&json).expect("deserializes");
        assert_eq!(back, context);
        let forged = json.replace("00f067aa0ba902b7", "0000000000000000");
        assert!(serde_json::from_str::<TraceContext>(&forged).is_err());
    }
}
