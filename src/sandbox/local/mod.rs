//! The local backend: a kernel as a plain child process in its own process group, talking over
//! ipc sockets in a per-session directory. For development and machines with no Docker engine:
//! it isolates nothing.

pub mod venv;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;

use async_trait::async_trait;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::Command;
use tokio::sync::watch;

use super::files::{HostFiles, SessionFiles};
use super::packages::{
    InstallError, PACKAGES_DIR, PIP_PREFIX, PackageInstaller, PackagePolicy, lines, pip_args,
    pip_error,
};
use super::{CONNECTION_FILE_ARG, ExitReason, KernelProcess, LaunchSpec, Sandbox, SandboxError};
use crate::kernel::ConnectionInfo;

/// Starts kernels as `python -m ipykernel_launcher -f <connection file>` child processes.
pub struct LocalSandbox {
    python: PathBuf,
    state_dir: PathBuf,
    packages: PackagePolicy,
}

impl LocalSandbox {
    /// A backend that runs `python` (which must have ipykernel) and keeps per-session
    /// directories under `state_dir`.
    pub fn new(python: PathBuf, state_dir: PathBuf) -> Result<Self, SandboxError> {
        if !python.exists() {
            return Err(SandboxError::Unavailable {
                what: "the local kernel's python".into(),
                reason: format!("{} does not exist", python.display()),
                hint: "Run `kernelbox setup` or pass --python.".into(),
            });
        }
        Ok(Self {
            python,
            state_dir,
            packages: PackagePolicy::default(),
        })
    }

    fn python_missing(&self, reason: String) -> SandboxError {
        SandboxError::Unavailable {
            what: "the local kernel's python".into(),
            reason: format!("{}: {reason}", self.python.display()),
            hint: "Run `kernelbox setup` or pass --python.".into(),
        }
    }

    /// The same backend with another package policy (installs run the host's pip, with the
    /// host's network; `network` is ignored).
    pub fn with_packages(mut self, policy: PackagePolicy) -> Self {
        self.packages = policy;
        self
    }
}

#[async_trait]
impl Sandbox for LocalSandbox {
    fn name(&self) -> &'static str {
        "local"
    }

    fn installs_packages(&self) -> bool {
        self.packages.allow
    }

    /// Ready while the kernel's python is still there.
    async fn ready(&self) -> Result<(), SandboxError> {
        match tokio::fs::metadata(&self.python).await {
            Ok(meta) if meta.is_file() => Ok(()),
            Ok(_) => Err(self.python_missing("it is not a file".into())),
            Err(e) => Err(self.python_missing(e.to_string())),
        }
    }

    async fn launch(&self, spec: &LaunchSpec) -> Result<Box<dyn KernelProcess>, SandboxError> {
        let dir = self.state_dir.join("sessions").join(&spec.session_id);
        let work = dir.join("work");
        tokio::fs::create_dir_all(&work)
            .await
            .map_err(|source| SandboxError::Io {
                context: format!("creating session directory {}", work.display()),
                source,
            })?;
        let info = ConnectionInfo::ipc(&dir.join("k"), ConnectionInfo::random_key());
        let conn_file = dir.join("kernel.json");
        let json = serde_json::to_vec(&info)
            .map_err(|e| SandboxError::Launch(format!("encoding connection file: {e}")))?;
        tokio::fs::write(&conn_file, json)
            .await
            .map_err(|source| SandboxError::Io {
                context: format!("writing {}", conn_file.display()),
                source,
            })?;
        let process = LocalKernel {
            python: self.python.clone(),
            dir,
            work,
            conn_file,
            info,
            env: spec.env.clone().into_iter().collect(),
            argv: spec.kernel.argv.clone(),
            packages: self.packages.clone(),
            run: Mutex::new(None),
        };
        process.start()?;
        Ok(Box::new(process))
    }
}

/// The current run of a local kernel: its process group and the watch its waiter task fills.
struct Run {
    pgid: Pid,
    exit: watch::Receiver<Option<ExitReason>>,
}

/// One local kernel process (restartable).
struct LocalKernel {
    python: PathBuf,
    dir: PathBuf,
    work: PathBuf,
    conn_file: PathBuf,
    info: ConnectionInfo,
    env: Vec<(String, String)>,
    /// A kernelspec's own command (`{connection_file}` placeholders); empty: ipykernel.
    argv: Vec<String>,
    packages: PackagePolicy,
    run: Mutex<Option<Run>>,
}

