//! Many sessions at once: throughput and p99 of 8, 32 and 100 sessions each running cells
//! (against as many direct clients on kernels of their own), the server's memory idle and per
//! session (against Kernel Gateway's per kernel), and 1,000 idle WebSocket clients on 10 sessions
//! (memory per client, and how much later an event reaches them than a lone client).

use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::join_all;
use tokio::sync::mpsc;

use tokio_tungstenite::tungstenite::Message as Frame;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::clients::{Client, Direct, Jupyter, Native, Ws, connect};
use crate::procs::Proc;
use crate::procs::TOKEN;
use crate::stats::{Table, millis, num, ratio};
use crate::{Bench, BoxError};

const LEVELS: [usize; 3] = [8, 32, 100];
/// Alternating load rounds per level and path.
const ROUNDS: usize = 3;
/// Sessions the 1,000 idle clients are spread over.
const FANOUT_SESSIONS: usize = 10;
const CLIENTS_PER_SESSION: usize = 100;

/// Runs `cells` cells of `1+1` on each client at once; returns the wall time and every latency.
async fn load(clients: &mut [Client], cells: usize) -> Result<(Duration, Vec<Duration>), BoxError> {
    let t = Instant::now();
    let runs = clients.iter_mut().map(|client| async move {
        let mut latencies = Vec::with_capacity(cells);
        for _ in 0..cells {
            let t = Instant::now();
            let out = client.execute("1+1").await?;
            latencies.push(t.elapsed());
            if out.result.as_deref() != Some("2") {
                return Err::<_, BoxError>(format!("1+1 gave {:?}", out.result).into());
            }
        }
        Ok(latencies)
    });
    let mut all = Vec::new();
    for r in join_all(runs).await {
        all.extend(r?);
    }
    Ok((t.elapsed(), all))
}

/// Opens `n` clients, 8 at a time.
async fn open_many<F, Fut>(n: usize, open: F) -> Result<Vec<Client>, BoxError>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<Client, BoxError>>,
{
    let opened: Vec<Result<Client, BoxError>> = futures::stream::iter(0..n)
        .map(open)
        .buffered(8)
        .collect()
        .await;
    let mut clients = opened.into_iter().collect::<Result<Vec<_>, _>>()?;
    for c in &mut clients {
        c.execute("1+1").await?;
    }
    Ok(clients)
}

