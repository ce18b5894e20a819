//! Connection info: the standard Jupyter connection-file JSON that tells a kernel where to bind
//! and which key signs its messages.
//!
//! CONTRACT (skeleton; the wire-client work fills in the bodies):
//! - `ConnectionInfo` (de)serialises exactly as a Jupyter connection file
//!   (`transport`, `ip`, `shell_port`, `iopub_port`, `stdin_port`, `control_port`, `hb_port`,
//!   `key`, `signature_scheme`, `kernel_name`).
//! - ipc endpoints are `ipc://{ip}-{port}`; tcp ones `tcp://{ip}:{port}`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::message::Channel;

/// Which ZeroMQ transport the kernel binds: ipc (unix sockets, the sandbox default) or tcp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// `tcp://ip:port`
    Tcp,
    /// `ipc://ip-port`, where `ip` is a filesystem path prefix.
    Ipc,
}

/// A Jupyter connection file: where each of the five channels lives and the signing key.
///
/// Its `Debug` shows everything but the key (`key: "<redacted>"`), so that a connection (or
/// anything holding one, like a [`PersistedKernel`](crate::sandbox::PersistedKernel)) can be
/// logged without handing out what lets anyone sign messages the kernel runs.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionInfo {
    /// tcp or ipc.
    pub transport: Transport,
    /// Host address (tcp) or socket path prefix (ipc).
    pub ip: String,
    /// Shell channel port (or ipc suffix).
    pub shell_port: u16,
    /// IOPub channel port (or ipc suffix).
    pub iopub_port: u16,
    /// Stdin channel port (or ipc suffix).
    pub stdin_port: u16,
    /// Control channel port (or ipc suffix).
    pub control_port: u16,
    /// Heartbeat port (or ipc suffix).
    pub hb_port: u16,
    /// The HMAC key, used as its ASCII bytes (not hex-decoded). Empty disables signing.
    pub key: String,
    /// Always `hmac-sha256` for us.
    pub signature_scheme: String,
    /// Informational kernel name.
    #[serde(default)]
    pub kernel_name: String,
    /// The uid that must own the kernel's ipc sockets (the sandbox's kernel user), when the
    /// sandbox knows it: the client connects only to a socket of that owner, never to one that
    /// something else put at the path. Not part of the connection file.
    #[serde(skip)]
    pub socket_owner: Option<u32>,
}

/// What the redacting `Debug` shows instead of a key (an empty key is shown as empty: it signs
/// nothing).
const REDACTED: &str = "<redacted>";

impl std::fmt::Debug for ConnectionInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionInfo")
            .field("transport", &self.transport)
            .field("ip", &self.ip)
            .field("shell_port", &self.shell_port)
            .field("iopub_port", &self.iopub_port)
            .field("stdin_port", &self.stdin_port)
            .field("control_port", &self.control_port)
            .field("hb_port", &self.hb_port)
            .field("key", &if self.key.is_empty() { "" } else { REDACTED })
            .field("signature_scheme", &self.signature_scheme)
            .field("kernel_name", &self.kernel_name)
            .field("socket_owner", &self.socket_owner)
            .finish()
    }
}

impl ConnectionInfo {
    /// An ipc connection whose sockets are `{prefix}-1` … `{prefix}-5`, with `key`.
    pub fn ipc(prefix: &Path, key: String) -> Self {
        Self {
            transport: Transport::Ipc,
            ip: prefix.to_string_lossy().into_owned(),
            shell_port: 1,
            iopub_port: 2,
            stdin_port: 3,
            control_port: 4,
            hb_port: 5,
            key,
            signature_scheme: "hmac-sha256".to_owned(),
            kernel_name: String::new(),
            socket_owner: None,
        }
    }

    /// The port (tcp) or socket-path suffix (ipc) of one channel.
    pub fn port(&self, channel: Channel) -> u16 {
        match channel {
            Channel::Shell => self.shell_port,
            Channel::IoPub => self.iopub_port,
            Channel::Stdin => self.stdin_port,
            Channel::Control => self.control_port,
            Channel::Heartbeat => self.hb_port,
        }
    }

    /// The unix socket path of one channel of an ipc connection (`{ip}-{port}`).
    pub fn ipc_path(&self, channel: Channel) -> std::path::PathBuf {
        format!("{}-{}", self.ip, self.port(channel)).into()
    }

    /// The ZeroMQ endpoint of one channel.
    pub fn endpoint(&self, channel: Channel) -> String {
        let port = self.port(channel);
        match self.transport {
            Transport::Tcp => format!("tcp://{}:{}", self.ip, port),
            Transport::Ipc => format!("ipc://{}-{}", self.ip, port),
        }
    }

    /// A fresh random key: 32 random bytes, hex encoded (64 ASCII characters).
    pub fn random_key() -> String {
        hex::encode(rand::random::<[u8; 32]>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_key() {
        let key = ConnectionInfo::random_key();
        let info = ConnectionInfo::ipc(Path::new("/tmp/k"), key.clone());
        let shown = format!("{info:?} {info:#?}");
        assert!(!shown.contains(&key), "{shown}");
        assert!(shown.contains(REDACTED), "{shown}");
        assert!(shown.contains("/tmp/k"), "the rest is still shown: {shown}");
    }
}
