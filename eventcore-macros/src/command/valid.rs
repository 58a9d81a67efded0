//! Rules that span several fields.

use super::ast::Command;
use crate::ctxt::Ctxt;

pub(crate) fn check(cx: &mut Ctxt, command: &Command<'_>) {
    if command.stream_fields().next().is_none() {
        cx.error_spanned_by(
            command.ident,
            "`#[derive(Command)]` needs at least one `#[stream]` field: mark the `StreamId` \
             fields the command reads and writes with `#[stream]`",
        );
    }
}
