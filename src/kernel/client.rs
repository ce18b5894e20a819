//! The kernel client: owns the ZeroMQ sockets of one kernel, proves it ready, and turns the
//! channels into one ordered stream of incoming messages for the session that owns it.
//!
//! CONTRACT:
//! - `connect` subscribes iopub to "" *before* connecting it, connects shell/stdin (DEALERs
//!   sharing one identity), control (DEALER), heartbeat; then loops `kernel_info_request` on shell
//!   until an iopub `status` whose parent is one of those requests arrives AND its
//!   `kernel_info_reply` is read; fails with `KernelError::NotReady` after `ready_timeout`.
//! - Each socket is owned by its own task; iopub is drained by a dedicated task into the bounded
//!   `Incoming` channel so that ipykernel's XPUB never drops for lack of a reader.
//! - No send waits on the kernel: shell, stdin and control each have a bounded queue
//!   (`SEND_QUEUE_MESSAGES`, `SEND_QUEUE_BYTES`) written into the socket by a task; when it is
//!   full (the kernel stopped reading that socket) `send` fails with `KernelError::Backlog`.
//! - Every message read is HMAC-verified; bad signatures and malformed frames are dropped with a
//!   `tracing::warn!`, never a panic.
//! - The heartbeat task pings every `heartbeat_interval`; after `heartbeat_misses` misses in a row
//!   it sends `Incoming::HeartbeatLost` once (once per loss: a stopped kernel that answers again
//!   may be reported again later; a disconnected one ends the task). A lost heartbeat is a
//!   suspicion, not a death: the session rechecks (process, control) before believing it.
//! - No socket buffers a message over `max_message_size` bytes: the (patched, see
//!   `patches/README.md`) zeromq decoder checks every declared frame length, with the frames of
//!   the same message before it, ahead of any allocation. A kernel that goes over the limit, or
//!   speaks malformed ZMTP, on any socket (heartbeat included) gets `Incoming::Fault` sent once:
//!   its framing is lost and what it says can no longer be trusted. The socket stops reading;
//!   the session drops the client (every connection) and reports the kernel dead.
//! - Dropping the client stops all its tasks and closes all sockets. After a kernel restart the
//!   session makes a new client (old sockets do not reconnect).
//!
//! When the kernel process goes away (its sockets close), each socket task notices its peer's
//! disconnection and ends: `send` then fails with `KernelError::Closed` instead of queueing into
//! a socket nobody reads, and once every task has ended the `Incoming` receiver yields `None`
//! (after everything read before the disconnection). A send racing the death may still return
//! `Ok` with the message lost. A *stopped* (not dead) kernel keeps its sockets open: that case is
//! what `HeartbeatLost` is for.
//!
//! Readiness chatter (the `kernel_info_request`s sent by `connect`, their replies and the iopub
//! status messages they cause, even late ones) never reaches the `Incoming` channel: those
//! requests carry a msg_id prefix private to this client. ipykernel's `iopub_welcome` (sent to a
//! new `""` subscriber) is connection chatter too and is not forwarded either.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::{Instant, MissedTickBehavior};
use zeromq::util::PeerIdentity;
use zeromq::{
    CodecError as ZmtpError, DealerRecvHalf, DealerSendHalf, DealerSocket, Socket, SocketEvent,
    SocketOptions, SocketRecv, SocketSend, SubSocket, ZmqError, ZmqMessage,
};

use super::codec::{self, CodecError};
use super::connection::{ConnectionInfo, Transport};
use super::content::Content;
use super::message::{Channel, Header, Message};
use super::signer::{Signer, SignerError};

