//! Typed Jupyter messages: the header we originate and read, and a message whose content stays
//! the JSON text it came as, so that nothing is lost (or re-encoded) when it is relayed.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::content::Content;

/// The protocol version we speak.
pub const PROTOCOL_VERSION: &str = "5.3";

/// The five Jupyter channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    /// Requests and replies (execute, complete, inspect, kernel_info, …).
    Shell,
    /// Broadcast outputs and status.
    #[serde(rename = "iopub")]
    IoPub,
    /// Kernel-initiated input requests.
    Stdin,
    /// Interrupt and shutdown, served even while shell is busy.
    Control,
    /// Liveness ping.
    Heartbeat,
}

impl Channel {
    /// The lowercase name used in Jupyter's JSON (`shell`, `iopub`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Shell => "shell",
            Channel::IoPub => "iopub",
            Channel::Stdin => "stdin",
            Channel::Control => "control",
            Channel::Heartbeat => "hb",
        }
    }
}

/// A Jupyter message header. Unknown fields are kept in `extra` so a relayed header loses nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// Unique id of this message.
    pub msg_id: String,
    /// The sending client's session id.
    pub session: String,
    /// Sender's user name.
    #[serde(default)]
    pub username: String,
    /// ISO 8601 timestamp.
    #[serde(default)]
    pub date: String,
    /// e.g. `execute_request`, `stream`.
    pub msg_type: String,
    /// Protocol version, e.g. `5.3`.
    #[serde(default)]
    pub version: String,
    /// Anything else the sender put in the header.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Header {
    /// A new header for a message we originate.
    pub fn new(msg_type: &str, session: &str, username: &str) -> Self {
        Self {
            msg_id: uuid::Uuid::new_v4().to_string(),
            session: session.to_owned(),
            username: username.to_owned(),
            date: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            msg_type: msg_type.to_owned(),
            version: PROTOCOL_VERSION.to_owned(),
            extra: Map::new(),
        }
    }
}

/// One Jupyter message. `metadata` is kept as a value, `content` as the JSON text it came as
/// (see [`Content`]): both are relayed as the kernel sent them.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// ZeroMQ routing identities before the `<IDS|MSG>` delimiter (empty on DEALER/SUB reads,
    /// except the iopub topic).
    pub identities: Vec<Bytes>,
    /// This message's header.
    pub header: Header,
    /// The header of the request this message answers; `None` when the kernel sent `{}`.
    pub parent_header: Option<Header>,
    /// Free-form metadata.
    pub metadata: Value,
    /// The message content.
    pub content: Content,
    /// Extra binary buffers after the content frame.
    pub buffers: Vec<Bytes>,
}

impl Message {
    /// A message we originate, with a fresh header and empty metadata.
    pub fn new(msg_type: &str, session: &str, content: Value) -> Self {
        Self {
            identities: Vec::new(),
            header: Header::new(msg_type, session, "kernelbox"),
            parent_header: None,
            metadata: Value::Object(Map::new()),
            content: Content::from_value(content),
            buffers: Vec::new(),
        }
    }

    /// The message type from the header.
    pub fn msg_type(&self) -> &str {
        &self.header.msg_type
    }

    /// The `msg_id` of the parent request, if any.
    pub fn parent_id(&self) -> Option<&str> {
        self.parent_header.as_ref().map(|h| h.msg_id.as_str())
    }

    /// Roughly the bytes this message holds: content, buffers, identities, metadata (measured
    /// by serializing it into a counter: a scan, no copy) and a fixed allowance per header.
    /// For bounding what waits in memory, not for the hot path.
    pub fn estimated_size(&self) -> usize {
        /// Counts what is written to it.
        struct Counter(usize);
        impl std::io::Write for Counter {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0 += buf.len();
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        const HEADER: usize = 512;
        let mut metadata = Counter(0);
        // Writing into a counter cannot fail; a failure would only undercount.
        let _ = serde_json::to_writer(&mut metadata, &self.metadata);
        let frames: usize = self
            .buffers
            .iter()
            .chain(&self.identities)
            .map(Bytes::len)
            .sum();
        self.content.len() + frames + metadata.0 + 2 * HEADER
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimated_size_counts_content_buffers_and_metadata() {
        let mut msg = Message::new(
            "comm_msg",
            "s",
            serde_json::json!({"data": "x".repeat(1000)}),
        );
        let small = msg.estimated_size();
        assert!(small >= 1000, "{small}");
        msg.buffers.push(Bytes::from(vec![0u8; 1 << 20]));
        msg.metadata = serde_json::json!({"note": "y".repeat(5000)});
        assert!(msg.estimated_size() >= small + (1 << 20) + 5000);
    }
}