impl LocalKernel {
    /// Spawns the kernel process and a task that reports its exit.
    fn start(&self) -> Result<(), SandboxError> {
        let mut cmd = match self.argv.split_first() {
            Some((program, args)) => {
                let file = self.conn_file.to_string_lossy();
                let mut cmd = Command::new(program.replace(CONNECTION_FILE_ARG, &file));
                cmd.args(args.iter().map(|a| a.replace(CONNECTION_FILE_ARG, &file)));
                cmd
            }
            None => {
                let mut cmd = Command::new(&self.python);
                cmd.arg("-m")
                    .arg("ipykernel_launcher")
                    .arg("-f")
                    .arg(&self.conn_file)
                    // An in-memory history: no SQLite write per cell, nothing shared between
                    // kernels.
                    .arg("--HistoryManager.hist_file=:memory:");
                cmd
            }
        };
        cmd.current_dir(&self.work)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("MPLBACKEND", "module://matplotlib_inline.backend_inline")
            // The session's own packages (installed with `pip install --target`).
            .env("PYTHONPATH", self.work.join(PACKAGES_DIR))
            // Without it, debugpy warns about frozen modules on stderr at every start.
            .env("PYDEVD_DISABLE_FILE_VALIDATION", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true);
        die_with_the_server(&mut cmd);
        let mut child = cmd.spawn().map_err(|e| {
            SandboxError::Launch(format!("spawning {}: {e}", self.python.display()))
        })?;
        let pid = child
            .id()
            .ok_or_else(|| SandboxError::Launch("kernel exited at once".into()))?;
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            let reason = match child.wait().await {
                Ok(status) => exit_reason(status),
                Err(e) => ExitReason::Vanished(format!("cannot wait for kernel: {e}")),
            };
            let _ = tx.send(Some(reason));
        });
        let pgid = Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX));
        if let Ok(mut run) = self.run.lock() {
            *run = Some(Run { pgid, exit: rx });
        }
        Ok(())
    }

    fn current(&self) -> Option<(Pid, watch::Receiver<Option<ExitReason>>)> {
        let run = self.run.lock().ok()?;
        run.as_ref().map(|r| (r.pgid, r.exit.clone()))
    }

    /// Kills the whole process group and waits until the waiter saw it go.
    async fn kill(&self) {
        if let Some((pgid, mut exit)) = self.current() {
            let _ = killpg(pgid, Signal::SIGKILL);
            let _ = exit.wait_for(Option::is_some).await;
        }
    }
}

/// Makes the kernel get SIGKILL when the server dies, even when it is killed outright (SIGKILL,
/// a crash): in its own process group it would otherwise live on as an orphan, and no later
/// server adopts local kernels. (Linux delivers the signal when the *thread* that spawned the
/// child exits; kernels are spawned from the runtime's worker threads, which live as long as the
/// server.)
fn die_with_the_server(cmd: &mut Command) {
    let server = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // system calls (prctl, getppid); it allocates nothing on success.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
            // The server may have died between the fork and the prctl.
            if nix::unistd::getppid() != server {
                return Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
            }
            Ok(())
        });
    }
}

fn exit_reason(status: std::process::ExitStatus) -> ExitReason {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => ExitReason::ExitCode(i64::from(code)),
        (None, Some(sig)) => ExitReason::Signal(sig),
        (None, None) => ExitReason::Vanished("unknown exit status".into()),
    }
}

#[async_trait]
impl KernelProcess for LocalKernel {
    fn connection(&self) -> &ConnectionInfo {
        &self.info
    }

    async fn exited(&self) -> ExitReason {
        let Some((_, mut exit)) = self.current() else {
            return ExitReason::Vanished("kernel was never started".into());
        };
        match exit.wait_for(Option::is_some).await {
            Ok(reason) => reason
                .clone()
                .unwrap_or_else(|| ExitReason::Vanished("no exit status".into())),
            Err(_) => ExitReason::Vanished("kernel watcher ended".into()),
        }
    }

    async fn is_alive(&self) -> Option<bool> {
        let Some((pgid, exit)) = self.current() else {
            return Some(false);
        };
        // Signal 0 only checks that the process exists (a stopped one does).
        Some(exit.borrow().is_none() && nix::sys::signal::kill(pgid, None).is_ok())
    }

    async fn signal_interrupt(&self) -> Result<(), SandboxError> {
        let (pgid, _) = self.current().ok_or(SandboxError::Control {
            op: "interrupt",
            reason: "no kernel process".into(),
        })?;
        nix::sys::signal::kill(pgid, Signal::SIGINT).map_err(|e| SandboxError::Control {
            op: "interrupt",
            reason: e.to_string(),
        })
    }

