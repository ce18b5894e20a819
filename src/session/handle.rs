//! The handle the API holds on a session: it queues commands for the session's actor and lets
//! clients subscribe to its events. Cheap to share; never touches the kernel itself.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot};

use super::events::KernelState;
use super::fanout::{Fanout, Subscriber, Subscription};
use crate::kernel::{Channel, Message};
use crate::sandbox::files::{
    ByteStream, Download, FileEntry, FilesError, Listing, SessionFiles, WorkPath,
};

/// A cell to run.
#[derive(Debug, Clone)]
pub struct ExecuteRequest {
    /// The client's id for the cell; every event of the cell carries it.
    pub cell: Arc<str>,
    /// The code.
    pub code: String,
    /// Run without broadcasting output or counting it (Jupyter's `silent`).
    pub silent: bool,
    /// Record the cell in the kernel's history.
    pub store_history: bool,
    /// Whether the cell may call `input()`.
    pub allow_stdin: bool,
    /// Interrupt the cell when it runs longer than this.
    pub timeout: Option<Duration>,
}

/// A completion or inspection request.
#[derive(Debug, Clone)]
pub struct CodeQuery {
    /// The client's id for the request; the reply carries it.
    pub id: Arc<str>,
    /// The code around the cursor.
    pub code: String,
    /// Cursor position in unicode code points.
    pub cursor: usize,
    /// Inspection detail (0 or 1); ignored for completion.
    pub detail_level: u8,
}

/// A session's budget of bytes held in queued cells and forwarded messages, so that a client
/// cannot make the server hold its command queue's 1,000+ slots × 16 MiB (a WebSocket message's
/// limit) of code. Shared by the session's handle (which reserves) and its actor (whose
/// [`Queued`] reservations give the bytes back).
#[derive(Debug)]
pub(crate) struct QueueBudget {
    used: AtomicUsize,
    limit: usize,
}

impl QueueBudget {
    /// A budget of `limit` bytes.
    pub(crate) fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            limit,
        })
    }

    /// Bytes held now.
    #[cfg(test)]
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// Reserves `bytes`, or says how many are held already. A command alone in the queue is
    /// always admitted, so one cell larger than the budget still runs.
    fn reserve(self: &Arc<Self>, bytes: usize) -> Result<Queued, usize> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used == 0 || used.saturating_add(bytes) <= self.limit)
                    .then(|| used.saturating_add(bytes))
            })
            .map(|_| Queued {
                budget: Some(self.clone()),
                bytes,
            })
    }
}

/// Bytes of a [`QueueBudget`] held by one queued command; given back when dropped (the cell was
/// sent to the kernel, refused or aborted; the message was forwarded or dropped).
#[derive(Debug, Default)]
pub(crate) struct Queued {
    budget: Option<Arc<QueueBudget>>,
    bytes: usize,
}

impl Drop for Queued {
    fn drop(&mut self) {
        if let Some(budget) = self.budget.take() {
            budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
        }
    }
}

/// What the actor is asked to do.
#[derive(Debug)]
pub(crate) enum Command {
    /// A cell, with the queue bytes it holds until it is sent to the kernel.
    Execute(ExecuteRequest, Queued),
    Interrupt,
    Restart,
    InputReply(String),
    Complete(CodeQuery),
    Inspect(CodeQuery),
    IsComplete(CodeQuery),
    KernelInfo(CodeQuery),
    Forward {
        channel: Channel,
        msg: Box<Message>,
        origin: Arc<str>,
        /// The queue bytes the message holds until it is sent to the kernel (it may wait in
        /// the actor while the kernel starts).
        queued: Queued,
    },
    Install {
        id: Arc<str>,
        packages: Vec<String>,
        blocking: bool,
    },
    Close(oneshot::Sender<()>),
    /// Stop the actor but leave the kernel running, for the next server process to adopt.
    Detach(oneshot::Sender<()>),
}

