//! Edits of a JSON document at pointers that leave everything else as it was, byte for
//! byte: only the objects and arrays on a pointer's path are taken apart (members kept
//! in order), every other value is copied as raw text. (Parsing the whole payload into
//! a `serde_json::Value` would round integers beyond 2^53 and reorder keys: a redaction
//! must not silently change the fields it does not touch.)

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// One step of a JSON pointer (RFC 6901), with `*` standing for every member of an
/// object and every element of an array.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Any,
    Key(String),
}

/// A JSON pointer to the values a redaction or a removal applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pointer(Vec<Token>);

impl Pointer {
    /// Parses `/a/b/0`, `/items/*/email` (`~1` is `/`, `~0` is `~`; a token `*` is
    /// every member or element).
    pub(crate) fn parse(pointer: &str) -> Result<Self, String> {
        let Some(rest) = pointer.strip_prefix('/') else {
            return Err(format!(
                "JSON pointer {pointer:?} does not start with `/` (the whole document cannot be \
                 redacted or removed)"
            ));
        };
        let mut tokens = Vec::new();
        for raw in rest.split('/') {
            if raw == "*" {
                tokens.push(Token::Any);
                continue;
            }
            let mut token = String::with_capacity(raw.len());
            let mut chars = raw.chars();
            while let Some(c) = chars.next() {
                if c == '~' {
                    match chars.next() {
                        Some('0') => token.push('~'),
                        Some('1') => token.push('/'),
                        _ => {
                            return Err(format!(
                                "JSON pointer {pointer:?} has a `~` not followed by 0 or 1"
                            ));
                        }
                    }
                } else {
                    token.push(c);
                }
            }
            tokens.push(Token::Key(token));
        }
        Ok(Pointer(tokens))
    }
}

/// What to do at the values a pointer reaches.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Op<'a> {
    /// Replace each with this JSON text.
    Replace(&'a str),
    /// Remove each (the member from its object, the element from its array).
    Remove,
}

enum Edit {
    Same,
    Replaced(String),
    Removed,
}

/// `document` with `op` applied at every value `pointer` reaches; `None` when it
/// reaches none (a missing field is left missing).
pub(crate) fn apply(
    document: &str,
    pointer: &Pointer,
    op: Op<'_>,
) -> Result<Option<String>, serde_json::Error> {
    Ok(match edit(document, &pointer.0, op)? {
        Edit::Same => None,
        Edit::Replaced(text) => Some(text),
        // A pointer has at least one token: the root itself is never removed.
        Edit::Removed => None,
    })
}

fn edit(raw: &str, tokens: &[Token], op: Op<'_>) -> Result<Edit, serde_json::Error> {
    let Some((first, rest)) = tokens.split_first() else {
        return Ok(match op {
            Op::Replace(text) => Edit::Replaced(text.to_owned()),
            Op::Remove => Edit::Removed,
        });
    };
    match raw.trim_start().as_bytes().first() {
        Some(b'{') => {
            let Members(members) = serde_json::from_str(raw)?;
            let mut changed = false;
            let mut kept: Vec<(String, String)> = Vec::with_capacity(members.len());
            for (key, value) in members {
                let reached = match first {
                    Token::Any => true,
                    Token::Key(wanted) => *wanted == key,
                };
                if !reached {
                    kept.push((key, value.get().to_owned()));
                    continue;
                }
                match edit(value.get(), rest, op)? {
                    Edit::Same => kept.push((key, value.get().to_owned())),
                    Edit::Replaced(text) => {
                        changed = true;
                        kept.push((key, text));
                    }
                    Edit::Removed => changed = true,
                }
            }
            if !changed {
                return Ok(Edit::Same);
            }
            let mut out = String::from("{");
            for (n, (key, value)) in kept.iter().enumerate() {
                if n > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::to_string(key)?);
                out.push(':');
                out.push_str(value);
            }
            out.push('}');
            Ok(Edit::Replaced(out))
        }
        Some(b'[') => {
            let elements: Vec<Box<RawValue>> = serde_json::from_str(raw)?;
            let index = match first {
                Token::Any => None,
                Token::Key(key) => match array_index(key) {
                    Some(index) if index < elements.len() => Some(index),
                    // Not an index, or past the end: nothing there.
                    _ => return Ok(Edit::Same),
                },
            };
            let mut changed = false;
            let mut kept: Vec<String> = Vec::with_capacity(elements.len());
            for (n, element) in elements.iter().enumerate() {
                if index.is_some_and(|index| index != n) {
                    kept.push(element.get().to_owned());
                    continue;
                }
                match edit(element.get(), rest, op)? {
                    Edit::Same => kept.push(element.get().to_owned()),
                    Edit::Replaced(text) => {
                        changed = true;
                        kept.push(text);
                    }
                    Edit::Removed => changed = true,
                }
            }
            if !changed {
                return Ok(Edit::Same);
            }
            Ok(Edit::Replaced(format!("[{}]", kept.join(","))))
        }
        // A scalar with steps left: nothing there.
        _ => Ok(Edit::Same),
    }
}

