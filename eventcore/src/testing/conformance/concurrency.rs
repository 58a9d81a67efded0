//! Concurrent writers and readers: one winner per version, the prefix property for a
//! live reader, and appends seen whole or not at all.

use super::*;

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
                    .read_all(&LogQuery::new().with_after(after).with_limit(37))
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
