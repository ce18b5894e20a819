//! Observability against a real server with real (local) kernels: `/metrics` (Prometheus text),
//! `/readyz`, `/healthz`, and what the logs say about a cell (and never say).
//!
//! The metrics recorder and the log subscriber are process-wide, so the tests of this binary
//! take turns ([`serial`]) and compare metric values before and after what they do.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::{TestServer, python, temp_state_dir};
use kernelbox::sandbox::local::LocalSandbox;
use kernelbox::sandbox::{KernelProcess, LaunchSpec, Sandbox, SandboxError};
use kernelbox::session::SessionOptions;
use serde_json::{Value, json};

/// Everything the server logged (JSON lines, `kernelbox=debug`), from the process-wide
/// subscriber this binary installs.
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_env_filter(tracing_subscriber::EnvFilter::new("kernelbox=debug"))
            .with_writer(move || SharedWriter(writer.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("install the log subscriber");
        buffer
    })
}

struct SharedWriter(Arc<Mutex<Vec<u8>>>);

impl Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the recorder and the log subscriber, and makes the tests of this binary take turns
/// (they share both).
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let guard = SERIAL.lock().await;
    kernelbox::api::metrics::install().expect("install the metrics recorder");
    let _ = logs();
    guard
}

async fn scrape(server: &TestServer) -> String {
    let resp = server
        .http()
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(resp.status(), 200, "/metrics needs no token");
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    resp.text().await.expect("metrics text")
}

/// The value of one series (`name` or `name{label="value"}`), 0 when absent.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .map_or(0.0, |v| v.trim().parse().expect("a metric value"))
}

async fn readyz(server: &TestServer) -> (u16, Value) {
    let resp = server
        .http()
        .get(server.url("/readyz"))
        .send()
        .await
        .expect("GET /readyz");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("/readyz is JSON"))
}