/// Errors of session operations, each saying what the client should know.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The session has closed.
    #[error("session {0} is closed")]
    Closed(String),
    /// Too many commands are waiting.
    #[error("session {0} is overloaded: too many pending requests")]
    Overloaded(String),
    /// The cells and messages waiting hold the session's whole byte budget (`--max-queued-mb`).
    #[error(
        "session {id} is overloaded: queued cells and messages hold {queued} bytes, and this one \
         ({bytes} bytes) would exceed the session's budget of {limit} bytes; wait for queued \
         cells to run"
    )]
    QueueFull {
        /// The session.
        id: String,
        /// Bytes held by what is queued.
        queued: usize,
        /// Bytes of the refused command.
        bytes: usize,
        /// The budget.
        limit: usize,
    },
    /// No such session.
    #[error("no session {0}")]
    NotFound(String),
    /// The sandbox could not start a kernel.
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
    /// The server's session limit is reached.
    #[error("{0}")]
    Limit(String),
    /// The session could not be recorded in (or forgotten by) the session store.
    #[error("the session store failed: {0}")]
    Store(#[from] super::store::StoreError),
    /// A file operation failed.
    #[error(transparent)]
    Files(#[from] crate::sandbox::FilesError),
    /// A package install was refused.
    #[error(transparent)]
    Install(#[from] crate::sandbox::InstallError),
}

/// A point-in-time view of a session, for listings.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    /// Session id (a UUID).
    pub id: Arc<str>,
    /// Current kernel state.
    pub state: KernelState,
    /// When the session was created.
    pub created: DateTime<Utc>,
    /// When the session last received a command or produced output.
    pub last_activity: DateTime<Utc>,
    /// The kernel's latest execution count.
    pub execution_count: i64,
    /// Cells waiting behind the running one.
    pub queued: usize,
    /// Clients currently subscribed.
    pub connections: usize,
    /// The sandbox backend that runs the kernel.
    pub backend: &'static str,
    /// The kernelspec the session was started with.
    pub kernel_name: Arc<str>,
    /// The principal the session belongs to.
    pub owner: Option<Arc<str>>,
}

/// Mutable facts the actor updates and handles read.
#[derive(Debug)]
pub(crate) struct Status {
    pub state: KernelState,
    pub last_activity: DateTime<Utc>,
    pub execution_count: i64,
    pub queued: usize,
}

/// A session as the API sees it.
pub struct Session {
    pub(crate) id: Arc<str>,
    pub(crate) created: DateTime<Utc>,
    pub(crate) kernel_name: Arc<str>,
    pub(crate) owner: Option<Arc<str>>,
    pub(crate) backend: &'static str,
    pub(crate) commands: mpsc::Sender<Command>,
    pub(crate) fanout: Arc<Fanout>,
    pub(crate) status: Arc<Mutex<Status>>,
    /// The working directory's files, when the sandbox offers access.
    pub(crate) files: Option<Arc<dyn SessionFiles>>,
    /// Whether the operator lets sessions install packages.
    pub(crate) installs_allowed: bool,
    /// Bytes the queued cells and forwarded messages may hold.
    pub(crate) queue_budget: Arc<QueueBudget>,
}

impl Session {
    fn files(&self) -> Result<&Arc<dyn SessionFiles>, SessionError> {
        self.files
            .as_ref()
            .ok_or(SessionError::Files(FilesError::Unsupported))
    }

    /// The entries of directory `dir` of the session's working directory (usable whatever the
    /// kernel is doing).
    pub async fn list_files(&self, dir: &WorkPath) -> Result<Listing, SessionError> {
        Ok(self.files()?.list(dir).await?)
    }

    /// Opens file `path` of the working directory for download.
    pub async fn read_file(&self, path: &WorkPath) -> Result<Download, SessionError> {
        Ok(self.files()?.read(path).await?)
    }

    /// Creates or replaces file `path` of the working directory with `body` (at most `limit`
    /// bytes).
    pub async fn write_file(
        &self,
        path: &WorkPath,
        body: ByteStream,
        limit: u64,
    ) -> Result<FileEntry, SessionError> {
        Ok(self.files()?.write(path, body, limit).await?)
    }

    /// Removes file or directory `path` of the working directory.
    pub async fn delete_file(&self, path: &WorkPath) -> Result<(), SessionError> {
        Ok(self.files()?.delete(path).await?)
    }

    /// The session id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The principal the session belongs to, if any.
    pub fn owner(&self) -> Option<&Arc<str>> {
        self.owner.as_ref()
    }

    /// Receives every event from now on. A subscriber that falls behind the session's bounded
    /// event buffer is told how many events it lost ([`RecvError::Lagged`](super::RecvError));
    /// the kernel and the other subscribers never wait for it.
    pub fn subscribe(&self) -> Subscriber {
        self.fanout.subscribe(None).live
    }

    /// Like [`subscribe`](Self::subscribe), but first hands back the buffered events after
    /// sequence number `since` (what a reconnecting client missed), exactly once and in order,
    /// and how many of them the bounded replay buffer no longer held.
    pub fn subscribe_from(&self, since: Option<u64>) -> Subscription {
        self.fanout.subscribe(since)
    }

    /// Sequence number of the session's latest event (0 before the first).
    pub fn last_seq(&self) -> u64 {
        self.fanout.last_seq()
    }

    /// Sends a message a Jupyter client built (its own header, msg_id and session) to the kernel
    /// on `channel`, signed with the session's key. The kernel's answers carry that header as
    /// their parent; their events are tagged with `origin`.
    pub fn forward(
        &self,
        channel: Channel,
        msg: Message,
        origin: Arc<str>,
    ) -> Result<(), SessionError> {
        let queued = self.reserve(msg.estimated_size())?;
        self.send(Command::Forward {
            channel,
            msg: Box::new(msg),
            origin,
            queued,
        })
    }

    /// Queues a cell; cells run one at a time in the order they were queued.
    /// Refused ([`SessionError::QueueFull`]) when the cells waiting already hold the
    /// session's byte budget.
    pub fn execute(&self, request: ExecuteRequest) -> Result<(), SessionError> {
        let queued = self.reserve(request.code.len())?;
        self.send(Command::Execute(request, queued))
    }

    /// Reserves `bytes` of the session's queue budget for one command.
    fn reserve(&self, bytes: usize) -> Result<Queued, SessionError> {
        self.queue_budget
            .reserve(bytes)
            .map_err(|queued| SessionError::QueueFull {
                id: self.id.to_string(),
                queued,
                bytes,
                limit: self.queue_budget.limit,
            })
    }

    /// Interrupts the running cell (control channel, SIGINT as fallback).
    pub fn interrupt(&self) -> Result<(), SessionError> {
        self.send(Command::Interrupt)
    }

    /// Restarts the kernel: state is lost, running and queued cells are aborted.
    pub fn restart(&self) -> Result<(), SessionError> {
        self.send(Command::Restart)
    }

    /// Answers the kernel's pending `input()` prompt.
    pub fn input_reply(&self, value: String) -> Result<(), SessionError> {
        self.send(Command::InputReply(value))
    }

    /// Asks the kernel for completions at the cursor.
    pub fn complete(&self, query: CodeQuery) -> Result<(), SessionError> {
        self.send(Command::Complete(query))
    }

    /// Asks the kernel whether the code is a complete statement.
    pub fn is_complete(&self, query: CodeQuery) -> Result<(), SessionError> {
        self.send(Command::IsComplete(query))
    }

    /// Asks the kernel who it is (language, versions, banner); the reply carries `id`.
    pub fn kernel_info(&self, id: Arc<str>) -> Result<(), SessionError> {
        self.send(Command::KernelInfo(CodeQuery {
            id,
            code: String::new(),
            cursor: 0,
            detail_level: 0,
        }))
    }

    /// Asks the kernel for documentation of the object at the cursor.
    pub fn inspect(&self, query: CodeQuery) -> Result<(), SessionError> {
        self.send(Command::Inspect(query))
    }

    /// Installs `packages` (pip requirements) into the session's own environment. Progress
    /// comes as `Install` events tagged with `id`; cells keep running meanwhile. Refused at once
    /// when the operator disabled installs or a requirement is not a plain package name.
    pub fn install(&self, id: Arc<str>, packages: Vec<String>) -> Result<(), SessionError> {
        self.check_install(&packages)?;
        self.send(Command::Install {
            id,
            packages,
            blocking: false,
        })
    }

    /// Like [`install`](Self::install), but cells queued after it wait until it finished (the
    /// packages a session was created with).
    pub(crate) fn install_before_cells(
        &self,
        id: Arc<str>,
        packages: Vec<String>,
    ) -> Result<(), SessionError> {
        self.check_install(&packages)?;
        self.send(Command::Install {
            id,
            packages,
            blocking: true,
        })
    }

    fn check_install(&self, packages: &[String]) -> Result<(), SessionError> {
        if !self.installs_allowed {
            return Err(crate::sandbox::InstallError::Disabled.into());
        }
        crate::sandbox::packages::validate(packages)?;
        Ok(())
    }

    /// Stops the kernel and removes its sandbox; waits until that is done.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Stops the session's actor but leaves its kernel running (backends that can keep it) for
    /// the next server process to adopt; waits until that is done.
    pub async fn detach(&self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Detach(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// The state of the session's kernel now.
    pub fn state(&self) -> KernelState {
        self.status.lock().map_or(KernelState::Dead, |s| s.state)
    }

    /// The session's current state and counters.
    pub fn info(&self) -> SessionInfo {
        let (state, last_activity, execution_count, queued) = match self.status.lock() {
            Ok(s) => (s.state, s.last_activity, s.execution_count, s.queued),
            Err(_) => (KernelState::Dead, self.created, 0, 0),
        };
        SessionInfo {
            id: self.id.clone(),
            state,
            created: self.created,
            last_activity,
            execution_count,
            queued,
            connections: self.fanout.subscribers(),
            backend: self.backend,
            kernel_name: self.kernel_name.clone(),
            owner: self.owner.clone(),
        }
    }

    fn send(&self, command: Command) -> Result<(), SessionError> {
        self.commands.try_send(command).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SessionError::Overloaded(self.id.to_string()),
            mpsc::error::TrySendError::Closed(_) => SessionError::Closed(self.id.to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_admits_up_to_its_limit_and_gets_bytes_back() {
        let budget = QueueBudget::new(100);
        let a = budget.reserve(60).expect("fits");
        assert_eq!(budget.reserve(50).err(), Some(60), "60 + 50 > 100");
        let b = budget.reserve(40).expect("60 + 40 fits");
        assert_eq!(budget.used(), 100);
        drop(a);
        assert_eq!(budget.used(), 40);
        drop(b);
        assert_eq!(budget.used(), 0);
        let big = budget
            .reserve(1000)
            .expect("alone, a command larger than the budget runs");
        assert!(budget.reserve(1).is_err());
        drop(big);
        assert_eq!(budget.used(), 0);
    }
}
