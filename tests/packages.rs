//! Package installs into a session's own environment: at creation (`packages`), on a live
//! session (`install` message, `POST /v1/sessions/{id}/packages`), progress as events, failures
//! reported clearly with the session still usable, and refused unless the operator enabled them.
//! Real installs from the package index (PyPI through this machine's proxy: the host's CA bundle
//! is handed to the installer). Needs the kernel image (`kernel-image/build.sh`).

mod common;

use std::sync::Arc;

use common::{TestServer, Ws};
use kernelbox::sandbox::PackagePolicy;
use kernelbox::sandbox::docker::{DockerConfig, DockerSandbox};
use kernelbox::sandbox::local::LocalSandbox;
use kernelbox::session::SessionOptions;
use serde_json::{Value, json};

/// The host's CA bundle (TLS to the index goes through an intercepting proxy here).
const HOST_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

fn allowed() -> PackagePolicy {
    PackagePolicy {
        allow: true,
        ca_bundle: std::path::Path::new(HOST_CA_BUNDLE)
            .exists()
            .then(|| HOST_CA_BUNDLE.into()),
        ..PackagePolicy::default()
    }
}

async fn docker_server(packages: PackagePolicy) -> TestServer {
    let sandbox = DockerSandbox::new(DockerConfig {
        state_dir: common::temp_state_dir(),
        packages,
        ..DockerConfig::default()
    })
    .await
    .unwrap_or_else(|err| panic!("{err} (build the image: kernel-image/build.sh)"));
    TestServer::start(Arc::new(sandbox), SessionOptions::default()).await
}

