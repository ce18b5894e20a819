//! The Kernel Gateway WebSocket, `/api/kernels/{id}/channels?session_id=…`: Jupyter messages
//! in both directions, as JSON text frames with a `channel` field (or the
//! `v1.kernel.websocket.jupyter.org` binary subprotocol when the client asks for it). The server
//! signs toward the kernel; clients never see the key.
//!
//! What a connection receives: every iopub message of the kernel; shell, stdin and control
//! messages answering its own requests (by the parent header's session, or by the request it
//! forwarded); synthetic iopub `status` messages for `starting`, `restarting` and `dead`.
//! A client reconnecting with the same `session_id` first gets what it missed (from the
//! session's bounded replay buffer), in order, exactly once. Bad frames are dropped with a
//! warning (and, for a well-formed request of an unknown type, an error reply): they never
//! close the connection and never reach the kernel.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};

use crate::api::outbound::{Outbound, pump};
use axum::extract::{Query, State};
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;

use super::wire::{self, ClientFrame, FrameError, V1_PROTOCOL};
use crate::api::metrics::{Front, Relay, frame_len};
use crate::api::{AppState, OwnedSession};
use crate::session::{Channel, Message};
use crate::session::{EventKind, KernelState, Session, SessionEvent};

/// Message types clients may send, by channel.
const SHELL_TYPES: &[&str] = &[
    "execute_request",
    "inspect_request",
    "complete_request",
    "history_request",
    "is_complete_request",
    "comm_info_request",
    "kernel_info_request",
    "comm_open",
    "comm_msg",
    "comm_close",
    "shutdown_request",
];
const CONTROL_TYPES: &[&str] = &[
    "shutdown_request",
    "interrupt_request",
    "kernel_info_request",
    "debug_request",
    "usage_request",
];
const STDIN_TYPES: &[&str] = &["input_reply"];

/// Query parameters of the channels URL.
#[derive(Debug, Deserialize)]
pub struct ChannelsParams {
    /// The client's Jupyter session id: identifies the client across reconnects.
    session_id: Option<String>,
}

/// `GET /api/kernels/{id}/channels`: upgrades to the Jupyter WebSocket (404 for unknown kernels).
pub async fn upgrade(
    ws: WebSocketUpgrade,
    State(state): State<AppState>,
    session: OwnedSession,
    Query(params): Query<ChannelsParams>,
) -> Response {
    let client = params
        .session_id
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    crate::api::ws_config::configure(ws)
        .protocols([V1_PROTOCOL])
        .on_upgrade(move |socket| connection(socket, state, session, client))
}

/// How this connection frames messages.
#[derive(Clone, Copy)]
enum Framing {
    /// JSON text frames (legacy binary frames for messages with buffers).
    Json,
    /// `v1.kernel.websocket.jupyter.org` binary frames.
    V1,
}

impl Framing {
    fn encode(self, channel: Channel, msg: &Message) -> WsMessage {
        match self {
            Framing::V1 => WsMessage::Binary(wire::encode_v1(channel, msg).into()),
            Framing::Json if msg.buffers.is_empty() => {
                WsMessage::Text(wire::to_json_text(channel, msg).into())
            }
            Framing::Json => WsMessage::Binary(wire::encode_legacy_binary(channel, msg).into()),
        }
    }
}

