//! The "direct ZeroMQ floor": round-trip latencies of a `KernelClient` talking straight to a local
//! ipykernel, the baseline the server's relay overhead is measured against.
//!
//! `KERNELBOX_PYTHON=… cargo run --release --example direct_roundtrip [N] [--tcp]`
//!
//! Measures N (default 200) `execute_request` `1+1` round trips (send → both `execute_reply` and
//! iopub `idle`) and N `kernel_info_request` round trips (send → `kernel_info_reply` and iopub
//! `idle`). The kernel gets its own IPython dir (own history database), history left on, as a
//! sandboxed kernel would have.

#[path = "../tests/common/kernel.rs"]
mod kernel_common;

use std::time::{Duration, Instant};

use kernel_common::TestKernel;
use kernelbox::kernel::{Channel, ClientOptions, Incoming, KernelClient};
use serde_json::{Value, json};
use tokio::sync::mpsc;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tcp = args.iter().any(|a| a == "--tcp");
    let n: usize = args
        .iter()
        .find_map(|a| a.parse().ok())
        .unwrap_or(200)
        .max(1);

    let started = Instant::now();
    let kernel = if tcp {
        TestKernel::start_tcp_with(&[])
    } else {
        TestKernel::start_ipc_with(&[])
    };
    let (client, mut rx) = KernelClient::connect(&kernel.info, ClientOptions::default()).await?;
    println!(
        "transport {}, kernel start + connect + ready: {:.0} ms",
        if tcp { "tcp" } else { "ipc" },
        started.elapsed().as_secs_f64() * 1e3
    );

    let execute = json!({
        "code": "1+1", "silent": false, "store_history": true,
        "user_expressions": {}, "allow_stdin": false, "stop_on_error": true,
    });
    // Warm up both paths.
    for _ in 0..10 {
        round_trip(&client, &mut rx, "execute_request", execute.clone()).await?;
        round_trip(&client, &mut rx, "kernel_info_request", json!({})).await?;
    }

    for (msg_type, content) in [
        ("execute_request", execute),
        ("kernel_info_request", json!({})),
    ] {
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            samples.push(round_trip(&client, &mut rx, msg_type, content.clone()).await?);
        }
        samples.sort();
        let pct = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
        println!(
            "{msg_type:<20} n={n}  median {:.2} ms  p99 {:.2} ms  min {:.2} ms  max {:.2} ms",
            ms(pct(0.5)),
            ms(pct(0.99)),
            ms(samples[0]),
            ms(samples[samples.len() - 1]),
        );
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Sends one request on shell and times it until both its shell reply and iopub `idle` arrived.
async fn round_trip(
    client: &KernelClient,
    rx: &mut mpsc::Receiver<Incoming>,
    msg_type: &str,
    content: Value,
) -> Result<Duration, Box<dyn std::error::Error>> {
    let start = Instant::now();
    let id = client
        .request(Channel::Shell, msg_type, content, None)
        .await?;
    let (mut reply, mut idle) = (false, false);
    while !(reply && idle) {
        let item = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await?
            .ok_or("kernel connection closed")?;
        if let Incoming::Message { channel, msg } = item
            && msg.parent_id() == Some(id.as_str())
        {
            match channel {
                Channel::Shell => reply = true,
                Channel::IoPub if msg.content["execution_state"] == "idle" => idle = true,
                _ => {}
            }
        }
    }
    Ok(start.elapsed())
}
