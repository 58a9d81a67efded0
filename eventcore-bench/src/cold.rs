//! W8, cold start: the first command of a fresh executor (nothing kept yet, as after a
//! restart) on one account stream of 100,000 events, with and without snapshots, and
//! the command after it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use eventcore::{
    Command, CommandExecutor, CommandLogic, CommandResult, EventData, EventMetadata, EventStore,
    ExpectedVersion, ReadStreams, Snapshots, StateCache, StoredEvent, StreamAppend, StreamId,
    StreamResolver, StreamWrite, require,
};

use crate::bank::{AccountEvent, account};
use crate::{Report, Run};

/// W1's deposit, with its state snapshotted or not.
#[derive(Command)]
pub(crate) struct ColdDeposit {
    #[stream]
    account: StreamId,
    amount: i64,
    snapshots: bool,
}

impl CommandLogic for ColdDeposit {
    type State = i64;
    type Event = AccountEvent;

    fn apply(&self, balance: &mut i64, event: &StoredEvent<AccountEvent>) {
        *balance += event.payload.delta();
    }

    fn state_cache(&self) -> StateCache<i64> {
        let cache = StateCache::for_command::<Self>();
        if self.snapshots {
            cache.with_snapshots(Snapshots::every(1_000))
        } else {
            cache
        }
    }

    fn handle(
        &self,
        read_streams: ReadStreams<Self::StreamSet>,
        _balance: i64,
        _resolver: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, AccountEvent>>> {
        require!(self.amount > 0, "a deposit must be positive");
        Ok(vec![StreamWrite::new(
            &read_streams,
            self.account.clone(),
            AccountEvent::Deposited {
                amount: self.amount,
            },
        )?])
    }
}

/// How many fresh executors each variant measures.
const FRESH_EXECUTORS: usize = 7;

/// Loads `events` events into one account stream, then, for each variant (without
/// snapshots, with), measures the first and the next command of
/// [`FRESH_EXECUTORS`] fresh executors. With snapshots, an executor that ran before
/// (the previous process) has taken the snapshot; its time is not counted.
pub(crate) async fn run_cold_start(
    run: &Run,
    store: Arc<dyn EventStore>,
    events: usize,
) -> Result<Vec<Report>, String> {
    let stream = account(0);
    let opened = EventData::from_event(
        &AccountEvent::Opened {
            owner: "owner-0".to_owned(),
            initial: crate::INITIAL,
        },
        EventMetadata::default(),
    )
    .map_err(|e| e.to_string())?;
    let mut batch = vec![opened];
    let mut written = 0;
    while written < events {
        while batch.len() < 5_000 && written + batch.len() < events {
            batch.push(
                EventData::from_event(
                    &AccountEvent::Deposited { amount: 1 },
                    EventMetadata::default(),
                )
                .map_err(|e| e.to_string())?,
            );
        }
        written += batch.len();
        store
            .append(
                eventcore::AppendRequest::new().with_stream(StreamAppend::new(
                    stream.clone(),
                    ExpectedVersion::Any,
                    std::mem::take(&mut batch),
                )),
            )
            .await
            .map_err(|e| format!("loading: {e}"))?;
    }

    let mut reports = Vec::new();
    for snapshots in [false, true] {
        let deposit = ColdDeposit {
            account: stream.clone(),
            amount: 1,
            snapshots,
        };
        if snapshots {
            // The previous process: it reads the stream whole and snapshots it.
            let previous = CommandExecutor::from_shared(store.clone());
            previous
                .execute(&deposit)
                .await
                .map_err(|e| e.to_string())?;
            previous.flush_snapshots().await;
        }
        let (mut first, mut next) = (Vec::new(), Vec::new());
        for _ in 0..FRESH_EXECUTORS {
            let fresh = CommandExecutor::from_shared(store.clone());
            for times in [&mut first, &mut next] {
                let started = Instant::now();
                fresh.execute(&deposit).await.map_err(|e| e.to_string())?;
                times.push(started.elapsed());
            }
            fresh.flush_snapshots().await;
        }
        reports.push(report(run, snapshots, &mut first, &mut next, events));
    }
    // Every deposit of 1 is in the balance: the loaded ones, the previous process's,
    // and two per fresh executor and variant.
    let deposits = written.saturating_sub(1) + 1 + 4 * FRESH_EXECUTORS;
    let expected = crate::INITIAL + i64::try_from(deposits).map_err(|e| e.to_string())?;
    let held = crate::bank::balance(&*store, &stream).await? == expected;
    for report in &mut reports {
        report.invariant_ok = Some(held);
    }
    Ok(reports)
}

fn report(
    run: &Run,
    snapshots: bool,
    first: &mut [Duration],
    next: &mut [Duration],
    events: usize,
) -> Report {
    let ms = |d: Duration| d.as_secs_f64() * 1_000.0;
    first.sort_unstable();
    next.sort_unstable();
    Report {
        backend: run.backend,
        broker: None,
        workload: run.workload,
        concurrency: 1,
        duration_s: first
            .iter()
            .chain(next.iter())
            .map(|d| d.as_secs_f64())
            .sum(),
        ops_per_s: None,
        events_per_s: None,
        p50_ms: Some(ms(first[first.len() / 2])),
        p99_ms: None,
        max_ms: first.last().copied().map(ms),
        retries_per_op: None,
        failed: Some(0),
        invariant_ok: None,
        rate: None,
        lag: None,
        snapshots: Some(snapshots),
        stream_events: Some(events as u64),
        next_p50_ms: Some(ms(next[next.len() / 2])),
    }
}
