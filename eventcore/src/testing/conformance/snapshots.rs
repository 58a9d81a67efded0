//! Snapshots of command states ([`crate::snapshot`]): what a store keeps, under which
//! key, and that the executor only ever decides on one that its streams prove.
//!
//! A store that keeps no snapshots ([`EventStore::snapshots`] is `None`) passes these
//! checks trivially: each one returns at once.

use serde::{Deserialize, Serialize};

use super::*;
use crate::{
    CommandExecutor, CommandLogic, CommandResult, CommandStreams, ReadStreams, Snapshot,
    SnapshotKey, SnapshotVersion, Snapshots, StateCache, StoredEvent, StreamResolver, StreamWrite,
};

/// Adds up the `Added` values of one stream, and writes the total it decided on as a
/// `Noted` event ("total=N"), so a check can see which state a decision was taken on.
struct Tally {
    stream: StreamId,
    schema_version: u32,
    every: u64,
}

struct TallyStreams;

impl CommandStreams for Tally {
    type StreamSet = TallyStreams;

    fn read_streams(&self) -> Vec<StreamId> {
        vec![self.stream.clone()]
    }
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct Total {
    total: i64,
}

impl CommandLogic for Tally {
    type State = Total;
    type Event = ConformanceEvent;

    fn apply(&self, state: &mut Total, event: &StoredEvent<ConformanceEvent>) {
        if let ConformanceEvent::Added { value } = event.payload {
            state.total += value;
        }
    }

