//! The state cache: folded states of commands that allow it, kept between executions
//! (opt-in per command type with [`CommandLogic::state_cache`]), and the executor's
//! cached path that uses them.
//!
//! # Invariants
//!
//! What must hold for a decision taken on a kept state to be the decision taken after
//! reading the streams whole. Every rule below is relied on by the code of this module;
//! the user's side of the contract is the first one.
//!
//! 1. **`apply` is a fold of the event alone.** It reads nothing of the command
//!    (`self`), so one kept state serves every command of the type over the same
//!    streams and can be brought forward by whichever of them wrote. The user promises
//!    this by opting in; nothing here can check it.
//! 2. **A key names exactly what was folded**: the command's `TypeId` and the streams
//!    the state is folded from, in declared order ([`StateKey`]). States are kept only
//!    for the command's own type ([`StateCache::for_command`] with a different type
//!    than the executing command turns caching off, by type name), and only when every
//!    folded stream is declared; otherwise the uncached path runs.
//! 3. **An entry is the fold of its streams' events up to its versions, in global
//!    order** ([`CachedState::versions`], [`CachedState::last_position`]). It is
//!    extended only with an answer that follows on: for every folded stream exactly the
//!    events between the kept version and the current one, the first of them after the
//!    newest event already folded. Anything else (a commit that became visible late, a
//!    store that answered short) drops the entry and the streams are read whole.
//! 4. **Nobody shares a mutable state.** A checkout is a copy; the cache keeps its own.
//!    [`StateCacheMap::put`] never replaces a state folded further than the one offered
//!    (a concurrent execution got there first).
//! 5. **Only an append proves a kept state current.** A decision is taken without
//!    reading only on an entry marked current whose declared streams all have a known
//!    version, and the append checks every declared stream at those versions: if
//!    anything was written meanwhile, by anyone, it conflicts, the entry is marked
//!    behind, and the executor reads what is new and decides again (one more round
//!    trip, not a retry). A decision that writes nothing, or refuses, is never taken
//!    on an unproven state: it is taken again after reading.
//! 6. **Own writes bring states forward only from the versions the append checked.**
//!    After a successful append, the key's entry and the single-stream entries of each
//!    stream written are extended with the recorded events (the very ones a read would
//!    return) when their kept versions are exactly the checked ones; an entry at other
//!    versions, or whose events do not decode or whose `apply` panics, is marked
//!    behind. A deduplicated outcome, or one without recording times, extends nothing
//!    and marks the key's own entry behind; the single-stream entries stay as they
//!    were, which is safe by rule 5 (deciding on them unread ends in a conflict if they
//!    are behind).
//! 7. **Doubt marks behind.** A conflict or an unknown outcome on a cached append
//!    marks the entry behind; the next execution reads before deciding. One exception:
//!    a conflict that names only streams the state is not folded from (a transfer's
//!    destination) says nothing of the state, only those streams' versions; they are
//!    learned and the decision is taken again on the kept state at once (at most
//!    `MAX_UNFOLDED_CONFLICTS` times), the append checking every stream as always.
//! 8. **Turning the cache off changes no decision.** A state folded from some streams
//!    only ([`StateCache::folded_from`]) sees only their events on the uncached path
//!    too ([`super::decide`]). One difference remains: the uncached path decodes every
//!    event it read, so an event of a stream not folded that does not decode fails the
//!    execution there, while the cached path never reads it.
//! 9. **Forgetting is always safe.** The map holds at most `capacity` entries and as
//!    many known versions; a full map drops an arbitrary one, which is read again when
//!    next needed. Capacity 0 turns the cache off.
//! 10. **The log feed only suggests** (`feed.rs`, opt-in). Events it read from the log
//!     are folded into a checked-out copy only when they follow on exactly as a read's
//!     answer must (rule 3: contiguous versions from the kept ones for every folded
//!     stream, the first after `last_position`); the state is then decided on without
//!     reading, which rule 5 makes safe.
//! 11. **A snapshot is a kept state only once its streams prove it** (opt-in,
//!     [`StateCache::with_snapshots`], ADR 0013). With nothing kept, the executor loads
//!     the key's snapshot and reads each folded stream from one before its version: the
//!     state is used only when every stream holds, at the snapshot's version, the very
//!     event the snapshot names, the newest of those is at its last position, and the
//!     events after it follow on as rule 3 requires. Anything else (or a state that
//!     does not decode, or an `apply` that panics on it) reads whole and forgets the
//!     snapshot. Snapshots are saved by background tasks, of copies whose versions and
//!     event ids were tracked with them (`SnapshotTrack`), never inside an append.
//!
//! Why a cache, what it costs, and the snapshots behind it: ADR 0005
//! (`docs/adr/0005-state-cache.md`) and ADR 0013 (`docs/adr/0013-snapshots.md`).

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tracing::{Instrument, field};

use super::CommandExecutor;
use super::decide::{build_request, decide_from};
use super::feed::Fed;
use crate::command::{Command, StateCacheOps, StreamWrite};
#[cfg(doc)]
use crate::command::{CommandLogic, StateCache};
use crate::error::{Error, Result};
use crate::event::{EventData, RecordedEvent};
use crate::metadata::EventMetadata;
use crate::snapshot::{Snapshot, SnapshotVersion};
use crate::store::{AppendOutcome, AppendRequest, StreamsSnapshot};
use crate::types::{
    EventId, ExpectedVersion, GlobalPosition, IdempotencyKey, StreamId, StreamVersion,
};

