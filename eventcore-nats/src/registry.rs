//! The service registry on the NATS services protocol: each registered instance is a
//! NATS micro service (`$SRV.PING` / `$SRV.INFO` / `$SRV.STATS` answer for it; `nats
//! micro ls` lists it) with one endpoint, `health`, answering the instance's
//! [`HealthReport`] as JSON on `eventcore.health.<service>.<instance id>`.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_nats::service::{Service, ServiceExt};
use async_trait::async_trait;
use bytes::Bytes;
use eventcore::distributed::registry::ENDPOINT_METADATA_PREFIX;
use eventcore::distributed::{
    RegisteredService, RegistryError, ServiceId, ServiceInstance, ServiceRegistration,
    ServiceRegistry,
};
use eventcore::health::{HealthChecks, HealthReport};
use futures::StreamExt;

/// How long discovery collects answers by default.
pub const DEFAULT_DISCOVERY_WINDOW: Duration = Duration::from_secs(1);

/// A [`ServiceRegistry`] on a NATS connection: each registered instance is a NATS micro
/// service (`$SRV.PING` / `INFO` / `STATS`) whose `health` endpoint, on
/// `eventcore.health.<service>.<instance id>`, answers its health report as JSON.
#[derive(Debug, Clone)]
pub struct NatsServiceRegistry {
    client: async_nats::Client,
    window: Duration,
}

fn unavailable(what: &str, error: impl std::error::Error + Send + Sync + 'static) -> RegistryError {
    RegistryError::Unavailable {
        message: format!("{what}: {error}"),
        source: Some(Box::new(error)),
    }
}

/// The subject an instance answers health requests on.
fn health_subject(service: &str, id: &str) -> String {
    format!("eventcore.health.{service}.{id}")
}

impl NatsServiceRegistry {
    /// A registry on `client`; discovery collects answers for
    /// [`DEFAULT_DISCOVERY_WINDOW`].
    pub fn new(client: async_nats::Client) -> Self {
        NatsServiceRegistry {
            client,
            window: DEFAULT_DISCOVERY_WINDOW,
        }
    }

    /// Discovery collects answers for `window` (instances that answer later are not
    /// listed).
    pub fn with_discovery_window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// Every instance of `service` that answers within `max_wait`, returning as soon as
    /// `expected` have (for a caller that knows how many to wait for, like a test or a
    /// rollout).
    ///
    /// # Errors
    ///
    /// [`RegistryError::Unavailable`]; [`RegistryError::BadAnswer`] for an answer that
    /// is not a service's `INFO`.
    pub async fn discover_expecting(
        &self,
        service: &ServiceId,
        expected: usize,
        max_wait: Duration,
    ) -> Result<Vec<ServiceInstance>, RegistryError> {
        let inbox = self.client.new_inbox();
        let mut replies = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| unavailable("subscribing to the discovery inbox", e))?;
        self.client
            .publish_with_reply(format!("$SRV.INFO.{service}"), inbox, Bytes::new())
            .await
            .map_err(|e| unavailable("asking for service info", e))?;
        self.client
            .flush()
            .await
            .map_err(|e| unavailable("flushing the discovery request", e))?;
        let deadline = tokio::time::Instant::now() + max_wait;
        let mut found = Vec::new();
        while found.len() < expected {
            match tokio::time::timeout_at(deadline, replies.next()).await {
                Ok(Some(reply)) => found.push(instance_of(service, &reply.payload)?),
                Ok(None) | Err(_) => break,
            }
        }
        let _ = replies.unsubscribe().await;
        Ok(found)
    }
}

fn instance_of(service: &ServiceId, payload: &[u8]) -> Result<ServiceInstance, RegistryError> {
    let info: async_nats::service::Info =
        serde_json::from_slice(payload).map_err(|e| RegistryError::BadAnswer {
            id: String::from("?"),
            what: "service info",
            message: e.to_string(),
        })?;
    let mut endpoints = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for (key, value) in info.metadata {
        match key.strip_prefix(ENDPOINT_METADATA_PREFIX) {
            Some(endpoint) => {
                endpoints.insert(endpoint.to_owned(), value);
            }
            None => {
                metadata.insert(key, value);
            }
        }
    }
    let mut registration = ServiceRegistration::new(service.clone(), info.version.clone())
        .map_err(|e| RegistryError::BadAnswer {
            id: info.id.clone(),
            what: "service info",
            message: e.to_string(),
        })?
        .with_description(info.description);
    for (name, address) in endpoints {
        registration = registration.with_endpoint(name, address)?;
    }
    for (key, value) in metadata {
        registration = registration.with_metadata(key, value)?;
    }
    Ok(registration.instance(info.id))
}

