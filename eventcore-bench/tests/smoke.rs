//! The benchmark must not rot: every workload runs for a second on the in-memory store
//! and broker, and a broken invariant (or any failure) fails the test. The figures are
//! not checked (a test is no place for timings; `docs/benchmarks.md` says how to
//! measure).
//!
//! Built by `cargo test` with the rest of the workspace, so it shares that build instead
//! of compiling the dependencies again for the benchmark alone.

use std::process::Command;

/// Runs the benchmark with `command`'s arguments; fails the test unless it succeeds.
/// Returns its report lines (one JSON object per run) and its whole stdout.
fn reports_of(command: &mut Command) -> (Vec<serde_json::Value>, String) {
    let output = command.output().expect("the benchmark starts");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the benchmark failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    let reports = stdout
        .lines()
        .filter(|line| line.starts_with('{'))
        .map(|line| serde_json::from_str(line).expect("a report line is JSON"))
        .collect();
    (reports, stdout)
}

#[test]
fn every_workload_runs_on_the_in_memory_store_with_its_invariant_holding() {
    // One JSON line per run, each with its invariant held.
    let (reports, stdout) = reports_of(
        Command::new(env!("CARGO_BIN_EXE_eventcore-bench"))
            .args(["--all", "--duration", "1", "--warmup", "0"])
            .env_remove("DATABASE_URL")
            .env_remove("NATS_URL"),
    );
    let workloads: std::collections::BTreeSet<String> = reports
        .iter()
        .filter_map(|report| report["workload"].as_str().map(str::to_owned))
        .collect();
    for workload in ["w1", "w2", "w3", "w4", "w5", "w6", "w7", "w8"] {
        assert!(
            workloads.contains(workload),
            "no report for {workload}:\n{stdout}"
        );
    }
    for report in &reports {
        assert_ne!(
            report["invariant_ok"],
            serde_json::Value::Bool(false),
            "an invariant broke: {report}"
        );
        assert_eq!(report["backend"], "memory", "{report}");
    }
}

/// W2x2 needs PostgreSQL (two processes cannot share an in-memory store): two child
/// processes transfer between the same accounts, and the money must be conserved.
#[test]
#[cfg_attr(
    not(postgres_tests),
    ignore = "needs PostgreSQL: set DATABASE_URL (scripts/test provisions one)"
)]
fn w2x2_runs_two_processes_on_postgres_with_the_money_conserved() {
    let (reports, stdout) = reports_of(
        Command::new(env!("CARGO_BIN_EXE_eventcore-bench"))
            .args(["--backend", "postgres", "--workload", "w2x2"])
            .args(["--concurrency", "2", "--accounts", "20"])
            .args(["--duration", "1", "--warmup", "0"]),
    );
    assert_eq!(reports.len(), 1, "{stdout}");
    let report = &reports[0];
    assert_eq!(report["workload"], "w2x2", "{report}");
    assert_eq!(
        report["invariant_ok"],
        serde_json::Value::Bool(true),
        "{report}"
    );
    assert!(
        report["ops_per_s"].as_f64().is_some_and(|ops| ops > 0.0),
        "no transfer was measured: {report}"
    );
}
