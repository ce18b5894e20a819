//! Session create → first result latency (cold container, warm pool, local backend) and the
//! execute round trip through a Docker session vs. a local one, measured in one run.
//!
//! `cargo bench --bench startup` (needs the kernel image; env: `SAMPLES`, `ROUND_TRIPS`).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{BoxError, Server, env_usize, run_cell, summary};
use kernelbox::sandbox::Sandbox;
use kernelbox::sandbox::docker::{DockerConfig, DockerSandbox};
use kernelbox::sandbox::local::{LocalSandbox, venv};
use kernelbox::session::SessionOptions;

/// `samples` times: create a session and run `1+1` until its result arrives.
async fn create_to_result(
    server: &Server,
    samples: usize,
    warm: bool,
) -> Result<Vec<Duration>, BoxError> {
    let mut out = Vec::new();
    for i in 0..samples {
        if warm {
            let deadline = Instant::now() + Duration::from_secs(60);
            while server.sessions.pool_ready() < 1 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let t = Instant::now();
        let (id, mut ws) = server.session().await?;
        let result = run_cell(&mut ws, &format!("s{i}"), "1+1").await?;
        out.push(t.elapsed());
        if result.as_deref() != Some("2") {
            return Err(format!("unexpected result {result:?}").into());
        }
        drop(ws);
        server.sessions.remove(&id).await?;
    }
    Ok(out)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let samples = env_usize("SAMPLES", 10);
    let trips = env_usize("ROUND_TRIPS", 200);
    let state = std::env::temp_dir().join(format!("kbs-{}", std::process::id()));
    let python = std::env::var_os("KERNELBOX_PYTHON").map_or_else(venv::venv_python, Into::into);
    let local: Arc<dyn Sandbox> = Arc::new(LocalSandbox::new(python, state.join("local"))?);
    let docker_config = DockerConfig {
        state_dir: state.join("docker"),
        ..DockerConfig::default()
    };
    let docker: Arc<dyn Sandbox> = Arc::new(DockerSandbox::new(docker_config).await?);

    let local_server = Server::start(local.clone(), SessionOptions::default()).await?;
    let cold_server = Server::start(docker.clone(), SessionOptions::default()).await?;
    let warm_options = SessionOptions {
        pool_size: 2,
        ..SessionOptions::default()
    };
    let warm_server = Server::start(docker.clone(), warm_options).await?;

    let mut local_start = create_to_result(&local_server, samples, false).await?;
    let mut cold = create_to_result(&cold_server, samples, false).await?;
    let mut warm = create_to_result(&warm_server, samples, true).await?;

    // Execute round trips, interleaved between a Docker session and a local one.
    let (_, mut dws) = cold_server.session().await?;
    let (_, mut lws) = local_server.session().await?;
    for i in 0..20 {
        run_cell(&mut dws, &format!("w{i}"), "1+1").await?;
        run_cell(&mut lws, &format!("w{i}"), "1+1").await?;
    }
    let (mut d_rt, mut l_rt) = (Vec::new(), Vec::new());
    for i in 0..trips {
        let t = Instant::now();
        run_cell(&mut dws, &format!("r{i}"), "1+1").await?;
        d_rt.push(t.elapsed());
        let t = Instant::now();
        run_cell(&mut lws, &format!("r{i}"), "1+1").await?;
        l_rt.push(t.elapsed());
    }

    println!("session create → first result ({samples} samples each):");
    println!("| path | median ms | p99 ms |");
    println!("|---|---|---|");
    for (name, s) in [
        ("local process", &mut local_start),
        ("docker, cold container", &mut cold),
        ("docker, warm pool", &mut warm),
    ] {
        let (m, p) = summary(s);
        println!("| {name} | {m:.0} | {p:.0} |");
    }
    let (lm, lp) = summary(&mut l_rt);
    let (dm, dp) = summary(&mut d_rt);
    println!(
        "\nexecute 1+1 round trip through the native WebSocket ({trips} samples each, interleaved):"
    );
    println!("| backend | median ms | p99 ms | median vs local |");
    println!("|---|---|---|---|");
    println!("| local process | {lm:.2} | {lp:.2} | 1.00x |");
    println!("| docker container | {dm:.2} | {dp:.2} | {:.2}x |", dm / lm);

    drop((dws, lws));
    for server in [local_server, cold_server, warm_server] {
        server.sessions.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(state);
    Ok(())
}
