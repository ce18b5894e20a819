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

/// How many recently finished cells keep their routing, for late output from threads.
const RECENT_CELLS: usize = 64;

/// The cell the kernel is running now.
struct Running {
    cell: Arc<str>,
    msg_id: String,
    started: Instant,
    deadline: Option<Instant>,
    reply: Option<(String, Option<i64>)>,
    idle: bool,
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

/// What an install task reports to the actor.
enum InstallUpdate {
    Output(Arc<str>, String),
    Done(Arc<str>, Result<(), InstallError>),
}

/// Python run (silently, before the next cell) after an install, so imports see new packages
/// even when the packages dir did not exist when the kernel started.
const REFRESH_IMPORTS: &str = "__import__('importlib').invalidate_caches()";

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
                    Some(Incoming::HeartbeatLost) => self.on_death(ExitReason::HeartbeatLost),
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

    fn start_connecting(&mut self) {
        self.connect_with(self.opts.client.clone());
    }

    fn connect_with(&mut self, opts: crate::kernel::ClientOptions) {
        if let Some(files) = self.files.as_mut() {
            files.kernel_replaced();
        }
        let info = self.process.connection().clone();
        self.connecting = Some(Box::pin(
            async move { KernelClient::connect(&info, opts).await },
        ));
    }

    fn on_connected(
        &mut self,
        result: Result<(KernelClient, mpsc::Receiver<Incoming>), KernelError>,
    ) {
        self.connecting = None;
        match result {
            Ok((client, incoming)) => {
                self.client = Some(client);
                self.incoming = Some(incoming);
                self.set_state(KernelState::Idle, None);
            }
            Err(e) => {
                tracing::warn!(session = %self.id, error = %e, "kernel did not become ready");
                m::kernel_died(Death::NotReady);
                self.watching_exit = false;
                self.set_state(KernelState::Dead, Some(e.to_string()));
                self.abort_all("aborted");
            }
        }
    }