impl CommandExecutor {
    /// The cached path of one attempt; `None` when it does not apply (the command asked
    /// for more streams than it declares, or its cache settings do not fit), and the
    /// uncached path runs instead.
    ///
    /// First without reading: when the kept state is not known to be behind and the
    /// version of every other declared stream is known, `handle` decides on it and the
    /// append checks every stream at those versions. That is the whole optimistic check:
    /// had anything been written since, the append conflicts. Only an append can prove
    /// the state current, so a decision that writes nothing (or a refusal) is not
    /// trusted: it is taken again after reading, as is a decision whose append
    /// conflicted (that conflict is not counted as an attempt).
    ///
    /// Otherwise the events appended since the kept versions are read and folded into a
    /// copy of the kept state, or the streams are read whole when nothing is kept.
    /// Executions over the same streams each work on a copy, so none of them has to
    /// read from the start while another one holds the state.
    pub(super) async fn attempt_cached<C: Command>(
        &self,
        command: &C,
        declared: &[StreamId],
        ops: &StateCacheOps<C::State>,
        metadata: &EventMetadata,
        idempotency_key: Option<&IdempotencyKey>,
    ) -> Result<Option<AppendOutcome>> {
        // A state kept under another command's type would be shared with it.
        if ops.command_name != std::any::type_name::<C>() {
            tracing::debug!(
                command = std::any::type_name::<C>(),
                cached_as = ops.command_name,
                "state cache keyed by another type; not caching"
            );
            return Ok(None);
        }
        let folded: &[StreamId] = ops.only.as_deref().unwrap_or(declared);
        if !folded.iter().all(|stream| declared.contains(stream)) {
            tracing::debug!(
                command = command.command_name(),
                "state cache folded from undeclared streams; not caching"
            );
            return Ok(None);
        }
        let key = StateKey {
            command: ops.command,
            streams: folded.to_vec(),
        };

        // A conflict only on streams the state is not folded from (a transfer's `to`)
        // says all that was missing: their versions. The kept state is as current as
        // before, so the decision is taken again on it at once, with those versions;
        // a few times at most, then the streams are read.
        let mut unfolded_conflicts = 0;
        // Started here, at the first cached execution, so it knows the streams from then.
        let feeding = self.feeds();
        let checkout = || {
            self.states.checkout(&key, ops).map(|kept| {
                if feeding {
                    self.states.forward_from_feed(command, ops, &key, kept)
                } else {
                    kept
                }
            })
        };
        while let Some(kept) = checkout()
            && kept.current
            && let Some(versions) = self.states.known_versions(declared, folded, &kept.versions)
            && let Ok(decision) = decide_from(command, declared, kept.state)
            && decision.more_streams.is_empty()
            && !decision.writes.is_empty()
        {
            let snapshot = StreamsSnapshot {
                events: Vec::new(),
                versions,
            };
            match self
                .append_cached(
                    command,
                    ops,
                    &key,
                    declared,
                    &snapshot,
                    decision.writes,
                    metadata,
                    idempotency_key,
                )
                .await
            {
                Err(conflict @ Error::VersionConflict { .. }) => {
                    crate::metrics::attempt_failed(command.command_name(), &conflict);
                    // `append_cached` learned their versions and kept the state current.
                    if unfolded_conflicts < MAX_UNFOLDED_CONFLICTS
                        && unfolded_only(&conflict, folded).is_some()
                    {
                        unfolded_conflicts += 1;
                        tracing::debug!(
                            command = command.command_name(),
                            "streams not folded had moved; deciding again on the kept state"
                        );
                        continue;
                    }
                    tracing::debug!(
                        command = command.command_name(),
                        "kept state was behind; reading what is new"
                    );
                    break;
                }
                other => return other.map(Some),
            }
        }

        // Folded streams after the kept versions (or whole); the others for their
        // versions only.
        let wanted = |kept: Option<&[StreamVersion]>| -> Vec<(StreamId, StreamVersion)> {
            declared
                .iter()
                .map(|stream| {
                    let after = match folded.iter().position(|s| s == stream) {
                        Some(index) => kept
                            .and_then(|versions| versions.get(index).copied())
                            .unwrap_or(StreamVersion::INITIAL),
                        None => StreamVersion::new(u64::MAX),
                    };
                    (stream.clone(), after)
                })
                .collect()
        };
        let tracked = ops.snapshots.is_some();
        let mut brought_up = None;
        if let Some(kept) = self.states.checkout(&key, ops) {
            let read = self
                .store
                .read_streams_after(&wanted(Some(&kept.versions)))
                .await?;
            // Folding must follow global order: an event older than the newest one
            // already folded (a commit that was slow to become visible) means the kept
            // state cannot simply be extended.
            let in_order = read.events.first().is_none_or(|first| {
                kept.last_position
                    .is_none_or(|last| first.global_position > last)
            });
            // The answer must follow on from the kept versions: exactly the events
            // between the kept version and the current one, for every folded stream.
            let follows_on = folded.iter().zip(&kept.versions).all(|(stream, kept)| {
                let now = read.version_of(stream);
                let new = read
                    .events
                    .iter()
                    .filter(|e| &e.stream_id == stream)
                    .count();
                now >= *kept
                    && u64::try_from(new).is_ok_and(|new| now.value() - kept.value() == new)
            });
            if in_order && follows_on {
                let mut state = kept.state;
                let mut last_position = kept.last_position;
                for event in &read.events {
                    command.apply(&mut state, &event.decode::<C::Event>()?);
                    last_position = Some(event.global_position);
                }
                let track = kept.snapshot.after(tracked, folded, &read.events);
                brought_up = Some((state, last_position, read, track));
            } else {
                self.states.drop_entry(&key, &kept.versions);
            }
        } else if tracked {
            brought_up = self
                .state_from_snapshot(command, ops, declared, folded)
                .await?;
        }
        let (state, last_position, snapshot, track) = match brought_up {
            Some(brought_up) => brought_up,
            None => {
                let read = self.store.read_streams_after(&wanted(None)).await?;
                let mut state = C::State::default();
                for event in &read.events {
                    command.apply(&mut state, &event.decode::<C::Event>()?);
                }
                let last_position = read.events.last().map(|e| e.global_position);
                let track = SnapshotTrack::default().after(tracked, folded, &read.events);
                (state, last_position, read, track)
            }
        };
        self.states.learn_versions(&snapshot.versions);
        let versions: Vec<StreamVersion> = folded.iter().map(|s| snapshot.version_of(s)).collect();
        let track = self.snapshot_if_due(ops, &key, &versions, last_position, &state, track);
        self.states.put(
            key.clone(),
            CachedState {
                versions,
                last_position,
                state: (ops.keep)(&state),
                current: true,
                snapshot: track,
            },
        );
        let decision = decide_from(command, declared, state)?;
        if !decision.more_streams.is_empty() {
            return Ok(None);
        }
        // Nothing to write and nothing to remember: no append.
        if decision.writes.is_empty() && (idempotency_key.is_none() || declared.is_empty()) {
            return Ok(Some(AppendOutcome::written(Vec::new())));
        }
        self.append_cached(
            command,
            ops,
            &key,
            declared,
            &snapshot,
            decision.writes,
            metadata,
            idempotency_key,
        )
        .await
        .map(Some)
    }

