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

impl fmt::Debug for Leadership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leadership")
            .field("name", &self.name)
            .field("held", &self.is_held())
            .finish()
    }
}
