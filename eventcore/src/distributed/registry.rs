//! Service discovery and remote health: a service instance registers with its name,
//! version, endpoints and metadata; discovery lists every instance that answers; a
//! health request returns an instance's [`HealthReport`].
//!
//! `eventcore_nats::NatsServiceRegistry` implements it on the NATS services protocol
//! (`$SRV.PING`, `$SRV.INFO`, `$SRV.STATS`: instances appear in `nats micro ls`);
//! `eventcore_memory::InMemoryServiceRegistry` in process, for tests and the embedded
//! default.

use std::collections::BTreeMap;

use async_trait::async_trait;

use super::names::ServiceId;
use crate::health::{HealthChecks, HealthReport};

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The registry (the broker) could not be reached or did not answer in time.
    #[error("the service registry is unavailable: {message}")]
    Unavailable {
        /// What failed.
        message: String,
        /// The client's own error, if any.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// No instance with this id answers (deregistered, or its process is gone).
    #[error("no instance {id} of service {service} answers")]
    UnknownInstance {
        /// The service.
        service: ServiceId,
        /// The instance id.
        id: String,
    },
    /// A registration the registry cannot accept.
    #[error("invalid service registration: {0}")]
    InvalidRegistration(String),
    /// An instance answered with something that is not a valid answer.
    #[error("instance {id} answered with an unreadable {what}: {message}")]
    BadAnswer {
        /// The instance id.
        id: String,
        /// What it was asked for.
        what: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

/// What a service instance registers: its name (the service id), a SemVer version, a
/// description, named endpoints (addresses: `http://10.0.0.5:9464/metrics`, a subject)
/// and free metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRegistration {
    name: ServiceId,
    version: String,
    description: String,
    endpoints: BTreeMap<String, String>,
    metadata: BTreeMap<String, String>,
}

/// The metadata key prefix under which endpoints travel where a registry only carries
/// metadata (NATS).
pub const ENDPOINT_METADATA_PREFIX: &str = "endpoint.";

impl ServiceRegistration {
    /// A registration of `name` at `version` (`MAJOR.MINOR.PATCH`, with an optional
    /// `-pre-release` and `+build`, as SemVer writes it).
    ///
    /// # Errors
    ///
    /// [`RegistryError::InvalidRegistration`] for a version that is not SemVer.
    pub fn new(name: ServiceId, version: impl Into<String>) -> Result<Self, RegistryError> {
        let version = version.into();
        if !is_semver(&version) {
            return Err(RegistryError::InvalidRegistration(format!(
                "version {version:?} is not MAJOR.MINOR.PATCH[-pre][+build]"
            )));
        }
        Ok(ServiceRegistration {
            name,
            version,
            description: String::new(),
            endpoints: BTreeMap::new(),
            metadata: BTreeMap::new(),
        })
    }

    /// With a description for humans.
    pub fn with_description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// With an endpoint: a name (`metrics`, `ready`, `orders-api`) and its address.
    ///
    /// # Errors
    ///
    /// [`RegistryError::InvalidRegistration`] for an empty name or address, or a name
    /// with characters other than ASCII letters, digits, `-`, `_` and `.`.
    pub fn with_endpoint(
        mut self,
        name: impl Into<String>,
        address: impl Into<String>,
    ) -> Result<Self, RegistryError> {
        let (name, address) = (name.into(), address.into());
        if !is_key(&name) || address.is_empty() {
            return Err(RegistryError::InvalidRegistration(format!(
                "endpoint {name:?} at {address:?}: a name of letters, digits, '-', '_', '.' and an address are needed"
            )));
        }
        self.endpoints.insert(name, address);
        Ok(self)
    }

    /// With a metadata field (a region, a build).
    ///
    /// # Errors
    ///
    /// [`RegistryError::InvalidRegistration`] for a key that is empty, has characters
    /// other than ASCII letters, digits, `-`, `_` and `.`, or starts with
    /// [`ENDPOINT_METADATA_PREFIX`].
    pub fn with_metadata(
        mut self,
        key: impl Into<String>,
        value: impl Into<String>,
    ) -> Result<Self, RegistryError> {
        let key = key.into();
        if !is_key(&key) || key.starts_with(ENDPOINT_METADATA_PREFIX) {
            return Err(RegistryError::InvalidRegistration(format!(
                "metadata key {key:?}: letters, digits, '-', '_', '.', not starting with {ENDPOINT_METADATA_PREFIX:?}"
            )));
        }
        self.metadata.insert(key, value.into());
        Ok(self)
    }

    /// The service.
    pub fn name(&self) -> &ServiceId {
        &self.name
    }

    /// Its version.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Its description.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Its endpoints, by name.
    pub fn endpoints(&self) -> &BTreeMap<String, String> {
        &self.endpoints
    }

    /// Its metadata.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The instance this registration becomes under `id`.
    pub fn instance(&self, id: impl Into<String>) -> ServiceInstance {
        ServiceInstance {
            name: self.name.clone(),
            id: id.into(),
            version: self.version.clone(),
            description: self.description.clone(),
            endpoints: self.endpoints.clone(),
            metadata: self.metadata.clone(),
        }
    }
}

fn is_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn is_semver(version: &str) -> bool {
    let (core, build) = match version.split_once('+') {
        Some((core, build)) => (core, Some(build)),
        None => (version, None),
    };
    let (core, pre) = match core.split_once('-') {
        Some((core, pre)) => (core, Some(pre)),
        None => (core, None),
    };
    let numbers: Vec<&str> = core.split('.').collect();
    let number = |n: &&str| {
        !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && (*n == "0" || !n.starts_with('0'))
    };
    let identifiers = |s: Option<&str>| {
        s.is_none_or(|s| {
            s.split('.').all(|part| {
                !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
        })
    };
    numbers.len() == 3 && numbers.iter().all(number) && identifiers(pre) && identifiers(build)
}

/// One running instance of a service, as discovery finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServiceInstance {
    /// The service.
    pub name: ServiceId,
    /// The instance's id, unique among the service's instances.
    pub id: String,
    /// Its version.
    pub version: String,
    /// Its description.
    pub description: String,
    /// Its endpoints, by name.
    pub endpoints: BTreeMap<String, String>,
    /// Its metadata.
    pub metadata: BTreeMap<String, String>,
}

/// A registration in effect; [`RegisteredService::deregister`] ends it (dropping the
/// handle ends it too, where the registry can, as a process that exits does).
#[async_trait]
pub trait RegisteredService: Send + Sync {
    /// The instance as others discover it.
    fn instance(&self) -> &ServiceInstance;

    /// Stops answering discovery and health requests.
    ///
    /// # Errors
    ///
    /// [`RegistryError::Unavailable`] when the registry cannot be told.
    async fn deregister(self: Box<Self>) -> Result<(), RegistryError>;
}

/// Where services register and find each other (see the [module](self)).
#[async_trait]
pub trait ServiceRegistry: Send + Sync + 'static {
    /// Registers an instance of `registration` whose health requests `health` answers.
    ///
    /// # Errors
    ///
    /// [`RegistryError::InvalidRegistration`] when the registry refuses it;
    /// [`RegistryError::Unavailable`].
    async fn register(
        &self,
        registration: ServiceRegistration,
        health: HealthChecks,
    ) -> Result<Box<dyn RegisteredService>, RegistryError>;

    /// Every instance of `service` that answers, in no particular order.
    ///
    /// # Errors
    ///
    /// [`RegistryError::Unavailable`].
    async fn discover(&self, service: &ServiceId) -> Result<Vec<ServiceInstance>, RegistryError>;

    /// The health report of `instance`, from the instance itself.
    ///
    /// # Errors
    ///
    /// [`RegistryError::UnknownInstance`] when it does not answer;
    /// [`RegistryError::BadAnswer`]; [`RegistryError::Unavailable`].
    async fn health(&self, instance: &ServiceInstance) -> Result<HealthReport, RegistryError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_semver() {
        for good in [
            "0.1.0",
            "1.20.3",
            "1.0.0-rc.1",
            "1.0.0+build.5",
            "2.0.0-alpha-1+x",
        ] {
            assert!(is_semver(good), "{good}");
        }
        for bad in [
            "1.0",
            "1.0.0.0",
            "01.0.0",
            "1.0.0-",
            "1.0.0+",
            "v1.0.0",
            "1..0",
            "",
            "1.0.0-a..b",
        ] {
            assert!(!is_semver(bad), "{bad}");
        }
    }

    #[test]
    fn endpoint_and_metadata_keys_are_checked() {
        let name = ServiceId::try_new("billing").expect("valid");
        let registration = ServiceRegistration::new(name, "1.2.3").expect("valid");
        assert!(registration.clone().with_endpoint("", "x").is_err());
        assert!(registration.clone().with_endpoint("metrics", "").is_err());
        assert!(registration.clone().with_endpoint("a b", "x").is_err());
        assert!(
            registration
                .clone()
                .with_metadata("endpoint.x", "y")
                .is_err()
        );
        let registration = registration
            .with_endpoint("metrics", "http://10.0.0.5:9464/metrics")
            .and_then(|r| r.with_metadata("region", "eu-1"))
            .expect("valid");
        let instance = registration.instance("abc");
        assert_eq!(instance.id, "abc");
        assert_eq!(
            instance.endpoints["metrics"],
            "http://10.0.0.5:9464/metrics"
        );
        assert_eq!(instance.metadata["region"], "eu-1");
    }
}
