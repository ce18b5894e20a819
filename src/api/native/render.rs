//! Session events → native protocol messages. Kernel messages the native protocol does not
//! carry (execute_input, comm traffic, replies it has no use for) render to nothing.
//!
//! A kernel message's fields are read through one borrowed view of its content: strings and
//! values go out as the JSON the kernel wrote (a 20 MB `stream` text is copied once into the
//! client's frame, never decoded and re-escaped), numbers and flags are read.

use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

use super::protocol::{Json, ServerEvent, ServerMessage, Str};
use crate::session::Channel;
use crate::session::{EventKind, InstallEvent, SessionEvent};

/// Every content field the native protocol relays, each as the kernel wrote it (any type: a
/// field of the wrong type renders as empty rather than failing the message).
#[derive(Default, Deserialize)]
#[serde(default)]
struct Fields<'a> {
    #[serde(borrow)]
    name: Option<&'a RawValue>,
    #[serde(borrow)]
    text: Option<&'a RawValue>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(borrow)]
    metadata: Option<&'a RawValue>,
    #[serde(borrow)]
    transient: Option<&'a RawValue>,
    #[serde(borrow)]
    execution_count: Option<&'a RawValue>,
    #[serde(borrow)]
    ename: Option<&'a RawValue>,
    #[serde(borrow)]
    evalue: Option<&'a RawValue>,
    #[serde(borrow)]
    traceback: Option<&'a RawValue>,
    #[serde(borrow)]
    wait: Option<&'a RawValue>,
    #[serde(borrow)]
    execution_state: Option<&'a RawValue>,
    #[serde(borrow)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow)]
    password: Option<&'a RawValue>,
    #[serde(borrow)]
    matches: Option<&'a RawValue>,
    #[serde(borrow)]
    cursor_start: Option<&'a RawValue>,
    #[serde(borrow)]
    cursor_end: Option<&'a RawValue>,
    #[serde(borrow)]
    status: Option<&'a RawValue>,
    #[serde(borrow)]
    indent: Option<&'a RawValue>,
    #[serde(borrow)]
    protocol_version: Option<&'a RawValue>,
    #[serde(borrow)]
    implementation: Option<&'a RawValue>,
    #[serde(borrow)]
    implementation_version: Option<&'a RawValue>,
    #[serde(borrow)]
    language_info: Option<&'a RawValue>,
    #[serde(borrow)]
    banner: Option<&'a RawValue>,
    #[serde(borrow)]
    found: Option<&'a RawValue>,
}

/// A field that should be a string: as written when it is one, else empty.
fn text(raw: Option<&RawValue>) -> Str<'_> {
    match raw {
        Some(raw) if raw.get().starts_with('"') => Str::Raw(raw),
        _ => Str::Text(""),
    }
}

/// A field that should be a string, or nothing when it is missing or is not one.
fn maybe_text(raw: Option<&RawValue>) -> Option<Str<'_>> {
    raw.filter(|raw| raw.get().starts_with('"')).map(Str::Raw)
}

/// Any value, as written; `null` when missing.
fn any(raw: Option<&RawValue>) -> Json<'_> {
    raw.map_or(Json::Null, Json::Raw)
}

fn int(raw: Option<&RawValue>) -> Option<i64> {
    raw.and_then(|raw| serde_json::from_str(raw.get()).ok())
}