    /// Appends a decision taken on the kept state of `key` (as of `snapshot`'s
    /// versions), then brings the kept states its events belong to forward.
    #[allow(clippy::too_many_arguments)]
    async fn append_cached<C: Command>(
        &self,
        command: &C,
        ops: &StateCacheOps<C::State>,
        key: &StateKey,
        declared: &[StreamId],
        snapshot: &StreamsSnapshot,
        writes: Vec<StreamWrite<C::StreamSet, C::Event>>,
        metadata: &EventMetadata,
        idempotency_key: Option<&IdempotencyKey>,
    ) -> Result<AppendOutcome> {
        let mut request = build_request(declared, snapshot, writes, metadata)?;
        request.idempotency_key = idempotency_key.cloned();
        let written = OwnWrites::of(&request);
        match self.store.append(request).await {
            Ok(outcome) => {
                self.keep_own_writes(command, ops, key, &written, &outcome);
                Ok(outcome)
            }
            Err(error) => {
                if let Some(moved) = unfolded_only(&error, &key.streams) {
                    // Only streams not folded moved: the state is as current as it was,
                    // and their versions are what the next decision needs (here or at
                    // the next attempt).
                    self.states.learn_versions(&moved);
                } else if matches!(
                    error,
                    Error::VersionConflict { .. } | Error::OutcomeUnknown { .. }
                ) {
                    let versions: Vec<StreamVersion> =
                        key.streams.iter().map(|s| snapshot.version_of(s)).collect();
                    self.states.mark_behind(key, &versions);
                }
                Err(error)
            }
        }
    }

    /// After a successful append: the known versions of its streams, and the kept
    /// states of this command type over them (this execution's, and the single-stream
    /// ones of each stream it wrote, as a transfer's `to` is another transfer's `from`)
    /// brought forward with its events when they were at the versions the append
    /// checked, or marked as behind. Needs every event's recording time from the store
    /// (the very one a read returns); without it, the state is only marked as behind.
    fn keep_own_writes<C: Command>(
        &self,
        command: &C,
        ops: &StateCacheOps<C::State>,
        key: &StateKey,
        written: &OwnWrites,
        outcome: &AppendOutcome,
    ) {
        let checked_versions = |streams: &[StreamId]| -> Option<Vec<StreamVersion>> {
            streams
                .iter()
                .map(|stream| {
                    written
                        .streams
                        .iter()
                        .find(|s| s.stream == *stream)
                        .and_then(|s| s.expected)
                })
                .collect()
        };
        let recorded = if outcome.deduplicated {
            None
        } else {
            written.recorded(outcome)
        };
        let Some(recorded) = recorded else {
            if let Some(versions) = checked_versions(&key.streams) {
                self.states.mark_behind(key, &versions);
            }
            return;
        };
        self.states.learn_versions(&written.versions_after(outcome));
        let mut targets = vec![key.clone()];
        for written_stream in &written.streams {
            let single = StateKey {
                command: key.command,
                streams: vec![written_stream.stream.clone()],
            };
            if written_stream.events > 0 && !targets.contains(&single) {
                targets.push(single);
            }
        }
        for target in targets {
            let Some(kept) = self.states.checkout(&target, ops) else {
                continue;
            };
            if checked_versions(&target.streams).as_ref() != Some(&kept.versions) {
                self.states.mark_behind(&target, &kept.versions);
                continue;
            }
            let mut state = kept.state;
            let mut last_position = kept.last_position;
            let mut folded_all = true;
            let own = || {
                recorded
                    .iter()
                    .filter(|e| target.streams.contains(&e.stream_id))
            };
            for event in own() {
                let Ok(typed) = event.decode::<C::Event>() else {
                    folded_all = false;
                    break;
                };
                // The append has committed: an `apply` that panics here (one that breaks
                // the contract and reads `self`) must not make a written command look
                // failed. The state is not kept.
                let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    command.apply(&mut state, &typed);
                }));
                if applied.is_err() {
                    folded_all = false;
                    break;
                }
                last_position = Some(event.global_position);
            }
            let versions = target
                .streams
                .iter()
                .map(|stream| written.version_after(stream, outcome))
                .collect::<Option<Vec<_>>>();
            match versions {
                Some(versions) if folded_all => {
                    let track =
                        kept.snapshot
                            .after(ops.snapshots.is_some(), &target.streams, own());
                    let track =
                        self.snapshot_if_due(ops, &target, &versions, last_position, &state, track);
                    self.states.put(
                        target,
                        CachedState {
                            versions,
                            last_position,
                            state: (ops.boxed)(state),
                            current: true,
                            snapshot: track,
                        },
                    );
                }
                _ => self.states.mark_behind(&target, &kept.versions),
            }
        }
    }
}

