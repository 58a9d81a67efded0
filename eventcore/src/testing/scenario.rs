//! Given/when/then for command logic, without a store.

use std::fmt::Debug;
use std::sync::Arc;

use chrono::Utc;

use crate::error::{Error, Result};
use crate::event::{EventData, RecordedEvent, StoredEvent};
use crate::executor::decide;
use crate::metadata::EventMetadata;
use crate::types::{GlobalPosition, StreamId, StreamVersion};
use crate::{CommandExecutor, CommandLogic, Event};

/// Given events on streams, when a command runs, then these events (or this error).
///
/// The command runs exactly as in the [`CommandExecutor`]: declared streams are read,
/// events are folded in global order, streams requested through the
/// [`crate::StreamResolver`] are read and the command decides again. Every event goes
/// through JSON both ways, as it would through a store, so serde mistakes show up here.
///
/// # Examples
///
/// ```
/// # use eventcore::{Command, CommandLogic, CommandResult, ReadStreams, StoredEvent, StreamId, StreamResolver, StreamWrite, require};
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, eventcore::Event)]
/// # enum Counter { Incremented }
/// # #[derive(Command)]
/// # struct Increment { #[stream] counter: StreamId, max: usize }
/// # impl CommandLogic for Increment {
/// #     type State = usize;
/// #     type Event = Counter;
/// #     fn apply(&self, n: &mut usize, _: &StoredEvent<Counter>) { *n += 1; }
/// #     fn handle(&self, streams: ReadStreams<Self::StreamSet>, n: usize, _: &mut StreamResolver)
/// #         -> CommandResult<Vec<StreamWrite<Self::StreamSet, Counter>>> {
/// #         require!(n < self.max, "counter is at its maximum");
/// #         Ok(vec![StreamWrite::new(&streams, self.counter.clone(), Counter::Incremented)?])
/// #     }
/// # }
/// use eventcore::testing::CommandScenario;
///
/// let counter = StreamId::try_new("counter-1")?;
/// CommandScenario::new()
///     .given(&counter, [Counter::Incremented])
///     .when(&Increment { counter: counter.clone(), max: 2 })
///     .then_events([(counter.clone(), Counter::Incremented)]);
///
/// CommandScenario::new()
///     .given(&counter, [Counter::Incremented, Counter::Incremented])
///     .when(&Increment { counter, max: 2 })
///     .then_business_rule_violation("maximum");
/// # Ok::<(), eventcore::Error>(())
/// ```
#[derive(Debug)]
pub struct CommandScenario<E> {
    given: Vec<(StreamId, E)>,
    max_stream_resolutions: u32,
}

impl<E: Event> CommandScenario<E> {
    /// A scenario with no events yet.
    pub fn new() -> Self {
        CommandScenario {
            given: Vec::new(),
            max_stream_resolutions: CommandExecutor::DEFAULT_MAX_STREAM_RESOLUTIONS,
        }
    }

    /// Events already stored on `stream`, in order (after any given before).
    pub fn given(mut self, stream: &StreamId, events: impl IntoIterator<Item = E>) -> Self {
        self.given
            .extend(events.into_iter().map(|event| (stream.clone(), event)));
        self
    }

    /// Runs `command` against the given events.
    pub fn when<C: CommandLogic<Event = E>>(self, command: &C) -> ScenarioOutcome<E> {
        ScenarioOutcome {
            result: self.run(command),
        }
    }