/// Has a server serve a kernel through its Jupyter API (start, WebSocket, a cell, shut down)
/// and, for kernelbox, a session through its native one, so that what is measured next is
/// memory held per session, not the server's code and buffers paged in by its first requests.
async fn warm_up(addr: std::net::SocketAddr, native: bool) -> Result<(), BoxError> {
    let mut client = Client::Jupyter(Jupyter::create(addr).await?);
    client.execute("1+1").await?;
    if let Client::Jupyter(jupyter) = client {
        jupyter.delete(addr).await?;
    }
    if native {
        let mut client = Client::Native(Native::create(addr).await?);
        client.execute("1+1").await?;
        if let Client::Native(native) = client {
            native.delete(addr).await?;
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok(())
}

/// Runs the scale scenarios; returns their section of the report.
pub async fn run(bench: &Bench) -> Result<String, BoxError> {
    let mut text = String::from("## Many sessions\n\n");
    let cells = bench.samples(20, 5);
    let top = *LEVELS.last().unwrap_or(&100);

    let args = bench.local_args();
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.extend(["--pool-size", "0"]);
    let server = Proc::kernelbox(&bench.bin, "kernelbox-scale", &args, &bench.logs).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cold_rss = server.rss_mib()?;
    warm_up(server.addr, true).await?;
    let idle_rss = server.rss_mib()?;

    let addr = server.addr;
    let mut sessions = open_many(top, |_| async move {
        Ok(Client::Native(Native::create(addr).await?))
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let loaded_rss = server.rss_mib()?;

    let local = bench.local.clone();
    let mut floor = open_many(top, |i| {
        let local = local.clone();
        async move {
            Ok(Client::Direct(Box::new(
                Direct::launch(local.as_ref(), &format!("floor-{i}")).await?,
            )))
        }
    })
    .await?;

    let mut table = Table::new(
        &format!(
            "Concurrency: N sessions each running {cells} cells of `1+1` back to back, all at once, \
             {ROUNDS} rounds alternating with the floor (local kernels; throughput in cells/s; latency in ms):"
        ),
        &[
            "N",
            "floor cells/s",
            "kernelbox cells/s",
            "× floor",
            "floor p99",
            "kernelbox median",
            "kernelbox p99",
        ],
    );
    for n in LEVELS {
        // Alternating rounds, so that drift in the machine's speed hits both alike.
        let (mut fw, mut fl, mut kw, mut kl) =
            (Duration::ZERO, Vec::new(), Duration::ZERO, Vec::new());
        for _ in 0..ROUNDS {
            let (wall, latencies) = load(&mut floor[..n], cells).await?;
            fw += wall;
            fl.extend(latencies);
            let (wall, latencies) = load(&mut sessions[..n], cells).await?;
            kw += wall;
            kl.extend(latencies);
        }
        let total = (ROUNDS * n * cells) as f64;
        let (f_rate, k_rate) = (total / fw.as_secs_f64(), total / kw.as_secs_f64());
        let (fs, ks) = (millis(&fl), millis(&kl));
        table.row(&[
            n.to_string(),
            num(f_rate, 0),
            num(k_rate, 0),
            ratio(k_rate, f_rate),
            num(fs.p99, 1),
            num(ks.median, 1),
            num(ks.p99, 1),
        ]);
    }
    text.push_str(&table.finish());
    for c in floor {
        if let Client::Direct(d) = c {
            d.shutdown().await;
        }
    }
    let busy_rss = server.rss_mib()?;

    // Memory reference: Kernel Gateway idle and per kernel (with its WebSocket open).
    let mut gateway_rows = Vec::new();
    if let Some((python, launcher)) = &bench.gateway {
        let gw =
            Proc::gateway(python, launcher, "tuned", &bench.kernel_python, &bench.logs).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let gw_cold = gw.rss_mib()?;
        warm_up(gw.addr, false).await?;
        let gw_idle = gw.rss_mib()?;
        let kernels = bench.samples(20, 4);
        let gaddr = gw.addr;
        let opened = open_many(kernels, |_| async move {
            Ok(Client::Jupyter(Jupyter::create(gaddr).await?))
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let gw_loaded = gw.rss_mib()?;
        drop(opened);
        gw.stop().await;
        gateway_rows.push((
            gw_cold,
            gw_idle,
            (gw_loaded - gw_idle) / kernels as f64,
            kernels,
        ));
    }
    let per_session = (loaded_rss - idle_rss) / top as f64;
    let mut table = Table::new(
        "\nServer memory (RSS of the server process, kernels not included; MiB; idle: after it served \
         one kernel, started and shut down, through each API — its code paged in):",
        &[
            "server",
            "at start",
            "idle",
            "per session (kernel + open WS)",
            "sessions measured",
            "after the load above",
        ],
    );
    table.row(&[
        "kernelbox".into(),
        num(cold_rss, 1),
        num(idle_rss, 1),
        num(per_session, 3),
        top.to_string(),
        format!(
            "{} ({} sessions, replay buffers filled)",
            num(busy_rss, 1),
            top
        ),
    ]);
    for (cold, idle, per, n) in &gateway_rows {
        table.row(&[
            "Kernel Gateway (tuned)".into(),
            num(*cold, 1),
            num(*idle, 1),
            num(*per, 3),
            n.to_string(),
            "–".into(),
        ]);
    }
    text.push_str(&table.finish());
    if let Some((_, g_idle, g_per, _)) = gateway_rows.first() {
        text.push_str(&format!(
            "\nkernelbox vs Kernel Gateway: idle {}, per session {}.\n",
            ratio(idle_rss, *g_idle),
            ratio(per_session, *g_per)
        ));
    }

    text.push_str(&fanout(bench, &server, &mut sessions[..FANOUT_SESSIONS]).await?);
    drop(sessions);
    server.stop().await;
    Ok(text)
}

/// Runs `rounds` cells printing one line on each driver in turn; returns, per cell id, when it
/// was sent, and the driver's own latency to the stream event.
async fn drive(
    drivers: &mut [Client],
    rounds: usize,
    tag: &str,
) -> Result<(Vec<(String, Instant)>, Vec<Duration>), BoxError> {
    let mut sent = Vec::new();
    let mut own = Vec::new();
    for round in 0..rounds {
        for (s, driver) in drivers.iter_mut().enumerate() {
            let Client::Native(native) = driver else {
                return Err("fan-out drivers are native clients".into());
            };
            let id = format!("{tag}-{s}-{round}");
            let t = Instant::now();
            native.send_execute(&id, "print('x')").await?;
            sent.push((id.clone(), t));
            let mut seen = false;
            loop {
                let event = native.next_event().await?;
                if event["id"] != id.as_str() {
                    continue;
                }
                if event["type"] == "stream" && !seen {
                    own.push(t.elapsed());
                    seen = true;
                }
                if event["type"] == "done" {
                    break;
                }
            }
        }
    }
    Ok((sent, own))
}

async fn fanout(bench: &Bench, server: &Proc, drivers: &mut [Client]) -> Result<String, BoxError> {
    let rounds = bench.samples(20, 3);
    let (_, alone) = drive(drivers, rounds, "alone").await?;
    let before = server.rss_mib()?;

    // 1,000 idle clients: each reports when a stream event reaches it.
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, Instant)>();
    let ids: Vec<String> = drivers
        .iter()
        .filter_map(|d| match d {
            Client::Native(n) => Some(n.session.clone()),
            _ => None,
        })
        .collect();
    let addr = server.addr;
    let targets: Vec<String> = ids
        .iter()
        .flat_map(|id| std::iter::repeat_n(id.clone(), CLIENTS_PER_SESSION))
        .collect();
    // Raw sockets that parse only the events timed, so the clients' own work (in this process,
    // on the same cores as the server) stays small.
    let watchers: Vec<Ws> = futures::stream::iter(targets)
        .map(|id| async move {
            let url = format!("ws://{addr}/v1/sessions/{id}/ws?token={TOKEN}");
            connect(url.into_client_request()?).await
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let watching = watchers.len();
    let tasks: Vec<_> = watchers
        .into_iter()
        .map(|mut ws| {
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some(Ok(frame)) = ws.next().await {
                    let Frame::Text(text) = frame else { continue };
                    if !text.contains("\"crowd-") || !text.contains("\"stream\"") {
                        continue;
                    }
                    let at = Instant::now();
                    if let Ok(event) = serde_json::from_str::<serde_json::Value>(&text)
                        && event["type"] == "stream"
                        && let Some(id) = event["id"].as_str()
                    {
                        let _ = tx.send((id.to_owned(), at));
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let with_clients = server.rss_mib()?;

    let (sent, own) = drive(drivers, rounds, "crowd").await?;
    let expected = sent.len() * CLIENTS_PER_SESSION;
    let deadline = Instant::now() + Duration::from_secs(30);
    let sent_at: std::collections::HashMap<String, Instant> = sent.into_iter().collect();
    let mut latencies = Vec::with_capacity(expected);
    while latencies.len() < expected {
        let Ok(Some((id, at))) = tokio::time::timeout_at(deadline.into(), rx.recv()).await else {
            break;
        };
        if let Some(t) = sent_at.get(&id) {
            latencies.push(at.duration_since(*t));
        }
    }
    for task in tasks {
        task.abort();
    }

    let (alone, own, crowd) = (millis(&alone), millis(&own), millis(&latencies));
    let mut table = Table::new(
        &format!(
            "\nFan-out: {watching} idle WebSocket clients on {} sessions; each session runs {rounds} cells printing a line; \
             latency = execute sent → the stream event received (ms):",
            drivers.len()
        ),
        &["case", "deliveries", "median", "p99", "× alone"],
    );
    table.row(&[
        "the driver alone (reference)".into(),
        alone.n.to_string(),
        num(alone.median, 2),
        num(alone.p99, 2),
        "1.00×".into(),
    ]);
    table.row(&[
        "the driver, with 100 watchers per session".into(),
        own.n.to_string(),
        num(own.median, 2),
        num(own.p99, 2),
        ratio(own.median, alone.median),
    ]);
    table.row(&[
        "each of the 1,000 watchers".into(),
        format!("{} of {expected}", crowd.n),
        num(crowd.median, 2),
        num(crowd.p99, 2),
        ratio(crowd.median, alone.median),
    ]);
    let mut text = table.finish();
    text.push_str(&format!(
        "\nServer RSS with the {watching} clients connected: {} MiB (+{} MiB, {} KiB per client).\n",
        num(with_clients, 1),
        num(with_clients - before, 1),
        num((with_clients - before) * 1024.0 / watching.max(1) as f64, 1),
    ));
    Ok(text)
}
