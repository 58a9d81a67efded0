//! The bridge between the W3C trace context stored with events ([`TraceContext`]) and
//! the OpenTelemetry context of `tracing` spans (feature `opentelemetry`, through the
//! application's `tracing-opentelemetry` layer; without that layer every span's context
//! is empty and these functions do nothing).

use std::str::FromStr;

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::trace::TraceContext;

/// The W3C context of `span`, when it has a valid OpenTelemetry one.
pub(crate) fn context_of(span: &tracing::Span) -> Option<TraceContext> {
    let context = span.context();
    let found = context.span();
    let span_context = found.span_context();
    if !span_context.is_valid() {
        return None;
    }
    let context = TraceContext::new(format!(
        "00-{}-{}-{:02x}",
        span_context.trace_id(),
        span_context.span_id(),
        span_context.trace_flags().to_u8()
    ))
    .ok()?;
    let state = span_context.trace_state().header();
    if state.is_empty() {
        return Some(context);
    }
    // A trace state we cannot store is dropped, not the trace.
    match context.clone().with_tracestate(state) {
        Ok(with_state) => Some(with_state),
        Err(_) => Some(context),
    }
}

/// The OpenTelemetry span context a stored W3C context names (remote, as it came from
/// another process or an earlier one).
pub(crate) fn span_context(context: &TraceContext) -> Option<SpanContext> {
    // TraceContext only holds well-formed version-00 values: 00-<32>-<16>-<2>.
    let mut parts = context.traceparent().split('-').skip(1);
    let trace_id = TraceId::from_hex(parts.next()?).ok()?;
    let span_id = SpanId::from_hex(parts.next()?).ok()?;
    let flags = u8::from_str_radix(parts.next()?, 16).ok()?;
    let state = context
        .tracestate()
        .and_then(|state| TraceState::from_str(state).ok())
        .unwrap_or_default();
    let span_context = SpanContext::new(trace_id, span_id, TraceFlags::new(flags), true, state);
    span_context.is_valid().then_some(span_context)
}

/// Makes `span` a child of `context`. Call before the span is entered.
pub(crate) fn continue_from(span: &tracing::Span, context: &TraceContext) {
    if let Some(remote) = span_context(context) {
        let parent = opentelemetry::Context::new().with_remote_span_context(remote);
        // Fails only for a span already started: it keeps its own parent.
        let _ = span.set_parent(parent);
    }
}

/// Links `span` to `context` (a message it sends, created in another span).
pub(crate) fn link_to(span: &tracing::Span, context: &TraceContext) {
    if let Some(remote) = span_context(context) {
        span.add_link(remote);
    }
}

/// Whether the span in effect now has a valid OpenTelemetry context.
pub(crate) fn in_trace() -> bool {
    tracing::Span::current()
        .context()
        .span()
        .span_context()
        .is_valid()
}
