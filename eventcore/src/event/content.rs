//! The serde plumbing behind `#[derive(Event)]` on enums: the stored payload of a
//! variant is its *content* (the fields of a struct variant, the value of a newtype
//! variant), without serde's variant tag, because the stored event type name is the tag.
//!
//! Both directions go through the enum's own serde derive, so every serde attribute on
//! fields (`rename`, `default`, `with`, `skip_serializing_if`, ...) keeps working:
//!
//! - [`ContentSerializer`] stands between the enum's `Serialize` and `serde_json`: it
//!   drops the variant tag and writes only the content (`{}` for a unit variant).
//! - [`ContentDeserializer`] stands between the enum's `Deserialize` and `serde_json`:
//!   asked for an enum, it names the variant the stored type name maps to by its
//!   position among the variants serde deserializes (serde's variant identifiers accept
//!   an index as well as a name; the index is immune to `rename`, `rename_all`, `alias`
//!   and to two variants that share a serde name) and lets `serde_json` read the content.
//!   The derive refuses the attributes that would make a position name another variant
//!   (`#[serde(skip...)]` on a variant) or replace the enum's serde impls.
//!
//! Nothing is buffered or copied: the cost is the cost of serde_json on the content.

use serde::Deserialize as _;
use serde::de::{self, DeserializeOwned, DeserializeSeed, EnumAccess, VariantAccess, Visitor};
use serde::ser::{self, Serialize};

/// What the adapters report when the enum's serde impls are not the externally tagged
/// derive `#[derive(Event)]` works with (a hand-written impl, or serde attributes the
/// derive could not see).
const NOT_A_DERIVED_ENUM: &str = "#[derive(Event)] needs the enum's Serialize and Deserialize \
     to be serde's derive in its default (externally tagged) form";

type JsonSerializer<'w> = serde_json::Serializer<&'w mut Vec<u8>>;

/// Serializes the content of `value`'s variant as JSON text into `out`.
pub(crate) fn write_content<T: Serialize + ?Sized>(
    value: &T,
    out: &mut Vec<u8>,
) -> Result<(), serde_json::Error> {
    let mut json = serde_json::Serializer::new(out);
    value.serialize(ContentSerializer { json: &mut json })
}

/// Deserializes the content stored in `payload` as the variant at `index` (its position
/// in the enum).
pub(crate) fn read_content<T: DeserializeOwned>(
    payload: &str,
    index: u64,
) -> Result<T, serde_json::Error> {
    let mut json = serde_json::Deserializer::from_str(payload);
    let value = T::deserialize(ContentDeserializer {
        json: &mut json,
        index,
    })?;
    json.end()?;
    Ok(value)
}

fn not_derived<E: ser::Error>() -> E {
    E::custom(NOT_A_DERIVED_ENUM)
}

/// See the module documentation.
struct ContentSerializer<'a, 'w> {
    json: &'a mut JsonSerializer<'w>,
}

/// Serializes a tuple variant's fields as a JSON array.
struct TupleContent<'a, 'w>(
    serde_json::ser::Compound<'a, &'w mut Vec<u8>, serde_json::ser::CompactFormatter>,
);

/// Serializes a struct variant's fields as a JSON object.
struct StructContent<'a, 'w>(
    serde_json::ser::Compound<'a, &'w mut Vec<u8>, serde_json::ser::CompactFormatter>,
);

macro_rules! refuse {
    ($($method:ident($($arg:ty),*);)*) => {
        $(
            fn $method(self, $(_: $arg),*) -> Result<Self::Ok, Self::Error> {
                Err(not_derived())
            }
        )*
    };
}

impl<'a, 'w> ser::Serializer for ContentSerializer<'a, 'w> {
    type Ok = ();
    type Error = serde_json::Error;
    type SerializeSeq = ser::Impossible<(), serde_json::Error>;
    type SerializeTuple = ser::Impossible<(), serde_json::Error>;
    type SerializeTupleStruct = ser::Impossible<(), serde_json::Error>;
    type SerializeTupleVariant = TupleContent<'a, 'w>;
    type SerializeMap = ser::Impossible<(), serde_json::Error>;
    type SerializeStruct = ser::Impossible<(), serde_json::Error>;
    type SerializeStructVariant = StructContent<'a, 'w>;

