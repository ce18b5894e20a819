//! The session actor: the one task that owns a session's kernel. It runs cells strictly in
//! submission order, one at a time, routes every kernel message to the cell it belongs to and
//! fans events out to subscribers without ever waiting on them.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::changed_files::{ChangedFile, FilesTracker};
use super::events::{EventKind, InstallEvent, KernelState, SessionEvent};
use super::fanout::Fanout;
use super::handle::{CodeQuery, Command, ExecuteRequest, Queued, Status};
use super::metrics::{self as m, Death, StartKind};
use super::{Kernel, SessionOptions};
use crate::kernel::{Channel, Header, Incoming, KernelClient, KernelError, Message};
use crate::sandbox::{ExitReason, InstallError, KernelProcess, PackageInstaller};

mod cells;
mod installs;
mod lifecycle;

use installs::{InstallUpdate, recv_install};

/// How many recently finished cells keep their routing, for late output from threads.
const RECENT_CELLS: usize = 64;

/// How long a cell whose `execute_reply` came waits for its iopub `idle` before it is finished
/// without it (`done` then says `idle_lost`), counted from the reply or from the latest iopub
/// message after it, whichever is later (iopub may lag behind shell during a burst of output;
/// only an iopub that went quiet without the idle counts as a loss). iopub is lossy by design:
/// ipykernel's XPUB drops messages past its 1,000-message high-water mark when its reader lags,
/// and the lost one may be the idle; without this bound the session would stay busy for ever.
pub(crate) const IDLE_GRACE: Duration = Duration::from_secs(2);

/// The cell the kernel is running now.
struct Running {
    cell: Arc<str>,
    msg_id: String,
    started: Instant,
    deadline: Option<Instant>,
    reply: Option<(String, Option<i64>)>,
    idle: bool,
    /// When the cell is finished without its `idle` (set when its reply came first).
    idle_wait: Option<Instant>,
    /// The `idle` never came: the cell was finished `IDLE_GRACE` after its reply.
    idle_lost: bool,
    timed_out: bool,
    /// When a timed-out cell that has not stopped gets its kernel restarted.
    restart_at: Option<Instant>,
    /// Output bytes relayed so far, and what was dropped past the cap.
    output_bytes: usize,
    dropped_bytes: usize,
    dropped_messages: usize,
    /// Files under `output/` the cell created or changed (from the execute_reply).
    files: Option<Vec<ChangedFile>>,
    /// The cell's span (session and cell id), the parent of what is logged about it.
    span: tracing::Span,
}

/// A kernel whose heartbeat was lost while its process is still there: it is asked on control
/// (`kernel_info_request`) until it answers or its process goes.
struct Unresponsive {
    /// When the heartbeat was lost.
    since: Instant,
    /// The msg_id of the latest control probe.
    probe: Option<String>,
    /// When the process is checked again (and a new probe sent) if the kernel is still silent.
    recheck: Instant,
    /// Whether clients were told (a `kernel` event) that the kernel is unresponsive.
    announced: bool,
}

/// A connection attempt in flight.
type Connecting = std::pin::Pin<
    Box<dyn Future<Output = Result<(KernelClient, mpsc::Receiver<Incoming>), KernelError>> + Send>,
>;

