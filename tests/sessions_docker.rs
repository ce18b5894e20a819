//! Session behaviours against the Docker backend (a hardened container per session, real image).
//! Needs the kernel image: `kernel-image/build.sh`.

mod behaviour;
mod common;

use std::sync::Arc;

use kernelbox::sandbox::docker::{DockerConfig, DockerSandbox};
use kernelbox::session::SessionOptions;

/// A server on the Docker backend with its own state dir (so its own instance id); stopping it
/// shuts every session down and cleans up the instance's containers.
async fn docker_server() -> common::TestServer {
    let sandbox = DockerSandbox::new(DockerConfig {
        state_dir: common::temp_state_dir(),
        ..DockerConfig::default()
    })
    .await
    .unwrap_or_else(|err| panic!("{err} (build the image: kernel-image/build.sh)"));
    common::TestServer::start(Arc::new(sandbox), SessionOptions::default()).await
}

behaviours!(docker_server();
    variables_persist,
    stdout_and_stderr_keep_their_order,
    matplotlib_png_arrives,
    errors_are_reported_and_the_session_survives,
    input_round_trip,
    interrupt_stops_a_long_cell_and_keeps_state,
    restart_clears_state,
    sessions_are_isolated,
    bad_frames_get_errors_and_nothing_breaks,
    a_disconnecting_client_does_not_stop_the_cell,
    cells_run_in_submission_order,
    completion_and_inspection,
    cell_timeout_interrupts,
);

/// A server whose kernels get only 512 MiB.
async fn small_docker_server() -> common::TestServer {
    let sandbox = DockerSandbox::new(DockerConfig {
        state_dir: common::temp_state_dir(),
        memory_bytes: 512 << 20,
        ..DockerConfig::default()
    })
    .await
    .unwrap_or_else(|err| panic!("{err} (build the image: kernel-image/build.sh)"));
    common::TestServer::start(Arc::new(sandbox), SessionOptions::default()).await
}

/// The kernel container of a session, found by its labels.
fn kernel_container(session: &str) -> String {
    let out = std::process::Command::new("docker")
        .args(["ps", "-q", "--filter"])
        .arg(format!("label=kernelbox.session={session}"))
        .args(["--filter", "label=kernelbox.role=kernel"])
        .output()
        .expect("docker ps");
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        !id.is_empty(),
        "no running kernel container for session {session}"
    );
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_memory_is_a_death_event_and_restart_brings_the_session_back() {
    common::run_against(small_docker_server().await, async |server| {
        let (_, mut ws) = server.session().await;
        ws.run("kept_file = open('note.txt', 'w').write('still here')")
            .await;
        let id = ws
            .submit("hog = bytearray(4 << 30)\nhog[::4096] = b'x' * len(hog[::4096])")
            .await;
        let dead = ws.wait_kernel("dead").await;
        assert_eq!(dead["reason"], "out of memory", "{dead}");
        let done = ws
            .until(|e| e["type"] == "done" && e["id"] == id.as_str())
            .await;
        assert_eq!(done["status"], "aborted");
        let refused = ws.run("1").await;
        assert_eq!(refused.status(), "rejected", "{:?}", refused.events);
        ws.send(serde_json::json!({"type": "restart"})).await;
        ws.wait_kernel("idle").await;
        assert_eq!(ws.run("6 * 7").await.result_text().as_deref(), Some("42"));
        let file = ws.run("open('note.txt').read()").await;
        assert_eq!(
            file.result_text().as_deref(),
            Some("'still here'"),
            "files survive the restart"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_killed_from_outside_is_reported_and_restartable() {
    common::run_against(docker_server().await, async |server| {
        let (session, mut ws) = server.session().await;
        let container = kernel_container(&session);
        let killed = std::process::Command::new("docker")
            .args(["kill", &container])
            .status()
            .expect("docker kill");
        assert!(killed.success());
        let dead = ws.wait_kernel("dead").await;
        assert_eq!(dead["reason"], "exited with code 137", "{dead}");
        ws.send(serde_json::json!({"type": "restart"})).await;
        ws.wait_kernel("idle").await;
        assert_eq!(ws.run("1 + 1").await.result_text().as_deref(), Some("2"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_killed_with_sigkill_or_exiting_is_reported_and_restartable() {
    common::run_against(docker_server().await, async |server| {
        let (_, mut ws) = server.session().await;
        ws.submit("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
            .await;
        let dead = ws.wait_kernel("dead").await;
        assert_eq!(dead["reason"], "exited with code 137", "{dead}");
        ws.send(serde_json::json!({"type": "restart"})).await;
        ws.wait_kernel("idle").await;
        ws.submit("import os; os._exit(3)").await;
        let dead = ws.wait_kernel("dead").await;
        assert_eq!(dead["reason"], "exited with code 3", "{dead}");
        ws.send(serde_json::json!({"type": "restart"})).await;
        ws.wait_kernel("idle").await;
        assert_eq!(ws.run("1 + 1").await.result_text().as_deref(), Some("2"));
    })
    .await;
}
