//! Session create → first result: local process, cold container, warm pool; each against the
//! same work done directly (launch through the sandbox layer, connect, run `1+1`) and, for the
//! local backend, against Kernel Gateway starting a kernel.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kernelbox::sandbox::Sandbox;
use kernelbox::sandbox::docker::{DockerConfig, DockerSandbox};

use crate::clients::{Client, Direct, Jupyter, Native};
use crate::procs::{Proc, TOKEN};
use crate::stats::{Table, millis, num, ratio};
use crate::{Bench, BoxError};

fn check(out: &crate::clients::Outcome, what: &str) -> Result<(), BoxError> {
    if out.result.as_deref() == Some("2") {
        Ok(())
    } else {
        Err(format!("{what}: 1+1 gave {:?}", out.result).into())
    }
}

async fn direct(sandbox: &dyn Sandbox, samples: usize) -> Result<Vec<Duration>, BoxError> {
    let mut times = Vec::new();
    for i in 0..samples {
        let t = Instant::now();
        let mut client = Client::Direct(Box::new(
            Direct::launch(sandbox, &format!("start-{i}")).await?,
        ));
        let out = client.execute("1+1").await?;
        times.push(t.elapsed());
        check(&out, "direct")?;
        if let Client::Direct(d) = client {
            d.shutdown().await;
        }
    }
    Ok(times)
}

async fn wait_ready(addr: SocketAddr) {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        match http.get(format!("http://{addr}/readyz")).send().await {
            Ok(r) if r.status().is_success() => return,
            Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => {
                tokio::time::sleep(Duration::from_secs(3)).await;
                return;
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

async fn native(addr: SocketAddr, samples: usize, warm: bool) -> Result<Vec<Duration>, BoxError> {
    let http = reqwest::Client::new();
    let mut times = Vec::new();
    for _ in 0..samples {
        if warm {
            wait_ready(addr).await;
        }
        let t = Instant::now();
        let native = Native::create(addr).await?;
        let session = native.session.clone();
        let mut client = Client::Native(native);
        let out = client.execute("1+1").await?;
        times.push(t.elapsed());
        check(&out, "kernelbox")?;
        drop(client);
        http.delete(format!("http://{addr}/v1/sessions/{session}"))
            .bearer_auth(TOKEN)
            .send()
            .await?;
    }
    Ok(times)
}

async fn gateway(addr: SocketAddr, samples: usize) -> Result<Vec<Duration>, BoxError> {
    let http = reqwest::Client::new();
    let mut times = Vec::new();
    for _ in 0..samples {
        let t = Instant::now();
        let jupyter = Jupyter::create(addr).await?;
        let kernel = jupyter.kernel.clone();
        let mut client = Client::Jupyter(jupyter);
        let out = client.execute("1+1").await?;
        times.push(t.elapsed());
        check(&out, "Kernel Gateway")?;
        drop(client);
        http.delete(format!("http://{addr}/api/kernels/{kernel}"))
            .header("Authorization", format!("token {TOKEN}"))
            .send()
            .await?;
    }
    Ok(times)
}

/// Runs the start-up scenarios; returns their section of the report.
pub async fn run(bench: &Bench) -> Result<String, BoxError> {
    let samples = bench.samples(10, 2);
    let mut rows: Vec<(String, Vec<Duration>, &str)> = Vec::new();

    let local_floor = direct(bench.local.as_ref(), samples).await?;
    let args = bench.local_args();
    let mut local_args: Vec<&str> = args.iter().map(String::as_str).collect();
    local_args.extend(["--pool-size", "0"]);
    let server = Proc::kernelbox(
        &bench.bin,
        "kernelbox-start-local",
        &local_args,
        &bench.logs,
    )
    .await?;
    let local = native(server.addr, samples, false).await;
    server.stop().await;
    rows.push((
        "direct launch, local process (floor)".into(),
        local_floor,
        "local",
    ));
    rows.push(("kernelbox, local process".into(), local?, "local"));
    if let Some((python, launcher)) = &bench.gateway {
        let gw =
            Proc::gateway(python, launcher, "tuned", &bench.kernel_python, &bench.logs).await?;
        let times = gateway(gw.addr, samples).await;
        gw.stop().await;
        rows.push((
            "Kernel Gateway (tuned), local process".into(),
            times?,
            "local",
        ));
    }

    let docker_config = DockerConfig {
        state_dir: bench.scratch.join("docker"),
        ..DockerConfig::default()
    };
    match DockerSandbox::new(docker_config).await {
        Ok(docker) => {
            rows.push((
                "direct launch, Docker container (floor)".into(),
                direct(&docker, samples).await?,
                "docker",
            ));
            for (name, pool) in [("cold container", "0"), ("warm pool", "2")] {
                let server = Proc::kernelbox(
                    &bench.bin,
                    &format!("kernelbox-start-docker-{pool}"),
                    &["--backend", "docker", "--pool-size", pool],
                    &bench.logs,
                )
                .await?;
                let times = native(server.addr, samples, pool != "0").await;
                server.stop().await;
                rows.push((format!("kernelbox, Docker {name}"), times?, "docker"));
            }
        }
        Err(e) => rows.push((format!("Docker rows skipped: {e}"), Vec::new(), "docker")),
    }

    let floor = |kind: &str| {
        rows.iter()
            .find(|r| r.2 == kind)
            .map_or(f64::NAN, |r| millis(&r.1).median)
    };
    let (local_floor, docker_floor) = (floor("local"), floor("docker"));
    let mut table = Table::new(
        &format!(
            "## Session create → first result\n\nCreate a session, run `1+1`, read its result; {samples} sequential samples per path (ms):"
        ),
        &["path", "median", "p99", "× floor"],
    );
    for (name, times, kind) in &rows {
        let s = millis(times);
        let f = if *kind == "local" {
            local_floor
        } else {
            docker_floor
        };
        table.row(&[
            name.clone(),
            num(s.median, 0),
            num(s.p99, 0),
            ratio(s.median, f),
        ]);
    }
    Ok(table.finish())
}
