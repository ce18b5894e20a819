//! Frames ⇄ [`Message`](super::Message): `<IDS|MSG>` framing, identities and buffers kept; every
//! malformed input is an error, never a panic.
//!
//! A Jupyter message on the wire is
//! `[identities…, "<IDS|MSG>", signature, header, parent_header, metadata, content, buffers…]`.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::content::{Content, ContentError};
use super::message::{Header, Message};
use super::signer::{Signer, VerifyError};

/// The frame separating ZeroMQ routing identities from the message proper.
pub const DELIMITER: &[u8] = b"<IDS|MSG>";

/// Frames after the delimiter every message has: signature + the four signed JSON frames.
const MIN_FRAMES_AFTER_DELIMITER: usize = 5;

/// Identity, content and buffer frames up to this size are copied out of the frames they arrive
/// in.
/// A received frame is a slice of its socket's read buffer (up to 64 KiB, shared by every frame
/// read with it), and a decoded message can live long (a session buffers its events for
/// replay): a slice kept would keep the whole read buffer alive. Larger frames are most of
/// their allocation anyway and are kept as they are.
const COPY_OUT_LIMIT: usize = 64 << 10;

/// Why frames could not be turned into a message (or a message into frames).
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// No `<IDS|MSG>` frame: not a Jupyter message at all.
    #[error("no <IDS|MSG> delimiter among {frames} frames")]
    NoDelimiter {
        /// How many frames the message had.
        frames: usize,
    },
    /// The delimiter is there but signature/header/parent/metadata/content are not all present.
    #[error("only {found} frames after <IDS|MSG>, need at least {MIN_FRAMES_AFTER_DELIMITER}")]
    TooFewFrames {
        /// How many frames followed the delimiter.
        found: usize,
    },
    /// The HMAC signature did not verify: the message is not from who holds the key.
    #[error("bad signature: {0}")]
    BadSignature(#[from] VerifyError),
    /// A JSON frame is not UTF-8.
    #[error("{frame} frame is not UTF-8: {source}")]
    NotUtf8 {
        /// Which frame (`header`, `parent_header`, `metadata`, `content`).
        frame: &'static str,
        /// Where the bad byte is.
        source: std::str::Utf8Error,
    },
    /// A JSON frame is not valid JSON.
    #[error("{frame} frame is not valid JSON: {source}")]
    BadJson {
        /// Which frame.
        frame: &'static str,
        /// The parser's complaint.
        source: serde_json::Error,
    },
    /// A header (or parent header) is JSON but lacks required fields or has wrong types.
    #[error("{frame} frame is not a Jupyter header: {source}")]
    InvalidHeader {
        /// `header` or `parent_header`.
        frame: &'static str,
        /// Which field is missing or wrong.
        source: serde_json::Error,
    },
    /// A message could not be serialised (cannot happen for `Value`s; kept to avoid unwraps).
    #[error("cannot serialise {frame}: {source}")]
    Encode {
        /// Which frame.
        frame: &'static str,
        /// The serialiser's complaint.
        source: serde_json::Error,
    },
}

/// Serialises and signs `msg` into wire frames: identities, delimiter, signature, the four JSON
/// frames, then buffers. A `None` parent header is sent as `{}`.
pub fn encode(msg: &Message, signer: &Signer) -> Result<Vec<Bytes>, CodecError> {
    let header = to_json("header", &msg.header)?;
    let parent = match &msg.parent_header {
        Some(parent) => to_json("parent_header", parent)?,
        None => b"{}".to_vec(),
    };
    let metadata = to_json("metadata", &msg.metadata)?;
    let content = msg.content.to_bytes();
    let signature = signer.sign([&header, &parent, &metadata, &content]);

    let mut frames = Vec::with_capacity(msg.identities.len() + 6 + msg.buffers.len());
    frames.extend(msg.identities.iter().cloned());
    frames.push(Bytes::from_static(DELIMITER));
    frames.push(Bytes::from(signature));
    frames.push(Bytes::from(header));
    frames.push(Bytes::from(parent));
    frames.push(Bytes::from(metadata));
    frames.push(content);
    frames.extend(msg.buffers.iter().cloned());
    Ok(frames)
}

