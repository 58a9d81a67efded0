//! `#[derive(Command)]`: `ast` turns the syn input into a typed description that keeps
//! spans, `attr` parses `#[stream]` attributes, `valid` checks rules across fields,
//! `expand` writes the generated code, and `fallback` emits a stub impl when there were
//! errors, so a user sees the real mistakes and not a cascade of "trait not implemented"
//! errors.

mod ast;
mod attr;
mod expand;
mod fallback;
mod valid;

pub(crate) use expand::derive;
