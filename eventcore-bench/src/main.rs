//! Runs the benchmark workloads of `docs/benchmarks.md` against EventCore's backends.
//!
//! ```text
//! cargo run --release -p eventcore-bench -- --backend memory --workload w2 --concurrency 8
//! cargo run --release -p eventcore-bench -- --backend postgres --workload w1 --database-url postgres://...
//! cargo run --release -p eventcore-bench -- --backend postgres --broker nats --workload w7 --nats-url nats://...
//! cargo run --release -p eventcore-bench -- --all --duration 10
//! ```
//!
//! Each run prints one JSON line (`backend, broker, workload, concurrency, duration_s,
//! ops_per_s, events_per_s, p50_ms, p99_ms, max_ms, retries_per_op, failed,
//! invariant_ok, rate, lag`) and, at the end, a table. A broken invariant makes the
//! process exit non-zero. PostgreSQL runs use a fresh schema each, with the server's
//! default durability settings; NATS runs a fresh subject prefix, file storage, one
//! replica.
//!
//! W6 on NATS is preceded by the broker's own limit (`nats-floor` rows: the same
//! messages straight through async-nats). W7 runs at `--rate` first, then, with
//! `--max-rate`, searches the highest rate B keeps up with; B's subscription is split
//! into `--concurrency` partitions, one runner each.

mod bank;
mod cold;
mod distributed;
mod processes;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use eventcore::{
    AppendRequest, CheckpointStore, CommandExecutor, EventData, EventMetadata, EventStore,
    ExpectedVersion, ProjectionRunner, RetryPolicy, StreamId,
};
use eventcore_memory::InMemoryEventStore;
use eventcore_postgres::{PostgresConfig, PostgresEventStore, SchemaName};
use hdrhistogram::Histogram;
use rand::Rng;
use serde::Serialize;

use crate::bank::{AccountEvent, Deposit, Open, Transfer, account, balance};
use crate::distributed::Broker;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Backend {
    Memory,
    Postgres,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Workload {
    W1,
    W2,
    /// W2 from two processes (PostgreSQL only).
    #[value(name = "w2x2")]
    W2x2,
    W3,
    W4,
    W5,
    W6,
    W7,
    /// Cold start: the first command of a fresh executor on a stream of `--events`
    /// events, with and without snapshots.
    W8,
}

/// Benchmarks EventCore on the standard workloads.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The event store to measure.
    #[arg(long, value_enum, required_unless_present = "all")]
    backend: Option<Backend>,
    /// The workload (see docs/benchmarks.md).
    #[arg(long, value_enum, required_unless_present = "all")]
    workload: Option<Workload>,
    /// Concurrent tasks issuing commands back to back; for W7, the partitions of B's
    /// subscription (1, 2, 4, ... 64), one runner each.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Measured seconds, after the warm-up.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Warm-up seconds, not measured.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Accounts (default: 1,000; 10 for W3).
    #[arg(long)]
    accounts: Option<usize>,
    /// Events to load for W4.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// PostgreSQL URL (default: the DATABASE_URL environment variable).
    #[arg(long)]
    database_url: Option<String>,
    /// The broker of W6 and W7 (default: memory with the memory store, nats with
    /// PostgreSQL).
    #[arg(long, value_enum)]
    broker: Option<Broker>,
    /// NATS URL (default: the NATS_URL environment variable).
    #[arg(long)]
    nats_url: Option<String>,
    /// W7: the fixed rate of A's deposits, per second.
    #[arg(long, default_value_t = 1_000.0)]
    rate: f64,
    /// W7: after the run at `--rate`, search the highest rate B keeps up with.
    #[arg(long)]
    max_rate: bool,
    /// The whole matrix: W1, W2, W5 at C=1 and 8, W3 at C=8, W4, W6, W7; both backends
    /// (PostgreSQL when a URL is known, with NATS when its URL is known).
    #[arg(long)]
    all: bool,
    /// Install a Prometheus recorder (`metrics-exporter-prometheus`, no HTTP listener)
    /// first, so every metric EventCore emits is recorded: the cost of metrics.
    #[arg(long)]
    metrics: bool,
    /// Let executions over the same streams race instead of taking turns
    /// (`CommandExecutor::with_stream_queue(false)`): the cost and the gain of the queue.
    #[arg(long)]
    race: bool,
    /// Bring kept states forward with what other writers append
    /// (`CommandExecutor::with_log_feed`): for W2x2, two instances of a service.
    #[arg(long)]
    log_feed: bool,
    /// W2x2's child processes: run W2 on the accounts already opened in this schema,
    /// starting when told to on stdin (see `processes.rs`).
    #[arg(long, hide = true)]
    child_schema: Option<String>,
}

