//! W6 (publication) and W7 (end to end across two services), on the in-memory broker or
//! on NATS JetStream, and the broker's own limit for W6: the same messages published
//! straight through async-nats with pipelined acknowledgements (`nats_floor`).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use eventcore::distributed::{
    DistributedEvent, EventHandler, EventPublisher, EventSubscriber, PublicationPolicy,
    PublicationRule, PublisherRunner, ServiceId, SubscriptionName, SubscriptionRunner,
    SubscriptionSpec, Topic,
};
use eventcore::{CommandExecutor, Dispatcher, EventId, EventStore, LogQuery, StreamId};
use eventcore_memory::InMemoryBroker;
use eventcore_nats::{NatsConfig, NatsTransport};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use rand::Rng;
use serde::Serialize;

use crate::bank::{Deposit, Open, account};
use crate::{Report, Run, Stores, load};

/// The broker between the services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Broker {
    /// `eventcore_memory::InMemoryBroker`, in the benchmark's process.
    Memory,
    /// NATS JetStream at `--nats-url` (or `NATS_URL`), file storage, one replica.
    Nats,
    /// No framework: the W6 messages published straight through async-nats.
    NatsFloor,
    /// As `nats-floor`, each message expecting its predecessor's sequence.
    NatsFloorChained,
}

/// A broker of one run: everything on it is fresh (a new in-memory broker, or a new
/// subject prefix on the NATS server).
#[derive(Clone)]
pub(crate) enum Transport {
    Memory(InMemoryBroker),
    Nats(Box<NatsTransport>),
}

impl Transport {
    pub(crate) async fn open(broker: Broker, nats_url: Option<&str>) -> Result<Self, String> {
        match broker {
            Broker::Memory => Ok(Transport::Memory(InMemoryBroker::new())),
            Broker::Nats | Broker::NatsFloor | Broker::NatsFloorChained => {
                let url = nats_url.ok_or("nats needs --nats-url or NATS_URL")?;
                let client = async_nats::connect(url)
                    .await
                    .map_err(|e| format!("connecting to {url}: {e}"))?;
                let config = NatsConfig::default()
                    .with_prefix(fresh_prefix())
                    .map_err(|e| e.to_string())?;
                Ok(Transport::Nats(Box::new(NatsTransport::new(
                    client, config,
                ))))
            }
        }
    }

    fn publisher(&self, service: ServiceId) -> Arc<dyn EventPublisher> {
        match self {
            Transport::Memory(broker) => Arc::new(broker.publisher(service)),
            Transport::Nats(nats) => Arc::new(nats.publisher(service)),
        }
    }

    fn subscriber(&self) -> Arc<dyn EventSubscriber> {
        match self {
            Transport::Memory(broker) => Arc::new(broker.clone()),
            Transport::Nats(nats) => Arc::new(nats.subscriber()),
        }
    }

    /// Removes what the run left on the server.
    async fn clean_up(&self, service: &ServiceId) {
        if let Transport::Nats(nats) = self {
            let _ = nats
                .context()
                .delete_stream(nats.config().stream_name(service))
                .await;
        }
    }
}

fn fresh_prefix() -> String {
    format!("bench{}", &uuid::Uuid::new_v4().simple().to_string()[..16])
}

fn bank() -> ServiceId {
    ServiceId::try_new("bank").expect("valid")
}

fn topic() -> Topic {
    Topic::try_new("account-events").expect("valid")
}

fn publisher(stores: &Stores, transport: &Transport) -> Result<PublisherRunner, String> {
    let policy =
        PublicationPolicy::new([PublicationRule::new(topic()).with_stream_prefix("account-")])
            .map_err(|e| e.to_string())?;
    PublisherRunner::new(
        stores.0.clone(),
        stores.1.clone(),
        transport.publisher(bank()),
        policy,
    )
    .map_err(|e| e.to_string())
}

