//! Support for generated code. Not public API: no stability promise.

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::hash::BuildHasher;

use crate::types::StreamId;

pub use crate::event::derive_support::*;
pub use serde;

/// The types a `#[stream]` field may have. The derive calls this on every such field, so
/// the compiler, not the macro, decides whether a field type is acceptable.
#[diagnostic::on_unimplemented(
    message = "`#[stream]` field of type `{Self}` is not a `StreamId` or a collection of `StreamId`s",
    label = "not a stream field",
    note = "a `#[stream]` field must be a `StreamId`, `Option<StreamId>`, `Vec<StreamId>`, `[StreamId; N]`, `VecDeque<StreamId>`, `HashSet<StreamId>` or `BTreeSet<StreamId>`"
)]
pub trait StreamField {
    /// Appends the field's streams to `out`.
    fn collect_streams(&self, out: &mut Vec<StreamId>);
}

impl StreamField for StreamId {
    fn collect_streams(&self, out: &mut Vec<StreamId>) {
        out.push(self.clone());
    }
}

impl<T: StreamField + ?Sized> StreamField for &T {
    fn collect_streams(&self, out: &mut Vec<StreamId>) {
        (**self).collect_streams(out);
    }
}

impl StreamField for Option<StreamId> {
    fn collect_streams(&self, out: &mut Vec<StreamId>) {
        out.extend(self.iter().cloned());
    }
}

impl StreamField for [StreamId] {
    fn collect_streams(&self, out: &mut Vec<StreamId>) {
        out.extend(self.iter().cloned());
    }
}

impl<const N: usize> StreamField for [StreamId; N] {
    fn collect_streams(&self, out: &mut Vec<StreamId>) {
        out.extend(self.iter().cloned());
    }
}

impl StreamField for Vec<StreamId> {
    fn collect_streams(&self, out: &mut Vec<StreamId>) {
        out.extend(self.iter().cloned());
    }
}

impl StreamField for Box<[StreamId]> {
    fn collect_streams(&self, out: &mut Vec<StreamId>) {
        out.extend(self.iter().cloned());
    }
}

impl StreamField for VecDeque<StreamId> {
    fn collect_streams(&self, out: &mut Vec<StreamId>) {
        out.extend(self.iter().cloned());
    }
}

impl<S: BuildHasher> StreamField for HashSet<StreamId, S> {
    fn collect_streams(&self, out: &mut Vec<StreamId>) {
        out.extend(self.iter().cloned());
    }
}

impl StreamField for BTreeSet<StreamId> {
    fn collect_streams(&self, out: &mut Vec<StreamId>) {
        out.extend(self.iter().cloned());
    }
}
