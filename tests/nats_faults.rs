//! Fault tests against real `nats-server` processes of the tests' own: the server
//! killed (SIGKILL) and restarted under load, a node of a 3-node cluster killed and
//! restarted under load, and a dedup window shorter than an outage. Two services with separate stores, orders and billing (the
//! `two_services` fixtures); checked at the end: billing holds exactly one opening and
//! one confirmation per order, nothing is parked, and the broker holds every public
//! event once, in log order.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use eventcore::testing::transport_conformance::AnswerLost;
use eventcore::{CommandExecutor, EventStore, LogQuery, StreamId};
use eventcore_memory::InMemoryEventStore;
use eventcore_nats::{NatsConfig, NatsTransport};
use eventcore_tests::nats::{fresh_prefix, published};
use eventcore_tests::nats_server::{NatsCluster, NatsServer};
use eventcore_tests::two_services::{
    self, PlaceOrder, check_billing, orders_service, wait_for_invoices,
};

/// Orders per run; `EVENTCORE_E2E_ORDERS` runs longer on demand.
fn order_count() -> usize {
    std::env::var("EVENTCORE_E2E_ORDERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120)
}

/// A client that reconnects quickly and forever, and a transport on it whose waits are
/// short, so a restart costs the test seconds, not minutes.
async fn transport(url: impl async_nats::ToServerAddrs, config: NatsConfig) -> NatsTransport {
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis(20 * u64::try_from(attempts.min(10)).unwrap_or(10))
        })
        .connect(url)
        .await
        .expect("connects");
    NatsTransport::new(client, config)
}

fn quick_config() -> NatsConfig {
    NatsConfig::default()
        .with_prefix(fresh_prefix())
        .and_then(|c| c.with_ack_wait(Duration::from_secs(2)))
        .and_then(|c| c.with_pull_expiry(Duration::from_secs(1)))
        .expect("valid")
}

async fn place(executor: &CommandExecutor, n: usize, expected: &mut BTreeMap<String, u64>) {
    let id = format!("o{n}");
    let amount = (n as u64 * 7919) % 10_000 + 1;
    executor
        .execute(&PlaceOrder {
            order: StreamId::try_new(format!("order-{id}")).expect("valid"),
            id: id.clone(),
            amount,
        })
        .await
        .expect("places");
    expected.insert(id, amount);
}

/// The broker holds every public event of `orders` once, in log order.
async fn assert_published_once(transport: &NatsTransport, orders: &Arc<dyn EventStore>) {
    let public: Vec<(String, u64)> = orders
        .read_all(&LogQuery::new().with_stream_prefix("order-"))
        .await
        .expect("reads")
        .iter()
        .map(|e| (e.event_id.to_string(), e.global_position.value()))
        .collect();
    assert_eq!(
        published(transport, &orders_service()).await,
        public,
        "every public event once, in log order"
    );
}

/// Billing holds each order's effects once and parked nothing, and the broker holds
/// every public event of orders once, in log order.
async fn assert_delivered_once(
    nats: &NatsTransport,
    orders: &Arc<dyn EventStore>,
    billing: &Arc<dyn EventStore>,
    expected: &BTreeMap<String, u64>,
) {
    check_billing(billing, expected).await;
    let mut check = two_services::subscriber_on(billing, Arc::new(nats.subscriber()));
    assert!(
        check.parked().await.expect("reads").is_empty(),
        "nothing parked"
    );
    assert_published_once(nats, orders).await;
}

/// Orders and billing on separate in-memory stores, running live over `nats`: the
/// orders publisher and two billing subscriber instances, until stopped.
struct Live {
    orders: Arc<dyn EventStore>,
    billing: Arc<dyn EventStore>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<eventcore::Result<()>>>,
}