impl CommandExecutor {
    /// The kept state of `folded` from the command's snapshot and the events after it,
    /// read with the versions of the other declared streams; `None` when there is no
    /// snapshot, or it cannot be used (it does not decode, its streams do not hold the
    /// events it names at its versions, the events after it do not follow on), and the
    /// streams are then read whole. Only the store's read can fail the execution here.
    async fn state_from_snapshot<C: Command>(
        &self,
        command: &C,
        ops: &StateCacheOps<C::State>,
        declared: &[StreamId],
        folded: &[StreamId],
    ) -> Result<Option<Brought<C::State>>> {
        let (Some(settings), Some(snapshots), Some(key)) = (
            ops.snapshots.as_ref(),
            self.store.snapshots(),
            ops.snapshot_key(folded),
        ) else {
            return Ok(None);
        };
        let span = tracing::debug_span!(
            "eventcore.snapshot.load",
            command = command.command_name(),
            used = field::Empty,
            folded_after = field::Empty,
        );
        let loaded = match snapshots.load_snapshot(&key).instrument(span.clone()).await {
            Ok(Some(loaded)) => loaded,
            Ok(None) => return Ok(None),
            Err(error) => {
                tracing::warn!(parent: &span, command = command.command_name(), error = %crate::error_chain(&error), "loading a snapshot failed; reading the streams whole");
                crate::metrics::snapshot_ignored(command.command_name());
                return Ok(None);
            }
        };
        if loaded.key() != &key {
            tracing::warn!(parent: &span, command = command.command_name(), "the store returned a snapshot of another key; reading the streams whole");
            crate::metrics::snapshot_ignored(command.command_name());
            return Ok(None);
        }
        match prove(
            command,
            settings,
            folded,
            declared,
            &loaded,
            self.store.as_ref(),
            &span,
        )
        .await?
        {
            Ok(brought) => {
                span.record("used", true);
                span.record("folded_after", brought.2.events.len());
                crate::metrics::snapshot_loaded(command.command_name());
                Ok(Some(brought))
            }
            Err(why) => {
                span.record("used", false);
                tracing::warn!(parent: &span, command = command.command_name(), snapshot = key.name(), "{why}; the snapshot is not used, the streams are read whole");
                crate::metrics::snapshot_ignored(command.command_name());
                // Forgotten (unless another was saved meanwhile), so that it does not
                // stand in the way of the next one: a snapshot no longer proved by its
                // streams would be loaded, and refused, at every start. In the
                // background, as saves are, and not at all without a free slot (the
                // next start meets it again).
                if let (Ok(runtime), Some(slot)) = (
                    tokio::runtime::Handle::try_current(),
                    self.states.saves.start(),
                ) {
                    let store = self.store.clone();
                    runtime.spawn(
                        async move {
                            let _slot = slot;
                            if let Some(snapshots) = store.snapshots()
                                && let Err(error) = snapshots.delete_snapshot(&loaded).await
                            {
                                tracing::warn!(error = %crate::error_chain(&error), "forgetting an unusable snapshot failed");
                            }
                        }
                        .instrument(span.clone()),
                    );
                }
                Ok(None)
            }
        }
    }

