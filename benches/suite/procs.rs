//! The processes measured: a kernelbox server and Jupyter Kernel Gateway, each started as its
//! own process (so its memory can be read apart from the client's) and stopped gracefully.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::BoxError;

/// The API token every measured server is started with.
pub const TOKEN: &str = "kernelbox-bench-token-0123456789";

/// A server process under measurement.
pub struct Proc {
    child: tokio::process::Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// What the report calls it.
    pub name: String,
}

/// A free loopback port (bound and released; the server binds it right after).
fn free_port() -> Result<u16, BoxError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn log_file(dir: &Path, name: &str) -> Result<std::fs::File, BoxError> {
    std::fs::create_dir_all(dir)?;
    Ok(std::fs::File::create(dir.join(format!("{name}.log")))?)
}

impl Proc {
    /// Starts `kernelbox serve` with `args` (bind, token and the store are added) and waits for
    /// `/healthz`.
    pub async fn kernelbox(
        bin: &Path,
        name: &str,
        args: &[&str],
        logs: &Path,
    ) -> Result<Self, BoxError> {
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
        let log = log_file(logs, name)?;
        let child = tokio::process::Command::new(bin)
            .arg("serve")
            .args(["--bind", &addr.to_string(), "--token", TOKEN, "--ephemeral"])
            .args(["--rate-limit", "1000000", "--max-sessions", "1000"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let proc = Self {
            child,
            addr,
            name: name.into(),
        };
        proc.wait_http("/healthz").await?;
        Ok(proc)
    }

    /// Starts Jupyter Kernel Gateway through `benches/gateway/launch.py` in `mode` (`stock` or
    /// `tuned`), its kernels run by `kernel_python`, and waits for `GET /api`.
    pub async fn gateway(
        gateway_python: &Path,
        launcher: &Path,
        mode: &str,
        kernel_python: &Path,
        logs: &Path,
    ) -> Result<Self, BoxError> {
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
        let name = format!("gateway-{mode}");
        let log = log_file(logs, &name)?;
        let child = tokio::process::Command::new(gateway_python)
            .arg(launcher)
            .args([
                "--port",
                &addr.port().to_string(),
                "--mode",
                mode,
                "--token",
                TOKEN,
            ])
            .arg("--kernel-python")
            .arg(kernel_python)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start Kernel Gateway: {e}"))?;
        let proc = Self { child, addr, name };
        proc.wait_http("/api").await?;
        Ok(proc)
    }

    async fn wait_http(&self, path: &str) -> Result<(), BoxError> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let url = format!("http://{}{path}", self.addr);
        let http = reqwest::Client::new();
        loop {
            if let Ok(resp) = http
                .get(&url)
                .header("Authorization", format!("token {TOKEN}"))
                .send()
                .await
                && resp.status().is_success()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("{} did not answer {url} within 60 s", self.name).into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Resident memory of the server process itself (not its kernels), in MiB.
    pub fn rss_mib(&self) -> Result<f64, BoxError> {
        let pid = self.pid().ok_or("process gone")?;
        rss_mib(pid)
    }

    /// SIGTERM, then up to 60 s for a clean exit (kernels and containers removed), then SIGKILL.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        if tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// VmRSS of `pid` in MiB.
pub fn rss_mib(pid: u32) -> Result<f64, BoxError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or("no VmRSS")?;
    Ok(kb / 1024.0)
}

/// Where the benchmark writes its logs and report.
pub fn out_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench")
}
