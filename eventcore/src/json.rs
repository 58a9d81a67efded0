//! The JSON half of the rule at the door (`crate::limits`): one pass over a document
//! that finds everything a backend could not store or a reader could not read back.

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{self, Serialize};

use crate::error::{JsonProblem, truncate_for_error};
use crate::limits::MAX_JSON_DEPTH;

/// Checks JSON text against the rule: at most `max_bytes` long, at most
/// [`MAX_JSON_DEPTH`] levels of arrays and objects (`depth_used` levels are already
/// taken by an enclosing document), unique keys, no NUL, no lone surrogate, numbers in
/// the range of an `f64`, nothing after the value.
pub(crate) fn check_document(
    json: &str,
    max_bytes: usize,
    depth_used: usize,
) -> Result<(), JsonProblem> {
    if json.len() > max_bytes {
        return Err(JsonProblem::TooLarge {
            len: json.len(),
            max: max_bytes,
        });
    }
    let found = Cell::new(None);
    let mut deserializer = serde_json::Deserializer::from_str(json);
    let checked = Node {
        depth: depth_used,
        found: &found,
    }
    .deserialize(&mut deserializer)
    .and_then(|()| deserializer.end());
    match checked {
        Ok(()) => Ok(()),
        Err(error) => Err(found.take().unwrap_or_else(|| JsonProblem::NotJson {
            message: error.to_string(),
        })),
    }
}

/// One value of the document, `depth` levels down.
#[derive(Clone, Copy)]
struct Node<'f> {
    depth: usize,
    found: &'f Cell<Option<JsonProblem>>,
}

impl Node<'_> {
    fn refuse<E: de::Error>(&self, problem: JsonProblem) -> E {
        let message = problem.to_string();
        self.found.set(Some(problem));
        E::custom(message)
    }

    fn check_str<E: de::Error>(&self, value: &str) -> Result<(), E> {
        if value.contains('\0') {
            return Err(self.refuse(JsonProblem::NulCharacter));
        }
        Ok(())
    }

    fn deeper<E: de::Error>(&self) -> Result<Node<'_>, E> {
        if self.depth >= MAX_JSON_DEPTH {
            return Err(self.refuse(JsonProblem::TooDeep {
                max: MAX_JSON_DEPTH,
            }));
        }
        Ok(Node {
            depth: self.depth + 1,
            found: self.found,
        })
    }
}

impl<'de> DeserializeSeed<'de> for Node<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<(), E> {
        // serde_json refuses numbers out of range itself; keep the rule explicit.
        if !value.is_finite() {
            return Err(self.refuse(JsonProblem::NotFinite));
        }
        Ok(())
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<(), E> {
        self.check_str(value)
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let inner = self.deeper()?;
        while seq.next_element_seed(inner)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let inner = self.deeper()?;
        // Most objects are small: their keys stay on the stack and a linear search beats
        // hashing them; a larger object moves them into a set.
        const INLINE: usize = 8;
        let mut inline: [Option<Key<'de>>; INLINE] = Default::default();
        let mut count = 0usize;
        let mut index: Option<std::collections::HashSet<Key<'de>>> = None;
        while let Some(key) = map.next_key_seed(KeySeed(inner))? {
            let repeated = match &mut index {
                Some(index) => !index.insert(key.clone()),
                None if count < INLINE => {
                    let repeated = inline[..count].iter().flatten().any(|k| *k == key);
                    inline[count] = Some(key.clone());
                    count += 1;
                    repeated
                }
                None => {
                    let mut set: std::collections::HashSet<Key<'de>> =
                        inline.iter_mut().filter_map(Option::take).collect();
                    let repeated = !set.insert(key.clone());
                    index = Some(set);
                    repeated
                }
            };
            if repeated {
                return Err(self.refuse(JsonProblem::DuplicateKey {
                    key: truncate_for_error(key.as_str()),
                }));
            }
            map.next_value_seed(inner)?;
        }
        Ok(())
    }
}

/// An object key, borrowed from the text when it has no escapes. Keys compare by
/// their text, however they were spelled.
#[derive(Clone)]
enum Key<'de> {
    Borrowed(&'de str),
    Owned(String),
}

impl Key<'_> {
    fn as_str(&self) -> &str {
        match self {
            Key::Borrowed(key) => key,
            Key::Owned(key) => key,
        }
    }
}

impl PartialEq for Key<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Key<'_> {}

impl std::hash::Hash for Key<'_> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

