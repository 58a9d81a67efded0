//! Persisted snapshots of command states: the first execution after a restart starts
//! from a snapshot instead of folding every event of its streams.
//!
//! A snapshot is the persisted tier of the state cache ([`crate::StateCache`]): a
//! command that allows caching can also allow snapshots
//! ([`crate::StateCache::with_snapshots`]), and its state is then saved now and then
//! (every [`Snapshots::every`] events folded) by a background task, never inside the
//! append. When an executor has no kept state for a command (a fresh process, a state
//! the cache forgot), it loads the snapshot, reads only the events after it, and decides
//! on that; the append checks every stream at the versions of the fold, as always, so a
//! write made after the load costs a conflict and a read, never a wrong decision. An
//! older snapshot only costs folding more events after it.
//!
//! A snapshot is only ever used for exactly what it was taken from ([`SnapshotKey`]):
//! the command type and its state type (by name), the streams folded (in order), and
//! the state's **schema version**, which the user bumps whenever `State` changes shape,
//! so an old snapshot is ignored rather than decoded into the wrong shape. It also names
//! the last event folded from each stream ([`SnapshotVersion`]): a snapshot whose
//! streams do not hold those events at those versions (a store restored from an older
//! backup, a snapshot ahead of its stream) is not used. A snapshot that does not decode
//! is ignored with a warning; nothing about snapshots ever fails a command.
//!
//! Stores keep them through [`SnapshotStore`]; [`crate::EventStore::snapshots`] hands
//! the executor a store's. The in-memory and PostgreSQL stores have one.

use async_trait::async_trait;
use chrono::{DateTime, Datelike, SubsecRound, Utc};

use crate::error::{Error, Result};
use crate::limits::MAX_POSITION;
use crate::types::{EventId, GlobalPosition, StreamId, StreamVersion};

/// The most bytes a snapshot's state may take (64 MiB, as an append).
pub const MAX_SNAPSHOT_BYTES: usize = crate::limits::MAX_APPEND_BYTES;

/// The most streams a snapshot may be folded from.
pub const MAX_SNAPSHOT_STREAMS: usize = crate::limits::MAX_STREAMS_PER_APPEND;

/// The longest snapshot name, in bytes.
pub const MAX_SNAPSHOT_NAME_BYTES: usize = 1_024;

/// What a snapshot was taken of: a name (the command type and state type, by their
/// Rust names, for the executor's snapshots), the streams folded, in order, and the
/// state's schema version. A snapshot is used only under exactly the same key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SnapshotKey {
    name: String,
    streams: Vec<StreamId>,
    schema_version: u32,
}

impl SnapshotKey {
    /// A key.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSnapshot`] when the name is empty, longer than
    /// [`MAX_SNAPSHOT_NAME_BYTES`] or holds a control character, or when the streams
    /// are none, more than [`MAX_SNAPSHOT_STREAMS`], or name one stream twice.
    pub fn new(
        name: impl Into<String>,
        streams: Vec<StreamId>,
        schema_version: u32,
    ) -> Result<Self> {
        let name = name.into();
        if name.is_empty() {
            return Err(invalid("the name is empty"));
        }
        if name.len() > MAX_SNAPSHOT_NAME_BYTES {
            return Err(invalid(format!(
                "the name is {} bytes long, more than {MAX_SNAPSHOT_NAME_BYTES}",
                name.len()
            )));
        }
        if name.chars().any(char::is_control) {
            return Err(invalid("the name holds a control character"));
        }
        if streams.is_empty() {
            return Err(invalid("no streams"));
        }
        if streams.len() > MAX_SNAPSHOT_STREAMS {
            return Err(invalid(format!(
                "{} streams, more than {MAX_SNAPSHOT_STREAMS}",
                streams.len()
            )));
        }
        for (index, stream) in streams.iter().enumerate() {
            if streams[..index].contains(stream) {
                return Err(invalid(format!("stream `{stream}` is named twice")));
            }
        }
        Ok(SnapshotKey {
            name,
            streams,
            schema_version,
        })
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The streams folded, in order.
    pub fn streams(&self) -> &[StreamId] {
        &self.streams
    }

    /// The state's schema version.
    pub fn schema_version(&self) -> u32 {
        self.schema_version
    }

    /// The key as one text, the same for equal keys and different for different ones
    /// (names and stream ids hold no control character, so the line breaks between
    /// them cannot be confused with their contents): what a backend may index.
    pub fn canonical(&self) -> String {
        let mut text = String::with_capacity(
            self.name.len()
                + 12
                + self
                    .streams
                    .iter()
                    .map(|s| s.as_str().len() + 1)
                    .sum::<usize>(),
        );
        text.push_str(&self.name);
        text.push('\n');
        text.push_str(&self.schema_version.to_string());
        for stream in &self.streams {
            text.push('\n');
            text.push_str(stream.as_str());
        }
        text
    }
}

/// Where a snapshot stands in one of its streams: the stream's version folded, and the
/// id of the event at that version (none at version 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotVersion {
    /// The stream's version folded.
    pub version: StreamVersion,
    /// The event at that version; `None` exactly when the version is 0.
    pub event_id: Option<EventId>,
}