    refuse! {
        serialize_bool(bool);
        serialize_i8(i8);
        serialize_i16(i16);
        serialize_i32(i32);
        serialize_i64(i64);
        serialize_u8(u8);
        serialize_u16(u16);
        serialize_u32(u32);
        serialize_u64(u64);
        serialize_f32(f32);
        serialize_f64(f64);
        serialize_char(char);
        serialize_str(&str);
        serialize_bytes(&[u8]);
        serialize_none();
        serialize_unit();
        serialize_unit_struct(&'static str);
    }

    fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> Result<(), serde_json::Error> {
        Err(not_derived())
    }

    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
    ) -> Result<(), serde_json::Error> {
        // A unit variant has no content; `{}` keeps the payload an object, so the variant
        // can grow fields with defaults later and still read its old events.
        ser::SerializeMap::end(ser::Serializer::serialize_map(&mut *self.json, Some(0))?)
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: &T,
    ) -> Result<(), serde_json::Error> {
        Err(not_derived())
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        value: &T,
    ) -> Result<(), serde_json::Error> {
        value.serialize(&mut *self.json)
    }

    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, serde_json::Error> {
        Err(not_derived())
    }

    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, serde_json::Error> {
        Err(not_derived())
    }

    fn serialize_tuple_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleStruct, serde_json::Error> {
        Err(not_derived())
    }

    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        len: usize,
    ) -> Result<Self::SerializeTupleVariant, serde_json::Error> {
        ser::Serializer::serialize_tuple(self.json, len).map(TupleContent)
    }

    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, serde_json::Error> {
        Err(not_derived())
    }

    fn serialize_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStruct, serde_json::Error> {
        Err(not_derived())
    }

    fn serialize_struct_variant(
        self,
        name: &'static str,
        _: u32,
        _: &'static str,
        len: usize,
    ) -> Result<Self::SerializeStructVariant, serde_json::Error> {
        ser::Serializer::serialize_struct(self.json, name, len).map(StructContent)
    }
}

impl ser::SerializeTupleVariant for TupleContent<'_, '_> {
    type Ok = ();
    type Error = serde_json::Error;

    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Self::Error> {
        ser::SerializeTuple::serialize_element(&mut self.0, value)
    }

    fn end(self) -> Result<(), Self::Error> {
        ser::SerializeTuple::end(self.0)
    }
}

impl ser::SerializeStructVariant for StructContent<'_, '_> {
    type Ok = ();
    type Error = serde_json::Error;

    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), Self::Error> {
        ser::SerializeStruct::serialize_field(&mut self.0, key, value)
    }

    fn skip_field(&mut self, key: &'static str) -> Result<(), Self::Error> {
        ser::SerializeStruct::skip_field(&mut self.0, key)
    }

    fn end(self) -> Result<(), Self::Error> {
        ser::SerializeStruct::end(self.0)
    }
}

/// See the module documentation.
struct ContentDeserializer<'a, 'de> {
    json: &'a mut serde_json::Deserializer<serde_json::de::StrRead<'de>>,
    index: u64,
}

impl<'de> de::Deserializer<'de> for ContentDeserializer<'_, 'de> {
    type Error = serde_json::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom(NOT_A_DERIVED_ENUM))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_enum(Variant {
            json: self.json,
            index: self.index,
        })
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
        byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map struct
        identifier ignored_any
    }
}

/// The variant the stored type name chose, with the content still to read.
struct Variant<'a, 'de> {
    json: &'a mut serde_json::Deserializer<serde_json::de::StrRead<'de>>,
    index: u64,
}

impl<'a, 'de> EnumAccess<'de> for Variant<'a, 'de> {
    type Error = serde_json::Error;
    type Variant = Self;

    fn variant_seed<S: DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<(S::Value, Self), Self::Error> {
        let index = de::value::U64Deserializer::<serde_json::Error>::new(self.index);
        Ok((seed.deserialize(index)?, self))
    }
}

impl<'de> VariantAccess<'de> for Variant<'_, 'de> {
    type Error = serde_json::Error;

    fn unit_variant(self) -> Result<(), Self::Error> {
        // `{}` as written; anything else a unit variant is read from (a variant that lost
        // its fields) is passed over, as serde passes over unknown fields.
        de::IgnoredAny::deserialize(&mut *self.json).map(|_| ())
    }

    fn newtype_variant_seed<S: DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<S::Value, Self::Error> {
        seed.deserialize(&mut *self.json)
    }

    fn tuple_variant<V: Visitor<'de>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        de::Deserializer::deserialize_tuple(&mut *self.json, len, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        de::Deserializer::deserialize_struct(&mut *self.json, "", fields, visitor)
    }
}
