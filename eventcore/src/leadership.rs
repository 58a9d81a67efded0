//! Leader election: one active runner per projection name, across processes.

use std::fmt;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::error::Result;
use crate::names::ProjectionName;

/// Grants leadership over a name to one holder at a time, across processes where the
/// backend allows (PostgreSQL: an advisory lock on a dedicated connection), and tells the
/// holder when it lost it (its connection died), so another can take over.
#[async_trait]
pub trait LeaderElection: Send + Sync + 'static {
    /// Waits until this caller holds leadership over `name`. Dropping the returned
    /// [`Leadership`] gives it up.
    ///
    /// # Errors
    ///
    /// [`crate::Error::Backend`] when the backend fails.
    async fn acquire(&self, name: &ProjectionName) -> Result<Leadership>;
}

/// Held leadership over a name. Given up when dropped.
pub struct Leadership {
    name: ProjectionName,
    lost: watch::Receiver<bool>,
    _hold: Box<dyn Send + Sync>,
}

impl Leadership {
    /// Leadership over `name`, lost when `lost` turns `true` (or its sender is dropped),
    /// released when `hold` is dropped. For backends.
    pub fn new(
        name: &ProjectionName,
        lost: watch::Receiver<bool>,
        hold: impl Send + Sync + 'static,
    ) -> Self {
        Leadership {
            name: name.clone(),
            lost,
            _hold: Box::new(hold),
        }
    }

    /// The name held.
    pub fn name(&self) -> &ProjectionName {
        &self.name
    }

    /// Whether it is still held, as far as is known.
    pub fn is_held(&self) -> bool {
        !*self.lost.borrow() && self.lost.has_changed().is_ok()
    }

    /// Completes when the leadership is lost.
    pub async fn lost(&mut self) {
        let _ = self.lost.wait_for(|lost| *lost).await;
    }
}

/// Waits until elected over `name`, retrying the election's retryable failures (a
/// standby must survive what a leader survives: a dropped connection while waiting)
/// after `delay(failures so far)`; `Ok(None)` when `shutdown` completes first. What the
/// runners' `run_as_leader` share.
pub(crate) async fn elected<F: std::future::Future<Output = ()>>(
    election: &dyn LeaderElection,
    name: &ProjectionName,
    mut delay: impl FnMut(u32) -> std::time::Duration,
    shutdown: &mut std::pin::Pin<&mut F>,
) -> Result<Option<Leadership>> {
    let mut failures = 0;
    loop {
        let acquired = tokio::select! {
            held = election.acquire(name) => held,
            () = shutdown.as_mut() => return Ok(None),
        };
        match acquired {
            Ok(leadership) => return Ok(Some(leadership)),
            Err(error) if error.is_retryable() => {
                failures += 1;
                tracing::warn!(%name, %error, "election failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(delay(failures)) => {}
                    () = shutdown.as_mut() => return Ok(None),
                }
            }
            Err(error) => return Err(error),
        }
    }
}

impl fmt::Debug for Leadership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leadership")
            .field("name", &self.name)
            .field("held", &self.is_held())
            .finish()
    }
}