pub(crate) struct Actor {
    id: Arc<str>,
    opts: SessionOptions,
    commands: mpsc::Receiver<Command>,
    fanout: Arc<Fanout>,
    status: Arc<Mutex<Status>>,
    seq: u64,
    /// Whether the first state event went out (it always does, even if the state is unchanged).
    announced: bool,
    state: KernelState,
    process: Box<dyn KernelProcess>,
    client: Option<KernelClient>,
    incoming: Option<mpsc::Receiver<Incoming>>,
    connecting: Option<Connecting>,
    watching_exit: bool,
    queue: VecDeque<(ExecuteRequest, Queued)>,
    running: Option<Running>,
    queries: HashMap<String, Arc<str>>,
    recent: VecDeque<(String, Arc<str>)>,
    input_parent: Option<Header>,
    interrupt_deadline: Option<Instant>,
    /// Set while a kernel whose heartbeat was lost is being rechecked.
    unresponsive: Option<Unresponsive>,
    /// Client-built messages waiting for the kernel to be ready.
    forwards: VecDeque<(Channel, Message, Arc<str>, Queued)>,
    /// Completion/inspection queries waiting for the kernel to be ready.
    pending_queries: VecDeque<(&'static str, Value, CodeQuery)>,
    /// The kernel's files hook, for `done.files` (when the kernel's working dir is known).
    files: Option<FilesTracker>,
    /// Package installs: the backend's installer, what waits, what runs and its updates.
    installer: Option<Arc<dyn PackageInstaller>>,
    installs: VecDeque<(Arc<str>, Vec<String>, bool)>,
    install_running: Option<(Arc<str>, bool, tokio::task::JoinHandle<()>)>,
    /// Where install tasks report (made with the first install: most sessions never have one).
    install_updates: Option<(mpsc::Sender<InstallUpdate>, mpsc::Receiver<InstallUpdate>)>,
    /// Blocking installs (asked for at creation) not finished yet: cells wait for them.
    blocking_installs: usize,
    /// Packages were installed since the kernel last refreshed its import caches.
    refresh_imports: bool,
    /// msg_ids of the session's own silent requests, whose messages nobody sees.
    internal: VecDeque<String>,
    /// The execute-duration histogram (a handle, so recording is one atomic push).
    cell_seconds: metrics::Histogram,
}

impl Actor {
    /// An actor for a kernel that is either ready (from the pool), just launched or just adopted.
    /// Its events are numbered from `last_seq + 1` (0 for a new session; where a previous server
    /// process left off for an adopted one).
    pub(crate) fn new(
        id: Arc<str>,
        opts: SessionOptions,
        kernel: Kernel,
        commands: mpsc::Receiver<Command>,
        fanout: Arc<Fanout>,
        status: Arc<Mutex<Status>>,
        last_seq: u64,
    ) -> Self {
        let files = kernel
            .process
            .kernel_work_dir()
            .map(|dir| FilesTracker::new(&dir));
        let installer = kernel.process.packages();
        let mut actor = Self {
            installer,
            installs: VecDeque::new(),
            install_running: None,
            install_updates: None,
            blocking_installs: 0,
            refresh_imports: false,
            internal: VecDeque::new(),
            cell_seconds: metrics::histogram!(m::EXECUTE_DURATION),
            files,
            id,
            opts,
            commands,
            fanout,
            status,
            seq: last_seq,
            announced: false,
            state: KernelState::Starting,
            process: kernel.process,
            client: None,
            incoming: None,
            connecting: None,
            watching_exit: true,
            queue: VecDeque::new(),
            running: None,
            queries: HashMap::new(),
            recent: VecDeque::new(),
            input_parent: None,
            interrupt_deadline: None,
            unresponsive: None,
            forwards: VecDeque::new(),
            pending_queries: VecDeque::new(),
        };
        match kernel.client {
            Some((client, incoming)) => {
                actor.client = Some(client);
                actor.incoming = Some(incoming);
                actor.state = KernelState::Idle;
            }
            None => {
                // A kernel taken over from a previous server process may be running a cell: it
                // answers on control meanwhile, not on shell.
                let mut client = actor.opts.client.clone();
                client.ready_via_control = kernel.adopted;
                actor.connect_with(client);
            }
        }
        actor
    }