/// One JSON line per run, with exactly these keys.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    backend: Backend,
    /// W6 and W7: the broker.
    broker: Option<Broker>,
    workload: Workload,
    concurrency: usize,
    duration_s: f64,
    ops_per_s: Option<f64>,
    events_per_s: Option<f64>,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    max_ms: Option<f64>,
    retries_per_op: Option<f64>,
    failed: Option<u64>,
    invariant_ok: Option<bool>,
    /// W7: the rate A was asked to keep, per second.
    rate: Option<f64>,
    /// W7: events A had written that B had not handled when A stopped.
    lag: Option<u64>,
    /// W8: whether the fresh executors started from a snapshot.
    #[serde(skip_serializing_if = "Option::is_none")]
    snapshots: Option<bool>,
    /// W8: the events in the stream before the first command.
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_events: Option<u64>,
    /// W8: the median time of the command after the first (`p50_ms` and `max_ms` are
    /// the first command's).
    #[serde(skip_serializing_if = "Option::is_none")]
    next_p50_ms: Option<f64>,
}

pub(crate) struct Run {
    backend: Backend,
    workload: Workload,
    concurrency: usize,
    accounts: usize,
    duration: Duration,
    warmup: Duration,
    /// Executions race instead of taking turns.
    race: bool,
    /// Kept states follow the log.
    log_feed: bool,
}

/// A large initial balance, so that no transfer fails for lack of funds.
pub(crate) const INITIAL: i64 = 1_000_000_000;

/// A fresh store, as the event store and as the checkpoint store.
pub(crate) type Stores = (Arc<dyn EventStore>, Arc<dyn CheckpointStore>);

async fn open_store(backend: Backend, url: Option<&str>) -> Result<Stores, String> {
    match backend {
        Backend::Memory => {
            let store = InMemoryEventStore::new();
            Ok((Arc::new(store.clone()), Arc::new(store)))
        }
        Backend::Postgres => {
            let url = url.ok_or("postgres needs --database-url or DATABASE_URL")?;
            let store = open_postgres(url, &fresh_schema()?, true).await?;
            Ok((Arc::new(store.clone()), Arc::new(store)))
        }
    }
}

/// A schema name no run has used.
pub(crate) fn fresh_schema() -> Result<SchemaName, String> {
    SchemaName::try_new(format!("bench_{}", uuid::Uuid::new_v4().simple()))
        .map_err(|e| e.to_string())
}

/// The PostgreSQL store in `schema`, with a pool of 32 connections; `migrate` creates
/// its tables.
pub(crate) async fn open_postgres(
    url: &str,
    schema: &SchemaName,
    migrate: bool,
) -> Result<PostgresEventStore, String> {
    let config = PostgresConfig::from_url(url)
        .map_err(|e| e.to_string())?
        .with_schema(schema.clone())
        .with_max_connections(32);
    let store = PostgresEventStore::connect_with(config)
        .await
        .map_err(|e| format!("{e}: {:?}", std::error::Error::source(&e)))?;
    if migrate {
        store.migrate().await.map_err(|e| e.to_string())?;
    }
    Ok(store)
}

/// What the tasks of one run measured.
pub(crate) struct Measured {
    pub(crate) histogram: Histogram<u64>,
    pub(crate) ops: u64,
    pub(crate) retries: u64,
    pub(crate) failed: u64,
    pub(crate) events: u64,
}

impl Measured {
    fn new() -> Self {
        Self {
            histogram: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
            ops: 0,
            retries: 0,
            failed: 0,
            events: 0,
        }
    }

    /// Adds `other`'s counts and latencies to these.
    pub(crate) fn add(&mut self, other: &Measured) -> Result<(), String> {
        self.histogram
            .add(&other.histogram)
            .map_err(|e| e.to_string())?;
        self.ops += other.ops;
        self.retries += other.retries;
        self.failed += other.failed;
        self.events += other.events;
        Ok(())
    }

