//! The e-commerce example over NATS JetStream: its nine scenarios with the services in
//! one process talking over JetStream, and the services as five OS processes on NATS and
//! PostgreSQL: the
//! driver's orders go through them, the Payment service is killed (SIGKILL) in the
//! middle of the sagas and started again; afterwards every order ended as it should in
//! each service's own store, each effect once, every event of an order carries its
//! correlation id and one trace in every store, and every service's `/metrics` shows its
//! commands and the events it published and consumed.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use eventcore::saga::{SagaPhase, StepStatus};
use eventcore_examples::distributed_ecommerce::contracts::ServiceName;
use eventcore_examples::distributed_ecommerce::order_saga::steps;
use eventcore_examples::distributed_ecommerce::process::{
    Deployment, ORDERS, all_ended, check_orders, ledger, place_orders,
};
use eventcore_examples::distributed_ecommerce::shop::Ledger;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

/// A running service process and the address of its endpoints.
struct ServiceProcess {
    child: Child,
    http: String,
}

/// Starts `service`; [`ready`] waits until it serves.
fn spawn(service: ServiceName, prefix: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_ecommerce-service"))
        .arg(service.as_str())
        .env("ECOMMERCE_PREFIX", prefix)
        // Long enough for an answered payment on a loaded machine; G-1's is never
        // answered, so the test waits this long once.
        .env("ECOMMERCE_PAYMENT_TIMEOUT_SECS", "10")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the service starts")
}

/// Waits until the process says it is ready (it waits for the topics it reads, so for
/// the services that publish them).
async fn ready(mut child: Child) -> ServiceProcess {
    let stdout = child.stdout.take().expect("piped");
    let mut lines = BufReader::new(stdout).lines();
    let http = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(line) = lines.next_line().await.expect("reads") {
            if let Some((_, rest)) = line.split_once("ready: http://") {
                return rest.split_whitespace().next().map(str::to_owned);
            }
        }
        None
    })
    .await
    .expect("the service is ready in time")
    .expect("the service says where it serves");
    // Keep reading its output, so that it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    ServiceProcess { child, http }
}

/// `GET path` on `address`: the body.
async fn get(address: &str, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connects");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("writes");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("reads");
    assert!(response.starts_with("HTTP/1.1 200"), "{path}: {response}");
    response
}

/// Whether the services are in the middle of G-1's saga (its payment step waits for a
/// gateway that never answers, so the Payment service must void it after the deadline)
/// while every other order has ended: killing the Payment service now kills it mid-saga,
/// and the outcome of every order is still determined.
async fn mid_saga(ledger: &Ledger) -> bool {
    for (order_id, _) in ORDERS {
        let saga = ledger.saga(order_id).await.expect("reads");
        let ended = matches!(saga.phase(), SagaPhase::Completed | SagaPhase::Aborted);
        if order_id == "G-1" {
            let paying = matches!(
                saga.status_of(steps::PAYMENT),
                Some(StepStatus::Running { .. })
            );
            if ended || !paying {
                return false;
            }
        } else if !ended {
            return false;
        }
    }
    true
}

