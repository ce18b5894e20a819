//! `kernelbox serve` as a child process: for tests whose fault ends or restarts the server
//! itself (a SIGKILL, an abort), which an in-process server cannot survive.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long a server may take to start listening.
pub const SERVER_TIMEOUT: Duration = Duration::from_secs(60);

/// A running `kernelbox serve`: the child, the address it announced on stderr, and everything
/// it has logged so far (collected by a task, so the pipe never fills).
pub struct ServeProcess {
    /// The server process (killed on drop).
    pub child: Child,
    /// `host:port` it serves on.
    pub addr: String,
    /// Its stderr so far.
    pub log: Arc<Mutex<String>>,
}

impl ServeProcess {
    /// Spawns `command` (a `kernelbox serve …` with its arguments and environment set) with
    /// stderr piped, and waits until it announces where it serves; panics with its log if it
    /// does not within [`SERVER_TIMEOUT`].
    pub async fn spawn(mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start kernelbox serve");
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(String::new()));
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        let sink = log.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            let mut addr_tx = Some(addr_tx);
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.strip_prefix("kernelbox: serving on http://")
                    && let Some(addr) = rest.split('/').next()
                    && let Some(tx) = addr_tx.take()
                {
                    let _ = tx.send(addr.to_owned());
                }
                if let Ok(mut log) = sink.lock() {
                    log.push_str(&line);
                    log.push('\n');
                }
            }
        });
        let addr = match tokio::time::timeout(SERVER_TIMEOUT, addr_rx).await {
            Ok(Ok(addr)) => addr,
            _ => panic!(
                "the server did not start listening:\n{}",
                log.lock().map(|l| l.clone()).unwrap_or_default()
            ),
        };
        Self { child, addr, log }
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }
}