fn report(run: &Run, broker: Broker) -> Report {
    Report {
        backend: run.backend,
        broker: Some(broker),
        workload: run.workload,
        concurrency: run.concurrency,
        duration_s: 0.0,
        ops_per_s: None,
        events_per_s: None,
        p50_ms: None,
        p99_ms: None,
        max_ms: None,
        retries_per_op: None,
        failed: None,
        invariant_ok: None,
        rate: None,
        lag: None,
        snapshots: None,
        stream_events: None,
        next_p50_ms: None,
    }
}

/// W6: `events` public events loaded (the W4 data), then published and acknowledged.
/// The invariant: the broker's publication ends at the last event and every event
/// was published once.
pub(crate) async fn run_publication(
    run: &Run,
    stores: Stores,
    broker: Broker,
    nats_url: Option<&str>,
    events: usize,
) -> Result<Report, String> {
    let transport = Transport::open(broker, nats_url).await?;
    load(&*stores.0, run.accounts, events).await?;
    let mut runner = publisher(&stores, &transport)?;
    let started = Instant::now();
    let summary = runner
        .publish_available()
        .await
        .map_err(|e| format!("publishing: {e}"))?;
    let seconds = started.elapsed().as_secs_f64();
    let last = stores.0.head_position().await.map_err(|e| e.to_string())?;
    let held = transport
        .publisher(bank())
        .last_published()
        .await
        .map_err(|e| e.to_string())?;
    transport.clean_up(&bank()).await;
    let mut report = report(run, broker);
    report.duration_s = seconds;
    report.events_per_s = Some(summary.published as f64 / seconds);
    report.failed = Some(0);
    report.invariant_ok = Some(summary.published == events as u64 && held == last);
    Ok(report)
}