    /// Runs until the session is closed or every handle is gone.
    pub(crate) async fn run(mut self: Box<Self>) {
        self.set_state(self.state, None);
        let mut close_ack: Option<oneshot::Sender<()>> = None;
        let mut detach = false;
        loop {
            // What runs to completion inside one turn is boxed (`Box::pin`): the task's future
            // would otherwise be as large as the largest of these (kilobytes) for every session
            // for its whole life.
            if let Err(e) = Box::pin(self.start_next()).await {
                tracing::warn!(session = %self.id, error = %e, "sending cell failed");
            }
            let deadline = self.next_deadline();
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(Command::Close(ack)) => { close_ack = Some(ack); break; }
                    Some(Command::Detach(ack)) => {
                        close_ack = Some(ack);
                        detach = true;
                        break;
                    }
                    Some(command) => Box::pin(self.handle(command)).await,
                    None => break,
                },
                result = poll_connecting(&mut self.connecting) => {
                    self.on_connected(result);
                    Box::pin(self.flush_forwards()).await;
                }
                incoming = recv_incoming(&mut self.incoming) => match incoming {
                    Some(Incoming::Message { channel, msg }) => self.on_message(channel, msg),
                    Some(Incoming::HeartbeatLost) => Box::pin(self.on_heartbeat_lost()).await,
                    Some(Incoming::Fault(fault)) => {
                        self.kernel_lost(Death::WireFault, fault.to_string());
                    }
                    None => self.incoming = None,
                },
                reason = self.process.exited(), if self.watching_exit => self.on_death(reason),
                () = sleep_until(deadline), if deadline.is_some() => {
                    Box::pin(self.on_deadline()).await;
                }
                Some(update) = recv_install(&mut self.install_updates) => {
                    Box::pin(self.on_install_update(update)).await;
                }
            }
        }
        if let Some((_, _, task)) = self.install_running.take() {
            task.abort();
        }
        self.client = None;
        self.incoming = None;
        if detach {
            // The kernel goes on (a running cell too); the next server process adopts it.
            if let Err(e) = self.process.detach().await {
                tracing::warn!(session = %self.id, error = %e, "cannot detach from the kernel");
            }
        } else {
            if self.state != KernelState::Dead {
                m::kernel_died(Death::Closed);
            }
            self.abort_all("aborted");
            if let Err(e) = self.process.shutdown().await {
                tracing::warn!(session = %self.id, error = %e, "kernel shutdown failed");
            }
            self.set_state(KernelState::Closed, None);
        }
        // Subscribers read what is left, then learn the session ended.
        self.fanout.close();
        if let Some(ack) = close_ack {
            let _ = ack.send(());
        }
    }

    async fn handle(&mut self, command: Command) {
        self.update_status(|s| s.last_activity = Utc::now());
        match command {
            Command::Execute(request, queued) => self.enqueue(request, queued),
            Command::Interrupt => self.interrupt().await,
            Command::Restart => self.restart(Death::RestartRequested).await,
            Command::InputReply(value) => self.input_reply(value).await,
            Command::Complete(query) => {
                let content = json!({"code": query.code, "cursor_pos": query.cursor});
                self.query("complete_request", content, query).await;
            }
            Command::Inspect(query) => {
                let content = json!({
                    "code": query.code,
                    "cursor_pos": query.cursor,
                    "detail_level": query.detail_level,
                });
                self.query("inspect_request", content, query).await;
            }
            Command::IsComplete(query) => {
                let content = json!({"code": query.code});
                self.query("is_complete_request", content, query).await;
            }
            Command::KernelInfo(query) => {
                self.query("kernel_info_request", json!({}), query).await;
            }
            Command::Forward {
                channel,
                msg,
                origin,
                queued,
            } => self.forward(channel, *msg, origin, queued).await,
            Command::Install {
                id,
                packages,
                blocking,
            } => self.enqueue_install(id, packages, blocking),
            Command::Close(_) | Command::Detach(_) => {}
        }
    }

    fn reject(&mut self, cell: Option<Arc<str>>, message: String) {
        self.emit(cell, EventKind::Rejected { message });
    }

    /// Rejects a cell: an error saying why, then its `done`, so a client waiting for the cell
    /// to finish is not left waiting.
    fn reject_cell(&mut self, cell: Arc<str>, message: String) {
        self.reject(Some(cell.clone()), message);
        let done = EventKind::Done {
            status: "rejected",
            execution_count: None,
            duration_ms: 0,
            files: None,
            idle_lost: false,
        };
        self.emit(Some(cell), done);
    }

    fn set_state(&mut self, state: KernelState, reason: Option<String>) {
        let changed = state != self.state || reason.is_some() || !self.announced;
        self.announced = true;
        self.state = state;
        self.update_status(|s| s.state = state);
        if changed {
            self.emit(None, EventKind::State { state, reason });
        }
    }

    fn update_status(&self, f: impl FnOnce(&mut Status)) {
        if let Ok(mut status) = self.status.lock() {
            f(&mut status);
        }
    }

    /// Records the end of a cell that ran (outcome, duration; an info line in the cell's span,
    /// never its code or output) and returns its duration in milliseconds.
    fn cell_finished(&self, span: &tracing::Span, started: Instant, status: &'static str) -> u64 {
        let elapsed = started.elapsed();
        self.cell_seconds.record(elapsed.as_secs_f64());
        let duration_ms = millis(elapsed);
        tracing::info!(parent: span, outcome = status, duration_ms, "cell finished");
        duration_ms
    }

    fn emit(&mut self, cell: Option<Arc<str>>, kind: EventKind) {
        if let EventKind::Done { status, .. } = &kind {
            m::executions(status).increment(1);
        }
        self.seq += 1;
        let event = Arc::new(SessionEvent {
            seq: self.seq,
            cell,
            kind,
        });
        // No subscriber is not an error: the session runs on while nobody listens.
        self.fanout.publish(event);
    }
}

async fn poll_connecting(
    connecting: &mut Option<Connecting>,
) -> Result<(KernelClient, mpsc::Receiver<Incoming>), KernelError> {
    match connecting.as_mut() {
        Some(fut) => fut.await,
        None => std::future::pending().await,
    }
}

async fn recv_incoming(incoming: &mut Option<mpsc::Receiver<Incoming>>) -> Option<Incoming> {
    match incoming.as_mut() {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `n` bytes as people read them (`512 B`, `1.5 KiB`, `64.0 MiB`).
fn human_bytes(n: usize) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