/// A saved state: what it was taken of, how far it was folded, and the state itself,
/// encoded (JSON, for the executor's snapshots).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    key: SnapshotKey,
    versions: Vec<SnapshotVersion>,
    last_position: Option<GlobalPosition>,
    state: Vec<u8>,
    taken_at: DateTime<Utc>,
}

impl Snapshot {
    /// A snapshot of `key`'s streams folded to `versions` (one per stream, in the key's
    /// order), whose newest event folded is at `last_position`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSnapshot`] when there is not one version per stream, a version
    /// names an event at 0 or none above 0, a version or position is above
    /// [`MAX_POSITION`], `last_position` is missing while a stream was folded (or
    /// present while none was), the state is larger than [`MAX_SNAPSHOT_BYTES`], or
    /// `taken_at` is outside years 1 to 9999. `taken_at` is kept to the microsecond,
    /// as every backend keeps it.
    pub fn new(
        key: SnapshotKey,
        versions: Vec<SnapshotVersion>,
        last_position: Option<GlobalPosition>,
        state: Vec<u8>,
        taken_at: DateTime<Utc>,
    ) -> Result<Self> {
        if versions.len() != key.streams.len() {
            return Err(invalid(format!(
                "{} versions for {} streams",
                versions.len(),
                key.streams.len()
            )));
        }
        for (stream, at) in key.streams.iter().zip(&versions) {
            if at.version.value() > MAX_POSITION {
                return Err(invalid(format!(
                    "the version of `{stream}` is above {MAX_POSITION}"
                )));
            }
            if (at.version.value() == 0) != at.event_id.is_none() {
                return Err(invalid(format!(
                    "`{stream}` names an event exactly when its version is above 0"
                )));
            }
        }
        let folded_any = versions.iter().any(|at| at.version.value() > 0);
        match last_position {
            Some(position) if position.value() == 0 || position.value() > MAX_POSITION => {
                return Err(invalid(format!("last position {position} out of range")));
            }
            Some(_) if !folded_any => return Err(invalid("a last position, but nothing folded")),
            None if folded_any => return Err(invalid("events folded, but no last position")),
            _ => {}
        }
        if !(1..=9999).contains(&taken_at.year()) {
            return Err(invalid(format!(
                "taken_at {taken_at} is outside years 1 to 9999"
            )));
        }
        // What every backend keeps of a time: microseconds.
        let taken_at = taken_at.trunc_subsecs(6);
        if state.len() > MAX_SNAPSHOT_BYTES {
            return Err(invalid(format!(
                "the state is {} bytes, more than {MAX_SNAPSHOT_BYTES}",
                state.len()
            )));
        }
        Ok(Snapshot {
            key,
            versions,
            last_position,
            state,
            taken_at,
        })
    }