/// Verifies and parses wire frames into a message. Identities before the delimiter, the content
/// (checked to be JSON, not parsed: see [`Content`]) and buffers after it are kept as frames
/// (small ones copied into allocations of their own, see [`COPY_OUT_LIMIT`]); `{}` as parent
/// header becomes `None`.
pub fn decode(mut frames: Vec<Bytes>, signer: &Signer) -> Result<Message, CodecError> {
    let total = frames.len();
    let delimiter = frames
        .iter()
        .position(|f| f.as_ref() == DELIMITER)
        .ok_or(CodecError::NoDelimiter { frames: total })?;
    let after = total - delimiter - 1;
    if after < MIN_FRAMES_AFTER_DELIMITER {
        return Err(CodecError::TooFewFrames { found: after });
    }

    // Split into [identities][delimiter, signature, 4 JSON][buffers]. Identities and buffers
    // get vectors of their exact size (none when empty): the message may be kept long, and the
    // frames' vector is sized for all of them.
    let buffers: Vec<Bytes> = frames
        .drain(delimiter + 1 + MIN_FRAMES_AFTER_DELIMITER..)
        .map(unshare)
        .collect();
    let identities: Vec<Bytes> = frames.drain(..delimiter).map(unshare).collect();
    let [_, signature, header, parent, metadata, content] = <[Bytes; 6]>::try_from(frames)
        .map_err(|rest| CodecError::TooFewFrames {
            found: rest.len().saturating_sub(1),
        })?;

    signer.verify([&header, &parent, &metadata, &content], &signature)?;

    let header: Header = parse_header("header", &header)?;
    let parent_header = if is_empty_object(&parent) {
        None
    } else {
        Some(parse_header("parent_header", &parent)?)
    };
    let metadata: Value = parse("metadata", &metadata)?;
    let content = Content::from_frame(unshare(content)).map_err(|e| match e {
        ContentError::NotUtf8(source) => CodecError::NotUtf8 {
            frame: "content",
            source,
        },
        ContentError::NotJson(source) => CodecError::BadJson {
            frame: "content",
            source,
        },
    })?;

    Ok(Message {
        identities,
        header,
        parent_header,
        metadata,
        content,
        buffers,
    })
}

/// `frame`, copied into an allocation of its own when it is small (see [`COPY_OUT_LIMIT`]).
fn unshare(frame: Bytes) -> Bytes {
    if frame.is_empty() || frame.len() > COPY_OUT_LIMIT {
        frame
    } else {
        Bytes::copy_from_slice(&frame)
    }
}

/// `serde_json::to_vec` with the frame named in the error.
fn to_json<T: serde::Serialize>(frame: &'static str, value: &T) -> Result<Vec<u8>, CodecError> {
    serde_json::to_vec(value).map_err(|source| CodecError::Encode { frame, source })
}

/// Whether a frame is `{}` (allowing whitespace), the protocol's "no parent".
fn is_empty_object(bytes: &[u8]) -> bool {
    let mut inner = bytes.iter().copied().filter(|b| !b.is_ascii_whitespace());
    matches!(
        (inner.next(), inner.next(), inner.next()),
        (Some(b'{'), Some(b'}'), None)
    )
}

/// Parses a JSON frame. UTF-8 is checked once up front (so the error says so); `from_str` then
/// does not re-validate strings, so this costs no more than `from_slice`.
fn parse<T: DeserializeOwned>(frame: &'static str, bytes: &[u8]) -> Result<T, CodecError> {
    let text =
        std::str::from_utf8(bytes).map_err(|source| CodecError::NotUtf8 { frame, source })?;
    serde_json::from_str(text).map_err(|source| CodecError::BadJson { frame, source })
}

