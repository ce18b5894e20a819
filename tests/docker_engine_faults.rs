//! The Docker engine going away and coming back (real engine, real kernel image): requests that
//! need the engine answer 503 saying the engine is unreachable, running kernels go on, a kernel
//! that dies meanwhile is reported, and everything works again once the engine answers — without
//! restarting the server. The real engine is never stopped: the server reaches it through a unix
//! socket proxy that the test stops and starts. Needs the kernel image: `kernel-image/build.sh`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use kernelbox::sandbox::SandboxError;
use kernelbox::sandbox::docker::{DockerConfig, DockerSandbox};
use kernelbox::session::SessionOptions;
use serde_json::{Value, json};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

/// The real engine's unix socket (`DOCKER_HOST` when it names one).
fn engine_socket() -> PathBuf {
    std::env::var("DOCKER_HOST")
        .ok()
        .and_then(|host| host.strip_prefix("unix://").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/var/run/docker.sock"))
}

/// A unix socket at `path` that forwards every connection to the real engine while it runs.
/// Stopping it closes every connection and removes the socket: to its clients, the engine is gone.
struct EngineProxy {
    path: PathBuf,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl EngineProxy {
    fn start(path: &Path) -> Self {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).expect("bind the proxy socket");
        let tasks: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let conns = tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let conn = tokio::spawn(async move {
                    if let Ok(mut engine) = UnixStream::connect(engine_socket()).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut engine).await;
                    }
                });
                if let Ok(mut conns) = conns.lock() {
                    conns.push(conn);
                }
            }
        });
        tasks.lock().expect("lock").push(accept);
        Self {
            path: path.to_owned(),
            tasks,
        }
    }

    fn stop(&self) {
        for task in self.tasks.lock().expect("lock").drain(..) {
            task.abort();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for EngineProxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs the docker CLI (on the real engine) and returns its stdout, trimmed.
fn docker(args: &[&str]) -> String {
    let out = std::process::Command::new("docker")
        .args(args)
        .output()
        .expect("run the docker CLI");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

async fn post_session(server: &common::TestServer) -> (u16, Value) {
    let resp = server
        .http()
        .post(server.url("/v1/sessions"))
        .bearer_auth(&server.token)
        .send()
        .await
        .expect("POST /v1/sessions");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_bogus_engine_address_is_refused_at_start_with_what_to_do() {
    let err = DockerSandbox::new(DockerConfig {
        docker_host: Some("unix:///nonexistent/kernelbox/docker.sock".to_owned()),
        // Never created: the engine is asked first.
        state_dir: PathBuf::from("/nonexistent/kernelbox/state"),
        ..DockerConfig::default()
    })
    .await
    .expect_err("no engine there");
    assert!(matches!(err, SandboxError::Unavailable { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("the Docker engine"), "{message}");
    assert!(
        message.contains("DOCKER_HOST"),
        "says what to set: {message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_engine_is_unreachable_creation_is_a_503_and_all_recovers_when_it_is_back() {
    let state_dir = common::temp_state_dir();
    let socket = state_dir.join("docker.sock");
    let proxy = EngineProxy::start(&socket);
    let sandbox = DockerSandbox::new(DockerConfig {
        docker_host: Some(format!("unix://{}", socket.display())),
        state_dir: state_dir.clone(),
        ..DockerConfig::default()
    })
    .await
    .unwrap_or_else(|err| panic!("{err} (build the image: kernel-image/build.sh)"));
    let instance = format!("label=kernelbox.instance={}", sandbox.instance_id());
    let server = common::TestServer::start(Arc::new(sandbox), SessionOptions::default()).await;

    let outcome = std::panic::AssertUnwindSafe(async {
        let (session, mut ws) = server.session().await;
        ws.run("x = 1").await;
        let doomed = server.create_session().await;

        // The engine goes away.
        proxy.stop();
        let (status, body) = post_session(&server).await;
        assert_eq!(status, 503, "{body}");
        let message = body["error"].as_str().unwrap_or_default();
        assert!(
            message.starts_with("the Docker engine is unreachable: "),
            "the message says what is wrong: {message}"
        );

        // The same through the Jupyter API, in the shape Jupyter clients read.
        let resp = server
            .http()
            .post(server.url("/api/kernels"))
            .bearer_auth(&server.token)
            .json(&json!({"name": "python3"}))
            .send()
            .await
            .expect("POST /api/kernels");
        assert_eq!(resp.status(), 503);
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        let message = body["message"].as_str().unwrap_or_default();
        assert!(
            message.starts_with("the Docker engine is unreachable: "),
            "{body}"
        );

        // A session deleted meanwhile is gone for clients at once; its containers go once the
        // engine is back (below).
        let deleted = server
            .http()
            .delete(server.url(&format!("/v1/sessions/{doomed}")))
            .bearer_auth(&server.token)
            .send()
            .await
            .expect("DELETE");
        assert_eq!(deleted.status(), 204);

        // A running kernel does not need the engine.
        let cell = ws.run("x + 1").await;
        assert_eq!(
            cell.result_text().as_deref(),
            Some("2"),
            "{:?}",
            cell.events
        );

        // A kernel that dies meanwhile is reported; restarting it needs the engine and says so.
        let label = format!("label=kernelbox.session={session}");
        let kernel = docker(&[
            "ps",
            "-q",
            "--filter",
            &label,
            "--filter",
            "label=kernelbox.role=kernel",
        ]);
        docker(&["kill", &kernel]);
        let dead = ws.wait_kernel("dead").await;
        assert!(
            dead["reason"].as_str().is_some_and(|r| !r.is_empty()),
            "{dead}"
        );
        ws.send(json!({"type": "restart"})).await;
        let dead = ws.wait_kernel("dead").await;
        let reason = dead["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("the Docker engine is unreachable"),
            "the restart failure says why: {dead}"
        );

        // The engine is back: the same server creates sessions and restarts kernels again.
        let _back = EngineProxy::start(&socket);
        let (status, body) = post_session(&server).await;
        assert_eq!(status, 201, "{body}");
        let doomed = format!("label=kernelbox.session={doomed}");
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        while !docker(&["ps", "-aq", "--filter", &doomed]).is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the deleted session's containers were not removed once the engine was back"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        ws.send(json!({"type": "restart"})).await;
        ws.wait_kernel("idle").await;
        let cell = ws.run("1 + 1").await;
        assert_eq!(
            cell.result_text().as_deref(),
            Some("2"),
            "{:?}",
            cell.events
        );

        // And it watches its containers again: a kill is reported with the container's exit.
        let kernel = docker(&[
            "ps",
            "-q",
            "--filter",
            &label,
            "--filter",
            "label=kernelbox.role=kernel",
        ]);
        docker(&["kill", &kernel]);
        let dead = ws.wait_kernel("dead").await;
        assert_eq!(dead["reason"], "exited with code 137", "{dead}");
    })
    .catch_unwind()
    .await;

    // Clean up through an engine that answers, whatever happened.
    let _proxy = EngineProxy::start(&socket);
    server.stop().await;
    for id in docker(&["ps", "-aq", "--filter", &instance]).lines() {
        docker(&["rm", "-f", "-v", id]);
    }
    let _ = std::fs::remove_dir_all(&state_dir);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}