    fn handle(
        &self,
        read_streams: ReadStreams<TallyStreams>,
        state: Total,
        _: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<TallyStreams, ConformanceEvent>>> {
        Ok(vec![StreamWrite::new(
            &read_streams,
            self.stream.clone(),
            ConformanceEvent::Noted {
                text: format!("total={}", state.total),
            },
        )?])
    }

    fn state_cache(&self) -> StateCache<Total> {
        StateCache::for_command::<Self>()
            .with_snapshots(Snapshots::every(self.every).with_schema_version(self.schema_version))
    }
}

fn tally(stream: &StreamId) -> Tally {
    Tally {
        stream: stream.clone(),
        schema_version: 1,
        every: 10,
    }
}

/// The key the executor keeps `Tally`'s snapshots of `stream` under.
fn tally_key(stream: &StreamId, schema_version: u32) -> SnapshotKey {
    SnapshotKey::new(
        format!(
            "{} {}",
            std::any::type_name::<Tally>(),
            std::any::type_name::<Total>()
        ),
        vec![stream.clone()],
        schema_version,
    )
    .expect("a valid key")
}

/// The total the last `Noted` event of `stream` says it was decided on.
async fn decided_total(store: &dyn EventStore, stream: &StreamId) -> i64 {
    let read = store
        .read_streams(std::slice::from_ref(stream))
        .await
        .expect("read");
    let last = read.events.last().expect("the command wrote");
    match last.decode::<ConformanceEvent>().expect("decodes").payload {
        ConformanceEvent::Noted { text } => text
            .strip_prefix("total=")
            .and_then(|t| t.parse().ok())
            .expect("a total"),
        ConformanceEvent::Added { .. } => panic!("the last event is not the command's"),
    }
}

/// `n` events `Added { 1 }` on `stream`; returns the last one's id.
async fn add_ones(store: &dyn EventStore, stream: &StreamId, n: usize) -> EventId {
    let outcome = store
        .append(AppendRequest::single(
            stream.clone(),
            ExpectedVersion::Any,
            (0..n).map(|_| added(1)).collect(),
        ))
        .await
        .expect("append");
    outcome.events.last().expect("written").event_id
}

/// A snapshot of `key` at `version` (naming `event_id`), at `position`, with the total.
fn planted(
    key: SnapshotKey,
    version: u64,
    event_id: EventId,
    position: u64,
    total: i64,
) -> Snapshot {
    Snapshot::new(
        key,
        vec![SnapshotVersion {
            version: StreamVersion::new(version),
            event_id: Some(event_id),
        }],
        Some(GlobalPosition::new(position)),
        serde_json::to_vec(&Total { total }).expect("encodes"),
        chrono::Utc::now(),
    )
    .expect("a valid snapshot")
}

fn snapshot_of(key: &SnapshotKey, position: u64, state: &[u8]) -> Snapshot {
    let versions = key
        .streams()
        .iter()
        .enumerate()
        .map(|(index, _)| SnapshotVersion {
            version: StreamVersion::new(position + index as u64),
            event_id: Some(EventId::new()),
        })
        .collect();
    Snapshot::new(
        key.clone(),
        versions,
        Some(GlobalPosition::new(position)),
        state.to_vec(),
        chrono::Utc::now(),
    )
    .expect("a valid snapshot")
}

/// A snapshot reads back exactly as saved (any bytes of state, the time to the
/// microsecond); a key never saved reads as none.
pub async fn snapshots_round_trip_exactly(store: impl EventStore) {
    let Some(snapshots) = store.snapshots() else {
        return;
    };
    let key = SnapshotKey::new("conformance/round-trip", vec![stream("snap-a")], 3).expect("key");
    assert_eq!(snapshots.load_snapshot(&key).await.expect("load"), None);
    // Not UTF-8, with NUL bytes: the state is bytes.
    let state: Vec<u8> = vec![0, 159, 146, 150, 0, b'{', 255];
    let saved = Snapshot::new(
        key.clone(),
        vec![SnapshotVersion {
            version: StreamVersion::new(7),
            event_id: Some(EventId::new()),
        }],
        Some(GlobalPosition::new(42)),
        state,
        chrono::Utc::now(),
    )
    .expect("valid");
    assert!(snapshots.save_snapshot(&saved).await.expect("save"));
    assert_eq!(
        snapshots.load_snapshot(&key).await.expect("load"),
        Some(saved)
    );

    // A key over a stream at version 0 and many long streams (more than an index
    // entry of the key itself could hold).
    let streams: Vec<StreamId> = (0..200)
        .map(|i| stream(&format!("{i:03}-{}", "s".repeat(250))))
        .collect();
    let wide = SnapshotKey::new("conformance/wide", streams, 1).expect("key");
    let mut versions = vec![SnapshotVersion {
        version: StreamVersion::INITIAL,
        event_id: None,
    }];
    versions.extend((1..200).map(|v| SnapshotVersion {
        version: StreamVersion::new(v),
        event_id: Some(EventId::new()),
    }));
    let wide_snapshot = Snapshot::new(
        wide.clone(),
        versions,
        Some(GlobalPosition::new(500)),
        b"{}".to_vec(),
        chrono::Utc::now(),
    )
    .expect("valid");
    assert!(snapshots.save_snapshot(&wide_snapshot).await.expect("save"));
    assert_eq!(
        snapshots.load_snapshot(&wide).await.expect("load"),
        Some(wide_snapshot)
    );
}

/// A snapshot is found only under exactly its key: another name, another schema
/// version, the same streams in another order, or fewer of them find nothing, and
/// each key keeps its own.
pub async fn snapshots_are_kept_per_name_streams_and_schema_version(store: impl EventStore) {
    let Some(snapshots) = store.snapshots() else {
        return;
    };
    let (a, b) = (stream("snap-key-a"), stream("snap-key-b"));
    let key = SnapshotKey::new("conformance/keyed", vec![a.clone(), b.clone()], 1).expect("key");
    let saved = snapshot_of(&key, 10, b"one");
    assert!(snapshots.save_snapshot(&saved).await.expect("save"));
    let others = [
        SnapshotKey::new("conformance/keyed2", vec![a.clone(), b.clone()], 1),
        SnapshotKey::new("conformance/keyed", vec![a.clone(), b.clone()], 2),
        SnapshotKey::new("conformance/keyed", vec![b.clone(), a.clone()], 1),
        SnapshotKey::new("conformance/keyed", vec![a.clone()], 1),
    ]
    .map(|key| key.expect("key"));
    for other in &others {
        assert_eq!(
            snapshots.load_snapshot(other).await.expect("load"),
            None,
            "{other:?}"
        );
    }
    for (index, other) in others.iter().enumerate() {
        let own = snapshot_of(other, 1, format!("other {index}").as_bytes());
        assert!(snapshots.save_snapshot(&own).await.expect("save"));
    }
    assert_eq!(
        snapshots.load_snapshot(&key).await.expect("load"),
        Some(saved)
    );
    for (index, other) in others.iter().enumerate() {
        let loaded = snapshots
            .load_snapshot(other)
            .await
            .expect("load")
            .expect("saved");
        assert_eq!(loaded.state(), format!("other {index}").as_bytes());
    }

    // Deleting by name forgets every schema version and stream list of that name only.
    assert_eq!(
        snapshots
            .delete_snapshots("conformance/keyed")
            .await
            .expect("delete"),
        4
    );
    assert_eq!(snapshots.load_snapshot(&key).await.expect("load"), None);
    assert!(
        snapshots
            .load_snapshot(&others[0])
            .await
            .expect("load")
            .is_some()
    );
    assert_eq!(
        snapshots
            .delete_snapshots("no such\u{0}name")
            .await
            .expect("delete"),
        0
    );
}

/// Of two snapshots of one key, the one folded further stays, whatever the order of
/// the saves, and racing writers leave the furthest of theirs.
pub async fn the_snapshot_folded_furthest_stays(store: impl EventStore) {
    let Some(snapshots) = store.snapshots() else {
        return;
    };
    let key = SnapshotKey::new("conformance/furthest", vec![stream("snap-far")], 1).expect("key");
    let ten = snapshot_of(&key, 10, b"ten");
    assert!(snapshots.save_snapshot(&ten).await.expect("save"));
    assert!(
        !snapshots
            .save_snapshot(&snapshot_of(&key, 5, b"five"))
            .await
            .expect("save")
    );
    assert!(
        !snapshots
            .save_snapshot(&snapshot_of(&key, 10, b"ten again"))
            .await
            .expect("save")
    );
    assert_eq!(
        snapshots.load_snapshot(&key).await.expect("load"),
        Some(ten)
    );
    let twelve = snapshot_of(&key, 12, b"twelve");
    assert!(snapshots.save_snapshot(&twelve).await.expect("save"));
    assert_eq!(
        snapshots.load_snapshot(&key).await.expect("load"),
        Some(twelve)
    );

    let raced = SnapshotKey::new("conformance/raced", vec![stream("snap-race")], 1).expect("key");
    let writers: Vec<Snapshot> = (1..=16)
        .map(|i| snapshot_of(&raced, (i * 7) % 17 + 1, format!("{i}").as_bytes()))
        .collect();
    let furthest = writers
        .iter()
        .max_by_key(|s| s.last_position())
        .expect("writers")
        .clone();
    let results =
        futures::future::join_all(writers.iter().map(|s| snapshots.save_snapshot(s))).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(
        snapshots.load_snapshot(&raced).await.expect("load"),
        Some(furthest)
    );
}

/// The executor saves a command's state as a snapshot once enough events were folded
/// (here every 10), and a fresh executor starts from it: it decides on the snapshot's
/// state and the events after it. The snapshot planted here says a total the stream
/// does not hold, with the right versions and event: that the decision shows it proves
/// the snapshot was used (a real one is the fold of the same events, so it differs
/// from a read only in cost).
pub async fn a_fresh_executor_starts_from_the_snapshot_and_folds_what_follows(
    store: impl EventStore,
) {
    if store.snapshots().is_none() {
        return;
    }
    let executor = CommandExecutor::new(store);
    let store = executor.store().clone();
    let s = stream("snap-fresh");
    add_ones(&*store, &s, 25).await;
    executor.execute(&tally(&s)).await.expect("executes");
    assert_eq!(decided_total(&*store, &s).await, 25);
    executor.flush_snapshots().await;
    let snapshots = store.snapshots().expect("kept");
    let taken = snapshots
        .load_snapshot(&tally_key(&s, 1))
        .await
        .expect("load")
        .expect("the read of 25 events was snapshotted");
    let read = store
        .read_streams(std::slice::from_ref(&s))
        .await
        .expect("read");
    // Taken of the state as read (25 events), before the command's own event.
    assert_eq!(taken.versions()[0].version, StreamVersion::new(25));
    assert_eq!(taken.versions()[0].event_id, Some(read.events[24].event_id));
    assert_eq!(taken.last_position(), Some(read.events[24].global_position));
    assert_eq!(
        serde_json::from_slice::<Total>(taken.state()).expect("decodes"),
        Total { total: 25 }
    );

    // Planted: the same point in the stream, another total.
    let planted = planted(
        tally_key(&s, 1),
        25,
        read.events[24].event_id,
        read.events[24].global_position.value(),
        1_000,
    );
    snapshots
        .delete_snapshots(tally_key(&s, 1).name())
        .await
        .expect("delete");
    assert!(snapshots.save_snapshot(&planted).await.expect("save"));
    add_ones(&*store, &s, 3).await;
    let fresh = CommandExecutor::from_shared(store.clone());
    fresh.execute(&tally(&s)).await.expect("executes");
    // 1,000 from the snapshot, then the Noted event (0) and three more ones.
    assert_eq!(decided_total(&*store, &s).await, 1_003);
}

/// A snapshot the stream does not prove is never decided on: one ahead of the stream
/// (versions it has not reached), one naming another event at its version (a store
/// restored from an older backup), one that does not decode, and one of another
/// schema version. Each time the executor reads the stream whole and decides on it.
pub async fn a_snapshot_its_stream_does_not_prove_is_never_used(store: impl EventStore) {
    if store.snapshots().is_none() {
        return;
    }
    let executor = CommandExecutor::new(store);
    let store = executor.store().clone();
    let snapshots = store.snapshots().expect("kept");
    let s = stream("snap-unproved");
    let last = add_ones(&*store, &s, 5).await;
    let read = store
        .read_streams(std::slice::from_ref(&s))
        .await
        .expect("read");
    let position = read.events[4].global_position.value();
    let cases: Vec<(&str, Snapshot)> = vec![
        (
            "ahead of the stream",
            planted(tally_key(&s, 1), 9, EventId::new(), position + 50, 1_000),
        ),
        (
            "another event at its version",
            planted(tally_key(&s, 1), 5, EventId::new(), position, 1_000),
        ),
        (
            "a last position before the event it names",
            planted(tally_key(&s, 1), 5, last, position - 1, 1_000),
        ),
        (
            "does not decode",
            Snapshot::new(
                tally_key(&s, 1),
                vec![SnapshotVersion {
                    version: StreamVersion::new(5),
                    event_id: Some(last),
                }],
                Some(GlobalPosition::new(position)),
                b"{\"total\": \"many\"}".to_vec(),
                chrono::Utc::now(),
            )
            .expect("valid"),
        ),
    ];
    let mut expected = 5;
    for (why, snapshot) in cases {
        snapshots
            .delete_snapshots(snapshot.key().name())
            .await
            .expect("delete");
        assert!(snapshots.save_snapshot(&snapshot).await.expect("save"));
        let fresh = CommandExecutor::from_shared(store.clone());
        fresh.execute(&tally(&s)).await.expect("executes");
        assert_eq!(decided_total(&*store, &s).await, expected, "{why}");
        fresh.flush_snapshots().await;
        // Forgotten, so that it does not stand in the way of the next one.
        assert_ne!(
            snapshots.load_snapshot(snapshot.key()).await.expect("load"),
            Some(snapshot),
            "{why}: still kept"
        );
        add_ones(&*store, &s, 1).await;
        expected += 1;
    }

    // Schema version 1 planted at the current point; a command at version 2 ignores it.
    let read = store
        .read_streams(std::slice::from_ref(&s))
        .await
        .expect("read");
    let last = read.events.last().expect("events");
    snapshots
        .delete_snapshots(tally_key(&s, 1).name())
        .await
        .expect("delete");
    let old = planted(
        tally_key(&s, 1),
        last.stream_version.value(),
        last.event_id,
        last.global_position.value(),
        1_000,
    );
    assert!(snapshots.save_snapshot(&old).await.expect("save"));
    let bumped = Tally {
        schema_version: 2,
        ..tally(&s)
    };
    let fresh = CommandExecutor::from_shared(store.clone());
    fresh.execute(&bumped).await.expect("executes");
    assert_eq!(
        decided_total(&*store, &s).await,
        expected,
        "another schema version"
    );
    // The same planted snapshot is used by a command still at version 1: it was only
    // the version that kept it out.
    let read = store
        .read_streams(std::slice::from_ref(&s))
        .await
        .expect("read");
    let last = read.events.last().expect("events");
    let current = planted(
        tally_key(&s, 1),
        last.stream_version.value(),
        last.event_id,
        last.global_position.value(),
        1_000,
    );
    snapshots
        .delete_snapshots(tally_key(&s, 1).name())
        .await
        .expect("delete");
    assert!(snapshots.save_snapshot(&current).await.expect("save"));
    let fresh = CommandExecutor::from_shared(store.clone());
    fresh.execute(&tally(&s)).await.expect("executes");
    assert_eq!(decided_total(&*store, &s).await, 1_000);
}

/// Snapshots are taken from the executor's own writes too, without reading: every 10
/// events folded (3 read, then one per command), at the version of the last event
/// folded, naming it, of the state as folded up to it.
pub async fn snapshots_are_taken_as_the_executor_writes(store: impl EventStore) {
    if store.snapshots().is_none() {
        return;
    }
    let executor = CommandExecutor::new(store);
    let store = executor.store().clone();
    let s = stream("snap-writes");
    add_ones(&*store, &s, 3).await;
    for _ in 0..22 {
        executor.execute(&tally(&s)).await.expect("executes");
    }
    executor.flush_snapshots().await;
    let taken = store
        .snapshots()
        .expect("kept")
        .load_snapshot(&tally_key(&s, 1))
        .await
        .expect("load")
        .expect("taken");
    let read = store
        .read_streams(std::slice::from_ref(&s))
        .await
        .expect("read");
    assert_eq!(read.events.len(), 25);
    assert_eq!(taken.versions()[0].version, StreamVersion::new(20));
    assert_eq!(taken.versions()[0].event_id, Some(read.events[19].event_id));
    assert_eq!(taken.last_position(), Some(read.events[19].global_position));
    assert_eq!(
        serde_json::from_slice::<Total>(taken.state()).expect("decodes"),
        Total { total: 3 }
    );
}
