//! A message's content as the JSON text it travels as. A kernel's output is relayed far more
//! often than it is looked into: a 20 MB `stream` message only needs its text copied into each
//! client's frame, never a tree of values built and re-escaped. So content stays the text it
//! arrived as (checked to be UTF-8 JSON when it was decoded), is read through borrowed typed
//! views ([`Content::view`]) by whoever needs a field or two, and is parsed into a [`Value`]
//! only when somebody asks for one (once, then kept). Large content objects also remember where
//! each top-level field is (found by the same scan that checked them), so a relay can copy a
//! multi-MB field out without scanning it again ([`Content::field_json`]).

use std::sync::OnceLock;

use bytes::Bytes;
use bytestring::ByteString;
use serde::Deserialize;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;
use serde_json::value::RawValue;

/// Why a frame is not usable as content.
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    /// Not UTF-8.
    #[error("not UTF-8: {0}")]
    NotUtf8(#[from] std::str::Utf8Error),
    /// Not JSON.
    #[error("not valid JSON: {0}")]
    NotJson(#[from] serde_json::Error),
}

/// The content of a Jupyter message: valid JSON text, with its parsed value made on demand.
#[derive(Clone, Default)]
pub struct Content {
    /// The JSON text (valid UTF-8 and valid JSON: checked when made).
    json: ByteString,
    /// `json` parsed, once somebody asked for it.
    value: OnceLock<Value>,
    /// For large objects with distinct keys: each top-level field's name and the byte range of
    /// its value in `json`.
    fields: Option<Box<[Field]>>,
}

/// A top-level field of indexed content: its name and where its value's JSON text is.
#[derive(Clone, Debug)]
struct Field {
    name: Box<str>,
    start: usize,
    end: usize,
}

impl Content {
    /// Content at least this large (bytes) is indexed by top-level field when decoded.
    pub const INDEXED_FROM: usize = 64 << 10;

    /// Content from a wire frame: checked to be UTF-8 and JSON (one scan, nothing allocated),
    /// and kept as it is (the frame's bytes are not copied).
    pub fn from_frame(frame: Bytes) -> Result<Self, ContentError> {
        let json = ByteString::try_from(frame)?;
        let fields = if json.len() >= Self::INDEXED_FROM && json.trim_start().starts_with('{') {
            index(&json)?
        } else {
            serde_json::from_str::<IgnoredAny>(&json)?;
            None
        };
        Ok(Self {
            json,
            value: OnceLock::new(),
            fields,
        })
    }

    /// Content we build ourselves.
    pub fn from_value(value: Value) -> Self {
        // A `Value` always serialises (its map keys are strings).
        let json = serde_json::to_string(&value).unwrap_or_else(|_| "{}".to_owned());
        Self {
            json: json.into(),
            value: OnceLock::from(value),
            fields: None,
        }
    }

    /// The JSON text.
    pub fn as_json(&self) -> &str {
        &self.json
    }

    /// The JSON text's bytes, shared (for the wire).
    pub fn to_bytes(&self) -> Bytes {
        self.json.as_bytes().clone()
    }

    /// Size of the JSON text in bytes.
    pub fn len(&self) -> usize {
        self.json.len()
    }

    /// Whether the JSON text is empty (only `Content::default()`).
    pub fn is_empty(&self) -> bool {
        self.json.is_empty()
    }

    /// The content as a value, parsed on first use (`null` for the empty default).
    pub fn value(&self) -> &Value {
        self.value
            .get_or_init(|| serde_json::from_str(&self.json).unwrap_or(Value::Null))
    }

    /// A field of the content object, if there.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.value().get(key)
    }

    /// A typed view of the content that may borrow from its text (`&str`, `Cow<str>` and
    /// `&RawValue` fields point into it): for reading a few fields of a large message without
    /// building its whole value.
    pub fn view<'a, T: Deserialize<'a>>(&'a self) -> Result<T, serde_json::Error> {
        serde_json::from_str(&self.json)
    }

    /// Whether the content was indexed by top-level field when decoded (see
    /// [`Content::field_json`]).
    pub fn is_indexed(&self) -> bool {
        self.fields.is_some()
    }

    /// The JSON text of top-level field `name`, as written, when the content was indexed when
    /// decoded (large objects: see [`Content::INDEXED_FROM`]); `None` otherwise, or when there is no
    /// such field.
    pub fn field_json(&self, name: &str) -> Option<&str> {
        let field = self.fields.as_ref()?.iter().find(|f| &*f.name == name)?;
        self.json.get(field.start..field.end)
    }

    /// The content as a raw JSON value borrowed from its text, to be written out as it is.
    pub fn raw(&self) -> Result<&RawValue, serde_json::Error> {
        self.view()
    }
}

