//! The REPL's connection to a kernelbox server: creating (or reopening) a session over REST and
//! speaking the native protocol over its WebSocket. The reader task numbers nothing itself: it
//! tracks the last `seq` seen and, when the connection drops, reconnects with `?since=` so no
//! event is lost or doubled.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// What can go wrong talking to the server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server refused the token.
    #[error("the server refused the token (401): pass --token or set KERNELBOX_TOKEN")]
    Unauthorized,
    /// The session does not exist.
    #[error("no session {0} on the server")]
    NoSession(String),
    /// Any other HTTP answer.
    #[error("the server answered {status}: {message}")]
    Http {
        /// HTTP status.
        status: u16,
        /// The server's `error` message, or the body.
        message: String,
    },
    /// The server could not be reached.
    #[error("cannot reach {url}: {reason}")]
    Unreachable {
        /// What was tried.
        url: String,
        /// Why it failed.
        reason: String,
    },
    /// The WebSocket failed.
    #[error("websocket: {0}")]
    WebSocket(String),
}

/// A server and its token.
#[derive(Debug, Clone)]
pub struct Server {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Server {
    /// `url` is the server's base URL (`http://host:port`).
    pub fn new(url: &str, token: &str) -> Self {
        Self {
            base: url.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            http: reqwest::Client::new(),
        }
    }

    async fn call(
        &self,
        request: reqwest::RequestBuilder,
        what: &str,
    ) -> Result<Value, ClientError> {
        let response = request.bearer_auth(&self.token).send().await.map_err(|e| {
            ClientError::Unreachable {
                url: format!("{}{what}", self.base),
                reason: e.to_string(),
            }
        })?;
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        match status {
            200..=299 => Ok(body),
            401 => Err(ClientError::Unauthorized),
            _ => Err(ClientError::Http {
                status,
                message: body["error"]
                    .as_str()
                    .map_or_else(|| body.to_string(), str::to_owned),
            }),
        }
    }

    /// Starts a new session; returns its id.
    pub async fn create_session(&self) -> Result<String, ClientError> {
        let url = format!("{}/v1/sessions", self.base);
        let body = self
            .call(self.http.post(url).json(&json!({})), "/v1/sessions")
            .await?;
        body["id"]
            .as_str()
            .map(str::to_owned)
            .ok_or(ClientError::Http {
                status: 201,
                message: format!("no id in {body}"),
            })
    }

    /// Checks that session `id` exists.
    pub async fn check_session(&self, id: &str) -> Result<(), ClientError> {
        let path = format!("/v1/sessions/{id}");
        match self
            .call(self.http.get(format!("{}{path}", self.base)), &path)
            .await
        {
            Err(ClientError::Http { status: 404, .. }) => {
                Err(ClientError::NoSession(id.to_owned()))
            }
            other => other.map(|_| ()),
        }
    }

    /// Ends session `id` (its kernel and container).
    pub async fn delete_session(&self, id: &str) -> Result<(), ClientError> {
        let path = format!("/v1/sessions/{id}");
        self.call(self.http.delete(format!("{}{path}", self.base)), &path)
            .await
            .map(|_| ())
    }

    fn ws_url(&self, id: &str, since: Option<u64>) -> String {
        let base = self
            .base
            .replacen("https://", "wss://", 1)
            .replacen("http://", "ws://", 1);
        match since {
            Some(seq) => format!("{base}/v1/sessions/{id}/ws?since={seq}"),
            None => format!("{base}/v1/sessions/{id}/ws"),
        }
    }
}

/// A live connection to one session: send commands, receive events.
pub struct Connection {
    /// Commands to the server (JSON objects).
    pub outgoing: mpsc::Sender<Value>,
    /// Events from the server, in order; `None` once the connection is lost for good.
    pub events: mpsc::Receiver<Value>,
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(server: &Server, id: &str, since: Option<u64>) -> Result<Ws, ClientError> {
    let mut request = server
        .ws_url(id, since)
        .into_client_request()
        .map_err(|e| ClientError::WebSocket(e.to_string()))?;
    let auth = format!("Bearer {}", server.token)
        .parse()
        .map_err(|_| ClientError::WebSocket("the token is not a valid header value".into()))?;
    request.headers_mut().insert("Authorization", auth);
    let (ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .map_err(|e| ClientError::WebSocket(e.to_string()))?;
    Ok(ws)
}

/// Opens session `id`'s WebSocket; the returned connection reconnects (with replay) by itself.
pub async fn connect(server: Server, id: String) -> Result<Connection, ClientError> {
    let ws = open(&server, &id, None).await?;
    let (out_tx, mut out_rx) = mpsc::channel::<Value>(64);
    let (ev_tx, ev_rx) = mpsc::channel::<Value>(1024);
    tokio::spawn(async move {
        let mut ws = ws;
        let mut last_seq: Option<u64> = None;
        loop {
            let lost = loop {
                tokio::select! {
                    command = out_rx.recv() => match command {
                        Some(command) => {
                            if ws.send(Message::Text(command.to_string().into())).await.is_err() {
                                break true;
                            }
                        }
                        None => return,
                    },
                    frame = ws.next() => match frame {
                        Some(Ok(Message::Text(text))) => {
                            let Ok(event) = serde_json::from_str::<Value>(&text) else { continue };
                            if let Some(seq) = event["seq"].as_u64() {
                                last_seq = Some(seq);
                            }
                            if ev_tx.send(event).await.is_err() {
                                return;
                            }
                        }
                        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break true,
                        Some(Ok(_)) => {}
                    },
                }
            };
            if !lost {
                return;
            }
            // Reconnect with replay, a few times, backing off.
            let mut reopened = None;
            for attempt in 0..8u32 {
                tokio::time::sleep(Duration::from_millis(200 << attempt.min(5))).await;
                if let Ok(new) = open(&server, &id, Some(last_seq.unwrap_or(0))).await {
                    reopened = Some(new);
                    break;
                }
            }
            match reopened {
                Some(new) => ws = new,
                None => return,
            }
        }
    });
    Ok(Connection {
        outgoing: out_tx,
        events: ev_rx,
    })
}
