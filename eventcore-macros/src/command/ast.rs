//! The derive input as a typed description that keeps the spans we report errors on.

use syn::{Data, DeriveInput, Fields, Generics, Ident, Type, Visibility};

use super::attr;
use crate::ctxt::Ctxt;

/// A struct with named fields, as `#[derive(Command)]` needs it.
pub(crate) struct Command<'a> {
    pub(crate) ident: &'a Ident,
    pub(crate) vis: &'a Visibility,
    pub(crate) generics: &'a Generics,
    pub(crate) fields: Vec<Field<'a>>,
}

pub(crate) struct Field<'a> {
    pub(crate) ident: &'a Ident,
    pub(crate) ty: &'a Type,
    pub(crate) is_stream: bool,
}

impl<'a> Command<'a> {
    /// Reads the input, recording every problem in `cx`. Returns `None` when the input is
    /// not a struct with named fields (nothing more can be checked then).
    pub(crate) fn from_ast(cx: &mut Ctxt, input: &'a DeriveInput) -> Option<Self> {
        let fields = match &input.data {
            Data::Struct(data) => match &data.fields {
                Fields::Named(named) => &named.named,
                Fields::Unnamed(_) => {
                    cx.error_spanned_by(
                        &input.ident,
                        "`#[derive(Command)]` needs a struct with named fields, not a tuple struct",
                    );
                    return None;
                }
                Fields::Unit => {
                    cx.error_spanned_by(
                        &input.ident,
                        "`#[derive(Command)]` needs a struct with named fields, not a unit struct",
                    );
                    return None;
                }
            },
            Data::Enum(data) => {
                cx.error_spanned_by(
                    data.enum_token,
                    "`#[derive(Command)]` supports structs only, not enums",
                );
                return None;
            }
            Data::Union(data) => {
                cx.error_spanned_by(
                    data.union_token,
                    "`#[derive(Command)]` supports structs only, not unions",
                );
                return None;
            }
        };
        let fields = fields
            .iter()
            .filter_map(|field| {
                let is_stream = attr::is_stream(cx, &field.attrs);
                field.ident.as_ref().map(|ident| Field {
                    ident,
                    ty: &field.ty,
                    is_stream,
                })
            })
            .collect();
        Some(Command {
            ident: &input.ident,
            vis: &input.vis,
            generics: &input.generics,
            fields,
        })
    }

    pub(crate) fn stream_fields(&self) -> impl Iterator<Item = &Field<'a>> {
        self.fields.iter().filter(|f| f.is_stream)
    }
}