/// The broker's own limit for W6: as many messages, each exactly as large as one W6
/// message (its body and headers, with a unique `Nats-Msg-Id`) and on the same subject
/// as the event it stands for, published to a stream of the same configuration
/// straight through async-nats, at most `window`
/// acknowledgements outstanding, each awaited in order. No framework, no store.
/// `chained`: each message also carries the expectations EventCore's publisher sends
/// (`Nats-Expected-Stream`, `Nats-Expected-Last-Sequence`), which cost the server
/// work of their own.
pub(crate) async fn nats_floor(
    run: &Run,
    nats_url: Option<&str>,
    events: usize,
    window: usize,
    chained: bool,
) -> Result<Report, String> {
    // One W6 message to copy: publish a few events through the framework first.
    let Transport::Nats(nats) = Transport::open(Broker::Nats, nats_url).await? else {
        unreachable!("a NATS transport was asked for");
    };
    let sample_store = eventcore_memory::InMemoryEventStore::new();
    let sample: Stores = (Arc::new(sample_store.clone()), Arc::new(sample_store));
    load(&*sample.0, 1, 1).await?;
    publisher(&sample, &Transport::Nats(nats.clone()))?
        .publish_available()
        .await
        .map_err(|e| e.to_string())?;
    let context = nats.context().clone();
    let source = nats.config().stream_name(&bank());
    let template = context
        .get_stream(&source)
        .await
        .map_err(|e| e.to_string())?
        .get_raw_message(1)
        .await
        .map_err(|e| e.to_string())?;
    let mut config = context
        .get_stream(&source)
        .await
        .map_err(|e| e.to_string())?
        .info()
        .await
        .map_err(|e| e.to_string())?
        .config
        .clone();
    let _ = context.delete_stream(&source).await;
    // The same subjects as W6's messages (one per account, as the load wrote them),
    // captured by a stream of the same configuration (the sample's was deleted).
    let name = format!("{}-floor", nats.config().prefix());
    config.name = name.clone();
    context
        .create_stream(config)
        .await
        .map_err(|e| e.to_string())?;
    let accounts = run.accounts.max(1);
    let per_account = events.div_ceil(accounts);
    let subjects: Vec<String> = (0..accounts)
        .map(|n| nats.config().subject(&topic(), &account(n)))
        .collect();
    let payload = template.payload.clone();
    // The framework's headers, less its expectations (which name the other stream)
    // and its message id (one per message below), with a filler of their size.
    let mut headers = async_nats::HeaderMap::new();
    let mut removed: usize = 0;
    for (name, values) in template.headers.iter() {
        let text = name.to_string();
        for value in values {
            if text.starts_with("Nats-") {
                removed += text.len() + value.as_str().len();
            } else {
                headers.append(name.clone(), value.clone());
            }
        }
    }
    let filler = "x".repeat(removed.saturating_sub("X-Filler".len() + 36 + "Nats-Msg-Id".len()));
    headers.insert("X-Filler", filler.as_str());
    let mut outstanding = VecDeque::with_capacity(window);
    // Fresh ids as long as an event id, without a random draw each (a system call per
    // id would be the floor's own cost, not the broker's).
    let ids = uuid::Uuid::now_v7().as_u128();
    let started = Instant::now();
    for n in 0..events {
        let mut headers = headers.clone();
        headers.insert(
            "Nats-Msg-Id",
            uuid::Uuid::from_u128(ids.wrapping_add(n as u128))
                .to_string()
                .as_str(),
        );
        if chained {
            // Each publish expects its predecessor, as EventCore's publisher does.
            headers.insert("Nats-Expected-Last-Sequence", n.to_string().as_str());
            headers.insert("Nats-Expected-Stream", name.as_str());
        }
        let ack = context
            .send_publish(
                subjects[n / per_account].clone(),
                jetstream::message::PublishMessage::build()
                    .headers(headers)
                    .payload(payload.clone()),
            )
            .await
            .map_err(|e| e.to_string())?;
        outstanding.push_back(ack);
        if outstanding.len() >= window {
            let ack = outstanding.pop_front().expect("one is outstanding");
            ack.await.map_err(|e| e.to_string())?;
        }
    }
    while let Some(ack) = outstanding.pop_front() {
        ack.await.map_err(|e| e.to_string())?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let held = context
        .get_stream(&name)
        .await
        .map_err(|e| e.to_string())?
        .info()
        .await
        .map_err(|e| e.to_string())?
        .state
        .messages;
    let _ = context.delete_stream(&name).await;
    let mut report = report(
        run,
        if chained {
            Broker::NatsFloorChained
        } else {
            Broker::NatsFloor
        },
    );
    report.concurrency = window;
    report.duration_s = seconds;
    report.events_per_s = Some(events as f64 / seconds);
    report.failed = Some(0);
    report.invariant_ok = Some(held == events as u64);
    Ok(report)
}

/// What B measures: per event, from A's append returning to B's command returning.
/// Either side may come first (B can finish before A's `execute` has returned), so
/// each side leaves its instant for the other.
struct Timings {
    moments: Mutex<HashMap<EventId, Moment>>,
    latencies: Mutex<Option<Histogram<u64>>>,
    handled: tokio::sync::watch::Sender<u64>,
}

enum Moment {
    /// A's append returned.
    Sent(Instant),
    /// B's command returned.
    Done(Instant),
}

impl Timings {
    fn new() -> Self {
        Timings {
            moments: Mutex::new(HashMap::new()),
            latencies: Mutex::new(None),
            handled: tokio::sync::watch::channel(0).0,
        }
    }

    fn record(&self, sent: Instant, done: Instant) {
        let micros =
            u64::try_from(done.saturating_duration_since(sent).as_micros()).unwrap_or(u64::MAX);
        if let Some(histogram) = self.latencies.lock().as_mut() {
            histogram.saturating_record(micros.max(1));
        }
    }

    /// One side's moment for `event`: recorded as a latency when the other side's is
    /// there, kept for it otherwise (the first of a side is kept: a redelivery to B
    /// does not move B's moment).
    fn meet(&self, event: EventId, moment: Moment) {
        let pair = {
            let mut moments = self.moments.lock();
            match (moments.remove(&event), moment) {
                (Some(Moment::Sent(sent)), Moment::Done(done))
                | (Some(Moment::Done(done)), Moment::Sent(sent)) => (sent, done),
                (earlier, moment) => {
                    moments.insert(event, earlier.unwrap_or(moment));
                    return;
                }
            }
        };
        self.record(pair.0, pair.1);
    }

    fn handled(&self) -> u64 {
        *self.handled.borrow()
    }

    /// Waits (bounded) until B has handled `count` events.
    async fn wait_for(&self, count: u64, limit: Duration) -> Result<(), String> {
        let mut handled = self.handled.subscribe();
        match tokio::time::timeout(limit, handled.wait_for(|n| *n >= count)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(format!(
                "B handled {} of {count} events within {limit:?}",
                self.handled()
            )),
        }
    }
}

/// Service B: one command on its own store per event received.
struct Mirror {
    timings: Arc<Timings>,
}

impl EventHandler for Mirror {
    async fn handle(
        &mut self,
        event: &DistributedEvent,
        dispatcher: &mut Dispatcher<'_>,
    ) -> eventcore::Result<()> {
        dispatcher
            .dispatch(&Deposit {
                account: StreamId::try_new(format!("mirror-{}", event.stream_id))?,
                amount: 1,
            })
            .await?;
        self.timings
            .meet(event.event_id, Moment::Done(Instant::now()));
        self.timings.handled.send_modify(|n| *n += 1);
        Ok(())
    }
}

/// Commands A keeps in flight at most; an offer beyond it is not sent (and the run
/// reports the rate A actually offered).
const IN_FLIGHT: usize = 256;

/// One W7 run at `rate` events per second: A deposits at that fixed rate (open loop,
/// the schedule kept whatever the latency), its publisher and B's subscription run
/// live, split into `run.concurrency` partitions (one runner each). The invariant: after the run, B has handled each of A's public events exactly
/// once (its store holds one mirror event per event of A).
pub(crate) async fn run_end_to_end(
    run: &Run,
    a: Stores,
    b: Stores,
    broker: Broker,
    nats_url: Option<&str>,
    rate: f64,
) -> Result<Report, String> {
    let transport = Transport::open(broker, nats_url).await?;
    let timings = Arc::new(Timings::new());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    let mut publishing = publisher(&a, &transport)?;
    publishing
        .publish_available()
        .await
        .map_err(|e| format!("declaring the topic: {e}"))?;
    let publishing = tokio::spawn({
        let stopped = stopped.clone();
        async move { publishing.run(until_stopped(stopped)).await }
    });
    let spec = SubscriptionSpec::new(
        ServiceId::try_new("mirror").expect("valid"),
        SubscriptionName::try_new("deposits").expect("valid"),
        [topic()],
    );
    // B's subscription split `concurrency` ways, one runner per partition.
    let partitions = u32::try_from(run.concurrency)
        .map_err(|e| e.to_string())
        .and_then(|count| spec.split(count).map_err(|e| e.to_string()))?;
    let mut subscribing = Vec::new();
    for partition in partitions {
        let mut subscription = SubscriptionRunner::new(
            transport.subscriber(),
            partition,
            Mirror {
                timings: timings.clone(),
            },
            CommandExecutor::from_shared(b.0.clone()),
        )
        .map_err(|e| e.to_string())?;
        let stopped = stopped.clone();
        subscribing.push(tokio::spawn(async move {
            subscription.run(until_stopped(stopped)).await
        }));
    }

    // Set-up, not measured: the accounts opened in A and mirrored by B.
    let executor = CommandExecutor::from_shared(a.0.clone());
    for n in 0..run.accounts {
        executor
            .execute(&Open {
                account: account(n),
                owner: format!("owner-{n}"),
                initial: crate::INITIAL,
            })
            .await
            .map_err(|e| format!("opening accounts: {e}"))?;
    }
    timings
        .wait_for(run.accounts as u64, Duration::from_secs(120))
        .await?;

    let warmup_end = Instant::now() + run.warmup;
    let end = warmup_end + run.duration;
    let permits = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let offered = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut ticks = tokio::time::interval(Duration::from_millis(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut scheduled = 0_u64;
    let mut measuring = false;
    let mut handled_at_start = 0;
    loop {
        ticks.tick().await;
        let now = Instant::now();
        if now >= end {
            break;
        }
        if !measuring && now >= warmup_end {
            measuring = true;
            handled_at_start = timings.handled();
            *timings.latencies.lock() =
                Some(Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds"));
        }
        let due = (now - started).as_secs_f64() * rate;
        while (scheduled as f64) < due {
            scheduled += 1;
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                continue;
            };
            let (executor, timings, offered, failed) = (
                executor.clone(),
                timings.clone(),
                offered.clone(),
                failed.clone(),
            );
            let (accounts, measured) = (run.accounts, measuring);
            tokio::spawn(async move {
                let deposit = Deposit {
                    account: account(rand::rng().random_range(0..accounts)),
                    amount: 10,
                };
                match executor.execute(&deposit).await {
                    Ok(result) => {
                        let returned = Instant::now();
                        if measured {
                            offered.fetch_add(1, Ordering::Relaxed);
                            for event in &result.events_written {
                                timings.meet(event.event_id, Moment::Sent(returned));
                            }
                        }
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                drop(permit);
            });
        }
    }
    // How far behind B is when A stops: the lag the rate leaves.
    let written = count(&*a.0, "account-").await?;
    let handled_at_end = timings.handled();
    let lag = written.saturating_sub(handled_at_end);
    // Then B drains (bounded), and every event must have been handled once.
    let _ = permits
        .acquire_many(IN_FLIGHT as u32)
        .await
        .map_err(|e| e.to_string())?;
    let written = count(&*a.0, "account-").await?;
    let drained = timings.wait_for(written, Duration::from_secs(300)).await;
    stop.send(true).map_err(|e| e.to_string())?;
    publishing
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("publishing: {e}"))?;
    for partition in subscribing {
        partition
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("subscribing: {e}"))?;
    }
    drained?;
    let mirrored = count(&*b.0, "mirror-").await?;
    transport.clean_up(&bank()).await;

    let seconds = run.duration.as_secs_f64();
    let histogram = timings
        .latencies
        .lock()
        .take()
        .ok_or("the run ended before its warm-up")?;
    let ms = |micros: u64| micros as f64 / 1_000.0;
    let measured = !histogram.is_empty();
    let mut report = report(run, broker);
    report.duration_s = seconds;
    report.rate = Some(rate);
    report.ops_per_s = Some(offered.load(Ordering::Relaxed) as f64 / seconds);
    report.events_per_s = Some(handled_at_end.saturating_sub(handled_at_start) as f64 / seconds);
    report.p50_ms = measured.then(|| ms(histogram.value_at_quantile(0.50)));
    report.p99_ms = measured.then(|| ms(histogram.value_at_quantile(0.99)));
    report.max_ms = measured.then(|| ms(histogram.max()));
    report.failed = Some(failed.load(Ordering::Relaxed));
    // Exactly once: one mirror event per event of A (a redelivery writes nothing).
    report.invariant_ok = Some(mirrored == written);
    report.lag = Some(lag);
    Ok(report)
}

/// The events of `store` whose streams start with `prefix`, counted page by page.
async fn count(store: &dyn EventStore, prefix: &str) -> Result<u64, String> {
    let mut after = None;
    let mut total = 0;
    loop {
        let read = store
            .read_log(
                &LogQuery::new()
                    .with_stream_prefix(prefix)
                    .with_after(after)
                    .with_limit(10_000),
            )
            .await
            .map_err(|e| e.to_string())?;
        total += read.events.len() as u64;
        match read.scanned {
            Some(scanned) => after = Some(scanned),
            None => return Ok(total),
        }
    }
}

/// Whether a W7 run kept up: A offered at least 99% of the rate, nothing failed, B was
/// at most 100 ms of events behind when A stopped (a B slower than the rate by 1% is
/// 100 ms behind after 10 s), and every event was handled once.
pub(crate) fn kept_up(report: &Report) -> bool {
    let rate = report.rate.unwrap_or(0.0);
    report.invariant_ok == Some(true)
        && report.failed == Some(0)
        && report.ops_per_s.unwrap_or(0.0) >= 0.99 * rate
        && (report.lag.unwrap_or(u64::MAX) as f64) <= rate / 10.0
}