/// How often `connect` re-sends `kernel_info_request` until the kernel answers on shell and iopub.
const READY_RETRY: Duration = Duration::from_millis(150);
/// How often `connect` probes an endpoint that does not accept connections yet. The zeromq crate's
/// own retry backs off exponentially from 50 ms, which adds up to ~0.7 s when the kernel is still
/// starting; a plain socket probe at this interval finds the kernel within a few ms of its bind.
const PROBE_INTERVAL: Duration = Duration::from_millis(10);
/// Queue of readiness replies during `connect`.
const READY_CAPACITY: usize = 256;

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
    /// The connection file's key or signature scheme is unusable.
    #[error("cannot sign messages: {0}")]
    Signer(#[from] SignerError),
    /// A message could not be encoded for the wire.
    #[error("cannot encode message: {0}")]
    Codec(#[from] CodecError),
    /// The kernel broke the wire protocol while `connect` waited for it.
    #[error("{0}")]
    Wire(#[from] WireFault),
    /// `send` was asked to use a channel clients cannot send on (iopub, heartbeat).
    #[error("cannot send on the {0} channel (only shell, control and stdin)")]
    WrongChannel(&'static str),
    /// The kernel is not reading the channel: `messages` messages (`bytes` bytes) wait for it
    /// already, so this one is refused rather than waited for.
    #[error(
        "the kernel is not reading its {channel} channel: {messages} messages ({bytes} bytes) \
         wait for it already"
    )]
    Backlog {
        /// Which channel.
        channel: &'static str,
        /// Messages waiting.
        messages: usize,
        /// Their bytes.
        bytes: usize,
    },
    /// The socket refused the message for another reason than a vanished peer.
    #[error("cannot send on {channel}: {reason}")]
    Send {
        /// Which channel.
        channel: &'static str,
        /// Why.
        reason: String,
    },
}

/// Why the client stopped trusting a kernel's connection: what the kernel sent broke the wire
/// protocol, so nothing it sends after can be framed (or believed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireFault {
    /// A message (a frame's declared length plus its message's earlier frames) over the limit.
    #[error(
        "the kernel sent an oversized message on {channel}: at least {size} bytes, over the \
         {max}-byte limit (--max-kernel-message-mb)"
    )]
    Oversized {
        /// The channel it came on.
        channel: &'static str,
        /// The size declared so far.
        size: u64,
        /// The limit.
        max: usize,
    },
    /// Bytes that are not ZMTP (a bad frame header, a garbled command).
    #[error("the kernel sent a malformed message on {channel}: {reason}")]
    Malformed {
        /// The channel it came on.
        channel: &'static str,
        /// What the decoder said.
        reason: String,
    },
}

impl WireFault {
    /// The fault a socket error reports, if it is one of the kernel's making; `None` for a
    /// connection that merely went (I/O errors, a closed socket).
    fn of(channel: Channel, error: &ZmqError) -> Option<WireFault> {
        let channel = channel.as_str();
        match error {
            ZmqError::Codec(ZmtpError::MessageTooLarge { size, max }) => Some(Self::Oversized {
                channel,
                size: *size,
                max: *max,
            }),
            ZmqError::Codec(ZmtpError::Io(_)) => None,
            ZmqError::Codec(other) => Some(Self::Malformed {
                channel,
                reason: other.to_string(),
            }),
            _ => None,
        }
    }
}

/// Something the kernel said (or the heartbeat noticed), in arrival order per channel.
///
/// The message is shared (`Arc`) from the start: the session keeps it that way in its events, so
/// this costs no allocation more than a `Message` by value, and keeps this type 16 bytes. (By
/// value it is ~460 bytes, and a tokio channel allocates its slots 32 at a time: ~15 KiB per
/// kernel for the `Incoming` queue alone, and every future holding one grows by as much.)
#[derive(Debug)]
pub enum Incoming {
    /// A verified message from `channel` (shell, iopub, stdin or control).
    Message {
        /// Where it came from.
        channel: Channel,
        /// The message.
        msg: Arc<Message>,
    },
    /// The heartbeat missed `heartbeat_misses` pings in a row.
    HeartbeatLost,
    /// The kernel broke the wire protocol on a socket (sent once per socket; see `WireFault`).
    /// Boxed: rare, and it keeps this type 16 bytes.
    Fault(Box<WireFault>),
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
    /// Prove readiness with `kernel_info_request`s on control instead of shell: for a kernel
    /// that was ready before (taken over from another server process), which may be running a
    /// cell and so not answer on shell until it ends. ipykernel answers on control while busy.
    pub ready_via_control: bool,
    /// The largest message (all frames, each counted with ~32 bytes of bookkeeping) a kernel
    /// may send on any socket; checked before anything is allocated for it.
    pub max_message_size: usize,
}

