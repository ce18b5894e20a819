//! Where kernels run: a Docker container per session ([`docker`], the default) or a plain local
//! process ([`local`], for development and machines with no Docker engine). Knows nothing of
//! WebSockets or sessions' clients: it starts, watches, signals and stops kernel processes.

pub mod docker;
pub mod files;
pub mod local;
pub mod packages;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::kernel::ConnectionInfo;
pub use files::{FileEntry, FilesError, SessionFiles, WorkPath};
pub use packages::{InstallError, PackageInstaller, PackagePolicy};

/// Why a kernel is no longer running, as clients are told it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// Killed by the out-of-memory killer (container OOMKilled).
    OutOfMemory,
    /// The process exited with this code.
    ExitCode(i64),
    /// The process was killed by this signal (local processes).
    Signal(i32),
    /// The heartbeat stopped answering (noticed by the session, not the sandbox).
    HeartbeatLost,
    /// The sandbox vanished or could not be watched (e.g. container removed from outside).
    Vanished(String),
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::OutOfMemory => f.write_str("out of memory"),
            ExitReason::ExitCode(code) => write!(f, "exited with code {code}"),
            ExitReason::Signal(sig) => write!(f, "killed by signal {sig}"),
            ExitReason::HeartbeatLost => f.write_str("heartbeat lost"),
            ExitReason::Vanished(why) => write!(f, "sandbox gone: {why}"),
        }
    }
}

/// Errors of a sandbox backend, with what was attempted.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The backend cannot be used at all (no engine, no python, no image): `hint` says what to do.
    #[error("{what} is unavailable: {reason}. {hint}")]
    Unavailable {
        /// The missing thing.
        what: String,
        /// Why.
        reason: String,
        /// What the operator should run or set.
        hint: String,
    },
    /// Starting a kernel failed.
    #[error("cannot start kernel: {0}")]
    Launch(String),
    /// A lifecycle operation on a running kernel failed.
    #[error("cannot {op} kernel: {reason}")]
    Control {
        /// interrupt, restart or shutdown.
        op: &'static str,
        /// Why.
        reason: String,
    },
    /// The request asked for something the operator's policy forbids.
    #[error("not allowed: {0}")]
    Policy(String),
    /// The engine that runs the kernels does not answer (stopped, restarting, socket gone):
    /// nothing that needs it can be done until it is back.
    #[error("{what} is unreachable: {reason}")]
    Unreachable {
        /// The engine (`the Docker engine`).
        what: &'static str,
        /// What failed, with the underlying cause.
        reason: String,
    },
    /// A kernel a previous server process left cannot be taken over (gone, stopped, not ours).
    #[error("cannot adopt kernel: {0}")]
    NotAdoptable(String),
    /// Filesystem trouble (connection dirs, files).
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// A kernel other than the backend's default one (what a Jupyter kernelspec names): the image it
/// lives in and the command that starts it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelCommand {
    /// Container image (Docker backend); `None`: the configured kernel image.
    pub image: Option<String>,
    /// The command starting the kernel, with [`CONNECTION_FILE_ARG`] standing for the path of the
    /// connection file; empty: the backend's default (ipykernel).
    pub argv: Vec<String>,
}

/// The placeholder in [`KernelCommand::argv`] for the connection file (as in Jupyter's kernel.json).
pub const CONNECTION_FILE_ARG: &str = "{connection_file}";

impl KernelCommand {
    /// `argv` with the connection file's path in place of [`CONNECTION_FILE_ARG`].
    pub fn argv_with(&self, connection_file: &str) -> Vec<String> {
        self.argv
            .iter()
            .map(|a| a.replace(CONNECTION_FILE_ARG, connection_file))
            .collect()
    }
}

/// What one session asks of the sandbox.
#[derive(Debug, Clone, Default)]
pub struct LaunchSpec {
    /// The session id; containers are labelled with it, directories named after it.
    pub session_id: String,
    /// Whether the kernel may reach the network (only if the operator's policy allows it).
    pub network: bool,
    /// Extra environment variables for the kernel.
    pub env: BTreeMap<String, String>,
    /// Which kernel to start (default: the backend's ipykernel).
    pub kernel: KernelCommand,
}

/// What a server process must remember of a running kernel so that the next server process can
/// take it over ([`Sandbox::adopt`]) after a restart: the session layer stores it as it is.
/// Contains the kernel's signing key: store it where only the server can read it. Its `Debug`
/// redacts the key, in the connection and wherever the backend's details repeat it.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct PersistedKernel {
    /// The backend that launched the kernel ([`Sandbox::name`]); only that backend adopts it.
    pub backend: String,
    /// The session the kernel was launched for ([`LaunchSpec::session_id`]).
    pub session_id: String,
    /// Where the kernel listens and its key (the server side's view).
    pub connection: ConnectionInfo,
    /// What else the backend needs (container ids, volume, how to recreate the container),
    /// opaque to every other layer.
    pub details: serde_json::Value,
}

impl fmt::Debug for PersistedKernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The details hold the connection file (ipc) or the kernel's command line (tcp), both
        // with the key in them.
        let details = self.details.to_string();
        let details = if self.connection.key.is_empty() {
            details
        } else {
            details.replace(&self.connection.key, "<redacted>")
        };
        f.debug_struct("PersistedKernel")
            .field("backend", &self.backend)
            .field("session_id", &self.session_id)
            .field("connection", &self.connection)
            .field("details", &details)
            .finish()
    }
}