/// Runs `body`, then stops the server (removing its containers) even if `body` panicked.
async fn run_against(server: TestServer, body: impl AsyncFnOnce(&TestServer)) {
    use futures::FutureExt;
    let outcome = std::panic::AssertUnwindSafe(body(&server))
        .catch_unwind()
        .await;
    server.stop().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn create_with(server: &TestServer, body: Value) -> reqwest::Response {
    server
        .http()
        .post(server.url("/v1/sessions"))
        .bearer_auth(&server.token)
        .json(&body)
        .send()
        .await
        .expect("POST /v1/sessions")
}

/// The events of install `id` up to its `install_done`.
async fn install_events(ws: &mut Ws, id: &str) -> Vec<Value> {
    let mut events = Vec::new();
    loop {
        let event = ws.next().await;
        if event["id"] != id {
            continue;
        }
        let done = event["type"] == "install_done";
        events.push(event);
        if done {
            return events;
        }
    }
}

fn output_text(events: &[Value]) -> String {
    events
        .iter()
        .filter(|e| e["type"] == "install_output")
        .filter_map(|e| e["text"].as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// `packages` at creation: installed before the first cell runs, which imports it.
async fn packages_at_creation(server: &TestServer) {
    let resp = create_with(server, json!({"packages": ["six"]})).await;
    assert_eq!(resp.status(), 201);
    let id = resp.json::<Value>().await.expect("json")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    // From the start: the install's events are buffered for late subscribers.
    let mut ws = server.ws_since(&id, 0).await;
    let cell = ws.submit("import six; print(six.__name__)").await;
    let events = install_events(&mut ws, "packages").await;
    assert_eq!(events[0]["type"], "install_started", "{events:?}");
    assert_eq!(events[0]["packages"], json!(["six"]));
    let done = events.last().expect("install_done");
    assert_eq!(done["status"], "ok", "{}", output_text(&events));
    assert!(
        output_text(&events).contains("Successfully installed six"),
        "pip's output is streamed: {}",
        output_text(&events)
    );
    let cell = ws.collect(&cell).await;
    assert_eq!(cell.status(), "ok", "{:?}", cell.events);
    assert_eq!(cell.stdout(), "six\n");
    // The cell waited for the install.
    assert!(cell.events.last().expect("done")["seq"].as_u64() > done["seq"].as_u64());

    // Installed packages live in the working dir: a restarted kernel still has them.
    ws.send(json!({"type": "restart"})).await;
    ws.wait_kernel("restarting").await;
    ws.wait_kernel("idle").await;
    let cell = ws.run("import six; print(six.__name__)").await;
    assert_eq!(cell.stdout(), "six\n", "{:?}", cell.events);
}

/// An install on a live session (WebSocket and REST): variables survive, the package imports.
async fn install_on_a_live_session(server: &TestServer) {
    let (id, mut ws) = server.session().await;
    ws.run("x = 41").await;
    ws.send(json!({"type": "install", "id": "i1", "packages": ["toolz"]}))
        .await;
    let events = install_events(&mut ws, "i1").await;
    let done = events.last().expect("install_done");
    assert_eq!(done["status"], "ok", "{}", output_text(&events));
    let cell = ws.run("import toolz; print(toolz.__name__, x + 1)").await;
    assert_eq!(cell.stdout(), "toolz 42\n", "{:?}", cell.events);

    let resp = server
        .http()
        .post(server.url(&format!("/v1/sessions/{id}/packages")))
        .bearer_auth(&server.token)
        .json(&json!({"packages": ["tabulate"]}))
        .send()
        .await
        .expect("POST packages");
    assert_eq!(resp.status(), 202);
    let install = resp.json::<Value>().await.expect("json")["id"]
        .as_str()
        .expect("install id")
        .to_owned();
    let events = install_events(&mut ws, &install).await;
    assert_eq!(events.last().expect("done")["status"], "ok");
    let cell = ws.run("import tabulate; print(tabulate.__name__)").await;
    assert_eq!(cell.stdout(), "tabulate\n", "{:?}", cell.events);
}

/// A package that does not exist fails with pip's own message; the session runs cells after.
/// Requirements that are not plain names are refused before pip runs.
async fn a_bad_package_fails_clearly(server: &TestServer) {
    let (id, mut ws) = server.session().await;
    ws.run("y = 7").await;
    ws.send(json!({"type": "install", "id": "bad", "packages": ["kernelbox-no-such-package-x9"]}))
        .await;
    let events = install_events(&mut ws, "bad").await;
    let error = events
        .iter()
        .find(|e| e["type"] == "error")
        .expect("an error event");
    assert_eq!(error["ename"], "InstallError");
    let message = error["evalue"].as_str().unwrap_or_default();
    assert!(
        message.contains("No matching distribution found for kernelbox-no-such-package-x9"),
        "{message}"
    );
    let done = events.last().expect("install_done");
    assert_eq!(done["status"], "error");
    assert_eq!(done["message"], error["evalue"]);
    let cell = ws.run("print(y * 6)").await;
    assert_eq!(cell.stdout(), "42\n");

    // Options, paths and URLs never reach pip.
    ws.send(json!({"type": "install", "id": "evil", "packages": ["--index-url=http://x/"]}))
        .await;
    let rejected = ws.until(|e| e["id"] == "evil").await;
    assert_eq!(rejected["type"], "error");
    assert_eq!(rejected["ename"], "Rejected");
    assert!(
        rejected["evalue"]
            .as_str()
            .is_some_and(|m| m.contains("invalid package")),
        "{rejected}"
    );
    let resp = server
        .http()
        .post(server.url(&format!("/v1/sessions/{id}/packages")))
        .bearer_auth(&server.token)
        .json(&json!({"packages": ["./local/dir"]}))
        .send()
        .await
        .expect("POST packages");
    assert_eq!(resp.status(), 400);
}

/// Without the operator's consent, installs are refused with a message saying how to enable
/// them, and no kernel is started for such a session.
async fn installs_are_refused_unless_enabled(server: &TestServer) {
    let resp = create_with(server, json!({"packages": ["six"]})).await;
    assert_eq!(resp.status(), 403);
    let body: Value = resp.json().await.expect("json");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|m| m.contains("--allow-package-installs")),
        "{body}"
    );
    assert!(server.sessions.list().is_empty());
    let (id, mut ws) = server.session().await;
    ws.send(json!({"type": "install", "id": "no", "packages": ["six"]}))
        .await;
    let rejected = ws.until(|e| e["id"] == "no").await;
    assert_eq!(rejected["type"], "error");
    assert!(
        rejected["evalue"]
            .as_str()
            .is_some_and(|m| m.contains("disabled")),
        "{rejected}"
    );
    let resp = server
        .http()
        .post(server.url(&format!("/v1/sessions/{id}/packages")))
        .bearer_auth(&server.token)
        .json(&json!({"packages": ["six"]}))
        .send()
        .await
        .expect("POST packages");
    assert_eq!(resp.status(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_packages_at_creation() {
    run_against(docker_server(allowed()).await, packages_at_creation).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_install_on_a_live_session() {
    run_against(docker_server(allowed()).await, install_on_a_live_session).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_a_bad_package_fails_clearly() {
    run_against(docker_server(allowed()).await, a_bad_package_fails_clearly).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_installs_are_refused_unless_enabled() {
    run_against(
        docker_server(PackagePolicy::default()).await,
        installs_are_refused_unless_enabled,
    )
    .await;
}

/// The Docker kernel itself never has network access, even while an install runs for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_the_kernel_stays_offline() {
    run_against(docker_server(allowed()).await, async |server| {
        let (_, mut ws) = server.session().await;
        ws.send(json!({"type": "install", "id": "i", "packages": ["toolz"]}))
            .await;
        let cell = ws
            .run(
                "import socket\n\
                 try:\n    socket.create_connection(('1.1.1.1', 443), timeout=3); print('online')\n\
                 except OSError:\n    print('offline')",
            )
            .await;
        assert_eq!(cell.stdout(), "offline\n");
        let events = install_events(&mut ws, "i").await;
        assert_eq!(events.last().expect("done")["status"], "ok");
    })
    .await;
}

/// pip runs with the network, so nothing the session wrote may run in the installer: a `pip/`
/// package, a `sitecustomize.py` or a `usercustomize.py` in the working dir (pip's old current
/// directory) would have stood in for pip or run before it, leaving a marker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_an_install_runs_no_code_from_the_working_dir() {
    run_against(docker_server(allowed()).await, async |server| {
        let (_, mut ws) = server.session().await;
        let plant = ws
            .run(
                r#"
import os
marker = "open(os.path.join('/home/kernel/work', 'RAN-' + __name__), 'w')"
os.makedirs('pip', exist_ok=True)
for name in ('pip/__init__.py', 'pip/__main__.py', 'sitecustomize.py', 'usercustomize.py'):
    open(name, 'w').write('import os\n' + marker + '\n')
print(sorted(os.listdir('.')))
"#,
            )
            .await;
        assert_eq!(plant.status(), "ok", "{:?}", plant.events);
        ws.send(json!({"type": "install", "id": "i", "packages": ["six"]}))
            .await;
        let events = install_events(&mut ws, "i").await;
        assert_eq!(
            events.last().expect("done")["status"],
            "ok",
            "{}",
            output_text(&events)
        );
        assert!(
            output_text(&events).contains("Successfully installed six"),
            "the real pip ran: {}",
            output_text(&events)
        );
        let cell = ws
            .run("import glob; print(sorted(glob.glob('/home/kernel/work/RAN-*')))")
            .await;
        assert_eq!(
            cell.stdout(),
            "[]\n",
            "the session's code ran in the installer"
        );
    })
    .await;
}

/// A Jupyter client's kernel gets packages through the same endpoint and imports them over the
/// Jupyter protocol (the session refreshes the kernel's import caches for it too).
async fn jupyter_kernels_install_packages(server: &TestServer) {
    let resp = server
        .http()
        .post(server.url("/api/kernels"))
        .bearer_auth(&server.token)
        .json(&json!({"name": "python3"}))
        .send()
        .await
        .expect("POST /api/kernels");
    assert_eq!(resp.status(), 201);
    let id = resp.json::<Value>().await.expect("json")["id"]
        .as_str()
        .expect("kernel id")
        .to_owned();
    let base = format!("ws://{}/api/kernels/{id}/channels", server.addr);
    let mut jupyter = common::jupyter::JupyterWs::connect(&base, "pkg-test", &server.token).await;
    let warm = jupyter.execute("import sys").await;
    assert_eq!(warm.reply["content"]["status"], "ok");
    let mut events = server.ws_since(&id, 0).await;
    let resp = server
        .http()
        .post(server.url(&format!("/v1/sessions/{id}/packages")))
        .bearer_auth(&server.token)
        .json(&json!({"packages": ["humanize"], "id": "j1"}))
        .send()
        .await
        .expect("POST packages");
    assert_eq!(resp.status(), 202);
    let done = install_events(&mut events, "j1").await;
    assert_eq!(done.last().expect("done")["status"], "ok");
    let run = jupyter
        .execute("import humanize; print(humanize.__name__)")
        .await;
    assert_eq!(run.reply["content"]["status"], "ok", "{:?}", run.reply);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_packages_at_creation_and_on_a_live_session() {
    let sandbox = LocalSandbox::new(common::python(), common::temp_state_dir())
        .expect("local")
        .with_packages(allowed());
    let server = TestServer::start(Arc::new(sandbox), SessionOptions::default()).await;
    run_against(server, async |server| {
        packages_at_creation(server).await;
        install_on_a_live_session(server).await;
        jupyter_kernels_install_packages(server).await;
    })
    .await;
}
