//! Relay overhead against a kernelbox server running as a separate process: interleaved rounds
//! of a direct ZeroMQ client (the floor, on a local kernel of its own), the native WebSocket and
//! the Jupyter WebSocket, for round trips and a 20 MB stream cell. For profiling, not the
//! benchmark suite.
//!
//! ```text
//! kernelbox serve --backend local --pool-size 0 --ephemeral --token T --bind 127.0.0.1:PORT &
//! cargo run --release --example relay_profile -- http://127.0.0.1:PORT T [ROUNDS] [PER_ROUND]
//! ```
//!
//! Env: `KERNELBOX_PYTHON` (the kernel's python), `ONLY` (comma list of `exec,info,stream,bulk,flushed`).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use kernelbox::kernel::{Channel, ClientOptions, Incoming, KernelClient};
use kernelbox::sandbox::local::{LocalSandbox, venv};
use kernelbox::sandbox::{LaunchSpec, Sandbox};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// 20 MiB in 2 KiB lines, written in one go (the kernel's 0.2 s flush timer batches them).
const BULK: &str =
    "import sys\nl = 'x' * 2047 + '\\n'\nfor _ in range(10240): sys.stdout.write(l)\n";
/// 10,000 lines of 2 KiB, each flushed: 10,000 stream messages.
const FLUSHED: &str = "import sys\nl = 'y' * 2047 + '\\n'\nfor _ in range(10000):\n    sys.stdout.write(l); sys.stdout.flush()\n";
const BULK_BYTES: usize = 10240 * 2048;
const FLUSHED_BYTES: usize = 10000 * 2048;

/// A native event, borrowing what it can.
#[derive(Deserialize)]
struct Event<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    text: Option<Cow<'a, str>>,
}

/// No message size limit: a fast-printing cell arrives as one message of many MB.
fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(None)
        .max_frame_size(None)
}

fn ws_nodelay(ws: &Ws) {
    if let tokio_tungstenite::MaybeTlsStream::Plain(s) = ws.get_ref() {
        let _ = s.set_nodelay(true);
    }
}

/// Runs `code` on the native WS; returns the stdout bytes of the cell.
async fn native_cell(ws: &mut Ws, id: &str, code: &str) -> Result<usize, BoxError> {
    ws.send(Message::Text(
        json!({"type": "execute", "id": id, "code": code})
            .to_string()
            .into(),
    ))
    .await?;
    let mut bytes = 0;
    loop {
        let frame = ws.next().await.ok_or("ws closed")??;
        let Message::Text(text) = frame else {
            if let Message::Close(c) = frame {
                return Err(format!("closed: {c:?}").into());
            }
            continue;
        };
        let event: Event = serde_json::from_str(&text)?;
        if event.id.as_deref() != Some(id) {
            continue;
        }
        match event.kind.as_ref() {
            "stream" => bytes += event.text.map_or(0, |t| t.len()),
            "done" => return Ok(bytes),
            "error" => return Err(format!("error event: {text}").into()),
            _ => {}
        }
    }
}

/// One direct execute: send, then wait for the reply and iopub idle; returns stdout bytes.
async fn direct_cell(
    client: &KernelClient,
    rx: &mut mpsc::Receiver<Incoming>,
    code: &str,
) -> Result<usize, BoxError> {
    let content = json!({"code": code, "silent": false, "store_history": true,
        "user_expressions": {}, "allow_stdin": false, "stop_on_error": true});
    let id = client
        .request(Channel::Shell, "execute_request", content, None)
        .await?;
    let (mut reply, mut idle, mut bytes) = (false, false, 0);
    while !(reply && idle) {
        let Some(Incoming::Message { msg, .. }) = rx.recv().await else {
            return Err("kernel gone".into());
        };
        if msg.parent_id() != Some(id.as_str()) {
            continue;
        }
        match msg.msg_type() {
            "execute_reply" => reply = true,
            "status" if msg.content["execution_state"] == "idle" => idle = true,
            "stream" => bytes += msg.content["text"].as_str().map_or(0, str::len),
            _ => {}
        }
    }
    Ok(bytes)
}

/// One direct `kernel_info_request` (shell reply only).
async fn direct_info(
    client: &KernelClient,
    rx: &mut mpsc::Receiver<Incoming>,
) -> Result<(), BoxError> {
    let id = client
        .request(Channel::Shell, "kernel_info_request", json!({}), None)
        .await?;
    loop {
        let Some(Incoming::Message { channel, msg }) = rx.recv().await else {
            return Err("kernel gone".into());
        };
        if channel == Channel::Shell && msg.parent_id() == Some(id.as_str()) {
            return Ok(());
        }
    }
}

