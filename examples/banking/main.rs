//! Banking with EventCore: accounts as streams, transfers as one atomic command over two
//! streams, a refused overdraft, and a conflict that the executor retries.
//!
//! Run it with:
//!
//! ```text
//! cargo run --example banking
//! ```
//!
//! It uses the in-memory store, so it needs no services. With `DATABASE_URL` set it runs
//! on PostgreSQL instead, in a new schema named `banking_<random>` so that every run starts
//! empty (the schema name is printed; drop it when done).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use eventcore::{
    AppendOutcome, AppendRequest, Command, CommandExecutor, CommandLogic, CommandResult,
    CorrelationId, Event, EventData, EventId, EventMetadata, EventStore, ExecutionOptions,
    ExpectedVersion, GlobalPosition, IdempotencyKey, LogQuery, ReadStreams, RecordedEvent,
    StoredEvent, StreamId, StreamResolver, StreamWrite, StreamsSnapshot, require,
};
use eventcore_memory::InMemoryEventStore;
use eventcore_postgres::{PostgresConfig, PostgresEventStore, SchemaName};
use serde::{Deserialize, Serialize};

/// Everything that happens to an account.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
enum AccountEvent {
    #[event(name = "AccountOpened")]
    Opened { owner: String, initial: u64 },
    #[event(name = "MoneyDeposited")]
    Deposited { amount: u64 },
    #[event(name = "MoneyWithdrawn")]
    Withdrawn { amount: u64 },
}

/// One account's state, folded from its events.
#[derive(Debug, Default, Clone, Copy)]
struct Account {
    open: bool,
    balance: u64,
}

impl Account {
    fn apply(&mut self, event: &AccountEvent) {
        match event {
            AccountEvent::Opened { initial, .. } => {
                self.open = true;
                self.balance = *initial;
            }
            AccountEvent::Deposited { amount } => self.balance += amount,
            AccountEvent::Withdrawn { amount } => self.balance -= amount,
        }
    }
}

/// Opens an account with an initial deposit.
#[derive(Command)]
struct OpenAccount {
    #[stream]
    account: StreamId,
    owner: String,
    initial: u64,
}

impl CommandLogic for OpenAccount {
    type State = Account;
    type Event = AccountEvent;

    fn apply(&self, state: &mut Account, event: &StoredEvent<AccountEvent>) {
        state.apply(&event.payload);
    }