    /// The report of a run of `seconds` with these figures.
    pub(crate) fn report(
        &self,
        backend: Backend,
        workload: Workload,
        concurrency: usize,
        seconds: f64,
        invariant_ok: Option<bool>,
    ) -> Report {
        let ms = |micros: u64| micros as f64 / 1_000.0;
        let ops = self.ops;
        Report {
            backend,
            broker: None,
            workload,
            concurrency,
            duration_s: seconds,
            ops_per_s: Some(ops as f64 / seconds),
            events_per_s: Some(self.events as f64 / seconds),
            p50_ms: (ops > 0).then(|| ms(self.histogram.value_at_quantile(0.50))),
            p99_ms: (ops > 0).then(|| ms(self.histogram.value_at_quantile(0.99))),
            max_ms: (ops > 0).then(|| ms(self.histogram.max())),
            retries_per_op: (ops > 0).then(|| self.retries as f64 / ops as f64),
            failed: Some(self.failed),
            invariant_ok,
            rate: None,
            lag: None,
            snapshots: None,
            stream_events: None,
            next_p50_ms: None,
        }
    }
}

/// The executor of a command workload.
pub(crate) fn executor(run: &Run, store: Arc<dyn EventStore>) -> CommandExecutor {
    CommandExecutor::from_shared(store)
        .with_retry_policy(RetryPolicy::new().with_max_attempts(50))
        .with_stream_queue(!run.race)
        .with_log_feed(run.log_feed)
}

/// Opens the run's accounts, each with [`INITIAL`].
pub(crate) async fn open_accounts(
    executor: &CommandExecutor,
    accounts: usize,
) -> Result<(), String> {
    for n in 0..accounts {
        executor
            .execute(&Open {
                account: account(n),
                owner: format!("owner-{n}"),
                initial: INITIAL,
            })
            .await
            .map_err(|e| format!("opening accounts: {e}"))?;
    }
    Ok(())
}

/// Whether the balances of the run's accounts still add up to what they were opened
/// with.
pub(crate) async fn money_conserved(
    store: &dyn EventStore,
    accounts: usize,
) -> Result<bool, String> {
    let mut total = 0;
    for n in 0..accounts {
        total += balance(store, &account(n)).await?;
    }
    Ok(total == INITIAL * accounts as i64)
}

async fn run_workload(run: &Run, store: Arc<dyn EventStore>) -> Result<Report, String> {
    let executor = executor(run, store.clone());
    if run.workload != Workload::W5 {
        open_accounts(&executor, run.accounts).await?;
    }
    let measured = drive(run, run.workload, &executor, &store).await?;
    let invariant_ok = if run.workload == Workload::W3 {
        Some(money_conserved(&*store, run.accounts).await?)
    } else {
        None
    };
    Ok(measured.report(
        run.backend,
        run.workload,
        run.concurrency,
        run.duration.as_secs_f64(),
        invariant_ok,
    ))
}

/// Runs `workload` (W1, W2, W3 or W5) with `run.concurrency` tasks issuing commands back
/// to back, from now: the warm-up, then the measured seconds.
pub(crate) async fn drive(
    run: &Run,
    workload: Workload,
    executor: &CommandExecutor,
    store: &Arc<dyn EventStore>,
) -> Result<Measured, String> {
    let start = Instant::now();
    let measure_from = start + run.warmup;
    let end = measure_from + run.duration;
    let mut handles = Vec::new();
    for task in 0..run.concurrency {
        let executor = executor.clone();
        let store = store.clone();
        let accounts = run.accounts;
        handles.push(tokio::spawn(async move {
            let mut result = Measured::new();
            let mut n: u64 = 0;
            loop {
                let began = Instant::now();
                if began >= end {
                    break;
                }
                let (ok, attempts, events) = match workload {
                    Workload::W1 => {
                        let command = Deposit {
                            account: account(rand::rng().random_range(0..accounts)),
                            amount: 10,
                        };
                        match executor.execute(&command).await {
                            Ok(r) => (true, r.attempts, r.events_written.len()),
                            Err(_) => (false, 0, 0),
                        }
                    }
                    Workload::W2 | Workload::W3 | Workload::W2x2 => {
                        let (from, to) = {
                            let mut rng = rand::rng();
                            let from = rng.random_range(0..accounts);
                            (from, (from + rng.random_range(1..accounts)) % accounts)
                        };
                        let command = Transfer {
                            from: account(from),
                            to: account(to),
                            amount: 1,
                        };
                        match executor.execute(&command).await {
                            Ok(r) => (true, r.attempts, r.events_written.len()),
                            Err(_) => (false, 0, 0),
                        }
                    }
                    Workload::W5 => {
                        n += 1;
                        let stream = StreamId::try_new(format!("raw-{task}-{n}")).expect("valid");
                        let event = EventData::from_event(
                            &AccountEvent::Deposited { amount: 1 },
                            EventMetadata::default(),
                        )
                        .expect("serializes");
                        let request =
                            AppendRequest::single(stream, ExpectedVersion::NoStream, vec![event]);
                        match store.append(request).await {
                            Ok(o) => (true, 1, o.events.len()),
                            Err(_) => (false, 0, 0),
                        }
                    }
                    Workload::W4 | Workload::W6 | Workload::W7 | Workload::W8 => {
                        unreachable!("not a command workload")
                    }
                };
                let finished = Instant::now();
                if finished < measure_from || finished > end {
                    continue;
                }
                if ok {
                    result.ops += 1;
                    result.retries += u64::from(attempts.saturating_sub(1));
                    result.events += events as u64;
                    let micros = u64::try_from((finished - began).as_micros()).unwrap_or(u64::MAX);
                    result.histogram.saturating_record(micros.max(1));
                } else {
                    result.failed += 1;
                }
            }
            result
        }));
    }
    let mut measured = Measured::new();
    for handle in handles {
        let task = handle.await.map_err(|e| format!("task panicked: {e}"))?;
        measured.add(&task)?;
    }
    Ok(measured)
}

