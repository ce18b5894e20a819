//! The Jupyter WebSocket message formats: JSON text frames with a `channel` field (what Kernel
//! Gateway and jupyter_server speak by default), the legacy binary frame for messages with
//! buffers, and the `v1.kernel.websocket.jupyter.org` binary subprotocol. Messages reach the
//! kernel unsigned from clients; the session signs them. Every malformed frame is an error that
//! says what was wrong, never a panic.

use bytes::Bytes;
use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};
use serde_json::{Map, Value};

use crate::session::{Channel, Header, Message};

/// The binary subprotocol's name.
pub const V1_PROTOCOL: &str = "v1.kernel.websocket.jupyter.org";

/// What was wrong with a client's frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// Not JSON, or JSON that is not an object.
    #[error("the frame is not a JSON message object: {0}")]
    NotJson(String),
    /// A required part is missing or has the wrong shape.
    #[error("invalid {part}: {reason}")]
    Invalid {
        /// header, parent_header, metadata, content or channel.
        part: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// A channel clients may not send on (iopub, heartbeat) or that does not exist.
    #[error("unknown or read-only channel {0:?}: send on shell, control or stdin")]
    Channel(String),
    /// A binary frame whose offsets do not fit the frame.
    #[error("malformed binary frame: {0}")]
    Binary(String),
}

/// A client's message, decoded: where it goes and what it is.
#[derive(Debug)]
pub struct ClientFrame {
    /// shell, control or stdin.
    pub channel: Channel,
    /// The message, with the client's own header.
    pub msg: Message,
}

fn channel_named(name: &str) -> Result<Channel, FrameError> {
    match name {
        "shell" => Ok(Channel::Shell),
        "control" => Ok(Channel::Control),
        "stdin" => Ok(Channel::Stdin),
        other => Err(FrameError::Channel(other.chars().take(64).collect())),
    }
}

fn header_from(part: &'static str, value: Value) -> Result<Option<Header>, FrameError> {
    match value {
        Value::Null => Ok(None),
        Value::Object(ref map) if map.is_empty() => Ok(None),
        Value::Object(_) => {
            serde_json::from_value(value)
                .map(Some)
                .map_err(|e| FrameError::Invalid {
                    part,
                    reason: e.to_string(),
                })
        }
        _ => Err(FrameError::Invalid {
            part,
            reason: "not an object".into(),
        }),
    }
}

fn object_or_empty(part: &'static str, value: Option<Value>) -> Result<Value, FrameError> {
    match value {
        None | Some(Value::Null) => Ok(Value::Object(Map::new())),
        Some(v @ Value::Object(_)) => Ok(v),
        Some(_) => Err(FrameError::Invalid {
            part,
            reason: "not an object".into(),
        }),
    }
}

/// Builds a message from its parts, checking each.
fn assemble(
    channel: Channel,
    header: Value,
    parent: Value,
    metadata: Option<Value>,
    content: Option<Value>,
    buffers: Vec<Bytes>,
) -> Result<ClientFrame, FrameError> {
    let header = header_from("header", header)?.ok_or_else(|| FrameError::Invalid {
        part: "header",
        reason: "missing (needs msg_id, msg_type, session)".into(),
    })?;
    if header.msg_id.is_empty() || header.msg_type.is_empty() {
        return Err(FrameError::Invalid {
            part: "header",
            reason: "msg_id and msg_type must not be empty".into(),
        });
    }
    let parent_header = header_from("parent_header", parent)?;
    Ok(ClientFrame {
        channel,
        msg: Message {
            identities: Vec::new(),
            header,
            parent_header,
            metadata: object_or_empty("metadata", metadata)?,
            content: object_or_empty("content", content)?.into(),
            buffers,
        },
    })
}

/// Decodes a JSON text frame (`{channel, header, parent_header, metadata, content}`).
pub fn decode_text(text: &str) -> Result<ClientFrame, FrameError> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| FrameError::NotJson(e.to_string()))?;
    let Value::Object(mut map) = value else {
        return Err(FrameError::NotJson("not an object".into()));
    };
    decode_object(&mut map, Vec::new())
}

fn decode_object(
    map: &mut Map<String, Value>,
    buffers: Vec<Bytes>,
) -> Result<ClientFrame, FrameError> {
    let channel = match map.remove("channel") {
        Some(Value::String(name)) => channel_named(&name)?,
        Some(_) => {
            return Err(FrameError::Invalid {
                part: "channel",
                reason: "not a string".into(),
            });
        }
        None => {
            return Err(FrameError::Invalid {
                part: "channel",
                reason: "missing".into(),
            });
        }
    };
    assemble(
        channel,
        map.remove("header").unwrap_or(Value::Null),
        map.remove("parent_header").unwrap_or(Value::Null),
        map.remove("metadata"),
        map.remove("content"),
        buffers,
    )
}