/// Checks `json` (an object) and finds where each top-level field's value is, in one scan;
/// `None` when a key repeats (no field is then unambiguous).
fn index(json: &str) -> Result<Option<Box<[Field]>>, serde_json::Error> {
    struct Fields<'j>(&'j str);

    impl<'de> DeserializeSeed<'de> for Fields<'de> {
        type Value = Option<Box<[Field]>>;

        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }
    }

    impl<'de> Visitor<'de> for Fields<'de> {
        type Value = Option<Box<[Field]>>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let base = self.0.as_ptr() as usize;
            let mut fields: Vec<Field> = Vec::new();
            let mut distinct = true;
            while let Some(name) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                let value: &'de RawValue = map.next_value()?;
                let start = value.get().as_ptr() as usize - base;
                distinct &= !fields.iter().any(|f| *f.name == *name);
                fields.push(Field {
                    name: name.into(),
                    start,
                    end: start + value.get().len(),
                });
            }
            Ok(distinct.then(|| fields.into_boxed_slice()))
        }
    }

    let mut de = serde_json::Deserializer::from_str(json);
    let fields = Fields(json).deserialize(&mut de)?;
    de.end()?;
    Ok(fields)
}

impl From<Value> for Content {
    fn from(value: Value) -> Self {
        Self::from_value(value)
    }
}

impl PartialEq for Content {
    fn eq(&self, other: &Self) -> bool {
        self.json == other.json || self.value() == other.value()
    }
}

impl std::fmt::Debug for Content {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const SHOWN: usize = 256;
        let json: &str = &self.json;
        match json.char_indices().nth(SHOWN) {
            None => write!(f, "Content({json})"),
            Some((cut, _)) => write!(f, "Content({}… {} bytes)", &json[..cut], json.len()),
        }
    }
}

/// `content["field"]`, like a [`Value`]'s: `null` when missing.
impl std::ops::Index<&str> for Content {
    type Output = Value;

    fn index(&self, key: &str) -> &Value {
        &self.value()[key]
    }
}

impl serde::Serialize for Content {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.raw() {
            Ok(raw) => raw.serialize(serializer),
            Err(_) => self.value().serialize(serializer),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::borrow::Cow;

    #[test]
    fn a_frame_is_kept_as_it_came_and_parsed_on_demand() {
        let frame = Bytes::from_static(br#"{"name": "stdout", "text": "a\nb"}"#);
        let content = Content::from_frame(frame.clone()).unwrap();
        assert_eq!(content.as_json().as_bytes(), frame.as_ref());
        assert_eq!(content["name"], "stdout");
        assert_eq!(content.get("text"), Some(&json!("a\nb")));
        assert_eq!(content["missing"], Value::Null);

        #[derive(Deserialize)]
        struct Stream<'a> {
            #[serde(borrow)]
            name: Cow<'a, str>,
            #[serde(borrow)]
            text: &'a RawValue,
        }
        let view: Stream = content.view().unwrap();
        assert!(matches!(view.name, Cow::Borrowed("stdout")));
        assert_eq!(view.text.get(), r#""a\nb""#);
    }

    #[test]
    fn bad_frames_are_errors() {
        assert!(matches!(
            Content::from_frame(Bytes::from_static(b"{\"a\": \"\xff\"}")),
            Err(ContentError::NotUtf8(_))
        ));
        assert!(matches!(
            Content::from_frame(Bytes::from_static(b"{not json")),
            Err(ContentError::NotJson(_))
        ));
        assert!(matches!(
            Content::from_frame(Bytes::from_static(b"{} trailing")),
            Err(ContentError::NotJson(_))
        ));
    }

    #[test]
    fn large_objects_know_where_their_fields_are() {
        let text = "line\n".repeat(Content::INDEXED_FROM / 4);
        let json = serde_json::to_string(&json!({"name": "stdout", "text": text})).unwrap();
        let content = Content::from_frame(Bytes::from(json.clone())).unwrap();
        assert_eq!(content.field_json("name"), Some(r#""stdout""#));
        let raw_text = content.field_json("text").unwrap();
        assert_eq!(serde_json::from_str::<String>(raw_text).unwrap(), text);
        assert_eq!(content.field_json("missing"), None);

        // Small content, repeated keys and non-objects are not indexed.
        let small = Content::from_frame(Bytes::from_static(br#"{"name": "stdout"}"#)).unwrap();
        assert_eq!(small.field_json("name"), None);
        let twice = format!(
            r#"{{"text": "a", "text": {}}}"#,
            serde_json::to_string(&text).unwrap()
        );
        let twice = Content::from_frame(Bytes::from(twice)).unwrap();
        assert_eq!(twice.field_json("text"), None);
        let list = format!("[{}]", serde_json::to_string(&text).unwrap());
        assert!(
            Content::from_frame(Bytes::from(list))
                .unwrap()
                .field_json("0")
                .is_none()
        );
        // Broken large content is still refused.
        assert!(Content::from_frame(Bytes::from(json[..json.len() - 1].to_owned())).is_err());
    }

    #[test]
    fn built_content_serialises_as_its_value() {
        let content = Content::from_value(json!({"code": "1+1", "silent": false}));
        assert_eq!(content.as_json(), r#"{"code":"1+1","silent":false}"#);
        assert_eq!(
            serde_json::to_string(&json!({"content": content})).unwrap(),
            r#"{"content":{"code":"1+1","silent":false}}"#
        );
        let same = Content::from_frame(Bytes::from_static(br#"{"silent": false, "code": "1+1"}"#))
            .unwrap();
        assert_eq!(content, same);
    }
}
