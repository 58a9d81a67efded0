//! A bank: accounts are streams, transfers are two-stream commands. Used by the
//! invariant tests on every backend.

use std::collections::{HashMap, HashSet};

use eventcore::{
    Command, CommandExecutor, CommandLogic, CommandResult, Error, Event, EventStore, LogQuery,
    ReadStreams, RecordedEvent, StoredEvent, StreamId, StreamResolver, StreamWrite, require,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Events of an account.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
pub enum BankEvent {
    /// The account was opened with an initial balance.
    Opened {
        /// Initial balance.
        initial: i64,
    },
    /// Money arrived.
    Deposited {
        /// Amount.
        amount: i64,
    },
    /// Money left.
    Withdrawn {
        /// Amount.
        amount: i64,
    },
}

impl BankEvent {
    /// The event's effect on the balance.
    pub fn delta(&self) -> i64 {
        match self {
            BankEvent::Opened { initial } => *initial,
            BankEvent::Deposited { amount } => *amount,
            BankEvent::Withdrawn { amount } => -amount,
        }
    }
}

/// The stream of account `n`.
pub fn account(n: usize) -> StreamId {
    StreamId::try_new(format!("account-{n}")).expect("valid stream id")
}

/// Opens an account.
#[derive(Debug, Command)]
pub struct Open {
    /// The account.
    #[stream]
    pub account: StreamId,
    /// Initial balance.
    pub initial: i64,
}

impl CommandLogic for Open {
    type State = bool;
    type Event = BankEvent;

    fn apply(&self, open: &mut bool, _event: &StoredEvent<BankEvent>) {
        *open = true;
    }

    fn handle(
        &self,
        read_streams: ReadStreams<Self::StreamSet>,
        open: bool,
        _resolver: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, BankEvent>>> {
        require!(!open, "account {} is already open", self.account);
        Ok(vec![StreamWrite::new(
            &read_streams,
            self.account.clone(),
            BankEvent::Opened {
                initial: self.initial,
            },
        )?])
    }
}

/// Moves money between two accounts.
#[derive(Debug, Command)]
pub struct Transfer {
    /// Source.
    #[stream]
    pub from: StreamId,
    /// Destination.
    #[stream]
    pub to: StreamId,
    /// Amount.
    pub amount: i64,
}

/// Each account's balance, by stream, for the accounts opened among the streams read.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TransferState {
    balances: std::collections::HashMap<StreamId, i64>,
}

impl CommandLogic for Transfer {
    type State = TransferState;
    type Event = BankEvent;

    // Keyed by the event's stream, reading nothing of `self`: the state may be cached,
    // and the invariant tests run with it cached, under concurrency.
    fn apply(&self, state: &mut TransferState, event: &StoredEvent<BankEvent>) {
        *state.balances.entry(event.stream_id.clone()).or_default() += event.payload.delta();
    }

    // Snapshotted often, so that executors with a small cache (which forget states
    // all the time) start from snapshots that other writers have made stale.
    fn state_cache(&self) -> eventcore::StateCache<TransferState> {
        eventcore::StateCache::for_command::<Self>().with_snapshots(eventcore::Snapshots::every(5))
    }

    fn handle(
        &self,
        read_streams: ReadStreams<Self::StreamSet>,
        state: TransferState,
        _resolver: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, BankEvent>>> {
        require!(self.from != self.to, "same account");
        require!(self.amount > 0, "amount must be positive");
        let (Some(from), Some(_)) = (state.balances.get(&self.from), state.balances.get(&self.to))
        else {
            return Err(eventcore::Error::BusinessRuleViolation(
                "both accounts must be open".to_owned(),
            ));
        };
        require!(*from >= self.amount, "insufficient funds");
        Ok(vec![
            StreamWrite::new(
                &read_streams,
                self.from.clone(),
                BankEvent::Withdrawn {
                    amount: self.amount,
                },
            )?,
            StreamWrite::new(
                &read_streams,
                self.to.clone(),
                BankEvent::Deposited {
                    amount: self.amount,
                },
            )?,
        ])
    }
}

/// The whole global log, read in batches.
pub async fn read_log(store: &dyn EventStore) -> Vec<RecordedEvent> {
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let batch = store
            .read_all(&LogQuery::new().with_after(after).with_limit(2_000))
            .await
            .expect("read_all");
        let Some(last) = batch.last() else {
            return all;
        };
        after = Some(last.global_position);
        all.extend(batch);
    }
}

/// What the invariant check found.
#[derive(Debug)]
pub struct Audit {
    /// The sum of all balances.
    pub total: i64,
    /// The number of events in the log.
    pub events: usize,
}

/// Checks, for `accounts` accounts: every stream's versions are contiguous from 1; the
/// log holds every event exactly once in strictly increasing positions; the balances
/// folded from the streams equal those folded from the log. Returns the total balance.
///
/// # Panics
///
/// When an invariant is broken.
pub async fn audit(store: &dyn EventStore, accounts: usize) -> Audit {
    let mut total = 0;
    let mut from_streams = HashMap::new();
    let mut stream_events = 0;
    for n in 0..accounts {
        let id = account(n);
        let snapshot = store
            .read_streams(std::slice::from_ref(&id))
            .await
            .expect("read");
        for (i, event) in snapshot.events.iter().enumerate() {
            assert_eq!(
                event.stream_version.value(),
                i as u64 + 1,
                "versions of {id} are not contiguous"
            );
        }
        assert_eq!(
            snapshot.version_of(&id).value(),
            snapshot.events.len() as u64
        );
        let balance: i64 = snapshot
            .events
            .iter()
            .map(|e| e.decode::<BankEvent>().expect("decode").payload.delta())
            .sum();
        assert!(balance >= 0, "{id} is overdrawn: {balance}");
        total += balance;
        stream_events += snapshot.events.len();
        from_streams.insert(id, balance);
    }

    let log = read_log(store).await;
    let ids: HashSet<_> = log.iter().map(|e| e.event_id).collect();
    assert_eq!(ids.len(), log.len(), "an event appears twice in the log");
    assert!(
        log.windows(2)
            .all(|w| w[0].global_position < w[1].global_position),
        "log positions are not strictly increasing"
    );
    assert_eq!(
        log.len(),
        stream_events,
        "log and streams disagree on count"
    );
    let mut from_log: HashMap<StreamId, i64> = HashMap::new();
    for event in &log {
        *from_log.entry(event.stream_id.clone()).or_default() +=
            event.decode::<BankEvent>().expect("decode").payload.delta();
    }
    assert_eq!(
        from_log, from_streams,
        "log and streams disagree on balances"
    );
    Audit {
        total,
        events: log.len(),
    }
}

/// What a run of random transfers did.
#[derive(Debug, Default, Clone, Copy)]
pub struct TransferRun {
    /// Transfers written.
    pub done: usize,
    /// Transfers refused for insufficient funds.
    pub refused: usize,
    /// Retries the executor made (attempts beyond the first).
    pub retries: u64,
}

/// Opens `accounts` accounts with `initial` each through `executor`.
///
/// # Panics
///
/// When an account cannot be opened.
pub async fn open_accounts(executor: &CommandExecutor, accounts: usize, initial: i64) {
    for n in 0..accounts {
        executor
            .execute(&Open {
                account: account(n),
                initial,
            })
            .await
            .expect("open");
    }
}

/// Runs `tasks_per_executor` tasks on each executor, each doing `transfers` random
/// transfers among `accounts` accounts (seeded: the same seeds give the same requests).
///
/// # Panics
///
/// On any error other than a refusal for insufficient funds.
pub async fn random_transfers(
    executors: &[CommandExecutor],
    tasks_per_executor: usize,
    transfers: usize,
    accounts: usize,
) -> TransferRun {
    let mut handles = Vec::new();
    for (e, executor) in executors.iter().enumerate() {
        for t in 0..tasks_per_executor {
            let executor = executor.clone();
            let seed = (e * 1_000 + t) as u64;
            handles.push(tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(seed);
                let mut run = TransferRun::default();
                for _ in 0..transfers {
                    let from = rng.random_range(0..accounts);
                    let to = (from + rng.random_range(1..accounts)) % accounts;
                    let command = Transfer {
                        from: account(from),
                        to: account(to),
                        amount: rng.random_range(1..=300),
                    };
                    match executor.execute(&command).await {
                        Ok(result) => {
                            run.done += 1;
                            run.retries += u64::from(result.attempts - 1);
                        }
                        Err(Error::BusinessRuleViolation(reason)) => {
                            assert_eq!(reason, "insufficient funds");
                            run.refused += 1;
                        }
                        Err(other) => panic!("unexpected error: {other}"),
                    }
                }
                run
            }));
        }
    }
    let mut total = TransferRun::default();
    for handle in handles {
        let run = handle.await.expect("transfer task");
        total.done += run.done;
        total.refused += run.refused;
        total.retries += run.retries;
    }
    total
}
