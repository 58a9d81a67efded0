//! Parsing of the `#[stream]` field attribute.

use syn::{Attribute, Meta};

use crate::ctxt::Ctxt;

/// Whether the attributes mark the field as a stream. Reports arguments (`#[stream(x)]`,
/// `#[stream = x]`) and repeated `#[stream]` as errors, spanned on the attribute.
pub(crate) fn is_stream(cx: &mut Ctxt, attrs: &[Attribute]) -> bool {
    let mut found: Option<&Attribute> = None;
    for attr in attrs.iter().filter(|a| a.path().is_ident("stream")) {
        match &attr.meta {
            Meta::Path(_) => {}
            Meta::List(list) => cx.error_spanned_by(
                list,
                "`#[stream]` takes no arguments; write `#[stream]` on the field",
            ),
            Meta::NameValue(nv) => cx.error_spanned_by(
                nv,
                "`#[stream]` takes no value; write `#[stream]` on the field",
            ),
        }
        if found.is_some() {
            cx.error_spanned_by(attr, "duplicate `#[stream]` attribute");
        }
        found = Some(attr);
    }
    found.is_some()
}
