//! Cross-service projections: a [`Projection`] over other services' published events,
//! run on a subscription, with a durable position per publishing service.

use std::collections::HashMap;
use std::sync::Arc;

use super::envelope::DistributedEvent;
use super::names::ServiceId;
use super::subscriber::EventHandler;
use crate::error::{Error, Result};
use crate::names::ProjectionName;
use crate::process::Dispatcher;
use crate::projection::{CheckpointStore, Projection};
use crate::types::GlobalPosition;

/// Runs a [`Projection`] on a subscription ([`super::SubscriptionRunner`]): each
/// delivered event that passes the projection's filter is decoded by its type name and
/// applied, and a checkpoint per publishing service (`<projection>-<service>` in the
/// [`CheckpointStore`]: the source position of the last event applied) skips what was
/// applied before. A service's events arrive in its log order, so the checkpoint is a
/// valid high-water mark.
///
/// Delivery into the projection is at-least-once across crashes, as for a
/// [`crate::ProjectionRunner`]: an event applied just before a crash (before its
/// checkpoint was saved) is applied again. Make `apply` idempotent, or keep the read
/// model with its checkpoint.
pub struct ProjectionHandler<P> {
    projection: P,
    checkpoints: Arc<dyn CheckpointStore>,
    positions: HashMap<ServiceId, (ProjectionName, Option<GlobalPosition>)>,
}

impl<P: Projection> ProjectionHandler<P> {
    /// `projection`, keeping its checkpoints in `checkpoints`.
    pub fn new(projection: P, checkpoints: Arc<dyn CheckpointStore>) -> Self {
        ProjectionHandler {
            projection,
            checkpoints,
            positions: HashMap::new(),
        }
    }

    /// The projection (to read its model).
    pub fn projection(&self) -> &P {
        &self.projection
    }

    async fn position(
        &mut self,
        service: &ServiceId,
    ) -> Result<(ProjectionName, Option<GlobalPosition>)> {
        if let Some(known) = self.positions.get(service) {
            return Ok(known.clone());
        }
        let name = ProjectionName::try_new(format!("{}-{service}", self.projection.name()))?;
        let position = self.checkpoints.load_checkpoint(&name).await?;
        self.positions
            .insert(service.clone(), (name.clone(), position));
        Ok((name, position))
    }
}

impl<P: Projection> EventHandler for ProjectionHandler<P> {
    async fn handle(&mut self, event: &DistributedEvent, _: &mut Dispatcher<'_>) -> Result<()> {
        let (name, position) = self.position(&event.service_id).await?;
        if position.is_some_and(|applied| event.global_position <= applied) {
            // Applied before (a redelivery).
            return Ok(());
        }
        let filter = self.projection.filter();
        let selected = filter
            .stream_prefix()
            .is_none_or(|prefix| event.stream_id.as_str().starts_with(prefix))
            && filter
                .event_types()
                .is_none_or(|types| types.contains(&event.event_type));
        if selected {
            let stored = event.decode::<P::Event>()?;
            self.projection
                .apply(&stored)
                .await
                .map_err(Error::rejected)?;
        }
        self.checkpoints
            .save_checkpoint(&name, event.global_position)
            .await?;
        self.positions.insert(
            event.service_id.clone(),
            (name, Some(event.global_position)),
        );
        Ok(())
    }
}

impl<P> std::fmt::Debug for ProjectionHandler<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectionHandler")
            .field("positions", &self.positions)
            .finish_non_exhaustive()
    }
}
