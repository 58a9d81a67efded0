//! Names at the broker: subjects, stream and consumer names, derived from EventCore's
//! names so that every valid one maps to a valid NATS name, reversibly.

use eventcore::StreamId;
use eventcore::distributed::{Partition, ServiceId, SubscriptionName, Topic, slot_of};

/// The escape character of [`escape_into`]; never produced by the characters kept.
const ESCAPE: char = '~';

/// Whether `byte` stands for itself in a subject token.
fn kept(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_'
}

/// [`escape_into`] into a new string.
#[cfg(test)]
pub(crate) fn escape_token(text: &str) -> String {
    let mut token = String::with_capacity(text.len());
    escape_into(&mut token, text);
    token
}

/// Escapes `text` into one subject token, appended to `out`: ASCII letters, digits, `-`
/// and `_` stand for themselves, every other byte of the UTF-8 text is `~` and two
/// uppercase hex digits. The token never contains `.`, `*`, `>`, whitespace or control
/// characters, is never empty for a non-empty text, and [`unescape_token`] gives the
/// text back.
fn escape_into(out: &mut String, text: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &byte in text.as_bytes() {
        if kept(byte) {
            out.push(char::from(byte));
        } else {
            out.push(ESCAPE);
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0x0f)]));
        }
    }
}

/// The text [`escape_into`] escaped into `token`; `None` when `token` is not one of its
/// results.
pub(crate) fn unescape_token(token: &str) -> Option<String> {
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'~' => {
                let hex = token.get(i + 1..i + 3)?;
                if !hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
                {
                    return None;
                }
                let byte = u8::from_str_radix(hex, 16).ok()?;
                if kept(byte) {
                    // Not what the escaping produces: one text, one token.
                    return None;
                }
                out.push(byte);
                i += 3;
            }
            byte if kept(byte) => {
                out.push(byte);
                i += 1;
            }
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
}

/// The names one deployment uses at the broker, under a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Names {
    prefix: String,
}

impl Names {
    pub(crate) fn new(prefix: &str) -> Self {
        Names {
            prefix: prefix.to_owned(),
        }
    }

    /// The JetStream stream holding `service`'s publication.
    pub(crate) fn stream(&self, service: &ServiceId) -> String {
        format!("{}-{service}", self.prefix)
    }

    /// The service whose publication stream `name` is, if it is one of ours.
    pub(crate) fn service_of_stream(&self, name: &str) -> Option<ServiceId> {
        let service = name.strip_prefix(&self.prefix)?.strip_prefix('-')?;
        ServiceId::try_new(service).ok()
    }

    /// The subject of an event of `stream` published under `topic`:
    /// `<prefix>.<topic>.<slot>.<escaped stream id>`, the slot ([`slot_of`]) in decimal,
    /// so that a subscription's partition is a set of subject filters.
    pub(crate) fn subject(&self, topic: &Topic, stream: &StreamId) -> String {
        // Built by hand, once per published event: `format!` and a separate escaped
        // token cost a tenth of the message's building (W6 profile).
        let id = stream.as_str();
        let mut subject =
            String::with_capacity(self.prefix.len() + topic.as_str().len() + id.len() + 8);
        subject.push_str(&self.prefix);
        subject.push('.');
        subject.push_str(topic.as_str());
        subject.push('.');
        let slot = slot_of(stream);
        if slot >= 10 {
            subject.push(char::from(b'0' + (slot / 10) as u8));
        }
        subject.push(char::from(b'0' + (slot % 10) as u8));
        subject.push('.');
        escape_into(&mut subject, id);
        subject
    }

    /// Every subject of `topic`: what its publishing stream captures.
    pub(crate) fn topic_filter(&self, topic: &Topic) -> String {
        format!("{}.{topic}.>", self.prefix)
    }

    /// The subjects of `topic` that `partition` receives: the whole topic, or one
    /// filter per slot of the partition.
    pub(crate) fn partition_filters(&self, topic: &Topic, partition: Partition) -> Vec<String> {
        if partition.is_whole() {
            return vec![self.topic_filter(topic)];
        }
        partition
            .slots()
            .map(|slot| format!("{}.{topic}.{slot}.*", self.prefix))
            .collect()
    }

    /// The topic and source stream of a subject made by [`Names::subject`] (whose slot
    /// must be the stream's).
    pub(crate) fn parse_subject(&self, subject: &str) -> Option<(Topic, StreamId)> {
        let rest = subject.strip_prefix(&self.prefix)?.strip_prefix('.')?;
        let (topic, rest) = rest.split_once('.')?;
        let (slot, stream) = rest.split_once('.')?;
        let topic = Topic::try_new(topic).ok()?;
        let stream = StreamId::try_new(unescape_token(stream)?).ok()?;
        (slot == slot_of(&stream).to_string()).then_some((topic, stream))
    }

    /// The durable consumer of partition `partition` of subscription `name` of
    /// `service`, on each stream it reads: `<service>~<name>` for a subscription not
    /// split, `<service>~<name>~<index>of<count>` for a partition. `~` appears in
    /// neither name, so the parts are unambiguous.
    pub(crate) fn consumer(
        &self,
        service: &ServiceId,
        name: &SubscriptionName,
        partition: Partition,
    ) -> String {
        if partition.is_whole() {
            format!("{service}~{name}")
        } else {
            format!(
                "{service}~{name}~{}of{}",
                partition.index(),
                partition.count()
            )
        }
    }