    /// `track`, after starting to save `state` (kept for `key` at `versions`) as a
    /// snapshot in the background when enough events were folded since the last one;
    /// its count then starts again. Nothing is saved without a Tokio runtime, without a
    /// store that keeps snapshots, or while too many saves are under way (the count
    /// stands, and the next fold tries again).
    fn snapshot_if_due<S>(
        &self,
        ops: &StateCacheOps<S>,
        key: &StateKey,
        versions: &[StreamVersion],
        last_position: Option<GlobalPosition>,
        state: &S,
        track: SnapshotTrack,
    ) -> SnapshotTrack {
        let Some(settings) = ops.snapshots.as_ref() else {
            return track;
        };
        if track.unsaved < settings.settings.events() || track.anchors.len() != versions.len() {
            return track;
        }
        let (Some(_), Some(snapshot_key), Ok(runtime)) = (
            self.store.snapshots(),
            ops.snapshot_key(&key.streams),
            tokio::runtime::Handle::try_current(),
        ) else {
            return track;
        };
        let Some(slot) = self.states.saves.start() else {
            return track;
        };
        let at: Vec<SnapshotVersion> = versions
            .iter()
            .zip(&track.anchors)
            .map(|(version, event_id)| SnapshotVersion {
                version: *version,
                event_id: *event_id,
            })
            .collect();
        let copy = (ops.keep)(state);
        let (encode, recode) = (settings.encode, settings.recode);
        let store = self.store.clone();
        let span = tracing::debug_span!(
            parent: None,
            "eventcore.snapshot.save",
            snapshot = snapshot_key.name(),
            position = last_position.map(|p| p.value()),
        );
        runtime.spawn(
            async move {
                let _slot = slot;
                let name = snapshot_key.name().to_owned();
                // Encoding a large state takes a while: not on a worker of the runtime.
                // The bytes must decode into a state that encodes to them again, or the
                // snapshot would not be the state (a field serde skips or loses).
                let encoded = tokio::task::spawn_blocking(move || {
                    let bytes = encode(copy)?.ok()?;
                    if bytes.len() > crate::snapshot::MAX_SNAPSHOT_BYTES {
                        return None;
                    }
                    // Compared as JSON values: a map's keys may come out in another order.
                    let again = recode(&bytes)?;
                    let same = serde_json::from_slice::<serde_json::Value>(&bytes).ok()?
                        == serde_json::from_slice::<serde_json::Value>(&again).ok()?;
                    same.then_some(bytes)
                })
                .await;
                let Ok(Some(bytes)) = encoded else {
                    crate::metrics::snapshot_saved(None);
                    tracing::warn!(snapshot = %name, "the state does not encode, is larger than a snapshot may be, or its JSON does not decode and encode to the same JSON again; no snapshot taken");
                    return;
                };
                let snapshot = match Snapshot::new(snapshot_key, at, last_position, bytes, chrono::Utc::now()) {
                    Ok(snapshot) => snapshot,
                    Err(error) => {
                        crate::metrics::snapshot_saved(None);
                        tracing::warn!(snapshot = %name, error = %error, "no snapshot taken");
                        return;
                    }
                };
                let Some(snapshots) = store.snapshots() else {
                    return;
                };
                match snapshots.save_snapshot(&snapshot).await {
                    Ok(saved) => {
                        crate::metrics::snapshot_saved(Some(saved));
                        tracing::debug!(snapshot = %name, saved, "snapshot taken");
                    }
                    Err(error) => {
                        crate::metrics::snapshot_saved(None);
                        tracing::warn!(snapshot = %name, error = %crate::error_chain(&error), "saving a snapshot failed");
                    }
                }
            }
            .instrument(span),
        );
        SnapshotTrack {
            anchors: track.anchors,
            unsaved: 0,
        }
    }
}

/// `loaded` proved by its streams and brought up to date with the events after it, or
/// why it cannot be (`Err` inside): it does not decode, a stream does not hold the event
/// it names at its version, its last position is not that of its newest event, the
/// events after it do not follow on, or `apply` panics on them. Only the read's and the
/// events' own errors are errors.
async fn prove<C: Command>(
    command: &C,
    settings: &crate::command::SnapshotOps<C::State>,
    folded: &[StreamId],
    declared: &[StreamId],
    loaded: &Snapshot,
    store: &dyn crate::store::EventStore,
    span: &tracing::Span,
) -> Result<std::result::Result<Brought<C::State>, &'static str>> {
    if loaded.versions().len() != folded.len() || loaded.key().streams() != folded {
        return Ok(Err("the store returned a snapshot of another key"));
    }
    let Ok(mut state) = (settings.decode)(loaded.state()) else {
        return Ok(Err("the snapshot does not decode into the state"));
    };
    // Read from the event each stream was folded to, so that the stream can be seen to
    // hold it.
    let wanted: Vec<(StreamId, StreamVersion)> = declared
        .iter()
        .map(|stream| {
            let after = match folded.iter().position(|s| s == stream) {
                Some(index) => {
                    StreamVersion::new(loaded.versions()[index].version.value().saturating_sub(1))
                }
                None => StreamVersion::new(u64::MAX),
            };
            (stream.clone(), after)
        })
        .collect();
    let read = store
        .read_streams_after(&wanted)
        .instrument(span.clone())
        .await?;
    let mut anchored = vec![false; folded.len()];
    let mut newest_anchor: Option<GlobalPosition> = None;
    let mut events = Vec::with_capacity(read.events.len());
    for event in read.events {
        let Some(index) = folded.iter().position(|s| *s == event.stream_id) else {
            return Ok(Err("the store returned events of a stream not asked for"));
        };
        let at = loaded.versions()[index];
        if at.version.value() > 0 && event.stream_version == at.version {
            if at.event_id != Some(event.event_id) {
                return Ok(Err(
                    "a stream holds another event at the snapshot's version",
                ));
            }
            anchored[index] = true;
            newest_anchor = newest_anchor.max(Some(event.global_position));
        } else {
            events.push(event);
        }
    }
    let anchors_found = loaded
        .versions()
        .iter()
        .zip(&anchored)
        .all(|(at, found)| at.version.value() == 0 || *found);
    if !anchors_found {
        return Ok(Err(
            "a stream does not hold the event the snapshot was folded to",
        ));
    }
    // The newest event folded is the newest of the events it names: what the order of
    // the events after it is checked against.
    if newest_anchor != loaded.last_position() {
        return Ok(Err(
            "its last position is not that of the newest event it names",
        ));
    }
    let follows_on = folded.iter().zip(loaded.versions()).all(|(stream, at)| {
        let now = read
            .versions
            .iter()
            .find(|(s, _)| s == stream)
            .map(|(_, v)| *v);
        let new = events.iter().filter(|e| &e.stream_id == stream).count();
        now.is_some_and(|now| {
            now >= at.version
                && u64::try_from(new).is_ok_and(|new| now.value() - at.version.value() == new)
        })
    });
    let in_order = events.first().is_none_or(|first| {
        loaded
            .last_position()
            .is_none_or(|last| first.global_position > last)
    });
    if !follows_on || !in_order {
        return Ok(Err(
            "the events after the snapshot do not follow on from it",
        ));
    }
    let typed = events
        .iter()
        .map(|event| event.decode::<C::Event>())
        .collect::<Result<Vec<_>>>()?;
    // A state of an older shape (a schema version not bumped) can break what `apply`
    // relies on: a panic here is the snapshot's fault, and the streams are read whole.
    let folded_after = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for event in &typed {
            command.apply(&mut state, event);
        }
    }));
    if folded_after.is_err() {
        return Ok(Err("apply panicked on the snapshot's state"));
    }
    let last_position = events
        .last()
        .map(|e| e.global_position)
        .or(loaded.last_position());
    let track = SnapshotTrack {
        anchors: loaded.versions().iter().map(|at| at.event_id).collect(),
        unsaved: 0,
    }
    .after(true, folded, &events);
    let snapshot = StreamsSnapshot {
        events,
        versions: read.versions,
    };
    Ok(Ok((state, last_position, snapshot, track)))
}