/// Serves one Jupyter client of `session` until either side closes.
async fn connection(socket: WebSocket, state: AppState, owned: OwnedSession, client: String) {
    let session = owned.session().clone();
    let framing = if socket.protocol().is_some_and(|p| p == V1_PROTOCOL) {
        Framing::V1
    } else {
        Framing::Json
    };
    let relay = Relay::open(Front::Jupyter);
    let relay = &relay;
    let origin: Arc<str> = format!("jupyter:{client}").into();
    let cursor_key = (session.id().to_owned(), client.clone());
    let resume_from = state.jupyter_cursor(&cursor_key);
    let subscription = session.subscribe_from(resume_from);
    let mut events = subscription.live;
    let (mut sink, mut stream) = socket.split();
    let (replies_tx, mut replies_rx) = mpsc::channel::<(Channel, Message)>(64);
    let mut last_seq = subscription.last_seq;

    if subscription.dropped > 0 {
        let note = wire::synthetic(
            "stream",
            None,
            json!({
                "name": "stderr",
                "text": format!(
                    "[kernelbox] {} messages sent while this client was away could not be \
                     replayed (the session's replay buffer overflowed)\n",
                    subscription.dropped
                ),
            }),
        );
        let frame = framing.encode(Channel::IoPub, &note);
        let len = frame_len(&frame);
        if sink.send(frame).await.is_err() {
            return;
        }
        relay.sent(len);
    }
    let mut replay_ok = true;
    for event in &subscription.missed {
        if let Some((channel, msg)) = render(event, &client, &origin) {
            let frame = framing.encode(channel, &msg);
            let len = frame_len(&frame);
            if sink.send(frame).await.is_err() {
                replay_ok = false;
                break;
            }
            relay.sent(len);
        }
        last_seq = event.seq;
    }

    let cursor = Arc::new(std::sync::atomic::AtomicU64::new(last_seq));
    let writer_cursor = cursor.clone();
    let reader_origin = origin.clone();
    let writer = async move {
        if !replay_ok {
            return;
        }
        let front = Outbound {
            reply: |(channel, msg): (Channel, Message)| framing.encode(channel, &msg),
            event: |event: &SessionEvent| {
                render(event, &client, &origin).map(|(channel, msg)| framing.encode(channel, &msg))
            },
            delivered: |seq| writer_cursor.store(seq, std::sync::atomic::Ordering::Relaxed),
            resume: |_| "reconnect with the same session_id".to_owned(),
        };
        pump(
            &mut sink,
            relay,
            &mut replies_rx,
            &mut events,
            last_seq,
            front,
        )
        .await;
    };

    let reader_session = owned;
    let reader = async move {
        while let Some(frame) = stream.next().await {
            let decoded = match frame {
                Ok(WsMessage::Text(text)) => wire::decode_text(text.as_str()),
                Ok(WsMessage::Binary(bytes)) => match framing {
                    Framing::V1 => wire::decode_v1(&bytes),
                    Framing::Json => wire::decode_legacy_binary(&bytes),
                },
                Ok(WsMessage::Close(_)) | Err(_) => break,
                Ok(_) => continue,
            };
            let reply = match decoded {
                Ok(frame) => handle(&reader_session, &reader_origin, frame).await,
                Err(e) => {
                    bad_frame(&reader_session, &e);
                    None
                }
            };
            if let Some(reply) = reply
                && tokio::time::timeout(Duration::from_secs(5), replies_tx.send(reply))
                    .await
                    .is_err()
            {
                break;
            }
        }
    };

    tokio::select! {
        () = writer => {},
        () = reader => {},
    }
    state.remember_jupyter_cursor(
        cursor_key,
        cursor.load(std::sync::atomic::Ordering::Relaxed),
    );
}

fn bad_frame(session: &Session, error: &FrameError) {
    // Bounded: the error may quote the client's header values (never its content).
    let error: String = error.to_string().chars().take(200).collect();
    tracing::warn!(session = session.id(), %error, "dropped a bad frame from a Jupyter client");
}

