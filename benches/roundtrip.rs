//! Execute round trip (`1+1`) and `kernel_info` round trip: through kernelbox's native
//! WebSocket vs. a direct ZeroMQ client (the floor), on the same kind of local kernel, measured
//! in the same run in interleaved rounds so drift hits both alike.
//!
//! `cargo bench --bench roundtrip` (env: `KERNELBOX_PYTHON`, `ROUNDS`, `PER_ROUND`).

mod common;

use std::sync::Arc;
use std::time::Instant;

use common::{BoxError, Server, env_usize, run_cell, summary};
use kernelbox::kernel::{Channel, ClientOptions, Incoming, KernelClient};
use kernelbox::sandbox::local::{LocalSandbox, venv};
use kernelbox::sandbox::{LaunchSpec, Sandbox};
use kernelbox::session::SessionOptions;
use serde_json::json;
use tokio::sync::mpsc;

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
    let server = Server::start(sandbox.clone(), SessionOptions::default()).await?;
    let (_, mut ws) = server.session().await?;

    // Warm both up.
    for n in 0..20 {
        direct_execute(&client, &mut rx).await?;
        run_cell(&mut ws, &format!("b{n}"), "1+1").await?;
    }
    let (mut d_exec, mut w_exec, mut d_info) = (Vec::new(), Vec::new(), Vec::new());
    let mut n = 1000;
    for _ in 0..rounds {
        for _ in 0..per_round {
            let t = Instant::now();
            direct_execute(&client, &mut rx).await?;
            d_exec.push(t.elapsed());
            let t = Instant::now();
            run_cell(&mut ws, &format!("b{n}"), "1+1").await?;
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
    server.sessions.shutdown().await;
    drop(client);
    process.shutdown().await?;
    let _ = std::fs::remove_dir_all(state_dir);
    Ok(())
}
