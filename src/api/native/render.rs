//! Session events → native protocol messages. Kernel messages the native protocol does not
//! carry (execute_input, comm traffic, replies it has no use for) render to nothing.

use serde_json::Value;

use super::protocol::{ServerEvent, ServerMessage};
use crate::session::Channel;
use crate::session::{EventKind, InstallEvent, SessionEvent};

static NULL: Value = Value::Null;

fn field<'a>(content: &'a Value, name: &str) -> &'a Value {
    content.get(name).unwrap_or(&NULL)
}

fn text<'a>(content: &'a Value, name: &str) -> &'a str {
    content.get(name).and_then(Value::as_str).unwrap_or("")
}

/// The native message for a session event, or `None` when the native protocol has no such event.
pub fn render(event: &SessionEvent) -> Option<ServerMessage<'_>> {
    let id = event.cell.as_deref();
    let rendered = match &event.kind {
        EventKind::Accepted { position } => ServerEvent::Accepted {
            position: *position,
        },
        EventKind::Done {
            status,
            execution_count,
            duration_ms,
            files,
        } => ServerEvent::Done {
            files: files.as_deref(),
            status,
            execution_count: *execution_count,
            duration_ms: *duration_ms,
        },
        EventKind::State { state, reason } => ServerEvent::Kernel {
            state: *state,
            reason: reason.as_deref(),
        },
        EventKind::Limit { limit, message } => ServerEvent::Error {
            ename: limit,
            evalue: message,
            traceback: &EMPTY_LIST,
        },
        EventKind::Install(install) => match install {
            InstallEvent::Started { packages } => ServerEvent::InstallStarted { packages },
            InstallEvent::Output { line } => ServerEvent::InstallOutput { text: line },
            InstallEvent::Failed { message } => ServerEvent::Error {
                ename: "InstallError",
                evalue: message,
                traceback: &EMPTY_LIST,
            },
            InstallEvent::Done { error } => ServerEvent::InstallDone {
                status: if error.is_some() { "error" } else { "ok" },
                message: error.as_deref(),
            },
        },
        EventKind::Rejected { message } => ServerEvent::Error {
            ename: "Rejected",
            evalue: message,
            traceback: &EMPTY_LIST,
        },
        EventKind::Kernel { channel, msg } => {
            let c = &msg.content;
            match (channel, msg.msg_type()) {
                (Channel::IoPub, "stream") => ServerEvent::Stream {
                    name: text(c, "name"),
                    text: text(c, "text"),
                },
                (Channel::IoPub, "display_data") => ServerEvent::DisplayData {
                    data: field(c, "data"),
                    metadata: field(c, "metadata"),
                    transient: c.get("transient"),
                },
                (Channel::IoPub, "update_display_data") => ServerEvent::UpdateDisplayData {
                    data: field(c, "data"),
                    metadata: field(c, "metadata"),
                    transient: c.get("transient"),
                },
                (Channel::IoPub, "execute_result") => ServerEvent::ExecuteResult {
                    execution_count: c.get("execution_count").and_then(Value::as_i64),
                    data: field(c, "data"),
                    metadata: field(c, "metadata"),
                },
                (Channel::IoPub, "error") => ServerEvent::Error {
                    ename: text(c, "ename"),
                    evalue: text(c, "evalue"),
                    traceback: field(c, "traceback"),
                },
                (Channel::IoPub, "clear_output") => ServerEvent::ClearOutput {
                    wait: c.get("wait").and_then(Value::as_bool).unwrap_or(false),
                },
                (Channel::IoPub, "status") if id.is_some() => ServerEvent::Status {
                    state: text(c, "execution_state"),
                },
                (Channel::Stdin, "input_request") => ServerEvent::InputRequest {
                    prompt: text(c, "prompt"),
                    password: c.get("password").and_then(Value::as_bool).unwrap_or(false),
                },
                (Channel::Shell, "complete_reply") => ServerEvent::CompleteReply {
                    matches: field(c, "matches"),
                    cursor_start: c.get("cursor_start").and_then(Value::as_i64),
                    cursor_end: c.get("cursor_end").and_then(Value::as_i64),
                    metadata: field(c, "metadata"),
                },
                (Channel::Shell, "is_complete_reply") => ServerEvent::IsCompleteReply {
                    status: text(c, "status"),
                    indent: c.get("indent").and_then(Value::as_str),
                },
                (Channel::Shell, "kernel_info_reply") => ServerEvent::KernelInfoReply {
                    protocol_version: text(c, "protocol_version"),
                    implementation: text(c, "implementation"),
                    implementation_version: text(c, "implementation_version"),
                    language_info: field(c, "language_info"),
                    banner: text(c, "banner"),
                },
                (Channel::Shell, "inspect_reply") => ServerEvent::InspectReply {
                    found: c.get("found").and_then(Value::as_bool).unwrap_or(false),
                    data: field(c, "data"),
                    metadata: field(c, "metadata"),
                },
                _ => return None,
            }
        }
    };
    Some(ServerMessage {
        seq: Some(event.seq),
        id,
        event: rendered,
    })
}