/// Loads `events` events (accounts × events/accounts) into `store`, many at a time:
/// W4's and W6's data.
pub(crate) async fn load(
    store: &dyn EventStore,
    accounts: usize,
    events: usize,
) -> Result<(), String> {
    let accounts = accounts.max(1);
    let per_account = events.div_ceil(accounts);
    let mut written = 0;
    let mut n = 0;
    while written < events {
        let mut request = AppendRequest::new();
        let mut in_request = 0;
        while in_request < 2_000 && written < events {
            let count = per_account.min(events - written).min(2_000 - in_request);
            let batch = (0..count)
                .map(|_| {
                    EventData::from_event(
                        &AccountEvent::Deposited { amount: 1 },
                        EventMetadata::default(),
                    )
                    .map_err(|e| e.to_string())
                })
                .collect::<Result<Vec<_>, _>>()?;
            request = request.with_stream(eventcore::StreamAppend::new(
                account(n),
                ExpectedVersion::Any,
                batch,
            ));
            written += count;
            in_request += count;
            n += 1;
        }
        store
            .append(request)
            .await
            .map_err(|e| format!("loading: {e}"))?;
    }
    Ok(())
}

/// W4: load `events` events (accounts × events/accounts), then time a projection that
/// counts events and sums amounts per account from the start of the log to its end.
async fn run_catch_up(run: &Run, stores: Stores, events: usize) -> Result<Report, String> {
    let (store, checkpoints) = stores;
    // Loading is not measured.
    load(&*store, run.accounts, events).await?;
    let projection = bank::Totals::default();
    let mut runner =
        ProjectionRunner::new(projection, store.clone(), checkpoints).with_batch_size(5_000);
    let started = Instant::now();
    let summary = runner.catch_up().await.map_err(|e| e.to_string())?;
    let seconds = started.elapsed().as_secs_f64();
    let counted = runner.projection().count();
    Ok(Report {
        backend: run.backend,
        broker: None,
        workload: run.workload,
        concurrency: 1,
        duration_s: seconds,
        ops_per_s: None,
        events_per_s: Some(summary.applied as f64 / seconds),
        p50_ms: None,
        p99_ms: None,
        max_ms: None,
        retries_per_op: None,
        failed: Some(0),
        invariant_ok: Some(counted == events as u64 && summary.applied == events as u64),
        rate: None,
        lag: None,
        snapshots: None,
        stream_events: None,
        next_p50_ms: None,
    })
}

/// One run of the matrix: backend, broker (W6 and W7), workload, concurrency.
type Planned = (Backend, Option<Broker>, Workload, usize);

