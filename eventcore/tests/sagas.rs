//! Process managers and sagas on the in-memory store: dispatch metadata and keys,
//! redelivery, forward steps, compensation in reverse order, durable timeouts on a
//! manual clock.

use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use eventcore::saga::{
    Clock, ManualClock, Saga, SagaContext, SagaEvent, SagaManager, SagaPhase, SagaState, SagaStep,
    SagaTimer, SagaTrigger, StepOutcome, StepStatus, saga_stream,
};
use eventcore::{
    CheckpointStore, Command, CommandExecutor, CommandLogic, CommandResult, CorrelationId,
    Dispatcher, Error, EventStore, ExecutionOptions, LogQuery, ProcessManager,
    ProcessManagerRunner, ProjectionErrorPolicy, ProjectionFilter, ProjectionName, ReadStreams,
    RecordedEvent, StoredEvent, StreamId, StreamResolver, StreamWrite, require,
};
use eventcore_memory::InMemoryEventStore;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, eventcore::Event)]
enum TripEvent {
    TripRequested { trip: String, refuse_car: bool },
    Booked { what: String },
    Cancelled { what: String },
    HotelAnswered { trip: String, ok: bool },
    Noted { n: u32 },
}

fn stream(name: impl AsRef<str>) -> StreamId {
    StreamId::try_new(name.as_ref().to_owned()).expect("valid stream id")
}

/// Appends its event, every time: not idempotent by itself.
#[derive(Command)]
struct Post {
    #[stream]
    stream: StreamId,
    event: TripEvent,
}

impl CommandLogic for Post {
    type State = ();
    type Event = TripEvent;

    fn apply(&self, _: &mut (), _: &StoredEvent<TripEvent>) {}

    fn handle(
        &self,
        read: ReadStreams<Self::StreamSet>,
        _: (),
        _: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, TripEvent>>> {
        Ok(vec![StreamWrite::new(
            &read,
            self.stream.clone(),
            self.event.clone(),
        )?])
    }
}

/// Books a resource once; refused when `refuse`.
#[derive(Command)]
struct Book {
    #[stream]
    resource: StreamId,
    what: String,
    refuse: bool,
}

impl CommandLogic for Book {
    type State = bool;
    type Event = TripEvent;

    fn apply(&self, booked: &mut bool, event: &StoredEvent<TripEvent>) {
        if let TripEvent::Booked { .. } = event.payload {
            *booked = true;
        }
    }

    fn handle(
        &self,
        read: ReadStreams<Self::StreamSet>,
        booked: bool,
        _: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, TripEvent>>> {
        require!(!self.refuse, "no {} available", self.what);
        if booked {
            return Ok(Vec::new());
        }
        let event = TripEvent::Booked {
            what: self.what.clone(),
        };
        Ok(vec![StreamWrite::new(&read, self.resource.clone(), event)?])
    }
}

/// Cancels a booking, every time it is asked: the saga must ask once.
#[derive(Command)]
struct Cancel {
    #[stream]
    resource: StreamId,
    what: String,
}

impl CommandLogic for Cancel {
    type State = ();
    type Event = TripEvent;

    fn apply(&self, _: &mut (), _: &StoredEvent<TripEvent>) {}

