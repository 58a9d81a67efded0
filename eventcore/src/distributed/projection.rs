//! Cross-service projections: a [`Projection`] over other services' published events,
//! run on a subscription, with a durable position per publishing service.

use std::collections::HashMap;
use std::sync::Arc;

use super::envelope::DistributedEvent;
use super::names::ServiceId;
use super::subscriber::EventHandler;
use crate::error::{Error, Result};
use crate::names::ProjectionName;
use crate::names::StreamId;
use crate::process::Dispatcher;
use crate::projection::{CheckpointStore, Projection};
use crate::types::GlobalPosition;

/// The namespace of the name-based UUIDs that name a source stream's checkpoint. Fixed:
/// changing it would forget every cross-service projection's position.
const STREAM_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x5d1c_4e43_9f0a_4a3b_8f6e_2b7c_1d90_aa01);

/// Runs a [`Projection`] on a subscription ([`super::SubscriptionRunner`]): each
/// delivered event that passes the projection's filter is decoded by its type name and
/// applied, and a checkpoint per source stream (in the [`CheckpointStore`], under
/// `<projection>-<service>-<UUIDv5 of the stream id>`: the source position of the last
/// event of that stream applied) skips what was applied before. Events of one source
/// stream are handled in order, also when the subscription parks one and holds the rest
/// behind it, so the checkpoint is a valid high-water mark; a checkpoint per publishing
/// service would not be (events of other streams go on while one is held).
///
/// Delivery into the projection is at-least-once across crashes, as for a
/// [`crate::ProjectionRunner`]: an event applied just before a crash (before its
/// checkpoint was saved) is applied again. Make `apply` idempotent, or keep the read
/// model with its checkpoint.
pub struct ProjectionHandler<P> {
    projection: P,
    checkpoints: Arc<dyn CheckpointStore>,
    positions: HashMap<(ServiceId, StreamId), (ProjectionName, Option<GlobalPosition>)>,
}

impl<P: Projection> ProjectionHandler<P> {
    /// `projection`, keeping its checkpoints in `checkpoints`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidProjectionName`] when the projection's name is too long to name
    /// its checkpoints (at most 157 bytes: the longest service id and a UUID are added).
    pub fn new(projection: P, checkpoints: Arc<dyn CheckpointStore>) -> Result<Self> {
        ProjectionName::try_new(format!(
            "{}-{}-{}",
            projection.name(),
            "s".repeat(super::names::MAX_TOKEN_LEN),
            uuid::Uuid::nil().simple()
        ))?;
        Ok(ProjectionHandler {
            projection,
            checkpoints,
            positions: HashMap::new(),
        })
    }

    /// The projection (to read its model).
    pub fn projection(&self) -> &P {
        &self.projection
    }

    /// The checkpoint name of a source stream, and the position applied.
    async fn position(
        &mut self,
        event: &DistributedEvent,
    ) -> Result<(ProjectionName, Option<GlobalPosition>)> {
        let key = (event.service_id.clone(), event.stream_id.clone());
        if let Some(known) = self.positions.get(&key) {
            return Ok(known.clone());
        }
        let stream = uuid::Uuid::new_v5(&STREAM_NAMESPACE, event.stream_id.as_str().as_bytes());
        let name = ProjectionName::try_new(format!(
            "{}-{}-{}",
            self.projection.name(),
            event.service_id,
            stream.simple()
        ))?;
        let position = self.checkpoints.load_checkpoint(&name).await?;
        self.positions.insert(key, (name.clone(), position));
        Ok((name, position))
    }
}

impl<P: Projection> EventHandler for ProjectionHandler<P> {
    async fn handle(&mut self, event: &DistributedEvent, _: &mut Dispatcher<'_>) -> Result<()> {
        let (name, position) = self.position(event).await?;
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
            (event.service_id.clone(), event.stream_id.clone()),
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
