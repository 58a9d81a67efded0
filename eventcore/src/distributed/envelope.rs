//! [`DistributedEvent`]: a published event as it travels between services.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::names::ServiceId;
use crate::error::Result;
use crate::event::{Event, EventPayload, RawEvent, RecordedEvent, StoredEvent, decode_payload};
use crate::metadata::EventMetadata;
use crate::names::EventType;
use crate::trace::TraceContext;
use crate::types::{EventId, GlobalPosition, StreamId, StreamVersion};

/// A published event: what one service's store recorded, as another service receives
/// it. Built by the publisher from the recorded event; its payload is the stored JSON,
/// byte for byte, and it decodes into a typed event by its type name, as a stored event
/// does ([`DistributedEvent::decode`]).
///
/// ```
/// use eventcore::distributed::{DistributedEvent, ServiceId};
/// use eventcore::Event;
/// # use eventcore::{EventId, EventMetadata, EventPayload, EventType, GlobalPosition, RecordedEvent, StreamId, StreamVersion};
/// # use std::sync::Arc;
/// # #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize, Event)]
/// # enum UserEvent { UserRegistered { user_id: String } }
/// # let recorded = RecordedEvent::new(EventId::new(), StreamId::try_new("user-u1")?, StreamVersion::new(1),
/// #     GlobalPosition::new(7), EventType::try_new("UserRegistered")?,
/// #     EventPayload::from_json(r#"{"user_id":"u1"}"#)?, Arc::new(EventMetadata::default()), chrono::Utc::now());
///
/// let published = DistributedEvent::from_recorded(&recorded, &ServiceId::try_new("users")?, chrono::Utc::now())?;
/// let json = serde_json::to_string(&published)?;
/// let received: DistributedEvent = serde_json::from_str(&json)?;
/// assert_eq!(received, published);
/// let user = received.decode::<UserEvent>()?;
/// assert_eq!(user.payload, UserEvent::UserRegistered { user_id: "u1".into() });
/// assert_eq!(user.stream_id.as_str(), "user-u1");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DistributedEvent {
    /// The event's id in its source store: the broker's dedup id, and the root of the
    /// idempotency keys of the effects it causes.
    pub event_id: EventId,
    /// The stored type name.
    pub event_type: EventType,
    /// The stream it was written to, in the source service.
    pub stream_id: StreamId,
    /// Its version in that stream.
    pub stream_version: StreamVersion,
    /// Its position in the source store's global log.
    pub global_position: GlobalPosition,
    /// The payload, as stored.
    pub payload: EventPayload,
    /// The metadata (correlation, causation, actor, custom fields, trace context).
    pub metadata: EventMetadata,
    /// When the source store recorded it.
    #[serde(serialize_with = "rfc3339::serialize")]
    pub occurred_at: DateTime<Utc>,
    /// When it was published.
    #[serde(serialize_with = "rfc3339::serialize")]
    pub published_at: DateTime<Utc>,
    /// The service that published it.
    pub service_id: ServiceId,
    /// The trace context of the command that wrote it (`None` when there was none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_context: Option<TraceContext>,
}

impl DistributedEvent {
    /// The envelope of a recorded event published by `service` at `published_at`.
    ///
    /// # Errors
    ///
    /// [`crate::Error::UnreadableEvent`] for a damaged event ([`RecordedEvent::damage`]): what
    /// cannot be read cannot be published.
    pub fn from_recorded(
        event: &RecordedEvent,
        service: &ServiceId,
        published_at: DateTime<Utc>,
    ) -> Result<Self> {
        event.check_readable()?;
        Ok(DistributedEvent {
            event_id: event.event_id,
            event_type: event.event_type.clone(),
            stream_id: event.stream_id.clone(),
            stream_version: event.stream_version,
            global_position: event.global_position,
            payload: event.payload.clone(),
            metadata: (*event.metadata).clone(),
            occurred_at: event.recorded_at,
            published_at,
            service_id: service.clone(),
            trace_context: event.metadata.trace_context.clone(),
        })
    }

    /// Decodes the payload by its type name into a stored event of `E` (whose
    /// `global_position` is the position in the *source* store).
    ///
    /// # Errors
    ///
    /// [`crate::Error::Deserialization`] naming the source stream, version and type, as for a
    /// stored event.
    pub fn decode<E: Event>(&self) -> Result<StoredEvent<E>> {
        let payload = decode_payload(
            &self.stream_id,
            self.stream_version,
            &self.event_type,
            &self.payload,
        )?;
        Ok(StoredEvent::new(
            self.event_id,
            self.stream_id.clone(),
            self.stream_version,
            self.global_position,
            self.event_type.clone(),
            payload,
            self.metadata.clone(),
            self.occurred_at,
        ))
    }

    /// The event as a [`RawEvent`] (type name and payload), for handing it on as it is.
    pub fn to_raw(&self) -> RawEvent {
        RawEvent::new(self.event_type.clone(), self.payload.clone())
    }
}

