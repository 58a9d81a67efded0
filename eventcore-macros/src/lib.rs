//! Derive macros for [EventCore](https://docs.rs/eventcore). Use them through the
//! `eventcore` crate, which re-exports them; this crate is an implementation detail.
//!
//! Each derive is a small pipeline in a module of its own (`command`, `event`): parse the
//! input into a typed description that keeps spans, check it (every error collected, each
//! spanned where it was written), write the code; when there were errors, emit them with
//! a stub impl, so a user sees the real mistakes and not a cascade of "trait not
//! implemented" errors.

mod command;
mod ctxt;
mod event;

use proc_macro::TokenStream;
use syn::{DeriveInput, parse_macro_input};

/// Derives `eventcore::CommandStreams` for a struct with named fields.
///
/// Mark every field that names a stream the command reads (and may write) with
/// `#[stream]`; its type must be a `StreamId` or a collection of them (`Vec<StreamId>`,
/// `Option<StreamId>`, sets, arrays). The derive also generates a marker type
/// `<Name>StreamSet` (same visibility as the struct) that ties the command's
/// `StreamWrite`s to it.
///
/// ```
/// use eventcore::{Command, CommandStreams, StreamId};
///
/// #[derive(Command)]
/// struct Transfer {
///     #[stream]
///     from: StreamId,
///     #[stream]
///     to: StreamId,
///     amount: u64,
/// }
///
/// let (from, to) = (StreamId::from_static("a"), StreamId::from_static("b"));
/// let transfer = Transfer { from: from.clone(), to: to.clone(), amount: 5 };
/// assert_eq!(transfer.read_streams(), vec![from, to]);
/// let _marker: TransferStreamSet = TransferStreamSet;
/// ```
#[proc_macro_derive(Command, attributes(stream))]
pub fn derive_command(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    command::derive(&input).into()
}

/// Derives `eventcore::Event`: a stable type name for every value, the payload stored
/// under it, and decoding by the stored name.
///
/// On an **enum**, each variant is an event type named after the variant; its *content*
/// (the fields of a struct variant, the value of a newtype variant, `{}` for a unit
/// variant) is the stored payload, and the type name stored beside it is what decoding
/// dispatches on. The enum derives serde's `Serialize` and `Deserialize` as usual (in
/// serde's default, externally tagged form; field attributes such as `rename`, `default`
/// or `with` keep working). On a **struct**, the struct is one event type, named after
/// it, and its whole serde form is the payload.
///
/// ```
/// use eventcore::{Event, EventPayload, EventType};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, PartialEq, Serialize, Deserialize, Event)]
/// enum AccountEvent {
///     Opened { owner: String },
///     Deposited { amount: u64 },
///     Closed,
/// }
///
/// let event = AccountEvent::Deposited { amount: 5 };
/// assert_eq!(event.event_type(), "Deposited");
/// let payload = event.encode()?;
/// assert_eq!(payload.as_str(), r#"{"amount":5}"#);
/// let name = EventType::try_new("Deposited")?;
/// assert_eq!(AccountEvent::decode(&name, &payload)?, event);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Attributes
///
/// | where | attribute | meaning |
/// |---|---|---|
/// | variant, struct | `#[event(name = "AccountOpened")]` | the stored type name (default: the variant's or struct's name). Renaming the Rust item later changes nothing stored. |
/// | variant, struct | `#[event(alias = "Opened")]` | another stored name that decodes into this event (a type name it was stored under before); repeatable |
/// | enum, struct | `#[event(upcast(from = "Deposited", with = f))]` | events stored under the old type name `from` decode through `f`, a function or closure from the old payload (any serde type) to this event (`Self` or `Result<Self, E>`); repeatable |
/// | newtype variant | `#[event(transparent)]` | the variant holds an event of another event type, stored and decoded under that type's names: one enum over several enums (for a command or projection reading streams of several services) |
///
/// Every name is checked when the crate compiles (the store's rule: non-empty, at most
/// 255 bytes, no control characters), and no stored name may mean two things (a name,
/// alias or upcaster source used twice, in this type; across the enums of `transparent`
/// variants the first one that knows a name decodes it).
///
/// A stored name the type does not know is an error naming it (`DecodeError::UnknownType`
/// inside `Error::Deserialization`), never a silent skip.
///
/// ```
/// use eventcore::{Event, EventPayload, EventType};
/// use serde::{Deserialize, Serialize};
///
/// # #[derive(Debug, PartialEq, Serialize, Deserialize, Event)]
/// # enum OrderEvent { Placed { order: String } }
/// #[derive(Debug, PartialEq, Serialize, Deserialize, Event)]
/// enum StockEvent {
///     // Stored as "Reserved" before the variant was renamed.
///     #[event(name = "Reserved")]
///     StockReserved { sku: String },
/// }
///
/// #[derive(Debug, PartialEq, Serialize, Deserialize, Event)]
/// enum ShopEvent {
///     #[event(transparent)]
///     Order(OrderEvent),
///     #[event(transparent)]
///     Stock(StockEvent),
/// }
///
/// let name = EventType::try_new("Reserved")?;
/// let payload = EventPayload::from_json(r#"{"sku":"apple"}"#)?;
/// assert_eq!(
///     ShopEvent::decode(&name, &payload)?,
///     ShopEvent::Stock(StockEvent::StockReserved { sku: "apple".into() })
/// );
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// Refused with an error where it was written: unions and enums without variants; on an
/// enum with variants of its own, the serde container attributes that move the tag into
/// the payload or replace the enum's serde impls (`tag`, `content`, `untagged`, `from`,
/// `try_from`, `into`, `remote`, `variant_identifier`, `field_identifier`; with
/// `payload = "whole"` only `untagged`); `#[serde(skip...)]`, `#[serde(untagged)]` and
/// `#[serde(with...)]` on a variant; `transparent` on anything but a newtype variant, or
/// with a name; `upcast` on a variant, `payload` on a variant or struct, `#[event]` on a
/// field; unknown `#[event]` arguments.
///
/// The generated code names the `eventcore` crate by its path `::eventcore`: a crate
/// that renames the dependency cannot use the derive.
#[proc_macro_derive(Event, attributes(event))]
pub fn derive_event(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    event::derive(&input).into()
}