/// Parses a header frame, telling "valid JSON but not a header" apart from "not JSON".
fn parse_header(frame: &'static str, bytes: &[u8]) -> Result<Header, CodecError> {
    parse::<Header>(frame, bytes).map_err(|err| match err {
        CodecError::BadJson { frame, source } if source.is_data() => {
            CodecError::InvalidHeader { frame, source }
        }
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn signer() -> Signer {
        Signer::new(b"a-test-key").unwrap()
    }

    fn sample() -> Message {
        let mut msg = Message::new("execute_request", "sess-1", json!({"code": "1+1"}));
        msg.metadata = json!({"tag": [1, 2]});
        msg
    }

    /// Frames of a hand-built message whose JSON frames are given verbatim, signed correctly.
    fn raw(parts: [&[u8]; 4], signer: &Signer) -> Vec<Bytes> {
        let sig = signer.sign(parts);
        let mut frames = vec![Bytes::from_static(DELIMITER), Bytes::from(sig)];
        frames.extend(parts.iter().map(|p| Bytes::copy_from_slice(p)));
        frames
    }

    const HEADER: &[u8] =
        br#"{"msg_id":"m","session":"s","username":"u","date":"d","msg_type":"t","version":"5.3"}"#;

    #[test]
    fn round_trip() {
        let msg = sample();
        let frames = encode(&msg, &signer()).unwrap();
        assert_eq!(frames.len(), 6);
        assert_eq!(frames[0].as_ref(), DELIMITER);
        assert_eq!(frames[3].as_ref(), b"{}");
        let back = decode(frames, &signer()).unwrap();
        assert_eq!(back, msg);
        assert_eq!(back.parent_header, None);
    }

    #[test]
    fn identities_parent_and_buffers_preserved() {
        let mut msg = sample();
        let parent = Header::new("execute_request", "other", "someone");
        msg.parent_header = Some(parent.clone());
        msg.identities = vec![
            Bytes::from_static(b"id-1"),
            Bytes::from_static(b"\x00\xffid"),
        ];
        msg.buffers = vec![Bytes::from_static(b"\x00\x01binary"), Bytes::new()];
        msg.header.extra.insert("subshell_id".into(), json!(null));

        let back = decode(encode(&msg, &signer()).unwrap(), &signer()).unwrap();
        assert_eq!(back.identities, msg.identities);
        assert_eq!(back.buffers, msg.buffers);
        assert_eq!(back.parent_header, Some(parent));
        assert_eq!(back.parent_id(), msg.parent_id());
        assert_eq!(back.header.extra.get("subshell_id"), Some(&json!(null)));
        assert_eq!(back, msg);
    }

    #[test]
    fn bad_signature_rejected() {
        let mut frames = encode(&sample(), &signer()).unwrap();
        frames[5] = Bytes::from_static(br#"{"code":"import os"}"#);
        assert!(matches!(
            decode(frames, &signer()),
            Err(CodecError::BadSignature(VerifyError::Mismatch))
        ));

        let frames = encode(&sample(), &Signer::new(b"wrong").unwrap()).unwrap();
        assert!(matches!(
            decode(frames, &signer()),
            Err(CodecError::BadSignature(VerifyError::Mismatch))
        ));

        let mut frames = encode(&sample(), &signer()).unwrap();
        frames[1] = Bytes::from_static(b"");
        assert!(matches!(
            decode(frames, &signer()),
            Err(CodecError::BadSignature(VerifyError::Malformed))
        ));
    }

    #[test]
    fn missing_delimiter_rejected() {
        let mut frames = encode(&sample(), &signer()).unwrap();
        frames.remove(0);
        assert!(matches!(
            decode(frames, &signer()),
            Err(CodecError::NoDelimiter { frames: 5 })
        ));
        assert!(matches!(
            decode(Vec::new(), &signer()),
            Err(CodecError::NoDelimiter { frames: 0 })
        ));
    }

    #[test]
    fn too_few_frames_rejected() {
        let mut frames = encode(&sample(), &signer()).unwrap();
        frames.truncate(5);
        assert!(matches!(
            decode(frames, &signer()),
            Err(CodecError::TooFewFrames { found: 4 })
        ));
        let only = vec![Bytes::from_static(b"id"), Bytes::from_static(DELIMITER)];
        assert!(matches!(
            decode(only, &signer()),
            Err(CodecError::TooFewFrames { found: 0 })
        ));
    }

    #[test]
    fn non_utf8_rejected() {
        let s = signer();
        let frames = raw([HEADER, b"{}", b"{}", b"{\"a\":\"\xff\"}"], &s);
        assert!(matches!(
            decode(frames, &s),
            Err(CodecError::NotUtf8 {
                frame: "content",
                ..
            })
        ));
    }

    #[test]
    fn bad_json_rejected() {
        let s = signer();
        let frames = raw([HEADER, b"{}", b"{not json", b"{}"], &s);
        assert!(matches!(
            decode(frames, &s),
            Err(CodecError::BadJson {
                frame: "metadata",
                ..
            })
        ));
        let frames = raw([b"{\"msg_id\":", b"{}", b"{}", b"{}"], &s);
        assert!(matches!(
            decode(frames, &s),
            Err(CodecError::BadJson {
                frame: "header",
                ..
            })
        ));
    }

    #[test]
    fn header_missing_fields_rejected() {
        let s = signer();
        let frames = raw(
            [br#"{"msg_id":"m","session":"s"}"#, b"{}", b"{}", b"{}"],
            &s,
        );
        let err = decode(frames, &s).unwrap_err();
        assert!(
            matches!(
                err,
                CodecError::InvalidHeader {
                    frame: "header",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("msg_type"), "{err}");

        let frames = raw([HEADER, br#"{"msg_id":7}"#, b"{}", b"{}"], &s);
        assert!(matches!(
            decode(frames, &s),
            Err(CodecError::InvalidHeader {
                frame: "parent_header",
                ..
            })
        ));
    }

    #[test]
    fn empty_parent_with_whitespace_is_none() {
        let s = signer();
        let msg = decode(raw([HEADER, b" { } ", b"{}", b"{}"], &s), &s).unwrap();
        assert_eq!(msg.parent_header, None);
    }

    #[test]
    fn empty_key_mode() {
        let unsigned = Signer::new(b"").unwrap();
        let msg = sample();
        let frames = encode(&msg, &unsigned).unwrap();
        assert_eq!(frames[1].as_ref(), b"");
        assert_eq!(decode(frames, &unsigned).unwrap(), msg);

        // A keyed reader refuses unsigned messages.
        let frames = encode(&sample(), &unsigned).unwrap();
        assert!(matches!(
            decode(frames, &signer()),
            Err(CodecError::BadSignature(_))
        ));
    }

    #[test]
    fn iopub_topic_is_an_identity() {
        let s = signer();
        let mut frames = vec![Bytes::from_static(b"kernel.abc.status")];
        frames.extend(raw(
            [HEADER, b"{}", b"{}", br#"{"execution_state":"idle"}"#],
            &s,
        ));
        let msg = decode(frames, &s).unwrap();
        assert_eq!(
            msg.identities,
            vec![Bytes::from_static(b"kernel.abc.status")]
        );
        assert_eq!(msg.msg_type(), "t");
        assert_eq!(msg.content["execution_state"], "idle");
    }

    #[test]
    fn small_frames_do_not_keep_the_read_buffer_alive() {
        let s = signer();
        // Every frame a slice of one "read buffer", as the socket hands them over.
        let mut wire = b"kernel.abc.status".to_vec();
        let mut bounds = vec![(0, wire.len())];
        let mut frames_owned = raw([HEADER, b"{}", b"{}", b"{}"], &s);
        frames_owned.push(Bytes::from_static(b"\x00binary"));
        for frame in &frames_owned {
            let start = wire.len();
            wire.extend_from_slice(frame);
            bounds.push((start, wire.len()));
        }
        let read_buffer = Bytes::from(wire);
        let frames: Vec<Bytes> = bounds
            .iter()
            .map(|&(a, b)| read_buffer.slice(a..b))
            .collect();
        let msg = decode(frames, &s).unwrap();
        let inside = |b: &Bytes| {
            let range = read_buffer.as_ptr_range();
            range.contains(&b.as_ptr())
        };
        assert_eq!(msg.identities[0].as_ref(), b"kernel.abc.status");
        assert_eq!(msg.buffers[0].as_ref(), b"\x00binary");
        assert!(!inside(&msg.identities[0]) && !inside(&msg.buffers[0]));
        // The read buffer is now only ours: nothing the message holds points into it.
        assert!(read_buffer.is_unique());
    }
}