/// The envelope's timestamps, written as chrono writes them (RFC 3339, `Z`, the
/// fraction in 0, 3, 6 or 9 digits, whichever is exact) without its formatting
/// machinery, which cost about as much as the rest of the envelope on the publish path.
/// Read back by chrono.
mod rfc3339 {
    use chrono::{DateTime, Datelike, Timelike, Utc};
    use serde::{Serialize, Serializer};

    /// The longest text written here: `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`.
    const LONGEST: usize = 30;

    pub(super) fn serialize<S: Serializer>(
        at: &DateTime<Utc>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let mut text = [0u8; LONGEST];
        match write(at, &mut text).and_then(|len| std::str::from_utf8(&text[..len]).ok()) {
            Some(written) => serializer.serialize_str(written),
            // Years outside 0..=9999 (written with a sign): chrono's own way.
            None => at.serialize(serializer),
        }
    }

    fn two(into: &mut [u8], value: u32) {
        // Callers pass values below 100 (a month, a day, an hour, a minute, a second
        // up to 60), so each digit is below 10.
        into[0] = b'0' + (value / 10 % 10) as u8;
        into[1] = b'0' + (value % 10) as u8;
    }

    /// Writes `at` into `text`, returning its length, or `None` for a year it does not
    /// handle.
    pub(super) fn write(at: &DateTime<Utc>, text: &mut [u8; LONGEST]) -> Option<usize> {
        let year = u32::try_from(at.year()).ok().filter(|year| *year <= 9999)?;
        two(&mut text[0..2], year / 100);
        two(&mut text[2..4], year % 100);
        text[4] = b'-';
        two(&mut text[5..7], at.month());
        text[7] = b'-';
        two(&mut text[8..10], at.day());
        text[10] = b'T';
        let mut second = at.second();
        let mut nano = at.nanosecond();
        if nano >= 1_000_000_000 {
            // A leap second: chrono writes it as second 60.
            second += 1;
            nano -= 1_000_000_000;
        }
        two(&mut text[11..13], at.hour());
        text[13] = b':';
        two(&mut text[14..16], at.minute());
        text[16] = b':';
        two(&mut text[17..19], second);
        let mut len = 19;
        let (mut fraction, digits) = if nano == 0 {
            (0, 0)
        } else if nano.is_multiple_of(1_000_000) {
            (nano / 1_000_000, 3)
        } else if nano.is_multiple_of(1_000) {
            (nano / 1_000, 6)
        } else {
            (nano, 9)
        };
        if digits > 0 {
            text[len] = b'.';
            for at in (len + 1..=len + digits).rev() {
                text[at] = b'0' + (fraction % 10) as u8;
                fraction /= 10;
            }
            len += digits + 1;
        }
        text[len] = b'Z';
        Some(len + 1)
    }

    #[cfg(test)]
    mod tests {
        use chrono::{DateTime, NaiveDate, Utc};
        use proptest::prelude::*;

        fn chrono_text(at: &DateTime<Utc>) -> String {
            let json = serde_json::to_string(at).expect("serializes");
            serde_json::from_str(&json).expect("a string")
        }

        fn ours(at: &DateTime<Utc>) -> Option<String> {
            let mut text = [0u8; super::LONGEST];
            let len = super::write(at, &mut text)?;
            Some(String::from_utf8(text[..len].to_vec()).expect("ascii"))
        }

        proptest! {
            /// Every instant of years 0 to 9999, every kind of fraction, leap seconds
            /// included: the same text as chrono's.
            #[test]
            fn writes_what_chrono_writes(
                days in 0i64..3_652_424,
                second in 0u32..86_400,
                nano in prop_oneof![
                    Just(0u32),
                    (0u32..1_000).prop_map(|m| m * 1_000_000),
                    (0u32..1_000_000).prop_map(|u| u * 1_000),
                    0u32..1_000_000_000,
                    1_000_000_000u32..2_000_000_000,
                ],
            ) {
                let date = NaiveDate::from_ymd_opt(0, 1, 1).expect("valid")
                    + chrono::Duration::days(days);
                // A leap second only on a minute's last second, as chrono allows.
                let second = if nano >= 1_000_000_000 { second / 60 * 60 + 59 } else { second };
                let time = chrono::NaiveTime::from_num_seconds_from_midnight_opt(second, nano)
                    .expect("valid");
                let at = date.and_time(time).and_utc();
                prop_assert_eq!(ours(&at), Some(chrono_text(&at)));
            }
        }

        #[test]
        fn years_outside_four_digits_are_left_to_chrono() {
            for year in [-1, 10_000] {
                let at = NaiveDate::from_ymd_opt(year, 1, 1)
                    .expect("valid")
                    .and_hms_opt(0, 0, 0)
                    .expect("valid")
                    .and_utc();
                assert_eq!(ours(&at), None);
                #[derive(serde::Serialize)]
                struct Holder(#[serde(serialize_with = "super::serialize")] DateTime<Utc>);
                assert_eq!(
                    serde_json::to_string(&Holder(at)).expect("serializes"),
                    serde_json::to_string(&at).expect("serializes")
                );
            }
        }
    }
}
