//! The in-process service registry: registrations in memory, shared by clones; health
//! requests run the instance's checks directly.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use eventcore::distributed::{
    RegisteredService, RegistryError, ServiceId, ServiceInstance, ServiceRegistration,
    ServiceRegistry,
};
use eventcore::health::{HealthChecks, HealthReport};
use parking_lot::Mutex;

type Instances = BTreeMap<ServiceId, BTreeMap<String, (ServiceInstance, HealthChecks)>>;

/// A [`ServiceRegistry`] in memory: for tests and the embedded default. Cheap to clone;
/// clones share registrations. Instance ids are `<service>-<n>`, `n` counting from 1.
#[derive(Clone, Default)]
pub struct InMemoryServiceRegistry {
    instances: Arc<Mutex<Instances>>,
    next: Arc<AtomicU64>,
}

impl std::fmt::Debug for InMemoryServiceRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let instances = self.instances.lock();
        f.debug_struct("InMemoryServiceRegistry")
            .field(
                "instances",
                &instances
                    .iter()
                    .map(|(service, by_id)| (service.as_str(), by_id.len()))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl InMemoryServiceRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }
}

/// A registration in an [`InMemoryServiceRegistry`]; dropping it deregisters.
struct Registered {
    instance: ServiceInstance,
    instances: Arc<Mutex<Instances>>,
}

impl Registered {
    fn remove(&self) {
        let mut instances = self.instances.lock();
        if let Some(by_id) = instances.get_mut(&self.instance.name) {
            by_id.remove(&self.instance.id);
            if by_id.is_empty() {
                instances.remove(&self.instance.name);
            }
        }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.remove();
    }
}

#[async_trait]
impl RegisteredService for Registered {
    fn instance(&self) -> &ServiceInstance {
        &self.instance
    }

    async fn deregister(self: Box<Self>) -> Result<(), RegistryError> {
        self.remove();
        Ok(())
    }
}

#[async_trait]
impl ServiceRegistry for InMemoryServiceRegistry {
    async fn register(
        &self,
        registration: ServiceRegistration,
        health: HealthChecks,
    ) -> Result<Box<dyn RegisteredService>, RegistryError> {
        let n = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let instance = registration.instance(format!("{}-{n}", registration.name()));
        self.instances
            .lock()
            .entry(instance.name.clone())
            .or_default()
            .insert(instance.id.clone(), (instance.clone(), health));
        Ok(Box::new(Registered {
            instance,
            instances: Arc::clone(&self.instances),
        }))
    }

    async fn discover(&self, service: &ServiceId) -> Result<Vec<ServiceInstance>, RegistryError> {
        Ok(self
            .instances
            .lock()
            .get(service)
            .map(|by_id| {
                by_id
                    .values()
                    .map(|(instance, _)| instance.clone())
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn health(&self, instance: &ServiceInstance) -> Result<HealthReport, RegistryError> {
        let checks = self
            .instances
            .lock()
            .get(&instance.name)
            .and_then(|by_id| by_id.get(&instance.id))
            .map(|(_, checks)| checks.clone());
        match checks {
            Some(checks) => Ok(checks.report().await),
            None => Err(RegistryError::UnknownInstance {
                service: instance.name.clone(),
                id: instance.id.clone(),
            }),
        }
    }
}
