//! Parsing of `#[event(...)]` attributes, and the `#[serde(...)]` attributes that would
//! change what a stored payload is.

use syn::spanned::Spanned;
use syn::{Attribute, Expr, LitStr};

use crate::ctxt::Ctxt;

/// A type name written in an attribute, with its span for errors.
#[derive(Clone)]
pub(crate) struct Name {
    pub(crate) value: String,
    pub(crate) span: proc_macro2::Span,
}

impl Name {
    fn from_lit(lit: &LitStr) -> Self {
        Name {
            value: lit.value(),
            span: lit.span(),
        }
    }
}

/// `#[event(upcast(from = "Old", with = path_or_closure))]`.
pub(crate) struct Upcast {
    pub(crate) from: Name,
    pub(crate) with: Expr,
}

/// Everything `#[event(...)]` attributes may say, on a container or a variant; where
/// each is allowed is checked by the caller.
#[derive(Default)]
pub(crate) struct EventAttrs {
    pub(crate) name: Option<Name>,
    pub(crate) aliases: Vec<Name>,
    pub(crate) upcasts: Vec<Upcast>,
    /// The span of `transparent`, when given.
    pub(crate) transparent: Option<proc_macro2::Span>,
    /// `payload = "whole"`: the whole enum is the payload (serde's tag inside).
    pub(crate) whole_payload: Option<proc_macro2::Span>,
}

const HELP: &str = "expected `name = \"...\"`, `alias = \"...\"`, `transparent`, \
                    `upcast(from = \"...\", with = ...)` or `payload = \"whole\"`";

/// Reads every `#[event(...)]` attribute in `attrs`, recording problems in `cx`.
pub(crate) fn event_attrs(cx: &mut Ctxt, attrs: &[Attribute]) -> EventAttrs {
    let mut out = EventAttrs::default();
    for attr in attrs.iter().filter(|a| a.path().is_ident("event")) {
        let parsed = attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("name") {
                let lit: LitStr = meta.value()?.parse()?;
                if out.name.is_some() {
                    cx.error_spanned_by(&lit, "duplicate `name`: an event has one type name; use `alias` for names it was stored under before");
                } else {
                    out.name = Some(Name::from_lit(&lit));
                }
            } else if meta.path.is_ident("alias") {
                let lit: LitStr = meta.value()?.parse()?;
                out.aliases.push(Name::from_lit(&lit));
            } else if meta.path.is_ident("payload") {
                let lit: LitStr = meta.value()?.parse()?;
                match lit.value().as_str() {
                    "whole" => out.whole_payload = Some(lit.span()),
                    "content" => {}
                    _ => cx.error_spanned_by(
                        &lit,
                        "expected `payload = \"content\"` (the default: a variant's content is \
                         the payload) or `payload = \"whole\"` (the whole enum, serde's tag \
                         inside)",
                    ),
                }
            } else if meta.path.is_ident("transparent") {
                if out.transparent.is_some() {
                    cx.error_spanned_by(&meta.path, "duplicate `transparent`");
                }
                out.transparent = Some(meta.path.span());
            } else if meta.path.is_ident("upcast") {
                let mut from = None;
                let mut with = None;
                meta.parse_nested_meta(|inner| {
                    if inner.path.is_ident("from") {
                        let lit: LitStr = inner.value()?.parse()?;
                        from = Some(Name::from_lit(&lit));
                        Ok(())
                    } else if inner.path.is_ident("with") {
                        with = Some(inner.value()?.parse::<Expr>()?);
                        Ok(())
                    } else {
                        Err(inner.error(
                            "expected `from = \"OldTypeName\"` or `with = function`",
                        ))
                    }
                })?;
                match (from, with) {
                    (Some(from), Some(with)) => out.upcasts.push(Upcast { from, with }),
                    _ => cx.error_spanned_by(
                        attr,
                        "`upcast` needs both `from = \"OldTypeName\"` and `with = function`: \
                         the stored type name it reads, and the function (or closure) that \
                         turns the old payload into this event",
                    ),
                }
            } else {
                return Err(meta.error(HELP));
            }
            Ok(())
        });
        if let Err(error) = parsed {
            cx.push(error);
        }
    }
    out
}

/// Serde container attributes an enum cannot have when the derive stores a variant's
/// content under the type name: those that change its tagging (it must keep serde's
/// default, externally tagged form) or replace its serde impls.
pub(crate) fn serde_tagging(attrs: &[Attribute]) -> Vec<(proc_macro2::Span, String)> {
    serde_words(attrs)
        .into_iter()
        .filter(|(_, word)| {
            matches!(
                word.as_str(),
                // The tag moves into the payload, or disappears.
                "tag" | "content" | "untagged"
                // The enum's serde impls are replaced by another type's or are not an
                // enum's: the variant positions the derive counts mean nothing to them.
                | "from" | "try_from" | "into" | "remote"
                | "variant_identifier" | "field_identifier"
            )
        })
        .collect()
}

/// Serde variant attributes the derive cannot work with: a variant serde skips cannot be
/// stored or read back, and a variant serialized by a function of its own or untagged
/// has no content of its own to store.
pub(crate) fn serde_variant_blockers(attrs: &[Attribute]) -> Vec<(proc_macro2::Span, String)> {
    serde_words(attrs)
        .into_iter()
        .filter(|(_, word)| {
            matches!(
                word.as_str(),
                "skip"
                    | "skip_serializing"
                    | "skip_deserializing"
                    | "untagged"
                    | "with"
                    | "serialize_with"
                    | "deserialize_with"
            )
        })
        .collect()
}

/// The first word of every item in every `#[serde(...)]` attribute (`rename_all`,
/// `tag`, ...), with its span. Anything unreadable is left to serde to report.
fn serde_words(attrs: &[Attribute]) -> Vec<(proc_macro2::Span, String)> {
    let mut words = Vec::new();
    for attr in attrs.iter().filter(|a| a.path().is_ident("serde")) {
        let _ = attr.parse_nested_meta(|meta| {
            if let Some(ident) = meta.path.get_ident() {
                words.push((ident.span(), ident.to_string()));
            }
            // Skip the value or nested list, whatever it is.
            if meta.input.peek(syn::Token![=]) {
                let _: Expr = meta.value()?.parse()?;
            } else if meta.input.peek(syn::token::Paren) {
                let _ = meta.parse_nested_meta(|nested| {
                    if nested.input.peek(syn::Token![=]) {
                        let _: Expr = nested.value()?.parse()?;
                    }
                    Ok(())
                });
            }
            Ok(())
        });
    }
    words
}
