//! The three ways a benchmark talks to a kernel: directly over ZeroMQ (the floor), through a
//! server's native WebSocket, and through a Jupyter kernel WebSocket (kernelbox's or Kernel
//! Gateway's). Each runs a cell to its end and counts what arrived.

use std::time::Duration;

use base64::Engine as _;
use futures::{SinkExt, StreamExt};
use kernelbox::kernel::{Channel, ClientOptions, Incoming, KernelClient};
use kernelbox::sandbox::{KernelProcess, LaunchSpec, Sandbox};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as Frame;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::BoxError;
use crate::procs::TOKEN;

/// A WebSocket from the client side.
pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How long one request may take before the benchmark gives up on it.
pub const PATIENCE: Duration = Duration::from_secs(120);

/// What a cell produced, as counted by the client.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    /// UTF-8 bytes of stdout text received.
    pub stdout_bytes: u64,
    /// Stream messages received.
    pub stream_msgs: u64,
    /// The execute_result's text/plain.
    pub result: Option<String>,
    /// SHA-256 (hex) and size of the decoded image/png of the last display_data.
    pub png: Option<(String, usize)>,
    /// Whether the cell's end was seen before [`PATIENCE`] ran out.
    pub complete: bool,
}

impl Outcome {
    fn absorb_stream(&mut self, name: Option<&str>, text: Option<&str>) {
        self.stream_msgs += 1;
        if name == Some("stdout") {
            self.stdout_bytes += text.map_or(0, |t| t.len() as u64);
        }
    }

    fn absorb_png(&mut self, data: &Value) {
        if let Some(b64) = data.get("image/png").and_then(Value::as_str) {
            let clean: String = b64.chars().filter(|c| !c.is_whitespace()).collect();
            if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(clean) {
                self.png = Some((hex::encode(Sha256::digest(&bytes)), bytes.len()));
            }
        }
    }
}

/// The content of an `execute_request` for `code`.
fn execute_content(code: &str) -> Value {
    json!({"code": code, "silent": false, "store_history": true, "user_expressions": {},
           "allow_stdin": false, "stop_on_error": true})
}

/// One client of one kernel.
pub enum Client {
    /// Straight to the kernel's ZeroMQ sockets with kernelbox's wire client: the floor.
    Direct(Box<Direct>),
    /// kernelbox's native WebSocket.
    Native(Native),
    /// A Jupyter kernel WebSocket (kernelbox's or Kernel Gateway's).
    Jupyter(Jupyter),
}

impl Client {
    /// One `kernel_info` round trip.
    pub async fn kernel_info(&mut self) -> Result<(), BoxError> {
        tokio::time::timeout(PATIENCE, async {
            match self {
                Client::Direct(c) => c.kernel_info().await,
                Client::Native(c) => c.kernel_info().await,
                Client::Jupyter(c) => c.kernel_info().await,
            }
        })
        .await
        .map_err(|_| "kernel_info timed out")?
    }

    /// Runs `code` until the kernel is idle again (the server's `done` on the native socket).
    pub async fn execute(&mut self, code: &str) -> Result<Outcome, BoxError> {
        self.execute_within(code, PATIENCE).await
    }

    /// Like [`Client::execute`], giving up after `patience` with `complete: false`.
    pub async fn execute_within(
        &mut self,
        code: &str,
        patience: Duration,
    ) -> Result<Outcome, BoxError> {
        let mut out = Outcome::default();
        let run = async {
            match self {
                Client::Direct(c) => c.execute(code, &mut out).await,
                Client::Native(c) => c.execute(code, &mut out).await,
                Client::Jupyter(c) => c.execute(code, &mut out).await,
            }
        };
        match tokio::time::timeout(patience, run).await {
            Ok(result) => {
                result?;
                out.complete = true;
            }
            Err(_) => out.complete = false,
        }
        Ok(out)
    }
}

/// A kernel the benchmark launched itself, with a direct client.
pub struct Direct {
    process: Box<dyn KernelProcess>,
    client: KernelClient,
    rx: mpsc::Receiver<Incoming>,
}

impl Direct {
    /// Launches a kernel on `sandbox` and connects to it.
    pub async fn launch(sandbox: &dyn Sandbox, name: &str) -> Result<Self, BoxError> {
        let process = sandbox
            .launch(&LaunchSpec {
                session_id: name.into(),
                ..Default::default()
            })
            .await?;
        let (client, rx) =
            KernelClient::connect(process.connection(), ClientOptions::default()).await?;
        Ok(Self {
            process,
            client,
            rx,
        })
    }

    /// Stops the kernel.
    pub async fn shutdown(self) {
        drop(self.client);
        let _ = self.process.shutdown().await;
    }

    async fn kernel_info(&mut self) -> Result<(), BoxError> {
        let id = self
            .client
            .request(Channel::Shell, "kernel_info_request", json!({}), None)
            .await?;
        loop {
            match self.rx.recv().await {
                Some(Incoming::Message { channel, msg })
                    if channel == Channel::Shell && msg.parent_id() == Some(id.as_str()) =>
                {
                    return Ok(());
                }
                Some(_) => {}
                None => return Err("kernel gone".into()),
            }
        }
    }