fn local_server_options(pool_size: usize) -> (Arc<dyn Sandbox>, SessionOptions) {
    let sandbox = LocalSandbox::new(python(), temp_state_dir()).expect("sandbox");
    let options = SessionOptions {
        pool_size,
        ..SessionOptions::default()
    };
    (Arc::new(sandbox), options)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_cells_clients_bytes_and_kernels() {
    let _turn = serial().await;
    let server = TestServer::local().await;
    common::run_against(server, async |server| {
        let before = scrape(server).await;
        for family in [
            "kernelbox_sessions",
            "kernelbox_pool_ready",
            "kernelbox_pool_target",
        ] {
            assert!(
                before.contains(&format!("# HELP {family} ")),
                "no help for {family}:\n{before}"
            );
        }

        let (id, mut ws) = server.session().await;
        let cell = ws.run("print('hello'); 6 * 7").await;
        assert_eq!(cell.status(), "ok");
        let failing = ws.run("1/0").await;
        assert_eq!(failing.status(), "error");
        // `done` goes out just before the state returns to idle.
        ws.wait_kernel("idle").await;

        let during = scrape(server).await;
        if std::env::var_os("KB_TRACE").is_some() {
            eprintln!("{during}");
        }
        for family in [
            "kernelbox_executions_total",
            "kernelbox_execute_duration_seconds",
            "kernelbox_kernel_starts_total",
            "kernelbox_relayed_bytes_total",
            "kernelbox_ws_clients",
        ] {
            assert!(
                during.contains(&format!("# HELP {family} ")),
                "no help for {family}:\n{during}"
            );
        }
        let ok = r#"kernelbox_executions_total{outcome="ok"}"#;
        let error = r#"kernelbox_executions_total{outcome="error"}"#;
        assert!(value(&during, ok) >= value(&before, ok) + 1.0, "{during}");
        assert!(
            value(&during, error) >= value(&before, error) + 1.0,
            "{during}"
        );
        let count = "kernelbox_execute_duration_seconds_count";
        assert!(
            value(&during, count) >= value(&before, count) + 2.0,
            "{during}"
        );
        assert!(
            during.contains(r#"kernelbox_execute_duration_seconds_bucket{le="0.001"}"#)
                && during.contains(r#"kernelbox_execute_duration_seconds_bucket{le="60"}"#),
            "histogram buckets from 1 ms to 60 s and beyond:\n{during}"
        );
        let cold = r#"kernelbox_kernel_starts_total{kind="cold"}"#;
        assert!(
            value(&during, cold) >= value(&before, cold) + 1.0,
            "{during}"
        );
        let bytes = r#"kernelbox_relayed_bytes_total{front="native"}"#;
        assert!(value(&during, bytes) > value(&before, bytes), "{during}");
        let clients = r#"kernelbox_ws_clients{front="native"}"#;
        let connected = value(&during, clients);
        assert!(connected >= 1.0, "{during}");
        assert_eq!(value(&during, r#"kernelbox_sessions{state="idle"}"#), 1.0);
        assert_eq!(value(&during, r#"kernelbox_sessions{state="busy"}"#), 0.0);
        assert!(!during.contains(&id), "no session ids in metrics");

        // A restart is counted as the old kernel's end and a new start.
        ws.send(json!({"type": "restart"})).await;
        ws.wait_kernel("restarting").await;
        ws.wait_kernel("idle").await;
        let restarted = scrape(server).await;
        let requested = r#"kernelbox_kernel_deaths_total{reason="restart_requested"}"#;
        assert!(value(&restarted, requested) >= value(&before, requested) + 1.0);
        let restart = r#"kernelbox_kernel_starts_total{kind="restart"}"#;
        assert!(value(&restarted, restart) >= value(&before, restart) + 1.0);

        // The client leaves: the gauge goes down.
        drop(ws);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = scrape(server).await;
            if value(&now, clients) < connected {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "ws client gauge stayed up:\n{now}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // Closing the session ends its kernel.
        let resp = server
            .http()
            .delete(server.url(&format!("/v1/sessions/{id}")))
            .bearer_auth(&server.token)
            .send()
            .await
            .expect("DELETE");
        assert!(resp.status().is_success());
        let after = scrape(server).await;
        let closed = r#"kernelbox_kernel_deaths_total{reason="closed"}"#;
        assert!(
            value(&after, closed) >= value(&before, closed) + 1.0,
            "{after}"
        );
        assert_eq!(value(&after, r#"kernelbox_sessions{state="idle"}"#), 0.0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jupyter_clients_are_counted_per_front() {
    let _turn = serial().await;
    let server = TestServer::local().await;
    common::run_against(server, async |server| {
        let id = server.create_session().await;
        let before = scrape(server).await;
        let base = format!("ws://{}/api/kernels/{id}/channels", server.addr);
        let mut ws = common::jupyter::JupyterWs::connect(&base, "obs", &server.token).await;
        let reply = ws.request("kernel_info_request", json!({})).await;
        assert_eq!(reply["msg_type"], "kernel_info_reply");
        let during = scrape(server).await;
        let clients = r#"kernelbox_ws_clients{front="jupyter"}"#;
        assert!(value(&during, clients) >= 1.0, "{during}");
        let bytes = r#"kernelbox_relayed_bytes_total{front="jupyter"}"#;
        assert!(value(&during, bytes) > value(&before, bytes), "{during}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_readyz_answer_without_a_pool() {
    let _turn = serial().await;
    let server = TestServer::local().await;
    common::run_against(server, async |server| {
        let health = server
            .http()
            .get(server.url("/healthz"))
            .send()
            .await
            .expect("GET /healthz");
        assert_eq!(health.status(), 200);
        let (status, body) = readyz(server).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["status"], "ready");
        assert_eq!(body["backend"]["name"], "local");
        assert_eq!(body["backend"]["reachable"], true);
        assert_eq!(body["pool"]["target"], 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_waits_for_the_warm_pool() {
    let _turn = serial().await;
    let (sandbox, options) = local_server_options(1);
    let server = TestServer::start(sandbox, options).await;
    common::run_against(server, async |server| {
        // A kernel takes far longer to start than this request.
        let (status, body) = readyz(server).await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["status"], "not ready");
        assert_eq!(body["pool"]["target"], 1);
        assert!(
            body["not_ready"][0]
                .as_str()
                .is_some_and(|s| s.contains("warm pool")),
            "{body}"
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, body) = readyz(server).await;
            if status == 200 {
                assert_eq!(body["pool"]["ready"], 1);
                break;
            }
            assert!(Instant::now() < deadline, "the pool never filled: {body}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let text = scrape(server).await;
        assert_eq!(value(&text, "kernelbox_pool_ready"), 1.0, "{text}");
        assert_eq!(value(&text, "kernelbox_pool_target"), 1.0, "{text}");
        assert!(value(&text, r#"kernelbox_kernel_starts_total{kind="pool"}"#) >= 1.0);
    })
    .await;
}

/// A backend whose engine never answers.
struct Unreachable;

const ENGINE_SECRET: &str = "unix:///secret/engine.sock";

#[async_trait]
impl Sandbox for Unreachable {
    fn name(&self) -> &'static str {
        "stub"
    }
    async fn launch(&self, _: &LaunchSpec) -> Result<Box<dyn KernelProcess>, SandboxError> {
        Err(SandboxError::Launch("unreachable".into()))
    }
    async fn ready(&self) -> Result<(), SandboxError> {
        Err(SandboxError::Unreachable {
            what: "the stub engine",
            reason: format!("cannot connect to {ENGINE_SECRET}"),
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_reports_an_unreachable_backend() {
    let _turn = serial().await;
    let server = TestServer::start(Arc::new(Unreachable), SessionOptions::default()).await;
    common::run_against(server, async |server| {
        let (status, body) = readyz(server).await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["backend"]["reachable"], false);
        assert!(
            body["not_ready"][0]
                .as_str()
                .is_some_and(|s| s.contains("stub backend")),
            "{body}"
        );
        assert!(
            !body.to_string().contains(ENGINE_SECRET),
            "the engine's error stays in the logs: {body}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_have_a_span_per_cell_and_never_the_code_or_output() {
    let _turn = serial().await;
    let server = TestServer::local().await;
    let token = server.token.clone();
    let mut cell_id = String::new();
    let mut session_id = String::new();
    common::run_against(server, async |server| {
        let (id, mut ws) = server.session().await;
        let cell = ws
            .submit("code_marker_1b9f = 'output_marker_' + '7c2e'; print(code_marker_1b9f)")
            .await;
        let done = ws.collect(&cell).await;
        assert_eq!(done.stdout(), "output_marker_7c2e\n");
        cell_id = cell;
        session_id = id;
    })
    .await;
    let text = String::from_utf8(logs().lock().expect("logs").clone()).expect("UTF-8 logs");
    assert!(
        !text.contains("code_marker_1b9f"),
        "the cell's code was logged"
    );
    assert!(
        !text.contains("output_marker_7c2e"),
        "the cell's output was logged"
    );
    assert!(!text.contains(&token), "the API token was logged");
    let finished: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["fields"]["message"] == "cell finished" && l["span"]["cell"] == cell_id)
        .collect();
    assert_eq!(finished.len(), 1, "one line at the cell's end:\n{text}");
    let line = &finished[0];
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["span"]["name"], "cell");
    assert_eq!(line["span"]["session"], session_id);
    assert_eq!(line["fields"]["outcome"], "ok");
    assert!(line["fields"]["duration_ms"].is_u64(), "{line}");
    assert!(
        line["spans"].as_array().is_some_and(|spans| spans
            .iter()
            .any(|s| s["name"] == "session" && s["id"] == session_id)),
        "the cell's span is inside the session's: {line}"
    );
}
