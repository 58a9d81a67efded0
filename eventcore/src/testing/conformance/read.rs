//! Reads by stream: what was written comes back as written, per stream, merged in
//! global order, and after known versions; nothing is ever dropped.

use super::*;

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
