//! Leader election within one process, for tests and single-process deployments.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use async_trait::async_trait;
use eventcore::{LeaderElection, Leadership, ProjectionName, Result};
use parking_lot::Mutex;
use tokio::sync::{Notify, watch};

/// One leader per name among the tasks sharing this value (clones share it).
///
/// [`InMemoryLeaderElection::revoke`] takes leadership away from its holder, the way a
/// dead database connection does on PostgreSQL, so fail-over can be tested.
#[derive(Clone, Default)]
pub struct InMemoryLeaderElection {
    inner: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    holders: Mutex<HashMap<String, (u64, watch::Sender<bool>)>>,
    /// Candidates per name in arrival order: leadership goes to the longest waiting,
    /// as PostgreSQL's lock queue does, so a revoked holder cannot jump the queue.
    queues: Mutex<HashMap<String, VecDeque<u64>>>,
    released: Notify,
    next_id: std::sync::atomic::AtomicU64,
}

struct Hold {
    shared: Arc<Shared>,
    name: String,
    id: u64,
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut holders = self.shared.holders.lock();
        if holders
            .get(&self.name)
            .is_some_and(|(id, _)| *id == self.id)
        {
            holders.remove(&self.name);
        }
        drop(holders);
        self.shared.released.notify_waiters();
    }
}

struct Queued {
    shared: Arc<Shared>,
    name: String,
    id: u64,
    done: bool,
}

impl Drop for Queued {
    fn drop(&mut self) {
        if !self.done {
            if let Some(queue) = self.shared.queues.lock().get_mut(&self.name) {
                queue.retain(|id| *id != self.id);
            }
            self.shared.released.notify_waiters();
        }
    }
}

impl InMemoryLeaderElection {
    /// No leaders yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes leadership over `name` away from its holder (which is told so) and lets
    /// the next candidate have it. Returns whether there was a holder.
    pub fn revoke(&self, name: &str) -> bool {
        let removed = self.inner.holders.lock().remove(name);
        let had = removed.is_some();
        if let Some((_, lost)) = removed {
            lost.send_replace(true);
        }
        self.inner.released.notify_waiters();
        had
    }

    /// How many candidates wait for `name` (not counting the holder).
    pub fn candidates(&self, name: &str) -> usize {
        self.inner.queues.lock().get(name).map_or(0, VecDeque::len)
    }

    /// Whether somebody holds `name`.
    pub fn is_held(&self, name: &str) -> bool {
        self.inner.holders.lock().contains_key(name)
    }
}

impl std::fmt::Debug for InMemoryLeaderElection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryLeaderElection")
            .field("held", &self.inner.holders.lock().len())
            .finish()
    }
}

#[async_trait]
impl LeaderElection for InMemoryLeaderElection {
    async fn acquire(&self, key: &ProjectionName) -> Result<Leadership> {
        let name = key.as_str();
        let id = self
            .inner
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner
            .queues
            .lock()
            .entry(name.to_owned())
            .or_default()
            .push_back(id);
        // Leaves the queue if the caller stops waiting.
        let mut queued = Queued {
            shared: self.inner.clone(),
            name: name.to_owned(),
            id,
            done: false,
        };
        loop {
            // Registered before looking, so a release between the look and the wait is
            // not missed.
            let released = self.inner.released.notified();
            let mut released = std::pin::pin!(released);
            released.as_mut().enable();
            {
                let mut holders = self.inner.holders.lock();
                let mut queues = self.inner.queues.lock();
                let first = queues.get(name).and_then(|q| q.front().copied());
                if !holders.contains_key(name) && first == Some(id) {
                    if let Some(queue) = queues.get_mut(name) {
                        queue.pop_front();
                    }
                    queued.done = true;
                    let (lost, watch) = watch::channel(false);
                    holders.insert(name.to_owned(), (id, lost));
                    let hold = Hold {
                        shared: self.inner.clone(),
                        name: name.to_owned(),
                        id,
                    };
                    return Ok(Leadership::new(key, watch, hold));
                }
            }
            released.await;
        }
    }
}
