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

/// An empty JSON list, for errors that have no traceback.
pub static EMPTY_LIST: Value = Value::Array(Vec::new());
