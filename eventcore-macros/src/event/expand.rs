//! Writes the `impl eventcore::Event`.

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned};
use syn::DeriveInput;
use syn::spanned::Spanned;

use super::ast::{EventInput, Shape, Style, Variant, VariantKind};
use crate::ctxt::Ctxt;

pub(crate) fn derive(input: &DeriveInput) -> TokenStream {
    let mut cx = Ctxt::new();
    let event = EventInput::from_ast(&mut cx, input);
    match (cx.check(), event) {
        (Ok(()), Some(event)) => expand(&event),
        (Err(errors), _) => fallback(input, errors),
        (Ok(()), None) => fallback(
            input,
            syn::Error::new(
                input.ident.span(),
                "`#[derive(Event)]` could not read this item",
            ),
        ),
    }
}

/// The errors, plus a stub impl so code using the type as an event does not add a
/// cascade of "`Event` is not implemented" errors to the real ones. It never runs: the
/// build fails.
fn fallback(input: &DeriveInput, errors: syn::Error) -> TokenStream {
    let errors = errors.to_compile_error();
    if matches!(input.data, syn::Data::Union(_)) {
        return errors;
    }
    let ident = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    quote! {
        #errors
        #[automatically_derived]
        impl #impl_generics ::eventcore::Event for #ident #ty_generics #where_clause {
            fn event_type(&self) -> &str {
                ::core::unreachable!()
            }
        }
    }
}

