//! The backend conformance suite: what every [`EventStore`] must do, as generic async
//! checks that panic on a violation.
//!
//! Each check takes a fresh, empty store. Instantiate them all with
//! [`crate::event_store_conformance_tests!`].

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{
    AppendOutcome, AppendRequest, CorrelationId, Error, Event, EventData, EventId, EventMetadata,
    EventPayload, EventStore, EventType, ExpectedVersion, GlobalPosition, IdempotencyKey, LogQuery,
    RecordedEvent, StreamAppend, StreamId, StreamVersion,
};

/// The event type the checks write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ConformanceEvent {
    /// A number.
    Added {
        /// The number.
        value: i64,
    },
    /// A text.
    Noted {
        /// The text.
        text: String,
    },
}

impl Event for ConformanceEvent {
    fn event_type(&self) -> &'static str {
        match self {
            ConformanceEvent::Added { .. } => "Added",
            ConformanceEvent::Noted { .. } => "Noted",
        }
    }
}

use super::HANG_GUARD;

/// How long a wait that must not complete is watched before concluding it is pending.
/// A correct store never completes it, whatever the time; a store that wrongly returns at
/// once fails well within it.
pub(crate) const PENDING_WINDOW: Duration = Duration::from_millis(200);

fn stream(name: &str) -> StreamId {
    StreamId::try_new(name).expect("test stream ids are valid")
}

fn added(value: i64) -> EventData {
    EventData::from_event(&ConformanceEvent::Added { value }, EventMetadata::default())
        .expect("test events serialize")
}

fn noted(text: &str) -> EventData {
    EventData::from_event(
        &ConformanceEvent::Noted {
            text: text.to_owned(),
        },
        EventMetadata::default(),
    )
    .expect("test events serialize")
}

fn version(v: u64) -> StreamVersion {
    StreamVersion::new(v)
}

async fn append_to(
    store: &impl EventStore,
    stream_id: &StreamId,
    expected: ExpectedVersion,
    events: Vec<EventData>,
) -> crate::Result<AppendOutcome> {
    store
        .append(AppendRequest::single(stream_id.clone(), expected, events))
        .await
}

async fn read(
    store: &impl EventStore,
    stream_id: &StreamId,
) -> (Vec<RecordedEvent>, StreamVersion) {
    let snapshot = store
        .read_streams(std::slice::from_ref(stream_id))
        .await
        .expect("read_streams failed");
    let version = snapshot.version_of(stream_id);
    (snapshot.events, version)
}

async fn read_everything(store: &impl EventStore) -> Vec<RecordedEvent> {
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let batch = store
            .read_all(&LogQuery::after_opt(after).limit(1_000))
            .await
            .expect("read_all failed");
        let Some(last) = batch.last() else {
            return all;
        };
        after = Some(last.global_position);
        all.extend(batch);
    }
}

fn values(events: &[RecordedEvent]) -> Vec<i64> {
    events
        .iter()
        .map(
            |e| match e.decode::<ConformanceEvent>().expect("decodes").payload {
                ConformanceEvent::Added { value } => value,
                ConformanceEvent::Noted { .. } => i64::MIN,
            },
        )
        .collect()
}

fn assert_conflict(
    result: crate::Result<AppendOutcome>,
    expected: &[(StreamId, ExpectedVersion, u64)],
) {
    match result {
        Err(Error::VersionConflict { conflicts }) => {
            let got: Vec<(StreamId, ExpectedVersion, u64)> = conflicts
                .into_iter()
                .map(|c| (c.stream, c.expected, c.actual.value()))
                .collect();
            let mut got_sorted = got.clone();
            got_sorted.sort_by(|a, b| a.0.cmp(&b.0));
            let mut want = expected.to_vec();
            want.sort_by(|a, b| a.0.cmp(&b.0));
            assert_eq!(got_sorted, want, "conflict entries");
        }
        other => panic!("expected a VersionConflict, got {other:?}"),
    }
}

/// Payload, type, metadata (correlation, causation, actor, custom fields), id, stream,
/// version and position survive a write and a read, by stream and through the log.
pub async fn append_then_read_round_trips_payload_and_metadata(store: impl EventStore) {
    let s = stream("order-1");
    let metadata = EventMetadata::new(CorrelationId::new())
        .with_causation_id(EventId::new().into())
        .with_actor("user-7")
        .with_custom("tenant", "acme")
        .with_custom(
            "nested",
            serde_json::json!({"a": [1, 2, {"b": null}], "c": "ü✓"}),
        );
    let payload = ConformanceEvent::Noted {
        text: "quotes \" and unicode ✓ and newline \n".to_owned(),
    };
    let data = EventData::from_event(&payload, metadata.clone()).expect("serializes");
    let event_id = data.event_id;
    let outcome = append_to(&store, &s, ExpectedVersion::NoStream, vec![data])
        .await
        .expect("append");
    assert!(!outcome.deduplicated);
    assert_eq!(outcome.events.len(), 1);
    assert_eq!(outcome.events[0].event_id, event_id);
    assert_eq!(outcome.events[0].stream_id, s);
    assert_eq!(outcome.events[0].stream_version, version(1));

    let (events, v) = read(&store, &s).await;
    assert_eq!(v, version(1));
    assert_eq!(events.len(), 1);
    let stored = events[0].decode::<ConformanceEvent>().expect("decodes");
    assert_eq!(stored.payload, payload);
    assert_eq!(stored.metadata, metadata);
    assert_eq!(stored.event_id, event_id);
    assert_eq!(stored.stream_id, s);
    assert_eq!(stored.stream_version, version(1));
    assert_eq!(stored.global_position, outcome.events[0].global_position);
    assert_eq!(stored.event_type.as_str(), "Noted");
    // A recording time the append gives back is the one every read returns: the
    // executor folds its own writes into cached states with it.
    if let Some(at) = outcome.events[0].recorded_at {
        assert_eq!(stored.recorded_at, at);
    }

    let log = read_everything(&store).await;
    assert_eq!(log.len(), 1);
    assert_eq!(log[0], events[0]);
}

/// A stream nobody wrote reads as no events at version 0.
pub async fn missing_stream_reads_empty_at_version_zero(store: impl EventStore) {
    let (events, v) = read(&store, &stream("nobody-wrote-this")).await;
    assert!(events.is_empty());
    assert_eq!(v, StreamVersion::INITIAL);
    assert!(read_everything(&store).await.is_empty());
}

