//! Faults that must lose nothing and leave nothing stuck (issue 13), each reproduced against
//! a real ipykernel (the local backend; the Docker one where it matters).

mod common;

use std::time::Duration;

use common::{TestServer, run_against};
use serde_json::json;

/// A generous bound for what must happen "promptly" (a loaded 2-core machine).
const PROMPTLY: Duration = Duration::from_secs(20);

/// A kernel that stops reading its shell socket must not block the session: a cell sleeps
/// (ipykernel's shell thread is busy, its shell socket's queue fills), a flood of `complete`
/// requests fills it past what the socket buffers, then an interrupt must still stop the cell
/// and `DELETE` must still close the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooded_shell_socket_does_not_block_interrupt_or_close() {
    run_against(TestServer::local().await, async |server| {
        let (id, mut ws) = server.session().await;
        let cell = ws.submit("import time; time.sleep(60)").await;
        ws.until(|e| e["type"] == "kernel" && e["state"] == "busy")
            .await;
        // Long code makes each request big, so the socket buffers fill sooner.
        let code = format!("x = 1\n# {}\nimport o", "p".repeat(4000));
        for i in 0..2000 {
            let cursor = code.chars().count();
            ws.send(
                json!({"type": "complete", "id": format!("c{i}"), "code": code, "cursor": cursor}),
            )
            .await;
        }
        ws.send(json!({"type": "interrupt"})).await;
        // The interrupt reaches the kernel (control is its own socket and thread) and the
        // session goes on relaying: the KeyboardInterrupt arrives. (The cell's `execute_reply`
        // may come much later: ipykernel's shell thread answers the flood first.)
        let mut refused = 0;
        let mut interrupts_refused = 0;
        let interrupted = tokio::time::timeout(PROMPTLY, async {
            loop {
                let e = ws.next().await;
                if e["id"] == cell.as_str() && e["type"] == "error" {
                    return e;
                }
                if e["type"] == "error" && e["id"].is_null() {
                    // The interrupt shares the session's bounded command queue with the flood:
                    // when the flood filled it, the interrupt is refused ("overloaded") and, as
                    // a client should, sent again.
                    interrupts_refused += 1;
                    ws.send(json!({"type": "interrupt"})).await;
                } else if e["type"] == "rejected" || e["type"] == "error" {
                    refused += 1;
                }
            }
        })
        .await
        .expect("the interrupt did not stop the cell promptly");
        assert_eq!(interrupted["ename"], "KeyboardInterrupt", "{interrupted}");
        eprintln!("requests refused: {refused}; interrupts refused: {interrupts_refused}");

        let delete = server
            .http()
            .delete(server.url(&format!("/v1/sessions/{id}")))
            .bearer_auth(&server.token)
            .send();
        let resp = tokio::time::timeout(PROMPTLY, delete)
            .await
            .expect("DELETE did not return promptly")
            .expect("DELETE");
        assert!(resp.status().is_success(), "DELETE: {}", resp.status());
        // Nothing is left waiting: the cell is finished (by its reply or by the close).
        let done = ws.collect(&cell).await;
        assert!(!done.status().is_empty(), "{:?}", done.events.last());
    })
    .await;
}

/// A cell whose iopub `idle` is lost still finishes: `done` comes `IDLE_GRACE` (2 s) after its
/// `execute_reply`, saying `idle_lost`, and the session is not left busy.
///
/// How the idle is really lost: the server's reader lags, as CPU starvation or a pause of the
/// server would make it. This test runs the server on a single-threaded runtime and blocks that
/// thread (`std::thread::sleep`) while the cell prints 20,000 flushed lines, so nothing reads
/// the kernel's iopub socket; ipykernel's XPUB queues 1,000 messages (plus what the socket
/// buffers) and silently drops the rest, the cell's final `idle` among them. The cell writes a
/// marker file once its loop is done; the thread is released a second after it appears.
#[tokio::test(flavor = "current_thread")]
async fn a_cell_whose_idle_is_lost_still_finishes() {
    run_against(TestServer::local().await, async |server| {
        let (_id, mut ws) = server.session().await;
        let marker = common::temp_state_dir().join("flood-done");
        let code = format!(
            "import pathlib\nfor i in range(20000):\n    print(i, flush=True)\n\
             pathlib.Path({:?}).write_text('1')",
            marker.display().to_string()
        );
        let cell = ws.submit(&code).await;
        ws.until(|e| e["type"] == "kernel" && e["state"] == "busy")
            .await;
        // Block the server (this is its only thread) until the kernel is done with the cell.
        let blocked = std::time::Instant::now();
        while !marker.exists() && blocked.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(marker.exists(), "the cell did not finish its loop");
        std::thread::sleep(Duration::from_secs(1));

        let done = tokio::time::timeout(PROMPTLY, ws.collect(&cell))
            .await
            .expect("the cell never finished: its lost idle left it running");
        let done = done.events.last().cloned().unwrap_or_default();
        assert_eq!(done["status"], "ok", "{done}");
        assert_eq!(done["idle_lost"], true, "{done}");

        // The session is idle again and runs the next cell normally.
        let next = ws.run("1+1").await;
        assert_eq!(next.result_text().as_deref(), Some("2"));
        assert!(
            next.events
                .last()
                .is_some_and(|d| d.get("idle_lost").is_none())
        );
    })
    .await;
}