fn flag(raw: Option<&RawValue>) -> bool {
    raw.and_then(|raw| serde_json::from_str(raw.get()).ok())
        .unwrap_or(false)
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
            idle_lost,
        } => ServerEvent::Done {
            files: files.as_deref(),
            idle_lost: idle_lost.then_some(true),
            status,
            execution_count: *execution_count,
            duration_ms: *duration_ms,
        },
        EventKind::State { state, reason } => ServerEvent::Kernel {
            state: *state,
            reason: reason.as_deref(),
        },
        EventKind::Limit { limit, message } => ServerEvent::Error {
            ename: Str::Text(limit),
            evalue: Str::Text(message),
            traceback: Json::Value(&EMPTY_LIST),
        },
        EventKind::Install(install) => match install {
            InstallEvent::Started { packages } => ServerEvent::InstallStarted { packages },
            InstallEvent::Output { line } => ServerEvent::InstallOutput { text: line },
            InstallEvent::Failed { message } => ServerEvent::Error {
                ename: Str::Text("InstallError"),
                evalue: Str::Text(message),
                traceback: Json::Value(&EMPTY_LIST),
            },
            InstallEvent::Done { error } => ServerEvent::InstallDone {
                status: if error.is_some() { "error" } else { "ok" },
                message: error.as_deref(),
            },
        },
        EventKind::Rejected { message } => ServerEvent::Error {
            ename: Str::Text("Rejected"),
            evalue: Str::Text(message),
            traceback: Json::Value(&EMPTY_LIST),
        },
        EventKind::Kernel { channel, msg } => {
            let rendered = matches!(
                (channel, msg.msg_type()),
                (
                    Channel::IoPub,
                    "stream"
                        | "display_data"
                        | "update_display_data"
                        | "execute_result"
                        | "error"
                        | "clear_output"
                        | "status"
                ) | (Channel::Stdin, "input_request")
                    | (
                        Channel::Shell,
                        "complete_reply"
                            | "is_complete_reply"
                            | "kernel_info_reply"
                            | "inspect_reply"
                    )
            );
            if !rendered || (msg.msg_type() == "status" && id.is_none()) {
                return None;
            }
            let c: Fields<'_> = match msg.content.view() {
                Ok(fields) => fields,
                Err(error) => {
                    // Valid JSON, but not an object of distinct fields.
                    tracing::warn!(msg_type = msg.msg_type(), %error, "cannot relay a kernel message");
                    return None;
                }
            };
            match msg.msg_type() {
                "stream" => ServerEvent::Stream {
                    name: text(c.name),
                    text: text(c.text),
                },
                "display_data" => ServerEvent::DisplayData {
                    data: any(c.data),
                    metadata: any(c.metadata),
                    transient: c.transient.map(Json::Raw),
                },
                "update_display_data" => ServerEvent::UpdateDisplayData {
                    data: any(c.data),
                    metadata: any(c.metadata),
                    transient: c.transient.map(Json::Raw),
                },
                "execute_result" => ServerEvent::ExecuteResult {
                    execution_count: int(c.execution_count),
                    data: any(c.data),
                    metadata: any(c.metadata),
                },
                "error" => ServerEvent::Error {
                    ename: text(c.ename),
                    evalue: text(c.evalue),
                    traceback: any(c.traceback),
                },
                "clear_output" => ServerEvent::ClearOutput { wait: flag(c.wait) },
                "status" => ServerEvent::Status {
                    state: text(c.execution_state),
                },
                "input_request" => ServerEvent::InputRequest {
                    prompt: text(c.prompt),
                    password: flag(c.password),
                },
                "complete_reply" => ServerEvent::CompleteReply {
                    matches: any(c.matches),
                    cursor_start: int(c.cursor_start),
                    cursor_end: int(c.cursor_end),
                    metadata: any(c.metadata),
                },
                "is_complete_reply" => ServerEvent::IsCompleteReply {
                    status: text(c.status),
                    indent: maybe_text(c.indent),
                },
                "kernel_info_reply" => ServerEvent::KernelInfoReply {
                    protocol_version: text(c.protocol_version),
                    implementation: text(c.implementation),
                    implementation_version: text(c.implementation_version),
                    language_info: any(c.language_info),
                    banner: text(c.banner),
                },
                "inspect_reply" => ServerEvent::InspectReply {
                    found: flag(c.found),
                    data: any(c.data),
                    metadata: any(c.metadata),
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

/// The JSON text of a native message. Strings and values from the kernel's message are copied
/// in as they are.
pub fn to_text(message: &ServerMessage<'_>) -> serde_json::Result<String> {
    serde_json::to_string(message)
}

/// The JSON text of a session event's native message, if it has one: [`render`] and
/// [`to_text`], written into a buffer sized for the kernel message's content at once (a 20 MB
/// output grown by doubling would be copied about twice over, into fresh pages each time).
pub fn render_text(event: &SessionEvent) -> Option<serde_json::Result<String>> {
    if let Some(text) = large_output_text(event) {
        return Some(text);
    }
    let message = render(event)?;
    let capacity = match &event.kind {
        EventKind::Kernel { msg, .. } => msg.content.len() + 256,
        _ => 256,
    };
    let mut text = Vec::with_capacity(capacity);
    Some(
        serde_json::to_writer(&mut text, &message)
            // serde_json writes UTF-8 only (kernel text was checked to be UTF-8 when decoded).
            .and_then(|()| String::from_utf8(text).map_err(serde::ser::Error::custom)),
    )
}

/// How an output field is written by [`large_output_text`], as [`render`] would.
#[derive(Clone, Copy)]
enum Out {
    /// A string; `""` when missing or not a string.
    Text,
    /// Any value; `null` when missing.
    Any,
    /// Any value; left out when missing or `null`.
    Optional,
    /// An integer; `null` when missing or not one.
    Int,
}

/// A large output message's event (stream text, a big image) written directly around the
/// kernel's own JSON for its fields, located when the message was decoded (see
/// `Content::field_json`): the same text [`to_text`] would give, without scanning the output
/// again. `None` when the event is not such a message: [`render`] handles it.
fn large_output_text(event: &SessionEvent) -> Option<serde_json::Result<String>> {
    let EventKind::Kernel {
        channel: Channel::IoPub,
        msg,
    } = &event.kind
    else {
        return None;
    };
    let content = &msg.content;
    if !content.is_indexed() {
        return None;
    }
    let fields: &[(&str, Out)] = match msg.msg_type() {
        "stream" => &[("name", Out::Text), ("text", Out::Text)],
        "display_data" | "update_display_data" => &[
            ("data", Out::Any),
            ("metadata", Out::Any),
            ("transient", Out::Optional),
        ],
        "execute_result" => &[
            ("execution_count", Out::Int),
            ("data", Out::Any),
            ("metadata", Out::Any),
        ],
        _ => return None,
    };
    let id = match event.cell.as_deref().map(serde_json::to_string) {
        Some(Ok(id)) => Some(id),
        Some(Err(e)) => return Some(Err(e)),
        None => None,
    };
    let mut out = String::with_capacity(content.len() + 128);
    out.push_str("{\"seq\":");
    out.push_str(&event.seq.to_string());
    if let Some(id) = id {
        out.push_str(",\"id\":");
        out.push_str(&id);
    }
    out.push_str(",\"type\":\"");
    out.push_str(msg.msg_type());
    out.push('"');
    for &(name, how) in fields {
        let json = content.field_json(name);
        let count;
        let value = match how {
            Out::Text => json.filter(|j| j.starts_with('"')).unwrap_or(r#""""#),
            Out::Any => json.unwrap_or("null"),
            Out::Optional => match json {
                Some(j) if j != "null" => j,
                _ => continue,
            },
            Out::Int => match json.and_then(|j| serde_json::from_str::<i64>(j).ok()) {
                Some(n) => {
                    count = n.to_string();
                    &count
                }
                None => "null",
            },
        };
        out.push_str(",\"");
        out.push_str(name);
        out.push_str("\":");
        out.push_str(value);
    }
    out.push('}');
    Some(Ok(out))
}

/// An empty JSON list, for errors that have no traceback.
pub static EMPTY_LIST: Value = Value::Array(Vec::new());

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use serde_json::json;

    use super::*;
    use crate::session::{Content, Message};

    /// The native JSON of a kernel message on `channel` whose content is `content` verbatim.
    fn rendered(channel: Channel, msg_type: &str, content: &str) -> Option<Value> {
        let mut msg = Message::new(msg_type, "kernel", json!({}));
        msg.content = Content::from_frame(Bytes::copy_from_slice(content.as_bytes())).ok()?;
        let event = SessionEvent {
            seq: 7,
            cell: Some("cell-1".into()),
            kind: EventKind::Kernel {
                channel,
                msg: Arc::new(msg),
            },
        };
        let text = to_text(&render(&event)?).ok()?;
        Some(serde_json::from_str(&text).expect("valid JSON"))
    }

    #[test]
    fn stream_text_is_relayed_as_the_kernel_wrote_it() {
        let mut tricky = String::new();
        for c in (0u32..0x80).chain([0xe9, 0x2028, 0x1f600]) {
            tricky.push(char::from_u32(c).unwrap_or('?'));
        }
        tricky.push_str("\"\\\n\u{7f}é\"");
        let content = json!({"name": "stdout", "text": tricky}).to_string();
        let out = rendered(Channel::IoPub, "stream", &content).unwrap();
        assert_eq!(
            out,
            json!({"seq": 7, "id": "cell-1", "type": "stream", "name": "stdout", "text": tricky})
        );
        // Escapes the kernel chose (\u00e9, \/) reach the client as the same characters.
        let out = rendered(
            Channel::IoPub,
            "stream",
            r#"{"text": "caf\u00e9 a\/b \ud83d\ude00", "name": "stderr"}"#,
        )
        .unwrap();
        assert_eq!(out["text"], "café a/b 😀");
        assert_eq!(out["name"], "stderr");
    }

    #[test]
    fn large_output_is_spliced_as_render_would_write_it() {
        let text = "x\"y\\z é 😀\n".repeat(Content::INDEXED_FROM / 8);
        let png = "iVBORw0KGgo".repeat(Content::INDEXED_FROM / 8);
        let contents = [
            ("stream", json!({"name": "stdout", "text": text})),
            ("stream", json!({"text": text, "name": 3})),
            (
                "display_data",
                json!({"data": {"image/png": png, "text/plain": "<Figure>"},
                "metadata": {"image/png": {"width": 640}}, "transient": {"display_id": "d"}}),
            ),
            (
                "display_data",
                json!({"data": {"image/png": png}, "transient": null}),
            ),
            (
                "update_display_data",
                json!({"data": {"text/plain": text}, "metadata": {},
                "transient": {"display_id": "d"}}),
            ),
            (
                "execute_result",
                json!({"execution_count": 7, "data": {"text/plain": text}, "metadata": {}}),
            ),
            (
                "execute_result",
                json!({"execution_count": "x", "data": {"text/plain": text}}),
            ),
        ];
        for (msg_type, content) in contents {
            let mut msg = Message::new(msg_type, "kernel", json!({}));
            msg.content = Content::from_frame(Bytes::from(content.to_string())).unwrap();
            for cell in [Some("cell-\"1\"".into()), None] {
                let event = SessionEvent {
                    seq: 42,
                    cell,
                    kind: EventKind::Kernel {
                        channel: Channel::IoPub,
                        msg: Arc::new(msg.clone()),
                    },
                };
                let fast = large_output_text(&event).unwrap().unwrap();
                assert_eq!(
                    fast,
                    to_text(&render(&event).unwrap()).unwrap(),
                    "{msg_type}"
                );
                assert_eq!(render_text(&event).unwrap().unwrap(), fast);
            }
        }
    }

    #[test]
    fn values_and_flags_are_read_from_the_content() {
        let out = rendered(
            Channel::IoPub,
            "display_data",
            r#"{"data": {"image/png": "iVBOR", "text/plain": "<Figure>"}, "metadata": {"w": 3}, "transient": {"display_id": "d1"}}"#,
        )
        .unwrap();
        assert_eq!(out["data"]["image/png"], "iVBOR");
        assert_eq!(out["metadata"], json!({"w": 3}));
        assert_eq!(out["transient"]["display_id"], "d1");

        let out = rendered(
            Channel::IoPub,
            "execute_result",
            r#"{"execution_count": 4, "data": {"text/plain": "2"}, "metadata": {}}"#,
        )
        .unwrap();
        assert_eq!(out["execution_count"], 4);
        let out = rendered(
            Channel::Stdin,
            "input_request",
            r#"{"prompt": "pw? ", "password": true}"#,
        )
        .unwrap();
        assert_eq!(
            out,
            json!({"seq": 7, "id": "cell-1", "type": "input_request", "prompt": "pw? ", "password": true})
        );
    }

    #[test]
    fn odd_content_renders_empty_fields_or_nothing() {
        // Wrong types: empty text, no count.
        let out = rendered(Channel::IoPub, "stream", r#"{"name": 5, "text": ["x"]}"#).unwrap();
        assert_eq!((&out["name"], &out["text"]), (&json!(""), &json!("")));
        let out = rendered(
            Channel::IoPub,
            "execute_result",
            r#"{"execution_count": "x"}"#,
        )
        .unwrap();
        assert_eq!(out["execution_count"], Value::Null);
        assert_eq!(out["data"], Value::Null);
        // Not an object of distinct fields: not relayed.
        assert_eq!(
            rendered(Channel::IoPub, "stream", r#"{"text": "a", "text": "b"}"#),
            None
        );
        assert_eq!(rendered(Channel::IoPub, "stream", "7"), None);
        // Not carried by the native protocol.
        assert_eq!(
            rendered(Channel::IoPub, "execute_input", r#"{"code": "1"}"#),
            None
        );
    }
}