/// A state brought up to date: the state, the position of its newest event, the read
/// it was brought up with (events and versions), and its snapshot track.
type Brought<S> = (S, Option<GlobalPosition>, StreamsSnapshot, SnapshotTrack);

/// The most snapshots an executor saves at once: each takes a connection of the
/// store's, which commands need more.
const MAX_SAVES_IN_FLIGHT: usize = 2;

/// Snapshots being saved, counted so that [`CommandExecutor::flush_snapshots`] can wait
/// for them and their number stays bounded.
#[derive(Default)]
pub(super) struct SavesInFlight {
    count: std::sync::atomic::AtomicUsize,
    done: tokio::sync::Notify,
}

/// One save under way; ends (and wakes waiters) when dropped.
struct SaveSlot(Arc<SavesInFlight>);

impl Drop for SaveSlot {
    fn drop(&mut self) {
        self.0
            .count
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.0.done.notify_waiters();
    }
}

impl SavesInFlight {
    fn start(self: &Arc<Self>) -> Option<SaveSlot> {
        use std::sync::atomic::Ordering;
        self.count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_SAVES_IN_FLIGHT).then_some(n + 1)
            })
            .ok()
            .map(|_| SaveSlot(self.clone()))
    }

    /// Waits until no save is under way.
    pub(super) async fn settled(&self) {
        loop {
            let done = self.done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if self.count.load(std::sync::atomic::Ordering::Acquire) == 0 {
                return;
            }
            done.await;
        }
    }
}

/// How many times in a row a decision on a kept state is taken again after conflicts
/// only on streams it is not folded from.
const MAX_UNFOLDED_CONFLICTS: u32 = 3;

/// The actual versions of the conflicting streams, when a conflict names only streams
/// that are not in `folded` (and each at least once); `None` otherwise.
fn unfolded_only(error: &Error, folded: &[StreamId]) -> Option<Vec<(StreamId, StreamVersion)>> {
    let Error::VersionConflict { conflicts } = error else {
        return None;
    };
    if conflicts.is_empty() || conflicts.iter().any(|c| folded.contains(&c.stream)) {
        return None;
    }
    Some(
        conflicts
            .iter()
            .map(|c| (c.stream.clone(), c.actual))
            .collect(),
    )
}

/// The cache key: the command type and the streams it declared, in order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct StateKey {
    command: TypeId,
    streams: Vec<StreamId>,
}

/// A folded state, as of the given versions of the key's streams.
struct CachedState {
    versions: Vec<StreamVersion>,
    /// The position of the newest event folded in.
    last_position: Option<GlobalPosition>,
    state: Box<dyn Any + Send>,
    /// Read, or brought forward with this executor's own append, and not known to be
    /// behind since: worth deciding on without reading first.
    current: bool,
    /// With snapshots: what a snapshot of this state names.
    snapshot: SnapshotTrack,
}

/// A copy of a kept state, with what it was folded to.
struct Checkout<S> {
    versions: Vec<StreamVersion>,
    last_position: Option<GlobalPosition>,
    current: bool,
    state: S,
    snapshot: SnapshotTrack,
}

