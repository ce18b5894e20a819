//! The kernel client: owns the ZeroMQ sockets of one kernel, proves it ready, and turns the
//! channels into one ordered stream of incoming messages for the session that owns it.
//!
//! CONTRACT (skeleton; the wire-client work fills in the bodies):
//! - `connect` subscribes iopub to "" *before* connecting it, connects shell/stdin (DEALERs
//!   sharing one identity), control (DEALER), heartbeat; then loops `kernel_info_request` on shell
//!   until an iopub `status` whose parent is one of those requests arrives AND its
//!   `kernel_info_reply` is read; fails with `KernelError::NotReady` after `ready_timeout`.
//! - Each socket is owned by its own task; iopub is drained by a dedicated task into the bounded
//!   `Incoming` channel so that ipykernel's XPUB never drops for lack of a reader.
//! - Every message read is HMAC-verified; bad signatures and malformed frames are dropped with a
//!   `tracing::warn!`, never a panic.
//! - The heartbeat task pings every `heartbeat_interval`; after `heartbeat_misses` misses in a row
//!   it sends `Incoming::HeartbeatLost` once.
//! - Dropping the client stops all its tasks and closes all sockets. After a kernel restart the
//!   session makes a new client (old sockets do not reconnect).

use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;

use super::connection::ConnectionInfo;
use super::message::{Channel, Header, Message};

/// Errors of the wire client, each with what failed and where.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A socket could not connect to its endpoint.
    #[error("cannot connect {channel} socket to {endpoint}: {reason}")]
    Connect {
        /// Which channel.
        channel: &'static str,
        /// The endpoint tried.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// The kernel did not prove iopub live within the readiness timeout.
    #[error("kernel not ready after {0:?}: no kernel_info round trip with iopub status")]
    NotReady(Duration),
    /// The client's sockets are gone (kernel died or client closed).
    #[error("kernel connection closed")]
    Closed,
}

/// Something the kernel said (or the heartbeat noticed), in arrival order per channel.
#[derive(Debug)]
pub enum Incoming {
    /// A verified message from `channel` (shell, iopub, stdin or control).
    Message {
        /// Where it came from.
        channel: Channel,
        /// The message.
        msg: Message,
    },
    /// The heartbeat missed `heartbeat_misses` pings in a row.
    HeartbeatLost,
}

/// Tunables of the client.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// How long `connect` may take in all, readiness included.
    pub ready_timeout: Duration,
    /// Interval between heartbeat pings.
    pub heartbeat_interval: Duration,
    /// Consecutive missed pings before `HeartbeatLost`.
    pub heartbeat_misses: u32,
    /// Capacity of the bounded incoming channel.
    pub incoming_capacity: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            ready_timeout: Duration::from_secs(60),
            heartbeat_interval: Duration::from_secs(2),
            heartbeat_misses: 3,
            incoming_capacity: 4096,
        }
    }
}

/// A connected, ready kernel client.
pub struct KernelClient {
    session: String,
    kernel_info: Value,
}

impl KernelClient {
    /// Connects every channel and waits until the kernel is proven ready (see module docs).
    /// Returns the client and the receiver of everything the kernel says.
    pub async fn connect(
        info: &ConnectionInfo,
        opts: ClientOptions,
    ) -> Result<(KernelClient, mpsc::Receiver<Incoming>), KernelError> {
        let _ = (info, opts);
        todo!("wire client")
    }

    /// Our Jupyter session id (the `session` field of headers we send).
    pub fn session_id(&self) -> &str {
        &self.session
    }

    /// The content of the `kernel_info_reply` read during readiness.
    pub fn kernel_info(&self) -> &Value {
        &self.kernel_info
    }

    /// Signs and sends a message built by the caller on `channel` (shell, control or stdin).
    /// Returns the header's `msg_id`.
    pub async fn send(&self, channel: Channel, msg: Message) -> Result<String, KernelError> {
        let _ = (channel, msg);
        todo!("wire client")
    }

    /// Convenience: builds a message of `msg_type` with `content` (and optional parent) in our
    /// session and sends it on `channel`. Returns the `msg_id`.
    pub async fn request(
        &self,
        channel: Channel,
        msg_type: &str,
        content: Value,
        parent: Option<&Header>,
    ) -> Result<String, KernelError> {
        let mut msg = Message::new(msg_type, &self.session, content);
        msg.parent_header = parent.cloned();
        self.send(channel, msg).await
    }
}