/// A registered instance: the NATS micro service and the task answering its health
/// requests. Dropping it stops both.
struct Registered {
    instance: ServiceInstance,
    service: Option<Service>,
    answering: tokio::task::JoinHandle<()>,
    client: async_nats::Client,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.answering.abort();
        if let Some(service) = self.service.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                let _ = service.stop().await;
            });
        }
    }
}

#[async_trait]
impl RegisteredService for Registered {
    fn instance(&self) -> &ServiceInstance {
        &self.instance
    }

    async fn deregister(mut self: Box<Self>) -> Result<(), RegistryError> {
        if let Some(service) = self.service.take() {
            service
                .stop()
                .await
                .map_err(|e| RegistryError::Unavailable {
                    message: format!("stopping service {}: {e}", self.instance.name),
                    source: None,
                })?;
        }
        // Stopping ends the health endpoint's stream: the task ends and drops it
        // (unsubscribing); the flush makes sure the server has seen every unsubscribe
        // before this returns, so nothing answers for this instance any more.
        let _ = (&mut self.answering).await;
        self.client
            .flush()
            .await
            .map_err(|e| unavailable("flushing the deregistration", e))?;
        Ok(())
    }
}

#[async_trait]
impl ServiceRegistry for NatsServiceRegistry {
    async fn register(
        &self,
        registration: ServiceRegistration,
        health: HealthChecks,
    ) -> Result<Box<dyn RegisteredService>, RegistryError> {
        let mut metadata: HashMap<String, String> = registration
            .metadata()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (name, address) in registration.endpoints() {
            metadata.insert(format!("{ENDPOINT_METADATA_PREFIX}{name}"), address.clone());
        }
        let service = self
            .client
            .service_builder()
            .description(registration.description())
            .metadata(metadata)
            .start(registration.name().as_str(), registration.version())
            .await
            .map_err(|e| RegistryError::Unavailable {
                message: format!("registering service {}: {e}", registration.name()),
                source: None,
            })?;
        let id = service.info().await.id;
        let instance = registration.instance(id.clone());
        let mut endpoint = service
            .endpoint_builder()
            .name("health")
            .add(health_subject(registration.name().as_str(), &id))
            .await
            .map_err(|e| RegistryError::Unavailable {
                message: format!("adding the health endpoint: {e}"),
                source: None,
            })?;
        let answering = tokio::spawn(async move {
            while let Some(request) = endpoint.next().await {
                let report = health.report().await;
                let answer = serde_json::to_vec(&report).map(Bytes::from).map_err(|e| {
                    async_nats::service::error::Error {
                        status: format!("the health report cannot be written: {e}"),
                        code: 500,
                    }
                });
                if let Err(error) = request.respond(answer).await {
                    tracing::warn!(%error, "could not answer a health request");
                }
            }
        });
        tracing::info!(service = %instance.name, id = %instance.id, "registered on NATS");
        Ok(Box::new(Registered {
            instance,
            service: Some(service),
            answering,
            client: self.client.clone(),
        }))
    }

    async fn discover(&self, service: &ServiceId) -> Result<Vec<ServiceInstance>, RegistryError> {
        self.discover_expecting(service, usize::MAX, self.window)
            .await
    }

    async fn health(&self, instance: &ServiceInstance) -> Result<HealthReport, RegistryError> {
        let subject = health_subject(instance.name.as_str(), &instance.id);
        let reply = match self.client.request(subject, Bytes::new()).await {
            Ok(reply) => reply,
            Err(error) if error.kind() == async_nats::RequestErrorKind::NoResponders => {
                return Err(RegistryError::UnknownInstance {
                    service: instance.name.clone(),
                    id: instance.id.clone(),
                });
            }
            Err(error) => return Err(unavailable("asking for health", error)),
        };
        serde_json::from_slice(&reply.payload).map_err(|e| RegistryError::BadAnswer {
            id: instance.id.clone(),
            what: "health report",
            message: e.to_string(),
        })
    }
}
