//! Test support (feature `testing`): the backend conformance suite and a given/when/then
//! harness for command logic.
//!
//! # Conformance suite
//!
//! Every [`crate::EventStore`] backend must behave the same. [`conformance`] holds the
//! checks as generic async functions; [`crate::event_store_conformance_tests!`]
//! instantiates every one of them as a `#[test]` for a store factory, so a third-party
//! backend runs the very suite the built-in ones run:
//!
//! ```
//! mod conformance {
//!     // Any expression callable as `factory()` returning a future of a fresh store.
//!     eventcore::event_store_conformance_tests!(|| async {
//!         eventcore_memory::InMemoryEventStore::new()
//!     });
//! }
//! # fn main() {}
//! ```
//!
//! The factory is called once per test and must return a fresh, empty store. The suite
//! includes a hostile-input section ([`hostile`]): the rule at the door
//! ([`crate::limits`]) and exact read-back of what it accepts.
//!
//! # Command harness
//!
//! [`CommandScenario`] runs a command's `apply`/`handle` exactly as the executor does,
//! without a store: given events on streams, when a command, then the expected events or
//! error.

use std::future::Future;

pub mod conformance;
pub mod hostile;
pub mod projection_conformance;
mod scenario;
#[cfg(feature = "distributed")]
pub mod transport_conformance;

pub use scenario::{CommandScenario, ScenarioOutcome};

/// A health check whose answer a test switches: a dependency the test takes down and
/// brings back (a broker, a card gateway). Clones share the switch.
#[derive(Debug, Clone)]
pub struct SwitchedCheck {
    name: String,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl SwitchedCheck {
    /// A check named `name`, up or not.
    pub fn new(name: impl Into<String>, up: bool) -> Self {
        SwitchedCheck {
            name: name.into(),
            up: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(up)),
        }
    }