/// Reads a `u64` (little-endian) or `u32` (big-endian) offset table entry.
fn read_offset(frame: &[u8], at: usize, width: usize) -> Result<usize, FrameError> {
    let bytes = frame
        .get(at..at + width)
        .ok_or_else(|| FrameError::Binary(format!("frame ends inside its offset table at {at}")))?;
    let value = if width == 8 {
        let mut b = [0u8; 8];
        b.copy_from_slice(bytes);
        u64::from_le_bytes(b)
    } else {
        let mut b = [0u8; 4];
        b.copy_from_slice(bytes);
        u64::from(u32::from_be_bytes(b))
    };
    usize::try_from(value).map_err(|_| FrameError::Binary(format!("offset {value} too large")))
}

/// Splits a frame by an offset table: `count` entries of `width` bytes after a count field of
/// the same width; each part runs from its offset to the next (the last to the frame's end when
/// `last_to_end`).
fn split_parts(frame: &[u8], width: usize, last_to_end: bool) -> Result<Vec<&[u8]>, FrameError> {
    const MAX_PARTS: usize = 4096;
    let count = read_offset(frame, 0, width)?;
    if count == 0 || count > MAX_PARTS {
        return Err(FrameError::Binary(format!(
            "{count} offsets (1..={MAX_PARTS} allowed)"
        )));
    }
    let mut offsets = Vec::with_capacity(count + 1);
    for i in 0..count {
        offsets.push(read_offset(frame, width * (i + 1), width)?);
    }
    if last_to_end {
        offsets.push(frame.len());
    }
    let table_end = width * (count + 1);
    let mut parts = Vec::with_capacity(offsets.len());
    for pair in offsets.windows(2) {
        let (start, end) = (pair[0], pair[1]);
        if start < table_end || start > end || end > frame.len() {
            return Err(FrameError::Binary(format!(
                "part {start}..{end} outside the frame (length {}, data from {table_end})",
                frame.len()
            )));
        }
        parts.push(&frame[start..end]);
    }
    Ok(parts)
}

fn json_part(part: &'static str, bytes: &[u8]) -> Result<Value, FrameError> {
    serde_json::from_slice(bytes).map_err(|e| FrameError::Invalid {
        part,
        reason: e.to_string(),
    })
}

/// Decodes a `v1.kernel.websocket.jupyter.org` binary frame.
pub fn decode_v1(frame: &[u8]) -> Result<ClientFrame, FrameError> {
    let parts = split_parts(frame, 8, false)?;
    let [channel, header, parent, metadata, content, buffers @ ..] = parts.as_slice() else {
        return Err(FrameError::Binary(format!(
            "{} parts; channel, header, parent_header, metadata and content are needed",
            parts.len()
        )));
    };
    let channel = std::str::from_utf8(channel)
        .map_err(|_| FrameError::Binary("channel is not UTF-8".into()))?;
    assemble(
        channel_named(channel)?,
        json_part("header", header)?,
        json_part("parent_header", parent)?,
        Some(json_part("metadata", metadata)?),
        Some(json_part("content", content)?),
        buffers.iter().map(|b| Bytes::copy_from_slice(b)).collect(),
    )
}

/// Decodes a legacy binary frame: JSON message (with `channel`) followed by its buffers.
pub fn decode_legacy_binary(frame: &[u8]) -> Result<ClientFrame, FrameError> {
    let parts = split_parts(frame, 4, true)?;
    let [json, buffers @ ..] = parts.as_slice() else {
        return Err(FrameError::Binary("no message part".into()));
    };
    let value: Value =
        serde_json::from_slice(json).map_err(|e| FrameError::NotJson(e.to_string()))?;
    let Value::Object(mut map) = value else {
        return Err(FrameError::NotJson("not an object".into()));
    };
    decode_object(
        &mut map,
        buffers.iter().map(|b| Bytes::copy_from_slice(b)).collect(),
    )
}

/// A parent header as Jupyter clients read it: `{}` when there is none.
struct ParentJson<'a>(Option<&'a Header>);

impl Serialize for ParentJson<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Some(header) => header.serialize(serializer),
            None => serializer.serialize_map(Some(0))?.end(),
        }
    }
}

