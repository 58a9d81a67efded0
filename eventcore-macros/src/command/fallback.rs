//! What to emit when the input had errors.

use proc_macro2::TokenStream;
use quote::quote;
use syn::DeriveInput;

use super::expand::{impl_predicates, stream_set_ident};

/// The compile errors, plus — for a struct — a stub impl and marker type, so code that
/// uses the command (its `CommandLogic` impl, `Self::StreamSet`) does not add a cascade of
/// unrelated errors to the real ones. The stub never runs: the build fails.
pub(crate) fn expand(input: &DeriveInput, errors: syn::Error) -> TokenStream {
    let errors = errors.to_compile_error();
    if !matches!(input.data, syn::Data::Struct(_)) {
        return errors;
    }
    let ident = &input.ident;
    let vis = &input.vis;
    let set = stream_set_ident(ident);
    let (impl_generics, ty_generics, _) = input.generics.split_for_impl();
    let predicates = impl_predicates(ident, &input.generics);
    quote! {
        #errors
        #vis struct #set;
        #[automatically_derived]
        impl #impl_generics ::eventcore::CommandStreams for #ident #ty_generics
        where
            #(#predicates,)*
        {
            type StreamSet = #set;
            fn read_streams(&self) -> ::std::vec::Vec<::eventcore::StreamId> {
                ::core::unreachable!()
            }
        }
    }
}