    fn run<C: CommandLogic<Event = E>>(self, command: &C) -> Result<Vec<(StreamId, E)>> {
        let stored = self.store()?;
        let mut streams = command.read_streams();
        let mut unique = std::collections::HashSet::new();
        streams.retain(|s| unique.insert(s.clone()));
        let mut rounds = 0;
        loop {
            let events = stored
                .iter()
                .filter(|event| streams.contains(&event.stream_id))
                .map(RecordedEvent::decode::<E>)
                .collect::<Result<Vec<StoredEvent<E>>>>()?;
            let decision = decide(command, &streams, &events)?;
            if decision.more_streams.is_empty() {
                return decision
                    .writes
                    .into_iter()
                    .map(|write| {
                        let (stream, event) = write.into_parts();
                        let data = EventData::from_event(&event, EventMetadata::default())?;
                        let recorded = record(&stream, 0, 0, data);
                        Ok((stream, recorded.decode::<E>()?.payload))
                    })
                    .collect();
            }
            rounds += 1;
            if rounds > self.max_stream_resolutions {
                return Err(Error::TooManyStreamResolutions {
                    limit: self.max_stream_resolutions,
                });
            }
            streams.extend(decision.more_streams);
        }
    }

    /// The given events serialized and numbered as a store would number them.
    fn store(&self) -> Result<Vec<RecordedEvent>> {
        let mut versions: std::collections::HashMap<&StreamId, u64> = Default::default();
        self.given
            .iter()
            .enumerate()
            .map(|(index, (stream, event))| {
                let version = versions.entry(stream).or_default();
                *version += 1;
                let data = EventData::from_event(event, EventMetadata::default())?;
                Ok(record(stream, *version, index as u64 + 1, data))
            })
            .collect()
    }
}

impl<E: Event> Default for CommandScenario<E> {
    fn default() -> Self {
        Self::new()
    }
}

fn record(stream: &StreamId, version: u64, position: u64, data: EventData) -> RecordedEvent {
    RecordedEvent::new(
        data.event_id,
        stream.clone(),
        StreamVersion::new(version),
        GlobalPosition::new(position),
        data.event_type,
        data.payload,
        Arc::new(data.metadata),
        Utc::now(),
    )
}

/// What a [`CommandScenario`] produced; assert on it with the `then_*` methods.
#[derive(Debug)]
pub struct ScenarioOutcome<E> {
    result: Result<Vec<(StreamId, E)>>,
}

impl<E: PartialEq + Debug> ScenarioOutcome<E> {
    /// Asserts the command wrote exactly these events, to these streams, in this order.
    ///
    /// # Panics
    ///
    /// When the command failed or wrote something else.
    #[track_caller]
    pub fn then_events(self, expected: impl IntoIterator<Item = (StreamId, E)>) {
        let expected: Vec<(StreamId, E)> = expected.into_iter().collect();
        match self.result {
            Ok(written) => assert_eq!(written, expected, "the command wrote other events"),
            Err(error) => panic!("expected events {expected:?}, the command failed: {error}"),
        }
    }

    /// Asserts the command succeeded and wrote nothing.
    ///
    /// # Panics
    ///
    /// When the command failed or wrote events.
    #[track_caller]
    pub fn then_no_events(self) {
        self.then_events([]);
    }

    /// Asserts the command failed with an error for which `check` holds.
    ///
    /// # Panics
    ///
    /// When the command succeeded or `check` returned `false`.
    #[track_caller]
    pub fn then_error(self, check: impl FnOnce(&Error) -> bool) {
        match self.result {
            Ok(written) => panic!("expected an error, the command wrote {written:?}"),
            Err(error) => assert!(check(&error), "unexpected error: {error:?}"),
        }
    }

    /// Asserts the command was refused by a business rule whose message contains
    /// `fragment`.
    ///
    /// # Panics
    ///
    /// When the command succeeded or failed otherwise.
    #[track_caller]
    pub fn then_business_rule_violation(self, fragment: &str) {
        match self.result {
            Err(Error::BusinessRuleViolation(message)) => assert!(
                message.contains(fragment),
                "business rule message {message:?} does not contain {fragment:?}"
            ),
            other => panic!("expected a business rule violation, got {other:?}"),
        }
    }

    /// The raw result, for assertions the helpers do not cover.
    pub fn into_result(self) -> Result<Vec<(StreamId, E)>> {
        self.result
    }
}
