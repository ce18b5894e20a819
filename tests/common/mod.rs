//! Test harness: a real kernelbox server on a free loopback port, with a real backend, and a
//! small WebSocket client that speaks the native protocol.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
pub mod jupyter;
pub mod serve_process;

use kernelbox::api::{self, AppState, KernelSpecs, Token};
use kernelbox::sandbox::Sandbox;
use kernelbox::sandbox::local::LocalSandbox;
use kernelbox::session::{SessionManager, SessionOptions};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any single expected event may take to arrive.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(60);

/// The python with ipykernel: `$KERNELBOX_PYTHON`, else the venv `kernelbox setup` makes.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("KERNELBOX_PYTHON") {
        return PathBuf::from(p);
    }
    let p = kernelbox::sandbox::local::venv::venv_python();
    assert!(
        p.exists(),
        "no kernel python: run `cargo run -- setup` or set KERNELBOX_PYTHON (looked for {})",
        p.display()
    );
    p
}

/// A fresh temporary state dir (short, for ipc socket paths).
pub fn temp_state_dir() -> PathBuf {
    let dir = PathBuf::from(format!(
        "/tmp/kbt-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    ));
    std::fs::create_dir_all(&dir).expect("create state dir");
    dir
}

/// A running server.
pub struct TestServer {
    pub addr: SocketAddr,
    pub token: String,
    pub sessions: Arc<SessionManager>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    /// A server on the local backend.
    pub async fn local() -> Self {
        let sandbox = LocalSandbox::new(python(), temp_state_dir()).expect("local sandbox");
        Self::start(Arc::new(sandbox), SessionOptions::default()).await
    }

    /// A server on `sandbox`.
    pub async fn start(sandbox: Arc<dyn Sandbox>, options: SessionOptions) -> Self {
        Self::start_with(sandbox, options, KernelSpecs::default()).await
    }

    /// A server on `sandbox` offering `kernelspecs` to Jupyter clients.
    pub async fn start_with(
        sandbox: Arc<dyn Sandbox>,
        options: SessionOptions,
        kernelspecs: KernelSpecs,
    ) -> Self {
        Self::start_configured(sandbox, options, move |state| {
            state.with_kernelspecs(kernelspecs)
        })
        .await
    }

    /// A server on `sandbox` whose state `configure` adjusts (tokens, origins, kernelspecs).
    /// `token` is still the `default` principal's unless `configure` replaces the tokens.
    pub async fn start_configured(
        sandbox: Arc<dyn Sandbox>,
        options: SessionOptions,
        configure: impl FnOnce(AppState) -> AppState,
    ) -> Self {
        let sessions = SessionManager::new(sandbox, options);
        let token = format!("test-{}", uuid::Uuid::new_v4().simple());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = configure(AppState::new(sessions.clone(), Token::new(&token)));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = api::serve(listener, state, async move {
                let _ = stopped.await;
            })
            .await;
        });
        Self {
            addr,
            token,
            sessions,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// `http://addr{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// An HTTP client.
    pub fn http(&self) -> reqwest::Client {
        reqwest::Client::new()
    }

    /// Creates a session over REST and returns its id.
    pub async fn create_session(&self) -> String {
        let resp = self
            .http()
            .post(self.url("/v1/sessions"))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("POST /v1/sessions");
        assert_eq!(
            resp.status(),
            201,
            "create session: {:?}",
            resp.text().await
        );
        let body: Value = resp.json().await.expect("json");
        body["id"].as_str().expect("id").to_owned()
    }

    /// Opens the native WebSocket of a session, resuming after event `since`.
    pub async fn ws_since(&self, id: &str, since: u64) -> Ws {
        let url = format!(
            "ws://{}/v1/sessions/{id}/ws?token={}&since={since}",
            self.addr, self.token
        );
        let (stream, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("ws connect");
        Ws { stream }
    }

    /// Opens the native WebSocket of a session.
    pub async fn ws(&self, id: &str) -> Ws {
        let url = format!(
            "ws://{}/v1/sessions/{id}/ws?token={}",
            self.addr, self.token
        );
        let (stream, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("ws connect");
        Ws { stream }
    }

    /// Creates a session and opens its WebSocket, waiting until its kernel is idle.
    pub async fn session(&self) -> (String, Ws) {
        let id = self.create_session().await;
        let mut ws = self.ws(&id).await;
        ws.wait_kernel("idle").await;
        (id, ws)
    }

    /// Closes every session and stops the server.
    pub async fn stop(mut self) {
        self.sessions.shutdown().await;
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// The output of one cell.
#[derive(Debug, Default)]
pub struct Cell {
    /// Every event of the cell, in order, `done` last.
    pub events: Vec<Value>,
}

impl Cell {
    /// Events of one type.
    pub fn of(&self, kind: &str) -> Vec<&Value> {
        self.events.iter().filter(|e| e["type"] == kind).collect()
    }
    /// The `text/plain` of the execute_result.
    pub fn result_text(&self) -> Option<String> {
        self.of("execute_result")
            .first()
            .and_then(|e| e["data"]["text/plain"].as_str())
            .map(str::to_owned)
    }
    /// All stdout text.
    pub fn stdout(&self) -> String {
        self.of("stream")
            .iter()
            .filter(|e| e["name"] == "stdout")
            .filter_map(|e| e["text"].as_str())
            .collect()
    }
    /// The `done` status.
    pub fn status(&self) -> String {
        self.events
            .last()
            .and_then(|e| e["status"].as_str())
            .unwrap_or_default()
            .to_owned()
    }
    /// The error event's ename.
    pub fn ename(&self) -> Option<String> {
        self.of("error")
            .first()
            .and_then(|e| e["ename"].as_str())
            .map(str::to_owned)
    }
}

/// A native-protocol WebSocket client.
pub struct Ws {
    pub stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Ws {
    /// Sends one JSON message.
    pub async fn send(&mut self, message: Value) {
        self.stream
            .send(Message::Text(message.to_string().into()))
            .await
            .expect("ws send");
    }

    /// Sends a raw frame.
    pub async fn send_raw(&mut self, message: Message) {
        self.stream.send(message).await.expect("ws send");
    }

    /// The next JSON event (panics after EVENT_TIMEOUT).
    pub async fn next(&mut self) -> Value {
        let v = self.next_inner().await;
        if std::env::var_os("KB_TRACE").is_some() {
            eprintln!("EVENT {v}");
        }
        v
    }
    async fn next_inner(&mut self) -> Value {
        loop {
            let frame = tokio::time::timeout(EVENT_TIMEOUT, self.stream.next())
                .await
                .expect("timed out waiting for an event")
                .expect("connection closed")
                .expect("ws error");
            match frame {
                Message::Text(text) => return serde_json::from_str(&text).expect("event is JSON"),
                Message::Binary(_) => panic!("server sent a binary frame"),
                _ => continue,
            }
        }
    }

    /// Skips events until one matches.
    pub async fn until(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        loop {
            let event = self.next().await;
            if pred(&event) {
                return event;
            }
        }
    }

    /// Waits for a `kernel` event with this state.
    pub async fn wait_kernel(&mut self, state: &str) -> Value {
        self.until(|e| e["type"] == "kernel" && e["state"] == state)
            .await
    }

    /// Sends a cell with a fresh id.
    pub async fn submit(&mut self, code: &str) -> String {
        let id = uuid::Uuid::new_v4().simple().to_string();
        self.send(json!({"type": "execute", "id": id, "code": code}))
            .await;
        id
    }

    /// Collects the events of cell `id` until its `done`.
    pub async fn collect(&mut self, id: &str) -> Cell {
        let mut cell = Cell::default();
        loop {
            let event = self.next().await;
            if event["id"] != id {
                continue;
            }
            let done = event["type"] == "done";
            cell.events.push(event);
            if done {
                return cell;
            }
        }
    }

    /// Runs a cell and returns its events.
    pub async fn run(&mut self, code: &str) -> Cell {
        let id = self.submit(code).await;
        self.collect(&id).await
    }
}

/// Runs `body` against `server`, then stops the server even when `body` panics (so no container
/// is left behind), and re-raises the panic.
pub async fn run_against(server: TestServer, body: impl AsyncFnOnce(&TestServer)) {
    use futures::FutureExt;
    let outcome = std::panic::AssertUnwindSafe(body(&server))
        .catch_unwind()
        .await;
    server.stop().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}