/// `read_streams_after` returns, in global order, only the events after each stream's
/// given version, and every stream's current version (also for streams with nothing
/// new, and for streams that do not exist).
pub async fn read_streams_after_returns_only_later_events_with_current_versions(
    store: impl EventStore,
) {
    let (a, b, quiet, none) = (
        stream("after-a"),
        stream("after-b"),
        stream("after-quiet"),
        stream("after-none"),
    );
    append_to(
        &store,
        &a,
        ExpectedVersion::NoStream,
        vec![added(1), added(2)],
    )
    .await
    .expect("append a");
    append_to(&store, &quiet, ExpectedVersion::NoStream, vec![added(10)])
        .await
        .expect("append quiet");
    append_to(&store, &b, ExpectedVersion::NoStream, vec![added(3)])
        .await
        .expect("append b");
    append_to(
        &store,
        &a,
        ExpectedVersion::Exact(version(2)),
        vec![added(4)],
    )
    .await
    .expect("append a again");
    append_to(
        &store,
        &b,
        ExpectedVersion::Exact(version(1)),
        vec![added(5)],
    )
    .await
    .expect("append b again");

    let snapshot = store
        .read_streams_after(&[
            (a.clone(), version(1)),
            (b.clone(), version(0)),
            (quiet.clone(), version(1)),
            (none.clone(), version(0)),
        ])
        .await
        .expect("read_streams_after failed");
    let got: Vec<(String, u64)> = snapshot
        .events
        .iter()
        .map(|e| (e.stream_id.as_str().to_owned(), e.stream_version.value()))
        .collect();
    assert_eq!(
        got,
        [
            ("after-a".to_owned(), 2),
            ("after-b".to_owned(), 1),
            ("after-a".to_owned(), 3),
            ("after-b".to_owned(), 2),
        ],
        "only the later events, in global order"
    );
    let positions: Vec<_> = snapshot.events.iter().map(|e| e.global_position).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(snapshot.version_of(&a), version(3));
    assert_eq!(snapshot.version_of(&b), version(2));
    assert_eq!(snapshot.version_of(&quiet), version(1));
    assert_eq!(snapshot.version_of(&none), version(0));

    // Past the end: nothing, and the stream's actual version.
    let only_versions = store
        .read_streams_after(&[
            (a.clone(), StreamVersion::new(u64::MAX)),
            (none.clone(), StreamVersion::new(u64::MAX)),
        ])
        .await
        .expect("read_streams_after failed");
    assert!(only_versions.events.is_empty());
    assert_eq!(only_versions.version_of(&a), version(3));
    assert_eq!(only_versions.version_of(&none), version(0));

    // After the current version: nothing, at that version.
    let current = store
        .read_streams_after(&[(a.clone(), version(3))])
        .await
        .expect("read_streams_after failed");
    assert!(current.events.is_empty());
    assert_eq!(current.version_of(&a), version(3));
}

/// `Exact(n)` succeeds at version n and fails, naming the stream, expected and actual
/// versions, at any other version.
pub async fn stale_expected_version_conflicts(store: impl EventStore) {
    let s = stream("account-1");
    append_to(
        &store,
        &s,
        ExpectedVersion::Exact(version(0)),
        vec![added(1)],
    )
    .await
    .expect("first append");
    append_to(
        &store,
        &s,
        ExpectedVersion::Exact(version(1)),
        vec![added(2), added(3)],
    )
    .await
    .expect("second append");
    let stale = append_to(
        &store,
        &s,
        ExpectedVersion::Exact(version(1)),
        vec![added(4)],
    )
    .await;
    assert_conflict(stale, &[(s.clone(), ExpectedVersion::Exact(version(1)), 3)]);
    let ahead = append_to(
        &store,
        &s,
        ExpectedVersion::Exact(version(7)),
        vec![added(4)],
    )
    .await;
    assert_conflict(ahead, &[(s.clone(), ExpectedVersion::Exact(version(7)), 3)]);
    let (events, v) = read(&store, &s).await;
    assert_eq!(v, version(3));
    assert_eq!(values(&events), vec![1, 2, 3]);
}

/// `NoStream` succeeds only on an empty stream.
pub async fn no_stream_expectation_requires_an_empty_stream(store: impl EventStore) {
    let s = stream("user-1");
    append_to(&store, &s, ExpectedVersion::NoStream, vec![added(1)])
        .await
        .expect("append to a new stream");
    let again = append_to(&store, &s, ExpectedVersion::NoStream, vec![added(2)]).await;
    assert_conflict(again, &[(s.clone(), ExpectedVersion::NoStream, 1)]);
    assert_eq!(read(&store, &s).await.1, version(1));
}

/// `Any` appends whatever the version, including to a new stream.
pub async fn any_expectation_appends_at_every_version(store: impl EventStore) {
    let s = stream("log-1");
    for i in 1..=3 {
        let outcome = append_to(&store, &s, ExpectedVersion::Any, vec![added(i)])
            .await
            .expect("append with Any");
        assert_eq!(outcome.events[0].stream_version, version(i as u64));
    }
    assert_eq!(values(&read(&store, &s).await.0), vec![1, 2, 3]);
}

/// One failed expectation fails the whole append: no stream gets any event, the head
/// does not move, and every stream that failed is named.
pub async fn conflict_leaves_every_stream_untouched(store: impl EventStore) {
    let (a, b, c) = (stream("a"), stream("b"), stream("c"));
    append_to(&store, &a, ExpectedVersion::NoStream, vec![added(1)])
        .await
        .expect("a");
    append_to(&store, &b, ExpectedVersion::NoStream, vec![added(2)])
        .await
        .expect("b");
    let head = store.head_position().await.expect("head");

    let request = AppendRequest::new()
        .with_stream(StreamAppend::new(
            a.clone(),
            ExpectedVersion::Exact(version(1)),
            vec![added(10)],
        ))
        .with_stream(StreamAppend::new(
            b.clone(),
            ExpectedVersion::Exact(version(0)),
            vec![added(20)],
        ))
        .with_stream(StreamAppend::new(
            c.clone(),
            ExpectedVersion::Exact(version(4)),
            vec![added(30)],
        ));
    assert_conflict(
        store.append(request).await,
        &[
            (b.clone(), ExpectedVersion::Exact(version(0)), 1),
            (c.clone(), ExpectedVersion::Exact(version(4)), 0),
        ],
    );
    assert_eq!(values(&read(&store, &a).await.0), vec![1]);
    assert_eq!(values(&read(&store, &b).await.0), vec![2]);
    assert_eq!(read(&store, &c).await, (Vec::new(), version(0)));
    assert_eq!(store.head_position().await.expect("head"), head);
    assert_eq!(read_everything(&store).await.len(), 2);
}