    fn handle(
        &self,
        read_streams: ReadStreams<Self::StreamSet>,
        state: Account,
        _resolver: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, AccountEvent>>> {
        require!(!state.open, "account {} is already open", self.account);
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

/// Moves money between two accounts: both streams are read, and both writes are
/// appended atomically with the versions read, so no balance is ever decided on a stale
/// read.
#[derive(Command)]
struct Transfer {
    #[stream]
    from: StreamId,
    #[stream]
    to: StreamId,
    amount: u64,
}

#[derive(Default)]
struct TransferState {
    from: Account,
    to: Account,
}

impl CommandLogic for Transfer {
    type State = TransferState;
    type Event = AccountEvent;

    fn apply(&self, state: &mut TransferState, event: &StoredEvent<AccountEvent>) {
        if event.stream_id == self.from {
            state.from.apply(&event.payload);
        } else {
            state.to.apply(&event.payload);
        }
    }

    fn handle(
        &self,
        read_streams: ReadStreams<Self::StreamSet>,
        state: TransferState,
        _resolver: &mut StreamResolver,
    ) -> CommandResult<Vec<StreamWrite<Self::StreamSet, AccountEvent>>> {
        require!(self.from != self.to, "cannot transfer to the same account");
        require!(self.amount > 0, "a transfer must move money");
        require!(state.from.open, "account {} is not open", self.from);
        require!(state.to.open, "account {} is not open", self.to);
        require!(
            state.from.balance >= self.amount,
            "insufficient funds in {}: balance {}, transfer {}",
            self.from,
            state.from.balance,
            self.amount
        );
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

/// A store wrapper that plays "another teller": once armed, just before the next append
/// that touches `account`, it deposits into that account itself. The command's read is then
/// stale, its append conflicts, and the executor retries with fresh state.
struct InterferingTeller<S> {
    inner: S,
    account: StreamId,
    armed: AtomicBool,
}

#[async_trait]
impl<S: EventStore> EventStore for InterferingTeller<S> {
    async fn read_streams(&self, streams: &[StreamId]) -> eventcore::Result<StreamsSnapshot> {
        self.inner.read_streams(streams).await
    }

    async fn append(&self, request: AppendRequest) -> eventcore::Result<AppendOutcome> {
        let touches = request.streams.iter().any(|s| s.stream_id == self.account);
        if touches && self.armed.swap(false, Ordering::SeqCst) {
            let deposit = EventData::from_event(
                &AccountEvent::Deposited { amount: 5 },
                EventMetadata::default().with_actor("other-teller"),
            )?;
            self.inner
                .append(AppendRequest::single(
                    self.account.clone(),
                    ExpectedVersion::Any,
                    vec![deposit],
                ))
                .await?;
            println!(
                "  (another teller deposited 5 into {} meanwhile)",
                self.account
            );
        }
        self.inner.append(request).await
    }

    async fn read_all(&self, query: &LogQuery) -> eventcore::Result<Vec<RecordedEvent>> {
        self.inner.read_all(query).await
    }

    async fn head_position(&self) -> eventcore::Result<Option<GlobalPosition>> {
        self.inner.head_position().await
    }

    async fn wait_for_events(&self, after: Option<GlobalPosition>) -> eventcore::Result<()> {
        self.inner.wait_for_events(after).await
    }

    async fn idempotent_outcome(
        &self,
        key: &IdempotencyKey,
    ) -> eventcore::Result<Option<AppendOutcome>> {
        self.inner.idempotent_outcome(key).await
    }
}

/// The in-memory store, or PostgreSQL when `DATABASE_URL` is set.
async fn open_store() -> Result<Arc<dyn EventStore>, Box<dyn std::error::Error>> {
    let Ok(url) = std::env::var("DATABASE_URL") else {
        println!("Store: in memory (set DATABASE_URL to use PostgreSQL)\n");
        return Ok(Arc::new(InMemoryEventStore::new()));
    };
    let suffix = EventId::new().as_uuid().simple().to_string();
    let schema = SchemaName::try_new(format!("banking_{}", &suffix[suffix.len() - 12..]))?;
    let store = PostgresEventStore::connect_with(
        PostgresConfig::from_url(&url)?.with_schema(schema.clone()),
    )
    .await?;
    store.migrate().await?;
    println!("Store: PostgreSQL, schema {schema}\n");
    Ok(Arc::new(store))
}

async fn balance(store: &dyn EventStore, account: &StreamId) -> eventcore::Result<u64> {
    let snapshot = store.read_streams(std::slice::from_ref(account)).await?;
    let mut state = Account::default();
    for event in &snapshot.events {
        state.apply(&event.decode::<AccountEvent>()?.payload);
    }
    Ok(state.balance)
}

fn account(name: &str) -> eventcore::Result<StreamId> {
    Ok(StreamId::try_new(format!("account-{name}"))?)
}

async fn execute_and_report<C: Command>(executor: &CommandExecutor, label: &str, command: &C) {
    match executor.execute(command).await {
        Ok(result) => println!(
            "  {label}: ok, {} event(s) written in {} attempt(s)",
            result.events_written.len(),
            result.attempts
        ),
        Err(error) => println!("  {label}: refused: {error}"),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();

    let backend = open_store().await?;
    let alice = account("alice")?;
    let bob = account("bob")?;
    let store = Arc::new(InterferingTeller {
        inner: backend.clone(),
        account: bob.clone(),
        armed: AtomicBool::new(false),
    });
    let executor = CommandExecutor::from_shared(store.clone());

    println!("Opening accounts");
    for (id, owner, initial) in [(&alice, "Alice", 100), (&bob, "Bob", 20)] {
        let command = OpenAccount {
            account: id.clone(),
            owner: owner.to_owned(),
            initial,
        };
        execute_and_report(&executor, &format!("open {id} with {initial}"), &command).await;
    }
    let again = OpenAccount {
        account: alice.clone(),
        owner: "Mallory".to_owned(),
        initial: 1_000,
    };
    execute_and_report(&executor, "open account-alice again", &again).await;

    println!("\nTransfers");
    store.armed.store(true, Ordering::SeqCst);
    let transfer = Transfer {
        from: alice.clone(),
        to: bob.clone(),
        amount: 30,
    };
    execute_and_report(&executor, "alice -> bob 30", &transfer).await;

    let overdraft = Transfer {
        from: bob.clone(),
        to: alice.clone(),
        amount: 500,
    };
    execute_and_report(&executor, "bob -> alice 500 (overdraft)", &overdraft).await;

    let correlation = CorrelationId::new();
    let options = ExecutionOptions::new()
        .with_correlation_id(correlation)
        .with_actor("teller-7")
        .with_idempotency_key(IdempotencyKey::try_new("payroll-2026-11/bob")?);
    let payroll = Transfer {
        from: alice.clone(),
        to: bob.clone(),
        amount: 10,
    };
    let first = executor.execute_with(&payroll, options.clone()).await?;
    let second = executor.execute_with(&payroll, options).await?;
    println!(
        "  payroll alice -> bob 10 with an idempotency key: first wrote {} event(s), \
         the repeat wrote nothing (deduplicated: {})",
        first.events_written.len(),
        second.deduplicated
    );

    println!("\nBalances");
    let mut total = 0;
    for id in [&alice, &bob] {
        let amount = balance(&*backend, id).await?;
        total += amount;
        println!("  {id}: {amount}");
    }
    println!("  total: {total} (120 opened + 5 deposited by the other teller)");
    assert_eq!(total, 125, "money must be conserved");

    println!("\nThe global log");
    for event in backend.read_all(&LogQuery::new()).await? {
        let metadata = &event.metadata;
        println!(
            "  #{:<2} {:<14} v{:<2} {:<15} actor={}",
            event.global_position,
            event.stream_id,
            event.stream_version,
            event.event_type,
            metadata.actor.as_deref().unwrap_or("-"),
        );
    }
    Ok(())
}