    fn handle(
        &self,
        read: ReadStreams<Self::StreamSet>,
        _: (),
        _: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, TripEvent>>> {
        let event = TripEvent::Cancelled {
            what: self.what.clone(),
        };
        Ok(vec![StreamWrite::new(&read, self.resource.clone(), event)?])
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TripInput {
    trip: String,
    refuse_car: bool,
}

/// Flight, then a hotel that answers by event (or times out after 10 s), then a car.
struct Trip;

impl Saga for Trip {
    type Input = TripInput;
    type Event = TripEvent;

    fn name(&self) -> &str {
        "trip"
    }

    fn steps(&self) -> Vec<SagaStep> {
        vec![
            SagaStep::new("flight"),
            SagaStep::new("hotel").with_timeout(Duration::from_secs(10)),
            SagaStep::new("car"),
        ]
    }

    fn listens_to(&self) -> Vec<String> {
        vec!["TripRequested".to_owned(), "HotelAnswered".to_owned()]
    }

    fn on_event(&self, event: &StoredEvent<TripEvent>) -> Option<SagaTrigger<TripInput>> {
        match &event.payload {
            TripEvent::TripRequested { trip, refuse_car } => Some(SagaTrigger::Start {
                instance: trip.clone(),
                input: TripInput {
                    trip: trip.clone(),
                    refuse_car: *refuse_car,
                },
            }),
            TripEvent::HotelAnswered { trip, ok } => Some(SagaTrigger::Reply {
                instance: trip.clone(),
                step: "hotel".to_owned(),
                outcome: if *ok {
                    StepOutcome::Succeeded
                } else {
                    StepOutcome::Failed("hotel full".to_owned())
                },
            }),
            _ => None,
        }
    }

    async fn perform(
        &self,
        step: &str,
        saga: SagaContext<'_, TripInput>,
        dispatcher: &mut Dispatcher<'_>,
    ) -> eventcore::Result<StepOutcome> {
        let trip = &saga.input.trip;
        let command = Book {
            resource: stream(format!("{step}-{trip}")),
            what: step.to_owned(),
            refuse: step == "car" && saga.input.refuse_car,
        };
        let outcome = StepOutcome::from_execution(dispatcher.dispatch(&command).await)?;
        Ok(match (step, outcome) {
            ("hotel", StepOutcome::Succeeded) => StepOutcome::Pending,
            (_, outcome) => outcome,
        })
    }

    async fn compensate(
        &self,
        step: &str,
        saga: SagaContext<'_, TripInput>,
        dispatcher: &mut Dispatcher<'_>,
    ) -> eventcore::Result<()> {
        let command = Cancel {
            resource: stream(format!("{step}-{}", saga.input.trip)),
            what: step.to_owned(),
        };
        dispatcher.dispatch(&command).await?;
        Ok(())
    }
}

struct World {
    store: InMemoryEventStore,
    executor: CommandExecutor,
    clock: ManualClock,
    manager: ProcessManagerRunner<SagaManager<Trip>>,
    timer: SagaTimer,
}

fn start_time() -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0)
        .single()
        .expect("valid")
}

impl World {
    fn new() -> Self {
        Self::over(InMemoryEventStore::new(), ManualClock::new(start_time()))
    }

    /// The services over an existing store and clock, as after a restart.
    fn over(store: InMemoryEventStore, clock: ManualClock) -> Self {
        let executor = CommandExecutor::new(store.clone());
        let shared: Arc<dyn Clock> = Arc::new(clock.clone());
        let manager = ProcessManagerRunner::new(
            SagaManager::new(Trip, Arc::clone(&shared)).expect("valid saga"),
            executor.clone(),
            Arc::new(store.clone()),
        )
        .with_error_policy(ProjectionErrorPolicy::new().with_max_attempts(1));
        let timer = SagaTimer::new("trip", executor.clone(), shared).expect("valid timer");
        World {
            store,
            executor,
            clock,
            manager,
            timer,
        }
    }

    /// The manager parks an event it cannot handle instead of stopping.
    fn park_failures(&mut self) {
        let shared: Arc<dyn Clock> = Arc::new(self.clock.clone());
        self.manager = ProcessManagerRunner::new(
            SagaManager::new(Trip, shared).expect("valid saga"),
            self.executor.clone(),
            Arc::new(self.store.clone()),
        )
        .with_error_policy(
            ProjectionErrorPolicy::new()
                .with_max_attempts(1)
                .with_on_failure(eventcore::OnFailure::Park),
        );
    }

