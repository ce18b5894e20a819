//! Who may do what: tokens own their sessions, per-token limits and rates, browser origins.
//! Against a real server (local backend: these are API rules, not container rules).

mod common;

use std::num::NonZeroU32;
use std::sync::Arc;

use common::TestServer;
use kernelbox::api::{ApiToken, Token, Tokens};
use kernelbox::sandbox::local::LocalSandbox;
use kernelbox::session::SessionOptions;
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const ALICE: &str = "alice-secret-0123456789";
const BOB: &str = "bob-secret-0123456789ab";

async fn server(rate: Option<u32>, origins: Vec<String>) -> TestServer {
    let sandbox = LocalSandbox::new(common::python(), common::temp_state_dir()).expect("sandbox");
    TestServer::start_configured(Arc::new(sandbox), SessionOptions::default(), move |state| {
        let tokens = vec![
            ApiToken::new("alice", &Token::new(ALICE), Some(1)),
            ApiToken::new("bob", &Token::new(BOB), None),
        ];
        state
            .with_tokens(Tokens::new(tokens, rate.and_then(NonZeroU32::new)))
            .with_allowed_origins(origins)
    })
    .await
}

async fn call(server: &TestServer, token: &str, method: &str, path: &str) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let resp = server
        .http()
        .request(method, server.url(path))
        .bearer_auth(token)
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_token_cannot_see_or_touch_a_session() {
    let server = server(None, vec![]).await;
    let (status, created) = call(&server, ALICE, "POST", "/v1/sessions").await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().expect("id").to_owned();

    for (method, path) in [
        ("GET", format!("/v1/sessions/{id}")),
        ("DELETE", format!("/v1/sessions/{id}")),
        ("GET", format!("/api/kernels/{id}")),
        ("POST", format!("/api/kernels/{id}/interrupt")),
        ("POST", format!("/api/kernels/{id}/restart")),
        ("DELETE", format!("/api/kernels/{id}")),
    ] {
        let (status, body) = call(&server, BOB, method, &path).await;
        assert_eq!(status, 404, "bob {method} {path}: {body}");
    }
    let (_, bobs) = call(&server, BOB, "GET", "/v1/sessions").await;
    assert_eq!(
        bobs,
        serde_json::json!([]),
        "bob lists none of alice's sessions"
    );
    let (_, kernels) = call(&server, BOB, "GET", "/api/kernels").await;
    assert_eq!(kernels, serde_json::json!([]));
    for path in [
        format!("/v1/sessions/{id}/ws?token={BOB}"),
        format!("/api/kernels/{id}/channels?token={BOB}"),
    ] {
        let url = format!("ws://{}{path}", server.addr);
        let err = tokio_tungstenite::connect_async(url)
            .await
            .expect_err("refused");
        assert!(err.to_string().contains("404"), "{err}");
    }
    let (status, _) = call(&server, ALICE, "GET", &format!("/v1/sessions/{id}")).await;
    assert_eq!(status, 200, "alice still has it");
    let (_, alices) = call(&server, ALICE, "GET", "/v1/sessions").await;
    assert_eq!(alices.as_array().map(Vec::len), Some(1));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_holds_at_most_its_session_limit() {
    let server = server(None, vec![]).await;
    assert_eq!(call(&server, ALICE, "POST", "/v1/sessions").await.0, 201);
    let (status, body) = call(&server, ALICE, "POST", "/v1/sessions").await;
    assert_eq!(status, 429);
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("maximum of 1 sessions"),
        "{body}"
    );
    assert_eq!(
        call(&server, BOB, "POST", "/v1/sessions").await.0,
        201,
        "bob is not limited by alice"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_a_tokens_rate_get_429() {
    let server = server(Some(5), vec![]).await;
    let mut limited = None;
    for _ in 0..30 {
        let (status, body) = call(&server, BOB, "GET", "/v1/sessions").await;
        if status == 429 {
            limited = Some(body);
            break;
        }
        assert_eq!(status, 200);
    }
    let body = limited.expect("the rate limit bites");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("5 requests per second"),
        "{body}"
    );
    // Another token has its own budget.
    assert_eq!(call(&server, ALICE, "GET", "/v1/sessions").await.0, 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_origins_must_be_the_server_itself_or_allowed() {
    let server = server(None, vec!["https://notebook.example".to_owned()]).await;
    let (_, created) = call(&server, BOB, "POST", "/v1/sessions").await;
    let id = created["id"].as_str().expect("id").to_owned();
    let upgrade = |origin: &str| {
        let mut request = format!("ws://{}/v1/sessions/{id}/ws?token={BOB}", server.addr)
            .into_client_request()
            .expect("request");
        request
            .headers_mut()
            .insert("Origin", origin.parse().expect("header"));
        tokio_tungstenite::connect_async(request)
    };
    let refused = upgrade("https://evil.example")
        .await
        .expect_err("a foreign page is refused");
    assert!(refused.to_string().contains("403"), "{refused}");
    upgrade(&format!("http://{}", server.addr))
        .await
        .expect("the server's own page may connect");
    upgrade("https://notebook.example")
        .await
        .expect("an allowed origin may connect");

    let resp = server
        .http()
        .get(server.url("/v1/sessions"))
        .bearer_auth(BOB)
        .header("Origin", "https://notebook.example")
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()
            .get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok()),
        Some("https://notebook.example"),
        "CORS headers for allowed origins"
    );
    let evil = server
        .http()
        .get(server.url("/v1/sessions"))
        .bearer_auth(BOB)
        .header("Origin", "https://evil.example")
        .send()
        .await
        .expect("get");
    assert_eq!(evil.status(), 403);
    server.stop().await;
}

/// The server's own log, at debug level, never holds the API token or a session's HMAC key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_log() {
    let state = common::temp_state_dir();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let token = "log-check-token-0123456789abcdef";
    let log = state.join("server.log");
    let mut server = tokio::process::Command::new(env!("CARGO_BIN_EXE_kernelbox"))
        .args([
            "serve",
            "--backend",
            "local",
            "--ephemeral",
            "--pool-size",
            "0",
        ])
        .arg(format!("--bind=127.0.0.1:{port}"))
        .env("KERNELBOX_TOKEN", token)
        .env("KERNELBOX_LOG", "debug")
        .env("KERNELBOX_STATE_DIR", &state)
        .env("KERNELBOX_PYTHON", common::python())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .kill_on_drop(true)
        .spawn()
        .expect("start the server");
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let mut created = None;
    for _ in 0..100 {
        if let Ok(resp) = http
            .post(format!("{base}/v1/sessions"))
            .bearer_auth(token)
            .send()
            .await
        {
            created = resp.json::<Value>().await.ok();
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let id = created
        .and_then(|c| c["id"].as_str().map(str::to_owned))
        .expect("a session");
    let url = format!("ws://127.0.0.1:{port}/v1/sessions/{id}/ws?token={token}");
    let (stream, _) = tokio_tungstenite::connect_async(url).await.expect("ws");
    let mut ws = common::Ws { stream };
    assert_eq!(ws.run("6 * 7").await.result_text().as_deref(), Some("42"));
    // A wrong token and a bad frame get logged as what they are, not with their contents.
    let _ = http
        .get(format!("{base}/v1/sessions"))
        .bearer_auth("wrong-token-xyz")
        .send()
        .await;
    let conn: Value = serde_json::from_slice(
        &std::fs::read(state.join("sessions").join(&id).join("kernel.json"))
            .expect("connection file"),
    )
    .expect("json");
    let key = conn["key"].as_str().expect("key").to_owned();
    drop(ws);
    let _ = http
        .delete(format!("{base}/v1/sessions/{id}"))
        .bearer_auth(token)
        .send()
        .await;
    let _ = server.kill().await;
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(
        text.contains("DEBUG") || text.contains("INFO"),
        "the log has lines: {text}"
    );
    assert!(!text.contains(token), "the API token is in the log");
    assert!(
        !text.contains("wrong-token-xyz"),
        "a presented token is in the log"
    );
    assert!(!text.contains(&key), "a session's HMAC key is in the log");
}
