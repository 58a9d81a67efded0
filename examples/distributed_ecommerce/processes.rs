//! `--service` and `--drive`: the example as separate processes.

use std::time::Duration;

use eventcore::distributed::{ServiceRegistration, ServiceRegistry};
use eventcore_examples::distributed_ecommerce::contracts::ServiceName;
use eventcore_examples::distributed_ecommerce::process::{
    Deployment, all_ended, check_orders, ledger, place_orders, serve_commands, start_service,
};
use eventcore_nats::NatsServiceRegistry;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Completes on Ctrl-C or SIGTERM.
async fn terminated() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn nats_url() -> Result<String, BoxError> {
    std::env::var("NATS_URL").map_err(|_| {
        "set NATS_URL (nats://host:port): the services talk over NATS JetStream".into()
    })
}

/// Runs `service` in this process until it is told to stop.
pub(crate) async fn run_service(service: ServiceName, http: &str) -> Result<(), BoxError> {
    let prometheus = eventcore_http::install_prometheus()?;
    let deployment = Deployment::from_env();
    let database_url = std::env::var("DATABASE_URL").ok();
    let client = async_nats::connect(nats_url()?).await?;
    let (mut running, broker, context) = start_service(
        &deployment,
        service,
        client.clone(),
        database_url.as_deref(),
    )
    .await?;
    // The topics it reads exist once their publishers started: wait for them.
    let mut waited = 0u32;
    while let Err(error) = running.open().await {
        waited += 1;
        if waited > 600 {
            return Err(format!("the topics it subscribes to never appeared: {error}").into());
        }
        if waited == 1 {
            tracing::info!(%error, "waiting for the other services' topics");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let health = running.health_checks(&broker, &context, Duration::from_secs(60))?;
    let listener = tokio::net::TcpListener::bind(http).await?;
    let address = listener.local_addr()?;
    let registry = NatsServiceRegistry::new(client.clone());
    let registration = ServiceRegistration::new(service.id(), env!("CARGO_PKG_VERSION"))?
        .with_description(format!("the e-commerce example's {service} service"))
        .with_endpoint("http", format!("http://{address}"))?;
    let registered = registry.register(registration, health.clone()).await?;
    let executor = running.service().executor().clone();
    println!(
        "ecommerce {service} ready: http://{address} (store: {}; NATS prefix {})",
        if database_url.is_some() {
            deployment.schema(service)
        } else {
            "in memory".to_owned()
        },
        deployment.prefix
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let wait = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    let endpoints = eventcore_http::Endpoints::new(health)
        .with_prometheus(prometheus)
        .serve(listener, wait(stopped.clone()));
    let commands = serve_commands(
        client,
        deployment.prefix.clone(),
        service,
        executor,
        wait(stopped.clone()),
    );
    let runners = running.run(wait(stopped.clone()));
    let signal = async {
        terminated().await;
        let _ = stop.send(true);
    };
    let (served, answered, ran, ()) = tokio::join!(endpoints, commands, runners, signal);
    let _ = registered.deregister().await;
    served?;
    answered?;
    ran?;
    Ok(())
}

/// Places the orders, waits for their sagas, checks them in every store.
pub(crate) async fn drive() -> Result<(), BoxError> {
    let deployment = Deployment::from_env();
    let database_url = std::env::var("DATABASE_URL")
        .map_err(|_| "set DATABASE_URL: the driver checks each service's store")?;
    let client = async_nats::connect(nats_url()?).await?;
    let patience = Duration::from_secs(60);
    let placed = place_orders(&client, &deployment.prefix, patience).await?;
    for (order, correlation) in &placed {
        println!("placed {order} (correlation {correlation})");
    }
    let ledger = ledger(&deployment, &database_url).await?;
    let order_store = std::sync::Arc::clone(&ledger.stores()[ServiceName::Order.index()].0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    while !all_ended(&ledger).await? {
        if tokio::time::Instant::now() > deadline {
            return Err("the sagas did not end within 5 minutes".into());
        }
        // Woken by the Order service's next event (its store's live wait), at the
        // latest after a second.
        let head = order_store.head_position().await?;
        let _ =
            tokio::time::timeout(Duration::from_secs(1), order_store.wait_for_events(head)).await;
    }
    for line in check_orders(&ledger).await? {
        println!("checked {line}");
    }
    println!(
        "All {} orders ended as they should, in every service's store.",
        placed.len()
    );
    Ok(())
}