    async fn restart(&self) -> Result<(), SandboxError> {
        self.kill().await;
        // Stale socket files would make the new kernel's bind fail.
        remove_sockets(&self.info).await;
        self.start()
    }

    fn files(&self) -> Option<std::sync::Arc<dyn SessionFiles>> {
        Some(std::sync::Arc::new(HostFiles::new(self.work.clone(), None)))
    }

    fn kernel_work_dir(&self) -> Option<String> {
        Some(self.work.to_string_lossy().into_owned())
    }

    fn packages(&self) -> Option<std::sync::Arc<dyn PackageInstaller>> {
        Some(std::sync::Arc::new(LocalInstaller {
            python: self.python.clone(),
            cwd: self.dir.clone(),
            target: self.work.join(PACKAGES_DIR),
            policy: self.packages.clone(),
        }))
    }

    async fn shutdown(&self) -> Result<(), SandboxError> {
        self.kill().await;
        if let Ok(mut run) = self.run.lock() {
            *run = None;
        }
        match tokio::fs::remove_dir_all(&self.dir).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(SandboxError::Io {
                context: format!("removing {}", self.dir.display()),
                source,
            }),
        }
    }
}

async fn remove_sockets(info: &ConnectionInfo) {
    for port in [
        info.shell_port,
        info.iopub_port,
        info.stdin_port,
        info.control_port,
        info.hb_port,
    ] {
        let path = format!("{}-{}", info.ip, port);
        let _ = tokio::fs::remove_file(Path::new(&path)).await;
    }
}

impl Drop for LocalKernel {
    fn drop(&mut self) {
        // A session dropped without shutdown must not leave its kernel running.
        if let Some((pgid, exit)) = self.current()
            && exit.borrow().is_none()
        {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

/// Installs packages for a local kernel with the host's pip (and network).
#[derive(Debug)]
struct LocalInstaller {
    python: PathBuf,
    /// pip's current directory: the session's dir (the server's), not its working dir.
    cwd: PathBuf,
    target: PathBuf,
    policy: PackagePolicy,
}

#[async_trait]
impl PackageInstaller for LocalInstaller {
    async fn install(
        &self,
        packages: &[String],
        progress: tokio::sync::mpsc::Sender<String>,
    ) -> Result<(), InstallError> {
        use tokio::io::AsyncReadExt;
        if !self.policy.allow {
            return Err(InstallError::Disabled);
        }
        let target = self.target.to_string_lossy();
        let mut cmd = Command::new(&self.python);
        // Isolated, from the server's state dir rather than the working dir: nothing the
        // session wrote is found as a module (pip runs with the host's network).
        cmd.args(PIP_PREFIX)
            .args(pip_args(&self.policy, &target, packages))
            .current_dir(&self.cwd)
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(ca) = &self.policy.ca_bundle {
            cmd.env("PIP_CERT", ca);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| InstallError::Backend(format!("cannot run pip: {e}")))?;
        // Both pipes feed one channel of lines, in the order they come.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(256);
        let pipes: Vec<Box<dyn tokio::io::AsyncRead + Unpin + Send>> = [
            child.stdout.take().map(|p| Box::new(p) as _),
            child.stderr.take().map(|p| Box::new(p) as _),
        ]
        .into_iter()
        .flatten()
        .collect();
        for mut pipe in pipes {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut pending = Vec::new();
                let mut buf = [0u8; 8192];
                while let Ok(n) = pipe.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    for line in lines(&mut pending, &buf[..n]) {
                        let _ = tx.send(line).await;
                    }
                }
                if !pending.is_empty() {
                    let _ = tx
                        .send(String::from_utf8_lossy(&pending).into_owned())
                        .await;
                }
            });
        }
        drop(tx);
        let run = async {
            let mut output = Vec::new();
            while let Some(line) = rx.recv().await {
                let _ = progress.send(line.clone()).await;
                if output.len() < 1000 {
                    output.push(line);
                }
            }
            let status = child
                .wait()
                .await
                .map_err(|e| InstallError::Backend(format!("waiting for pip: {e}")))?;
            Ok::<_, InstallError>((status, output))
        };
        let (status, output) = tokio::time::timeout(self.policy.timeout, run)
            .await
            .map_err(|_| InstallError::Timeout(self.policy.timeout))??;
        if status.success() {
            Ok(())
        } else {
            Err(InstallError::Failed {
                code: status.code().map_or(-1, i64::from),
                message: pip_error(&output),
            })
        }
    }
}
