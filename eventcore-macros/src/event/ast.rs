//! The `#[derive(Event)]` input as a typed description, checked: every type name valid
//! and unique, every attribute where it belongs.

use std::collections::HashMap;

use syn::ext::IdentExt;
use syn::{Data, DeriveInput, Fields, Generics, Ident, Type};

use super::attr::{self, EventAttrs, Name, Upcast};
use crate::ctxt::Ctxt;

/// The longest type name a store accepts, in bytes (EventCore's `MAX_NAME_LEN`).
const MAX_NAME_LEN: usize = 255;

pub(crate) struct EventInput<'a> {
    pub(crate) ident: &'a Ident,
    pub(crate) generics: &'a Generics,
    pub(crate) shape: Shape<'a>,
    pub(crate) upcasts: Vec<Upcast>,
    /// `#[event(payload = "whole")]` on an enum.
    pub(crate) whole_payload: bool,
}

pub(crate) enum Shape<'a> {
    /// A struct: one type name for every value.
    Struct { name: Name, aliases: Vec<Name> },
    /// An enum: one type name per variant, or a whole event enum per transparent variant.
    Enum(Vec<Variant<'a>>),
}

pub(crate) struct Variant<'a> {
    pub(crate) ident: &'a Ident,
    /// The variant's position in the enum (what serde's variant list is indexed by).
    pub(crate) index: usize,
    pub(crate) style: Style,
    pub(crate) kind: VariantKind<'a>,
}

#[derive(Clone, Copy)]
pub(crate) enum Style {
    Named,
    Unnamed,
    Unit,
}

pub(crate) enum VariantKind<'a> {
    /// Stored under its own type name, its content as the payload.
    Own { name: Name, aliases: Vec<Name> },
    /// `#[event(transparent)]`: holds an event of another event type, stored as that
    /// event is.
    Transparent { inner: &'a Type },
}

impl<'a> EventInput<'a> {
    /// Reads and checks the input, recording every problem in `cx`; `None` when nothing
    /// can be generated from it.
    pub(crate) fn from_ast(cx: &mut Ctxt, input: &'a DeriveInput) -> Option<Self> {
        let container = attr::event_attrs(cx, &input.attrs);
        if let Some(span) = container.transparent {
            cx.error_spanned_at(
                span,
                "`transparent` belongs on a newtype variant that holds another event enum",
            );
        }
        let shape = match &input.data {
            Data::Struct(data) => {
                for field in &data.fields {
                    if let Some(attr) = field.attrs.iter().find(|a| a.path().is_ident("event")) {
                        cx.error_spanned_by(
                            attr,
                            "`#[event]` has no meaning on a field: it goes on the struct",
                        );
                    }
                }
                if let Some(span) = container.whole_payload {
                    cx.error_spanned_at(
                        span,
                        "`payload` is for enums: a struct's whole value is always its payload",
                    );
                }
                Shape::Struct {
                    name: container.name.clone().unwrap_or_else(|| Name {
                        value: input.ident.unraw().to_string(),
                        span: input.ident.span(),
                    }),
                    aliases: container.aliases.clone(),
                }
            }
            Data::Enum(data) => {
                if let Some(name) = &container.name {
                    cx.error_spanned_at(
                        name.span,
                        "an enum has a type name per variant: put `#[event(name = \"...\")]` \
                         on the variant",
                    );
                }
                if let Some(alias) = container.aliases.first() {
                    cx.error_spanned_at(
                        alias.span,
                        "an enum has type names per variant: put `#[event(alias = \"...\")]` \
                         on the variant",
                    );
                }
                if data.variants.is_empty() {
                    cx.error_spanned_by(
                        &input.ident,
                        "`#[derive(Event)]` needs at least one variant: an enum without \
                         variants has no value to store",
                    );
                    return None;
                }
                let variants = data
                    .variants
                    .iter()
                    .enumerate()
                    .map(|(index, variant)| Variant::from_ast(cx, index, variant))
                    .collect::<Vec<_>>();
                // With the whole enum as payload, serde's tagging is the user's to choose.
                let has_own = variants
                    .iter()
                    .any(|v| matches!(v.kind, VariantKind::Own { .. }));
                if has_own && container.whole_payload.is_none() {
                    for (span, word) in attr::serde_tagging(&input.attrs) {
                        cx.error_spanned_at(
                            span,
                            format!(
                                "`#[serde({word})]` cannot be used with `#[derive(Event)]`: the \
                                 stored type name is the tag and the payload is the variant's \
                                 content, written and read by the enum's own serde derive in its \
                                 default (externally tagged) form; with \
                                 `#[event(payload = \"whole\")]`, or when every variant is \
                                 `#[event(transparent)]`, any serde form works"
                            ),
                        );
                    }
                }
                if let (true, Some(_)) = (has_own, container.whole_payload) {
                    for (span, _) in attr::serde_tagging(&input.attrs)
                        .into_iter()
                        .filter(|(_, word)| word == "untagged")
                    {
                        cx.error_spanned_at(
                            span,
                            "`#[serde(untagged)]` cannot be used with `#[event(payload = \"whole\")]`: \
                             an untagged payload does not say which variant it is, so an event \
                             could read back as another variant with the same fields",
                        );
                    }
                }
                Shape::Enum(variants)
            }
            Data::Union(data) => {
                cx.error_spanned_by(
                    data.union_token,
                    "`#[derive(Event)]` supports structs and enums, not unions",
                );
                return None;
            }
        };
        let event = EventInput {
            ident: &input.ident,
            generics: &input.generics,
            shape,
            upcasts: container.upcasts,
            whole_payload: container.whole_payload.is_some(),
        };
        event.check_names(cx);
        Some(event)
    }