    /// Switches it up (`true`) or down.
    pub fn set_up(&self, up: bool) {
        self.up.store(up, std::sync::atomic::Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl crate::health::HealthCheck for SwitchedCheck {
    fn name(&self) -> String {
        self.name.clone()
    }

    async fn check(&self) -> crate::health::ComponentHealth {
        if self.up.load(std::sync::atomic::Ordering::SeqCst) {
            crate::health::ComponentHealth::up(self.name())
        } else {
            crate::health::ComponentHealth::down(self.name(), "switched down by the test")
        }
    }
}

/// Runs `future` to completion on a fresh multi-threaded runtime (4 workers, so the
/// concurrency checks are genuinely parallel). Used by the generated conformance tests.
///
/// # Panics
///
/// If the runtime cannot be built (the OS refused threads), or if `future` panics.
pub fn run<F: Future>(future: F) -> F::Output {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("failed to build a tokio runtime for the test");
    runtime.block_on(future)
}

/// How long a single check may take before it is declared hung. A correct store finishes
/// each check in well under a second; a deadlocked or lost-wakeup store must fail the test
/// instead of hanging CI. It bounds a wait; it never orders anything.
pub const HANG_GUARD: std::time::Duration = std::time::Duration::from_secs(120);

/// Runs `check`, panicking with its name if it takes longer than [`HANG_GUARD`].
///
/// # Panics
///
/// When the check hangs, or when it panics itself.
pub async fn within_hang_guard<F: Future<Output = ()>>(name: &str, check: F) {
    if tokio::time::timeout(HANG_GUARD, check).await.is_err() {
        panic!("conformance check `{name}` did not finish within {HANG_GUARD:?}: the store hangs");
    }
}

/// Instantiates every conformance check of [`conformance`] as a `#[test]` for a store
/// factory: an expression callable as `factory()` that returns a future of a fresh store.
///
/// Attributes written after the factory are put on every generated test, for example
/// `event_store_conformance_tests!(factory, #[cfg_attr(not(have_db), ignore = "no database")])`
/// to skip the suite visibly where the backend is not available.
///
/// ```
/// mod conformance {
///     eventcore::event_store_conformance_tests!(|| async {
///         eventcore_memory::InMemoryEventStore::new()
///     });
/// }
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! event_store_conformance_tests {
    ($factory:expr $(, #[$attr:meta])* $(,)?) => {
        $crate::__event_store_conformance_tests! {
            [$(#[$attr])*] $factory;
            append_then_read_round_trips_payload_and_metadata,
            missing_stream_reads_empty_at_version_zero,
            read_streams_after_returns_only_later_events_with_current_versions,
            stale_expected_version_conflicts,
            no_stream_expectation_requires_an_empty_stream,
            any_expectation_appends_at_every_version,
            conflict_leaves_every_stream_untouched,
            read_only_participant_that_moved_fails_the_append,
            read_only_participant_at_its_version_lets_the_append_succeed,
            an_append_over_many_streams_checks_and_writes_each,
            streams_are_isolated,
            read_streams_merges_several_streams_in_global_order,
            global_positions_increase_across_streams_in_append_order,
            read_all_resumes_after_a_position_exclusively,
            read_all_batch_limit_returns_the_first_events,
            stream_prefix_filter_is_applied_before_the_limit,
            event_type_filter_is_applied_before_the_limit,
            read_log_says_how_far_it_looked,
            peek_log_returns_the_events_after_a_position_in_order,
            append_of_ten_thousand_events_in_one_call,
            undecodable_payload_is_a_typed_error_and_never_dropped,
            idempotency_key_returns_the_first_outcome_and_writes_nothing,
            a_failed_append_does_not_consume_its_idempotency_key,
            racing_appends_with_one_idempotency_key_write_once,
            repeating_an_append_with_the_same_event_ids_writes_nothing,
            invalid_append_requests_are_refused,
            invalid_stream_ids_are_rejected_at_construction,
            nul_characters_are_refused_before_anything_is_written,
            head_position_tracks_the_last_event,
            waiting_reader_wakes_when_an_event_is_appended,
            sixteen_writers_racing_on_one_stream_get_one_winner_per_version,
            concurrent_multi_stream_appends_reach_a_live_reader_once_and_in_order,
            multi_stream_appends_are_read_entirely_or_not_at_all,
            snapshots_round_trip_exactly,
            snapshots_are_kept_per_name_streams_and_schema_version,
            the_snapshot_folded_furthest_stays,
            a_fresh_executor_starts_from_the_snapshot_and_folds_what_follows,
            a_snapshot_its_stream_does_not_prove_is_never_used,
            snapshots_are_taken_as_the_executor_writes,
        }
        $crate::__hostile_input_conformance_tests! {
            [$(#[$attr])*] $factory;
            nesting_beyond_the_limit_is_refused_everywhere,
            every_finite_float_reads_back_bit_for_bit,
            non_finite_floats_are_refused,
            payload_text_reads_back_byte_for_byte,
            duplicate_keys_are_refused,
            nul_characters_and_lone_surrogates_are_refused,
            oversized_payloads_metadata_and_appends_are_refused,
            appends_over_the_stream_and_event_limits_are_refused,
            expected_versions_beyond_any_stream_conflict,
            impossible_stream_prefixes_select_nothing,
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __hostile_input_conformance_tests {
    ($attrs:tt $factory:expr; $($test:ident),* $(,)?) => {
        $( $crate::__conformance_test! { $attrs $factory; hostile; $test } )*
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __event_store_conformance_tests {
    ($attrs:tt $factory:expr; $($test:ident),* $(,)?) => {
        $( $crate::__conformance_test! { $attrs $factory; conformance; $test } )*
    };
}

/// One generated conformance test: `$module::$test` of `eventcore::testing` on a fresh
/// store from `$factory`, under the hang guard.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_test {
    ([$($attr:tt)*] $factory:expr; $module:ident; $test:ident) => {
        #[test]
        $($attr)*
        fn $test() {
            $crate::testing::run($crate::testing::within_hang_guard(
                ::core::stringify!($test),
                async {
                    let store = ($factory)().await;
                    $crate::testing::$module::$test(store).await;
                },
            ));
        }
    };
}

/// Instantiates every check of [`projection_conformance`] (checkpoints and the projection
/// runner) as a `#[test]` for a factory of fresh stores that are both the
/// [`crate::EventStore`] and the [`crate::CheckpointStore`]; attributes after the
/// factory go on every test, as with [`crate::event_store_conformance_tests!`].
///
/// ```
/// mod projections {
///     eventcore::projection_conformance_tests!(|| async {
///         eventcore_memory::InMemoryEventStore::new()
///     });
/// }
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! projection_conformance_tests {
    ($factory:expr $(, #[$attr:meta])* $(,)?) => {
        $crate::__projection_conformance_tests! {
            [$(#[$attr])*] $factory;
            a_missing_checkpoint_loads_as_none,
            checkpoints_load_back_per_projection,
            a_checkpoint_never_moves_backwards_until_reset,
            parked_events_are_kept_once_in_position_order,
            invalid_projection_names_are_refused,
            the_runner_catches_up_and_resumes_from_its_checkpoint,
            the_filter_skips_other_events_before_decoding,
            a_failing_event_stops_the_runner_with_the_checkpoint_before_it,
            failing_and_undecodable_events_are_parked_when_the_policy_says_so,
            a_rebuild_replays_from_the_start,
            a_live_runner_sees_every_event_once_in_order,
            a_live_runner_waits_when_the_log_ends_in_unwanted_events,
            checkpoints_no_backend_can_store_are_refused,
            parked_records_are_stored_alike_and_keep_their_cause,
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __projection_conformance_tests {
    ($attrs:tt $factory:expr; $($test:ident),* $(,)?) => {
        $( $crate::__conformance_test! { $attrs $factory; projection_conformance; $test } )*
    };
}

/// Instantiates every transport conformance check of [`transport_conformance`] as a
/// `#[test]` (features `testing` and `distributed`), for a harness factory: an
/// expression callable as `factory()` returning a future of a fresh
/// [`transport_conformance::TransportHarness`].
///
/// ```
/// # #[cfg(feature = "distributed")]
/// mod transport {
///     use std::sync::Arc;
///     use eventcore::distributed::{EventPublisher, EventSubscriber, ServiceId};
///     use eventcore::testing::transport_conformance::TransportHarness;
///     use eventcore_memory::InMemoryBroker;
///
///     use eventcore_memory::InMemoryEventStore;
///
///     struct Harness(InMemoryBroker);
///
///     #[async_trait::async_trait]
///     impl TransportHarness for Harness {
///         type Store = InMemoryEventStore;
///
///         async fn publisher(&self, service: &ServiceId) -> Arc<dyn EventPublisher> {
///             Arc::new(self.0.publisher(service.clone()))
///         }
///         async fn subscriber(&self) -> Arc<dyn EventSubscriber> {
///             Arc::new(self.0.clone())
///         }
///         async fn store(&self) -> InMemoryEventStore {
///             InMemoryEventStore::new()
///         }
///         async fn lose_last_messages(&self, service: &ServiceId, messages: usize) {
///             self.0.set_unsynced(service, messages);
///             self.0.crash();
///             self.0.set_unsynced(service, 0);
///         }
///     }
///
///     eventcore::transport_conformance_tests!(|| async { Harness(InMemoryBroker::new()) });
/// }
/// # fn main() {}
/// ```
#[cfg(feature = "distributed")]
#[macro_export]
macro_rules! transport_conformance_tests {
    ($factory:expr $(, #[$attr:meta])* $(,)?) => {
        $crate::__transport_conformance_tests! {
            [$(#[$attr])*] $factory;
            published_events_arrive_in_order_and_intact,
            an_event_published_twice_is_held_once,
            an_event_below_the_last_held_is_never_stored_after_it,
            last_published_is_the_last_event_held,
            a_topic_belongs_to_the_service_that_declared_it,
            an_unacknowledged_delivery_comes_again,
            a_dropped_handle_hands_its_delivery_to_the_next,
            two_handles_never_hold_two_events_at_once,
            a_delivery_is_consecutive_only_after_the_handles_own_acknowledgement,
            a_subscription_resumes_after_its_last_acknowledgement,
            a_subscription_receives_only_its_topics,
            a_split_subscription_delivers_each_stream_to_its_partition_in_order,
            the_partitions_of_a_subscription_hold_an_event_each_at_once,
            a_subscription_split_another_way_is_refused,
            a_subscriptions_backlog_is_what_it_has_not_acknowledged,
            a_publisher_handle_behind_the_publication_is_refused,
            a_publisher_handle_ahead_of_a_broker_that_lost_events_is_refused,
            the_publisher_publishes_the_public_events_in_log_order,
            a_restarted_publisher_resumes_without_a_gap_or_a_repeat,
            a_crash_between_publish_and_checkpoint_publishes_nothing_twice,
            a_publish_failing_inside_a_batch_resumes_without_a_gap_or_a_repeat,
            a_broker_that_lost_acknowledged_events_gets_them_again_in_order,
            a_running_publisher_republishes_lost_events_before_newer_ones,
            a_live_publisher_republishes_lost_events_before_newer_ones,
            a_live_publisher_republishes_lost_events_while_only_private_ones_come,
            a_redelivered_event_changes_nothing,
            a_failing_event_is_parked_and_holds_its_stream_while_others_flow_until_redriven,
            an_event_parked_by_one_instance_holds_its_stream_on_the_other,
            an_event_held_after_its_stream_was_released_is_handled_before_the_next,
            a_hold_that_finds_its_stream_released_handles_it_at_once,
            an_event_left_held_is_parked_unhandled_past_the_delivery_limit,
            an_event_that_kills_its_handler_every_time_is_parked_after_the_delivery_limit,
            two_instances_apply_each_event_once_in_source_stream_order,
            a_split_subscription_applies_each_event_once_in_order_across_its_runners,
            a_broker_that_lost_events_makes_nothing_happen_twice,
        }
    };
}

#[cfg(feature = "distributed")]
#[doc(hidden)]
#[macro_export]
macro_rules! __transport_conformance_tests {
    ($attrs:tt $factory:expr; $($test:ident),* $(,)?) => {
        $( $crate::__conformance_test! { $attrs $factory; transport_conformance; $test } )*
    };
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    /// The public `async fn` checks of a suite file.
    fn checks(source: &str) -> BTreeSet<String> {
        source
            .lines()
            .filter_map(|line| line.strip_prefix("pub async fn "))
            .map(|rest| {
                rest.split(['(', '<'])
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_owned()
            })
            .collect()
    }

    /// The names listed after `macro_name!` in this file, up to the closing brace.
    fn listed(macro_name: &str) -> BTreeSet<String> {
        let source = include_str!("testing.rs");
        let start = source
            .find(&format!("$crate::{macro_name}! {{"))
            .unwrap_or_else(|| panic!("{macro_name} is not invoked"));
        let body = &source[start..];
        let end = body.find('}').unwrap_or(body.len());
        body[..end]
            .lines()
            .skip(2)
            .map(|line| line.trim().trim_end_matches(',').to_owned())
            .filter(|name| !name.is_empty())
            .collect()
    }

    /// The suites are lists kept by hand in the macros above: every public check must
    /// be instantiated, and nothing else.
    #[test]
    fn the_macros_instantiate_every_check() {
        for suite in [
            "__event_store_conformance_tests",
            "__hostile_input_conformance_tests",
            "__projection_conformance_tests",
        ] {
            assert!(listed(suite).len() >= 10, "{suite}: {:?}", listed(suite));
        }
        assert_eq!(
            listed("__event_store_conformance_tests"),
            [
                include_str!("testing/conformance/append.rs"),
                include_str!("testing/conformance/concurrency.rs"),
                include_str!("testing/conformance/idempotency.rs"),
                include_str!("testing/conformance/log.rs"),
                include_str!("testing/conformance/read.rs"),
                include_str!("testing/conformance/snapshots.rs"),
                include_str!("testing/conformance/validation.rs"),
            ]
            .into_iter()
            .flat_map(checks)
            .collect::<BTreeSet<_>>()
        );
        // Every topic file is listed above: a new one must be added there.
        let topics = std::fs::read_dir(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src/testing/conformance"
        ))
        .expect("the conformance directory")
        .filter(|entry| {
            entry
                .as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|ext| ext == "rs"))
        })
        .count();
        assert_eq!(topics, 7, "a conformance topic file is not checked");
        assert!(
            checks(include_str!("testing/conformance.rs")).is_empty(),
            "checks belong in the topic files"
        );
        assert_eq!(
            listed("__hostile_input_conformance_tests"),
            checks(include_str!("testing/hostile.rs"))
        );
        assert_eq!(
            listed("__projection_conformance_tests"),
            checks(include_str!("testing/projection_conformance.rs"))
        );
        assert_eq!(
            listed("__transport_conformance_tests"),
            [
                include_str!("testing/transport_conformance/broker.rs"),
                include_str!("testing/transport_conformance/publisher.rs"),
                include_str!("testing/transport_conformance/subscriber.rs"),
            ]
            .into_iter()
            .flat_map(checks)
            .collect::<BTreeSet<_>>()
        );
        assert!(
            checks(include_str!("testing/transport_conformance.rs")).is_empty(),
            "checks belong in the topic files"
        );
        let transport_topics = std::fs::read_dir(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src/testing/transport_conformance"
        ))
        .expect("the transport conformance directory")
        .filter(|entry| {
            entry
                .as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|ext| ext == "rs"))
        })
        .count();
        assert_eq!(transport_topics, 3, "a transport topic file is not checked");
    }
}
