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
//! | [`PROJECTION_LAG_EVENTS`] `eventcore_projection_lag_events` | gauge | `projection` | after a batch that did not reach the end (a full one, or one stopped by a failure), log positions between a projection's (or process manager's) last applied event and the store's head (events it skips count); 0 after a batch that did |
//! | [`PROJECTION_LAG_SECONDS`] `eventcore_projection_lag_seconds` | gauge | `projection` | while behind, the age of the last event it applied (how stale it is); 0 when it caught up |
//! | [`PUBLISHER_LAG_SECONDS`] `eventcore_publisher_lag_seconds` | gauge | `service` | while catching up, the age of the last event the broker acknowledged; 0 when a pass ends at the head (feature `distributed`) |
//! | [`PUBLISHER_POSITION`] `eventcore_publisher_position` | gauge | `service` | the log position up to which the broker holds every public event (feature `distributed`) |
//! | [`SNAPSHOTS_LOADED_TOTAL`] `eventcore_snapshots_loaded_total` | counter | `command`, `outcome` (`used`, `ignored`) | snapshots an executor loaded to start a state from, used or found unusable (stale, undecodable, another history) |
//! | [`SNAPSHOTS_SAVED_TOTAL`] `eventcore_snapshots_saved_total` | counter | `outcome` (`saved`, `kept_further`, `failed`) | snapshots an executor saved, found a further one kept already, or failed to save |
//! | [`LEADER`] `eventcore_leader` | gauge | `role` (`projection`, `publisher`), `name` | 1 while this process is the elected runner, 0 when it is not |
//! | [`crate::circuit_breaker::STATE_CHANGES_TOTAL`] `eventcore_circuit_breaker_state_changes_total` | counter | `breaker`, `from`, `to` (`closed`, `open`, `half_open`) | a circuit breaker's state changes |
//! | [`crate::circuit_breaker::STATE`] `eventcore_circuit_breaker_state` | gauge | `breaker` | 0 closed, 1 open, 2 half-open |
//! | [`crate::circuit_breaker::CALLS_TOTAL`] `eventcore_circuit_breaker_calls_total` | counter | `breaker`, `outcome` (`success`, `failure`, `timeout`, `rejected`) | calls through a breaker, `rejected` ones not made |
//!
//! Not counted as consumed yet: events handled from a subscription's inbox when a
//! parked stream is re-driven or drained (only the delivery being processed counts).
//! A command whose state is cached and was behind meets a version conflict inside its
//! attempt: counted in [`VERSION_CONFLICTS_TOTAL`], not as a retry.
//!
//! An executor keeps the handles of its commands' success metrics, registered with the
//! recorder in effect when it first ran each command type, and registers them again
//! when the recorder in effect is another one (told apart by address: one installed
//! after the first commands ran is seen). A local recorder
//! (`metrics::with_local_recorder`) that takes the place in memory of an earlier,
//! dropped one is taken for it: give each such recorder its own executor.
//!
//! `command` is [`crate::CommandLogic::command_name`] (by default the type's path): keep
//! the number of command types bounded, as every label value is a time series.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ::metrics::{Counter, Histogram, counter, gauge, histogram};
use chrono::{DateTime, Utc};

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

/// Log positions a projection is behind (gauge; label `projection`).
pub const PROJECTION_LAG_EVENTS: &str = "eventcore_projection_lag_events";
/// While behind, the age of a projection's last applied event, in seconds (gauge; label
/// `projection`).
pub const PROJECTION_LAG_SECONDS: &str = "eventcore_projection_lag_seconds";
/// While catching up, the age of the last event the broker acknowledged, in seconds
/// (gauge; label `service`).
pub const PUBLISHER_LAG_SECONDS: &str = "eventcore_publisher_lag_seconds";
/// The position up to which the broker holds every public event (gauge; label
/// `service`).
pub const PUBLISHER_POSITION: &str = "eventcore_publisher_position";
/// Source events a federation hub looked at (counter; labels `hub`, `outcome`:
/// `forwarded`, `unmatched`, `loop`, `hop_limit`).
pub const FEDERATION_EVENTS_TOTAL: &str = "eventcore_federation_events_total";
/// Copies a federation hub wrote for a target (counter; labels `hub`, `target`).
pub const FEDERATION_FORWARDED_TOTAL: &str = "eventcore_federation_forwarded_total";
/// Whether this process is the elected runner (gauge 1 or 0; labels `role`, `name`).
pub const LEADER: &str = "eventcore_leader";

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

/// The handles of one command type's success-path metrics, registered with one
/// recorder.
#[derive(Debug)]
struct CommandHandles {
    /// The recorder they were registered with (its address).
    recorder: usize,
    succeeded: Counter,
    duration: Histogram,
    appended: Counter,
}

/// An executor's metric handles by command name, so that a command's end costs three
/// atomic updates rather than three registry lookups (each a key built and hashed, and
/// a lock taken, in the recorder). Handles are registered again when the recorder in
/// effect is not the one they were registered with (a recorder installed later, a
/// test's local one).
#[derive(Debug, Default)]
pub(crate) struct CommandMetrics {
    handles: RwLock<HashMap<&'static str, Arc<CommandHandles>>>,
}

/// The address of the recorder in effect on this thread.
fn recorder_in_effect() -> usize {
    ::metrics::with_recorder(|recorder| std::ptr::from_ref(recorder).cast::<()>() as usize)
}