/// Stream text at least this long is escaped by [`push_json_str`] rather than serde_json's
/// byte-at-a-time escaper (about 35 ms for a 20 MB flush, the largest cost the relay adds).
const FAST_TEXT: usize = 16 << 10;

/// The JSON text of a native message: what `serde_json::to_string` gives, built faster for
/// large stream output (the object with an empty `text` from serde, then the text escaped
/// eight bytes at a time where nothing needs escaping).
pub fn to_text(message: &ServerMessage<'_>) -> serde_json::Result<String> {
    let ServerEvent::Stream { name, text } = message.event else {
        return serde_json::to_string(message);
    };
    if text.len() < FAST_TEXT {
        return serde_json::to_string(message);
    }
    let empty = ServerMessage {
        seq: message.seq,
        id: message.id,
        event: ServerEvent::Stream { name, text: "" },
    };
    let mut out = serde_json::to_string(&empty)?;
    const TAIL: &str = r#""text":""}"#;
    if !out.ends_with(TAIL) {
        // Not the layout this relies on: serde does it all.
        return serde_json::to_string(message);
    }
    out.truncate(out.len() - 3);
    let mut bytes = out.into_bytes();
    bytes.reserve(text.len() + text.len() / 64 + 2);
    push_json_str(&mut bytes, text);
    bytes.push(b'}');
    // Only ASCII escapes were added to valid UTF-8 between whole characters.
    String::from_utf8(bytes).or_else(|_| serde_json::to_string(message))
}

/// Appends `text` as a JSON string, quotes included, escaped exactly as serde_json does
/// (`\"`, `\\`, `\b \f \n \r \t`, other control characters as `\u00xx`), skipping eight
/// bytes at a time where none needs escaping.
fn push_json_str(out: &mut Vec<u8>, text: &str) {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    /// Whether any byte of `w` is below 0x20, `"` or `\` (may also flag a byte after a hit).
    fn needs_escape(w: u64) -> bool {
        let zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
        let control = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
        (control | zero(w ^ (ONES * u64::from(b'"'))) | zero(w ^ (ONES * u64::from(b'\\')))) != 0
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = text.as_bytes();
    out.push(b'"');
    let (mut start, mut i) = (0, 0);
    while i < bytes.len() {
        if let Some(chunk) = bytes.get(i..i + 8)
            && let Ok(chunk) = <[u8; 8]>::try_from(chunk)
            && !needs_escape(u64::from_le_bytes(chunk))
        {
            i += 8;
            continue;
        }
        let b = bytes[i];
        let escape: Option<&[u8]> = match b {
            b'"' => Some(b"\\\""),
            b'\\' => Some(b"\\\\"),
            b'\n' => Some(b"\\n"),
            b'\r' => Some(b"\\r"),
            b'\t' => Some(b"\\t"),
            0x08 => Some(b"\\b"),
            0x0c => Some(b"\\f"),
            0x00..=0x1f => None,
            _ => {
                i += 1;
                continue;
            }
        };
        out.extend_from_slice(&bytes[start..i]);
        match escape {
            Some(e) => out.extend_from_slice(e),
            None => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]),
        }
        i += 1;
        start = i;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// An empty JSON list, for errors that have no traceback.
pub static EMPTY_LIST: Value = Value::Array(Vec::new());

#[cfg(test)]
mod tests {
    use super::*;

    fn stream<'a>(text: &'a str) -> ServerMessage<'a> {
        ServerMessage {
            seq: Some(7),
            id: Some("cell-1"),
            event: ServerEvent::Stream {
                name: "stdout",
                text,
            },
        }
    }

    #[test]
    fn fast_stream_text_is_what_serde_gives() {
        let mut tricky = String::new();
        for c in (0u32..0x80).chain([0xe9, 0x2028, 0x1f600]) {
            tricky.push(char::from_u32(c).unwrap_or('?'));
        }
        tricky.push_str("\"\\\n\u{7f}é\"");
        for text in [
            "x".repeat(FAST_TEXT),
            tricky.repeat(FAST_TEXT / tricky.len() + 1),
            format!("{}\n", "y".repeat(2047)).repeat(20),
            format!("{}\"", "😀".repeat(FAST_TEXT / 4)),
        ] {
            let message = stream(&text);
            assert_eq!(
                to_text(&message).unwrap(),
                serde_json::to_string(&message).unwrap()
            );
        }
        for len in 0..40 {
            let text = tricky
                .chars()
                .cycle()
                .skip(len)
                .take(len)
                .collect::<String>();
            let mut fast = Vec::new();
            push_json_str(&mut fast, &text);
            assert_eq!(
                String::from_utf8(fast).unwrap(),
                serde_json::to_string(&text).unwrap()
            );
        }
    }
}