/// The JSON object of a kernel message for Jupyter clients but its content, borrowing every part
/// from the message (see [`frame_json`]).
#[derive(Serialize)]
struct JsonFrame<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    buffers: Option<[(); 0]>,
    channel: &'static str,
    header: &'a Header,
    metadata: &'a Value,
    msg_id: &'a str,
    msg_type: &'a str,
    parent_header: ParentJson<'a>,
}

impl<'a> JsonFrame<'a> {
    fn new(channel: Channel, msg: &'a Message, with_buffers: bool) -> Self {
        Self {
            buffers: with_buffers.then_some([]),
            channel: channel.as_str(),
            header: &msg.header,
            metadata: &msg.metadata,
            msg_id: &msg.header.msg_id,
            msg_type: &msg.header.msg_type,
            parent_header: ParentJson(msg.parent_header.as_ref()),
        }
    }
}

/// A kernel message's JSON object for Jupyter clients: the content's JSON text copied in as it
/// is (it was checked to be JSON when it arrived; a multi-MB stream is neither parsed nor
/// re-escaped), the rest serialised straight from the message.
fn frame_json(channel: Channel, msg: &Message, with_buffers: bool) -> String {
    let rest =
        serde_json::to_string(&JsonFrame::new(channel, msg, with_buffers)).unwrap_or_else(|e| {
            // Cannot happen for these types; say so rather than panic.
            tracing::warn!(error = %e, "cannot encode a kernel message");
            String::from("{}")
        });
    let content = match msg.content.as_json() {
        "" => "{}",
        json => json,
    };
    let mut out = String::with_capacity(content.len() + rest.len() + 16);
    out.push_str("{\"content\":");
    out.push_str(content);
    match rest.strip_prefix('{') {
        Some("}") | None => out.push('}'),
        Some(fields) => {
            out.push(',');
            out.push_str(fields);
        }
    }
    out
}

/// A kernel message as the JSON text Jupyter clients read (buffers left out; see
/// [`encode_legacy_binary`] for messages that have them), serialised without building a value.
pub fn to_json_text(channel: Channel, msg: &Message) -> String {
    frame_json(channel, msg, true)
}

/// The legacy binary frame of a message with buffers.
pub fn encode_legacy_binary(channel: Channel, msg: &Message) -> Vec<u8> {
    let json = frame_json(channel, msg, false).into_bytes();
    let parts: Vec<&[u8]> = std::iter::once(json.as_slice())
        .chain(msg.buffers.iter().map(|b| b.as_ref()))
        .collect();
    let mut offsets = Vec::with_capacity(parts.len());
    let mut at = 4 * (parts.len() + 1);
    for part in &parts {
        offsets.push(at);
        at += part.len();
    }
    let mut frame = Vec::with_capacity(at);
    // Offsets beyond u32 cannot be expressed in this format; such messages are far over any
    // WebSocket frame limit anyway.
    frame.extend_from_slice(&(parts.len() as u32).to_be_bytes());
    for offset in offsets {
        frame.extend_from_slice(&(offset as u32).to_be_bytes());
    }
    for part in parts {
        frame.extend_from_slice(part);
    }
    frame
}

/// A message as a `v1.kernel.websocket.jupyter.org` binary frame.
pub fn encode_v1(channel: Channel, msg: &Message) -> Vec<u8> {
    let json_parts = [
        serde_json::to_vec(&msg.header).unwrap_or_else(|_| b"{}".to_vec()),
        serde_json::to_vec(&ParentJson(msg.parent_header.as_ref()))
            .unwrap_or_else(|_| b"{}".to_vec()),
        serde_json::to_vec(&msg.metadata).unwrap_or_else(|_| b"{}".to_vec()),
        msg.content.as_json().as_bytes().to_vec(),
    ];
    let channel = channel.as_str().as_bytes();
    let parts: Vec<&[u8]> = std::iter::once(channel)
        .chain(json_parts.iter().map(Vec::as_slice))
        .chain(msg.buffers.iter().map(|b| b.as_ref()))
        .collect();
    // Offsets: the start of every part, then the end of the last one.
    let count = parts.len() + 1;
    let mut at = 8 * (count + 1);
    let mut frame = Vec::new();
    frame.extend_from_slice(&(count as u64).to_le_bytes());
    for part in &parts {
        frame.extend_from_slice(&(at as u64).to_le_bytes());
        at += part.len();
    }
    frame.extend_from_slice(&(at as u64).to_le_bytes());
    for part in parts {
        frame.extend_from_slice(part);
    }
    frame
}

