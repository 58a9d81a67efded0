//! What EventCore measures, through the [`metrics`](https://docs.rs/metrics) facade: the
//! library emits, the application installs the recorder it wants (Prometheus with
//! `metrics-exporter-prometheus`, StatsD, OpenTelemetry, or none: without a recorder
//! each emission is a no-op). The names and labels below are stable: a change is a
//! breaking release.
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | [`COMMANDS_TOTAL`] `eventcore_commands_total` | counter | `command`, `outcome` (`success`, `error`) | commands executed, each once whatever its attempts |
//! | [`COMMAND_DURATION_SECONDS`] `eventcore_command_duration_seconds` | histogram | `command` | from the call to its result, retries and their waits included |
//! | [`COMMAND_ERRORS_TOTAL`] `eventcore_command_errors_total` | counter | `command`, `kind` ([`crate::Error::kind`]) | commands that ended in an error |
//! | [`VERSION_CONFLICTS_TOTAL`] `eventcore_version_conflicts_total` | counter | `command` | attempts refused because a stream read had moved |
//! | [`COMMAND_RETRIES_TOTAL`] `eventcore_command_retries_total` | counter | `command`, `reason` (`version_conflict`, `backend`, `outcome_unknown`) | attempts made again |
//! | [`EVENTS_APPENDED_TOTAL`] `eventcore_events_appended_total` | counter | `command` | events written by commands |
//! | [`EVENTS_PUBLISHED_TOTAL`] `eventcore_events_published_total` | counter | `service`, `topic` | events the broker acknowledged (feature `distributed`) |
//! | [`EVENTS_CONSUMED_TOTAL`] `eventcore_events_consumed_total` | counter | `service`, `subscription`, `topic` | events a subscription handled and acknowledged (feature `distributed`) |
//! | [`EVENT_LAG_SECONDS`] `eventcore_event_lag_seconds` | histogram | `service`, `subscription` | from the source store recording an event (`occurred_at`) to its handling; clocks of two machines included (feature `distributed`) |
//! | [`EVENTS_PARKED_TOTAL`] `eventcore_events_parked_total` | counter | `service`, `subscription` | events a subscription parked (feature `distributed`) |
//!
//! Not counted as consumed yet: events handled from a subscription's inbox when a
//! parked stream is re-driven or drained (only the delivery being processed counts).
//! A command whose state is cached and was behind meets a version conflict inside its
//! attempt: counted in [`VERSION_CONFLICTS_TOTAL`], not as a retry.
//!
//! `command` is [`crate::CommandLogic::command_name`] (by default the type's path): keep
//! the number of command types bounded, as every label value is a time series.

#[cfg(feature = "distributed")]
use std::sync::Arc;
use std::time::Duration;

use ::metrics::{counter, histogram};

use crate::ExecutionResult;
use crate::error::{Error, Result};

/// Commands executed (counter; labels `command`, `outcome`).
pub const COMMANDS_TOTAL: &str = "eventcore_commands_total";
/// Time from a command's call to its result, in seconds (histogram; label `command`).
pub const COMMAND_DURATION_SECONDS: &str = "eventcore_command_duration_seconds";
/// Commands that ended in an error (counter; labels `command`, `kind`).
pub const COMMAND_ERRORS_TOTAL: &str = "eventcore_command_errors_total";
/// Attempts refused by a version conflict (counter; label `command`).
pub const VERSION_CONFLICTS_TOTAL: &str = "eventcore_version_conflicts_total";
/// Attempts made again (counter; labels `command`, `reason`).
pub const COMMAND_RETRIES_TOTAL: &str = "eventcore_command_retries_total";
/// Events written by commands (counter; label `command`).
pub const EVENTS_APPENDED_TOTAL: &str = "eventcore_events_appended_total";
/// Events acknowledged by the broker (counter; labels `service`, `topic`).
pub const EVENTS_PUBLISHED_TOTAL: &str = "eventcore_events_published_total";
/// Events handled and acknowledged by a subscription (counter; labels `service`,
/// `subscription`, `topic`).
pub const EVENTS_CONSUMED_TOTAL: &str = "eventcore_events_consumed_total";
/// From an event's recording in its source store to its handling, in seconds
/// (histogram; labels `service`, `subscription`).
pub const EVENT_LAG_SECONDS: &str = "eventcore_event_lag_seconds";
/// Events parked by a subscription (counter; labels `service`, `subscription`).
pub const EVENTS_PARKED_TOTAL: &str = "eventcore_events_parked_total";