    /// A step event written by hand that does not decode, in a saga stream of its own;
    /// returns its position.
    async fn write_unreadable_step(&self) -> eventcore::GlobalPosition {
        let bogus = eventcore::EventData::new(
            eventcore::EventType::try_new("eventcore.SagaStepStarted").expect("valid"),
            eventcore::EventPayload::from_json(r#"{"Nonsense":{"step":"one"}}"#).expect("JSON"),
            eventcore::EventMetadata::default(),
        );
        let outcome = self
            .store
            .append(eventcore::AppendRequest::single(
                stream("saga/trip/by-hand"),
                eventcore::ExpectedVersion::NoStream,
                vec![bogus],
            ))
            .await
            .expect("stored");
        outcome.events[0].global_position
    }

    async fn post(&self, stream_name: &str, event: TripEvent) {
        self.executor
            .execute(&Post {
                stream: stream(stream_name),
                event,
            })
            .await
            .expect("posted");
    }

    async fn request(&self, trip: &str, refuse_car: bool) {
        self.post(
            &format!("requests-{trip}"),
            TripEvent::TripRequested {
                trip: trip.to_owned(),
                refuse_car,
            },
        )
        .await;
    }

    async fn answer_hotel(&self, trip: &str, ok: bool) {
        self.post(
            &format!("hotel-answers-{trip}"),
            TripEvent::HotelAnswered {
                trip: trip.to_owned(),
                ok,
            },
        )
        .await;
    }

    async fn settle(&mut self) {
        loop {
            let handled = self.manager.catch_up().await.expect("manager").applied;
            let read = self.timer.catch_up().await.expect("timer") as u64;
            let fired = self.timer.fire_due().await.expect("timer") as u64;
            if handled + read + fired == 0 {
                return;
            }
        }
    }

    async fn saga(&self, trip: &str) -> SagaState {
        SagaState::load(&self.executor, &saga_stream("trip", trip).expect("valid"))
            .await
            .expect("saga")
    }

    async fn log(&self) -> Vec<RecordedEvent> {
        self.store
            .read_all(&LogQuery::new().with_limit(100_000))
            .await
            .expect("log")
    }

    /// The booking and cancellation events, in log order, as `Booked flight` etc.
    async fn bookings(&self) -> Vec<String> {
        self.log()
            .await
            .iter()
            .filter_map(|e| match e.decode::<TripEvent>().ok()?.payload {
                TripEvent::Booked { what } => Some(format!("Booked {what}")),
                TripEvent::Cancelled { what } => Some(format!("Cancelled {what}")),
                _ => None,
            })
            .collect()
    }
}

#[tokio::test]
async fn every_step_succeeds_and_the_saga_completes() {
    let mut world = World::new();
    world.request("t1", false).await;
    world.settle().await;
    let saga = world.saga("t1").await;
    assert_eq!(
        saga.phase(),
        SagaPhase::Running { step: 1 },
        "waits for the hotel"
    );
    assert_eq!(world.timer.pending(), 1);

    world.answer_hotel("t1", true).await;
    world.settle().await;
    let saga = world.saga("t1").await;
    assert_eq!(saga.phase(), SagaPhase::Completed);
    assert_eq!(
        world.timer.pending(),
        0,
        "an answered step has no deadline left"
    );
    assert_eq!(
        world.bookings().await,
        ["Booked flight", "Booked hotel", "Booked car"]
    );
}

#[tokio::test]
async fn a_refused_step_compensates_the_earlier_steps_in_reverse_order() {
    let mut world = World::new();
    world.request("t2", true).await;
    world.settle().await;
    world.answer_hotel("t2", true).await;
    world.settle().await;
    let saga = world.saga("t2").await;
    assert_eq!(saga.phase(), SagaPhase::Aborted);
    assert!(
        saga.failure()
            .is_some_and(|f| f.contains("no car available"))
    );
    assert_eq!(
        saga.status_of("car"),
        Some(&StepStatus::Failed("no car available".to_owned()))
    );
    assert_eq!(saga.status_of("hotel"), Some(&StepStatus::Compensated));
    assert_eq!(saga.status_of("flight"), Some(&StepStatus::Compensated));
    // The refused step had nothing to undo; the others are undone latest first.
    assert_eq!(
        world.bookings().await,
        [
            "Booked flight",
            "Booked hotel",
            "Cancelled hotel",
            "Cancelled flight"
        ]
    );
}

#[tokio::test]
async fn a_refusal_by_event_compensates_too() {
    let mut world = World::new();
    world.request("t3", false).await;
    world.settle().await;
    world.answer_hotel("t3", false).await;
    world.settle().await;
    let saga = world.saga("t3").await;
    assert_eq!(saga.phase(), SagaPhase::Aborted);
    assert_eq!(saga.failure(), Some("hotel full"));
    assert_eq!(
        world.bookings().await,
        ["Booked flight", "Booked hotel", "Cancelled flight"]
    );
}

#[tokio::test]
async fn a_step_past_its_deadline_times_out_and_is_compensated_first() {
    let mut world = World::new();
    world.request("t4", false).await;
    world.settle().await;

    world.clock.advance(Duration::from_secs(9));
    world.settle().await;
    assert_eq!(
        world.timer.fire_due().await.expect("fire"),
        0,
        "not yet due"
    );
    assert!(matches!(
        world.saga("t4").await.status_of("hotel"),
        Some(StepStatus::Running { .. })
    ));

    world.clock.advance(Duration::from_secs(1));
    world.settle().await;
    let saga = world.saga("t4").await;
    assert_eq!(saga.phase(), SagaPhase::Aborted);
    assert!(
        saga.failure()
            .is_some_and(|f| f.contains("hotel") && f.contains("2026-01-01T12:00:10Z"))
    );
    // Its outcome is unknown, so the hotel is undone as well, first.
    assert_eq!(
        world.bookings().await,
        [
            "Booked flight",
            "Booked hotel",
            "Cancelled hotel",
            "Cancelled flight"
        ]
    );

    // The answer comes late, twice: the saga does not move.
    let before = world.log().await.len();
    world.answer_hotel("t4", true).await;
    world.answer_hotel("t4", true).await;
    world.settle().await;
    assert_eq!(
        world.log().await.len(),
        before + 2,
        "only the two answers were written"
    );
    assert_eq!(world.saga("t4").await.phase(), SagaPhase::Aborted);
}

#[tokio::test]
async fn deadlines_survive_a_restart() {
    let mut world = World::new();
    world.request("t5", false).await;
    world.settle().await;
    let (store, clock) = (world.store.clone(), world.clock.clone());
    drop(world);

    clock.advance(Duration::from_secs(60));
    let mut restarted = World::over(store, clock);
    assert_eq!(
        restarted.timer.pending(),
        0,
        "nothing known before reading the log"
    );
    restarted.settle().await;
    assert_eq!(restarted.saga("t5").await.phase(), SagaPhase::Aborted);
    assert_eq!(
        restarted.bookings().await,
        [
            "Booked flight",
            "Booked hotel",
            "Cancelled hotel",
            "Cancelled flight"
        ]
    );
}

#[tokio::test]
async fn duplicate_answers_and_redelivery_change_nothing() {
    let mut world = World::new();
    world.request("t6", false).await;
    world.request("t6", false).await;
    world.settle().await;
    world.answer_hotel("t6", true).await;
    world.answer_hotel("t6", true).await;
    world.settle().await;
    assert_eq!(world.saga("t6").await.phase(), SagaPhase::Completed);
    let saga_events = world
        .log()
        .await
        .iter()
        .filter(|e| e.stream_id.as_str().starts_with("saga/"))
        .count();
    assert_eq!(
        saga_events,
        1 + 3 * 2 + 1,
        "started, 3 steps started+succeeded, completed"
    );

    // Every event handed over again: the manager's dispatches are found by key.
    let head = world.store.head_position().await.expect("head");
    world
        .store
        .reset_checkpoint(&ProjectionName::from_static("trip"))
        .await
        .expect("reset");
    let mut restarted = World::over(world.store.clone(), world.clock.clone());
    restarted.settle().await;
    assert_eq!(restarted.store.head_position().await.expect("head"), head);
}

#[tokio::test]
async fn the_timer_follows_the_log_live_and_fires_on_the_clock() {
    let mut world = World::new();
    let mut timer = SagaTimer::new(
        "trip",
        world.executor.clone(),
        Arc::new(world.clock.clone()),
    )
    .expect("timer");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(async move {
        timer
            .run(async {
                let _ = stopped.await;
            })
            .await
    });
    world.request("t7", false).await;
    world.manager.catch_up().await.expect("manager");
    let stream = saga_stream("trip", "t7").expect("valid");
    let hotel_started = world.store.head_position().await.expect("head");
    world.clock.advance(Duration::from_secs(11));
    // The live timer sees the deadline pass and times the step out: wait for its event.
    let guard = tokio::time::timeout(Duration::from_secs(60), async {
        let mut after = hotel_started;
        loop {
            world.store.wait_for_events(after).await.expect("wait");
            let batch = world
                .store
                .read_all(&LogQuery::new().with_after(after).with_limit(100))
                .await
                .expect("read");
            for event in &batch {
                if event.stream_id == stream
                    && matches!(
                        event.decode::<SagaEvent>().map(|e| e.payload),
                        Ok(SagaEvent::StepTimedOut { step: 1, .. })
                    )
                {
                    return;
                }
            }
            after = batch.last().map(|e| e.global_position).or(after);
        }
    })
    .await;
    assert!(guard.is_ok(), "the live timer never timed the step out");
    stop.send(()).expect("timer running");
    running
        .await
        .expect("joined")
        .expect("the timer ran without error");
}

#[tokio::test]
async fn a_manual_clock_wakes_sleepers_only_when_advanced_far_enough() {
    let clock = ManualClock::new(start_time());
    let deadline = start_time() + chrono::Duration::seconds(5);
    let mut sleeping = Box::pin(clock.sleep_until(deadline));
    assert!(futures::poll!(&mut sleeping).is_pending());
    clock.advance(Duration::from_secs(4));
    assert!(futures::poll!(&mut sleeping).is_pending());
    clock.set(start_time());
    assert_eq!(
        clock.now(),
        start_time() + chrono::Duration::seconds(4),
        "never back"
    );
    clock.advance(Duration::from_secs(1));
    assert!(futures::poll!(&mut sleeping).is_ready());
}

#[tokio::test]
async fn invalid_saga_definitions_are_typed_errors() {
    struct Twice;
    impl Saga for Twice {
        type Input = ();
        type Event = TripEvent;
        fn name(&self) -> &str {
            "twice"
        }
        fn steps(&self) -> Vec<SagaStep> {
            vec![SagaStep::new("a"), SagaStep::new("a")]
        }
        fn listens_to(&self) -> Vec<String> {
            Vec::new()
        }
        fn on_event(&self, _: &StoredEvent<TripEvent>) -> Option<SagaTrigger<()>> {
            None
        }
        async fn perform(
            &self,
            _: &str,
            _: SagaContext<'_, ()>,
            _: &mut Dispatcher<'_>,
        ) -> eventcore::Result<StepOutcome> {
            Ok(StepOutcome::Succeeded)
        }
        async fn compensate(
            &self,
            _: &str,
            _: SagaContext<'_, ()>,
            _: &mut Dispatcher<'_>,
        ) -> eventcore::Result<()> {
            Ok(())
        }
    }
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::default());
    assert!(matches!(
        SagaManager::new(Twice, Arc::clone(&clock)),
        Err(Error::InvalidSaga { .. })
    ));
    let long = "x".repeat(191);
    let executor = CommandExecutor::new(InMemoryEventStore::new());
    assert!(matches!(
        SagaTimer::new(&long, executor.clone(), Arc::clone(&clock)),
        Err(Error::InvalidProjectionName(_))
    ));
    assert!(matches!(
        SagaTimer::new("bad\nname", executor.clone(), Arc::clone(&clock)),
        Err(Error::InvalidProjectionName(_))
    ));
    // `saga/a/b/1` must belong to one saga only.
    assert!(matches!(
        SagaTimer::new("a/b", executor, clock),
        Err(Error::InvalidSaga { .. })
    ));
}

/// Notes every `TripRequested` twice, with a command that is not idempotent by itself.
struct Notary {
    name: String,
}

impl ProcessManager for Notary {
    type Event = TripEvent;