impl Live {
    async fn start(nats: &NatsTransport) -> Live {
        let orders_store = InMemoryEventStore::new();
        let orders: Arc<dyn EventStore> = Arc::new(orders_store.clone());
        let billing: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
        let mut publisher = two_services::publisher_on(
            &orders,
            Arc::new(orders_store),
            Arc::new(nats.publisher(orders_service())),
        );
        publisher
            .publish_available()
            .await
            .expect("declares the topic");
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let until_stopped = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
            let _ = stopped.wait_for(|s| *s).await;
        };
        let mut tasks = vec![tokio::spawn({
            let stopped = stopped.clone();
            async move { publisher.run(until_stopped(stopped)).await }
        })];
        for _ in 0..2 {
            let mut runner = two_services::subscriber_on(&billing, Arc::new(nats.subscriber()));
            let stopped = stopped.clone();
            tasks.push(tokio::spawn(async move {
                runner.run(until_stopped(stopped)).await
            }));
        }
        Live {
            orders,
            billing,
            stop,
            tasks,
        }
    }

    /// Stops the publisher and the subscribers; each must have ended without an error.
    async fn stop(self) {
        self.stop.send(true).expect("running");
        for task in self.tasks {
            task.await.expect("joins").expect("ran without an error");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(nats_tests),
    ignore = "set NATS_URL and NATS_SERVER_BIN (scripts/test does) to run the NATS fault tests"
)]
async fn a_server_killed_and_restarted_under_load_loses_nothing_and_applies_nothing_twice() {
    let mut server = NatsServer::start().await;
    let nats = transport(&server.url(), quick_config()).await;
    let live = Live::start(&nats).await;
    let (orders, billing) = (live.orders.clone(), live.billing.clone());
    let executor = CommandExecutor::new(orders.clone());
    let mut expected = BTreeMap::new();
    let total = order_count();
    let mut kills = 0;
    for n in 0..total {
        // Killed at a quarter and at three quarters, each time for a fifth of the run:
        // orders go on meanwhile (the store is the outbox).
        if n == total / 4 || n == total * 3 / 4 {
            server.kill().await;
            kills += 1;
        }
        if n == total / 4 + total / 5 || n == total * 3 / 4 + total / 5 {
            server.restart().await;
        }
        place(&executor, n, &mut expected).await;
    }
    eventcore::testing::within_hang_guard(
        "billing catches up after the restarts",
        wait_for_invoices(&billing, 2 * total),
    )
    .await;
    live.stop().await;
    println!("nats-server killed {kills} times during {total} orders");
    assert_delivered_once(&nats, &orders, &billing, &expected).await;
}

