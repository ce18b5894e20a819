//! Execute round trip (`1+1`) and `kernel_info` round trip: through kernelbox's native
//! WebSocket vs. a direct ZeroMQ client (the floor), on the same kind of local kernel, measured
//! in the same run in interleaved rounds so drift hits both alike.
//!
//! `cargo bench --bench roundtrip` (env: `KERNELBOX_PYTHON`, `ROUNDS`, `PER_ROUND`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use kernelbox::api::{self, AppState, Token};
use kernelbox::kernel::{Channel, ClientOptions, Incoming, KernelClient};
use kernelbox::sandbox::local::{LocalSandbox, venv};
use kernelbox::sandbox::{LaunchSpec, Sandbox};
use kernelbox::session::{SessionManager, SessionOptions};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Median and p99 of samples, in milliseconds.
fn summary(samples: &mut [Duration]) -> (f64, f64) {
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[i].as_secs_f64() * 1000.0
    };
    (at(0.5), at(0.99))
}

/// One `1+1` through a direct client: send, then wait for execute_reply AND iopub idle.
async fn direct_execute(
    client: &KernelClient,
    rx: &mut mpsc::Receiver<Incoming>,
) -> Result<(), BoxError> {
    let content = json!({"code": "1+1", "silent": false, "store_history": true,
        "user_expressions": {}, "allow_stdin": false, "stop_on_error": true});
    let id = client
        .request(Channel::Shell, "execute_request", content, None)
        .await?;
    let (mut reply, mut idle) = (false, false);
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
            _ => {}
        }
    }
    Ok(())
}

/// One `kernel_info_request` through a direct client (shell reply only).
async fn direct_kernel_info(
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

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One `1+1` through the native WebSocket: send, then wait for `done`.
async fn ws_execute(ws: &mut Ws, n: usize) -> Result<(), BoxError> {
    let id = format!("b{n}");
    ws.send(Message::Text(
        json!({"type": "execute", "id": id, "code": "1+1"})
            .to_string()
            .into(),
    ))
    .await?;
    loop {
        let Some(frame) = ws.next().await else {
            return Err("ws closed".into());
        };
        if let Message::Text(text) = frame? {
            let event: Value = serde_json::from_str(&text)?;
            if event["type"] == "done" && event["id"] == id.as_str() {
                return Ok(());
            }
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let rounds = env_usize("ROUNDS", 10);
    let per_round = env_usize("PER_ROUND", 50);
    let python = std::env::var_os("KERNELBOX_PYTHON").map_or_else(venv::venv_python, Into::into);
    let state_dir = std::env::temp_dir().join(format!("kbb-{}", std::process::id()));
    let sandbox: Arc<dyn Sandbox> = Arc::new(LocalSandbox::new(python, state_dir.clone())?);

    // The floor: a direct client on a kernel of its own.
    let process = sandbox
        .launch(&LaunchSpec {
            session_id: "bench-direct".into(),
            ..Default::default()
        })
        .await?;
    let (client, mut rx) =
        KernelClient::connect(process.connection(), ClientOptions::default()).await?;

    // kernelbox: a session behind the WebSocket API.
    let sessions = SessionManager::new(sandbox.clone(), SessionOptions::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let token = "bench";
    let state = AppState {
        sessions: sessions.clone(),
        token: Token::new(token),
    };
    tokio::spawn(api::serve(listener, state, std::future::pending()));
    let session = sessions.create(Default::default()).await?;
    let url = format!("ws://{addr}/v1/sessions/{}/ws?token={token}", session.id());
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
    let tcp = ws.get_ref();
    if let tokio_tungstenite::MaybeTlsStream::Plain(s) = tcp {
        s.set_nodelay(true)?;
    }

    // Warm both up.
    for n in 0..20 {
        direct_execute(&client, &mut rx).await?;
        ws_execute(&mut ws, n).await?;
    }
    let (mut d_exec, mut w_exec, mut d_info) = (Vec::new(), Vec::new(), Vec::new());
    let mut n = 1000;
    for _ in 0..rounds {
        for _ in 0..per_round {
            let t = Instant::now();
            direct_execute(&client, &mut rx).await?;
            d_exec.push(t.elapsed());
            let t = Instant::now();
            ws_execute(&mut ws, n).await?;
            w_exec.push(t.elapsed());
            n += 1;
            let t = Instant::now();
            direct_kernel_info(&client, &mut rx).await?;
            d_info.push(t.elapsed());
        }
    }
    let (dm, dp) = summary(&mut d_exec);
    let (wm, wp) = summary(&mut w_exec);
    let (im, ip) = summary(&mut d_info);
    println!(
        "execute 1+1 round trip, {} samples each, interleaved:",
        d_exec.len()
    );
    println!("| path | median ms | p99 ms | median vs floor |");
    println!("|---|---|---|---|");
    println!("| direct ZeroMQ (floor) | {dm:.2} | {dp:.2} | 1.00x |");
    println!(
        "| kernelbox native WS | {wm:.2} | {wp:.2} | {:.2}x |",
        wm / dm
    );
    println!("| direct kernel_info (reference) | {im:.2} | {ip:.2} | - |");

    drop(ws);
    sessions.shutdown().await;
    drop(client);
    process.shutdown().await?;
    let _ = std::fs::remove_dir_all(state_dir);
    Ok(())
}