/// The default `ClientOptions::max_message_size`: 256 MiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 256 << 20;

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            ready_timeout: Duration::from_secs(60),
            heartbeat_interval: Duration::from_secs(2),
            heartbeat_misses: 3,
            incoming_capacity: 4096,
            ready_via_control: false,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
        }
    }
}

/// A connected, ready kernel client.
pub struct KernelClient {
    session: String,
    kernel_info: Content,
    signer: Signer,
    shell: Sender,
    control: Sender,
    stdin: Sender,
    /// Aborts every socket task when the client is dropped.
    _tasks: Tasks,
}

impl KernelClient {
    /// Connects every channel and waits until the kernel is proven ready (see module docs).
    /// Returns the client and the receiver of everything the kernel says.
    pub async fn connect(
        info: &ConnectionInfo,
        opts: ClientOptions,
    ) -> Result<(KernelClient, mpsc::Receiver<Incoming>), KernelError> {
        let deadline = Instant::now() + opts.ready_timeout;
        let not_ready = KernelError::NotReady(opts.ready_timeout);
        let signer = Signer::from_connection(info)?;
        let session = uuid::Uuid::new_v4().to_string();
        let ready_prefix = format!("kernelbox-ready-{session}-");

        let sockets = connect_sockets(info, deadline, opts.max_message_size);
        let sockets = tokio::time::timeout_at(deadline, sockets)
            .await
            .map_err(|_| KernelError::NotReady(opts.ready_timeout))??;

        let (incoming_tx, mut incoming_rx) = mpsc::channel(opts.incoming_capacity.max(1));
        let (ready_tx, ready_rx) = mpsc::channel(READY_CAPACITY);
        let mut tasks = Tasks(Vec::with_capacity(5));
        let reader = |channel| Reader {
            channel,
            signer: signer.clone(),
            incoming: incoming_tx.clone(),
            ready_prefix: ready_prefix.clone(),
            ready: ready_tx.clone(),
        };

        tasks.spawn(run_iopub(sockets.iopub, reader(Channel::IoPub)));
        let shell = tasks.spawn_dealer(sockets.shell, reader(Channel::Shell));
        let stdin = tasks.spawn_dealer(sockets.stdin, reader(Channel::Stdin));
        let control = tasks.spawn_dealer(sockets.control, reader(Channel::Control));
        drop(ready_tx);

        let mut client = KernelClient {
            session,
            kernel_info: Content::default(),
            signer,
            shell,
            control,
            stdin,
            _tasks: tasks,
        };
        let ready_channel = if opts.ready_via_control {
            Channel::Control
        } else {
            Channel::Shell
        };
        let ready = tokio::time::timeout_at(
            deadline,
            client.await_ready(ready_channel, &ready_prefix, ready_rx),
        )
        .await
        .map_err(|_| not_ready)
        .and_then(|ready| ready);
        client.kernel_info = match ready {
            Ok(info) => info,
            // A socket that stopped because the kernel broke the protocol says why.
            Err(error) => return Err(first_fault(&mut incoming_rx).unwrap_or(error)),
        };

        client._tasks.spawn(run_heartbeat(
            sockets.heartbeat,
            opts.heartbeat_interval,
            opts.heartbeat_misses.max(1),
            incoming_tx,
        ));
        Ok((client, incoming_rx))
    }

    /// Our Jupyter session id (the `session` field of headers we send).
    pub fn session_id(&self) -> &str {
        &self.session
    }

    /// The content of the `kernel_info_reply` read during readiness.
    pub fn kernel_info(&self) -> &Content {
        &self.kernel_info
    }

    /// Whether the shell socket's task has ended (kernel gone or client closing): a cheap check
    /// before queueing work that `send` would refuse anyway.
    pub fn is_closed(&self) -> bool {
        self.shell.closed.load(Ordering::Acquire)
    }

