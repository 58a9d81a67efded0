//! Service discovery and remote health, on the in-memory registry and on a real NATS
//! server (the NATS services protocol): two instances of one service register with
//! their endpoints and metadata, discovery finds both, each answers its own health
//! report, and one that deregistered is unknown.

use eventcore::distributed::{
    RegistryError, ServiceId, ServiceInstance, ServiceRegistration, ServiceRegistry,
};
use eventcore::health::{HealthChecks, HealthStatus};
use eventcore::testing::SwitchedCheck;
use eventcore_memory::InMemoryServiceRegistry;

fn registration(service: &ServiceId, port: u16) -> ServiceRegistration {
    ServiceRegistration::new(service.clone(), "1.4.0")
        .expect("valid")
        .with_description("invoices for orders")
        .with_endpoint("metrics", format!("http://127.0.0.1:{port}/metrics"))
        .and_then(|r| r.with_metadata("region", "eu-1"))
        .expect("valid")
}

/// The story on any registry; `discover` finds the instances (`expected` of them).
async fn registers_discovers_and_checks_health<R, D, F>(
    registry: R,
    service: ServiceId,
    discover: D,
) where
    R: ServiceRegistry,
    D: Fn(usize) -> F,
    F: std::future::Future<Output = Vec<ServiceInstance>>,
{
    let healthy = SwitchedCheck::new("broker", true);
    let sick = SwitchedCheck::new("broker", false);
    let first = registry
        .register(
            registration(&service, 9464),
            HealthChecks::new(service.as_str()).with_check(healthy.clone()),
        )
        .await
        .expect("registers");
    let second = registry
        .register(
            registration(&service, 9465),
            HealthChecks::new(service.as_str()).with_check(sick.clone()),
        )
        .await
        .expect("registers");
    assert_ne!(first.instance().id, second.instance().id);

    let mut found = discover(2).await;
    found.sort_by(|a, b| a.endpoints["metrics"].cmp(&b.endpoints["metrics"]));
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!(found[0], *first.instance());
    assert_eq!(found[1], *second.instance());
    assert_eq!(found[0].version, "1.4.0");
    assert_eq!(found[0].description, "invoices for orders");
    assert_eq!(found[0].metadata["region"], "eu-1");
    assert_eq!(
        found[1].endpoints["metrics"],
        "http://127.0.0.1:9465/metrics"
    );

    let report = registry.health(&found[0]).await.expect("answers");
    assert_eq!(report.status, HealthStatus::Up);
    assert_eq!(report.service, service.as_str());
    let report = registry.health(&found[1]).await.expect("answers");
    assert_eq!(report.status, HealthStatus::Down);
    assert_eq!(
        report.component("broker").and_then(|c| c.detail.as_deref()),
        Some("switched down by the test")
    );
    sick.set_up(true);
    assert!(
        registry
            .health(&found[1])
            .await
            .expect("answers")
            .is_ready()
    );

    let gone = second.instance().clone();
    second.deregister().await.expect("deregisters");
    assert!(matches!(
        registry.health(&gone).await,
        Err(RegistryError::UnknownInstance { id, .. }) if id == gone.id
    ));
    let found = discover(1).await;
    assert_eq!(found, [first.instance().clone()]);
    first.deregister().await.expect("deregisters");
}

#[tokio::test]
async fn the_in_memory_registry_registers_discovers_and_checks_health() {
    let registry = InMemoryServiceRegistry::new();
    let service = ServiceId::try_new("billing").expect("valid");
    let finder = registry.clone();
    let name = service.clone();
    registers_discovers_and_checks_health(registry, service, move |_| {
        let (finder, name) = (finder.clone(), name.clone());
        async move { finder.discover(&name).await.expect("discovers") }
    })
    .await;
}

#[tokio::test]
#[cfg_attr(
    not(nats_tests),
    ignore = "set NATS_URL (scripts/test starts a server) to run the NATS tests"
)]
async fn the_nats_registry_registers_discovers_and_checks_health() {
    use std::time::Duration;

    use eventcore_nats::NatsServiceRegistry;

    let client = async_nats::connect(eventcore_tests::nats::nats_url())
        .await
        .expect("connects");
    let registry = NatsServiceRegistry::new(client);
    // A service name no other test uses: discovery sees only this test's instances.
    let service = ServiceId::try_new(format!(
        "billing-{}",
        &eventcore_tests::nats::fresh_prefix()[1..9]
    ))
    .expect("valid");
    let finder = registry.clone();
    let name = service.clone();
    registers_discovers_and_checks_health(registry, service, move |expected| {
        let (finder, name) = (finder.clone(), name.clone());
        async move {
            // Returns once `expected` answered; the bound only matters when one does not.
            let found = finder
                .discover_expecting(&name, expected, Duration::from_secs(30))
                .await
                .expect("discovers");
            // Nothing more answers: a deregistered instance no longer does.
            let more = finder
                .discover_expecting(&name, expected + 1, Duration::from_millis(300))
                .await
                .expect("discovers");
            assert_eq!(more.len(), expected, "{more:?}");
            found
        }
    })
    .await;
}
