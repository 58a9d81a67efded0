//! The log feed: kept states brought forward with what other writers appended, read
//! from the global log in the background (`CommandExecutor::with_log_feed`).
//!
//! Without it, an executor learns of another process's write only when its own append
//! conflicts: the decision taken on the kept state fails at the append, the executor
//! reads what is new and decides again. Two instances of a service writing the same
//! streams meet that on most commands. With the feed, one task per executor follows the
//! log and keeps, for every stream the cache knows, its latest events and version; an
//! execution then folds those into its copy of the kept state before it decides without
//! reading.
//!
//! The feed only suggests; the append proves, as everywhere on the cached path (rule 5
//! of `state_cache.rs`). Events are folded into a kept state only when they follow on:
//! for each stream folded, contiguous versions from the kept one, and all after the
//! newest event already folded, in global order. Anything else and the feed is not
//! used for that execution (the store is read as without it). A feed that lags or
//! misses an event costs the conflict it would have saved, never a wrong decision: the
//! append checks every stream at the versions of the fold. That is why it reads with
//! [`EventStore::peek_log`], which may miss an event committed late, and not with
//! `read_all`, whose guarantee costs PostgreSQL a scan of its lock table per read: read
//! every few milliseconds, that scan slowed every append (measured: two processes on
//! disjoint accounts, 3,700–4,400 transfers a second without a feed, 2,700 with one on
//! `read_all`).
//!
//! Under load the feed reads once per [`WINDOW`] at most, so that a busy process pays
//! one read per window, not one per append; idle, it waits for events without polling.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::event::RecordedEvent;
use crate::store::EventStore;
use crate::types::{GlobalPosition, StreamId, StreamVersion};

use super::state_cache::StateCacheMap;

/// Events kept per stream: enough for the writes of other instances between two
/// executions on the stream.
pub(super) const PER_STREAM: usize = 32;

/// Events read from the log at a time.
const BATCH: usize = 1_000;

/// Under load, the least time between two reads of the log: what the feed may lag
/// behind the log, and what a process pays for it (one read per window).
const WINDOW: Duration = Duration::from_millis(5);

/// Idle, the longest wait for events before the feed looks again.
const IDLE_WAIT: Duration = Duration::from_secs(1);

/// The latest events of the streams the cache knows, as read from the log.
#[derive(Default)]
pub(super) struct Fed {
    /// Per stream, events with contiguous versions, oldest first.
    streams: HashMap<StreamId, VecDeque<RecordedEvent>>,
}

impl Fed {
    /// Keeps `event` for its stream, after the ones kept when it follows on; instead of
    /// them when it does not (one was missed).
    pub(super) fn push(&mut self, event: &RecordedEvent, capacity: usize) {
        if let Some(kept) = self.streams.get_mut(&event.stream_id) {
            match kept.back() {
                Some(last) if event.stream_version <= last.stream_version => return,
                Some(last) if event.stream_version.value() != last.stream_version.value() + 1 => {
                    kept.clear();
                }
                _ => {}
            }
            kept.push_back(event.clone());
            if kept.len() > PER_STREAM {
                kept.pop_front();
            }
            return;
        }
        if self.streams.len() >= capacity
            && let Some(victim) = self.streams.keys().next().cloned()
        {
            self.streams.remove(&victim);
        }
        self.streams
            .insert(event.stream_id.clone(), VecDeque::from([event.clone()]));
    }

    /// The events of `streams` after `versions` (same order), merged in global order,
    /// with each stream's version after them; `None` when a stream's kept events do not
    /// start right after its version (some are missing).
    pub(super) fn after(
        &self,
        streams: &[StreamId],
        versions: &[StreamVersion],
    ) -> Option<(Vec<RecordedEvent>, Vec<StreamVersion>)> {
        let mut events = Vec::new();
        let mut now = Vec::with_capacity(streams.len());
        for (index, (stream, &version)) in streams.iter().zip(versions).enumerate() {
            // A stream named twice would have its events folded twice (keys name each
            // stream once; this is the guard).
            if streams[..index].contains(stream) {
                return None;
            }
            let mut at = version;
            if let Some(kept) = self.streams.get(stream) {
                for event in kept.iter().filter(|e| e.stream_version > version) {
                    if event.stream_version.value() != at.value() + 1 {
                        return None;
                    }
                    at = event.stream_version;
                    events.push(event.clone());
                }
            }
            now.push(at);
        }
        events.sort_by_key(|event| event.global_position);
        Some((events, now))
    }
}

/// The task following the log for an executor and its clones; stopped when the last
/// of them is dropped.
pub(super) struct Follower {
    task: tokio::task::AbortHandle,
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Follower {
    /// Starts following `store`'s log from its head into `states`; `None` outside a
    /// Tokio runtime.
    pub(super) fn start(store: Arc<dyn EventStore>, states: &Arc<StateCacheMap>) -> Option<Self> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let states = Arc::downgrade(states);
        let task = runtime.spawn(follow(store, states));
        Some(Follower {
            task: task.abort_handle(),
        })
    }
}

async fn follow(store: Arc<dyn EventStore>, states: Weak<StateCacheMap>) {
    let mut after: Option<Option<GlobalPosition>> = None;
    let mut waited = false;
    loop {
        let step = async {
            // What was written before the feed started, the cache reads as without it.
            let from = match after {
                Some(from) => from,
                None => *after.insert(store.head_position().await?),
            };
            let events = store.peek_log(from, BATCH).await?;
            let Some(states) = states.upgrade() else {
                return Ok::<bool, crate::Error>(false);
            };
            states.feed(&events);
            drop(states);
            match events.last() {
                None => {
                    if waited {
                        // The wait said there were events, and the peek found none (a
                        // store whose peek is stricter than its head): not at once again.
                        tokio::time::sleep(WINDOW).await;
                    }
                    // Bounded: on PostgreSQL the peek can be ahead of the visible head,
                    // which waits for every older append still running.
                    if let Ok(Err(error)) =
                        tokio::time::timeout(IDLE_WAIT, store.wait_for_events(from)).await
                    {
                        return Err(error);
                    }
                    waited = true;
                }
                Some(last) => {
                    waited = false;
                    after = Some(Some(last.global_position));
                    if events.len() < BATCH {
                        tokio::time::sleep(WINDOW).await;
                    }
                }
            }
            Ok(true)
        };
        match step.await {
            Ok(true) => {}
            Ok(false) => return,
            Err(error) => {
                // The feed is only a shortcut: without it, executions read the store.
                tracing::warn!(%error, "the executor's log feed failed; trying again in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