/// Session options whose kernels' heartbeat is given up on after 3 × 200 ms (the default is
/// 3 × 2 s).
fn quick_heartbeat() -> kernelbox::session::SessionOptions {
    kernelbox::session::SessionOptions {
        client: kernelbox::kernel::ClientOptions {
            heartbeat_interval: Duration::from_millis(200),
            heartbeat_misses: 3,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// A local-backend server with `quick_heartbeat`.
async fn quick_heartbeat_server() -> TestServer {
    use kernelbox::sandbox::local::LocalSandbox;
    let sandbox = LocalSandbox::new(common::python(), common::temp_state_dir()).expect("sandbox");
    TestServer::start(std::sync::Arc::new(sandbox), quick_heartbeat()).await
}

/// The kernel's process id, asked of the kernel itself.
async fn kernel_pid(ws: &mut common::Ws) -> nix::unistd::Pid {
    let pid = ws.run("import os; os.getpid()").await.result_text();
    let pid: i32 = pid.and_then(|p| p.parse().ok()).expect("a pid");
    nix::unistd::Pid::from_raw(pid)
}

/// Stops the kernel with `stop` well past the heartbeat timeout, then resumes it with
/// `resume`: the session must never report it dead, must say it was unresponsive and then
/// recovered, and must keep its variables.
async fn a_stopped_kernel_is_kept(ws: &mut common::Ws, stop: impl FnOnce(), resume: impl FnOnce()) {
    ws.run("x = 42").await;
    stop();
    // Heartbeat lost after ~0.6 s; the control probe gets a second; more than both.
    let unresponsive = tokio::time::timeout(
        Duration::from_secs(4),
        ws.until(|e| {
            e["type"] == "kernel"
                && (e["state"] == "dead"
                    || e["reason"]
                        .as_str()
                        .is_some_and(|r| r.starts_with("unresponsive")))
        }),
    )
    .await;
    resume();
    let unresponsive = unresponsive.expect("the stopped kernel was not reported unresponsive");
    assert_ne!(unresponsive["state"], "dead", "{unresponsive}");

    let recovered = tokio::time::timeout(
        PROMPTLY,
        ws.until(|e| e["type"] == "kernel" && e["reason"].is_string()),
    )
    .await
    .expect("no recovery reported");
    assert_ne!(recovered["state"], "dead", "{recovered}");
    assert!(
        recovered["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("recovered")),
        "{recovered}"
    );
    let x = ws.run("x").await;
    assert_eq!(x.result_text().as_deref(), Some("42"), "{:?}", x.events);
}

/// A missed heartbeat is not a death when the kernel is only stopped (as a GC pause or CPU
/// starvation would make it): SIGSTOP the local kernel process, then SIGCONT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_kernel_is_not_declared_dead() {
    use nix::sys::signal::{Signal, kill};
    run_against(quick_heartbeat_server().await, async |server| {
        let (_id, mut ws) = server.session().await;
        let pid = kernel_pid(&mut ws).await;
        let stop = || kill(pid, Signal::SIGSTOP).expect("SIGSTOP");
        let resume = || kill(pid, Signal::SIGCONT).expect("SIGCONT");
        a_stopped_kernel_is_kept(&mut ws, stop, resume).await;
    })
    .await;
}

/// The same on the Docker backend: `docker pause` freezes every process of the kernel's
/// container (the container still runs), `docker unpause` thaws them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_docker_kernel_is_not_declared_dead() {
    use kernelbox::sandbox::docker::{DockerConfig, DockerSandbox};
    let sandbox = DockerSandbox::new(DockerConfig {
        state_dir: common::temp_state_dir(),
        ..DockerConfig::default()
    })
    .await
    .unwrap_or_else(|err| panic!("{err} (build the image: kernel-image/build.sh)"));
    let server = TestServer::start(std::sync::Arc::new(sandbox), quick_heartbeat()).await;
    run_against(server, async |server| {
        let (id, mut ws) = server.session().await;
        let out = std::process::Command::new("docker")
            .args(["ps", "-q", "--filter"])
            .arg(format!("label=kernelbox.session={id}"))
            .args(["--filter", "label=kernelbox.role=kernel"])
            .output()
            .expect("docker ps");
        let container = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(!container.is_empty(), "no kernel container for {id}");
        let docker = |verb: &str| {
            let status = std::process::Command::new("docker")
                .args([verb, &container])
                .status()
                .expect("docker");
            assert!(status.success(), "docker {verb} failed");
        };
        a_stopped_kernel_is_kept(&mut ws, || docker("pause"), || docker("unpause")).await;
    })
    .await;
}

/// A real death is still one: SIGKILL the kernel and the session reports it dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_kernel_is_still_declared_dead() {
    use nix::sys::signal::{Signal, kill};
    run_against(quick_heartbeat_server().await, async |server| {
        let (_id, mut ws) = server.session().await;
        let pid = kernel_pid(&mut ws).await;
        kill(pid, Signal::SIGKILL).expect("SIGKILL");
        let dead = tokio::time::timeout(PROMPTLY, ws.wait_kernel("dead"))
            .await
            .expect("the killed kernel was not reported dead");
        assert!(dead["reason"].is_string(), "{dead}");
    })
    .await;
}
