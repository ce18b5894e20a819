//! Secure defaults (issue 12): `--backend auto` never silently runs unisolated kernels when an
//! engine is configured, the kernel's uid is never root or the server's own, the engine's
//! security state is reported, `--runtime` is checked (and a kernel runs under gVisor when it is
//! registered), and the HMAC key stays out of `Debug`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use kernelbox::kernel::ConnectionInfo;
use kernelbox::sandbox::PersistedKernel;
use kernelbox::sandbox::docker::{self, DockerConfig, DockerSandbox};
use kernelbox::session::SessionOptions;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const TOKEN: &str = "secure-defaults-test-token";

/// The server binary with a fresh state dir, the test token, and no inherited `DOCKER_HOST`.
fn serve(state: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kernelbox"));
    command
        .args(["serve", "--bind", "127.0.0.1:0", "--pool-size", "0"])
        .args(args)
        .env_remove("DOCKER_HOST")
        .env_remove("KERNELBOX_BACKEND")
        .env("XDG_STATE_HOME", state)
        .env("KERNELBOX_STATE_DIR", state)
        .env("KERNELBOX_TOKEN", TOKEN)
        .env("KERNELBOX_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Runs `command` to its end (at most 30 s) and returns whether it succeeded and its stderr.
async fn run_to_end(mut command: Command) -> (bool, String) {
    let output = tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .expect("the server neither started nor exited within 30 s")
        .expect("run kernelbox");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Starts `command`, waits until it serves (stderr `serving on`), and returns what it printed
/// until then; panics with its stderr if it exits first. The server is killed on return.
async fn serves(mut command: Command) -> String {
    let mut child = command.spawn().expect("start kernelbox");
    let stderr = child.stderr.take().expect("stderr is piped");
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = String::new();
    let found = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = lines.next_line().await {
            seen.push_str(&line);
            seen.push('\n');
            if line.contains("kernelbox: serving on") {
                return true;
            }
        }
        false
    })
    .await;
    let _ = child.kill().await;
    assert!(
        matches!(found, Ok(true)),
        "the server did not start:\n{seen}"
    );
    seen
}

/// A unix socket path nobody listens on (bound once, then closed: connecting is refused).
fn dead_socket(dir: &Path) -> PathBuf {
    let path = dir.join("dead-docker.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).expect("bind a socket"));
    path
}

fn engine_answers() -> bool {
    std::process::Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `--backend auto` with `DOCKER_HOST` pointing at a socket nobody answers on: the server
/// refuses to start and says what to do, rather than running kernels unisolated.
#[tokio::test]
async fn auto_refuses_when_docker_host_does_not_answer() {
    let state = common::temp_state_dir();
    let socket = dead_socket(&state);
    let mut command = serve(&state, &["--backend", "auto"]);
    command.env("DOCKER_HOST", format!("unix://{}", socket.display()));
    let (ok, stderr) = run_to_end(command).await;
    assert!(!ok, "the server started:\n{stderr}");
    assert!(stderr.contains("DOCKER_HOST=unix://"), "{stderr}");
    assert!(stderr.contains("will not fall back"), "{stderr}");
    assert!(stderr.contains("--backend local"), "{stderr}");
    assert!(!stderr.contains("serving on"), "{stderr}");
}

/// The same when no address is set but a socket exists at the socket path (an installed
/// engine that is down).
#[tokio::test]
async fn auto_refuses_when_the_local_socket_does_not_answer() {
    let state = common::temp_state_dir();
    let socket = dead_socket(&state);
    let socket = socket.to_string_lossy().into_owned();
    let (ok, stderr) = run_to_end(serve(
        &state,
        &["--backend", "auto", "--docker-socket", &socket],
    ))
    .await;
    assert!(!ok, "the server started:\n{stderr}");
    assert!(stderr.contains(&format!("the socket {socket}")), "{stderr}");
    assert!(stderr.contains("--backend local"), "{stderr}");
}

/// No engine installed (no `DOCKER_HOST`, no socket): `auto` serves on the local backend, and
/// says loudly that kernels are not isolated.
#[tokio::test]
async fn auto_without_an_engine_serves_local_and_warns() {
    let state = common::temp_state_dir();
    let python = common::python();
    let seen = serves(serve(
        &state,
        &[
            "--backend",
            "auto",
            "--docker-socket",
            "/nonexistent/docker.sock",
            "--python",
            &python.to_string_lossy(),
        ],
    ))
    .await;
    assert!(seen.contains("(local backend)"), "{seen}");
    assert!(
        seen.contains("kernelbox: WARNING: kernels are NOT isolated"),
        "{seen}"
    );
    assert!(seen.contains("no Docker engine installed"), "{seen}");
}

/// `--backend local` says the same.
#[tokio::test]
async fn local_backend_warns_that_kernels_are_not_isolated() {
    let state = common::temp_state_dir();
    let python = common::python();
    let seen = serves(serve(
        &state,
        &["--backend", "local", "--python", &python.to_string_lossy()],
    ))
    .await;
    assert!(
        seen.contains("kernelbox: WARNING: kernels are NOT isolated (--backend local)"),
        "{seen}"
    );
}

/// A root kernel uid is refused at start.
#[tokio::test]
async fn kernel_uid_root_is_refused() {
    let state = common::temp_state_dir();
    let (ok, stderr) =
        run_to_end(serve(&state, &["--backend", "docker", "--kernel-uid", "0"])).await;
    assert!(!ok, "{stderr}");
    assert!(stderr.contains("kernels would run as root"), "{stderr}");
}

/// Runs `kernelbox serve --backend docker` as `uid` (with `groups`) through `setpriv`, with a
/// state dir that uid owns; `None` when that is impossible here (not root, no setpriv).
async fn serve_docker_as(uid: u32, groups: &str) -> Option<(bool, String)> {
    if !nix::unistd::getuid().is_root() || !Path::new("/usr/bin/setpriv").exists() {
        eprintln!("SKIPPED: needs root and setpriv to run the server as uid {uid}");
        return None;
    }
    let state = PathBuf::from(format!(
        "/tmp/kbt-uid-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    std::fs::create_dir_all(&state).expect("state dir");
    std::os::unix::fs::chown(&state, Some(uid), Some(uid)).expect("chown state dir");
    let mut command = Command::new("/usr/bin/setpriv");
    command
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .arg(if groups.is_empty() {
            "--clear-groups".to_owned()
        } else {
            format!("--groups={groups}")
        })
        .args([
            "--",
            env!("CARGO_BIN_EXE_kernelbox"),
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--backend",
            "docker",
            "--ephemeral",
        ])
        .env_remove("DOCKER_HOST")
        .env("HOME", &state)
        .env("XDG_STATE_HOME", &state)
        .env("KERNELBOX_TOKEN", TOKEN)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let outcome = run_to_end(command).await;
    let _ = std::fs::remove_dir_all(&state);
    Some(outcome)
}

/// A server running as the kernel's uid (1000) is refused at start, before it touches the
/// engine.
#[tokio::test]
async fn server_running_as_the_kernel_uid_is_refused() {
    let Some((ok, stderr)) = serve_docker_as(1000, "").await else {
        return;
    };
    assert!(!ok, "{stderr}");
    assert!(stderr.contains("the server's own uid"), "{stderr}");
    assert!(stderr.contains("--kernel-uid"), "{stderr}");
}

/// A non-root server (uid 1001, allowed to use the engine's socket) used to run kernels as its
/// own uid; now the kernel stays uid 1000, and the server is refused at start because it cannot
/// hand session directories to that uid.
#[tokio::test]
async fn a_non_root_server_cannot_hand_over_and_is_refused_at_start() {
    if !engine_answers() {
        eprintln!("SKIPPED: no Docker engine answers");
        return;
    }
    let docker_gid = std::fs::metadata(docker::DEFAULT_SOCKET)
        .map(|m| std::os::unix::fs::MetadataExt::gid(&m).to_string())
        .unwrap_or_default();
    let Some((ok, stderr)) = serve_docker_as(1001, &docker_gid).await else {
        return;
    };
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("cannot hand a session directory to the kernel's uid 1000"),
        "{stderr}"
    );
    assert!(stderr.contains("Run the server as root"), "{stderr}");
}

/// At start the Docker backend logs the engine's seccomp/AppArmor/userns state, and warns about
/// what is missing; an unknown `--runtime` is refused with the runtimes the engine knows.
#[tokio::test]
async fn docker_start_reports_engine_security_and_checks_the_runtime() {
    if !engine_answers() {
        eprintln!("SKIPPED: no Docker engine answers");
        return;
    }
    let state = common::temp_state_dir();
    let seen = serves(serve(&state, &["--backend", "docker", "--ephemeral"])).await;
    assert!(seen.contains("Docker engine security"), "{seen}");
    assert!(seen.contains("seccomp="), "{seen}");
    assert!(seen.contains("userns="), "{seen}");
    let info = std::process::Command::new("docker")
        .args(["info", "--format", "{{json .SecurityOptions}}"])
        .output()
        .expect("docker info");
    let options = String::from_utf8_lossy(&info.stdout);
    if !options.contains("apparmor") && !options.contains("selinux") {
        assert!(seen.contains("lacks protections"), "{seen}");
        assert!(seen.contains("AppArmor/SELinux"), "{seen}");
    }
    let (ok, stderr) = run_to_end(serve(
        &state,
        &["--backend", "docker", "--runtime", "no-such-runtime"],
    ))
    .await;
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("the OCI runtime \"no-such-runtime\" is unavailable"),
        "{stderr}"
    );
    assert!(
        stderr.contains("runc"),
        "the known runtimes are listed: {stderr}"
    );
}

/// `{:?}` of a connection, and of a persisted kernel whose details repeat the key (as the
/// Docker backend's connection file and tcp command line do), never shows the key.
#[test]
fn debug_output_never_contains_the_key() {
    let key = ConnectionInfo::random_key();
    let connection = ConnectionInfo::ipc(Path::new("/tmp/kbt-debug/k"), key.clone());
    let persisted = PersistedKernel {
        backend: "docker".to_owned(),
        session_id: "s1".to_owned(),
        details: serde_json::json!({
            "connection_file": serde_json::to_string(&connection).expect("json"),
            "body": {"Cmd": [format!("--Session.key={key}")]},
        }),
        connection,
    };
    for shown in [
        format!("{:?}", persisted.connection),
        format!("{persisted:?}"),
        format!("{persisted:#?}"),
    ] {
        assert!(!shown.contains(&key), "the key leaked: {shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }
}

/// The OCI runtime the gVisor test uses: `$KERNELBOX_TEST_RUNTIME`, else the first of
/// `runsc-kernelbox`, `runsc` the engine knows.
fn gvisor_runtime() -> Option<String> {
    let out = std::process::Command::new("docker")
        .args(["info", "--format", "{{json .Runtimes}}"])
        .output()
        .ok()?;
    let runtimes: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    if let Ok(wanted) = std::env::var("KERNELBOX_TEST_RUNTIME") {
        return runtimes.get(&wanted).map(|_| wanted);
    }
    ["runsc-kernelbox", "runsc"]
        .into_iter()
        .find(|r| runtimes.get(r).is_some())
        .map(str::to_owned)
}

/// With `--runtime runsc` (gVisor) a session starts and runs a cell, and the kernel sees
/// gVisor's kernel, not the host's. gVisor must be registered with `--network=none
/// --host-uds=create` (the kernel binds its ipc sockets in a host directory), see SECURITY.md.
#[tokio::test]
async fn a_session_runs_under_gvisor_when_registered() {
    if !engine_answers() {
        eprintln!("SKIPPED: no Docker engine answers");
        return;
    }
    let Some(runtime) = gvisor_runtime() else {
        eprintln!(
            "SKIPPED (LOUDLY): no gVisor runtime is registered with the engine (runsc-kernelbox \
             or runsc in daemon.json \"runtimes\"): --runtime is untested here"
        );
        return;
    };
    let state_dir = common::temp_state_dir();
    let sandbox = DockerSandbox::new(DockerConfig {
        state_dir: state_dir.clone(),
        runtime: Some(runtime.clone()),
        ..DockerConfig::default()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let server = common::TestServer::start(Arc::new(sandbox), SessionOptions::default()).await;
    common::run_against(server, async |server| {
        let (_id, mut ws) = server.session().await;
        let cell = ws
            .run("import os; print('release', os.uname().release)")
            .await;
        assert_eq!(cell.status(), "ok", "{:?}", cell.events);
        let host = nix::sys::utsname::uname().expect("uname");
        let host = host.release().to_string_lossy().into_owned();
        let stdout = cell.stdout();
        assert!(stdout.starts_with("release "), "{stdout}");
        assert!(
            !stdout.contains(&host),
            "the kernel sees the host's kernel {host}, not gVisor's: {stdout}"
        );
        eprintln!("kernel under {runtime}: {}", stdout.trim());
    })
    .await;
}

/// `/healthz` (no token) says how isolated kernels are — state names only: the local backend is
/// not isolated; the Docker backend reports the engine's seccomp/AppArmor/userns state and the
/// runtime, and no path.
#[tokio::test]
async fn healthz_reports_isolation_state_names_only() {
    let local = common::TestServer::local().await;
    let body: serde_json::Value = reqwest::get(local.url("/healthz"))
        .await
        .expect("healthz")
        .json()
        .await
        .expect("json");
    local.stop().await;
    assert_eq!(
        body["isolation"],
        serde_json::json!({"isolated": false}),
        "{body}"
    );
    if !engine_answers() {
        eprintln!("SKIPPED (docker part): no Docker engine answers");
        return;
    }
    let sandbox = DockerSandbox::new(DockerConfig {
        state_dir: common::temp_state_dir(),
        ..DockerConfig::default()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let server = common::TestServer::start(Arc::new(sandbox), SessionOptions::default()).await;
    let body: serde_json::Value = reqwest::get(server.url("/healthz"))
        .await
        .expect("healthz")
        .json()
        .await
        .expect("json");
    server.stop().await;
    let isolation = &body["isolation"];
    assert_eq!(isolation["isolated"], true, "{body}");
    for field in ["apparmor", "selinux", "userns", "rootless"] {
        assert!(isolation[field].is_boolean(), "{field}: {body}");
    }
    assert!(isolation["runtime"].is_string(), "{body}");
    assert!(!isolation.to_string().contains('/'), "no paths: {body}");
}