    fn name(&self) -> &str {
        &self.name
    }

    fn filter(&self) -> ProjectionFilter {
        ProjectionFilter::all()
            .with_event_types(["TripRequested"])
            .expect("valid")
    }

    async fn handle(
        &mut self,
        event: &StoredEvent<TripEvent>,
        dispatcher: &mut Dispatcher<'_>,
    ) -> eventcore::Result<()> {
        for n in 0..2 {
            dispatcher
                .dispatch(&Post {
                    stream: stream("notes"),
                    event: TripEvent::Noted { n },
                })
                .await?;
        }
        assert_eq!(dispatcher.cause(), event.event_id);
        Ok(())
    }
}

#[tokio::test]
async fn dispatched_commands_carry_the_cause_and_are_not_repeated_on_redelivery() {
    let store = InMemoryEventStore::new();
    let executor = CommandExecutor::new(store.clone());
    let correlation = CorrelationId::new();
    let requested = executor
        .execute_with(
            &Post {
                stream: stream("requests"),
                event: TripEvent::TripRequested {
                    trip: "n1".to_owned(),
                    refuse_car: false,
                },
            },
            ExecutionOptions::new().with_correlation_id(correlation),
        )
        .await
        .expect("posted");
    let cause = requested.events_written[0].event_id;

    let notary = || Notary {
        name: "notary".to_owned(),
    };
    let mut runner = ProcessManagerRunner::new(notary(), executor.clone(), Arc::new(store.clone()));
    assert_eq!(runner.catch_up().await.expect("ran").applied, 1);
    let notes = store
        .read_streams(&[stream("notes")])
        .await
        .expect("read")
        .events;
    assert_eq!(notes.len(), 2, "two dispatches, two distinct keys");
    for note in &notes {
        assert_eq!(note.metadata.causation_id, Some(cause.into()));
        assert_eq!(note.metadata.correlation_id, correlation);
        assert_eq!(note.metadata.actor.as_deref(), Some("notary"));
    }

    // A crash before the checkpoint was saved: the event is handed over again.
    store
        .reset_checkpoint(&ProjectionName::from_static("notary"))
        .await
        .expect("reset");
    let head = store.head_position().await.expect("head");
    let mut again = ProcessManagerRunner::new(notary(), executor.clone(), Arc::new(store.clone()));
    assert_eq!(again.catch_up().await.expect("ran").applied, 1);
    assert_eq!(
        store.head_position().await.expect("head"),
        head,
        "nothing written twice"
    );

    // Another manager reacting to the same event has keys of its own.
    let mut other = ProcessManagerRunner::new(
        Notary {
            name: "second-notary".to_owned(),
        },
        executor,
        Arc::new(store.clone()),
    );
    other.catch_up().await.expect("ran");
    let notes = store
        .read_streams(&[stream("notes")])
        .await
        .expect("read")
        .events;
    assert_eq!(notes.len(), 4);
}

#[tokio::test]
async fn a_process_manager_name_too_long_for_its_keys_is_refused() {
    let store = InMemoryEventStore::new();
    let executor = CommandExecutor::new(store.clone());
    let mut runner = ProcessManagerRunner::new(
        Notary {
            name: "n".repeat(eventcore::MAX_PROCESS_MANAGER_NAME_LEN + 1),
        },
        executor,
        Arc::new(store),
    );
    assert!(matches!(
        runner.catch_up().await,
        Err(Error::InvalidProjectionName(_))
    ));
}

/// A step event in a saga stream that does not decode (written by hand, or damaged in
/// storage) does not stop the timer: it is listed and passed, and every other
/// instance's deadline is still kept and fired.
#[tokio::test]
async fn an_undecodable_step_event_does_not_stop_the_timer() {
    let mut world = World::new();
    // The manager, which also reads step events, parks it by its policy (with Stop it
    // stops there, naming it, with serde's reason).
    world.park_failures();
    let unreadable = world.write_unreadable_step().await;
    world.request("t9", false).await;
    world.settle().await;
    assert_eq!(world.timer.unreadable(), [unreadable], "listed, not hidden");
    assert_eq!(
        world.timer.pending(),
        1,
        "the real instance's deadline is kept"
    );
    let parked = world
        .store
        .parked(&ProjectionName::from_static("trip"))
        .await
        .expect("parked");
    assert_eq!(parked.len(), 1);
    assert!(
        parked[0].error.contains("unknown variant"),
        "{}",
        parked[0].error
    );

    world.clock.advance(Duration::from_secs(11));
    world.settle().await;
    let saga = world.saga("t9").await;
    assert_eq!(world.timer.pending(), 0, "the deadline fired");
    assert!(
        !matches!(saga.phase(), SagaPhase::Running { step: 1 }),
        "the hotel step timed out: {:?}",
        saga.phase()
    );
}

#[tokio::test]
async fn a_timer_with_a_low_water_mark_resumes_from_its_oldest_pending_step() {
    let mut world = World::new();
    // Trips that complete, one left waiting for its hotel, more that complete.
    for i in 0..20 {
        world.request(&format!("early-{i}"), false).await;
        world.settle().await;
        world.answer_hotel(&format!("early-{i}"), true).await;
        world.settle().await;
    }
    world.request("waiting", false).await;
    world.settle().await;
    for i in 0..5 {
        world.request(&format!("late-{i}"), false).await;
        world.settle().await;
        world.answer_hotel(&format!("late-{i}"), true).await;
        world.settle().await;
    }
    // The step events from the waiting trip's hotel step on: what a restart must read.
    let waiting = saga_stream("trip", "waiting").expect("valid");
    let log = world.log().await;
    let step_event = |e: &RecordedEvent| {
        e.stream_id.as_str().starts_with("saga/trip/")
            && matches!(
                e.decode::<SagaEvent>().map(|e| e.payload),
                Ok(SagaEvent::StepStarted { .. }
                    | SagaEvent::StepSucceeded { .. }
                    | SagaEvent::StepFailed { .. }
                    | SagaEvent::StepTimedOut { .. })
            )
    };
    let hotel_started = log
        .iter()
        .find(|e| {
            e.stream_id == waiting
                && matches!(
                    e.decode::<SagaEvent>().map(|e| e.payload),
                    Ok(SagaEvent::StepStarted { step: 1, .. })
                )
        })
        .expect("the waiting trip's hotel step started")
        .global_position;
    let all_steps = log.iter().filter(|e| step_event(e)).count();
    let from_waiting = log
        .iter()
        .filter(|e| step_event(e) && e.global_position >= hotel_started)
        .count();
    assert!(
        from_waiting < all_steps / 2,
        "{from_waiting} of {all_steps}"
    );

    let checkpoints: Arc<dyn CheckpointStore> = Arc::new(world.store.clone());
    let (executor, clock) = (world.executor.clone(), world.clock.clone());
    let timer = || {
        SagaTimer::new("trip", executor.clone(), Arc::new(clock.clone()))
            .expect("timer")
            .with_low_water_mark(Arc::clone(&checkpoints))
    };
    // The first timer has no mark yet: it reads every step event, and saves its mark.
    let mut first = timer();
    assert_eq!(first.catch_up().await.expect("catch up"), all_steps);
    assert_eq!(first.pending(), 1);
    drop(first);

    // Restarted, it reads from the waiting step on, and still times it out.
    let mut restarted = timer();
    assert_eq!(restarted.catch_up().await.expect("catch up"), from_waiting);
    assert_eq!(restarted.pending(), 1);
    world.clock.advance(Duration::from_secs(60));
    assert_eq!(restarted.fire_due().await.expect("fire"), 1);
    // The manager compensates the timed-out trip.
    world.settle().await;
    restarted.catch_up().await.expect("catch up");
    assert_eq!(restarted.pending(), 0);
    assert_eq!(world.saga("waiting").await.phase(), SagaPhase::Aborted);

    // Nothing pending: the mark passed every step event; the next start reads none.
    let mut again = timer();
    assert_eq!(again.catch_up().await.expect("catch up"), 0);
    assert_eq!(again.pending(), 0);
}

#[tokio::test]
async fn a_low_water_mark_never_passes_an_unreadable_step_event() {
    let mut world = World::new();
    // The manager parks the unreadable event, as in the test above.
    world.park_failures();
    world.request("before", false).await;
    world.settle().await;
    world.answer_hotel("before", true).await;
    world.settle().await;
    let unreadable = world.write_unreadable_step().await;
    world.request("after", false).await;
    world.settle().await;
    world.answer_hotel("after", true).await;
    world.settle().await;

    let checkpoints: Arc<dyn CheckpointStore> = Arc::new(world.store.clone());
    let (executor, clock) = (world.executor.clone(), world.clock.clone());
    let timer = || {
        SagaTimer::new("trip", executor.clone(), Arc::new(clock.clone()))
            .expect("timer")
            .with_low_water_mark(Arc::clone(&checkpoints))
    };
    let mut first = timer();
    first.catch_up().await.expect("catch up");
    assert_eq!(first.unreadable(), [unreadable]);
    assert_eq!(first.pending(), 0);
    // Nothing is pending, but the mark stays before the event the timer could not read:
    // a restart (a fixed decoder, a newer version) reads it again.
    let mut restarted = timer();
    let read = restarted.catch_up().await.expect("catch up");
    assert_eq!(
        restarted.unreadable(),
        [unreadable],
        "read again, reported again"
    );
    assert!(read > 0);
    assert_eq!(
        world
            .store
            .load_checkpoint(&ProjectionName::from_static("trip/timer"))
            .await
            .expect("load"),
        Some(eventcore::GlobalPosition::new(unreadable.value() - 1))
    );
}