/// Waits (on the Order store's live wait, re-checking at least every second) until
/// `done` holds, for at most `patience`.
async fn wait_until<F, Fut>(ledger: &Ledger, patience: Duration, what: &str, done: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let store = std::sync::Arc::clone(&ledger.stores()[ServiceName::Order.index()].0);
    let deadline = tokio::time::Instant::now() + patience;
    while !done().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {patience:?}"
        );
        let head = store.head_position().await.expect("head");
        let _ = tokio::time::timeout(Duration::from_secs(1), store.wait_for_events(head)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(all(postgres_tests, nats_tests)),
    ignore = "set DATABASE_URL and NATS_URL (scripts/test provisions both) to run the multi-process test"
)]
async fn five_processes_end_every_order_once_with_a_service_killed_mid_saga() {
    // `ect_` like every test schema: scripts/test drops them.
    let prefix = format!("ect_p{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let deployment = Deployment {
        prefix: prefix.clone(),
    };
    let children: Vec<(ServiceName, Child)> = ServiceName::ALL
        .into_iter()
        .map(|service| (service, spawn(service, &prefix)))
        .collect();
    let mut processes = BTreeMap::new();
    for (service, child) in children {
        processes.insert(service, ready(child).await);
    }
    let client = async_nats::connect(eventcore_tests::nats::nats_url())
        .await
        .expect("connects");
    let ledger = ledger(&deployment, &eventcore_tests::postgres::database_url())
        .await
        .expect("the stores open");

    let placed = place_orders(&client, &prefix, Duration::from_secs(60))
        .await
        .expect("the orders are placed");
    assert_eq!(placed.len(), ORDERS.len());

    // In the middle of the sagas: a payment step is running.
    wait_until(
        &ledger,
        Duration::from_secs(60),
        "a payment step running",
        || mid_saga(&ledger),
    )
    .await;
    assert!(
        !all_ended(&ledger).await.expect("reads"),
        "every saga had ended already"
    );
    let payment = processes.get_mut(&ServiceName::Payment).expect("started");
    payment.child.start_kill().expect("SIGKILL");
    let status = payment.child.wait().await.expect("ends");
    assert!(
        !status.success(),
        "the payment service was killed: {status:?}"
    );
    println!("payment service killed mid-saga ({status})");
    processes.insert(
        ServiceName::Payment,
        ready(spawn(ServiceName::Payment, &prefix)).await,
    );

    wait_until(
        &ledger,
        Duration::from_secs(180),
        "every saga ended",
        || async { all_ended(&ledger).await.expect("reads") },
    )
    .await;
    // Every order ended as it should, each effect once, in each service's own store.
    for line in check_orders(&ledger)
        .await
        .expect("every order ended as it should")
    {
        println!("{line}");
    }
    // One correlation id and one trace per order on every event of its processing, in
    // every store.
    let correlations: BTreeMap<String, String> = placed.into_iter().collect();
    let mut traces: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    for name in ServiceName::ALL {
        for event in ledger.log(name).await.expect("reads") {
            let Some(order) =
                eventcore_examples::distributed_ecommerce::scenarios::order_of(&event)
            else {
                continue;
            };
            assert_eq!(
                event.metadata.correlation_id.to_string(),
                correlations[&order],
                "{} of {} in the {name} service",
                event.event_type.as_str(),
                event.stream_id
            );
            let trace = event
                .metadata
                .trace_context
                .as_ref()
                .map_or_else(|| "none".to_owned(), |c| c.trace_id().to_owned());
            traces
                .entry(order)
                .or_default()
                .entry(trace)
                .or_default()
                .push(format!("{name}:{}", event.event_type.as_str()));
        }
    }
    for (order, by_trace) in &traces {
        assert!(
            by_trace.len() == 1 && !by_trace.contains_key("none"),
            "order {order}: its events are in {} traces: {by_trace:?}",
            by_trace.len()
        );
        let services: std::collections::BTreeSet<&str> = by_trace
            .values()
            .flatten()
            .filter_map(|e| e.split(':').next())
            .collect();
        println!("order {order}: one trace over {services:?}");
    }

    // Each service's /metrics shows its commands and what it published and consumed.
    for (service, process) in &processes {
        let metrics = get(&process.http, "/metrics").await;
        let ready = get(&process.http, "/ready").await;
        assert!(ready.contains("\"status\""), "{service}: {ready}");
        // (The Payment process was restarted: its counters start then, and it voided
        // G-1's payment after the restart.)
        assert!(
            metrics.contains("eventcore_commands_total{"),
            "{service}: no command metrics"
        );
        assert!(
            metrics.contains(&format!(
                "eventcore_events_published_total{{service=\"{service}\",topic=\"{}\"}}",
                service.topic()
            )),
            "{service}: no published events in\n{metrics}"
        );
        if *service != ServiceName::User {
            assert!(
                metrics.contains(&format!(
                    "eventcore_events_consumed_total{{service=\"{service}\""
                )),
                "{service}: no consumed events in\n{metrics}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(nats_tests),
    ignore = "set NATS_URL (scripts/test provisions one) to run the NATS tests"
)]
async fn the_nine_scenarios_hold_with_the_services_talking_over_nats_jetstream() {
    use eventcore::ProjectionErrorPolicy;
    use eventcore_examples::distributed_ecommerce::payment::FakeGateway;
    use eventcore_examples::distributed_ecommerce::scenarios::{Narrative, run_all};
    use eventcore_examples::distributed_ecommerce::shop::{Environment, Shop, memory_stores};

    let prefix = format!("ect_n{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let client = async_nats::connect(eventcore_tests::nats::nats_url())
        .await
        .expect("connects");
    let broker = Deployment { prefix }.broker(client).expect("valid prefix");
    let env = Environment {
        clock: eventcore::saga::ManualClock::new(chrono::Utc::now()),
        gateway: std::sync::Arc::new(FakeGateway::default()),
        policy: ProjectionErrorPolicy::new().with_max_attempts(1),
    };
    let stores = ServiceName::ALL.iter().map(|_| memory_stores()).collect();
    let mut shop = Shop::start(stores, broker, env)
        .await
        .expect("the services start");
    let mut out = Narrative::quiet();
    run_all(&mut shop, &mut out)
        .await
        .expect("every scenario holds over NATS");
    assert!(
        out.lines()
            .iter()
            .any(|l| l.contains("holds a name, e-mail, street or card")),
        "the sales report was checked"
    );
}