/// A stream that is only checked (no events) and moved since it was read fails the
/// append: no decision is committed on a stale read.
pub async fn read_only_participant_that_moved_fails_the_append(store: impl EventStore) {
    let (target, checked) = (stream("target"), stream("checked"));
    append_to(&store, &checked, ExpectedVersion::NoStream, vec![added(1)])
        .await
        .expect("setup");
    // Somebody writes to the checked stream after our read at version 1.
    append_to(
        &store,
        &checked,
        ExpectedVersion::Exact(version(1)),
        vec![added(2)],
    )
    .await
    .expect("concurrent write");
    let request = AppendRequest::new()
        .with_stream(StreamAppend::new(
            target.clone(),
            ExpectedVersion::NoStream,
            vec![added(9)],
        ))
        .with_stream(StreamAppend::check_only(
            checked.clone(),
            ExpectedVersion::Exact(version(1)),
        ));
    assert_conflict(
        store.append(request).await,
        &[(checked.clone(), ExpectedVersion::Exact(version(1)), 2)],
    );
    assert_eq!(read(&store, &target).await, (Vec::new(), version(0)));
}

/// A checked stream still at the version read lets the append succeed, and gets no event.
pub async fn read_only_participant_at_its_version_lets_the_append_succeed(store: impl EventStore) {
    let (target, checked, never) = (stream("target"), stream("checked"), stream("never-written"));
    append_to(&store, &checked, ExpectedVersion::NoStream, vec![added(1)])
        .await
        .expect("setup");
    let request = AppendRequest::new()
        .with_stream(StreamAppend::new(
            target.clone(),
            ExpectedVersion::NoStream,
            vec![added(9)],
        ))
        .with_stream(StreamAppend::check_only(
            checked.clone(),
            ExpectedVersion::Exact(version(1)),
        ))
        .with_stream(StreamAppend::check_only(
            never.clone(),
            ExpectedVersion::NoStream,
        ));
    let outcome = store.append(request).await.expect("append");
    assert_eq!(outcome.events.len(), 1);
    assert_eq!(outcome.events[0].stream_id, target);
    assert_eq!(read(&store, &checked).await.1, version(1));
    assert_eq!(read(&store, &never).await, (Vec::new(), version(0)));
    assert_eq!(values(&read(&store, &target).await.0), vec![9]);
}

/// An append over forty streams (twenty written with two events each, twenty only
/// checked) writes every event at the next versions of its stream, at positions
/// increasing in request order; one moved read-only stream among them fails it whole.
pub async fn an_append_over_many_streams_checks_and_writes_each(store: impl EventStore) {
    let written: Vec<StreamId> = (0..20).map(|i| stream(&format!("many-w-{i}"))).collect();
    let checked: Vec<StreamId> = (0..20).map(|i| stream(&format!("many-r-{i}"))).collect();
    for s in written.iter().chain(&checked) {
        append_to(&store, s, ExpectedVersion::NoStream, vec![added(0)])
            .await
            .expect("seed");
    }
    // Written streams expected at `at`, checked ones at 1 (`moved` at 2).
    let request = |at: u64, moved: Option<&StreamId>| {
        let mut streams: Vec<StreamAppend> = written
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let i = i as i64;
                StreamAppend::new(
                    s.clone(),
                    ExpectedVersion::Exact(version(at)),
                    vec![added(i * 2 + 1), added(i * 2 + 2)],
                )
            })
            .collect();
        streams.extend(checked.iter().map(|s| {
            let v = if Some(s) == moved { 2 } else { 1 };
            StreamAppend::check_only(s.clone(), ExpectedVersion::Exact(version(v)))
        }));
        AppendRequest {
            streams,
            idempotency_key: None,
        }
    };
    let outcome = store.append(request(1, None)).await.expect("append");
    assert_eq!(outcome.events.len(), 40);
    for (i, s) in written.iter().enumerate() {
        let versions: Vec<StreamVersion> = outcome
            .events
            .iter()
            .filter(|e| &e.stream_id == s)
            .map(|e| e.stream_version)
            .collect();
        assert_eq!(versions, vec![version(2), version(3)]);
        let (events, v) = read(&store, s).await;
        assert_eq!(v, version(3));
        let i = i as i64;
        assert_eq!(values(&events), vec![0, i * 2 + 1, i * 2 + 2]);
    }
    assert!(
        outcome
            .events
            .windows(2)
            .all(|w| w[0].global_position < w[1].global_position),
        "positions increase in request order"
    );
    for s in &checked {
        assert_eq!(
            read(&store, s).await.1,
            version(1),
            "checked streams untouched"
        );
    }

    // One checked stream moves: the next request conflicts on it alone and writes
    // nothing; at the moved version it goes through.
    let moved = checked[13].clone();
    append_to(
        &store,
        &moved,
        ExpectedVersion::Exact(version(1)),
        vec![added(9)],
    )
    .await
    .expect("move");
    let head = store.head_position().await.expect("head");
    assert_conflict(
        store.append(request(3, None)).await,
        &[(moved.clone(), ExpectedVersion::Exact(version(1)), 2)],
    );
    assert_eq!(store.head_position().await.expect("head"), head);
    for s in &written {
        assert_eq!(read(&store, s).await.1, version(3));
    }
    let outcome = store
        .append(request(3, Some(&moved)))
        .await
        .expect("append at the moved version");
    assert_eq!(outcome.events.len(), 40);
    for s in &written {
        assert_eq!(read(&store, s).await.1, version(5));
    }
}

