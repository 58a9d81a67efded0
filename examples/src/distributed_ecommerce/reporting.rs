//! Analytics: a federation hub (`analytics`) forwards the User and Order services'
//! events to the Reporting consumer, transformed on the way: `user_to_customer` renames
//! `User*` to `Customer*` and redacts the user's name and e-mail, `anonymize_pii`
//! redacts an order's card and street. Reporting builds its sales report from what the
//! hub publishes on `reporting-feed`, and never sees the personal data.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::sync::Arc;

use eventcore::distributed::federation::{FederationHub, Router, RoutingRules, TransformFunctions};
use eventcore::distributed::{
    ProjectionHandler, ServiceId, SubscriptionName, SubscriptionRunner, SubscriptionSpec, Topic,
};
use eventcore::{CheckpointStore, CommandExecutor, Projection, ProjectionFilter, StoredEvent};
use eventcore_memory::InMemoryEventStore;
use serde::{Deserialize, Serialize};

use super::contracts::Cents;
use super::shop::Broker;
use super::view::money;

/// The hub's rules (data: in production a file the operators own).
pub const ROUTING_RULES: &str = r#"{
    "hub": "analytics",
    "sources": [
        { "service": "user", "topics": ["user-events"] },
        { "service": "order", "topics": ["order-events"] }
    ],
    "targets": [
        { "service": "reporting", "topic": "reporting-feed" }
    ],
    "transformations": {
        "user_to_customer": [
            { "rename_type": { "from": "User", "to": "Customer" } },
            { "redact": { "pointers": ["/name", "/email"] } }
        ],
        "anonymize_pii": [
            { "redact": { "pointers": ["/card", "/address/street"] } }
        ]
    },
    "routes": [
        { "source_service": "user", "event_pattern": "User*",
          "target_services": ["reporting"], "transformation": "user_to_customer" },
        { "source_service": "order", "event_pattern": "Order*",
          "target_services": ["reporting"], "transformation": "anonymize_pii" }
    ]
}"#;

/// The hub's topic for Reporting.
pub const REPORTING_TOPIC: &str = "reporting-feed";

/// The events Reporting receives, as the hub made them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, eventcore::Event)]
pub enum ReportedEvent {
    /// `UserRegistered`, renamed and redacted.
    CustomerRegistered {
        /// The user id.
        user_id: String,
        /// `[redacted]`.
        name: String,
        /// `[redacted]`.
        email: String,
    },
    /// `OrderCreated`, card and street redacted.
    OrderCreated {
        /// The order.
        order_id: String,
        /// The customer.
        customer: String,
        /// The total.
        total: Cents,
        /// `[redacted]`.
        card: String,
    },
    /// `OrderCompleted`.
    OrderCompleted {
        /// The order.
        order_id: String,
    },
    /// `OrderCancelled`.
    OrderCancelled {
        /// The order.
        order_id: String,
        /// Why.
        reason: String,
    },
}

/// The sales report.
#[derive(Debug, Clone, Default)]
pub struct SalesReport {
    /// Customers seen, by user id, with the e-mail address as Reporting got it.
    pub customers: BTreeMap<String, String>,
    /// Orders by id: total and status (`open`, `completed` or `cancelled`).
    pub orders: BTreeMap<String, (Cents, &'static str)>,
    /// Every card token as Reporting got it.
    pub cards: Vec<String>,
    filter: ProjectionFilter,
}

impl SalesReport {
    /// An empty report.
    pub fn new() -> eventcore::Result<Self> {
        Ok(SalesReport {
            filter: ProjectionFilter::all().with_event_types([
                "CustomerRegistered",
                "OrderCreated",
                "OrderCompleted",
                "OrderCancelled",
            ])?,
            ..SalesReport::default()
        })
    }

    /// The sum of the completed orders.
    pub fn revenue(&self) -> Cents {
        self.orders
            .values()
            .filter(|(_, status)| *status == "completed")
            .map(|(total, _)| total)
            .sum()
    }
}

impl Projection for SalesReport {
    type Event = ReportedEvent;
    type Error = Infallible;

    fn name(&self) -> &str {
        "sales-report"
    }

    fn filter(&self) -> ProjectionFilter {
        self.filter.clone()
    }

