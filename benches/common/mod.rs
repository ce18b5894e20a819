//! Shared pieces of the benchmarks: a server on port 0, a WebSocket cell runner, statistics.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use kernelbox::api::{self, AppState, Token};
use kernelbox::sandbox::Sandbox;
use kernelbox::session::{SessionManager, SessionOptions};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// Errors of a benchmark run.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A WebSocket to one session.
pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// An environment variable as a number, or a default.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Median and p99 of samples, in milliseconds.
pub fn summary(samples: &mut [Duration]) -> (f64, f64) {
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[i].as_secs_f64() * 1000.0
    };
    (at(0.5), at(0.99))
}

/// A kernelbox server on a free loopback port.
pub struct Server {
    pub addr: std::net::SocketAddr,
    pub sessions: Arc<SessionManager>,
}

pub const TOKEN: &str = "bench";

impl Server {
    /// Starts a server on `sandbox`.
    pub async fn start(
        sandbox: Arc<dyn Sandbox>,
        options: SessionOptions,
    ) -> Result<Self, BoxError> {
        let sessions = SessionManager::new(sandbox, options);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = AppState::new(sessions.clone(), Token::new(TOKEN));
        tokio::spawn(api::serve(listener, state, std::future::pending()));
        Ok(Self { addr, sessions })
    }

    /// Creates a session through the REST API and opens its WebSocket.
    pub async fn session(&self) -> Result<(String, Ws), BoxError> {
        let resp = reqwest::Client::new()
            .post(format!("http://{}/v1/sessions", self.addr))
            .bearer_auth(TOKEN)
            .send()
            .await?;
        let body: Value = resp.json().await?;
        let id = body["id"].as_str().ok_or("no id")?.to_owned();
        let url = format!("ws://{}/v1/sessions/{id}/ws?token={TOKEN}", self.addr);
        let (ws, _) = tokio_tungstenite::connect_async(url).await?;
        if let tokio_tungstenite::MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_nodelay(true)?;
        }
        Ok((id, ws))
    }
}

/// Runs `code` as cell `id` and waits for its `done`; returns the execute_result's text/plain.
pub async fn run_cell(ws: &mut Ws, id: &str, code: &str) -> Result<Option<String>, BoxError> {
    ws.send(Message::Text(
        json!({"type": "execute", "id": id, "code": code})
            .to_string()
            .into(),
    ))
    .await?;
    let mut result = None;
    loop {
        let Some(frame) = ws.next().await else {
            return Err("ws closed".into());
        };
        if let Message::Text(text) = frame? {
            let event: Value = serde_json::from_str(&text)?;
            if event["id"] != id {
                continue;
            }
            match event["type"].as_str() {
                Some("execute_result") => {
                    result = event["data"]["text/plain"].as_str().map(str::to_owned)
                }
                Some("done") => return Ok(result),
                _ => {}
            }
        }
    }
}

/// Times `f` once.
pub async fn timed<T>(
    f: impl Future<Output = Result<T, BoxError>>,
) -> Result<(Duration, T), BoxError> {
    let t = Instant::now();
    let out = f.await?;
    Ok((t.elapsed(), out))
}