/// Events land in their own stream only; versions count per stream.
pub async fn streams_are_isolated(store: impl EventStore) {
    let (a, b) = (stream("iso-a"), stream("iso-b"));
    append_to(
        &store,
        &a,
        ExpectedVersion::NoStream,
        vec![added(1), added(2)],
    )
    .await
    .expect("a");
    append_to(&store, &b, ExpectedVersion::NoStream, vec![added(10)])
        .await
        .expect("b");
    append_to(
        &store,
        &a,
        ExpectedVersion::Exact(version(2)),
        vec![added(3)],
    )
    .await
    .expect("a");
    let (events_a, va) = read(&store, &a).await;
    let (events_b, vb) = read(&store, &b).await;
    assert_eq!((values(&events_a), va), (vec![1, 2, 3], version(3)));
    assert_eq!((values(&events_b), vb), (vec![10], version(1)));
    assert!(events_a.iter().all(|e| e.stream_id == a));
    assert_eq!(
        events_a
            .iter()
            .map(|e| e.stream_version.value())
            .collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    // A prefix of a stream id is a different stream.
    assert_eq!(read(&store, &stream("iso")).await.1, version(0));
}

/// Reading several streams returns all their events in global order, each stream's
/// version, and reads a stream named twice once.
pub async fn read_streams_merges_several_streams_in_global_order(store: impl EventStore) {
    let (a, b, missing) = (stream("m-a"), stream("m-b"), stream("m-missing"));
    append_to(&store, &a, ExpectedVersion::Any, vec![added(1)])
        .await
        .expect("a");
    append_to(&store, &b, ExpectedVersion::Any, vec![added(2)])
        .await
        .expect("b");
    append_to(&store, &a, ExpectedVersion::Any, vec![added(3)])
        .await
        .expect("a");
    append_to(
        &store,
        &stream("m-other"),
        ExpectedVersion::Any,
        vec![added(99)],
    )
    .await
    .expect("o");
    let snapshot = store
        .read_streams(&[b.clone(), a.clone(), missing.clone(), b.clone()])
        .await
        .expect("read");
    assert_eq!(values(&snapshot.events), vec![1, 2, 3]);
    assert!(
        snapshot
            .events
            .windows(2)
            .all(|w| w[0].global_position < w[1].global_position)
    );
    assert_eq!(snapshot.version_of(&a), version(2));
    assert_eq!(snapshot.version_of(&b), version(1));
    assert_eq!(snapshot.version_of(&missing), version(0));
}

/// Positions strictly increase in commit order across streams, and within one append in
/// request order.
pub async fn global_positions_increase_across_streams_in_append_order(store: impl EventStore) {
    let (a, b) = (stream("g-a"), stream("g-b"));
    append_to(&store, &a, ExpectedVersion::Any, vec![added(1)])
        .await
        .expect("1");
    append_to(&store, &b, ExpectedVersion::Any, vec![added(2)])
        .await
        .expect("2");
    let request = AppendRequest::new()
        .with_stream(StreamAppend::new(
            b.clone(),
            ExpectedVersion::Any,
            vec![added(3), added(4)],
        ))
        .with_stream(StreamAppend::new(
            a.clone(),
            ExpectedVersion::Any,
            vec![added(5)],
        ));
    let outcome = store.append(request).await.expect("3");
    assert!(
        outcome
            .events
            .windows(2)
            .all(|w| w[0].global_position < w[1].global_position)
    );
    append_to(&store, &a, ExpectedVersion::Any, vec![added(6)])
        .await
        .expect("4");
    let log = read_everything(&store).await;
    assert_eq!(values(&log), vec![1, 2, 3, 4, 5, 6]);
    assert!(
        log.windows(2)
            .all(|w| w[0].global_position < w[1].global_position)
    );
    let head = store.head_position().await.expect("head");
    assert_eq!(head, log.last().map(|e| e.global_position));
}

/// Reading after position p returns the events after p, ascending, never p itself.
pub async fn read_all_resumes_after_a_position_exclusively(store: impl EventStore) {
    let s = stream("resume");
    append_to(
        &store,
        &s,
        ExpectedVersion::Any,
        (1..=10).map(added).collect(),
    )
    .await
    .expect("a");
    let log = read_everything(&store).await;
    let fourth = log[3].global_position;
    let rest = store
        .read_all(&LogQuery::after(fourth))
        .await
        .expect("read");
    assert_eq!(values(&rest), (5..=10).collect::<Vec<_>>());
    assert!(rest.iter().all(|e| e.global_position > fourth));
    let last = log[9].global_position;
    assert!(
        store
            .read_all(&LogQuery::after(last))
            .await
            .expect("read")
            .is_empty()
    );
    let far = GlobalPosition::new(last.value() + 1_000);
    assert!(
        store
            .read_all(&LogQuery::after(far))
            .await
            .expect("read")
            .is_empty()
    );
}

/// A batch limit of n returns the first n events after the start, not any n.
pub async fn read_all_batch_limit_returns_the_first_events(store: impl EventStore) {
    let s = stream("limit");
    append_to(
        &store,
        &s,
        ExpectedVersion::Any,
        (1..=25).map(added).collect(),
    )
    .await
    .expect("a");
    let first = store
        .read_all(&LogQuery::from_start().limit(10))
        .await
        .expect("read");
    assert_eq!(values(&first), (1..=10).collect::<Vec<_>>());
    let next = store
        .read_all(&LogQuery::after(first[9].global_position).limit(10))
        .await
        .expect("read");
    assert_eq!(values(&next), (11..=20).collect::<Vec<_>>());
    let last = store
        .read_all(&LogQuery::after(next[9].global_position).limit(10))
        .await
        .expect("read");
    assert_eq!(values(&last), (21..=25).collect::<Vec<_>>());
    assert!(
        store
            .read_all(&LogQuery::from_start().limit(0))
            .await
            .expect("read")
            .is_empty()
    );
}

/// A stream-prefix filter selects before the limit: the first n matching events come
/// back even when many non-matching ones come first.
pub async fn stream_prefix_filter_is_applied_before_the_limit(store: impl EventStore) {
    append_to(
        &store,
        &stream("other-1"),
        ExpectedVersion::Any,
        (0..50).map(|_| added(0)).collect(),
    )
    .await
    .expect("noise");
    for i in 1..=5 {
        append_to(
            &store,
            &stream(&format!("account-{i}")),
            ExpectedVersion::Any,
            vec![added(i)],
        )
        .await
        .expect("account");
        append_to(
            &store,
            &stream(&format!("acc-{i}")),
            ExpectedVersion::Any,
            vec![added(-i)],
        )
        .await
        .expect("near miss");
    }
    let query = LogQuery::from_start().stream_prefix("account-").limit(3);
    let batch = store.read_all(&query).await.expect("read");
    assert_eq!(values(&batch), vec![1, 2, 3]);
    let rest = store
        .read_all(
            &LogQuery::after(batch[2].global_position)
                .stream_prefix("account-")
                .limit(3),
        )
        .await
        .expect("read");
    assert_eq!(values(&rest), vec![4, 5]);
    // Prefix matching is literal: SQL wildcard characters match only themselves.
    append_to(
        &store,
        &stream("a%b_c"),
        ExpectedVersion::Any,
        vec![added(42)],
    )
    .await
    .expect("w");
    let literal = store
        .read_all(&LogQuery::from_start().stream_prefix("a%b_"))
        .await
        .expect("r");
    assert_eq!(values(&literal), vec![42]);
    let wildcard = store
        .read_all(&LogQuery::from_start().stream_prefix("a%"))
        .await
        .expect("r");
    assert_eq!(values(&wildcard), vec![42]);
    let none = store
        .read_all(&LogQuery::from_start().stream_prefix("_"))
        .await
        .expect("r");
    assert!(none.is_empty());
}

/// `read_log` returns what `read_all` returns, and says how far it looked: to the last
/// event of a full batch, and at least to the last visible event otherwise, also when
/// the filter selected nothing there; never at or before the query's position.
pub async fn read_log_says_how_far_it_looked(store: impl EventStore) {
    let empty = store.read_log(&LogQuery::from_start()).await.expect("read");
    assert!(empty.events.is_empty());
    assert_eq!(empty.scanned, None, "an empty log: nothing looked at");
    for i in 1..=4 {
        append_to(
            &store,
            &stream(&format!("wanted-{i}")),
            ExpectedVersion::Any,
            vec![added(i)],
        )
        .await
        .expect("wanted");
    }
    append_to(
        &store,
        &stream("noise"),
        ExpectedVersion::Any,
        (0..3).map(|_| added(0)).collect(),
    )
    .await
    .expect("noise");
    let everything = read_everything(&store).await;
    let last = everything.last().expect("events").global_position;

    let full = store
        .read_log(&LogQuery::from_start().stream_prefix("wanted-").limit(2))
        .await
        .expect("read");
    assert_eq!(values(&full.events), vec![1, 2]);
    assert_eq!(
        full.scanned,
        Some(full.events[1].global_position),
        "a full batch looked up to its last event"
    );
    assert_eq!(
        full.events,
        store
            .read_all(&LogQuery::from_start().stream_prefix("wanted-").limit(2))
            .await
            .expect("read"),
        "the same events as read_all"
    );
    let rest = store
        .read_log(&LogQuery::after(full.events[1].global_position).stream_prefix("wanted-"))
        .await
        .expect("read");
    assert_eq!(values(&rest.events), vec![3, 4]);
    assert!(
        rest.scanned >= Some(last),
        "a batch that is not full looked at the whole visible log, noise included: {:?} < {last}",
        rest.scanned
    );
    // Nothing wanted after the last wanted event, but the read still looked past it.
    let after_wanted = rest.events[1].global_position;
    let nothing = store
        .read_log(&LogQuery::after(after_wanted).stream_prefix("wanted-"))
        .await
        .expect("read");
    assert!(nothing.events.is_empty());
    assert!(nothing.scanned >= Some(last), "{:?}", nothing.scanned);
    // At the end of the log: nothing looked at after the position.
    let at_end = store.read_log(&LogQuery::after(last)).await.expect("read");
    assert!(at_end.events.is_empty());
    assert!(
        at_end.scanned.is_none_or(|scanned| scanned > last),
        "scanned must lie after the query's position: {:?}",
        at_end.scanned
    );
}

/// An event-type filter selects before the limit.
pub async fn event_type_filter_is_applied_before_the_limit(store: impl EventStore) {
    let s = stream("mixed");
    let mut events: Vec<EventData> = (0..40).map(|i| noted(&format!("n{i}"))).collect();
    events.extend((1..=6).map(added));
    append_to(&store, &s, ExpectedVersion::Any, events)
        .await
        .expect("append");
    let query = LogQuery::from_start()
        .event_types(["Added"])
        .expect("valid")
        .limit(4);
    let batch = store.read_all(&query).await.expect("read");
    assert_eq!(values(&batch), vec![1, 2, 3, 4]);
    let both = LogQuery::from_start()
        .event_types(["Added", "Noted"])
        .expect("valid")
        .limit(100);
    assert_eq!(store.read_all(&both).await.expect("read").len(), 46);
    let unknown = LogQuery::from_start()
        .event_types(["Missing"])
        .expect("valid");
    assert!(store.read_all(&unknown).await.expect("read").is_empty());
}

/// One append of 10,000 events: all stored, versions 1..=10,000, positions ascending.
pub async fn append_of_ten_thousand_events_in_one_call(store: impl EventStore) {
    let s = stream("bulk");
    let outcome = append_to(
        &store,
        &s,
        ExpectedVersion::NoStream,
        (0..10_000).map(added).collect(),
    )
    .await
    .expect("bulk append");
    assert_eq!(outcome.events.len(), 10_000);
    let (events, v) = read(&store, &s).await;
    assert_eq!(v, version(10_000));
    assert_eq!(values(&events), (0..10_000).collect::<Vec<_>>());
    assert!(
        events
            .iter()
            .enumerate()
            .all(|(i, e)| e.stream_version.value() == i as u64 + 1)
    );
    let log = read_everything(&store).await;
    assert_eq!(log.len(), 10_000);
    assert!(
        log.windows(2)
            .all(|w| w[0].global_position < w[1].global_position)
    );
}

/// A payload that does not fit the reader's type gives a typed error naming the stream,
/// version and type; the event is still returned by every read.
pub async fn undecodable_payload_is_a_typed_error_and_never_dropped(store: impl EventStore) {
    let s = stream("evolving");
    let odd = EventData::new(
        EventType::try_new("Added").expect("valid"),
        EventPayload::from_json(r#"{"Added":{"value":"not a number"}}"#).expect("valid json"),
        EventMetadata::default(),
    );
    append_to(
        &store,
        &s,
        ExpectedVersion::NoStream,
        vec![added(1), odd, added(3)],
    )
    .await
    .expect("append");
    let (events, v) = read(&store, &s).await;
    assert_eq!(v, version(3));
    assert_eq!(events.len(), 3, "no event may be dropped");
    match events[1].decode::<ConformanceEvent>() {
        Err(Error::Deserialization {
            stream,
            version: at,
            event_type,
            ..
        }) => {
            assert_eq!(stream, s);
            assert_eq!(at, version(2));
            assert_eq!(event_type, "Added");
        }
        other => panic!("expected a Deserialization error, got {other:?}"),
    }
    assert_eq!(read_everything(&store).await.len(), 3);
    for refused in ["{not json", r#"{"text":"\ud800"}"#, r#"{"huge":1e999999}"#] {
        assert!(
            matches!(
                EventPayload::from_json(refused),
                Err(Error::InvalidPayload { .. })
            ),
            "{refused} must be refused by every backend"
        );
    }
}

/// An append with a key already stored writes nothing and returns the first outcome,
/// even when its expectations would now fail.
pub async fn idempotency_key_returns_the_first_outcome_and_writes_nothing(store: impl EventStore) {
    let (s, other) = (stream("idem"), stream("idem-other"));
    let key = IdempotencyKey::try_new("charge-order-1").expect("valid");
    assert_eq!(store.idempotent_outcome(&key).await.expect("lookup"), None);
    let first = store
        .append(
            AppendRequest::single(
                s.clone(),
                ExpectedVersion::NoStream,
                vec![added(1), added(2)],
            )
            .with_idempotency_key(key.clone()),
        )
        .await
        .expect("first");
    assert!(!first.deduplicated);
    let head = store.head_position().await.expect("head");

    let second = store
        .append(
            AppendRequest::single(s.clone(), ExpectedVersion::NoStream, vec![added(3)])
                .with_idempotency_key(key.clone()),
        )
        .await
        .expect("a repeated key is not an error");
    assert!(second.deduplicated);
    assert_eq!(second.events, first.events);

    let elsewhere = store
        .append(
            AppendRequest::single(other.clone(), ExpectedVersion::Any, vec![added(4)])
                .with_idempotency_key(key.clone()),
        )
        .await
        .expect("a repeated key is not an error");
    assert!(elsewhere.deduplicated);
    assert_eq!(elsewhere.events, first.events);

    assert_eq!(store.head_position().await.expect("head"), head);
    assert_eq!(values(&read(&store, &s).await.0), vec![1, 2]);
    assert_eq!(read(&store, &other).await.1, version(0));
    let looked_up = store
        .idempotent_outcome(&key)
        .await
        .expect("lookup")
        .expect("stored");
    assert_eq!(looked_up.events, first.events);

    // A different key writes.
    let fresh = IdempotencyKey::try_new("charge-order-2").expect("valid");
    let third = store
        .append(
            AppendRequest::single(
                s.clone(),
                ExpectedVersion::Exact(version(2)),
                vec![added(5)],
            )
            .with_idempotency_key(fresh),
        )
        .await
        .expect("fresh key");
    assert!(!third.deduplicated);
    assert_eq!(values(&read(&store, &s).await.0), vec![1, 2, 5]);
}

/// An append that fails (a version conflict) records nothing, not even its key: the
/// same key then writes. A check-only append with a key records the key.
pub async fn a_failed_append_does_not_consume_its_idempotency_key(store: impl EventStore) {
    let s = stream("idem-fail");
    append_to(&store, &s, ExpectedVersion::NoStream, vec![added(1)])
        .await
        .expect("setup");
    let key = IdempotencyKey::try_new("retry-me").expect("valid");
    let stale = store
        .append(
            AppendRequest::single(s.clone(), ExpectedVersion::NoStream, vec![added(2)])
                .with_idempotency_key(key.clone()),
        )
        .await;
    assert_conflict(stale, &[(s.clone(), ExpectedVersion::NoStream, 1)]);
    assert_eq!(store.idempotent_outcome(&key).await.expect("lookup"), None);
    let retried = store
        .append(
            AppendRequest::single(
                s.clone(),
                ExpectedVersion::Exact(version(1)),
                vec![added(3)],
            )
            .with_idempotency_key(key.clone()),
        )
        .await
        .expect("the key is still free");
    assert!(!retried.deduplicated);
    assert_eq!(values(&read(&store, &s).await.0), vec![1, 3]);

    let check_key = IdempotencyKey::try_new("check-only").expect("valid");
    let checked = store
        .append(
            AppendRequest::new()
                .with_stream(StreamAppend::check_only(
                    s.clone(),
                    ExpectedVersion::Exact(version(2)),
                ))
                .with_idempotency_key(check_key.clone()),
        )
        .await
        .expect("check-only append");
    assert!(checked.events.is_empty() && !checked.deduplicated);
    let again = store
        .append(
            AppendRequest::single(s.clone(), ExpectedVersion::Any, vec![added(4)])
                .with_idempotency_key(check_key),
        )
        .await
        .expect("replay");
    assert!(again.deduplicated && again.events.is_empty());
    assert_eq!(read(&store, &s).await.1, version(2));
}

/// Event ids are unique across the store. Repeating an append whose events are all
/// stored (its answer was lost) writes nothing and returns where they are; mixing stored
/// and new ids is refused. Expectations are still checked first.
pub async fn repeating_an_append_with_the_same_event_ids_writes_nothing(store: impl EventStore) {
    let (s, t) = (stream("repeat-a"), stream("repeat-b"));
    let events = vec![added(1), added(2)];
    let request = AppendRequest::new()
        .with_stream(StreamAppend::new(
            s.clone(),
            ExpectedVersion::Any,
            events.clone(),
        ))
        .with_stream(StreamAppend::new(
            t.clone(),
            ExpectedVersion::Any,
            vec![added(3)],
        ));
    let first = store.append(request.clone()).await.expect("first");
    let again = store
        .append(request)
        .await
        .expect("a repeat is not an error");
    assert!(again.deduplicated);
    assert_eq!(again.events, first.events);
    assert_eq!(read_everything(&store).await.len(), 3);

    let mixed = AppendRequest::single(
        s.clone(),
        ExpectedVersion::Any,
        vec![events[0].clone(), added(4)],
    );
    assert!(matches!(
        store.append(mixed).await,
        Err(Error::InvalidAppend { .. })
    ));
    let stale = AppendRequest::single(s.clone(), ExpectedVersion::NoStream, events);
    assert_conflict(
        store.append(stale).await,
        &[(s.clone(), ExpectedVersion::NoStream, 2)],
    );
    assert_eq!(read_everything(&store).await.len(), 3);
}

/// Sixteen tasks append with the same key at once: one writes, all get its outcome.
pub async fn racing_appends_with_one_idempotency_key_write_once(store: impl EventStore) {
    let store = Arc::new(store);
    let key = IdempotencyKey::try_new("racing-key").expect("valid");
    let barrier = Arc::new(tokio::sync::Barrier::new(16));
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let (store, key, barrier) = (store.clone(), key.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                store
                    .append(
                        AppendRequest::single(
                            stream(&format!("racer-{i}")),
                            ExpectedVersion::Any,
                            vec![added(i)],
                        )
                        .with_idempotency_key(key),
                    )
                    .await
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.expect("task").expect("append"));
    }
    let writers = outcomes.iter().filter(|o| !o.deduplicated).count();
    assert_eq!(writers, 1, "exactly one append may write");
    assert!(outcomes.iter().all(|o| o.events == outcomes[0].events));
    assert_eq!(read_everything(&*store).await.len(), 1);
}

/// Requests with no stream, a stream twice, or an event id twice are refused before
/// anything is written.
pub async fn invalid_append_requests_are_refused(store: impl EventStore) {
    let s = stream("invalid");
    assert!(matches!(
        store.append(AppendRequest::new()).await,
        Err(Error::InvalidAppend { .. })
    ));
    let twice = AppendRequest::new()
        .with_stream(StreamAppend::new(
            s.clone(),
            ExpectedVersion::Any,
            vec![added(1)],
        ))
        .with_stream(StreamAppend::new(
            s.clone(),
            ExpectedVersion::Any,
            vec![added(2)],
        ));
    assert!(matches!(
        store.append(twice).await,
        Err(Error::InvalidAppend { .. })
    ));
    let event = added(1);
    let same_id =
        AppendRequest::single(s.clone(), ExpectedVersion::Any, vec![event.clone(), event]);
    assert!(matches!(
        store.append(same_id).await,
        Err(Error::InvalidAppend { .. })
    ));
    assert!(read_everything(&store).await.is_empty());
}

/// A NUL character in a payload or in metadata is refused with a typed error before
/// anything is written (PostgreSQL cannot store it, so no backend may accept it); an
/// escaped backslash followed by `u0000` is ordinary text and is stored.
pub async fn nul_characters_are_refused_before_anything_is_written(store: impl EventStore) {
    let s = stream("nul");
    assert!(matches!(
        EventPayload::from_json(r#"{"text":"a\u0000b"}"#),
        Err(Error::InvalidPayload { .. })
    ));
    let nul_text = ConformanceEvent::Noted {
        text: "a\0b".to_owned(),
    };
    assert!(matches!(
        EventData::from_event(&nul_text, EventMetadata::default()),
        Err(Error::InvalidPayload { .. })
    ));
    let bad_actor = EventData::from_event(
        &ConformanceEvent::Added { value: 1 },
        EventMetadata::default().with_actor("ro\0ot"),
    )
    .expect("the payload is fine");
    let refused = append_to(&store, &s, ExpectedVersion::Any, vec![added(1), bad_actor]).await;
    assert!(
        matches!(refused, Err(Error::InvalidMetadata { .. })),
        "{refused:?}"
    );
    let bad_custom = EventData::from_event(
        &ConformanceEvent::Added { value: 1 },
        EventMetadata::default().with_custom("deep", serde_json::json!({"list": ["x\0"]})),
    )
    .expect("the payload is fine");
    let refused = append_to(&store, &s, ExpectedVersion::Any, vec![bad_custom]).await;
    assert!(
        matches!(refused, Err(Error::InvalidMetadata { .. })),
        "{refused:?}"
    );
    assert!(read_everything(&store).await.is_empty());

    let harmless = EventPayload::from_json(r#"{"Noted":{"text":"\\u0000"}}"#).expect("no NUL");
    let data = EventData::new(
        EventType::try_new("Noted").expect("valid"),
        harmless,
        EventMetadata::default(),
    );
    append_to(&store, &s, ExpectedVersion::Any, vec![data])
        .await
        .expect("stored");
    let (events, _) = read(&store, &s).await;
    let decoded = events[0].decode::<ConformanceEvent>().expect("decodes");
    assert_eq!(
        decoded.payload,
        ConformanceEvent::Noted {
            text: "\\u0000".to_owned()
        }
    );
}

/// Bad stream ids never reach a store: construction refuses them with a typed error.
pub async fn invalid_stream_ids_are_rejected_at_construction(store: impl EventStore) {
    for bad in [
        String::new(),
        "x".repeat(256),
        "tab\there".to_owned(),
        "nul\0".to_owned(),
    ] {
        assert!(
            StreamId::try_new(bad.as_str()).is_err(),
            "{bad:?} must be rejected"
        );
    }
    let longest = "y".repeat(255);
    let s = StreamId::try_new(longest.as_str()).expect("255 bytes is allowed");
    append_to(&store, &s, ExpectedVersion::NoStream, vec![added(1)])
        .await
        .expect("append");
    assert_eq!(read(&store, &s).await.0[0].stream_id.as_str(), longest);
}

/// The head is `None` on an empty store and the last event's position afterwards.
pub async fn head_position_tracks_the_last_event(store: impl EventStore) {
    assert_eq!(store.head_position().await.expect("head"), None);
    let outcome = append_to(
        &store,
        &stream("h"),
        ExpectedVersion::Any,
        vec![added(1), added(2)],
    )
    .await
    .expect("append");
    assert_eq!(
        store.head_position().await.expect("head"),
        Some(outcome.events[1].global_position)
    );
    let _ = append_to(
        &store,
        &stream("h"),
        ExpectedVersion::NoStream,
        vec![added(3)],
    )
    .await;
    assert_eq!(
        store.head_position().await.expect("head"),
        Some(outcome.events[1].global_position),
        "a failed append must not move the head"
    );
}

/// `wait_for_events` returns at once when an event after the position exists, stays
/// pending while none does, and wakes when one is appended.
pub async fn waiting_reader_wakes_when_an_event_is_appended(store: impl EventStore) {
    let store = Arc::new(store);
    let s = stream("wake");
    let outcome = append_to(&*store, &s, ExpectedVersion::Any, vec![added(1)])
        .await
        .expect("a");
    let first = outcome.events[0].global_position;
    tokio::time::timeout(HANG_GUARD, store.wait_for_events(None))
        .await
        .expect("an event exists: must return at once")
        .expect("wait");

    let waiter = {
        let store = store.clone();
        tokio::spawn(async move { store.wait_for_events(Some(first)).await })
    };
    let mut waiter = std::pin::pin!(waiter);
    assert!(
        tokio::time::timeout(PENDING_WINDOW, &mut waiter)
            .await
            .is_err(),
        "nothing after the head: the wait must stay pending"
    );
    append_to(&*store, &s, ExpectedVersion::Any, vec![added(2)])
        .await
        .expect("b");
    tokio::time::timeout(HANG_GUARD, waiter)
        .await
        .expect("the waiter must wake after an append")
        .expect("task")
        .expect("wait");
}

/// Sixteen tasks append to one stream with the same expected version, round after
/// round: exactly one wins each round, the others get a conflict naming the winner's
/// version, versions stay contiguous and nothing is duplicated.
pub async fn sixteen_writers_racing_on_one_stream_get_one_winner_per_version(
    store: impl EventStore,
) {
    const TASKS: usize = 16;
    const ROUNDS: u64 = 25;
    let store = Arc::new(store);
    let s = stream("contended");
    let barrier = Arc::new(tokio::sync::Barrier::new(TASKS));
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let (store, s, barrier) = (store.clone(), s.clone(), barrier.clone());
            tokio::spawn(async move {
                let mut won = Vec::new();
                for round in 0..ROUNDS {
                    barrier.wait().await;
                    let data = added((task as i64) * 1_000 + round as i64);
                    let id = data.event_id;
                    match append_to(
                        &*store,
                        &s,
                        ExpectedVersion::Exact(version(round)),
                        vec![data],
                    )
                    .await
                    {
                        Ok(outcome) => {
                            assert_eq!(outcome.events[0].stream_version, version(round + 1));
                            won.push((round, id));
                        }
                        Err(Error::VersionConflict { conflicts }) => {
                            assert_eq!(conflicts.len(), 1);
                            assert_eq!(
                                conflicts[0].expected,
                                ExpectedVersion::Exact(version(round))
                            );
                            assert_eq!(conflicts[0].actual, version(round + 1));
                        }
                        Err(other) => panic!("unexpected error: {other}"),
                    }
                    // Everybody finishes the round before the next one starts.
                    barrier.wait().await;
                }
                won
            })
        })
        .collect();
    let mut winners: HashMap<u64, EventId> = HashMap::new();
    for task in tasks {
        for (round, id) in task.await.expect("task") {
            assert!(
                winners.insert(round, id).is_none(),
                "two winners in round {round}"
            );
        }
    }
    assert_eq!(winners.len() as u64, ROUNDS, "every round has a winner");
    let (events, v) = read(&store, &s).await;
    assert_eq!(v, version(ROUNDS));
    assert_eq!(events.len() as u64, ROUNDS);
    for (i, event) in events.iter().enumerate() {
        assert_eq!(event.stream_version, version(i as u64 + 1));
        assert_eq!(Some(&event.event_id), winners.get(&(i as u64)));
    }
}

/// Many tasks append to several streams at once while a reader follows the log live:
/// the reader sees every event exactly once, in strictly increasing position order, and
/// what it saw equals the log read afterwards (the prefix property).
pub async fn concurrent_multi_stream_appends_reach_a_live_reader_once_and_in_order(
    store: impl EventStore,
) {
    const WRITERS: usize = 8;
    const APPENDS: usize = 60;
    const TOTAL: usize = WRITERS * APPENDS * 2;
    let store = Arc::new(store);

    // The reader stops when it has seen everything, or when the writers are done and it
    // has caught up with the head: a skipped event then shows as a precise difference
    // below instead of a reader waiting forever.
    let writers_done = Arc::new(tokio::sync::Notify::new());
    let reader = {
        let (store, writers_done) = (store.clone(), writers_done.clone());
        tokio::spawn(async move {
            let mut seen: Vec<RecordedEvent> = Vec::with_capacity(TOTAL);
            let mut after = None;
            let mut done = std::pin::pin!(writers_done.notified());
            let mut writers_finished = false;
            while seen.len() < TOTAL {
                let batch = store
                    .read_all(&LogQuery::after_opt(after).limit(37))
                    .await
                    .expect("read_all");
                if batch.is_empty() {
                    if writers_finished {
                        break;
                    }
                    tokio::select! {
                        waited = store.wait_for_events(after) => waited.expect("wait"),
                        () = &mut done => writers_finished = true,
                    }
                    continue;
                }
                for event in batch {
                    if let Some(last) = after {
                        assert!(
                            event.global_position > last,
                            "position {} delivered after {}",
                            event.global_position,
                            last
                        );
                    }
                    after = Some(event.global_position);
                    seen.push(event);
                }
            }
            seen
        })
    };

    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut ids = Vec::with_capacity(APPENDS * 2);
                for i in 0..APPENDS {
                    // Pairs of streams that overlap between writers.
                    let a = stream(&format!("pair-{}", (w + i) % 5));
                    let b = stream(&format!("pair-{}", (w + i + 1) % 5 + 5));
                    let (ea, eb) = (added(i as i64), added(-(i as i64)));
                    ids.push(ea.event_id);
                    ids.push(eb.event_id);
                    store
                        .append(
                            AppendRequest::new()
                                .with_stream(StreamAppend::new(a, ExpectedVersion::Any, vec![ea]))
                                .with_stream(StreamAppend::new(b, ExpectedVersion::Any, vec![eb])),
                        )
                        .await
                        .expect("append");
                }
                ids
            })
        })
        .collect();
    let mut written = HashSet::with_capacity(TOTAL);
    for writer in writers {
        for id in writer.await.expect("writer") {
            assert!(written.insert(id));
        }
    }
    writers_done.notify_one();
    let seen = tokio::time::timeout(HANG_GUARD, reader)
        .await
        .expect("the reader must see every event")
        .expect("reader");
    let seen_ids: HashSet<EventId> = seen.iter().map(|e| e.event_id).collect();
    assert_eq!(seen_ids.len(), seen.len(), "an event was delivered twice");
    let missed: Vec<_> = written.difference(&seen_ids).collect();
    assert!(
        missed.is_empty(),
        "the live reader skipped {} events: {missed:?}",
        missed.len()
    );
    assert_eq!(seen.len(), TOTAL);
    assert_eq!(
        seen_ids, written,
        "the reader must see exactly the written events"
    );
    let log = read_everything(&*store).await;
    assert_eq!(log, seen, "the live reader's view must equal the final log");
    // Every stream's versions are contiguous.
    let mut per_stream: HashMap<StreamId, Vec<u64>> = HashMap::new();
    for event in &log {
        per_stream
            .entry(event.stream_id.clone())
            .or_default()
            .push(event.stream_version.value());
    }
    for (id, versions) in per_stream {
        let expected: Vec<u64> = (1..=versions.len() as u64).collect();
        assert_eq!(versions, expected, "versions of {id}");
    }
}