/// What a kept state needs to be saved as a snapshot: the id of the event at each
/// folded stream's version (`None` at version 0), and how many events were folded since
/// the last snapshot. Kept only for commands with snapshots (`anchors` is empty
/// otherwise, and no snapshot is ever taken of it).
#[derive(Clone, Default)]
struct SnapshotTrack {
    anchors: Vec<Option<EventId>>,
    unsaved: u64,
}

impl SnapshotTrack {
    /// The track after folding `events` (in global order) into a state of `streams`
    /// tracked by `self`; `None` for commands without snapshots.
    fn after<'e>(
        &self,
        tracked: bool,
        streams: &[StreamId],
        events: impl IntoIterator<Item = &'e RecordedEvent>,
    ) -> SnapshotTrack {
        if !tracked {
            return SnapshotTrack::default();
        }
        let mut anchors = if self.anchors.len() == streams.len() {
            self.anchors.clone()
        } else {
            vec![None; streams.len()]
        };
        let mut folded = 0u64;
        for event in events {
            if let Some(index) = streams.iter().position(|s| *s == event.stream_id) {
                anchors[index] = Some(event.event_id);
                folded += 1;
            }
        }
        SnapshotTrack {
            anchors,
            unsaved: self.unsaved.saturating_add(folded),
        }
    }
}

/// Folded states of commands that allow caching, and the last version seen of each
/// stream they read, shared by an executor's clones.
pub(super) struct StateCacheMap {
    pub(super) capacity: usize,
    inner: Mutex<CacheInner>,
    /// Snapshots of these states being saved.
    pub(super) saves: Arc<SavesInFlight>,
}

#[derive(Default)]
struct CacheInner {
    entries: HashMap<StateKey, CachedState>,
    /// A stream's highest version seen in a read or an append of this executor (or, with
    /// the log feed, in the log): what a decision without reading expects of a stream it
    /// does not fold.
    versions: HashMap<StreamId, StreamVersion>,
    /// With the log feed: the latest events of the streams in `versions`.
    fed: Fed,
}

