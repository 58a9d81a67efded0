//! Appends and their expectations: every stream of a request, written or only checked,
//! is checked at its expected version, and one failed check fails the whole append.

use super::*;

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
