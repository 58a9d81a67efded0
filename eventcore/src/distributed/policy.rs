//! Which events a service publishes, under which topic.

use super::names::Topic;
use crate::error::{Error, Result};
use crate::event::RecordedEvent;
use crate::names::EventType;

/// One rule of a [`PublicationPolicy`]: events selected by stream prefix and/or event
/// types are published under `topic`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicationRule {
    topic: Topic,
    stream_prefix: Option<String>,
    event_types: Option<Vec<EventType>>,
}

impl PublicationRule {
    /// A rule publishing under `topic`; select its events with
    /// [`PublicationRule::with_stream_prefix`] and/or
    /// [`PublicationRule::with_event_types`] (a rule selecting nothing is refused by
    /// [`PublicationPolicy::new`]: publishing everything is never the default).
    pub fn new(topic: Topic) -> Self {
        PublicationRule {
            topic,
            stream_prefix: None,
            event_types: None,
        }
    }

    /// Selects events of streams whose id starts with `prefix`.
    pub fn with_stream_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.stream_prefix = Some(prefix.into());
        self
    }

    /// Selects events of these types (with a stream prefix too: events that match
    /// both).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidEventType`] for an invalid type name; [`Error::EventTypePattern`]
    /// for one holding `*` (rules select exact names).
    pub fn with_event_types<I, S>(mut self, types: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let types = crate::store::exact_event_types(types)?;
        self.event_types = Some(types);
        Ok(self)
    }

    /// The topic.
    pub fn topic(&self) -> &Topic {
        &self.topic
    }

    fn matches(&self, event: &RecordedEvent) -> bool {
        self.stream_prefix
            .as_deref()
            .is_none_or(|prefix| event.stream_id.as_str().starts_with(prefix))
            && self
                .event_types
                .as_deref()
                .is_none_or(|types| types.contains(&event.event_type))
    }
}

/// What a service publishes: rules tried in order, the first match decides the topic;
/// an event no rule selects stays private.
///
/// ```
/// use eventcore::distributed::{PublicationPolicy, PublicationRule, Topic};
///
/// let policy = PublicationPolicy::new([
///     PublicationRule::new(Topic::try_new("order-events")?).with_stream_prefix("order-"),
///     PublicationRule::new(Topic::try_new("stock-events")?)
///         .with_event_types(["StockReserved", "StockReleased"])?,
/// ])?;
/// assert_eq!(policy.topics().len(), 2);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicationPolicy {
    rules: Vec<PublicationRule>,
}

impl PublicationPolicy {
    /// A policy of these rules, in order.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidPublicationPolicy`] when there is no rule, or a rule selects
    /// nothing (no stream prefix, no event types), or selects by an empty list of types.
    pub fn new(rules: impl IntoIterator<Item = PublicationRule>) -> Result<Self> {
        let rules: Vec<PublicationRule> = rules.into_iter().collect();
        if rules.is_empty() {
            return Err(Error::InvalidPublicationPolicy {
                reason: "a policy needs at least one rule".to_owned(),
            });
        }
        for rule in &rules {
            if rule.stream_prefix.is_none() && rule.event_types.is_none() {
                return Err(Error::InvalidPublicationPolicy {
                    reason: format!(
                        "the rule for topic `{}` selects no events: give it a stream prefix \
                         or event types (a service publishes nothing by default)",
                        rule.topic
                    ),
                });
            }
            if rule.event_types.as_ref().is_some_and(Vec::is_empty) {
                return Err(Error::InvalidPublicationPolicy {
                    reason: format!(
                        "the rule for topic `{}` selects an empty list of event types",
                        rule.topic
                    ),
                });
            }
        }
        Ok(PublicationPolicy { rules })
    }

    /// The topic `event` is published under, `None` when it stays private.
    pub fn topic_of(&self, event: &RecordedEvent) -> Option<&Topic> {
        self.rules
            .iter()
            .find(|rule| rule.matches(event))
            .map(PublicationRule::topic)
    }

    /// Every topic of the policy, once each.
    pub fn topics(&self) -> Vec<Topic> {
        let mut topics: Vec<Topic> = self.rules.iter().map(|r| r.topic.clone()).collect();
        topics.sort();
        topics.dedup();
        topics
    }
}