fn expand(event: &EventInput<'_>) -> TokenStream {
    let ident = event.ident;
    let (impl_generics, ty_generics, where_clause) = event.generics.split_for_impl();
    let mut predicates = where_clause
        .map(|w| w.predicates.iter().cloned().collect::<Vec<_>>())
        .unwrap_or_default();
    if event.generics.type_params().next().is_some() {
        // What the trait requires of `Self`, stated so a generic event derives without
        // repeating serde's bounds.
        predicates.push(syn::parse_quote!(
            Self: ::eventcore::__private::serde::Serialize
                + ::eventcore::__private::serde::de::DeserializeOwned
                + ::core::marker::Send
                + ::core::marker::Sync
                + 'static
        ));
        if let Shape::Enum(variants) = &event.shape {
            for variant in variants {
                if let VariantKind::Transparent { inner } = variant.kind {
                    predicates.push(syn::parse_quote!(#inner: ::eventcore::Event));
                }
            }
        }
    }
    let body = match &event.shape {
        Shape::Struct { name, aliases } => expand_struct(event, name, aliases),
        Shape::Enum(variants) => expand_enum(event, variants),
    };
    quote! {
        #[automatically_derived]
        impl #impl_generics ::eventcore::Event for #ident #ty_generics
        where
            #(#predicates,)*
        {
            #body
        }
    }
}

/// The match arms of the upcasters, and their names.
fn upcast_arms(event: &EventInput<'_>) -> (Vec<TokenStream>, Vec<String>) {
    let arms = event
        .upcasts
        .iter()
        .map(|upcast| {
            let from = &upcast.from.value;
            let with = &upcast.with;
            // Spanned on the function, so a wrong signature is reported where it is named.
            let span = Span::call_site().located_at(with.span());
            quote_spanned! {span=>
                #from => ::eventcore::__private::upcast::<_, _, Self>(__eventcore_event_type, __eventcore_payload, #with),
            }
        })
        .collect();
    let names = event.upcasts.iter().map(|u| u.from.value.clone()).collect();
    (arms, names)
}

fn expand_struct(
    event: &EventInput<'_>,
    name: &super::attr::Name,
    aliases: &[super::attr::Name],
) -> TokenStream {
    let name = &name.value;
    let accepted: Vec<&str> = std::iter::once(name.as_str())
        .chain(aliases.iter().map(|a| a.value.as_str()))
        .collect();
    let (upcasts, upcast_names) = upcast_arms(event);
    quote! {
        fn event_type(&self) -> &str {
            #name
        }

        fn encode(&self) -> ::eventcore::Result<::eventcore::EventPayload> {
            ::eventcore::EventPayload::serialize(self, #name)
        }

        fn decode(
            __eventcore_event_type: &::eventcore::EventType,
            __eventcore_payload: &::eventcore::EventPayload,
        ) -> ::core::result::Result<Self, ::eventcore::DecodeError> {
            match __eventcore_event_type.as_str() {
                #(#accepted)|* => ::eventcore::__private::decode_whole(__eventcore_payload),
                #(#upcasts)*
                _ => ::core::result::Result::Err(::eventcore::__private::unknown::<Self>(__eventcore_event_type)),
            }
        }

        fn decodes(__eventcore_event_type: &str) -> bool {
            ::core::matches!(__eventcore_event_type, #(#accepted)|* #(| #upcast_names)*)
        }
    }
}

fn pattern(variant: &Variant<'_>) -> TokenStream {
    let ident = variant.ident;
    match variant.style {
        Style::Named => quote!(Self::#ident { .. }),
        Style::Unnamed => quote!(Self::#ident(..)),
        Style::Unit => quote!(Self::#ident),
    }
}

fn expand_enum(event: &EventInput<'_>, variants: &[Variant<'_>]) -> TokenStream {
    let mut type_arms = Vec::new();
    let mut own_patterns = Vec::new();
    let mut encode_arms = Vec::new();
    let mut decode_arms = Vec::new();
    let mut own_names: Vec<String> = Vec::new();
    let mut nested_decodes = Vec::new();
    let mut nested_checks = Vec::new();
    for variant in variants {
        let ident = variant.ident;
        match &variant.kind {
            VariantKind::Own { name, aliases } => {
                let pattern = pattern(variant);
                let primary = &name.value;
                type_arms.push(quote!(#pattern => #primary,));
                own_patterns.push(pattern);
                let index = variant.index;
                let accepted: Vec<&str> = std::iter::once(primary.as_str())
                    .chain(aliases.iter().map(|a| a.value.as_str()))
                    .collect();
                let index = index as u64;
                decode_arms.push(if event.whole_payload {
                    quote!(#(#accepted)|* => ::eventcore::__private::decode_whole_as(__eventcore_payload, #primary),)
                } else {
                    quote!(#(#accepted)|* => ::eventcore::__private::decode_content(__eventcore_payload, #index),)
                });
                own_names.extend(accepted.iter().map(|s| (*s).to_owned()));
            }
            VariantKind::Transparent { inner } => {
                let span = Span::call_site().located_at(inner.span());
                type_arms.push(quote_spanned! {span=>
                    Self::#ident(__eventcore_event) => <#inner as ::eventcore::Event>::event_type(__eventcore_event),
                });
                encode_arms.push(quote_spanned! {span=>
                    Self::#ident(__eventcore_event) => <#inner as ::eventcore::Event>::encode(__eventcore_event),
                });
                nested_decodes.push(quote_spanned! {span=>
                    if <#inner as ::eventcore::Event>::decodes(__eventcore_name) {
                        return <#inner as ::eventcore::Event>::decode(__eventcore_event_type, __eventcore_payload)
                            .map(Self::#ident);
                    }
                });
                nested_checks.push(quote_spanned! {span=>
                    || <#inner as ::eventcore::Event>::decodes(__eventcore_event_type)
                });
            }
        }
    }
    if !own_patterns.is_empty() && event.whole_payload {
        encode_arms.push(quote! {
            #(#own_patterns)|* => ::eventcore::EventPayload::serialize(
                self,
                ::eventcore::Event::event_type(self),
            ),
        });
    } else if !own_patterns.is_empty() {
        encode_arms.push(quote! {
            #(#own_patterns)|* => ::eventcore::__private::encode_content(
                self,
                ::eventcore::Event::event_type(self),
            ),
        });
    }
    let (upcasts, upcast_names) = upcast_arms(event);
    own_names.extend(upcast_names);
    let own_check = if own_names.is_empty() {
        quote!(false)
    } else {
        quote!(::core::matches!(__eventcore_event_type, #(#own_names)|*))
    };
    quote! {
        fn event_type(&self) -> &str {
            match self {
                #(#type_arms)*
            }
        }

        fn encode(&self) -> ::eventcore::Result<::eventcore::EventPayload> {
            match self {
                #(#encode_arms)*
            }
        }

        fn decode(
            __eventcore_event_type: &::eventcore::EventType,
            __eventcore_payload: &::eventcore::EventPayload,
        ) -> ::core::result::Result<Self, ::eventcore::DecodeError> {
            match __eventcore_event_type.as_str() {
                #(#decode_arms)*
                #(#upcasts)*
                __eventcore_name => {
                    let _ = __eventcore_name;
                    #(#nested_decodes)*
                    ::core::result::Result::Err(::eventcore::__private::unknown::<Self>(__eventcore_event_type))
                }
            }
        }

        fn decodes(__eventcore_event_type: &str) -> bool {
            #own_check #(#nested_checks)*
        }
    }
}
