//! Derive macros for [EventCore](https://docs.rs/eventcore). Use them through the
//! `eventcore` crate, which re-exports them; this crate is an implementation detail.
//!
//! The derive is a small pipeline, one module per stage:
//! `ast` turns the syn input into a typed description that keeps spans, `attr` parses
//! `#[stream]` attributes, `valid` checks rules across fields, `expand` writes the
//! generated code, and `fallback` emits a stub impl when there were errors, so a user
//! sees the real mistakes and not a cascade of "trait not implemented" errors.

mod ast;
mod attr;
mod ctxt;
mod expand;
mod fallback;
mod valid;

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
    expand::derive(&input).into()
}
