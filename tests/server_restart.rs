//! A server restart keeps live sessions (Docker backend, real engine, real kernel image): the
//! session store remembers each session, a gracefully stopped server leaves its containers
//! running, and the next server process re-adopts them, so variables and files are still there.
//! Stored sessions whose containers are gone are forgotten; containers nobody claims are removed.
//! Needs the kernel image: `kernel-image/build.sh`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::serve_process::ServeProcess;
use kernelbox::sandbox::docker::{DockerConfig, DockerSandbox};
use kernelbox::sandbox::{KernelProcess, LaunchSpec};
use kernelbox::session::{
    CreateSession, EventKind, KernelState, SessionManager, SessionOptions, SessionStore,
};
use serde_json::Value;
use tokio::process::Command;

/// How long a server may take to start listening or to exit after SIGTERM.
const SERVER_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the docker CLI and returns its stdout, trimmed.
fn docker(args: &[&str]) -> String {
    let out = std::process::Command::new("docker")
        .args(args)
        .output()
        .expect("run the docker CLI");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Ids of the containers carrying `label` (running ones only unless `all`).
fn containers(label: &str, all: bool) -> Vec<String> {
    let filter = format!("label={label}");
    let mut args = vec!["ps", "-q", "--no-trunc", "--filter", filter.as_str()];
    if all {
        args.insert(1, "-a");
    }
    docker(&args)
        .lines()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
        .collect()
}

/// Names of the volumes carrying `label`.
fn volumes(label: &str) -> Vec<String> {
    let filter = format!("label={label}");
    docker(&["volume", "ls", "-q", "--filter", &filter])
        .lines()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
        .collect()
}

/// A temporary state dir whose server instance's containers and volumes are removed, whatever
/// the test's outcome.
struct Workspace {
    dir: PathBuf,
}

impl Workspace {
    fn new() -> Self {
        Self {
            dir: common::temp_state_dir(),
        }
    }

    /// The Docker backend's state dir (`$XDG_STATE_HOME/kernelbox`).
    fn state_dir(&self) -> PathBuf {
        self.dir.join("kernelbox")
    }

    fn store(&self) -> PathBuf {
        self.dir.join("sessions.db")
    }

    /// The `kernelbox.instance` label of the servers using this state dir.
    fn instance_label(&self) -> String {
        let id = std::fs::read_to_string(self.state_dir().join("instance-id"))
            .expect("the server wrote its instance id");
        format!("kernelbox.instance={}", id.trim())
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        if let Ok(id) = std::fs::read_to_string(self.state_dir().join("instance-id")) {
            let label = format!("label=kernelbox.instance={}", id.trim());
            let ids = docker(&["ps", "-aq", "--filter", &label]);
            for id in ids.lines().filter(|l| !l.is_empty()) {
                docker(&["rm", "-f", "-v", id]);
            }
            let volumes = docker(&["volume", "ls", "-q", "--filter", &label]);
            for volume in volumes.lines().filter(|l| !l.is_empty()) {
                docker(&["volume", "rm", "-f", volume]);
            }
        }
        // Local kernels a failed test may have left.
        for pid in pids_under(&self.dir) {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The real `kernelbox serve` binary on a free loopback port.
struct Server {
    process: ServeProcess,
    token: String,
}

impl Server {
    /// Starts `kernelbox serve --backend docker` with `workspace`'s state dir and store and
    /// waits until it listens.
    async fn start(workspace: &Workspace, pool_size: usize) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kernelbox"));
        command
            .args(["serve", "--backend", "docker", "--bind", "127.0.0.1:0"])
            .arg("--pool-size")
            .arg(pool_size.to_string())
            .arg("--state-db")
            .arg(workspace.store());
        Self::spawn(command, workspace).await
    }

    /// Starts `kernelbox serve --backend local` with `workspace` as its state dir.
    async fn start_local(workspace: &Workspace) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kernelbox"));
        command
            .args(["serve", "--backend", "local", "--bind", "127.0.0.1:0"])
            .args(["--pool-size", "0", "--python"])
            .arg(common::python())
            .env("KERNELBOX_STATE_DIR", &workspace.dir);
        Self::spawn(command, workspace).await
    }

    async fn spawn(mut command: Command, workspace: &Workspace) -> Self {
        let token = "restart-test-token".to_owned();
        command
            .env("XDG_STATE_HOME", &workspace.dir)
            .env("KERNELBOX_TOKEN", &token)
            .env("KERNELBOX_LOG", "info");
        Self {
            process: ServeProcess::spawn(command).await,
            token,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.process.addr)
    }

    fn log(&self) -> String {
        self.process.log()
    }

    async fn create_session(&self) -> String {
        let resp = reqwest::Client::new()
            .post(self.url("/v1/sessions"))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("POST /v1/sessions");
        assert_eq!(resp.status(), 201, "{:?}", resp.text().await);
        let body: Value = resp.json().await.expect("JSON body");
        body["id"].as_str().expect("session id").to_owned()
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        reqwest::Client::new()
            .get(self.url(path))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("GET")
    }

    async fn delete(&self, path: &str) -> reqwest::StatusCode {
        reqwest::Client::new()
            .delete(self.url(path))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("DELETE")
            .status()
    }

    /// The session's native WebSocket, resuming after event `since` if given.
    async fn ws(&self, id: &str, since: Option<u64>) -> common::Ws {
        let mut url = format!(
            "ws://{}/v1/sessions/{id}/ws?token={}",
            self.process.addr, self.token
        );
        if let Some(since) = since {
            url.push_str(&format!("&since={since}"));
        }
        let (stream, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("ws connect");
        common::Ws { stream }
    }

    /// Sends `signal` to the server.
    fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = self.process.child.id().expect("the server runs");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")),
            signal,
        )
        .expect("send a signal");
    }

    /// Kills the server outright (SIGKILL, as a crash would end it) and waits until it is gone.
    async fn crash(mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        let _ = tokio::time::timeout(SERVER_TIMEOUT, self.process.child.wait())
            .await
            .expect("the server ends at SIGKILL");
    }

    /// Sends SIGTERM and waits for a clean exit.
    async fn terminate(mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let status = tokio::time::timeout(SERVER_TIMEOUT, self.process.child.wait())
            .await
            .unwrap_or_else(|_| panic!("the server did not exit after SIGTERM:\n{}", self.log()))
            .expect("wait for the server");
        assert!(
            status.success(),
            "the server exited with {status}:\n{}",
            self.log()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_takes_its_sessions_back_with_their_variables_and_files() {
    let workspace = Workspace::new();

    // First server: a session with a variable and a file (its kernel may come from the pool).
    let first = Server::start(&workspace, 1).await;
    let id = first.create_session().await;
    let mut ws = first.ws(&id, None).await;
    ws.wait_kernel("idle").await;
    let cell = ws.run("x = 41\nopen('note.txt', 'w').write('kept')").await;
    assert_eq!(cell.status(), "ok", "{:?}", cell.events);
    let last_seq = cell
        .events
        .last()
        .and_then(|e| e["seq"].as_u64())
        .expect("seq");
    let instance = workspace.instance_label();
    let session = format!("kernelbox.session={id}");

    // SIGTERM with a client connected: the server exits and the client is disconnected; the
    // session's kernel and working-dir keeper stay; the warm pool's kernel goes.
    first.terminate().await;
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        // Events sent before the stop may still be buffered; then the connection ends.
        while let Some(Ok(frame)) = futures::StreamExt::next(&mut ws.stream).await {
            if frame.is_close() {
                break;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the client learns that the server is gone");
    assert_eq!(
        containers(&session, false).len(),
        2,
        "the session's kernel and keeper still run after a graceful shutdown"
    );
    assert_eq!(
        containers(&instance, true),
        containers(&session, false),
        "nothing but the session's containers is left"
    );
    assert_eq!(
        volumes(&session).len(),
        1,
        "its working-dir volume stays too"
    );

    // Second server, same store: the session is there, with its variable and its file.
    let second = Server::start(&workspace, 0).await;
    assert!(
        second.log().contains("re-adopted"),
        "the start says it re-adopted the session:\n{}",
        second.log()
    );
    let listed = second.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!(listed.status(), 200, "the session is known again");
    let mut ws = second.ws(&id, Some(last_seq)).await;
    let resumed = ws.next().await;
    assert_eq!(resumed["type"], "resumed", "{resumed}");
    let idle = ws.wait_kernel("idle").await;
    assert!(
        idle["seq"].as_u64() > Some(last_seq),
        "event numbers go on where the first server stopped: {idle} after {last_seq}"
    );
    let cell = ws.run("x + 1").await;
    assert_eq!(
        cell.result_text().as_deref(),
        Some("42"),
        "{:?}",
        cell.events
    );
    let cell = ws.run("open('note.txt').read()").await;
    assert_eq!(cell.result_text().as_deref(), Some("'kept'"));

    // Deleting it removes its containers; stopping the server leaves nothing.
    assert_eq!(second.delete(&format!("/v1/sessions/{id}")).await, 204);
    assert!(
        containers(&session, true).is_empty(),
        "the deleted session's containers are gone"
    );
    second.terminate().await;
    assert!(
        containers(&instance, true).is_empty(),
        "no container of this server instance remains"
    );
    assert!(volumes(&instance).is_empty(), "nor any volume");
    let store = SessionStore::open(&workspace.store()).expect("open the store");
    assert!(
        store.list().expect("list").0.is_empty(),
        "the store is empty"
    );
}

/// A Docker sandbox on `workspace`'s state dir (so with that state dir's instance id).
async fn sandbox(workspace: &Workspace) -> DockerSandbox {
    DockerSandbox::new(DockerConfig {
        state_dir: workspace.state_dir(),
        ..DockerConfig::default()
    })
    .await
    .unwrap_or_else(|err| panic!("{err} (build the image: kernel-image/build.sh)"))
}

/// Waits until the session's kernel reports `state`.
async fn wait_state(session: &kernelbox::session::Session, state: KernelState) {
    let mut events = session.subscribe();
    if session.info().state == state {
        return;
    }
    tokio::time::timeout(common::EVENT_TIMEOUT, async {
        loop {
            if let Ok(event) = events.recv().await
                && matches!(&event.kind, EventKind::State { state: s, .. } if *s == state)
            {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("session {} never became {state:?}", session.id()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_start_sessions_whose_containers_are_gone_are_forgotten_and_unclaimed_containers_removed()
 {
    let workspace = Workspace::new();
    let options = SessionOptions::default;
    let store = || SessionStore::open(&workspace.store()).expect("open the store");

    let (first, startup) = SessionManager::open(
        Arc::new(sandbox(&workspace).await),
        options(),
        Some(store()),
    )
    .await
    .expect("open");
    assert_eq!(
        startup,
        Default::default(),
        "a fresh store has nothing to adopt"
    );
    let kept = first
        .create(CreateSession::default())
        .await
        .expect("create");
    let gone = first
        .create(CreateSession::default())
        .await
        .expect("create");
    wait_state(&kept, KernelState::Idle).await;
    wait_state(&gone, KernelState::Idle).await;
    // A kernel of this instance that no session claims (as a crash between launch and record
    // would leave).
    let stray = sandbox(&workspace)
        .await
        .launch_kernel(&LaunchSpec {
            session_id: "stray".to_owned(),
            ..LaunchSpec::default()
        })
        .await
        .expect("launch");
    stray.detach().await.expect("detach");
    first.detach().await;
    let gone_kernel = containers(&format!("kernelbox.session={}", gone.id()), false);
    for id in &gone_kernel {
        let labels = docker(&[
            "inspect",
            "-f",
            "{{index .Config.Labels \"kernelbox.role\"}}",
            id,
        ]);
        if labels == "kernel" {
            docker(&["rm", "-f", id]);
        }
    }

    let (second, startup) = SessionManager::open(
        Arc::new(sandbox(&workspace).await),
        options(),
        Some(store()),
    )
    .await
    .expect("open");
    assert_eq!(startup.adopted, vec![kept.id().to_owned()]);
    assert_eq!(startup.dropped.len(), 1, "{startup:?}");
    assert_eq!(startup.dropped[0].0, gone.id());
    assert!(
        startup.dropped[0].1.contains("gone"),
        "the log says why: {startup:?}"
    );
    assert_eq!(
        startup.removed, 1,
        "the stray kernel was removed: {startup:?}"
    );
    let stored: Vec<String> = store()
        .list()
        .expect("list")
        .0
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(
        stored,
        vec![kept.id().to_owned()],
        "the store forgot the gone session"
    );
    assert!(containers("kernelbox.session=stray", true).is_empty());
    assert!(
        containers(&format!("kernelbox.session={}", gone.id()), true).is_empty(),
        "the gone session's keeper was removed too"
    );
    let adopted = second.get(kept.id()).expect("the kept session is live");
    wait_state(&adopted, KernelState::Idle).await;

    second.shutdown().await;
    assert!(containers(&workspace.instance_label(), true).is_empty());
    assert!(
        store().list().expect("list").0.is_empty(),
        "shutdown forgets every session"
    );
    assert!(Path::new(&workspace.store()).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_server_s_sessions_are_taken_back_too() {
    let workspace = Workspace::new();
    let first = Server::start(&workspace, 0).await;
    let id = first.create_session().await;
    let mut ws = first.ws(&id, None).await;
    ws.wait_kernel("idle").await;
    ws.run("y = 'before the crash'").await;
    drop(ws);
    // No graceful shutdown: the store has had the session since its creation.
    first.crash().await;

    let second = Server::start(&workspace, 0).await;
    let mut ws = second.ws(&id, None).await;
    ws.wait_kernel("idle").await;
    let cell = ws.run("y").await;
    assert_eq!(cell.result_text().as_deref(), Some("'before the crash'"));
    // The adopted kernel restarts like any other (same connection file, same container).
    ws.send(serde_json::json!({"type": "restart"})).await;
    ws.wait_kernel("restarting").await;
    ws.wait_kernel("idle").await;
    let cell = ws.run("'y' in dir()").await;
    assert_eq!(
        cell.result_text().as_deref(),
        Some("False"),
        "a fresh kernel"
    );
    drop(ws);
    assert_eq!(second.delete(&format!("/v1/sessions/{id}")).await, 204);
    second.terminate().await;
    assert!(containers(&workspace.instance_label(), true).is_empty());
}

/// Processes whose command line mentions `path`, with their command lines.
fn processes(path: &Path) -> Vec<(nix::unistd::Pid, String)> {
    let needle = path.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline
                .contains(&needle)
                .then_some((nix::unistd::Pid::from_raw(pid), cmdline))
        })
        .collect()
}

/// Command lines of the processes that mention `path`.
fn processes_under(path: &Path) -> Vec<String> {
    processes(path)
        .into_iter()
        .map(|(_, cmdline)| cmdline)
        .collect()
}

/// Pids of the processes that mention `path`.
fn pids_under(path: &Path) -> Vec<nix::unistd::Pid> {
    processes(path).into_iter().map(|(pid, _)| pid).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_kernels_end_with_a_crashed_server_instead_of_living_on_as_orphans() {
    let workspace = Workspace::new();
    let server = Server::start_local(&workspace).await;
    let id = server.create_session().await;
    let mut ws = server.ws(&id, None).await;
    ws.wait_kernel("idle").await;
    drop(ws);
    let sessions = workspace.dir.join("sessions");
    assert_eq!(processes_under(&sessions).len(), 1, "the kernel runs");

    server.crash().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !processes_under(&sessions).is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the kernel outlived the server: {:?}",
            processes_under(&sessions)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cell_running_across_a_restart_does_not_hold_up_the_takeover() {
    const CELL_SECONDS: u64 = 20;
    let workspace = Workspace::new();
    let first = Server::start(&workspace, 0).await;
    let id = first.create_session().await;
    let mut ws = first.ws(&id, None).await;
    ws.wait_kernel("idle").await;
    let cell = ws
        .submit(&format!(
            "import time; time.sleep({CELL_SECONDS}); z = 'finished'"
        ))
        .await;
    ws.until(|e| e["id"] == cell.as_str() && e["type"] == "status" && e["state"] == "busy")
        .await;
    drop(ws);
    first.terminate().await;

    // The kernel is busy with the cell, but the new server takes it over at once.
    let started = tokio::time::Instant::now();
    let second = Server::start(&workspace, 0).await;
    let mut ws = second.ws(&id, None).await;
    ws.wait_kernel("idle").await;
    assert!(
        started.elapsed() < Duration::from_secs(CELL_SECONDS / 2),
        "the takeover waited for the running cell: {:?}",
        started.elapsed()
    );
    // The cell went on in the kernel; the next one runs after it.
    let cell = ws.run("z").await;
    assert_eq!(cell.result_text().as_deref(), Some("'finished'"));
    assert_eq!(second.delete(&format!("/v1/sessions/{id}")).await, 204);
    second.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_container_recreated_since_it_was_recorded_is_found_by_its_labels() {
    let workspace = Workspace::new();
    let sandbox = sandbox(&workspace).await;
    let kernel = sandbox
        .launch_kernel(&LaunchSpec {
            session_id: "recreated".to_owned(),
            ..LaunchSpec::default()
        })
        .await
        .expect("launch");
    let recorded = kernel
        .persisted()
        .await
        .expect("a Docker kernel can be persisted");
    // Removed from outside, then recreated by a restart: the record's container id is stale.
    let old = kernel.container_id().await;
    docker(&["rm", "-f", &old]);
    kernel
        .restart()
        .await
        .expect("restart recreates the container");
    let new = kernel.container_id().await;
    assert_ne!(old, new);
    kernel.detach().await.expect("detach");

    let adopted = sandbox.adopt_kernel(&recorded).await.expect("adopt");
    assert_eq!(adopted.container_id().await, new);
    adopted.shutdown().await.expect("shutdown");
    assert!(containers("kernelbox.session=recreated", true).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_is_not_adopted_by_another_instance_nor_without_its_socket_directory() {
    let workspace = Workspace::new();
    let ours = sandbox(&workspace).await;
    let kernel = ours
        .launch_kernel(&LaunchSpec {
            session_id: "refused".to_owned(),
            ..LaunchSpec::default()
        })
        .await
        .expect("launch");
    let recorded = kernel
        .persisted()
        .await
        .expect("a Docker kernel can be persisted");

    let elsewhere = Workspace::new();
    let other = sandbox(&elsewhere).await;
    let refused = other.adopt_kernel(&recorded).await.expect_err("not ours");
    assert!(
        refused.to_string().contains("belongs to instance"),
        "{refused}"
    );

    kernel.detach().await.expect("detach");
    std::fs::remove_dir_all(workspace.state_dir().join("sessions/refused/ipc")).expect("rm");
    let refused = ours
        .adopt_kernel(&recorded)
        .await
        .expect_err("unreachable kernel");
    assert!(
        refused.to_string().contains("socket directory"),
        "{refused}"
    );
}
