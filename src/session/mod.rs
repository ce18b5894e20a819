//! Sessions: a session is one kernel + its ordered execution queue, its subscribers and its
//! lifecycle. The [`SessionManager`] holds them all; each runs as one actor task.

mod actor;
pub mod changed_files;
pub mod events;
mod fanout;
mod handle;
pub mod manager;
mod pool;

use std::time::Duration;

use tokio::sync::mpsc;

/// File types the session's file methods take and give (defined by the sandbox layer).
pub use crate::sandbox::files::{
    ByteStream, Download, FileEntry, FilesError, Listing, MAX_LIST_ENTRIES, WorkPath,
};
pub use changed_files::ChangedFile;
pub use events::{EventKind, InstallEvent, KernelState, SessionEvent};
pub use fanout::{ReplayLimits, Subscription};
pub use handle::{CodeQuery, ExecuteRequest, Session, SessionError, SessionInfo};
pub use manager::{CREATE_INSTALL_ID, CreateSession, SessionManager};

use crate::kernel::{ClientOptions, Incoming, KernelClient};
use crate::sandbox::KernelProcess;

/// Tunables of every session.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Wire-client options (readiness timeout, heartbeat).
    pub client: ClientOptions,
    /// Cells that may wait behind the running one.
    pub max_queue: usize,
    /// Events a subscriber may fall behind before it is told it lost some.
    pub subscriber_capacity: usize,
    /// How long a control-channel interrupt may take before SIGINT is sent instead.
    pub interrupt_grace: Duration,
    /// Most sessions the server runs at once.
    pub max_sessions: usize,
    /// Ready kernels kept waiting for new sessions (0: none).
    pub pool_size: usize,
    /// What each session keeps for clients that reconnect and resume.
    pub replay: ReplayLimits,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            client: ClientOptions::default(),
            max_queue: 1000,
            subscriber_capacity: 4096,
            interrupt_grace: Duration::from_secs(1),
            max_sessions: 256,
            pool_size: 0,
            replay: ReplayLimits {
                events: 10_000,
                bytes: 8 << 20,
            },
        }
    }
}

/// A kernel handed to a session: its process, and a connected ready client when it comes
/// from the warm pool.
pub(crate) struct Kernel {
    pub id: std::sync::Arc<str>,
    pub process: Box<dyn KernelProcess>,
    pub client: Option<(KernelClient, mpsc::Receiver<Incoming>)>,
}