struct KeySeed<'f>(Node<'f>);

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Key<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Key<'de>, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = Key<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_borrowed_str<E: de::Error>(self, key: &'de str) -> Result<Key<'de>, E> {
        self.0.check_str(key)?;
        Ok(Key::Borrowed(key))
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Key<'de>, E> {
        self.0.check_str(key)?;
        Ok(Key::Owned(key.to_owned()))
    }
}

/// Whether serializing `value` meets a NaN or an infinite float anywhere: serde_json
/// writes `null` for those, so callers ask only when the text holds a `null`.
pub(crate) fn has_non_finite<T: Serialize + ?Sized>(value: &T) -> bool {
    matches!(value.serialize(FiniteCheck), Err(Stop::NonFinite))
}

/// Why [`FiniteCheck`] stopped.
#[derive(Debug)]
enum Stop {
    NonFinite,
    /// The value's own serializer failed (it succeeded the first time; not ours to judge).
    Other,
}

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("stopped")
    }
}

impl std::error::Error for Stop {}

impl ser::Error for Stop {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Stop::Other
    }
}

/// A serializer that writes nothing and stops at the first NaN or infinite float.
#[derive(Clone, Copy)]
struct FiniteCheck;

type Checked = Result<(), Stop>;

fn finite(value: f64) -> Checked {
    if value.is_finite() {
        Ok(())
    } else {
        Err(Stop::NonFinite)
    }
}

impl ser::Serializer for FiniteCheck {
    type Ok = ();
    type Error = Stop;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Self;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;

