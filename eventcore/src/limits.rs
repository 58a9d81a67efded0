//! The rule at the door: what every backend accepts, decided once here.
//!
//! Whatever [`crate::EventStore::append`] accepts, every backend can store and every
//! later read returns unchanged, decoding to the same value. Anything else is refused
//! before a byte is written, with a typed error naming the limit
//! ([`crate::Error::InvalidPayload`], [`crate::Error::InvalidMetadata`],
//! [`crate::Error::AppendTooLarge`], [`crate::Error::InvalidPosition`]). Backends call
//! [`crate::AppendRequest::validate`] (and, for projections,
//! [`crate::check_checkpoint_position`] and [`crate::ParkedEvent::checked`]) first; the
//! conformance suite's hostile-input section checks that they do.
//!
//! | What | Limit |
//! |---|---|
//! | A payload's JSON text | at most [`MAX_PAYLOAD_BYTES`] bytes |
//! | An event's metadata, as JSON | at most [`MAX_METADATA_BYTES`] bytes |
//! | Nesting of arrays and objects, in payloads and metadata | at most [`MAX_JSON_DEPTH`] levels |
//! | Object keys | unique within each object |
//! | Strings and keys | no NUL character (`\u0000`), no lone surrogate (`\ud800`) |
//! | Numbers | within the range of an `f64` (`1e400` is refused); NaN and ±infinity, which JSON cannot express, are refused when serializing |
//! | Streams in one append | at most [`MAX_STREAMS_PER_APPEND`] |
//! | Events in one append | at most [`MAX_EVENTS_PER_APPEND`] |
//! | Bytes in one append (payloads and metadata) | at most [`MAX_APPEND_BYTES`] |
//! | Stream versions and global positions | at most [`MAX_POSITION`] (`i64::MAX`) |
//!
//! The JSON text of a payload is kept as it was given: the bytes read back are the
//! bytes written, so every finite `f64` (negative zero included), every integer the
//! text holds and the order of keys come back exactly (ADR 0004, `docs/adr/0004-exact-payloads.md`).

/// The longest payload accepted, in bytes of JSON text (8 MiB).
pub const MAX_PAYLOAD_BYTES: usize = 8 * 1024 * 1024;

/// The longest metadata accepted, in bytes of its JSON form (1 MiB).
pub const MAX_METADATA_BYTES: usize = 1024 * 1024;

/// The deepest nesting of arrays and objects accepted in a payload or in metadata
/// (`[]` is one level, `[[]]` two; metadata's own object and its `custom` map count).
/// Well below serde_json's own limit (128), so whatever is accepted can be decoded.
pub const MAX_JSON_DEPTH: usize = 64;

/// The most streams one append may name (written or only checked). PostgreSQL takes a
/// lock per stream, from a table shared by every session.
pub const MAX_STREAMS_PER_APPEND: usize = 1_000;

/// The most events one append may carry.
pub const MAX_EVENTS_PER_APPEND: usize = 100_000;

/// The most bytes one append may carry: its payloads' JSON text and its metadata's JSON
/// form together (64 MiB).
pub const MAX_APPEND_BYTES: usize = 64 * 1024 * 1024;

/// The highest stream version and global position any backend stores (`i64::MAX`:
/// PostgreSQL's `bigint`). Checkpoints and parked events above it are refused.
pub const MAX_POSITION: u64 = i64::MAX as u64;
