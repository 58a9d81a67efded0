//! `#[derive(Event)]`: `attr` parses `#[event(...)]` (and looks for the `#[serde(...)]`
//! attributes that would change what is stored), `ast` builds the checked description,
//! `expand` writes the impl (or, on errors, the errors and a stub impl).

mod ast;
mod attr;
mod expand;

pub(crate) use expand::derive;