#[derive(Deserialize)]
struct JMsg<'a> {
    #[serde(borrow)]
    channel: Cow<'a, str>,
    #[serde(borrow)]
    parent_header: Option<JParent<'a>>,
}

#[derive(Deserialize)]
struct JParent<'a> {
    #[serde(borrow, default)]
    msg_id: Option<Cow<'a, str>>,
}

/// One `kernel_info_request` over the Jupyter WS (shell reply only).
async fn jupyter_info(ws: &mut Ws, session: &str, n: usize) -> Result<(), BoxError> {
    let msg_id = format!("ki-{n}");
    let msg = json!({
        "channel": "shell",
        "header": {"msg_id": msg_id, "msg_type": "kernel_info_request", "session": session,
            "username": "bench", "date": "2026-01-01T00:00:00.000000Z", "version": "5.3"},
        "parent_header": {}, "metadata": {}, "content": {}, "buffers": [],
    });
    ws.send(Message::Text(msg.to_string().into())).await?;
    loop {
        let frame = ws.next().await.ok_or("ws closed")??;
        let Message::Text(text) = frame else { continue };
        let m: JMsg = serde_json::from_str(&text)?;
        if m.channel == "shell"
            && m.parent_header.and_then(|p| p.msg_id).as_deref() == Some(msg_id.as_str())
        {
            return Ok(());
        }
    }
}

struct Samples {
    name: &'static str,
    times: Vec<Duration>,
    bytes: usize,
}

