//! Test helper: a real ipykernel process with its own connection file, temp dir and IPython dir,
//! killed when dropped. Shared by `tests/kernel_*.rs` via
//! `#[path]` so no `tests/common/mod.rs` is claimed.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use kernelbox::kernel::{Channel, ConnectionInfo, Incoming, Message, Transport};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The Python with ipykernel: `$KERNELBOX_PYTHON`, else `${XDG_CACHE_HOME:-~/.cache}/kernelbox/venv/bin/python`.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("KERNELBOX_PYTHON") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    let p = cache.join("kernelbox/venv/bin/python");
    assert!(
        p.exists(),
        "no Python with ipykernel: set KERNELBOX_PYTHON to one (tried fallback {})",
        p.display()
    );
    p
}

/// A running kernel process; killed (and its temp dir removed) on drop.
pub struct TestKernel {
    /// The kernel process.
    pub child: Child,
    /// Where it listens, with its key.
    pub info: ConnectionInfo,
    dir: PathBuf,
}

impl Drop for TestKernel {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl TestKernel {
    /// Starts a kernel on ipc sockets in a fresh temp dir, with a random key and no history
    /// database (lighter for tests).
    pub fn start_ipc() -> Self {
        Self::start_ipc_with(&["--HistoryManager.enabled=False"])
    }

    /// Starts a kernel on tcp 127.0.0.1 with five free ports and no history database.
    pub fn start_tcp() -> Self {
        Self::start_tcp_with(&["--HistoryManager.enabled=False"])
    }

    /// Starts a kernel on ipc sockets in a fresh temp dir with extra kernel flags.
    pub fn start_ipc_with(extra: &[&str]) -> Self {
        let dir = temp_dir();
        let info = ConnectionInfo::ipc(&dir.join("k"), ConnectionInfo::random_key());
        Self::start(info, dir, extra)
    }

    /// Starts a kernel on tcp 127.0.0.1 with five free ports and extra kernel flags.
    pub fn start_tcp_with(extra: &[&str]) -> Self {
        let dir = temp_dir();
        let ports = free_ports();
        let info = ConnectionInfo {
            transport: Transport::Tcp,
            ip: "127.0.0.1".into(),
            shell_port: ports[0],
            iopub_port: ports[1],
            stdin_port: ports[2],
            control_port: ports[3],
            hb_port: ports[4],
            key: ConnectionInfo::random_key(),
            signature_scheme: "hmac-sha256".into(),
            kernel_name: "python3".into(),
            socket_owner: None,
        };
        Self::start(info, dir, extra)
    }

    /// Writes `info` as the connection file in `dir` and launches ipykernel on it, with an
    /// IPython dir of its own (no shared history database) and `extra` command-line flags.
    pub fn start(info: ConnectionInfo, dir: PathBuf, extra: &[&str]) -> Self {
        let file = dir.join("connection.json");
        std::fs::write(&file, serde_json::to_vec(&info).unwrap()).unwrap();
        let child = Command::new(python())
            .args(["-m", "ipykernel_launcher", "-f"])
            .arg(&file)
            .args(extra)
            .env("IPYTHONDIR", dir.join("ipython"))
            .env("PYDEVD_DISABLE_FILE_VALIDATION", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", python().display()));
        Self { child, info, dir }
    }

    /// The kernel's process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("kernel already reaped")
    }

    /// Sends a signal by name (`STOP`, `CONT`, `KILL`) with kill(1).
    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} failed");
    }
}

fn temp_dir() -> PathBuf {
    let short = &uuid::Uuid::new_v4().simple().to_string()[..12];
    let dir = std::env::temp_dir().join(format!("kb-{short}"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Five distinct free tcp ports (bound together, then released).
fn free_ports() -> Vec<u16> {
    let listeners: Vec<_> = (0..5)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// Reads `Incoming` until `done` says so, failing the test with what was seen on timeout or
/// close. Returns every message read (the last one included).
pub async fn read_until(
    rx: &mut mpsc::Receiver<Incoming>,
    within: Duration,
    mut done: impl FnMut(&Incoming) -> bool,
) -> Vec<Incoming> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(item)) => {
                let stop = done(&item);
                seen.push(item);
                if stop {
                    return seen;
                }
            }
            Ok(None) => panic!("incoming channel closed; seen: {}", summary(&seen)),
            Err(_) => panic!("timed out after {within:?}; seen: {}", summary(&seen)),
        }
    }
}

/// Reads until both the iopub `idle` status and the shell reply to `msg_id` have arrived.
/// Returns the messages whose parent is `msg_id`, with their channel.
pub async fn read_reply(
    rx: &mut mpsc::Receiver<Incoming>,
    msg_id: &str,
    within: Duration,
) -> Vec<(Channel, Message)> {
    let (mut idle, mut reply) = (false, false);
    let seen = read_until(rx, within, |item| {
        if let Incoming::Message { channel, msg } = item
            && msg.parent_id() == Some(msg_id)
        {
            idle |= *channel == Channel::IoPub
                && msg.msg_type() == "status"
                && msg.content["execution_state"] == "idle";
            reply |= *channel == Channel::Shell;
        }
        idle && reply
    })
    .await;
    seen.into_iter()
        .filter_map(|item| match item {
            Incoming::Message { channel, msg } if msg.parent_id() == Some(msg_id) => {
                Some((channel, std::sync::Arc::unwrap_or_clone(msg)))
            }
            _ => None,
        })
        .collect()
}

/// One line per item: `channel/msg_type`, for failure messages.
pub fn summary(seen: &[Incoming]) -> String {
    seen.iter()
        .map(|item| match item {
            Incoming::Message { channel, msg } => {
                format!("{}/{}", channel.as_str(), msg.msg_type())
            }
            Incoming::HeartbeatLost => "heartbeat-lost".into(),
            Incoming::Fault(fault) => format!("fault: {fault}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}