/// Carries out one client message; returns a reply kernelbox answers itself, if any.
async fn handle(
    session: &OwnedSession,
    origin: &Arc<str>,
    frame: ClientFrame,
) -> Option<(Channel, Message)> {
    let ClientFrame { channel, msg } = frame;
    let allowed = match channel {
        Channel::Shell => SHELL_TYPES,
        Channel::Control => CONTROL_TYPES,
        Channel::Stdin => STDIN_TYPES,
        Channel::IoPub | Channel::Heartbeat => &[],
    };
    let msg_type = msg.msg_type().to_owned();
    if !allowed.contains(&msg_type.as_str()) {
        tracing::warn!(session = session.id(), msg_type = %msg_type.chars().take(64).collect::<String>(), channel = channel.as_str(), "unknown message type from a Jupyter client");
        let reply_type = msg_type
            .strip_suffix("_request")
            .map_or_else(|| "error_reply".to_owned(), |base| format!("{base}_reply"));
        let reply = wire::synthetic(
            &reply_type,
            Some(&msg.header),
            json!({
                "status": "error",
                "ename": "UnknownMessageType",
                "evalue": format!("{msg_type:?} is not a {} message kernelbox relays", channel.as_str()),
                "traceback": [],
            }),
        );
        return Some((channel, reply));
    }
    if msg_type == "shutdown_request" {
        // The kernel's lifecycle belongs to the server: a restart is a session restart (new
        // process, new sockets); a plain shutdown ends the session.
        let restart = msg
            .content
            .get("restart")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false);
        let outcome = if restart {
            session.restart().map_err(|e| e.to_string())
        } else {
            session.close().await.map_err(|e| e.to_string())
        };
        let content = match outcome {
            Ok(()) => json!({"status": "ok", "restart": restart}),
            Err(e) => {
                json!({"status": "error", "restart": restart, "ename": "ShutdownFailed", "evalue": e, "traceback": []})
            }
        };
        return Some((
            channel,
            wire::synthetic("shutdown_reply", Some(&msg.header), content),
        ));
    }
    let header = msg.header.clone();
    if let Err(e) = session.forward(channel, msg, origin.clone()) {
        tracing::warn!(session = session.id(), error = %e, "cannot forward a Jupyter message");
        // A refused request (queue full, session closed) gets an error reply, so the client
        // does not wait for one forever.
        if let Some(base) = msg_type.strip_suffix("_request") {
            let reply = wire::synthetic(
                &format!("{base}_reply"),
                Some(&header),
                json!({
                    "status": "error",
                    "ename": "Rejected",
                    "evalue": e.to_string(),
                    "traceback": [],
                }),
            );
            return Some((channel, reply));
        }
    }
    None
}

/// The Jupyter message a session event becomes for client `client`, if any.
fn render<'a>(
    event: &'a SessionEvent,
    client: &str,
    origin: &Arc<str>,
) -> Option<(Channel, Cow<'a, Message>)> {
    match &event.kind {
        EventKind::Kernel { channel, msg } => {
            let mine = event.cell.as_ref() == Some(origin)
                || msg
                    .parent_header
                    .as_ref()
                    .is_some_and(|p| p.session == client);
            (*channel == Channel::IoPub || mine).then(|| (*channel, Cow::Borrowed(msg.as_ref())))
        }
        EventKind::State { state, .. } => {
            let execution_state = match state {
                KernelState::Starting => "starting",
                KernelState::Restarting => "restarting",
                KernelState::Dead | KernelState::Closed => "dead",
                KernelState::Idle | KernelState::Busy => return None,
            };
            Some((
                Channel::IoPub,
                Cow::Owned(wire::synthetic(
                    "status",
                    None,
                    json!({"execution_state": execution_state}),
                )),
            ))
        }
        EventKind::Rejected { message } if event.cell.as_ref() == Some(origin) => Some((
            Channel::IoPub,
            Cow::Owned(wire::synthetic(
                "stream",
                None,
                json!({"name": "stderr", "text": format!("[kernelbox] {message}\n")}),
            )),
        )),
        EventKind::Limit { message, .. } => Some((
            Channel::IoPub,
            Cow::Owned(wire::synthetic(
                "stream",
                None,
                json!({"name": "stderr", "text": format!("[kernelbox] {message}\n")}),
            )),
        )),
        EventKind::Accepted { .. }
        | EventKind::Done { .. }
        | EventKind::Rejected { .. }
        | EventKind::Install(_) => None,
    }
}