fn matrix(postgres: bool, nats: bool) -> Vec<Planned> {
    let mut runs = Vec::new();
    let backends: &[Backend] = if postgres {
        &[Backend::Memory, Backend::Postgres]
    } else {
        &[Backend::Memory]
    };
    for &backend in backends {
        for workload in [Workload::W1, Workload::W2, Workload::W5] {
            runs.push((backend, None, workload, 1));
            runs.push((backend, None, workload, 8));
        }
        runs.push((backend, None, Workload::W3, 8));
        if backend == Backend::Postgres {
            runs.push((backend, None, Workload::W2x2, 4));
        }
        runs.push((backend, None, Workload::W4, 1));
        runs.push((backend, None, Workload::W8, 1));
        let broker = match backend {
            Backend::Memory => Some(Broker::Memory),
            Backend::Postgres => nats.then_some(Broker::Nats),
        };
        if let Some(broker) = broker {
            runs.push((backend, Some(broker), Workload::W6, 1));
            runs.push((backend, Some(broker), Workload::W7, 1));
            runs.push((backend, Some(broker), Workload::W7, 8));
        }
    }
    runs
}

fn print_table(reports: &[Report]) {
    let cell =
        |v: Option<f64>, digits: usize| v.map_or("-".to_owned(), |v| format!("{v:.digits$}"));
    println!();
    println!(
        "{:<9} {:<10} {:<4} {:>4} {:>12} {:>12} {:>9} {:>9} {:>9} {:>9} {:>7} {:>9} {:>8} {:>7}",
        "backend",
        "broker",
        "work",
        "C",
        "ops/s",
        "events/s",
        "p50 ms",
        "p99 ms",
        "max ms",
        "retry/op",
        "failed",
        "invariant",
        "rate",
        "lag"
    );
    for r in reports {
        println!(
            "{:<9} {:<10} {:<4} {:>4} {:>12} {:>12} {:>9} {:>9} {:>9} {:>9} {:>7} {:>9} {:>8} {:>7}",
            format!("{:?}", r.backend).to_lowercase(),
            r.broker
                .map_or("-".to_owned(), |b| format!("{b:?}").to_lowercase()),
            // W8 with snapshots: `w8/s`.
            format!(
                "{:?}{}",
                r.workload,
                if r.snapshots == Some(true) { "/s" } else { "" }
            )
            .to_lowercase(),
            r.concurrency,
            cell(r.ops_per_s, 0),
            cell(r.events_per_s, 0),
            cell(r.p50_ms, 3),
            cell(r.p99_ms, 3),
            cell(r.max_ms, 3),
            cell(r.retries_per_op, 3),
            r.failed.map_or("-".to_owned(), |f| f.to_string()),
            r.invariant_ok.map_or("-".to_owned(), |ok| ok.to_string()),
            cell(r.rate, 0),
            r.lag.map_or("-".to_owned(), |l| l.to_string()),
        );
    }
}

/// The settings every run shares.
struct Settings {
    database_url: Option<String>,
    nats_url: Option<String>,
    events: usize,
    rate: f64,
    max_rate: bool,
}

/// Runs one planned run (W6 on NATS: the floor first; W7 with `--max-rate`: the
/// search after it), giving its reports.
async fn execute(
    run: &Run,
    broker: Option<Broker>,
    settings: &Settings,
) -> Result<Vec<Report>, String> {
    let url = settings.database_url.as_deref();
    let nats = settings.nats_url.as_deref();
    let broker = broker.unwrap_or(match run.backend {
        Backend::Memory => Broker::Memory,
        Backend::Postgres => Broker::Nats,
    });
    match run.workload {
        Workload::W4 => Ok(vec![
            run_catch_up(run, open_store(run.backend, url).await?, settings.events).await?,
        ]),
        Workload::W6 => {
            let mut reports = Vec::new();
            if broker == Broker::Nats {
                for (window, chained) in [(256, false), (1_024, false), (1_024, true)] {
                    reports.push(
                        distributed::nats_floor(run, nats, settings.events, window, chained)
                            .await?,
                    );
                }
            }
            let stores = open_store(run.backend, url).await?;
            reports.push(
                distributed::run_publication(run, stores, broker, nats, settings.events).await?,
            );
            Ok(reports)
        }
        Workload::W7 => {
            let end_to_end = |rate: f64| async move {
                let a = open_store(run.backend, url).await?;
                let b = open_store(run.backend, url).await?;
                distributed::run_end_to_end(run, a, b, broker, nats, rate).await
            };
            let mut reports = vec![end_to_end(settings.rate).await?];
            if settings.max_rate {
                // Doubling until B falls behind, then two halvings of the interval.
                let mut rate = settings.rate;
                let (mut kept, mut lost) = if distributed::kept_up(&reports[0]) {
                    (Some(rate), None)
                } else {
                    (None, Some(rate))
                };
                let mut halvings = 0;
                loop {
                    rate = match lost {
                        None if rate < 1_000_000.0 => rate * 2.0,
                        Some(high) if halvings < 2 => {
                            halvings += 1;
                            (kept.unwrap_or(0.0) + high) / 2.0
                        }
                        _ => break,
                    };
                    let report = end_to_end(rate).await?;
                    if distributed::kept_up(&report) {
                        kept = Some(rate);
                    } else {
                        lost = Some(rate);
                    }
                    print_line(&report);
                    reports.push(report);
                }
                eprintln!(
                    "eventcore-bench: w7 on {:?}/{broker:?}: B keeps up with {} events/s; not with {}",
                    run.backend,
                    kept.map_or("none measured".to_owned(), |r| format!("{r:.0}")),
                    lost.map_or("any measured".to_owned(), |r| format!("{r:.0}")),
                );
            }
            Ok(reports)
        }
        Workload::W2x2 => Ok(vec![processes::run_two_processes(run, url).await?]),
        Workload::W8 => {
            cold::run_cold_start(run, open_store(run.backend, url).await?.0, settings.events).await
        }
        _ => Ok(vec![
            run_workload(run, open_store(run.backend, url).await?.0).await?,
        ]),
    }
}

