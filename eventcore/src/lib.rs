//! Event sourcing for Rust with commands that read several streams and write to them
//! atomically.
//!
//! # Concepts
//!
//! - A **stream** is an ordered sequence of events named by a validated [`StreamId`].
//!   Every event has a [`StreamVersion`] in its stream (1, 2, 3, ...) and a
//!   [`GlobalPosition`] in the store's global log.
//! - An **event** is a serde type with `#[derive(Event)]`: each enum variant is an event
//!   type with a stable name (the variant's, or `#[event(name = "...")]`), stored beside
//!   the variant's content as its payload; decoding dispatches on the stored name, so one
//!   stream set can hold the events of several enums ([`derive@Event`]: aliases,
//!   upcasters, enums of enums; [`RawEvent`] for events whose type is data). It is
//!   appended as [`EventData`] (id, type, JSON payload, metadata), read back as a
//!   [`RecordedEvent`] (with its stream, version, position and recording time; a row that
//!   cannot be read comes back marked damaged, in its place, never dropped) and decoded
//!   into a [`StoredEvent<E>`]. What a payload may
//!   hold, and the limits every backend enforces alike, are in [`limits`].
//! - A **command** is a struct with `#[derive(Command)]`; its `#[stream]` fields declare
//!   the streams it reads and may write. [`CommandLogic`] folds the events of those streams
//!   into a `State` ([`CommandLogic::apply`]) and decides which events to write
//!   ([`CommandLogic::handle`]), returning [`StreamWrite`]s that can only target streams
//!   the command read.
//! - The [`CommandExecutor`] runs a command: read every stream, fold, decide, and append
//!   every write atomically with an expected version for *every* stream read, so no
//!   decision is ever committed on a stale read. Conflicts are retried under a
//!   [`RetryPolicy`]; business errors ([`require!`]) are not. A command type may let the
//!   executor keep its folded state between executions ([`CommandLogic::state_cache`]):
//!   the next execution reads only what is new, or nothing at all; with
//!   [`StateCache::with_snapshots`] the state is also saved in the store
//!   ([`snapshot`]), so a fresh executor starts from it.
//! - **Metadata and idempotency**: every event carries [`EventMetadata`] (correlation,
//!   causation, actor, custom fields), set per execution with [`ExecutionOptions`]. An
//!   [`IdempotencyKey`] makes an execution happen at most once, across retries, processes
//!   and restarts: a repeat writes nothing and answers with the first outcome.
//! - A [`Projection`] builds a read model from the global log; the [`ProjectionRunner`]
//!   catches it up from its durable checkpoint ([`CheckpointStore`]) in batches, then
//!   follows the log live, with an explicit policy for events it cannot process. With a
//!   [`LeaderElection`], one runner per [`ProjectionName`] is active across processes and
//!   the others stand by ([`ProjectionRunner::run_as_leader`]).
//! - A [`ProcessManager`] reacts to events by dispatching commands through a
//!   [`Dispatcher`] (causation = the event, an idempotency key derived from it, so a
//!   redelivered event never repeats a side effect); [`saga`] builds sagas on it: progress
//!   in the saga's own stream, compensation in reverse order, durable timeouts (on a
//!   [`Clock`]).
//! - An [`EventStore`] is the storage contract (object safe: `Arc<dyn EventStore>`).
//!   `eventcore-memory` provides the in-memory store for tests and examples,
//!   `eventcore-postgres` the production store.
//!
//! # For backend authors
//!
//! A backend implements three traits, each documented with the semantics it must keep:
//!
//! - [`EventStore`]: atomic multi-stream appends checked at every expected version
//!   ([`AppendRequest::validate`] first, so every backend refuses the same requests), reads
//!   by stream, and a global log with the prefix property: what a reader has seen never
//!   gains an event below it later. [`EventStore::read_log`] must say how far the read
//!   looked ([`LogRead::scanned`]); the runners wait after that, never after a head read
//!   before it.
//! - [`CheckpointStore`]: checkpoints that never move backwards and parked events, under
//!   names that arrive validated ([`ProjectionName`]); positions and parked records no
//!   backend can store are refused with [`check_checkpoint_position`] and
//!   [`ParkedEvent::checked`].
//! - [`LeaderElection`]: one holder per name at a time, told when it lost it.
//!
//! The `testing` feature holds the specification as code: instantiate
//! `eventcore::event_store_conformance_tests!` (the store contract and hostile inputs)
//! and `eventcore::projection_conformance_tests!` (checkpoints and the runner) in a test
//! module with a factory of fresh stores, as `eventcore-memory` and `eventcore-postgres`
//! do. A backend that passes both behaves like the two shipped ones in everything the
//! suites check, down to the bytes of the payloads it returns.
//!
//! # Quick start
//!
//! ```
//! use eventcore::{
//!     require, Command, CommandExecutor, CommandLogic, CommandResult, Event, ReadStreams,
//!     StoredEvent, StreamId, StreamResolver, StreamWrite,
//! };
//! use eventcore_memory::InMemoryEventStore;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Clone, Serialize, Deserialize, Event)]
//! enum AccountEvent {
//!     Deposited { amount: u64 },
//!     Withdrawn { amount: u64 },
//! }
//!
//! #[derive(Command)]
//! struct Deposit {
//!     #[stream]
//!     account: StreamId,
//!     amount: u64,
//! }
//!
//! impl CommandLogic for Deposit {
//!     type State = u64;
//!     type Event = AccountEvent;
//!
//!     fn apply(&self, balance: &mut u64, event: &StoredEvent<AccountEvent>) {
//!         match event.payload {
//!             AccountEvent::Deposited { amount } => *balance += amount,
//!             AccountEvent::Withdrawn { amount } => *balance -= amount,
//!         }
//!     }
//!
//!     fn handle(
//!         &self,
//!         read_streams: ReadStreams<Self::StreamSet>,
//!         _balance: u64,
//!         _resolver: &mut StreamResolver,
//!     ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, AccountEvent>>> {
//!         require!(self.amount > 0, "a deposit must be positive");
//!         Ok(vec![StreamWrite::new(
//!             &read_streams,
//!             self.account.clone(),
//!             AccountEvent::Deposited { amount: self.amount },
//!         )?])
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), eventcore::Error> {
//! let executor = CommandExecutor::new(InMemoryEventStore::new());
//! let account = StreamId::try_new("account-1")?;
//! let result = executor.execute(&Deposit { account: account.clone(), amount: 50 }).await?;
//! assert_eq!(result.events_written.len(), 1);
//! assert_eq!(result.events_written[0].stream_version.value(), 1);
//!
//! let refused = executor.execute(&Deposit { account, amount: 0 }).await;
//! assert!(matches!(refused, Err(eventcore::Error::BusinessRuleViolation(_))));
//! # Ok(())
//! # }
//! ```
//!
//! # Feature flags
//!
//! | feature | what it adds |
//! |---|---|
//! | `testing` | `eventcore::testing`: the public backend conformance suite (`event_store_conformance_tests!`) and the given/when/then command harness (`CommandScenario`) |
//! | `distributed` | [`distributed`]: events across services (publisher, subscriber, the envelope and the transport traits) |
//! | `opentelemetry` | one trace across services: a command's events carry its span's W3C context (`tracing-opentelemetry` 0.34 / `opentelemetry` 0.33), and the spans that handle them (subscriptions, process managers, sagas) are its children |
//!
//! The user manual lives in the repository's `docs/` directory; design decisions are in
//! `docs/adr/`.

pub mod circuit_breaker;
mod clock;
mod command;
#[cfg(feature = "distributed")]
pub mod distributed;
mod error;
mod event;
mod executor;
pub mod health;
mod json;
mod leadership;
pub mod limits;
mod metadata;
pub mod metrics;
mod names;
#[cfg(feature = "opentelemetry")]
mod otel;
mod process;
mod projection;
#[cfg(test)]
mod property_tests;
pub mod saga;
pub mod snapshot;
mod store;
mod trace;
mod types;

#[cfg(feature = "testing")]
pub mod testing;

#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;

pub use eventcore_macros::{Command, Event};

pub use crate::clock::{Clock, ManualClock, SleepFuture, SystemClock, TokioClock};

pub use crate::command::{
    Command, CommandLogic, CommandStreams, ReadStreams, StateCache, StreamResolver, StreamWrite,
};
pub use crate::error::{
    AppendLimit, BoxError, CommandResult, Error, JsonProblem, Result, StreamConflict, error_chain,
};
pub use crate::event::{
    DecodeError, Event, EventDamage, EventData, EventPayload, RawEvent, RecordedEvent, StoredEvent,
};
pub use crate::executor::{CommandExecutor, ExecutionOptions, ExecutionResult, RetryPolicy};
pub use crate::leadership::{LeaderElection, Leadership};
pub use crate::metadata::EventMetadata;
pub use crate::names::{
    EventType, IdempotencyKey, InvalidEventType, InvalidIdempotencyKey, InvalidProjectionName,
    InvalidStreamId, MAX_NAME_LEN, NameProblem, ProjectionName, StreamId,
};
pub use crate::process::{
    Dispatcher, MAX_PROCESS_MANAGER_NAME_LEN, ProcessManager, ProcessManagerRunner,
};
pub use crate::projection::{
    CheckpointStore, OnFailure, ParkedEvent, Projection, ProjectionErrorPolicy, ProjectionFilter,
    ProjectionMetrics, ProjectionRunner, RunSummary, check_checkpoint_position,
};
pub use crate::snapshot::{Snapshot, SnapshotKey, SnapshotStore, SnapshotVersion, Snapshots};
pub use crate::store::{
    AppendOutcome, AppendRequest, AppendedEvent, EventStore, LogQuery, LogRead, StreamAppend,
    StreamsSnapshot,
};
pub use crate::trace::{InvalidTraceContext, TraceContext};
pub use crate::types::{
    CausationId, CorrelationId, EventId, ExpectedVersion, GlobalPosition, StreamVersion,
};

/// The manual's pages in `docs/`, compiled and run as doc tests so their code cannot
/// drift from the API.
#[cfg(doctest)]
mod manual {
    #[doc = include_str!("../../README.md")]
    struct Readme;

    #[doc = include_str!("../../docs/getting-started.md")]
    struct GettingStarted;

    #[cfg(feature = "testing")]
    #[doc = include_str!("../../docs/commands.md")]
    struct Commands;

    #[cfg(feature = "testing")]
    #[doc = include_str!("../../docs/event-stores.md")]
    struct EventStores;

    #[doc = include_str!("../../docs/schema-evolution.md")]
    struct SchemaEvolution;

    #[doc = include_str!("../../docs/sagas.md")]
    struct Sagas;

    #[doc = include_str!("../../docs/limits.md")]
    struct Limits;

    #[cfg(feature = "distributed")]
    #[doc = include_str!("../../docs/distributed.md")]
    struct Distributed;

    #[doc = include_str!("../../docs/observability.md")]
    struct Observability;
}
