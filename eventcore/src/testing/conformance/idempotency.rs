//! Idempotency keys and event ids: a repeated request writes nothing and answers with
//! the first outcome.

use super::*;

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
