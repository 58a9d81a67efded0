//! The global log: positions, pages and filters, how far a read looked, the head, and
//! waiting for what comes next.

use super::*;

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
        .read_all(&LogQuery::new().with_after(fourth))
        .await
        .expect("read");
    assert_eq!(values(&rest), (5..=10).collect::<Vec<_>>());
    assert!(rest.iter().all(|e| e.global_position > fourth));
    let last = log[9].global_position;
    assert!(
        store
            .read_all(&LogQuery::new().with_after(last))
            .await
            .expect("read")
            .is_empty()
    );
    let far = GlobalPosition::new(last.value() + 1_000);
    assert!(
        store
            .read_all(&LogQuery::new().with_after(far))
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
        .read_all(&LogQuery::new().with_limit(10))
        .await
        .expect("read");
    assert_eq!(values(&first), (1..=10).collect::<Vec<_>>());
    let next = store
        .read_all(
            &LogQuery::new()
                .with_after(first[9].global_position)
                .with_limit(10),
        )
        .await
        .expect("read");
    assert_eq!(values(&next), (11..=20).collect::<Vec<_>>());
    let last = store
        .read_all(
            &LogQuery::new()
                .with_after(next[9].global_position)
                .with_limit(10),
        )
        .await
        .expect("read");
    assert_eq!(values(&last), (21..=25).collect::<Vec<_>>());
    assert!(
        store
            .read_all(&LogQuery::new().with_limit(0))
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
    let query = LogQuery::new().with_stream_prefix("account-").with_limit(3);
    let batch = store.read_all(&query).await.expect("read");
    assert_eq!(values(&batch), vec![1, 2, 3]);
    let rest = store
        .read_all(
            &LogQuery::new()
                .with_after(batch[2].global_position)
                .with_stream_prefix("account-")
                .with_limit(3),
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
        .read_all(&LogQuery::new().with_stream_prefix("a%b_"))
        .await
        .expect("r");
    assert_eq!(values(&literal), vec![42]);
    let wildcard = store
        .read_all(&LogQuery::new().with_stream_prefix("a%"))
        .await
        .expect("r");
    assert_eq!(values(&wildcard), vec![42]);
    let none = store
        .read_all(&LogQuery::new().with_stream_prefix("_"))
        .await
        .expect("r");
    assert!(none.is_empty());
}

/// An event-type filter selects before the limit.
pub async fn event_type_filter_is_applied_before_the_limit(store: impl EventStore) {
    let s = stream("mixed");
    let mut events: Vec<EventData> = (0..40).map(|i| noted(&format!("n{i}"))).collect();
    events.extend((1..=6).map(added));
    append_to(&store, &s, ExpectedVersion::Any, events)
        .await
        .expect("append");
    let query = LogQuery::new()
        .with_event_types(["Added"])
        .expect("valid")
        .with_limit(4);
    let batch = store.read_all(&query).await.expect("read");
    assert_eq!(values(&batch), vec![1, 2, 3, 4]);
    let both = LogQuery::new()
        .with_event_types(["Added", "Noted"])
        .expect("valid")
        .with_limit(100);
    assert_eq!(store.read_all(&both).await.expect("read").len(), 46);
    let unknown = LogQuery::new()
        .with_event_types(["Missing"])
        .expect("valid");
    assert!(store.read_all(&unknown).await.expect("read").is_empty());
}

/// `read_log` returns what `read_all` returns, and says how far it looked: to the last
/// event of a full batch, and at least to the last visible event otherwise, also when
/// the filter selected nothing there; never at or before the query's position.
pub async fn read_log_says_how_far_it_looked(store: impl EventStore) {
    let empty = store.read_log(&LogQuery::new()).await.expect("read");
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
        .read_log(&LogQuery::new().with_stream_prefix("wanted-").with_limit(2))
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
            .read_all(&LogQuery::new().with_stream_prefix("wanted-").with_limit(2))
            .await
            .expect("read"),
        "the same events as read_all"
    );
    let rest = store
        .read_log(
            &LogQuery::new()
                .with_after(full.events[1].global_position)
                .with_stream_prefix("wanted-"),
        )
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
        .read_log(
            &LogQuery::new()
                .with_after(after_wanted)
                .with_stream_prefix("wanted-"),
        )
        .await
        .expect("read");
    assert!(nothing.events.is_empty());
    assert!(nothing.scanned >= Some(last), "{:?}", nothing.scanned);
    // At the end of the log: nothing looked at after the position.
    let at_end = store
        .read_log(&LogQuery::new().with_after(last))
        .await
        .expect("read");
    assert!(at_end.events.is_empty());
    assert!(
        at_end.scanned.is_none_or(|scanned| scanned > last),
        "scanned must lie after the query's position: {:?}",
        at_end.scanned
    );
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

/// `peek_log` (the log without the prefix guarantee, for the executor's log feed) with
/// nothing in flight returns what `read_all` does: the events after the position, in
/// order, each as stored, at most the limit.
pub async fn peek_log_returns_the_events_after_a_position_in_order(store: impl EventStore) {
    let (a, b) = (stream("peek-a"), stream("peek-b"));
    for n in 1..=6 {
        let s = if n % 2 == 0 { &a } else { &b };
        append_to(&store, s, ExpectedVersion::Any, vec![added(n)])
            .await
            .expect("append");
    }
    let log = read_everything(&store).await;
    assert_eq!(store.peek_log(None, 100).await.expect("peek"), log);
    let second = log[1].global_position;
    let rest = store.peek_log(Some(second), 100).await.expect("peek");
    assert_eq!(rest, log[2..].to_vec());
    let limited = store.peek_log(Some(second), 2).await.expect("peek");
    assert_eq!(limited, log[2..4].to_vec());
    assert!(
        store
            .peek_log(Some(log[5].global_position), 100)
            .await
            .expect("peek")
            .is_empty()
    );
    assert!(store.peek_log(None, 0).await.expect("peek").is_empty());
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