    /// What it was taken of.
    pub fn key(&self) -> &SnapshotKey {
        &self.key
    }

    /// Where it stands in each of the key's streams, in the key's order.
    pub fn versions(&self) -> &[SnapshotVersion] {
        &self.versions
    }

    /// The position of the newest event folded; `None` when nothing was.
    pub fn last_position(&self) -> Option<GlobalPosition> {
        self.last_position
    }

    /// The encoded state.
    pub fn state(&self) -> &[u8] {
        &self.state
    }

    /// When it was taken (by the clock of the process that took it).
    pub fn taken_at(&self) -> DateTime<Utc> {
        self.taken_at
    }

    /// Whether this snapshot is folded further than `other` (a higher last position):
    /// what [`SnapshotStore::save_snapshot`] keeps when two writers save the same key.
    pub fn is_further_than(&self, other: &Snapshot) -> bool {
        self.last_position > other.last_position
    }
}

/// Where snapshots are kept. Implemented by the stores that keep them; a store hands
/// its own to the executor through [`crate::EventStore::snapshots`].
#[async_trait]
pub trait SnapshotStore: Send + Sync + 'static {
    /// The snapshot saved under exactly `key`, if any.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] when the backend fails.
    async fn load_snapshot(&self, key: &SnapshotKey) -> Result<Option<Snapshot>>;

    /// Saves `snapshot` under its key, unless the one saved there is folded as far or
    /// further ([`Snapshot::is_further_than`]): of two writers saving at once, the
    /// further snapshot stays, whatever the order. Returns whether it was saved.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] when the backend fails.
    async fn save_snapshot(&self, snapshot: &Snapshot) -> Result<bool>;

    /// Forgets the snapshot saved under `snapshot`'s key if it is still that one (the
    /// same last position and time taken), and not one saved since. Returns whether it
    /// was forgotten. The executor forgets a snapshot its streams no longer prove, so
    /// that it does not stand in the way of the next.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] when the backend fails.
    async fn delete_snapshot(&self, snapshot: &Snapshot) -> Result<bool>;

    /// Forgets every snapshot whose name is `name` (all streams, all schema versions).
    /// Returns how many were forgotten.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] when the backend fails.
    async fn delete_snapshots(&self, name: &str) -> Result<u64>;
}

/// When the executor saves a command's state as a snapshot (see
/// [`crate::StateCache::with_snapshots`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshots {
    every: u64,
    schema_version: u32,
}

impl Snapshots {
    /// Saves the state once at least `events` events have been folded into it since
    /// the last snapshot (or since the start of its streams), counting every event
    /// folded: read, written by this executor, or brought by the log feed. A read that
    /// folds that many at once (the first read of a long stream) is followed by a
    /// snapshot at once. 0 is taken as 1.
    pub const fn every(events: u64) -> Self {
        Snapshots {
            every: if events == 0 { 1 } else { events },
            schema_version: 1,
        }
    }

    /// The version of the state's shape, 1 by default. Bump it whenever `State`
    /// changes in a way that would decode an old snapshot into a wrong value (a field
    /// whose meaning changed, a counter now folded differently, a change to `apply`):
    /// snapshots of another version are ignored and the streams are read whole, then
    /// snapshotted again under the new version.
    pub const fn with_schema_version(mut self, version: u32) -> Self {
        self.schema_version = version;
        self
    }

    /// Events folded between snapshots.
    pub const fn events(&self) -> u64 {
        self.every
    }

    /// The state's schema version.
    pub const fn schema_version(&self) -> u32 {
        self.schema_version
    }
}

impl Default for Snapshots {
    /// Every 1,000 events, schema version 1.
    fn default() -> Self {
        Snapshots::every(1_000)
    }
}