/// A backend that can start kernels.
#[async_trait]
pub trait Sandbox: Send + Sync + 'static {
    /// A short name for logs and `/healthz` (`docker`, `local`).
    fn name(&self) -> &'static str;

    /// Starts one kernel with a fresh random key. Returns once the kernel process has been
    /// started (not necessarily listening yet: the kernel client proves readiness).
    async fn launch(&self, spec: &LaunchSpec) -> Result<Box<dyn KernelProcess>, SandboxError>;

    /// Takes over a kernel that a previous server process launched and left running, from what
    /// [`KernelProcess::persisted`] described. Fails with [`SandboxError::NotAdoptable`] when the
    /// kernel is gone (the caller forgets it) and [`SandboxError::Unreachable`] when the engine
    /// cannot tell (the caller may try again later). Backends whose kernels cannot outlive the
    /// server (local processes) refuse.
    async fn adopt(
        &self,
        kernel: &PersistedKernel,
    ) -> Result<Box<dyn KernelProcess>, SandboxError> {
        Err(SandboxError::NotAdoptable(format!(
            "the {} backend cannot take over kernels of session {} from another server process",
            self.name(),
            kernel.session_id
        )))
    }

    /// Whether the backend can start kernels now, checked cheaply and quickly (for `/readyz`):
    /// Docker pings its engine, the local backend checks its python is there. Ready by default.
    async fn ready(&self) -> Result<(), SandboxError> {
        Ok(())
    }

    /// Whether the operator lets sessions install packages (see [`PackagePolicy`]).
    fn installs_packages(&self) -> bool {
        false
    }

    /// How isolated kernels are, for `/healthz`: state names only (no paths, addresses or
    /// versions), so that an unauthenticated probe learns nothing about the host. Default: not
    /// isolated.
    fn isolation(&self) -> serde_json::Value {
        serde_json::json!({"isolated": false})
    }

    /// Removes whatever this server instance left behind (called at start and at shutdown).
    /// Returns how many kernels were removed.
    async fn cleanup(&self) -> Result<usize, SandboxError> {
        self.cleanup_except(&HashSet::new()).await
    }

    /// Like [`cleanup`](Self::cleanup), but keeps the kernels (and everything else) of the
    /// sessions in `keep`: the ones a restarted server has just re-adopted.
    async fn cleanup_except(&self, keep: &HashSet<String>) -> Result<usize, SandboxError> {
        let _ = keep;
        Ok(0)
    }
}

/// One running kernel (process or container) as the sandbox sees it.
#[async_trait]
pub trait KernelProcess: Send + Sync + 'static {
    /// Where the kernel listens and the key it signs with. Stable across [`restart`](Self::restart).
    fn connection(&self) -> &ConnectionInfo;

    /// Resolves when the current kernel process has exited, with why. Cancel-safe, may be called
    /// repeatedly and concurrently; after a restart it tracks the new process.
    async fn exited(&self) -> ExitReason;

    /// Whether the kernel process (container) is still there: asked when the kernel stops
    /// answering (a lost heartbeat), before it is declared dead. `Some(true)`: it runs (a
    /// stopped or CPU-starved process does); `Some(false)`: it is gone; `None`: cannot tell
    /// (an engine that does not answer; the default, for backends that cannot tell). Answers
    /// quickly (bounded).
    async fn is_alive(&self) -> Option<bool> {
        None
    }

    /// Delivers SIGINT to the kernel process (fallback when a control interrupt does not land).
    async fn signal_interrupt(&self) -> Result<(), SandboxError>;

    /// Kills the kernel process and starts a fresh one with the same connection info.
    async fn restart(&self) -> Result<(), SandboxError>;

    /// Stops the kernel and removes everything it had (process, container, directories).
    /// Idempotent.
    async fn shutdown(&self) -> Result<(), SandboxError>;

    /// What the next server process needs to [adopt](Sandbox::adopt) this kernel, or `None`
    /// when the backend's kernels cannot outlive the server (the default).
    async fn persisted(&self) -> Option<PersistedKernel> {
        None
    }

    /// Lets go of the kernel without stopping it, so that the next server process can adopt it
    /// (graceful shutdown of a server that persists its sessions). Afterwards this handle does
    /// nothing and dropping it removes nothing. Backends whose kernels cannot outlive the server
    /// stop them instead (the default).
    async fn detach(&self) -> Result<(), SandboxError> {
        self.shutdown().await
    }

    /// Access to the kernel's working directory, usable whatever state the kernel is in;
    /// `None` when the backend offers none.
    fn files(&self) -> Option<Arc<dyn SessionFiles>> {
        None
    }

    /// The kernel's working directory as the kernel itself sees it (its initial current
    /// directory), for code that runs inside the kernel; `None` when unknown.
    fn kernel_work_dir(&self) -> Option<String> {
        None
    }

    /// Installs packages into this kernel's own environment; `None` when the backend cannot.
    fn packages(&self) -> Option<Arc<dyn PackageInstaller>> {
        None
    }
}