    async fn apply(&mut self, event: &StoredEvent<ReportedEvent>) -> Result<(), Infallible> {
        match &event.payload {
            ReportedEvent::CustomerRegistered { user_id, email, .. } => {
                self.customers.insert(user_id.clone(), email.clone());
            }
            ReportedEvent::OrderCreated {
                order_id,
                total,
                card,
                ..
            } => {
                self.orders.insert(order_id.clone(), (*total, "open"));
                self.cards.push(card.clone());
            }
            ReportedEvent::OrderCompleted { order_id } => {
                if let Some(order) = self.orders.get_mut(order_id) {
                    order.1 = "completed";
                }
            }
            ReportedEvent::OrderCancelled { order_id, .. } => {
                if let Some(order) = self.orders.get_mut(order_id) {
                    order.1 = "cancelled";
                }
            }
        }
        Ok(())
    }

    async fn reset(&mut self) -> Result<(), Infallible> {
        self.customers.clear();
        self.orders.clear();
        self.cards.clear();
        Ok(())
    }
}

impl fmt::Display for SalesReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = |status: &str| self.orders.values().filter(|(_, s)| *s == status).count();
        writeln!(
            f,
            "  customers {}; orders {} ({} completed, {} cancelled); revenue {}",
            self.customers.len(),
            self.orders.len(),
            count("completed"),
            count("cancelled"),
            money(self.revenue())
        )?;
        let emails: std::collections::BTreeSet<&str> =
            self.customers.values().map(String::as_str).collect();
        let cards: std::collections::BTreeSet<&str> =
            self.cards.iter().map(String::as_str).collect();
        write!(
            f,
            "  e-mail addresses seen: {emails:?}; card tokens seen: {cards:?}"
        )
    }
}

/// The hub and the Reporting consumer, each with its own in-memory store.
pub struct Analytics {
    hub: FederationHub,
    hub_store: InMemoryEventStore,
    report: SubscriptionRunner<ProjectionHandler<SalesReport>>,
}

impl fmt::Debug for Analytics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Analytics").finish_non_exhaustive()
    }
}

impl Analytics {
    /// The hub (its rules: [`ROUTING_RULES`]) and Reporting over `broker`. The source
    /// topics must exist.
    pub async fn start(broker: &Broker) -> eventcore::Result<Self> {
        let rules: RoutingRules = serde_json::from_str(ROUTING_RULES).map_err(|error| {
            eventcore::Error::BusinessRuleViolation(format!("the routing rules: {error}"))
        })?;
        let router = Router::new(rules, TransformFunctions::new())?;
        let hub_store = InMemoryEventStore::new();
        let publisher = broker.publisher_of(router.hub());
        publisher
            .declare_topics(&[Topic::try_new(REPORTING_TOPIC)?])
            .await?;
        let mut hub = FederationHub::new(
            router,
            Arc::new(hub_store.clone()),
            Arc::new(hub_store.clone()),
            Arc::clone(broker.subscriber()),
            publisher,
        )?;
        hub.open().await?;
        let store = InMemoryEventStore::new();
        let checkpoints: Arc<dyn CheckpointStore> = Arc::new(store.clone());
        let spec = SubscriptionSpec::new(
            ServiceId::try_new("reporting")?,
            SubscriptionName::try_new("sales-report")?,
            [Topic::try_new(REPORTING_TOPIC)?],
        );
        let mut report = SubscriptionRunner::new(
            Arc::clone(broker.subscriber()),
            spec,
            ProjectionHandler::new(SalesReport::new()?, checkpoints)?,
            CommandExecutor::new(store),
        )?;
        report.open().await?;
        Ok(Analytics {
            hub,
            hub_store,
            report,
        })
    }

    /// Routes what the sources published, publishes it, and lets Reporting apply it;
    /// how many events moved.
    pub async fn step(&mut self) -> eventcore::Result<u64> {
        let routed = self.hub.process_available().await?;
        let published = self.hub.publish_available().await?.published;
        let applied = self.report.process_available().await?;
        Ok(routed + published + applied)
    }

    /// Every event the hub forwarded (its store: what it published), as written.
    ///
    /// # Errors
    ///
    /// The hub store's errors.
    pub async fn forwarded(&self) -> eventcore::Result<Vec<eventcore::RecordedEvent>> {
        use eventcore::EventStore as _;
        self.hub_store
            .read_all(&eventcore::LogQuery::new().with_stream_prefix("federated/"))
            .await
    }

    /// The report.
    pub fn report(&self) -> &SalesReport {
        self.report.handler().projection()
    }
}