fn invalid(reason: impl Into<String>) -> Error {
    Error::InvalidSnapshot {
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(name: &str) -> StreamId {
        StreamId::try_new(name).expect("valid")
    }

    #[test]
    fn keys_refuse_what_no_backend_can_index() {
        for (name, streams) in [
            ("", vec![stream("a")]),
            ("n\u{0}", vec![stream("a")]),
            ("line\nbreak", vec![stream("a")]),
            ("n", vec![]),
            ("n", vec![stream("a"), stream("a")]),
        ] {
            assert!(
                matches!(
                    SnapshotKey::new(name, streams.clone(), 1),
                    Err(Error::InvalidSnapshot { .. })
                ),
                "{name:?} {streams:?}"
            );
        }
        let long = "x".repeat(MAX_SNAPSHOT_NAME_BYTES + 1);
        assert!(SnapshotKey::new(long, vec![stream("a")], 1).is_err());
        assert!(
            SnapshotKey::new("x".repeat(MAX_SNAPSHOT_NAME_BYTES), vec![stream("a")], 1).is_ok()
        );
    }

    #[test]
    fn canonical_texts_differ_when_keys_do() {
        let a = SnapshotKey::new("n", vec![stream("a"), stream("b")], 1).expect("valid");
        let b = SnapshotKey::new("n", vec![stream("b"), stream("a")], 1).expect("valid");
        let c = SnapshotKey::new("n", vec![stream("a"), stream("b")], 2).expect("valid");
        let d = SnapshotKey::new("n\u{a0}", vec![stream("a"), stream("b")], 1).expect("valid");
        let texts = [a.canonical(), b.canonical(), c.canonical(), d.canonical()];
        for (i, x) in texts.iter().enumerate() {
            for y in &texts[i + 1..] {
                assert_ne!(x, y);
            }
        }
        assert_eq!(a.canonical(), "n\n1\na\nb");
    }

    #[test]
    fn snapshots_refuse_versions_that_do_not_fit_their_key() {
        let key = SnapshotKey::new("n", vec![stream("a"), stream("b")], 1).expect("valid");
        let at = |v: u64, id: bool| SnapshotVersion {
            version: StreamVersion::new(v),
            event_id: id.then(EventId::new),
        };
        let make = |versions: Vec<SnapshotVersion>, last: Option<u64>| {
            Snapshot::new(
                key.clone(),
                versions,
                last.map(GlobalPosition::new),
                b"{}".to_vec(),
                Utc::now(),
            )
        };
        assert!(make(vec![at(1, true), at(0, false)], Some(4)).is_ok());
        assert!(make(vec![at(0, false), at(0, false)], None).is_ok());
        for (versions, last) in [
            (vec![at(1, true)], Some(4)),
            (vec![at(1, false), at(0, false)], Some(4)),
            (vec![at(0, true), at(0, false)], None),
            (vec![at(1, true), at(0, false)], None),
            (vec![at(0, false), at(0, false)], Some(1)),
            (vec![at(1, true), at(0, false)], Some(0)),
            (vec![at(MAX_POSITION + 1, true), at(0, false)], Some(4)),
        ] {
            assert!(
                matches!(
                    make(versions.clone(), last),
                    Err(Error::InvalidSnapshot { .. })
                ),
                "{versions:?} {last:?}"
            );
        }
        let big = Snapshot::new(
            key.clone(),
            vec![at(0, false), at(0, false)],
            None,
            vec![b' '; MAX_SNAPSHOT_BYTES + 1],
            Utc::now(),
        );
        assert!(matches!(big, Err(Error::InvalidSnapshot { .. })));
    }

    #[test]
    fn every_zero_is_every_event() {
        assert_eq!(Snapshots::every(0).events(), 1);
        assert_eq!(Snapshots::default().events(), 1_000);
        assert_eq!(
            Snapshots::every(5).with_schema_version(3).schema_version(),
            3
        );
    }
}