/// Why an attempt was made again: the `reason` label of [`COMMAND_RETRIES_TOTAL`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum RetryReason {
    VersionConflict,
    Backend,
    OutcomeUnknown,
}

impl RetryReason {
    fn label(self) -> &'static str {
        match self {
            RetryReason::VersionConflict => "version_conflict",
            RetryReason::Backend => "backend",
            RetryReason::OutcomeUnknown => "outcome_unknown",
        }
    }
}

/// A command's end: counted, timed, its events or its error counted.
pub(crate) fn command_finished(
    command: &'static str,
    result: &Result<ExecutionResult>,
    took: Duration,
) {
    let outcome = if result.is_ok() { "success" } else { "error" };
    counter!(COMMANDS_TOTAL, "command" => command, "outcome" => outcome).increment(1);
    histogram!(COMMAND_DURATION_SECONDS, "command" => command).record(took.as_secs_f64());
    match result {
        Ok(done) if !done.events_written.is_empty() => {
            counter!(EVENTS_APPENDED_TOTAL, "command" => command)
                .increment(done.events_written.len() as u64);
        }
        Ok(_) => {}
        Err(error) => {
            counter!(COMMAND_ERRORS_TOTAL, "command" => command, "kind" => error.kind())
                .increment(1);
        }
    }
}

/// An attempt that failed: a version conflict is counted (retried or not).
pub(crate) fn attempt_failed(command: &'static str, error: &Error) {
    if matches!(error, Error::VersionConflict { .. }) {
        counter!(VERSION_CONFLICTS_TOTAL, "command" => command).increment(1);
    }
}

/// An attempt about to be made again.
pub(crate) fn command_retried(command: &'static str, reason: RetryReason) {
    counter!(COMMAND_RETRIES_TOTAL, "command" => command, "reason" => reason.label()).increment(1);
}

/// Events acknowledged by the broker, `count` of them on `topic`.
#[cfg(feature = "distributed")]
pub(crate) fn events_published(service: &str, topic: &str, count: u64) {
    // Once per published batch and topic: the labels' allocations do not matter.
    counter!(EVENTS_PUBLISHED_TOTAL, "service" => service.to_owned(), "topic" => topic.to_owned())
        .increment(count);
}

/// One event handled and acknowledged by a subscription, `lag` after its recording.
#[cfg(feature = "distributed")]
pub(crate) fn event_consumed(
    service: &Arc<str>,
    subscription: &Arc<str>,
    topic: &Arc<str>,
    lag: Option<Duration>,
) {
    counter!(
        EVENTS_CONSUMED_TOTAL,
        "service" => Arc::clone(service),
        "subscription" => Arc::clone(subscription),
        "topic" => Arc::clone(topic)
    )
    .increment(1);
    if let Some(lag) = lag {
        histogram!(
            EVENT_LAG_SECONDS,
            "service" => Arc::clone(service),
            "subscription" => Arc::clone(subscription)
        )
        .record(lag.as_secs_f64());
    }
}

/// One event parked by a subscription.
#[cfg(feature = "distributed")]
pub(crate) fn event_parked(service: &Arc<str>, subscription: &Arc<str>) {
    counter!(
        EVENTS_PARKED_TOTAL,
        "service" => Arc::clone(service),
        "subscription" => Arc::clone(subscription)
    )
    .increment(1);
}