    /// Every name valid, and no name stored for two things.
    fn check_names(&self, cx: &mut Ctxt) {
        let mut seen: HashMap<String, &'static str> = HashMap::new();
        let mut claim = |cx: &mut Ctxt, name: &Name, what: &'static str| {
            if let Some(problem) = name_problem(&name.value) {
                cx.error_spanned_at(name.span, format!("invalid event type name: {problem}"));
            }
            if let Some(earlier) = seen.insert(name.value.clone(), what) {
                cx.error_spanned_at(
                    name.span,
                    format!(
                        "the type name `{}` is already taken (by {earlier}): each stored name \
                         must decode to one thing",
                        name.value
                    ),
                );
            }
        };
        match &self.shape {
            Shape::Struct { name, aliases } => {
                claim(cx, name, "the struct's name");
                for alias in aliases {
                    claim(cx, alias, "an alias");
                }
            }
            Shape::Enum(variants) => {
                for variant in variants {
                    if let VariantKind::Own { name, aliases } = &variant.kind {
                        claim(cx, name, "a variant's name");
                        for alias in aliases {
                            claim(cx, alias, "an alias");
                        }
                    }
                }
            }
        }
        for upcast in &self.upcasts {
            claim(cx, &upcast.from, "an upcaster");
        }
    }
}

impl<'a> Variant<'a> {
    fn from_ast(cx: &mut Ctxt, index: usize, variant: &'a syn::Variant) -> Self {
        let attrs: EventAttrs = attr::event_attrs(cx, &variant.attrs);
        if let Some(span) = attrs.whole_payload {
            cx.error_spanned_at(
                span,
                "`payload` belongs on the enum: every variant of an enum is stored the same way",
            );
        }
        for field in &variant.fields {
            if let Some(attr) = field.attrs.iter().find(|a| a.path().is_ident("event")) {
                cx.error_spanned_by(
                    attr,
                    "`#[event]` has no meaning on a field: it goes on the enum or its variants",
                );
            }
        }
        if let Some(upcast) = attrs.upcasts.first() {
            cx.error_spanned_at(
                upcast.from.span,
                "`upcast` belongs on the enum, not on a variant: an upcaster may produce any \
                 variant",
            );
        }
        for (span, word) in attr::serde_variant_blockers(&variant.attrs) {
            cx.error_spanned_at(
                span,
                format!(
                    "`#[serde({word})]` cannot be used on a variant of a `#[derive(Event)]` enum: \
                     every variant is stored as its own content and read back from it"
                ),
            );
        }
        let style = match &variant.fields {
            Fields::Named(_) => Style::Named,
            Fields::Unnamed(_) => Style::Unnamed,
            Fields::Unit => Style::Unit,
        };
        let kind = match attrs.transparent {
            Some(span) => {
                if let Some(name) = attrs.name.as_ref().or(attrs.aliases.first()) {
                    cx.error_spanned_at(
                        name.span,
                        "a `transparent` variant has no type name of its own: its events keep \
                         the names of the enum it holds",
                    );
                }
                match &variant.fields {
                    Fields::Unnamed(fields) if fields.unnamed.len() == 1 => {
                        VariantKind::Transparent {
                            inner: &fields.unnamed[0].ty,
                        }
                    }
                    _ => {
                        cx.error_spanned_at(
                            span,
                            "`transparent` needs a newtype variant holding one event type, \
                             like `Orders(OrderEvent)`",
                        );
                        own(variant, attrs)
                    }
                }
            }
            None => own(variant, attrs),
        };
        Variant {
            ident: &variant.ident,
            index,
            style,
            kind,
        }
    }
}

fn own<'a>(variant: &syn::Variant, attrs: EventAttrs) -> VariantKind<'a> {
    VariantKind::Own {
        name: attrs.name.unwrap_or_else(|| Name {
            // `r#match` is stored as `match`, as serde names it.
            value: variant.ident.unraw().to_string(),
            span: variant.ident.span(),
        }),
        aliases: attrs.aliases,
    }
}

/// EventCore's name rule (`check_name`), checked at compile time.
fn name_problem(value: &str) -> Option<String> {
    if value.is_empty() {
        return Some("it is empty".to_owned());
    }
    if value.len() > MAX_NAME_LEN {
        return Some(format!(
            "it is {} bytes long, the limit is {MAX_NAME_LEN}",
            value.len()
        ));
    }
    value
        .char_indices()
        .find(|(_, c)| c.is_control())
        .map(|(at, _)| format!("it contains a control character at byte {at}"))
}