impl StateCacheMap {
    pub(super) fn new(capacity: usize, saves: Arc<SavesInFlight>) -> Self {
        StateCacheMap {
            capacity,
            inner: Mutex::new(CacheInner::default()),
            saves,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A copy of the state kept for `key` (the cache keeps its own); `None` when there is
    /// none, or it is not an `S` (then it is dropped).
    fn checkout<S>(&self, key: &StateKey, ops: &StateCacheOps<S>) -> Option<Checkout<S>> {
        let mut inner = self.lock();
        let entry = inner.entries.get_mut(key)?;
        let kept = std::mem::replace(&mut entry.state, Box::new(()));
        let Some(state) = (ops.take)(kept) else {
            inner.entries.remove(key);
            return None;
        };
        entry.state = (ops.keep)(&state);
        Some(Checkout {
            versions: entry.versions.clone(),
            last_position: entry.last_position,
            current: entry.current,
            state,
            snapshot: entry.snapshot.clone(),
        })
    }

    /// Keeps `state` unless a state folded further is kept already (put meanwhile by a
    /// concurrent execution).
    fn put(&self, key: StateKey, state: CachedState) {
        let capacity = self.capacity;
        let mut inner = self.lock();
        let entries = &mut inner.entries;
        if let Some(kept) = entries.get(&key)
            && kept.last_position > state.last_position
        {
            return;
        }
        make_room(entries, capacity, &key);
        entries.insert(key, state);
    }

    /// The state kept for `key` at `versions` is behind the store: the next execution
    /// reads before deciding.
    fn mark_behind(&self, key: &StateKey, versions: &[StreamVersion]) {
        if let Some(entry) = self.lock().entries.get_mut(key)
            && entry.versions == versions
        {
            entry.current = false;
        }
    }

    /// The state kept for `key` at `versions` cannot be brought up to date: dropped.
    fn drop_entry(&self, key: &StateKey, versions: &[StreamVersion]) {
        let mut inner = self.lock();
        if inner
            .entries
            .get(key)
            .is_some_and(|entry| entry.versions == versions)
        {
            inner.entries.remove(key);
        }
    }

    fn learn_versions(&self, versions: &[(StreamId, StreamVersion)]) {
        let capacity = self.capacity;
        let mut inner = self.lock();
        for (stream, version) in versions {
            match inner.versions.get_mut(stream) {
                Some(known) => *known = (*known).max(*version),
                None => {
                    make_room(&mut inner.versions, capacity, stream);
                    inner.versions.insert(stream.clone(), *version);
                }
            }
        }
    }

    /// With the log feed: events of the log, kept for the streams whose versions are
    /// known (the streams the cache has read or written), whose versions they raise.
    pub(super) fn feed(&self, events: &[RecordedEvent]) {
        let capacity = self.capacity;
        let mut inner = self.lock();
        let inner = &mut *inner;
        for event in events {
            let Some(known) = inner.versions.get_mut(&event.stream_id) else {
                continue;
            };
            *known = (*known).max(event.stream_version);
            inner.fed.push(event, capacity);
        }
    }

    /// `kept` brought forward with the events the feed holds after its versions, when
    /// they follow on (contiguous versions, all after the newest event folded, in global
    /// order) and decode; `kept` unchanged otherwise. A state brought forward is kept,
    /// marked current: only the append will tell whether it is.
    fn forward_from_feed<C: Command>(
        &self,
        command: &C,
        ops: &StateCacheOps<C::State>,
        key: &StateKey,
        mut kept: Checkout<C::State>,
    ) -> Checkout<C::State> {
        let Some((events, versions)) = self.lock().fed.after(&key.streams, &kept.versions) else {
            return kept;
        };
        let Some(first) = events.first() else {
            return kept;
        };
        if kept
            .last_position
            .is_some_and(|last| first.global_position <= last)
        {
            return kept;
        }
        let Ok(typed) = events
            .iter()
            .map(|event| event.decode::<C::Event>())
            .collect::<Result<Vec<_>>>()
        else {
            return kept;
        };
        for event in &typed {
            command.apply(&mut kept.state, event);
        }
        kept.versions = versions;
        kept.last_position = events.last().map(|e| e.global_position);
        kept.current = true;
        kept.snapshot = kept
            .snapshot
            .after(ops.snapshots.is_some(), &key.streams, &events);
        self.put(
            key.clone(),
            CachedState {
                versions: kept.versions.clone(),
                last_position: kept.last_position,
                state: (ops.keep)(&kept.state),
                current: true,
                snapshot: kept.snapshot.clone(),
            },
        );
        kept
    }

    /// Every declared stream's version: the cached state's for the streams it is folded
    /// from, the last one seen for the others; `None` when one is unknown.
    fn known_versions(
        &self,
        declared: &[StreamId],
        folded: &[StreamId],
        folded_versions: &[StreamVersion],
    ) -> Option<Vec<(StreamId, StreamVersion)>> {
        let inner = self.lock();
        declared
            .iter()
            .map(|stream| {
                let version = match folded.iter().position(|s| s == stream) {
                    Some(index) => folded_versions.get(index).copied(),
                    None => inner.versions.get(stream).copied(),
                };
                version.map(|version| (stream.clone(), version))
            })
            .collect()
    }
}

/// Drops an arbitrary entry (whichever the map yields first) when the map is full and
/// `key` is new; what is dropped is read again when next needed.
fn make_room<K: Clone + Eq + std::hash::Hash, V>(
    map: &mut HashMap<K, V>,
    capacity: usize,
    key: &K,
) {
    if map.len() >= capacity
        && !map.contains_key(key)
        && let Some(victim) = map.keys().next().cloned()
    {
        map.remove(&victim);
    }
}

/// What an append request writes, kept to bring cached states forward once it
/// succeeded.
struct OwnWrites {
    streams: Vec<OwnStream>,
    events: Vec<OwnEvent>,
}

/// One stream of an append the executor made.
struct OwnStream {
    stream: StreamId,
    /// The version the append expected it at (`None`: any).
    expected: Option<StreamVersion>,
    /// How many events the append writes to it.
    events: usize,
}

/// One event of an append the executor made.
struct OwnEvent {
    stream: StreamId,
    data: EventData,
}

impl OwnWrites {
    fn of(request: &AppendRequest) -> Self {
        let mut streams = Vec::with_capacity(request.streams.len());
        let mut events = Vec::with_capacity(request.event_count());
        for stream in &request.streams {
            let expected = match stream.expected_version {
                ExpectedVersion::Exact(version) => Some(version),
                ExpectedVersion::NoStream => Some(StreamVersion::INITIAL),
                ExpectedVersion::Any => None,
            };
            streams.push(OwnStream {
                stream: stream.stream_id.clone(),
                expected,
                events: stream.events.len(),
            });
            for event in &stream.events {
                events.push(OwnEvent {
                    stream: stream.stream_id.clone(),
                    data: event.clone(),
                });
            }
        }
        OwnWrites { streams, events }
    }

    /// The written events as any later read returns them, in global order; `None` when
    /// the outcome lacks a recording time or does not match the request.
    fn recorded(&self, outcome: &AppendOutcome) -> Option<Vec<RecordedEvent>> {
        if outcome.events.len() != self.events.len() {
            return None;
        }
        let mut recorded = Vec::with_capacity(outcome.events.len());
        for appended in &outcome.events {
            let OwnEvent { stream, data } = self
                .events
                .iter()
                .find(|own| own.data.event_id == appended.event_id)?;
            if *stream != appended.stream_id {
                return None;
            }
            recorded.push(RecordedEvent::new(
                appended.event_id,
                appended.stream_id.clone(),
                appended.stream_version,
                appended.global_position,
                data.event_type.clone(),
                data.payload.clone(),
                Arc::new(data.metadata.clone()),
                appended.recorded_at?,
            ));
        }
        recorded.sort_by_key(|event| event.global_position);
        Some(recorded)
    }

    /// A stream's version after the append: its last event's, or the one checked.
    fn version_after(&self, stream: &StreamId, outcome: &AppendOutcome) -> Option<StreamVersion> {
        outcome
            .events
            .iter()
            .filter(|e| &e.stream_id == stream)
            .map(|e| e.stream_version)
            .max()
            .or_else(|| {
                self.streams
                    .iter()
                    .find(|s| s.stream == *stream)
                    .and_then(|s| s.expected)
            })
    }

    fn versions_after(&self, outcome: &AppendOutcome) -> Vec<(StreamId, StreamVersion)> {
        self.streams
            .iter()
            .filter_map(|own| {
                self.version_after(&own.stream, outcome)
                    .map(|version| (own.stream.clone(), version))
            })
            .collect()
    }
}