fn print_line(report: &Report) {
    // A report is numbers, booleans and enum names: it always serializes (serde_json
    // writes non-finite floats as null).
    println!("{}", serde_json::to_string(report).expect("serializable"));
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let prometheus = if args.metrics {
        match metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder() {
            Ok(handle) => Some(handle),
            Err(error) => {
                eprintln!("installing the Prometheus recorder: {error}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let settings = Settings {
        database_url: args
            .database_url
            .clone()
            .or_else(|| std::env::var("DATABASE_URL").ok()),
        nats_url: args
            .nats_url
            .clone()
            .or_else(|| std::env::var("NATS_URL").ok()),
        events: args.events,
        rate: args.rate.max(1.0),
        max_rate: args.max_rate,
    };
    let runs = if args.all {
        matrix(settings.database_url.is_some(), settings.nats_url.is_some())
    } else {
        match (args.backend, args.workload) {
            (Some(backend), Some(workload)) => {
                vec![(backend, args.broker, workload, args.concurrency)]
            }
            _ => unreachable!("clap requires --backend and --workload without --all"),
        }
    };

    let plan = |backend, workload, concurrency: usize| Run {
        backend,
        workload,
        concurrency: concurrency.max(1),
        accounts: args
            .accounts
            .unwrap_or(if workload == Workload::W3 { 10 } else { 1_000 })
            .max(2),
        duration: Duration::from_secs_f64(args.duration.max(0.1)),
        warmup: Duration::from_secs_f64(args.warmup.max(0.0)),
        race: args.race,
        log_feed: args.log_feed,
    };
    if let Some(schema) = &args.child_schema {
        let run = plan(Backend::Postgres, Workload::W2x2, args.concurrency);
        return match processes::run_child(&run, settings.database_url.as_deref(), schema).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("eventcore-bench (w2x2 child): {error}");
                ExitCode::from(2)
            }
        };
    }

    let mut reports = Vec::new();
    for (backend, broker, workload, concurrency) in runs {
        let run = plan(backend, workload, concurrency);
        match execute(&run, broker, &settings).await {
            Ok(done) => {
                for report in done {
                    if !matches!(report.rate, Some(rate) if rate != settings.rate) {
                        // The search's lines were printed as they came.
                        print_line(&report);
                    }
                    reports.push(report);
                }
            }
            Err(error) => {
                eprintln!("eventcore-bench: {error}");
                return ExitCode::from(2);
            }
        }
    }
    print_table(&reports);
    if let Some(prometheus) = prometheus {
        // What was recorded, to show the recorder saw the runs.
        let rendered = prometheus.render();
        let mut families: Vec<&str> = rendered
            .lines()
            .filter_map(|line| line.strip_prefix("# TYPE "))
            .collect();
        families.sort_unstable();
        eprintln!("metrics recorded: {}", families.join(", "));
    }
    if reports.iter().any(|r| r.invariant_ok == Some(false)) {
        eprintln!("eventcore-bench: an invariant was broken");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// With feature `mimalloc`, the benchmark's allocator (the floors in the same binary use
/// it too); the system's otherwise.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
