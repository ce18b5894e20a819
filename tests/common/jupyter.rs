//! A small Jupyter WebSocket client (the Kernel Gateway protocol: JSON text frames with a
//! `channel` field), for tests against kernelbox directly or through jupyter_server.
#![allow(dead_code)]

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any expected message may take.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// A Jupyter kernel WebSocket.
pub struct JupyterWs {
    pub stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The client's Jupyter session id (headers' `session`, the URL's `session_id`).
    pub session: String,
}

/// What one execute_request produced.
#[derive(Debug, Default)]
pub struct Execution {
    /// iopub messages whose parent is the request, in order (status included).
    pub iopub: Vec<Value>,
    /// The shell execute_reply.
    pub reply: Value,
}

impl Execution {
    /// iopub messages of one type.
    pub fn of(&self, msg_type: &str) -> Vec<&Value> {
        self.iopub
            .iter()
            .filter(|m| m["msg_type"] == msg_type)
            .collect()
    }
    /// The execute_result's text/plain.
    pub fn result_text(&self) -> Option<String> {
        self.of("execute_result")
            .first()
            .and_then(|m| m["content"]["data"]["text/plain"].as_str())
            .map(str::to_owned)
    }
    /// All stdout text.
    pub fn stdout(&self) -> String {
        self.of("stream")
            .iter()
            .filter(|m| m["content"]["name"] == "stdout")
            .filter_map(|m| m["content"]["text"].as_str())
            .collect()
    }
}

impl JupyterWs {
    /// Connects to `url` (ws://…/api/kernels/{id}/channels) with `session_id` and the token in an
    /// `Authorization: token` header.
    pub async fn connect(base: &str, session: &str, token: &str) -> Self {
        let url = format!("{base}?session_id={session}");
        let mut request = url.into_client_request().expect("ws request");
        request.headers_mut().insert(
            "Authorization",
            format!("token {token}").parse().expect("header"),
        );
        let (stream, _) = tokio_tungstenite::connect_async(request)
            .await
            .expect("ws connect");
        Self {
            stream,
            session: session.to_owned(),
        }
    }

    /// A message of this client's session.
    pub fn message(&self, channel: &str, msg_type: &str, content: Value) -> Value {
        let msg_id = uuid::Uuid::new_v4().to_string();
        json!({
            "channel": channel,
            "header": {
                "msg_id": msg_id,
                "msg_type": msg_type,
                "session": self.session,
                "username": "test",
                "date": "2026-01-01T00:00:00.000000Z",
                "version": "5.3",
            },
            "parent_header": {},
            "metadata": {},
            "content": content,
            "buffers": [],
        })
    }

    /// Sends a message built by [`message`](Self::message); returns its msg_id.
    pub async fn send(&mut self, msg: Value) -> String {
        let id = msg["header"]["msg_id"].as_str().expect("msg_id").to_owned();
        self.send_raw(Message::Text(msg.to_string().into())).await;
        id
    }

    /// Sends any frame.
    pub async fn send_raw(&mut self, frame: Message) {
        self.stream.send(frame).await.expect("ws send");
    }

    /// The next JSON message (panics on timeout, close or a non-JSON frame).
    pub async fn next(&mut self) -> Value {
        loop {
            let frame = tokio::time::timeout(TIMEOUT, self.stream.next())
                .await
                .expect("timed out waiting for a Jupyter message")
                .expect("connection closed")
                .expect("ws error");
            match frame {
                Message::Text(text) => return serde_json::from_str(&text).expect("JSON"),
                Message::Binary(b) => panic!("unexpected binary frame of {} bytes", b.len()),
                Message::Close(c) => panic!("closed: {c:?}"),
                _ => continue,
            }
        }
    }

    /// Skips messages until one matches.
    pub async fn until(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        loop {
            let msg = self.next().await;
            if pred(&msg) {
                return msg;
            }
        }
    }

    /// Sends a shell request and waits for its reply on shell.
    pub async fn request(&mut self, msg_type: &str, content: Value) -> Value {
        let msg = self.message("shell", msg_type, content);
        let id = self.send(msg).await;
        self.until(|m| m["channel"] == "shell" && m["parent_header"]["msg_id"] == id.as_str())
            .await
    }

    /// Sends an execute_request; returns its msg_id.
    pub async fn submit(&mut self, code: &str) -> String {
        let msg = self.message(
            "shell",
            "execute_request",
            json!({"code": code, "silent": false, "store_history": true,
                   "user_expressions": {}, "allow_stdin": false, "stop_on_error": true}),
        );
        self.send(msg).await
    }

    /// Collects the iopub messages and the reply of request `id` until both the reply and the
    /// idle status have arrived.
    pub async fn collect(&mut self, id: &str) -> Execution {
        let mut out = Execution::default();
        let mut idle = false;
        while !idle || out.reply.is_null() {
            let msg = self.next().await;
            if msg["parent_header"]["msg_id"] != id {
                continue;
            }
            match msg["channel"].as_str() {
                Some("iopub") => {
                    idle |=
                        msg["msg_type"] == "status" && msg["content"]["execution_state"] == "idle";
                    out.iopub.push(msg);
                }
                Some("shell") => out.reply = msg,
                _ => {}
            }
        }
        out
    }

    /// Runs code and returns what it produced.
    pub async fn execute(&mut self, code: &str) -> Execution {
        let id = self.submit(code).await;
        self.collect(&id).await
    }
}