/// A message kernelbox itself sends to a Jupyter client (synthetic status, replies to requests
/// it answers itself), with `parent` as its parent header.
pub fn synthetic(msg_type: &str, parent: Option<&Header>, content: Value) -> Message {
    let mut msg = Message::new(msg_type, "kernelbox", content);
    msg.parent_header = parent.cloned();
    msg
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The JSON object Jupyter clients read, built the plain way: what [`to_json_text`] and
    /// [`encode_legacy_binary`] must write.
    fn to_json(channel: Channel, msg: &Message) -> Value {
        json!({
            "channel": channel.as_str(),
            "header": msg.header,
            "msg_id": msg.header.msg_id,
            "msg_type": msg.header.msg_type,
            "parent_header": ParentJson(msg.parent_header.as_ref()),
            "metadata": msg.metadata,
            "content": msg.content,
            "buffers": [],
        })
    }

    fn request() -> Message {
        let mut msg = Message::new("execute_request", "s1", json!({"code": "1+1"}));
        msg.buffers = vec![Bytes::from_static(b"\x00\x01binary")];
        msg
    }

    #[test]
    fn v1_frames_round_trip_with_buffers() {
        let msg = request();
        let frame = encode_v1(Channel::Shell, &msg);
        let decoded = decode_v1(&frame).expect("decodes");
        assert_eq!(decoded.channel, Channel::Shell);
        assert_eq!(decoded.msg.header, msg.header);
        assert_eq!(decoded.msg.content, msg.content);
        assert_eq!(decoded.msg.buffers, msg.buffers);
    }

    #[test]
    fn json_text_is_the_to_json_object() {
        let mut msg = Message::new("stream", "k", json!({"name": "stdout", "text": "a\n\"b\""}));
        for parent in [None, Some(Header::new("execute_request", "s1", "u"))] {
            msg.parent_header = parent;
            let text: Value = serde_json::from_str(&to_json_text(Channel::IoPub, &msg)).unwrap();
            assert_eq!(text, to_json(Channel::IoPub, &msg));
        }
        msg.buffers = vec![Bytes::from_static(b"buf")];
        let frame = encode_legacy_binary(Channel::IoPub, &msg);
        let parts = split_parts(&frame, 4, true).unwrap();
        let legacy: Value = serde_json::from_slice(parts[0]).unwrap();
        let mut expected = to_json(Channel::IoPub, &msg);
        expected.as_object_mut().unwrap().remove("buffers");
        assert_eq!(legacy, expected);
        assert_eq!(parts[1], b"buf");
    }

    #[test]
    fn legacy_binary_frames_round_trip() {
        let msg = request();
        let frame = encode_legacy_binary(Channel::Shell, &msg);
        let decoded = decode_legacy_binary(&frame).expect("decodes");
        assert_eq!(decoded.msg.header, msg.header);
        assert_eq!(decoded.msg.buffers, msg.buffers);
    }

    #[test]
    fn text_frames_need_a_header_and_a_writable_channel() {
        let ok = decode_text(
            r#"{"channel":"shell","header":{"msg_id":"a","msg_type":"kernel_info_request",
                "session":"s","username":"u","date":"","version":"5.3"},
                "parent_header":{},"metadata":{},"content":{}}"#,
        )
        .expect("valid");
        assert_eq!(ok.msg.msg_type(), "kernel_info_request");
        assert!(ok.msg.parent_header.is_none());
        assert!(matches!(decode_text("nope"), Err(FrameError::NotJson(_))));
        assert!(matches!(decode_text("[1]"), Err(FrameError::NotJson(_))));
        assert!(matches!(
            decode_text(r#"{"channel":"shell","content":{}}"#),
            Err(FrameError::Invalid { part: "header", .. })
        ));
        assert!(matches!(
            decode_text(r#"{"channel":"iopub","header":{}}"#),
            Err(FrameError::Channel(_))
        ));
        assert!(matches!(
            decode_text(r#"{"header":{"msg_id":"a","msg_type":"x","session":"s"}}"#),
            Err(FrameError::Invalid {
                part: "channel",
                ..
            })
        ));
    }

    #[test]
    fn garbage_binary_frames_are_errors_not_panics() {
        for frame in [
            &b""[..],
            b"\x01",
            b"\xff\xff\xff\xff\xff\xff\xff\xff",
            b"\x02\0\0\0\0\0\0\0\x00\x10\0\0\0\0\0\0\xff\xff\0\0\0\0\0\0",
            b"\x03\0\0\0\0\0\0\0\x20\0\0\0\0\0\0\0\x10\0\0\0\0\0\0\0\x30\0\0\0\0\0\0\0",
        ] {
            assert!(decode_v1(frame).is_err(), "{frame:?}");
            assert!(decode_legacy_binary(frame).is_err(), "{frame:?}");
        }
    }
}