impl Samples {
    fn new(name: &'static str, bytes: usize) -> Self {
        Self {
            name,
            times: Vec::new(),
            bytes,
        }
    }
    fn stats(&mut self) -> (f64, f64) {
        self.times.sort();
        let at = |q: f64| {
            let i = ((self.times.len() as f64 - 1.0) * q).round() as usize;
            self.times[i].as_secs_f64() * 1000.0
        };
        (at(0.5), at(0.99))
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let base = args
        .first()
        .ok_or("usage: relay_profile URL TOKEN [ROUNDS] [PER_ROUND]")?;
    let token = args.get(1).ok_or("no token")?.clone();
    let rounds: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    let per_round: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(40);
    let only = std::env::var("ONLY").unwrap_or_else(|_| "exec,info,stream".into());
    let want = |what: &str| only.split(',').any(|w| w == what);
    let host = base.trim_start_matches("http://").to_owned();

    // The floor: a direct client on a local kernel of its own.
    let python = std::env::var_os("KERNELBOX_PYTHON").map_or_else(venv::venv_python, Into::into);
    let state_dir = std::env::temp_dir().join(format!("kbprof-{}", std::process::id()));
    let sandbox: Arc<dyn Sandbox> = Arc::new(LocalSandbox::new(python, state_dir.clone())?);
    let process = sandbox
        .launch(&LaunchSpec {
            session_id: "profile-direct".into(),
            ..Default::default()
        })
        .await?;
    let (client, mut rx) =
        KernelClient::connect(process.connection(), ClientOptions::default()).await?;

    // Native session.
    let http = reqwest::Client::new();
    let body: Value = http
        .post(format!("{base}/v1/sessions"))
        .bearer_auth(&token)
        .send()
        .await?
        .json()
        .await?;
    let sid = body["id"].as_str().ok_or("no session id")?.to_owned();
    let (mut native, _) = tokio_tungstenite::connect_async_with_config(
        format!("ws://{host}/v1/sessions/{sid}/ws?token={token}"),
        Some(ws_config()),
        true,
    )
    .await?;
    ws_nodelay(&native);

    // Jupyter kernel.
    let body: Value = http
        .post(format!("{base}/api/kernels"))
        .bearer_auth(&token)
        .json(&json!({"name": "python3"}))
        .send()
        .await?
        .json()
        .await?;
    let kid = body["id"].as_str().ok_or("no kernel id")?.to_owned();
    let jsession = uuid::Uuid::new_v4().to_string();
    let mut request = format!("ws://{host}/api/kernels/{kid}/channels?session_id={jsession}")
        .into_client_request()?;
    request
        .headers_mut()
        .insert("Authorization", format!("token {token}").parse()?);
    let (mut jupyter, _) =
        tokio_tungstenite::connect_async_with_config(request, Some(ws_config()), true).await?;
    ws_nodelay(&jupyter);

    let mut n = 0usize;
    let mut next_id = || {
        n += 1;
        format!("c{n}")
    };
    // Warm up.
    for i in 0..20 {
        direct_cell(&client, &mut rx, "1+1").await?;
        native_cell(&mut native, &next_id(), "1+1").await?;
        direct_info(&client, &mut rx).await?;
        jupyter_info(&mut jupyter, &jsession, 100_000 + i).await?;
    }

    let mut d_exec = Samples::new("exec direct", 0);
    let mut w_exec = Samples::new("exec native WS", 0);
    let mut d_info = Samples::new("kernel_info direct", 0);
    let mut j_info = Samples::new("kernel_info jupyter WS", 0);
    let mut d_bulk = Samples::new("20MB bulk direct", BULK_BYTES);
    let mut w_bulk = Samples::new("20MB bulk native WS", BULK_BYTES);
    let mut d_flush = Samples::new("10k flushed direct", FLUSHED_BYTES);
    let mut w_flush = Samples::new("10k flushed native WS", FLUSHED_BYTES);
    let mut k = 0;
    for _ in 0..rounds {
        for _ in 0..per_round {
            if want("exec") {
                let t = Instant::now();
                direct_cell(&client, &mut rx, "1+1").await?;
                d_exec.times.push(t.elapsed());
                let id = next_id();
                let t = Instant::now();
                native_cell(&mut native, &id, "1+1").await?;
                w_exec.times.push(t.elapsed());
            }
            if want("info") {
                let t = Instant::now();
                direct_info(&client, &mut rx).await?;
                d_info.times.push(t.elapsed());
                k += 1;
                let t = Instant::now();
                jupyter_info(&mut jupyter, &jsession, k).await?;
                j_info.times.push(t.elapsed());
            }
        }
        if want("stream") || want("bulk") || want("flushed") {
            for (code, d, w) in [
                (BULK, &mut d_bulk, &mut w_bulk),
                (FLUSHED, &mut d_flush, &mut w_flush),
            ] {
                let what = if code == BULK { "bulk" } else { "flushed" };
                if !want("stream") && !want(what) {
                    continue;
                }
                let t = Instant::now();
                let got = direct_cell(&client, &mut rx, code).await?;
                d.times.push(t.elapsed());
                if got != d.bytes {
                    return Err(format!("{}: {got} bytes, expected {}", d.name, d.bytes).into());
                }
                let id = next_id();
                let t = Instant::now();
                let got = native_cell(&mut native, &id, code).await?;
                w.times.push(t.elapsed());
                if got != w.bytes {
                    return Err(format!("{}: {got} bytes, expected {}", w.name, w.bytes).into());
                }
            }
        }
    }

    println!("| path | n | median ms | p99 ms | median vs floor | MB/s (median) |");
    println!("|---|---|---|---|---|---|");
    for (floor, relay) in [
        (&mut d_exec, &mut w_exec),
        (&mut d_info, &mut j_info),
        (&mut d_bulk, &mut w_bulk),
        (&mut d_flush, &mut w_flush),
    ] {
        if floor.times.is_empty() {
            continue;
        }
        let (fm, fp) = floor.stats();
        let (rm, rp) = relay.stats();
        let mbs = |bytes: usize, ms: f64| {
            if bytes == 0 {
                "-".to_owned()
            } else {
                format!("{:.1}", bytes as f64 / 1e6 / (ms / 1000.0))
            }
        };
        println!(
            "| {} | {} | {fm:.2} | {fp:.2} | 1.00x | {} |",
            floor.name,
            floor.times.len(),
            mbs(floor.bytes, fm)
        );
        println!(
            "| {} | {} | {rm:.2} | {rp:.2} | {:.3}x | {} |",
            relay.name,
            relay.times.len(),
            rm / fm,
            mbs(relay.bytes, rm)
        );
    }

    drop(native);
    drop(jupyter);
    let _ = http
        .delete(format!("{base}/v1/sessions/{sid}"))
        .bearer_auth(&token)
        .send()
        .await;
    let _ = http
        .delete(format!("{base}/api/kernels/{kid}"))
        .bearer_auth(&token)
        .send()
        .await;
    drop(client);
    process.shutdown().await?;
    let _ = std::fs::remove_dir_all(state_dir);
    Ok(())
}