/// While appends write to two streams together, readers of both streams never see one
/// stream's half of an append without the other's.
pub async fn multi_stream_appends_are_read_entirely_or_not_at_all(store: impl EventStore) {
    const APPENDS: u64 = 300;
    let store = Arc::new(store);
    let (a, b) = (stream("atomic-a"), stream("atomic-b"));
    let writer = {
        let (store, a, b) = (store.clone(), a.clone(), b.clone());
        tokio::spawn(async move {
            for i in 0..APPENDS {
                store
                    .append(
                        AppendRequest::new()
                            .with_stream(StreamAppend::new(
                                a.clone(),
                                ExpectedVersion::Exact(version(i)),
                                vec![added(1)],
                            ))
                            .with_stream(StreamAppend::new(
                                b.clone(),
                                ExpectedVersion::Exact(version(i)),
                                vec![added(1)],
                            )),
                    )
                    .await
                    .expect("append");
            }
        })
    };
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (store, a, b) = (store.clone(), a.clone(), b.clone());
            tokio::spawn(async move {
                let mut last = 0;
                while last < APPENDS {
                    let snapshot = store
                        .read_streams(&[a.clone(), b.clone()])
                        .await
                        .expect("read");
                    let (va, vb) = (snapshot.version_of(&a), snapshot.version_of(&b));
                    assert_eq!(va, vb, "torn read: {va} vs {vb}");
                    assert_eq!(snapshot.events.len() as u64, va.value() * 2);
                    assert!(va.value() >= last, "versions went backwards");
                    last = va.value();
                    if last < APPENDS {
                        store
                            .wait_for_events(snapshot.events.last().map(|e| e.global_position))
                            .await
                            .expect("wait");
                    }
                }
            })
        })
        .collect();
    writer.await.expect("writer");
    for reader in readers {
        tokio::time::timeout(HANG_GUARD, reader)
            .await
            .expect("reader finished")
            .expect("reader");
    }
}