    async fn execute(&mut self, code: &str, out: &mut Outcome) -> Result<(), BoxError> {
        let id = self
            .client
            .request(
                Channel::Shell,
                "execute_request",
                execute_content(code),
                None,
            )
            .await?;
        let (mut reply, mut idle) = (false, false);
        while !(reply && idle) {
            let Some(Incoming::Message { msg, .. }) = self.rx.recv().await else {
                return Err("kernel gone".into());
            };
            if msg.parent_id() != Some(id.as_str()) {
                continue;
            }
            let c = &msg.content;
            match msg.msg_type() {
                "execute_reply" => reply = true,
                "status" if c["execution_state"] == "idle" => idle = true,
                "stream" => out.absorb_stream(c["name"].as_str(), c["text"].as_str()),
                "display_data" => out.absorb_png(&c["data"]),
                "execute_result" => {
                    out.result = c["data"]["text/plain"].as_str().map(str::to_owned)
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// `DELETE url` with the benchmark's token (in the `token` scheme both servers accept).
async fn delete(url: String) -> Result<(), BoxError> {
    let resp = reqwest::Client::new()
        .delete(&url)
        .header("Authorization", format!("token {TOKEN}"))
        .send()
        .await?;
    if !resp.status().is_success() {
        return Err(format!("DELETE {url}: {}", resp.status()).into());
    }
    Ok(())
}

/// Opens a WebSocket (large messages allowed, Nagle off).
pub async fn connect(
    request: tokio_tungstenite::tungstenite::handshake::client::Request,
) -> Result<Ws, BoxError> {
    // A kernel may batch many MB of output into one message (stdout is flushed every 0.2 s).
    let config = WebSocketConfig::default()
        .max_message_size(Some(1 << 30))
        .max_frame_size(Some(1 << 30));
    let (ws, _) = tokio_tungstenite::connect_async_with_config(request, Some(config), true).await?;
    if let tokio_tungstenite::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_nodelay(true)?;
    }
    Ok(ws)
}

/// A WebSocket whose frames a task of its own reads all the time (so pings get their pongs and
/// the server never waits on the benchmark), handing JSON messages over in order.
pub struct Socket {
    sink: futures::stream::SplitSink<Ws, Frame>,
    rx: mpsc::UnboundedReceiver<Result<Value, String>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Socket {
    fn new(ws: Ws) -> Self {
        let (sink, mut stream) = ws.split();
        let (tx, rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            loop {
                let item = match stream.next().await {
                    Some(Ok(Frame::Text(text))) => {
                        serde_json::from_str::<Value>(&text).map_err(|e| e.to_string())
                    }
                    Some(Ok(Frame::Close(frame))) => Err(format!("closed: {frame:?}")),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => Err(e.to_string()),
                    None => Err("socket ended".into()),
                };
                let end = item.is_err();
                if tx.send(item).is_err() || end {
                    return;
                }
            }
        });
        Self { sink, rx, reader }
    }

    /// Sends one text frame.
    pub async fn send(&mut self, text: String) -> Result<(), BoxError> {
        self.sink.send(Frame::Text(text.into())).await?;
        Ok(())
    }

    /// The next JSON message.
    pub async fn next(&mut self) -> Result<Value, BoxError> {
        match self.rx.recv().await {
            Some(Ok(value)) => Ok(value),
            Some(Err(e)) => Err(e.into()),
            None => Err("socket ended".into()),
        }
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A client of kernelbox's native WebSocket protocol.
pub struct Native {
    ws: Socket,
    next: u64,
    /// The session's id.
    pub session: String,
}

impl Native {
    /// Ends the session (`DELETE /v1/sessions/{id}`), closing the socket.
    pub async fn delete(self, addr: std::net::SocketAddr) -> Result<(), BoxError> {
        drop(self.ws);
        delete(format!("http://{addr}/v1/sessions/{}", self.session)).await
    }

    /// Creates a session (`POST /v1/sessions`) and opens its WebSocket.
    pub async fn create(addr: std::net::SocketAddr) -> Result<Self, BoxError> {
        let resp = reqwest::Client::new()
            .post(format!("http://{addr}/v1/sessions"))
            .bearer_auth(TOKEN)
            .send()
            .await?;
        if !resp.status().is_success() {
            return Err(format!("create session: {} {}", resp.status(), resp.text().await?).into());
        }
        let body: Value = resp.json().await?;
        let id = body["id"].as_str().ok_or("no session id")?.to_owned();
        Self::open(addr, &id).await
    }

    /// Opens another WebSocket on session `id`.
    pub async fn open(addr: std::net::SocketAddr, id: &str) -> Result<Self, BoxError> {
        let url = format!("ws://{addr}/v1/sessions/{id}/ws?token={TOKEN}");
        Ok(Self {
            ws: Socket::new(connect(url.into_client_request()?).await?),
            next: 0,
            session: id.to_owned(),
        })
    }

    /// The next event on the socket.
    pub async fn next_event(&mut self) -> Result<Value, BoxError> {
        self.ws.next().await
    }

    /// Sends an `execute` for cell `id` without waiting.
    pub async fn send_execute(&mut self, id: &str, code: &str) -> Result<(), BoxError> {
        let frame = json!({"type": "execute", "id": id, "code": code}).to_string();
        self.ws.send(frame).await
    }

    fn fresh_id(&mut self) -> String {
        self.next += 1;
        format!("b{}", self.next)
    }

    async fn kernel_info(&mut self) -> Result<(), BoxError> {
        let id = self.fresh_id();
        let frame = json!({"type": "kernel_info", "id": id}).to_string();
        self.ws.send(frame).await?;
        loop {
            let event = self.next_event().await?;
            if event["type"] == "kernel_info_reply" && event["id"] == id.as_str() {
                return Ok(());
            }
        }
    }

    async fn execute(&mut self, code: &str, out: &mut Outcome) -> Result<(), BoxError> {
        let id = self.fresh_id();
        self.send_execute(&id, code).await?;
        loop {
            let event = self.next_event().await?;
            if event["id"] != id.as_str() {
                continue;
            }
            match event["type"].as_str() {
                Some("stream") => out.absorb_stream(event["name"].as_str(), event["text"].as_str()),
                Some("display_data") => out.absorb_png(&event["data"]),
                Some("execute_result") => {
                    out.result = event["data"]["text/plain"].as_str().map(str::to_owned)
                }
                Some("done") => return Ok(()),
                _ => {}
            }
        }
    }
}

/// A client of the Jupyter kernel WebSocket protocol (JSON frames, no subprotocol).
pub struct Jupyter {
    ws: Socket,
    session: String,
    /// The kernel's id.
    pub kernel: String,
}

impl Jupyter {
    /// Shuts the kernel down (`DELETE /api/kernels/{id}`), closing the socket.
    pub async fn delete(self, addr: std::net::SocketAddr) -> Result<(), BoxError> {
        drop(self.ws);
        delete(format!("http://{addr}/api/kernels/{}", self.kernel)).await
    }

    /// Starts a kernel (`POST /api/kernels`) and opens its channels.
    pub async fn create(addr: std::net::SocketAddr) -> Result<Self, BoxError> {
        let resp = reqwest::Client::new()
            .post(format!("http://{addr}/api/kernels"))
            .header("Authorization", format!("token {TOKEN}"))
            .json(&json!({"name": "python3"}))
            .send()
            .await?;
        if !resp.status().is_success() {
            return Err(format!("start kernel: {} {}", resp.status(), resp.text().await?).into());
        }
        let body: Value = resp.json().await?;
        let id = body["id"].as_str().ok_or("no kernel id")?;
        let mut request = format!("ws://{addr}/api/kernels/{id}/channels").into_client_request()?;
        request
            .headers_mut()
            .insert("Authorization", format!("token {TOKEN}").parse()?);
        Ok(Self {
            ws: Socket::new(connect(request).await?),
            session: uuid::Uuid::new_v4().to_string(),
            kernel: id.to_owned(),
        })
    }

    async fn send(
        &mut self,
        channel: &str,
        msg_type: &str,
        content: Value,
    ) -> Result<String, BoxError> {
        let msg_id = uuid::Uuid::new_v4().to_string();
        let frame = json!({
            "channel": channel,
            "header": {"msg_id": msg_id, "msg_type": msg_type, "session": self.session,
                       "username": "bench", "date": chrono::Utc::now().to_rfc3339(), "version": "5.3"},
            "parent_header": {}, "metadata": {}, "content": content, "buffers": [],
        });
        self.ws.send(frame.to_string()).await?;
        Ok(msg_id)
    }

    async fn kernel_info(&mut self) -> Result<(), BoxError> {
        let id = self.send("shell", "kernel_info_request", json!({})).await?;
        loop {
            let msg = self.ws.next().await?;
            if msg["parent_header"]["msg_id"] == id.as_str()
                && msg["header"]["msg_type"] == "kernel_info_reply"
            {
                return Ok(());
            }
        }
    }

    async fn execute(&mut self, code: &str, out: &mut Outcome) -> Result<(), BoxError> {
        let id = self
            .send("shell", "execute_request", execute_content(code))
            .await?;
        let (mut reply, mut idle) = (false, false);
        while !(reply && idle) {
            let msg = self.ws.next().await?;
            if msg["parent_header"]["msg_id"] != id.as_str() {
                continue;
            }
            let c = &msg["content"];
            match msg["header"]["msg_type"].as_str() {
                Some("execute_reply") => reply = true,
                Some("status") if c["execution_state"] == "idle" => idle = true,
                Some("stream") => out.absorb_stream(c["name"].as_str(), c["text"].as_str()),
                Some("display_data") => out.absorb_png(&c["data"]),
                Some("execute_result") => {
                    out.result = c["data"]["text/plain"].as_str().map(str::to_owned)
                }
                _ => {}
            }
        }
        Ok(())
    }
}