/// The node leading `service`'s publication stream.
async fn stream_leader(nats: &NatsTransport, cluster: &NatsCluster) -> usize {
    let name = nats.config().stream_name(&orders_service());
    let mut stream = nats.context().get_stream(&name).await.expect("the stream");
    let info = stream.info().await.expect("stream info");
    let leader = info
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .expect("a replicated stream with a leader");
    assert_eq!(
        info.config.num_replicas, 3,
        "the publication stream is replicated on all three nodes"
    );
    cluster.index_of(&leader)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(nats_tests),
    ignore = "set NATS_URL and NATS_SERVER_BIN (scripts/test does) to run the NATS fault tests"
)]
async fn a_cluster_node_killed_and_restarted_under_load_loses_nothing_and_applies_nothing_twice() {
    let mut cluster = NatsCluster::start().await;
    let config = quick_config().with_replicas(3).expect("valid");
    let nats = transport(cluster.urls(), config).await;
    let live = Live::start(&nats).await;
    let (orders, billing) = (live.orders.clone(), live.billing.clone());
    let executor = CommandExecutor::new(orders.clone());
    let mut expected = BTreeMap::new();
    let total = order_count();
    let mut killed = Vec::new();
    for n in 0..total {
        if n == total / 4 {
            // The stream's leader first: the hardest node to lose.
            eventcore::testing::within_hang_guard(
                "billing keeps up before the first kill",
                wait_for_invoices(&billing, 2 * n),
            )
            .await;
            let leader = stream_leader(&nats, &cluster).await;
            cluster.nodes[leader].kill().await;
            killed.push(leader);
        }
        if n == total / 2 {
            // Two nodes of three carried publication and consumption meanwhile.
            eventcore::testing::within_hang_guard(
                "billing keeps up with one node down",
                wait_for_invoices(&billing, 2 * n),
            )
            .await;
            // Healthy means every replica it holds has caught up with its leader.
            cluster.nodes[killed[0]].restart().await;
        }
        if n == total * 3 / 4 {
            // Then another node: what remains is the restarted node and one other, so
            // the restarted node's copy is now needed for a quorum.
            let other = (0..3).find(|i| *i != killed[0]).expect("three nodes");
            cluster.nodes[other].kill().await;
            killed.push(other);
        }
        place(&executor, n, &mut expected).await;
    }
    eventcore::testing::within_hang_guard(
        "billing catches up with the restarted node and one other",
        wait_for_invoices(&billing, 2 * total),
    )
    .await;
    cluster.nodes[killed[1]].restart().await;
    live.stop().await;
    println!("cluster nodes killed (in order): {killed:?} during {total} orders");
    assert_delivered_once(&nats, &orders, &billing, &expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(nats_tests),
    ignore = "set NATS_URL and NATS_SERVER_BIN (scripts/test does) to run the NATS fault tests"
)]
async fn a_dedup_window_shorter_than_an_outage_still_duplicates_nothing() {
    let server = NatsServer::start().await;
    let config = quick_config()
        .with_duplicate_window(Duration::from_secs(1))
        .expect("valid");
    let nats = transport(&server.url(), config).await;
    let orders_store = InMemoryEventStore::new();
    let orders: Arc<dyn EventStore> = Arc::new(orders_store.clone());
    let billing: Arc<dyn EventStore> = Arc::new(InMemoryEventStore::new());
    let executor = CommandExecutor::new(orders.clone());
    let mut expected = BTreeMap::new();
    for n in 0..20 {
        place(&executor, n, &mut expected).await;
    }
    // Published, but the publisher crashed before it heard so (no checkpoint).
    let lost = two_services::publisher_on(
        &orders,
        Arc::new(orders_store.clone()),
        Arc::new(AnswerLost(Arc::new(nats.publisher(orders_service())))),
    )
    .publish_available()
    .await;
    assert!(lost.is_err(), "{lost:?}");
    // Billing handles what is there; the first three effects lose their
    // acknowledgement (a crash between effect and ack).
    let mut runner = two_services::subscriber_on(&billing, Arc::new(nats.subscriber()));
    let subscriber = nats.subscriber();
    let mut subscription =
        eventcore::distributed::EventSubscriber::subscribe(&subscriber, &two_services::spec())
            .await
            .expect("subscribes");
    for _ in 0..3 {
        let delivery = subscription.next().await.expect("delivers");
        runner.process(&delivery).await.expect("processes");
        drop(subscription);
        subscription =
            eventcore::distributed::EventSubscriber::subscribe(&subscriber, &two_services::spec())
                .await
                .expect("subscribes");
        let again = subscription.next().await.expect("delivers again");
        assert_eq!(again.event.event_id, delivery.event.event_id);
        // The outage outlasts the broker's dedup window (the one condition this test
        // waits for on the server's clock).
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        runner.process(&again).await.expect("processes");
        subscription.ack(&again).await.expect("acknowledges");
    }
    // The restarted publisher finds what is held and sends only the rest, long after
    // the window.
    let held = published(&nats, &orders_service()).await.len();
    assert!(held > 0, "the lost answer's events are held");
    let summary = two_services::publisher_on(
        &orders,
        Arc::new(orders_store.clone()),
        Arc::new(nats.publisher(orders_service())),
    )
    .publish_available()
    .await
    .expect("publishes");
    assert_eq!(
        summary.published as usize,
        2 * expected.len() - held,
        "what was held is not published again"
    );
    for n in 20..30 {
        place(&executor, n, &mut expected).await;
    }
    let mut publisher = two_services::publisher_on(
        &orders,
        Arc::new(orders_store.clone()),
        Arc::new(nats.publisher(orders_service())),
    );
    publisher.publish_available().await.expect("publishes");
    drop(subscription);
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(async move {
        runner
            .run(async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await
            .map(|()| runner)
    });
    eventcore::testing::within_hang_guard(
        "billing catches up",
        wait_for_invoices(&billing, 2 * expected.len()),
    )
    .await;
    stop.send(true).expect("running");
    let mut runner = running.await.expect("joins").expect("ran");
    check_billing(&billing, &expected).await;
    assert!(
        runner.parked().await.expect("reads").is_empty(),
        "nothing parked"
    );
    assert_published_once(&nats, &orders).await;
}

/// The position header of a core NATS message, if it has one.
fn position_of(message: &async_nats::Message) -> Option<u64> {
    message
        .headers
        .as_ref()?
        .get("Eventcore-Global-Position")?
        .as_str()
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(all(nats_tests, postgres_tests)),
    ignore = "set NATS_URL and DATABASE_URL (scripts/test does) to run the NATS fault tests"
)]
async fn a_publisher_process_killed_at_random_points_under_load_publishes_everything_once_in_order()
{
    use futures::StreamExt;
    use rand::{Rng, SeedableRng};

    let schema = eventcore_tests::postgres::fresh_schema();
    let store = eventcore_tests::postgres::store_in(&schema).await;
    let orders: Arc<dyn EventStore> = Arc::new(store.clone());
    let prefix = fresh_prefix();
    let url = eventcore_tests::nats::nats_url();
    let nats = transport(
        &url,
        NatsConfig::default()
            .with_prefix(prefix.clone())
            .expect("valid"),
    )
    .await;
    // Every publish the publishers send, stored or refused: progress to kill at.
    let mut sent = nats
        .context()
        .client()
        .subscribe(format!("{prefix}.order-events.>"))
        .await
        .expect("subscribes");
    let total = order_count();
    let load = tokio::spawn({
        let orders = orders.clone();
        async move {
            let executor = CommandExecutor::new(orders);
            let mut expected = BTreeMap::new();
            for n in 0..total {
                place(&executor, n, &mut expected).await;
            }
            expected
        }
    });
    let spawn = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_fault-publisher"))
            .arg(schema.as_str())
            .arg(&url)
            .arg(&prefix)
            .kill_on_drop(true)
            .spawn()
            .expect("starts the publisher process")
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(16);
    let kills = 5;
    for _ in 0..kills {
        let mut child = spawn();
        // Killed (SIGKILL) after a random number of publishes.
        let after = rng.random_range(1..=2 * total / kills);
        eventcore::testing::within_hang_guard("the publisher publishes", async {
            for _ in 0..after {
                sent.next().await.expect("the subscription lives");
            }
        })
        .await;
        child.kill().await.expect("kills the publisher");
    }
    let expected = load.await.expect("the load ran");
    let last = orders
        .read_all(&LogQuery::new().with_stream_prefix("order-"))
        .await
        .expect("reads")
        .last()
        .map(|e| e.global_position.value())
        .expect("orders were placed");
    // The last one restarts and finishes: wait until the stream holds the last event,
    // read from the stream itself (a core subscriber can see a publish before the
    // stream has stored it, and nothing is published after the last one).
    drop(sent);
    let mut child = spawn();
    let mut stored = nats
        .context()
        .get_stream(nats.config().stream_name(&orders_service()))
        .await
        .expect("the earlier publishers created the stream")
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await
        .expect("an ordered consumer")
        .messages()
        .await
        .expect("reads the stream");
    eventcore::testing::within_hang_guard("the last publisher catches up", async {
        loop {
            let message = stored
                .next()
                .await
                .expect("the stream is read")
                .expect("a stored message");
            if position_of(&message) == Some(last) {
                break;
            }
        }
    })
    .await;
    child.kill().await.expect("stops the publisher");
    println!(
        "publisher processes killed: {kills}, {} orders",
        expected.len()
    );
    assert_published_once(&nats, &orders).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(all(nats_tests, postgres_tests)),
    ignore = "set NATS_URL and DATABASE_URL (scripts/test does) to run the NATS fault tests"
)]
async fn a_subscriber_process_dying_between_effect_and_ack_never_repeats_the_effect() {
    use rand::{Rng, SeedableRng};

    let schema = eventcore_tests::postgres::fresh_schema();
    let billing_store = eventcore_tests::postgres::store_in(&schema).await;
    let billing: Arc<dyn EventStore> = Arc::new(billing_store);
    let prefix = fresh_prefix();
    let url = eventcore_tests::nats::nats_url();
    let nats = transport(
        &url,
        NatsConfig::default()
            .with_prefix(prefix.clone())
            .expect("valid"),
    )
    .await;
    let orders_store = InMemoryEventStore::new();
    let orders: Arc<dyn EventStore> = Arc::new(orders_store.clone());
    let executor = CommandExecutor::new(orders.clone());
    let mut expected = BTreeMap::new();
    let total = order_count() / 2;
    for n in 0..total {
        place(&executor, n, &mut expected).await;
    }
    two_services::publisher_on(
        &orders,
        Arc::new(orders_store),
        Arc::new(nats.publisher(orders_service())),
    )
    .publish_available()
    .await
    .expect("publishes");
    let spawn = |abort_at: Option<u64>| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_fault-subscriber"));
        command.arg(schema.as_str()).arg(&url).arg(&prefix);
        if let Some(n) = abort_at {
            command.arg(n.to_string());
        }
        command
            .kill_on_drop(true)
            .spawn()
            .expect("starts the subscriber process")
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let crashes: u64 = 4;
    let mut effects_before = Vec::new();
    for _ in 0..crashes {
        // At least 2: the first event a new process handles is the one its predecessor
        // died holding (no new effect), so each process makes progress.
        let abort_at = rng.random_range(2..=(2 * total as u64 / crashes));
        let mut child = spawn(Some(abort_at));
        let mut exit = None;
        eventcore::testing::within_hang_guard("the subscriber dies after an effect", async {
            exit = Some(child.wait().await.expect("waits for the process"));
        })
        .await;
        let status = exit.expect("exited");
        assert!(
            !status.success(),
            "the process aborted after an effect: {status}"
        );
        let effects = billing
            .read_all(&LogQuery::new().with_stream_prefix("invoice-"))
            .await
            .expect("reads")
            .len();
        effects_before.push(effects);
    }
    assert!(
        effects_before.windows(2).all(|w| w[0] < w[1]),
        "each process made progress before it died: {effects_before:?}"
    );
    let mut child = spawn(None);
    eventcore::testing::within_hang_guard(
        "billing catches up",
        wait_for_invoices(&billing, 2 * total),
    )
    .await;
    child.kill().await.expect("stops the subscriber");
    println!(
        "subscriber processes died between effect and ack: {crashes}; effects seen after each: {effects_before:?}"
    );
    check_billing(&billing, &expected).await;
    // A repeated effect would have been refused by the invoice and parked.
    let mut check = two_services::subscriber_on(&billing, Arc::new(nats.subscriber()));
    assert!(
        check.parked().await.expect("reads").is_empty(),
        "nothing parked"
    );
}
