//! W2x2: W2 over the same accounts from two OS processes, as two instances of a
//! service, each with its own connection pool and executor.
//!
//! The parent opens a fresh schema and the accounts, then starts this program twice
//! with `--child-schema`. Each child connects, says `ready` on its stdout and waits for
//! `go` on its stdin, so both measure the same seconds; then it runs W2 at the run's
//! concurrency and prints what it measured as one JSON line. The parent adds the two up
//! and reads every balance back: the money must be conserved.

use std::process::Stdio;
use std::sync::Arc;

use eventcore::EventStore;
use eventcore_postgres::SchemaName;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::{
    Backend, Measured, Report, Run, Workload, drive, executor, fresh_schema, money_conserved,
    open_accounts, open_postgres,
};

/// The processes of a W2x2 run.
const PROCESSES: usize = 2;

/// What a child measured, as it travels to the parent.
#[derive(Debug, Serialize, Deserialize)]
struct ChildFigures {
    ops: u64,
    retries: u64,
    failed: u64,
    events: u64,
    /// The latency histogram in microseconds: (value, count) for every recorded value.
    latencies: Vec<(u64, u64)>,
}

impl ChildFigures {
    fn of(measured: &Measured) -> Self {
        Self {
            ops: measured.ops,
            retries: measured.retries,
            failed: measured.failed,
            events: measured.events,
            latencies: measured
                .histogram
                .iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
        }
    }

    fn measured(&self) -> Result<Measured, String> {
        let mut histogram =
            Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?;
        for &(value, count) in &self.latencies {
            histogram
                .record_n(value, count)
                .map_err(|e| format!("a child's latency {value} µs: {e}"))?;
        }
        Ok(Measured {
            histogram,
            ops: self.ops,
            retries: self.retries,
            failed: self.failed,
            events: self.events,
        })
    }
}

/// One child process and its pipes.
struct Instance {
    child: Child,
    stdin: ChildStdin,
    stdout: tokio::io::Lines<BufReader<ChildStdout>>,
}

impl Instance {
    async fn line(&mut self, what: &str) -> Result<String, String> {
        self.stdout
            .next_line()
            .await
            .map_err(|e| format!("reading a child's {what}: {e}"))?
            .ok_or_else(|| format!("a child ended before its {what}"))
    }
}

/// The parent's side of W2x2.
pub(crate) async fn run_two_processes(run: &Run, url: Option<&str>) -> Result<Report, String> {
    let url = url.ok_or(
        "w2x2 needs PostgreSQL (--database-url or DATABASE_URL): two processes cannot share an \
         in-memory store",
    )?;
    if run.backend != Backend::Postgres {
        return Err("w2x2 runs on --backend postgres only".to_owned());
    }
    let schema = fresh_schema()?;
    let store: Arc<dyn EventStore> = Arc::new(open_postgres(url, &schema, true).await?);
    open_accounts(&executor(run, store.clone()), run.accounts).await?;

    let program = std::env::current_exe().map_err(|e| format!("finding this program: {e}"))?;
    let mut instances = Vec::new();
    for _ in 0..PROCESSES {
        let mut command = Command::new(&program);
        command
            .args(["--backend", "postgres", "--workload", "w2x2"])
            .args(["--child-schema", schema.as_str(), "--database-url", url])
            .args(["--concurrency", &run.concurrency.to_string()])
            .args(["--accounts", &run.accounts.to_string()])
            .args(["--duration", &run.duration.as_secs_f64().to_string()])
            .args(["--warmup", &run.warmup.as_secs_f64().to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        if run.race {
            command.arg("--race");
        }
        if run.log_feed {
            command.arg("--log-feed");
        }
        let mut child = command
            .spawn()
            .map_err(|e| format!("starting a child process: {e}"))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err("a child process has no pipes".to_owned());
        };
        instances.push(Instance {
            child,
            stdin,
            stdout: BufReader::new(stdout).lines(),
        });
    }
    // Both connected before either starts.
    for instance in &mut instances {
        let line = instance.line("ready").await?;
        if line != "ready" {
            return Err(format!("a child said {line:?} instead of ready"));
        }
    }
    for instance in &mut instances {
        instance
            .stdin
            .write_all(b"go\n")
            .await
            .map_err(|e| format!("starting a child: {e}"))?;
        instance
            .stdin
            .flush()
            .await
            .map_err(|e| format!("starting a child: {e}"))?;
    }
    let mut total: Option<Measured> = None;
    for instance in &mut instances {
        let line = instance.line("figures").await?;
        let figures: ChildFigures =
            serde_json::from_str(&line).map_err(|e| format!("a child's figures {line:?}: {e}"))?;
        let measured = figures.measured()?;
        match &mut total {
            Some(total) => total.add(&measured)?,
            None => total = Some(measured),
        }
        let status = instance
            .child
            .wait()
            .await
            .map_err(|e| format!("waiting for a child: {e}"))?;
        if !status.success() {
            return Err(format!("a child process failed: {status}"));
        }
    }
    let total = total.ok_or("no child process ran")?;
    let conserved = money_conserved(&*store, run.accounts).await?;
    Ok(total.report(
        run.backend,
        Workload::W2x2,
        run.concurrency,
        run.duration.as_secs_f64(),
        Some(conserved),
    ))
}

/// A child's side of W2x2: W2 on the accounts of `schema`, from `go` on stdin.
pub(crate) async fn run_child(run: &Run, url: Option<&str>, schema: &str) -> Result<(), String> {
    let url = url.ok_or("a w2x2 child needs --database-url")?;
    let schema = SchemaName::try_new(schema).map_err(|e| e.to_string())?;
    let store: Arc<dyn EventStore> = Arc::new(open_postgres(url, &schema, false).await?);
    let executor = executor(run, store.clone());

    let mut stdout = tokio::io::stdout();
    stdout
        .write_all(b"ready\n")
        .await
        .and(stdout.flush().await)
        .map_err(|e| format!("saying ready: {e}"))?;
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    match stdin.next_line().await {
        Ok(Some(line)) if line == "go" => {}
        Ok(other) => return Err(format!("expected go on stdin, got {other:?}")),
        Err(e) => return Err(format!("reading stdin: {e}")),
    }

    let measured = drive(run, Workload::W2x2, &executor, &store).await?;
    let line = serde_json::to_string(&ChildFigures::of(&measured)).map_err(|e| e.to_string())?;
    stdout
        .write_all(format!("{line}\n").as_bytes())
        .await
        .and(stdout.flush().await)
        .map_err(|e| format!("printing the figures: {e}"))?;
    Ok(())
}