impl CommandMetrics {
    fn handles(&self, command: &'static str) -> Arc<CommandHandles> {
        let recorder = recorder_in_effect();
        {
            let handles = self.handles.read().unwrap_or_else(|e| e.into_inner());
            if let Some(found) = handles.get(command)
                && found.recorder == recorder
            {
                return Arc::clone(found);
            }
        }
        let registered = Arc::new(CommandHandles {
            recorder,
            succeeded: counter!(COMMANDS_TOTAL, "command" => command, "outcome" => "success"),
            duration: histogram!(COMMAND_DURATION_SECONDS, "command" => command),
            appended: counter!(EVENTS_APPENDED_TOTAL, "command" => command),
        });
        let mut handles = self.handles.write().unwrap_or_else(|e| e.into_inner());
        // Command types are few (they are label values): the map stays small.
        handles.insert(command, Arc::clone(&registered));
        registered
    }

    /// A command's end: counted, timed, its events or its error counted.
    pub(crate) fn command_finished(
        &self,
        command: &'static str,
        result: &Result<ExecutionResult>,
        took: Duration,
    ) {
        match result {
            Ok(done) => {
                let handles = self.handles(command);
                handles.succeeded.increment(1);
                handles.duration.record(took.as_secs_f64());
                if !done.events_written.is_empty() {
                    handles.appended.increment(done.events_written.len() as u64);
                }
            }
            Err(error) => {
                counter!(COMMANDS_TOTAL, "command" => command, "outcome" => "error").increment(1);
                histogram!(COMMAND_DURATION_SECONDS, "command" => command)
                    .record(took.as_secs_f64());
                counter!(COMMAND_ERRORS_TOTAL, "command" => command, "kind" => error.kind())
                    .increment(1);
            }
        }
    }
}

/// How far a projection is behind after a batch: `positions` up to the head it saw, and
/// the age of the last event it applied (`None`: caught up).
pub(crate) fn projection_lag(
    projection: &str,
    positions: u64,
    last_applied: Option<DateTime<Utc>>,
) {
    let seconds = match last_applied {
        Some(at) if positions > 0 => (Utc::now() - at).to_std().unwrap_or_default().as_secs_f64(),
        _ => 0.0,
    };
    gauge!(PROJECTION_LAG_EVENTS, "projection" => projection.to_owned()).set(positions as f64);
    gauge!(PROJECTION_LAG_SECONDS, "projection" => projection.to_owned()).set(seconds);
}

/// Whether this process now leads as `role` under `name`.
pub(crate) fn leadership(role: &'static str, name: &str, leading: bool) {
    gauge!(LEADER, "role" => role, "name" => name.to_owned()).set(if leading { 1.0 } else { 0.0 });
}

/// A federation hub looked at a source event.
#[cfg(feature = "distributed")]
pub(crate) fn federation_event(hub: &Arc<str>, outcome: &'static str) {
    counter!(FEDERATION_EVENTS_TOTAL, "hub" => Arc::clone(hub), "outcome" => outcome).increment(1);
}

/// A federation hub wrote a copy for `target`.
#[cfg(feature = "distributed")]
pub(crate) fn federation_forwarded(hub: &Arc<str>, target: &str) {
    counter!(FEDERATION_FORWARDED_TOTAL, "hub" => Arc::clone(hub), "target" => target.to_owned())
        .increment(1);
}

/// The broker holds everything public of `service` up to `position`.
#[cfg(feature = "distributed")]
pub(crate) fn publisher_position(service: &str, position: u64) {
    gauge!(PUBLISHER_POSITION, "service" => service.to_owned()).set(position as f64);
}

/// After a publish: `acknowledged` is the recording time of the last event the broker
/// acknowledged while catching up (`None`: the pass reached the head).
#[cfg(feature = "distributed")]
pub(crate) fn publisher_lag(service: &str, acknowledged: Option<DateTime<Utc>>) {
    let seconds = acknowledged.map_or(0.0, |at| {
        (Utc::now() - at).to_std().unwrap_or_default().as_secs_f64()
    });
    gauge!(PUBLISHER_LAG_SECONDS, "service" => service.to_owned()).set(seconds);
}

/// Snapshots loaded to start a state from (counter; labels `command`, `outcome`).
pub const SNAPSHOTS_LOADED_TOTAL: &str = "eventcore_snapshots_loaded_total";
/// Snapshots saved, or not (counter; label `outcome`).
pub const SNAPSHOTS_SAVED_TOTAL: &str = "eventcore_snapshots_saved_total";

/// A snapshot loaded and used.
pub(crate) fn snapshot_loaded(command: &'static str) {
    counter!(SNAPSHOTS_LOADED_TOTAL, "command" => command, "outcome" => "used").increment(1);
}

/// A snapshot loaded and found unusable.
pub(crate) fn snapshot_ignored(command: &'static str) {
    counter!(SNAPSHOTS_LOADED_TOTAL, "command" => command, "outcome" => "ignored").increment(1);
}

/// A snapshot save that ended: `Some(true)` saved, `Some(false)` a further one kept,
/// `None` failed.
pub(crate) fn snapshot_saved(saved: Option<bool>) {
    let outcome = match saved {
        Some(true) => "saved",
        Some(false) => "kept_further",
        None => "failed",
    };
    counter!(SNAPSHOTS_SAVED_TOTAL, "outcome" => outcome).increment(1);
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