/// An array index as RFC 6901 writes it: `0`, or digits without a leading zero.
fn array_index(token: &str) -> Option<usize> {
    let canonical = token == "0"
        || (!token.is_empty()
            && !token.starts_with('0')
            && token.bytes().all(|b| b.is_ascii_digit()));
    if canonical { token.parse().ok() } else { None }
}

/// An object's members, in order, with their values as raw text.
struct Members(Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Ordered;
        impl<'de> Visitor<'de> for Ordered {
            type Value = Members;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some(member) = map.next_entry::<String, Box<RawValue>>()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(Ordered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redact(document: &str, pointer: &str) -> Option<String> {
        let pointer = Pointer::parse(pointer).expect("a pointer");
        apply(document, &pointer, Op::Replace(r#""***""#)).expect("JSON")
    }

    fn remove(document: &str, pointer: &str) -> Option<String> {
        let pointer = Pointer::parse(pointer).expect("a pointer");
        apply(document, &pointer, Op::Remove).expect("JSON")
    }

    #[test]
    fn a_nested_field_is_redacted_and_everything_else_kept_as_written() {
        let document =
            r#"{"id": 12345678901234567890123, "user": {"email": "a@b.c", "age": 1.10}, "z": 1}"#;
        assert_eq!(
            redact(document, "/user/email").as_deref(),
            Some(r#"{"id":12345678901234567890123,"user":{"email":"***","age":1.10},"z":1}"#),
            "the big integer and the 1.10 are the text as written, the key order kept"
        );
    }

    #[test]
    fn every_element_of_an_array_and_one_by_index() {
        let document = r#"{"contacts": [{"email": "a"}, {"phone": 1}, {"email": "c"}]}"#;
        assert_eq!(
            redact(document, "/contacts/*/email").as_deref(),
            Some(r#"{"contacts":[{"email":"***"},{"phone": 1},{"email":"***"}]}"#)
        );
        assert_eq!(
            redact(document, "/contacts/2/email").as_deref(),
            Some(r#"{"contacts":[{"email": "a"},{"phone": 1},{"email":"***"}]}"#)
        );
        assert_eq!(
            remove(document, "/contacts/0").as_deref(),
            Some(r#"{"contacts":[{"phone": 1},{"email": "c"}]}"#)
        );
        assert_eq!(
            remove(document, "/contacts/*/email").as_deref(),
            Some(r#"{"contacts":[{},{"phone": 1},{}]}"#)
        );
    }

    #[test]
    fn a_missing_field_is_left_missing() {
        let document = r#"{"user": {"name": "x"}, "list": [1, 2]}"#;
        for pointer in [
            "/email",
            "/user/email",
            "/user/name/first",
            "/list/2",
            "/list/01",
            "/list/x",
            "/list/*/a",
        ] {
            assert_eq!(redact(document, pointer), None, "{pointer}");
            assert_eq!(remove(document, pointer), None, "{pointer}");
        }
    }

    #[test]
    fn escaped_tokens_and_wildcards_over_objects() {
        let document = r#"{"a/b": {"x": 1, "y": 2}, "m~n": 3}"#;
        assert_eq!(
            redact(document, "/a~1b/*").as_deref(),
            Some(r#"{"a/b":{"x":"***","y":"***"},"m~n":3}"#)
        );
        assert_eq!(
            remove(document, "/m~0n").as_deref(),
            Some(r#"{"a/b":{"x": 1, "y": 2}}"#)
        );
    }

    #[test]
    fn bad_pointers_are_refused() {
        assert!(Pointer::parse("").is_err());
        assert!(Pointer::parse("email").is_err());
        assert!(Pointer::parse("/a~2").is_err());
        assert!(Pointer::parse("/a~").is_err());
    }
}
