//! The workloads' domain: accounts as streams `account-{n}`, events `Opened`,
//! `Deposited`, `Withdrawn`, commands `Open`, `Deposit` (one stream) and `Transfer` (two).

use std::collections::HashMap;

use eventcore::{
    Command, CommandLogic, CommandResult, Event, EventStore, Projection, ProjectionFilter,
    ReadStreams, StateCache, StoredEvent, StreamId, StreamResolver, StreamWrite, require,
};
use serde::{Deserialize, Serialize};

/// What happens to an account.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
pub(crate) enum AccountEvent {
    Opened { owner: String, initial: i64 },
    Deposited { amount: i64 },
    Withdrawn { amount: i64 },
}

impl AccountEvent {
    /// What the event adds to the balance.
    pub(crate) fn delta(&self) -> i64 {
        match self {
            AccountEvent::Opened { initial, .. } => *initial,
            AccountEvent::Deposited { amount } => *amount,
            AccountEvent::Withdrawn { amount } => -amount,
        }
    }
}

/// The stream of account `n`.
pub(crate) fn account(n: usize) -> StreamId {
    StreamId::try_new(format!("account-{n}")).expect("valid stream id")
}

/// The balance of one account, read back from the store.
pub(crate) async fn balance(store: &dyn EventStore, account: &StreamId) -> Result<i64, String> {
    let snapshot = store
        .read_streams(std::slice::from_ref(account))
        .await
        .map_err(|e| e.to_string())?;
    snapshot.events.iter().try_fold(0, |sum, event| {
        event
            .decode::<AccountEvent>()
            .map(|e| sum + e.payload.delta())
            .map_err(|e| e.to_string())
    })
}

#[derive(Command)]
pub(crate) struct Open {
    #[stream]
    pub(crate) account: StreamId,
    pub(crate) owner: String,
    pub(crate) initial: i64,
}

impl CommandLogic for Open {
    type State = bool;
    type Event = AccountEvent;

    fn apply(&self, open: &mut bool, _event: &StoredEvent<AccountEvent>) {
        *open = true;
    }

    fn handle(
        &self,
        read_streams: ReadStreams<Self::StreamSet>,
        open: bool,
        _resolver: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, AccountEvent>>> {
        require!(!open, "account {} is already open", self.account);
        Ok(vec![StreamWrite::new(
            &read_streams,
            self.account.clone(),
            AccountEvent::Opened {
                owner: self.owner.clone(),
                initial: self.initial,
            },
        )?])
    }
}

/// W1: one stream read, folded, one event appended.
#[derive(Command)]
pub(crate) struct Deposit {
    #[stream]
    pub(crate) account: StreamId,
    pub(crate) amount: i64,
}

impl CommandLogic for Deposit {
    type State = i64;
    type Event = AccountEvent;

    fn apply(&self, balance: &mut i64, event: &StoredEvent<AccountEvent>) {
        *balance += event.payload.delta();
    }

    // The state depends on the events and the streams only: it may be cached.
    fn state_cache(&self) -> StateCache<i64> {
        StateCache::for_command::<Self>()
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

/// W2/W3: two streams read, the balance checked, one event appended to each.
#[derive(Command)]
pub(crate) struct Transfer {
    #[stream]
    pub(crate) from: StreamId,
    #[stream]
    pub(crate) to: StreamId,
    pub(crate) amount: i64,
}

impl CommandLogic for Transfer {
    type State = i64;
    type Event = AccountEvent;

    // Only `from`'s events are folded (see `state_cache`), and nothing of `self` is
    // read, as the cache requires.
    fn apply(&self, from_balance: &mut i64, event: &StoredEvent<AccountEvent>) {
        *from_balance += event.payload.delta();
    }

    // The state is the balance of `from`, folded from `from` alone: one cached state
    // serves every transfer from that account, whatever its destination.
    fn state_cache(&self) -> StateCache<i64> {
        StateCache::for_command::<Self>().folded_from([self.from.clone()])
    }

    fn handle(
        &self,
        read_streams: ReadStreams<Self::StreamSet>,
        from_balance: i64,
        _resolver: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, AccountEvent>>> {
        require!(from_balance >= self.amount, "insufficient funds");
        Ok(vec![
            StreamWrite::new(
                &read_streams,
                self.from.clone(),
                AccountEvent::Withdrawn {
                    amount: self.amount,
                },
            )?,
            StreamWrite::new(
                &read_streams,
                self.to.clone(),
                AccountEvent::Deposited {
                    amount: self.amount,
                },
            )?,
        ])
    }
}

/// W4's projection: events and amounts per account.
#[derive(Default)]
pub(crate) struct Totals {
    per_account: HashMap<StreamId, (u64, i64)>,
}

impl Totals {
    pub(crate) fn count(&self) -> u64 {
        self.per_account.values().map(|(n, _)| n).sum()
    }
}

impl Projection for Totals {
    type Event = AccountEvent;
    type Error = std::convert::Infallible;

    fn name(&self) -> &str {
        "w4-totals"
    }

    fn filter(&self) -> ProjectionFilter {
        ProjectionFilter::all().with_stream_prefix("account-")
    }

    async fn apply(&mut self, event: &StoredEvent<AccountEvent>) -> Result<(), Self::Error> {
        let entry = self.per_account.entry(event.stream_id.clone()).or_default();
        entry.0 += 1;
        entry.1 += event.payload.delta();
        Ok(())
    }
}
