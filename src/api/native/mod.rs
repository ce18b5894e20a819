//! The native WebSocket protocol at `/v1/sessions/{id}/ws`: JSON commands in, JSON events out.
//! One task reads the client's frames, one writes the session's events; a slow client only
//! ever delays itself.

pub mod protocol;
pub mod render;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::Query;
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;

use self::protocol::{ClientMessage, ServerEvent, ServerMessage};
use self::render::{EMPTY_LIST, render_text};
use super::OwnedSession;
use super::metrics::{Front, Relay, frame_len};
use super::outbound::{Outbound, pump};
use crate::session::{CodeQuery, ExecuteRequest, Session, SessionError, SessionEvent};

/// Query parameters of the WebSocket URL.
#[derive(Debug, serde::Deserialize)]
pub struct ConnectParams {
    /// Resume after this sequence number: the session's buffered events after it are replayed
    /// before live ones, so a reconnecting client misses nothing and gets nothing twice.
    since: Option<u64>,
}

/// `GET /v1/sessions/{id}/ws[?since=N]`: upgrades to the native protocol (404 for unknown
/// sessions).
pub async fn upgrade(
    ws: WebSocketUpgrade,
    session: OwnedSession,
    Query(params): Query<ConnectParams>,
) -> Response {
    let session = session.into_session();
    crate::api::ws_config::configure(ws)
        .on_upgrade(move |socket| connection(socket, session, params.since))
}

/// Serves one WebSocket client of `session` until either side closes.
async fn connection(socket: WebSocket, session: Arc<Session>, since: Option<u64>) {
    let relay = Relay::open(Front::Native);
    let relay = &relay;
    let subscription = session.subscribe_from(since);
    let mut events = subscription.live;
    let (mut sink, mut stream) = socket.split();
    let (replies_tx, mut replies_rx) = mpsc::channel::<String>(64);

    // Only the events this protocol renders are replayed (and counted).
    let replay: Vec<String> = subscription
        .missed
        .iter()
        .filter_map(|event| render_text(event).and_then(Result::ok))
        .collect();
    let greeting = match since {
        Some(since) => ServerEvent::Resumed {
            since,
            replayed: replay.len(),
            dropped: subscription.dropped,
        },
        None => ServerEvent::Kernel {
            state: session.info().state,
            reason: None,
        },
    };
    let hello = ServerMessage {
        seq: None,
        id: None,
        event: greeting,
    };
    if let Ok(text) = serde_json::to_string(&hello) {
        let len = text.len();
        if sink.send(WsMessage::Text(text.into())).await.is_err() {
            return;
        }
        relay.sent(len);
    }
    let last_seq = subscription.last_seq;
    for text in replay {
        let frame = WsMessage::Text(text.into());
        let len = frame_len(&frame);
        if sink.send(frame).await.is_err() {
            return;
        }
        relay.sent(len);
    }

    let writer = async move {
        let front = Outbound {
            reply: |text: String| WsMessage::Text(text.into()),
            event: |event: &SessionEvent| match render_text(event) {
                Some(Ok(text)) => Some(WsMessage::Text(text.into())),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "cannot encode event");
                    None
                }
                None => None,
            },
            delivered: |_| {},
            resume: |last_seq| format!("reconnect with ?since={last_seq}"),
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

    let reader = async move {
        while let Some(frame) = stream.next().await {
            let reply = match frame {
                Ok(WsMessage::Text(text)) => handle_text(&session, text.as_str()),
                Ok(WsMessage::Binary(_)) => Some(local_error(
                    None,
                    "InvalidMessage",
                    "binary frames are not part of the protocol: send JSON text frames",
                )),
                Ok(WsMessage::Close(_)) | Err(_) => break,
                Ok(_) => None,
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
}

/// Parses and carries out one client frame; returns an error reply for this client if any.
fn handle_text(session: &Session, text: &str) -> Option<String> {
    let message: ClientMessage = match serde_json::from_str(text) {
        Ok(m) => m,
        Err(e) => {
            return Some(local_error(
                None,
                "InvalidMessage",
                &format!("invalid message: {e}"),
            ));
        }
    };
    let (id, result) = match message {
        ClientMessage::Execute {
            id,
            code,
            silent,
            store_history,
            allow_stdin,
            timeout_s,
        } => {
            let timeout = match timeout_s {
                None => None,
                Some(t) if t.is_finite() && t > 0.0 => Some(Duration::from_secs_f64(t)),
                Some(t) => {
                    return Some(local_error(
                        id.as_deref(),
                        "InvalidMessage",
                        &format!("timeout_s must be a positive number of seconds, not {t}"),
                    ));
                }
            };
            let cell: Arc<str> = id.unwrap_or_else(new_id).into();
            let request = ExecuteRequest {
                cell: cell.clone(),
                code,
                silent,
                store_history: store_history.unwrap_or(!silent),
                allow_stdin: allow_stdin.unwrap_or(true),
                timeout,
            };
            (Some(cell), session.execute(request))
        }
        ClientMessage::Interrupt {} => (None, session.interrupt()),
        ClientMessage::Restart {} => (None, session.restart()),
        ClientMessage::InputReply { value } => (None, session.input_reply(value)),
        ClientMessage::Complete { id, code, cursor } => {
            let id: Arc<str> = id.unwrap_or_else(new_id).into();
            let query = CodeQuery {
                id: id.clone(),
                code,
                cursor,
                detail_level: 0,
            };
            (Some(id), session.complete(query))
        }
        ClientMessage::IsComplete { id, code } => {
            let id: Arc<str> = id.unwrap_or_else(new_id).into();
            let query = CodeQuery {
                id: id.clone(),
                code,
                cursor: 0,
                detail_level: 0,
            };
            (Some(id), session.is_complete(query))
        }
        ClientMessage::KernelInfo { id } => {
            let id: Arc<str> = id.unwrap_or_else(new_id).into();
            (Some(id.clone()), session.kernel_info(id))
        }
        ClientMessage::Inspect {
            id,
            code,
            cursor,
            detail_level,
        } => {
            let id: Arc<str> = id.unwrap_or_else(new_id).into();
            let query = CodeQuery {
                id: id.clone(),
                code,
                cursor,
                detail_level,
            };
            (Some(id), session.inspect(query))
        }
        ClientMessage::Install { id, packages } => {
            let id: Arc<str> = id.unwrap_or_else(new_id).into();
            (Some(id.clone()), session.install(id, packages))
        }
    };
    result
        .err()
        .map(|e: SessionError| local_error(id.as_deref(), "Rejected", &e.to_string()))
}

fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// An `error` event for this connection only (no sequence number).
fn local_error(id: Option<&str>, ename: &str, evalue: &str) -> String {
    let message = ServerMessage {
        seq: None,
        id,
        event: ServerEvent::Error {
            ename: ename.into(),
            evalue: evalue.into(),
            traceback: (&EMPTY_LIST).into(),
        },
    };
    serde_json::to_string(&message).unwrap_or_else(|_| {
        r#"{"type":"error","ename":"InternalError","evalue":"cannot encode error","traceback":[]}"#
            .to_owned()
    })
}
