//! Sessions: a session is one kernel + its ordered execution queue, its subscribers and its
//! lifecycle. The [`SessionManager`] holds them all; each runs as one actor task.

mod actor;
pub mod changed_files;
pub mod events;
mod fanout;
mod handle;
pub mod manager;
pub mod metrics;
mod pool;
pub mod store;

use std::time::Duration;

use tokio::sync::mpsc;

/// File types the session's file methods take and give (defined by the sandbox layer).
pub use crate::sandbox::files::{
    ByteStream, Download, FileEntry, FilesError, Listing, MAX_LIST_ENTRIES, WorkPath,
};
pub use changed_files::ChangedFile;
pub use events::{EventKind, InstallEvent, KernelState, SessionEvent};
pub use fanout::{RecvError, ReplayLimits, Subscriber, Subscription};
// What the session layer's API hands up from below: the kernel messages its events carry and the
// sandbox's words for kernels and their failures, so the front needs no layer but this one.
pub use crate::kernel::{Channel, Content, Header, Message};
pub use crate::sandbox::{InstallError, KernelCommand, SandboxError};
pub use handle::{CodeQuery, ExecuteRequest, Session, SessionError, SessionInfo};
pub use manager::{CREATE_INSTALL_ID, CreateSession, Readiness, SessionManager, Startup};
pub use store::{SessionStore, StoreError, StoredSession};

use crate::kernel::{ClientOptions, Incoming, KernelClient};
use crate::sandbox::KernelProcess;

/// Tunables of every session.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Wire-client options (readiness timeout, heartbeat).
    pub client: ClientOptions,
    /// Cells that may wait behind the running one.
    pub max_queue: usize,
    /// How long a control-channel interrupt may take before SIGINT is sent instead.
    pub interrupt_grace: Duration,
    /// Most sessions the server runs at once.
    pub max_sessions: usize,
    /// Ready kernels kept waiting for new sessions (0: none).
    pub pool_size: usize,
    /// What each session keeps for clients that reconnect and resume.
    pub replay: ReplayLimits,
    /// Time limit for cells that set none themselves (`None`: unlimited).
    pub default_cell_timeout: Option<Duration>,
    /// How long a timed-out cell may take to stop after its interrupt before the kernel is
    /// restarted instead.
    pub timeout_restart_grace: Duration,
    /// Idle sessions are closed after this long without activity (`None`: never). Busy,
    /// starting and restarting sessions are never culled.
    pub cull_idle: Option<Duration>,
    /// Whether sessions with a connected client may be culled too.
    pub cull_connected: bool,
    /// Output bytes a cell may produce (stream text, rich data, tracebacks); beyond it, output
    /// is dropped and the client told how much.
    pub max_cell_output_bytes: usize,
    /// Bytes of code and forwarded Jupyter messages a session may hold queued (cells until they
    /// are sent to the kernel); beyond it new ones are refused (`SessionError::QueueFull`).
    pub max_queued_bytes: usize,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            client: ClientOptions::default(),
            max_queue: 1000,
            max_queued_bytes: 64 << 20,
            interrupt_grace: Duration::from_secs(1),
            max_sessions: 256,
            pool_size: 0,
            replay: ReplayLimits {
                events: 10_000,
                bytes: 8 << 20,
            },
            default_cell_timeout: None,
            timeout_restart_grace: Duration::from_secs(5),
            cull_idle: None,
            cull_connected: false,
            max_cell_output_bytes: 64 << 20,
        }
    }
}

/// A kernel handed to a session: its process, and a connected ready client when it comes
/// from the warm pool.
pub(crate) struct Kernel {
    pub id: std::sync::Arc<str>,
    pub process: Box<dyn KernelProcess>,
    pub client: Option<(KernelClient, mpsc::Receiver<Incoming>)>,
    /// Whether the kernel was taken over from a previous server process (it may be busy with a
    /// cell that ran across the restart).
    pub adopted: bool,
}