    /// The partition whose consumer `consumer` is, if it is one of subscription `name`
    /// of `service` (as [`Names::consumer`] names them).
    pub(crate) fn partition_of_consumer(
        &self,
        consumer: &str,
        service: &ServiceId,
        name: &SubscriptionName,
    ) -> Option<Partition> {
        let whole = self.consumer(service, name, Partition::WHOLE);
        let rest = consumer.strip_prefix(&whole)?;
        if rest.is_empty() {
            return Some(Partition::WHOLE);
        }
        let (index, count) = rest.strip_prefix('~')?.split_once("of")?;
        Partition::new(index.parse().ok()?, count.parse().ok()?).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_keeps_plain_names_and_escapes_the_rest_reversibly() {
        for (text, token) in [
            ("order-42", "order-42"),
            ("a_b", "a_b"),
            ("orders/42", "orders~2F42"),
            ("a.b*c>d e", "a~2Eb~2Ac~3Ed~20e"),
            ("~", "~7E"),
            ("été", "~C3~A9t~C3~A9"),
        ] {
            assert_eq!(escape_token(text), token);
            assert_eq!(unescape_token(token).as_deref(), Some(text));
        }
    }

    #[test]
    fn tokens_the_escaping_cannot_produce_are_refused() {
        for token in ["a.b", "~2", "~zz", "~41", "~2f", "a b", "~C3"] {
            assert_eq!(unescape_token(token), None, "{token}");
        }
    }

    proptest::proptest! {
        /// Every valid stream id becomes one valid subject token and comes back.
        #[test]
        fn every_stream_id_is_one_token_and_comes_back(text in "\\PC{1,80}|[ -~]{1,80}") {
            if let Ok(stream) = StreamId::try_new(text.clone()) {
                let token = escape_token(stream.as_str());
                proptest::prop_assert!(!token.is_empty());
                proptest::prop_assert!(token.bytes().all(|b| b.is_ascii_graphic() && !matches!(b, b'.' | b'*' | b'>')));
                proptest::prop_assert_eq!(unescape_token(&token), Some(text));
            }
        }
    }

    #[test]
    fn a_partition_filters_exactly_its_streams_subjects() {
        let names = Names::new("ec");
        let topic = Topic::try_new("t").expect("valid");
        let matches = |filter: &str, subject: &str| {
            let (f, s): (Vec<&str>, Vec<&str>) =
                (filter.split('.').collect(), subject.split('.').collect());
            f.len() == s.len() && f.iter().zip(&s).all(|(f, s)| *f == "*" || f == s)
        };
        let partitions = Partition::all(8).expect("valid");
        for n in 0..200 {
            let stream = StreamId::try_new(format!("account-{n}")).expect("valid");
            let subject = names.subject(&topic, &stream);
            for partition in &partitions {
                let filters = names.partition_filters(&topic, *partition);
                assert_eq!(filters.len(), 8);
                assert_eq!(
                    filters.iter().any(|f| matches(f, &subject)),
                    partition.contains(&stream),
                    "{subject} in {partition}"
                );
            }
        }
        assert_eq!(
            names.partition_filters(&topic, Partition::WHOLE),
            ["ec.t.>"]
        );
    }

    #[test]
    fn consumer_names_say_their_partition() {
        let names = Names::new("ec");
        let service = ServiceId::try_new("billing").expect("valid");
        let name = SubscriptionName::try_new("orders").expect("valid");
        let other = SubscriptionName::try_new("orders-2").expect("valid");
        for partition in [Partition::WHOLE, Partition::new(3, 8).expect("valid")] {
            let consumer = names.consumer(&service, &name, partition);
            assert_eq!(
                names.partition_of_consumer(&consumer, &service, &name),
                Some(partition)
            );
            assert_eq!(
                names.partition_of_consumer(&consumer, &service, &other),
                None
            );
        }
        assert_eq!(
            names.consumer(&service, &name, Partition::WHOLE),
            "billing~orders"
        );
        assert_eq!(
            names.partition_of_consumer("billing~orders-2", &service, &name),
            None
        );
    }

    #[test]
    fn the_slot_token_is_the_slot_in_decimal() {
        let names = Names::new("ec");
        let topic = Topic::try_new("t").expect("valid");
        let mut slots = std::collections::BTreeSet::new();
        for n in 0..2_000 {
            let stream = StreamId::try_new(format!("s{n}")).expect("valid");
            let subject = names.subject(&topic, &stream);
            let slot = slot_of(&stream);
            assert_eq!(subject, format!("ec.t.{slot}.s{n}"));
            slots.insert(slot);
        }
        assert_eq!(slots.len(), 64, "every slot, one and two digits, was built");
    }

    #[test]
    fn subjects_round_trip() {
        let names = Names::new("ec");
        let topic = Topic::try_new("order-events").expect("valid");
        let stream = StreamId::try_new("orders/2024.1 *x").expect("valid");
        let subject = names.subject(&topic, &stream);
        assert_eq!(subject.split('.').count(), 4);
        assert_eq!(names.parse_subject(&subject), Some((topic.clone(), stream)));
        assert_eq!(names.parse_subject("other.order-events.0.x"), None);
        // The slot must be the stream's (`a` is in slot 27).
        assert!(names.parse_subject("ec.order-events.27.a").is_some());
        assert_eq!(names.parse_subject("ec.order-events.26.a"), None);
        assert_eq!(names.parse_subject("ec.order-events.a"), None);
        let service = ServiceId::try_new("orders").expect("valid");
        assert_eq!(
            names.service_of_stream(&names.stream(&service)),
            Some(service)
        );
    }
}