    /// Sends the next queued cell when the kernel is ready and nothing runs.
    async fn start_next(&mut self) -> Result<(), KernelError> {
        if self.running.is_some() || self.state != KernelState::Idle || self.blocking_installs > 0 {
            return Ok(());
        }
        if self.queue.is_empty() {
            return Ok(());
        }
        self.refresh_imports().await?;
        // `queued` gives the cell's bytes back to the session's budget once it is sent.
        let Some((request, queued)) = self.queue.pop_front() else {
            return Ok(());
        };
        self.update_status(|s| s.queued = self.queue.len());
        let Some(client) = &self.client else {
            self.queue.push_front((request, queued));
            return Ok(());
        };
        let user_expressions = self
            .files
            .as_ref()
            .map_or_else(|| json!({}), FilesTracker::user_expressions);
        let content = json!({
            "code": request.code,
            "silent": request.silent,
            "store_history": request.store_history,
            "user_expressions": user_expressions,
            "allow_stdin": request.allow_stdin,
            "stop_on_error": true,
        });
        let started = Instant::now();
        match client
            .request(Channel::Shell, "execute_request", content, None)
            .await
        {
            Ok(msg_id) => {
                self.remember(&msg_id, &request.cell);
                let span = tracing::info_span!("cell", session = %self.id, cell = %request.cell);
                tracing::debug!(parent: &span, "cell started");
                self.running = Some(Running {
                    span,
                    cell: request.cell,
                    msg_id,
                    started,
                    deadline: request
                        .timeout
                        .or(self.opts.default_cell_timeout)
                        .map(|t| started + t),
                    reply: None,
                    idle: false,
                    timed_out: false,
                    restart_at: None,
                    output_bytes: 0,
                    dropped_bytes: 0,
                    dropped_messages: 0,
                    files: None,
                });
                self.set_state(KernelState::Busy, None);
                Ok(())
            }
            Err(e) => {
                self.emit(
                    Some(request.cell.clone()),
                    EventKind::Done {
                        status: "aborted",
                        execution_count: None,
                        duration_ms: 0,
                        files: None,
                    },
                );
                Err(e)
            }
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

    /// After an install, has the kernel refresh its import caches (a silent request nobody
    /// sees) before anything else it is sent; waits for a connected kernel when there is none.
    async fn refresh_imports(&mut self) -> Result<(), KernelError> {
        if !self.refresh_imports {
            return Ok(());
        }
        let Some(client) = &self.client else {
            return Ok(());
        };
        let content = json!({
            "code": REFRESH_IMPORTS,
            "silent": true,
            "store_history": false,
            "user_expressions": {},
            "allow_stdin": false,
            "stop_on_error": false,
        });
        let msg_id = client
            .request(Channel::Shell, "execute_request", content, None)
            .await?;
        self.refresh_imports = false;
        self.internal.push_back(msg_id);
        if self.internal.len() > 16 {
            self.internal.pop_front();
        }
        Ok(())
    }

    /// Queues an install; installs run one at a time (they share the packages dir).
    fn enqueue_install(&mut self, id: Arc<str>, packages: Vec<String>, blocking: bool) {
        if self.installer.is_none() {
            let message = InstallError::Backend("this backend cannot install packages".into());
            self.emit(
                Some(id.clone()),
                EventKind::Install(InstallEvent::Failed {
                    message: message.to_string(),
                }),
            );
            self.emit(
                Some(id),
                EventKind::Install(InstallEvent::Done {
                    error: Some(message.to_string()),
                }),
            );
            return;
        }
        if blocking {
            self.blocking_installs += 1;
        }
        self.installs.push_back((id, packages, blocking));
        self.start_install();
    }

    /// Starts the next queued install when none runs.
    fn start_install(&mut self) {
        if self.install_running.is_some() {
            return;
        }
        let Some(installer) = self.installer.clone() else {
            return;
        };
        let Some((id, packages, blocking)) = self.installs.pop_front() else {
            return;
        };
        self.emit(
            Some(id.clone()),
            EventKind::Install(InstallEvent::Started {
                packages: packages.clone(),
            }),
        );
        let updates = self
            .install_updates
            .get_or_insert_with(|| mpsc::channel(1024))
            .0
            .clone();
        let task_id = id.clone();
        let task = tokio::spawn(async move {
            let (lines_tx, mut lines_rx) = mpsc::channel::<String>(256);
            let install = installer.install(&packages, lines_tx);
            let forward = async {
                while let Some(line) = lines_rx.recv().await {
                    let _ = updates
                        .send(InstallUpdate::Output(task_id.clone(), line))
                        .await;
                }
            };
            let (result, ()) = tokio::join!(install, forward);
            let _ = updates.send(InstallUpdate::Done(task_id, result)).await;
        });
        self.install_running = Some((id, blocking, task));
    }

    async fn on_install_update(&mut self, update: InstallUpdate) {
        match update {
            InstallUpdate::Output(id, line) => {
                self.emit(Some(id), EventKind::Install(InstallEvent::Output { line }));
            }
            InstallUpdate::Done(id, result) => {
                if let Some((_, blocking, _)) = self.install_running.take()
                    && blocking
                {
                    self.blocking_installs = self.blocking_installs.saturating_sub(1);
                }
                let error = match result {
                    Ok(()) => {
                        self.refresh_imports = true;
                        // Now, so Jupyter clients' requests see the packages too (the kernel
                        // runs it after the cell it may be running).
                        if let Err(e) = self.refresh_imports().await {
                            tracing::debug!(session = %self.id, error = %e, "cannot refresh import caches");
                        }
                        None
                    }
                    Err(err) => {
                        tracing::info!(session = %self.id, %err, "package install failed");
                        let message = err.to_string();
                        self.emit(
                            Some(id.clone()),
                            EventKind::Install(InstallEvent::Failed {
                                message: message.clone(),
                            }),
                        );
                        Some(message)
                    }
                };
                self.emit(Some(id), EventKind::Install(InstallEvent::Done { error }));
                self.start_install();
            }
        }
    }

    /// Sends the messages that waited for the kernel (or rejects them if it did not come up).
    async fn flush_forwards(&mut self) {
        for (channel, msg, origin, queued) in std::mem::take(&mut self.forwards) {
            self.forward(channel, msg, origin, queued).await;
        }
        for (msg_type, content, query) in std::mem::take(&mut self.pending_queries) {
            self.query(msg_type, content, query).await;
        }
    }

    /// Sends a client-built message as it is (only signed); answers are tagged with `origin`.
    /// While the kernel is starting or restarting, messages wait (bounded) and go once it is
    /// ready, as a Jupyter client expects of a kernel it just started. `queued` (the message's
    /// bytes in the session's budget) is held while it waits and given back once it is sent or
    /// refused.
    async fn forward(&mut self, channel: Channel, msg: Message, origin: Arc<str>, queued: Queued) {
        if channel == Channel::Shell
            && let Err(e) = self.refresh_imports().await
        {
            tracing::debug!(session = %self.id, error = %e, "cannot refresh import caches");
        }
        let Some(client) = &self.client else {
            let waiting = matches!(self.state, KernelState::Starting | KernelState::Restarting);
            if waiting && self.forwards.len() < self.opts.max_queue {
                self.forwards.push_back((channel, msg, origin, queued));
                return;
            }
            let state = self.state.as_str();
            self.reject(
                Some(origin),
                format!("the kernel is {state}: {} was not sent", msg.msg_type()),
            );
            return;
        };
        match client.send(channel, msg).await {
            Ok(msg_id) => self.remember(&msg_id, &origin),
            Err(e) => self.reject(Some(origin), format!("cannot send to the kernel: {e}")),
        }
    }

    fn enqueue(&mut self, request: ExecuteRequest, queued: Queued) {
        let cell = request.cell.clone();
        match self.state {
            KernelState::Dead | KernelState::Closed => {
                self.reject_cell(cell, "the kernel is dead: send a restart first".into());
                return;
            }
            _ => {}
        }
        if self.queue.len() >= self.opts.max_queue {
            let max = self.opts.max_queue;
            self.reject_cell(
                cell,
                format!("the queue is full ({max} cells wait already)"),
            );
            return;
        }
        let position = self.queue.len() + usize::from(self.running.is_some());
        self.queue.push_back((request, queued));
        self.update_status(|s| s.queued = self.queue.len());
        self.emit(Some(cell), EventKind::Accepted { position });
    }

    async fn interrupt(&mut self) {
        let Some(client) = &self.client else {
            self.reject(None, "the kernel is not running".into());
            return;
        };
        if client
            .request(Channel::Control, "interrupt_request", json!({}), None)
            .await
            .is_err()
        {
            self.signal_interrupt().await;
            return;
        }
        self.interrupt_deadline = Some(Instant::now() + self.opts.interrupt_grace);
    }

    async fn signal_interrupt(&mut self) {
        self.interrupt_deadline = None;
        if let Err(e) = self.process.signal_interrupt().await {
            tracing::warn!(session = %self.id, error = %e, "SIGINT fallback failed");
        }
    }

    /// Restarts the kernel (`why`: what its end is counted as, unless it was dead already).
    async fn restart(&mut self, why: Death) {
        if self.state != KernelState::Dead {
            m::kernel_died(why);
        }
        self.set_state(KernelState::Restarting, None);
        self.abort_all("aborted");
        self.client = None;
        self.incoming = None;
        self.connecting = None;
        self.interrupt_deadline = None;
        match self.process.restart().await {
            Ok(()) => {
                m::kernel_started(StartKind::Restart);
                self.watching_exit = true;
                self.start_connecting();
            }
            Err(e) => {
                tracing::warn!(session = %self.id, error = %e, "kernel restart failed");
                m::kernel_died(Death::RestartFailed);
                self.watching_exit = false;
                self.set_state(KernelState::Dead, Some(e.to_string()));
                self.flush_forwards().await;
            }
        }
    }

    async fn input_reply(&mut self, value: String) {
        let (Some(client), Some(parent)) = (&self.client, self.input_parent.take()) else {
            self.reject(None, "no input is pending".into());
            return;
        };
        let content = json!({ "value": value });
        if let Err(e) = client
            .request(Channel::Stdin, "input_reply", content, Some(&parent))
            .await
        {
            self.reject(None, format!("cannot send input: {e}"));
        }
    }

    async fn query(&mut self, msg_type: &'static str, content: Value, query: CodeQuery) {
        let Some(client) = &self.client else {
            let waiting = matches!(self.state, KernelState::Starting | KernelState::Restarting);
            if waiting && self.pending_queries.len() < self.opts.max_queue {
                // Like cells, queries wait for a starting kernel.
                self.pending_queries.push_back((msg_type, content, query));
                return;
            }
            self.reject(
                Some(query.id),
                format!("the kernel is {}", self.state.as_str()),
            );
            return;
        };
        match client
            .request(Channel::Shell, msg_type, content, None)
            .await
        {
            Ok(msg_id) => {
                self.queries.insert(msg_id, query.id);
            }
            Err(e) => self.reject(Some(query.id), format!("cannot send {msg_type}: {e}")),
        }
    }

    fn on_message(&mut self, channel: Channel, msg: Arc<Message>) {
        self.update_status(|s| s.last_activity = Utc::now());
        let parent = msg.parent_id().map(str::to_owned);
        if parent
            .as_ref()
            .is_some_and(|p| self.internal.iter().any(|i| i == p))
        {
            return;
        }
        let is_running =
            |r: &Option<Running>| matches!((r, &parent), (Some(r), Some(p)) if &r.msg_id == p);

        // Replies to completion/inspection requests and their busy/idle chatter.
        if let Some(p) = &parent
            && let Some(id) = self.queries.get(p).cloned()
        {
            if channel == Channel::Shell {
                self.queries.remove(p);
                self.emit(Some(id), EventKind::Kernel { channel, msg });
            }
            return;
        }
        if channel == Channel::Control && msg.msg_type() == "interrupt_reply" {
            self.interrupt_deadline = None;
        }

        let running = is_running(&self.running);
        let cell = if running {
            self.running.as_ref().map(|r| r.cell.clone())
        } else {
            parent.as_deref().and_then(|p| self.recent_cell(p))
        };
        match (channel, msg.msg_type()) {
            (Channel::Stdin, "input_request") => self.input_parent = Some(msg.header.clone()),
            (Channel::Shell, "execute_reply") if running => {
                // Parsed here and dropped: the message is kept for replay, its value is not.
                let reply: Value = msg.content.view().unwrap_or_default();
                let status = reply
                    .get("status")
                    .and_then(Value::as_str)
                    .unwrap_or("error");
                let count = reply.get("execution_count").and_then(Value::as_i64);
                let files = self.files.as_mut().and_then(|f| f.read_reply(&reply));
                if let Some(r) = self.running.as_mut() {
                    r.reply = Some((status.to_owned(), count));
                    r.files = files;
                }
            }
            (Channel::IoPub, "status") if running => {
                if execution_state(&msg).as_deref() == Some("idle")
                    && let Some(r) = self.running.as_mut()
                {
                    r.idle = true;
                }
            }
            _ => {}
        }
        if running && channel == Channel::IoPub && !self.within_output_cap(&msg) {
            self.finish_if_done();
            return;
        }
        self.emit(cell, EventKind::Kernel { channel, msg });
        self.finish_if_done();
    }

    /// Counts an output message of the running cell against the per-cell cap; `false` when it
    /// must be dropped (the first drop is announced, the total at the cell's end).
    fn within_output_cap(&mut self, msg: &Message) -> bool {
        // Measured as the content's JSON text: what the cell's output costs to relay and keep.
        let size = match msg.msg_type() {
            "stream" | "display_data" | "update_display_data" | "execute_result" | "error" => {
                msg.content.len()
            }
            _ => return true,
        };
        let cap = self.opts.max_cell_output_bytes;
        let Some(r) = self.running.as_mut() else {
            return true;
        };
        if r.dropped_messages == 0 && r.output_bytes + size <= cap {
            r.output_bytes += size;
            return true;
        }
        r.dropped_bytes += size;
        r.dropped_messages += 1;
        if r.dropped_messages == 1 {
            let cell = r.cell.clone();
            self.emit(
                Some(cell),
                EventKind::Limit {
                    limit: "OutputLimit",
                    message: format!(
                        "the cell's output passed its limit of {}: further output is dropped",
                        human_bytes(cap)
                    ),
                },
            );
        }
        false
    }

    /// Emits `done` once the cell's reply and its final idle status have both arrived, so every
    /// output of the cell reaches clients before it.
    fn finish_if_done(&mut self) {
        let done = matches!(&self.running, Some(r) if r.idle && r.reply.is_some());
        if !done {
            return;
        }
        let Some(r) = self.running.take() else { return };
        let (status, count) = r.reply.unwrap_or_else(|| ("error".into(), None));
        let status: &'static str = match (r.timed_out, status.as_str()) {
            (true, _) => "timeout",
            (false, "ok") => "ok",
            (false, "aborted") => "aborted",
            _ => "error",
        };
        if let Some(count) = count {
            self.update_status(|s| s.execution_count = count);
        }
        if r.dropped_messages > 0 {
            self.emit(
                Some(r.cell.clone()),
                EventKind::Limit {
                    limit: "OutputLimit",
                    message: format!(
                        "dropped {} of output in {} messages beyond the cell's limit of {}",
                        human_bytes(r.dropped_bytes),
                        r.dropped_messages,
                        human_bytes(self.opts.max_cell_output_bytes)
                    ),
                },
            );
        }
        self.interrupt_deadline = None;
        let duration_ms = self.cell_finished(&r.span, r.started, status);
        self.emit(
            Some(r.cell),
            EventKind::Done {
                status,
                execution_count: count,
                duration_ms,
                files: r.files,
            },
        );
        self.set_state(KernelState::Idle, None);
    }

    fn on_death(&mut self, reason: ExitReason) {
        tracing::info!(session = %self.id, %reason, "kernel died");
        m::kernel_died(Death::from(&reason));
        self.watching_exit = false;
        self.client = None;
        self.incoming = None;
        self.connecting = None;
        self.interrupt_deadline = None;
        // The death first, then the cells it aborted: clients learn the cause before the effect.
        self.set_state(KernelState::Dead, Some(reason.to_string()));
        self.abort_all("aborted");
        for (_, msg, origin, _) in std::mem::take(&mut self.forwards) {
            let what = format!("the kernel died: {} was not sent", msg.msg_type());
            self.reject(Some(origin), what);
        }
        for (msg_type, _, query) in std::mem::take(&mut self.pending_queries) {
            self.reject(
                Some(query.id),
                format!("the kernel died: {msg_type} was not sent"),
            );
        }
    }

    async fn on_deadline(&mut self) {
        let now = Instant::now();
        if self.interrupt_deadline.is_some_and(|d| d <= now) {
            self.signal_interrupt().await;
        }
        let grace = self.opts.timeout_restart_grace;
        let timed_out = match self.running.as_mut() {
            Some(r) if r.deadline.is_some_and(|d| d <= now) => {
                r.deadline = None;
                r.timed_out = true;
                r.restart_at = Some(now + grace);
                Some((r.cell.clone(), r.started.elapsed()))
            }
            _ => None,
        };
        if let Some((cell, ran)) = timed_out {
            self.emit(
                Some(cell),
                EventKind::Limit {
                    limit: "CellTimeout",
                    message: format!(
                        "the cell ran past its time limit ({:.1} s): interrupting it",
                        ran.as_secs_f64()
                    ),
                },
            );
            self.interrupt().await;
        }
        let stuck = self
            .running
            .as_ref()
            .is_some_and(|r| r.restart_at.is_some_and(|d| d <= now));
        if stuck && let Some(r) = self.running.take() {
            self.emit(
                Some(r.cell.clone()),
                EventKind::Limit {
                    limit: "CellTimeout",
                    message: format!(
                        "the cell did not stop within {:.1} s of its interrupt: restarting the \
                         kernel (variables are lost)",
                        grace.as_secs_f64()
                    ),
                },
            );
            let duration_ms = self.cell_finished(&r.span, r.started, "timeout");
            self.emit(
                Some(r.cell),
                EventKind::Done {
                    status: "timeout",
                    execution_count: None,
                    duration_ms,
                    files: None,
                },
            );
            self.restart(Death::TimeoutRestart).await;
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        [
            self.running.as_ref().and_then(|r| r.deadline),
            self.running.as_ref().and_then(|r| r.restart_at),
            self.interrupt_deadline,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Tells clients that the running and queued cells will never finish.
    fn abort_all(&mut self, status: &'static str) {
        if let Some(r) = self.running.take() {
            let duration_ms = self.cell_finished(&r.span, r.started, status);
            self.emit(
                Some(r.cell),
                EventKind::Done {
                    status,
                    execution_count: None,
                    duration_ms,
                    files: None,
                },
            );
        }
        for (request, _) in std::mem::take(&mut self.queue) {
            self.emit(
                Some(request.cell),
                EventKind::Done {
                    status,
                    execution_count: None,
                    duration_ms: 0,
                    files: None,
                },
            );
        }
        self.queries.clear();
        self.input_parent = None;
        self.update_status(|s| s.queued = 0);
    }

    fn remember(&mut self, msg_id: &str, cell: &Arc<str>) {
        if self.recent.len() == RECENT_CELLS {
            self.recent.pop_front();
        }
        self.recent.push_back((msg_id.to_owned(), cell.clone()));
    }

    fn recent_cell(&self, msg_id: &str) -> Option<Arc<str>> {
        self.recent
            .iter()
            .rev()
            .find(|(id, _)| id == msg_id)
            .map(|(_, c)| c.clone())
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

/// A `status` message's `execution_state`, read without keeping a parsed copy of the message.
fn execution_state(msg: &Message) -> Option<std::borrow::Cow<'_, str>> {
    #[derive(serde::Deserialize)]
    struct Status<'a> {
        #[serde(borrow)]
        execution_state: Option<std::borrow::Cow<'a, str>>,
    }
    msg.content
        .view::<Status<'_>>()
        .ok()
        .and_then(|s| s.execution_state)
}

async fn recv_install(
    updates: &mut Option<(mpsc::Sender<InstallUpdate>, mpsc::Receiver<InstallUpdate>)>,
) -> Option<InstallUpdate> {
    match updates.as_mut() {
        Some((_, rx)) => rx.recv().await,
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