    /// Signs and sends a message built by the caller on `channel` (shell, control or stdin).
    /// Returns the header's `msg_id`. Never waits on the kernel: the message goes into the
    /// socket's bounded queue (drained by a task), and is refused with `Backlog` when the kernel
    /// has not read what was queued before (`SEND_QUEUE_MESSAGES`, `SEND_QUEUE_BYTES`). Errors
    /// with `Closed` once the socket's reading task has ended.
    pub async fn send(&self, channel: Channel, msg: Message) -> Result<String, KernelError> {
        let sender = match channel {
            Channel::Shell => &self.shell,
            Channel::Control => &self.control,
            Channel::Stdin => &self.stdin,
            Channel::IoPub | Channel::Heartbeat => {
                return Err(KernelError::WrongChannel(channel.as_str()));
            }
        };
        let frames = codec::encode(&msg, &self.signer)?;
        let frames = ZmqMessage::try_from(frames).map_err(|e| KernelError::Send {
            channel: channel.as_str(),
            reason: e.to_string(),
        })?;
        sender.send(channel.as_str(), frames)?;
        Ok(msg.header.msg_id)
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

    /// Sends `kernel_info_request`s on `channel` (shell or control) until one has both its
    /// iopub `status` and its reply; returns that reply's content.
    async fn await_ready(
        &self,
        channel: Channel,
        ready_prefix: &str,
        mut replies: mpsc::Receiver<(Channel, Box<Message>)>,
    ) -> Result<Content, KernelError> {
        let mut retry = tokio::time::interval(READY_RETRY);
        retry.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut with_status = std::collections::HashSet::new();
        let mut with_reply = std::collections::HashMap::new();
        loop {
            tokio::select! {
                _ = retry.tick() => {
                    let mut msg = Message::new("kernel_info_request", &self.session,
                        Value::Object(Default::default()));
                    msg.header.msg_id = format!("{ready_prefix}{}", uuid::Uuid::new_v4());
                    self.send(channel, msg).await?;
                }
                got = replies.recv() => {
                    let (from, msg) = got.ok_or(KernelError::Closed)?;
                    let Some(parent) = msg.parent_id().map(str::to_owned) else { continue };
                    match (from, msg.msg_type()) {
                        (Channel::IoPub, "status") => {
                            if let Some(info) = with_reply.remove(&parent) {
                                return Ok(info);
                            }
                            with_status.insert(parent);
                        }
                        (from, "kernel_info_reply") if from == channel => {
                            if with_status.contains(&parent) {
                                return Ok(msg.content);
                            }
                            with_reply.insert(parent, msg.content);
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

/// The first wire fault already reported on `incoming`, as an error (what is read before it is
/// dropped: the client is not handed out).
fn first_fault(incoming: &mut mpsc::Receiver<Incoming>) -> Option<KernelError> {
    while let Ok(item) = incoming.try_recv() {
        if let Incoming::Fault(fault) = item {
            return Some(KernelError::Wire(*fault));
        }
    }
    None
}

/// How many messages may wait, per socket, for the kernel to read them; more are refused
/// (`KernelError::Backlog`), never awaited.
pub const SEND_QUEUE_MESSAGES: usize = 1024;
/// How many bytes may wait, per socket, for the kernel to read them (one message of any size
/// is always taken when none waits).
pub const SEND_QUEUE_BYTES: usize = 64 << 20;

/// The sending side of a request/reply DEALER: a bounded queue drained into the socket by a
/// task of its own, so a sender never waits on the kernel. A kernel that stops reading a socket
/// (its shell thread busy with a cell while requests pile up) fills the socket's buffers; the
/// queue then fills and further sends are refused at once. The reading half's task marks it
/// closed when the kernel disconnects, so that later sends fail rather than queue into a socket
/// nobody reads.
struct Sender {
    queue: mpsc::Sender<ZmqMessage>,
    /// Bytes queued and not yet written into the socket.
    bytes: Arc<AtomicUsize>,
    closed: Arc<AtomicBool>,
}

impl Sender {
    /// Queues `frames` for the socket, or refuses them at once (never waits).
    fn send(&self, channel: &'static str, frames: ZmqMessage) -> Result<(), KernelError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(KernelError::Closed);
        }
        let size = message_bytes(&frames);
        let queued = self.bytes.fetch_add(size, Ordering::AcqRel);
        let backlog = |bytes: usize| KernelError::Backlog {
            channel,
            messages: SEND_QUEUE_MESSAGES - self.queue.capacity(),
            bytes,
        };
        if queued > 0 && queued.saturating_add(size) > SEND_QUEUE_BYTES {
            self.bytes.fetch_sub(size, Ordering::AcqRel);
            return Err(backlog(queued));
        }
        match self.queue.try_send(frames) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.bytes.fetch_sub(size, Ordering::AcqRel);
                match e {
                    mpsc::error::TrySendError::Full(_) => Err(backlog(queued)),
                    mpsc::error::TrySendError::Closed(_) => Err(KernelError::Closed),
                }
            }
        }
    }
}

/// A message's size as the send queue counts it: its frames' bytes.
fn message_bytes(frames: &ZmqMessage) -> usize {
    frames.iter().map(Bytes::len).sum()
}

/// Writes what `Sender` queued into the socket, in order, waiting on the kernel as long as it
/// takes (only this task waits). A write that fails is logged and the message lost: a vanished
/// peer is noticed by the reading half, which closes the sender.
async fn run_writer(
    mut half: DealerSendHalf,
    mut queue: mpsc::Receiver<ZmqMessage>,
    bytes: Arc<AtomicUsize>,
    channel: &'static str,
) {
    while let Some(frames) = queue.recv().await {
        let size = message_bytes(&frames);
        let sent = half.send(frames).await;
        bytes.fetch_sub(size, Ordering::AcqRel);
        if let Err(error) = sent {
            tracing::warn!(channel, error = %send_error(channel, error), "kernel message not sent");
        }
    }
}

/// The client's tasks; dropping this aborts them all, which drops (closes) their sockets.
struct Tasks(Vec<AbortHandle>);

impl Tasks {
    /// Spawns a task that lives no longer than the client.
    fn spawn(&mut self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.0.push(tokio::spawn(task).abort_handle());
    }

    /// Splits a request/reply DEALER: spawns the task reading it; returns its sending half.
    fn spawn_dealer(&mut self, socket: Monitored<DealerSocket>, reader: Reader) -> Sender {
        let Monitored { socket, events } = socket;
        let (half, recv) = socket.split();
        let closed = Arc::new(AtomicBool::new(false));
        let bytes = Arc::new(AtomicUsize::new(0));
        let (queue, queued) = mpsc::channel(SEND_QUEUE_MESSAGES);
        let channel = reader.channel.as_str();
        self.spawn(run_dealer(recv, events, reader, closed.clone()));
        self.spawn(run_writer(half, queued, bytes.clone(), channel));
        Sender {
            queue,
            bytes,
            closed,
        }
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// A connected socket and the monitor that reports its peer's disconnection.
struct Monitored<S> {
    socket: S,
    events: futures::channel::mpsc::Receiver<SocketEvent>,
}

/// Resolves when a socket's peer has disconnected (or its monitor is gone); skips other events.
async fn peer_gone(events: &mut futures::channel::mpsc::Receiver<SocketEvent>) {
    while let Some(event) = events.next().await {
        if matches!(event, SocketEvent::Disconnected(_)) {
            return;
        }
    }
}

/// The five connected sockets, before their tasks start.
struct Sockets {
    iopub: Monitored<SubSocket>,
    shell: Monitored<DealerSocket>,
    stdin: Monitored<DealerSocket>,
    control: Monitored<DealerSocket>,
    heartbeat: Monitored<DealerSocket>,
}

/// Creates and connects every socket concurrently: iopub subscribed first, shell and stdin
/// sharing one routing identity (the kernel answers `input_request`s to that identity).
async fn connect_sockets(
    info: &ConnectionInfo,
    deadline: Instant,
    max_message_size: usize,
) -> Result<Sockets, KernelError> {
    let identity = PeerIdentity::new();
    let with_identity = |id: Option<&PeerIdentity>| {
        let mut options = SocketOptions::default();
        options.max_message_size(max_message_size);
        // Our own deadline bounds connecting; the crate's 30 s default must not cut it short.
        options.no_connect_timeout();
        if let Some(id) = id {
            options.peer_identity(id.clone());
        }
        options
    };

    let mut iopub = SubSocket::with_options(with_identity(None));
    iopub
        .subscribe("")
        .await
        .map_err(|e| connect_error(info, Channel::IoPub, e.to_string()))?;
    let shell = DealerSocket::with_options(with_identity(Some(&identity)));
    let stdin = DealerSocket::with_options(with_identity(Some(&identity)));
    let control = DealerSocket::with_options(with_identity(None));
    let heartbeat = DealerSocket::with_options(with_identity(None));

    let (iopub, shell, stdin, control, heartbeat) = tokio::try_join!(
        connect_one(iopub, info, Channel::IoPub, deadline),
        connect_one(shell, info, Channel::Shell, deadline),
        connect_one(stdin, info, Channel::Stdin, deadline),
        connect_one(control, info, Channel::Control, deadline),
        connect_one(heartbeat, info, Channel::Heartbeat, deadline),
    )?;
    Ok(Sockets {
        iopub,
        shell,
        stdin,
        control,
        heartbeat,
    })
}

/// Waits until `channel`'s endpoint accepts connections, then does the ZMTP handshake.
async fn connect_one<S: Socket>(
    mut socket: S,
    info: &ConnectionInfo,
    channel: Channel,
    deadline: Instant,
) -> Result<Monitored<S>, KernelError> {
    wait_listening(info, channel, deadline).await;
    if info.transport == Transport::Ipc {
        not_planted(&info.ipc_path(channel), info.socket_owner)
            .map_err(|e| connect_error(info, channel, e))?;
    }
    let events = socket.monitor();
    socket
        .connect(&info.endpoint(channel))
        .await
        .map_err(|e| connect_error(info, channel, e.to_string()))?;
    Ok(Monitored { socket, events })
}

/// A kernel's socket directory is the kernel's: what sits at a socket's path must be a socket
/// itself (`lstat`), not a symlink, file or fifo planted there to send the server elsewhere on
/// the host, and owned by `owner` (the kernel's uid) when the sandbox names one. Not there yet
/// is for the connect to report.
fn not_planted(path: &std::path::Path, owner: Option<u32>) -> Result<(), String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => Err(format!(
            "{} is not a socket (something else was put in its place)",
            path.display()
        )),
        Ok(meta) if owner.is_some_and(|uid| meta.uid() != uid) => Err(format!(
            "the socket {} belongs to uid {}, not to the kernel's uid {}",
            path.display(),
            meta.uid(),
            owner.unwrap_or_default()
        )),
        _ => Ok(()),
    }
}

/// Polls the endpoint with plain socket connects until it is listening (or the probe fails for
/// another reason than "not there yet", which the ZeroMQ connect will then report).
async fn wait_listening(info: &ConnectionInfo, channel: Channel, deadline: Instant) {
    use std::io::ErrorKind;
    loop {
        let probe = match info.transport {
            Transport::Tcp => probe_zmtp(&info.ip, info.port(channel)).await,
            Transport::Ipc => match not_planted(&info.ipc_path(channel), info.socket_owner) {
                // Never connect through what the kernel planted; connect_one reports it.
                Err(_) => return,
                Ok(()) => tokio::net::UnixStream::connect(info.ipc_path(channel))
                    .await
                    .map(drop),
            },
        };
        match probe {
            Err(e)
                if matches!(e.kind(), ErrorKind::ConnectionRefused | ErrorKind::NotFound)
                    && Instant::now() + PROBE_INTERVAL < deadline =>
            {
                tokio::time::sleep(PROBE_INTERVAL).await;
            }
            _ => return,
        }
    }
}

/// A TCP endpoint is listening when a ZeroMQ peer answers there: a port proxy (Docker's
/// `docker-proxy`, a load balancer) accepts connections before the kernel behind it binds, so a
/// bare connect proves nothing. ZMTP peers send their greeting as soon as a connection opens;
/// a proxy with nothing behind it closes the connection instead (reported as refused).
async fn probe_zmtp(host: &str, port: u16) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const SIGNATURE: [u8; 10] = [0xff, 0, 0, 0, 0, 0, 0, 0, 1, 0x7f];
    let mut stream = tokio::net::TcpStream::connect((host, port)).await?;
    stream.write_all(&SIGNATURE).await?;
    let mut first = [0u8; 1];
    let refused = || std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
    match tokio::time::timeout(Duration::from_millis(500), stream.read(&mut first)).await {
        Ok(Ok(1..)) => Ok(()),
        Ok(Ok(0)) | Ok(Err(_)) | Err(_) => Err(refused()),
    }
}

fn connect_error(info: &ConnectionInfo, channel: Channel, reason: String) -> KernelError {
    KernelError::Connect {
        channel: channel.as_str(),
        endpoint: info.endpoint(channel),
        reason,
    }
}

/// What a socket task needs to turn frames into `Incoming` messages.
struct Reader {
    channel: Channel,
    signer: Signer,
    incoming: mpsc::Sender<Incoming>,
    /// msg_id prefix of this client's readiness requests.
    ready_prefix: String,
    /// Where readiness replies go while `connect` waits for them (closed afterwards). Boxed:
    /// they are few, and the channel's slots stay small for as long as the readers live.
    ready: mpsc::Sender<(Channel, Box<Message>)>,
}

impl Reader {
    /// Reports a socket error that is the kernel's fault (once: the socket's task then ends).
    async fn socket_failed(&self, error: &ZmqError) {
        let channel = self.channel.as_str();
        match WireFault::of(self.channel, error) {
            Some(fault) => {
                tracing::warn!(channel, %fault, "kernel broke the wire protocol; stopping");
                let _ = self.incoming.send(Incoming::Fault(Box::new(fault))).await;
            }
            None => tracing::warn!(channel, %error, "socket failed; stopping"),
        }
    }

    /// Verifies and decodes `frames`, then routes the message: readiness chatter to `connect`
    /// (or nowhere), everything else to the `Incoming` channel, waiting for room there.
    async fn deliver(&self, frames: ZmqMessage) {
        let msg = match codec::decode(frames.into_vec(), &self.signer) {
            Ok(msg) => msg,
            Err(error) => {
                tracing::warn!(channel = self.channel.as_str(), %error, "dropping kernel message");
                return;
            }
        };
        let readiness = msg.msg_type() == "iopub_welcome"
            || msg
                .parent_id()
                .is_some_and(|id| id.starts_with(&self.ready_prefix));
        if readiness {
            let _ = self.ready.try_send((self.channel, Box::new(msg)));
            return;
        }
        let channel = self.channel;
        let msg = Arc::new(msg);
        // A dropped receiver means nobody listens any more: keep draining, discard.
        let _ = self.incoming.send(Incoming::Message { channel, msg }).await;
    }
}

/// Drains iopub as fast as the `Incoming` channel takes messages, until the kernel disconnects.
async fn run_iopub(mut sub: Monitored<SubSocket>, reader: Reader) {
    loop {
        tokio::select! {
            biased;
            received = sub.socket.recv() => match received {
                Ok(frames) => reader.deliver(frames).await,
                Err(error) => {
                    reader.socket_failed(&error).await;
                    return;
                }
            },
            () = peer_gone(&mut sub.events) => {
                tracing::debug!(channel = "iopub", "kernel disconnected");
                return;
            }
        }
    }
}

/// Reads a DEALER's replies until the kernel disconnects or the client is dropped; then marks
/// its sending half closed.
async fn run_dealer(
    mut dealer: DealerRecvHalf,
    mut events: futures::channel::mpsc::Receiver<SocketEvent>,
    reader: Reader,
    closed: Arc<AtomicBool>,
) {
    let channel = reader.channel.as_str();
    loop {
        tokio::select! {
            biased;
            received = dealer.recv() => match received {
                Ok(frames) => reader.deliver(frames).await,
                Err(error) => {
                    reader.socket_failed(&error).await;
                    break;
                }
            },
            () = peer_gone(&mut events) => {
                tracing::debug!(channel, "kernel disconnected");
                break;
            }
        }
    }
    closed.store(true, Ordering::Release);
}

/// A socket send error as the caller should see it: a vanished peer is `Closed`.
fn send_error(channel: &'static str, error: ZmqError) -> KernelError {
    match error {
        ZmqError::ReturnToSender { .. } => KernelError::Closed,
        other => KernelError::Send {
            channel,
            reason: other.to_string(),
        },
    }
}

/// Pings the heartbeat every `interval` (an empty delimiter frame + a sequence payload, which the
/// kernel's ROUTER echoes); after `max_misses` unanswered pings in a row reports `HeartbeatLost`
/// once. A kernel that was only stopped or starved (it keeps its connection) is pinged on: once
/// it answers again, a later loss is reported again. A kernel whose connection went is not:
/// the task ends after reporting. A DEALER is used rather than REQ because REQ's recv is not
/// cancel-safe.
async fn run_heartbeat(
    mut hb: Monitored<DealerSocket>,
    interval: Duration,
    max_misses: u32,
    incoming: mpsc::Sender<Incoming>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut misses = 0;
    let mut lost = false;
    let mut disconnected = false;
    for seq in 0u64.. {
        ticker.tick().await;
        let payload = Bytes::from(format!("kernelbox-hb-{seq}"));
        let ping = ZmqMessage::try_from(vec![Bytes::new(), payload.clone()]);
        // Bounded like the answer: a stopped kernel's socket buffers fill up eventually.
        let sent = match ping {
            Ok(ping) if !disconnected => {
                matches!(
                    tokio::time::timeout(interval, hb.socket.send(ping)).await,
                    Ok(Ok(()))
                )
            }
            _ => false,
        };
        let answer = if sent {
            tokio::time::timeout(interval, async {
                loop {
                    tokio::select! {
                        biased;
                        received = hb.socket.recv() => match received {
                            Ok(pong) if pong.iter().last() == Some(&payload) => return Ok(true),
                            Ok(_) => {} // a late answer to an earlier ping
                            Err(error) => return Err(error),
                        },
                        () = peer_gone(&mut hb.events) => return Ok(false),
                    }
                }
            })
            .await
        } else {
            Ok(Ok(false))
        };
        let answered = match answer {
            Ok(Ok(answered)) => {
                // `peer_gone` returned: the connection went.
                disconnected |= sent && !answered;
                answered
            }
            Ok(Err(error)) => {
                if let Some(fault) = WireFault::of(Channel::Heartbeat, &error) {
                    tracing::warn!(channel = "hb", %fault, "kernel broke the wire protocol");
                    let _ = incoming.send(Incoming::Fault(Box::new(fault))).await;
                    return;
                }
                false
            }
            Err(_elapsed) => false,
        };
        if answered {
            if lost {
                tracing::info!("kernel heartbeat answers again");
            }
            misses = 0;
            lost = false;
            continue;
        }
        misses += 1;
        tracing::debug!(misses, "heartbeat ping unanswered");
        if misses >= max_misses && !lost {
            tracing::warn!(misses, "kernel heartbeat lost");
            lost = true;
            if incoming.send(Incoming::HeartbeatLost).await.is_err() {
                return;
            }
        }
        if lost && disconnected {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::not_planted;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn only_a_real_socket_of_the_kernels_uid_is_connected_to() {
        let dir = std::env::temp_dir().join(format!("kb-planted-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir(&dir).unwrap();
        let socket = dir.join("k-1");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let mine = std::fs::symlink_metadata(&socket).unwrap().uid();

        assert!(not_planted(&socket, None).is_ok());
        assert!(not_planted(&socket, Some(mine)).is_ok());
        let other = not_planted(&socket, Some(mine + 1)).unwrap_err();
        assert!(other.contains("belongs to uid"), "{other}");

        let link = dir.join("k-2");
        std::os::unix::fs::symlink(&socket, &link).unwrap();
        let planted = not_planted(&link, Some(mine)).unwrap_err();
        assert!(planted.contains("is not a socket"), "{planted}");
        assert!(
            not_planted(&dir.join("k-3"), Some(mine)).is_ok(),
            "absent: connect reports it"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