    fn serialize_bool(self, _: bool) -> Checked {
        Ok(())
    }
    fn serialize_i8(self, _: i8) -> Checked {
        Ok(())
    }
    fn serialize_i16(self, _: i16) -> Checked {
        Ok(())
    }
    fn serialize_i32(self, _: i32) -> Checked {
        Ok(())
    }
    fn serialize_i64(self, _: i64) -> Checked {
        Ok(())
    }
    fn serialize_i128(self, _: i128) -> Checked {
        Ok(())
    }
    fn serialize_u8(self, _: u8) -> Checked {
        Ok(())
    }
    fn serialize_u16(self, _: u16) -> Checked {
        Ok(())
    }
    fn serialize_u32(self, _: u32) -> Checked {
        Ok(())
    }
    fn serialize_u64(self, _: u64) -> Checked {
        Ok(())
    }
    fn serialize_u128(self, _: u128) -> Checked {
        Ok(())
    }
    fn serialize_f32(self, value: f32) -> Checked {
        finite(f64::from(value))
    }
    fn serialize_f64(self, value: f64) -> Checked {
        finite(value)
    }
    fn serialize_char(self, _: char) -> Checked {
        Ok(())
    }
    fn serialize_str(self, _: &str) -> Checked {
        Ok(())
    }
    fn serialize_bytes(self, _: &[u8]) -> Checked {
        Ok(())
    }
    fn serialize_none(self) -> Checked {
        Ok(())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Checked {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Checked {
        Ok(())
    }
    fn serialize_unit_struct(self, _: &'static str) -> Checked {
        Ok(())
    }
    fn serialize_unit_variant(self, _: &'static str, _: u32, _: &'static str) -> Checked {
        Ok(())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Checked {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        value: &T,
    ) -> Checked {
        value.serialize(self)
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Self, Stop> {
        Ok(self)
    }
    fn serialize_tuple(self, _: usize) -> Result<Self, Stop> {
        Ok(self)
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Self, Stop> {
        Ok(self)
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self, Stop> {
        Ok(self)
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self, Stop> {
        Ok(self)
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self, Stop> {
        Ok(self)
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self, Stop> {
        Ok(self)
    }
}

/// The compound parts of [`FiniteCheck`]: each element, field or entry is checked in
/// turn; the compound itself adds nothing.
macro_rules! check_each {
    ($($trait:ident :: $method:ident ($($label:ty)?)),* $(,)?) => {$(
        impl ser::$trait for FiniteCheck {
            type Ok = ();
            type Error = Stop;
            fn $method<T: Serialize + ?Sized>(&mut self, $(_: $label,)? value: &T) -> Checked {
                value.serialize(*self)
            }
            fn end(self) -> Checked {
                Ok(())
            }
        }
    )*};
}

check_each! {
    SerializeSeq::serialize_element(),
    SerializeTuple::serialize_element(),
    SerializeTupleStruct::serialize_field(),
    SerializeTupleVariant::serialize_field(),
    SerializeStruct::serialize_field(&'static str),
    SerializeStructVariant::serialize_field(&'static str),
}

impl ser::SerializeMap for FiniteCheck {
    type Ok = ();
    type Error = Stop;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Checked {
        key.serialize(*self)
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Checked {
        value.serialize(*self)
    }
    fn end(self) -> Checked {
        Ok(())
    }
}

/// Counts the bytes of a value's JSON form without keeping them.
#[derive(Default)]
pub(crate) struct ByteCount(pub(crate) usize);

impl std::io::Write for ByteCount {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0 = self.0.saturating_add(bytes.len());
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(json: &str) -> Result<(), JsonProblem> {
        check_document(json, usize::MAX, 0)
    }

    fn nested(depth: usize) -> String {
        format!("{}{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn accepts_ordinary_documents() {
        for json in [
            "null",
            "1",
            "-0.0",
            "1.7976931348623157e308",
            "18446744073709551615",
            "\"é\\u00e9\\ud83d\\ude00\"",
            "{\"a\":[1,2,{\"b\":null}],\"c\":true}",
            " { } ",
        ] {
            assert_eq!(check(json), Ok(()), "{json}");
        }
        assert_eq!(check(&nested(MAX_JSON_DEPTH)), Ok(()));
    }

    #[test]
    fn refuses_what_cannot_be_read_back() {
        assert_eq!(
            check(&nested(MAX_JSON_DEPTH + 1)),
            Err(JsonProblem::TooDeep {
                max: MAX_JSON_DEPTH
            })
        );
        assert_eq!(
            check_document(&nested(MAX_JSON_DEPTH - 1), usize::MAX, 2),
            Err(JsonProblem::TooDeep {
                max: MAX_JSON_DEPTH
            })
        );
        assert_eq!(
            check("{\"a\":1,\"a\":2}"),
            Err(JsonProblem::DuplicateKey { key: "a".into() })
        );
        // The same key spelled with an escape is the same key.
        assert_eq!(
            check("{\"a\":1,\"\\u0061\":2}"),
            Err(JsonProblem::DuplicateKey { key: "a".into() })
        );
        let many: Vec<String> = (0..40).map(|i| format!("\"k{i}\":{i}")).collect();
        assert_eq!(check(&format!("{{{}}}", many.join(","))), Ok(()));
        assert_eq!(
            check(&format!("{{{},\"k3\":0}}", many.join(","))),
            Err(JsonProblem::DuplicateKey { key: "k3".into() })
        );
        assert_eq!(check("\"a\\u0000b\""), Err(JsonProblem::NulCharacter));
        assert_eq!(check("{\"a\\u0000\":1}"), Err(JsonProblem::NulCharacter));
        assert_eq!(check("\"a\\\\u0000b\""), Ok(()), "an escaped backslash");
        for json in ["\"\\ud800\"", "1e400", "-1e400", "[1,", "{} {}", "NaN", ""] {
            assert!(
                matches!(check(json), Err(JsonProblem::NotJson { .. })),
                "{json}: {:?}",
                check(json)
            );
        }
        assert_eq!(
            check_document("[1,2]", 4, 0),
            Err(JsonProblem::TooLarge { len: 5, max: 4 })
        );
    }

    #[test]
    fn stored_text_must_at_least_be_readable_json() {
        use crate::{Error, EventPayload};
        for text in ["not json", "", "{\"a\":", "[1] [2]"] {
            assert!(
                matches!(
                    EventPayload::from_stored_json(text),
                    Err(Error::InvalidPayload {
                        problem: JsonProblem::NotJson { .. }
                    })
                ),
                "{text:?}"
            );
        }
        // Stored rows written before a limit existed stay readable.
        let deep = nested(MAX_JSON_DEPTH + 10);
        assert!(EventPayload::from_json(deep.as_str()).is_err());
        assert_eq!(
            EventPayload::from_stored_json(deep.as_str())
                .expect("readable")
                .as_str(),
            deep
        );
    }

    #[test]
    fn finds_non_finite_floats_anywhere() {
        #[derive(serde::Serialize)]
        struct Reading {
            values: Vec<Option<f64>>,
        }
        assert!(!has_non_finite(&Reading {
            values: vec![Some(1.0), None]
        }));
        assert!(has_non_finite(&Reading {
            values: vec![None, Some(f64::NAN)]
        }));
        assert!(has_non_finite(&std::collections::BTreeMap::from([(
            "x",
            f32::INFINITY
        )])));
        assert!(has_non_finite(&f64::NEG_INFINITY));
    }
}
