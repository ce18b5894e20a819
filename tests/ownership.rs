//! A session belongs to the token that created it (issue 12): for any other token, every route
//! that names a session — native REST, files, packages, both WebSockets, the Jupyter REST API —
//! answers `404`, exactly as for an unknown id, and does nothing.
//!
//! The walk takes its routes from `kernelbox::api::routes()`, the table the router itself is
//! built from, so a route added later is walked too. Runs against real sessions: a Docker one
//! (needs the kernel image, `kernel-image/build.sh`) and a local one (needs the venv,
//! `kernelbox setup`), both with package installs allowed, so that nothing but ownership stands
//! between the other token and the session.

mod common;

use std::sync::Arc;

use common::{TestServer, Ws};
use kernelbox::api::{self, ApiToken, Token, Tokens};
use kernelbox::sandbox::PackagePolicy;
use kernelbox::sandbox::Sandbox;
use kernelbox::sandbox::docker::{DockerConfig, DockerSandbox};
use kernelbox::sandbox::local::LocalSandbox;
use kernelbox::session::{EventKind, SessionOptions};
use serde_json::{Value, json};

const ALICE: &str = "alice-secret-0123456789";
const BOB: &str = "bob-secret-0123456789ab";

/// What Alice's file holds before Bob's attempts, and must hold after.
const KEPT: &str = "x = 1\n";

fn installs_allowed() -> PackagePolicy {
    PackagePolicy {
        allow: true,
        ..PackagePolicy::default()
    }
}

async fn server_on(sandbox: Arc<dyn Sandbox>) -> TestServer {
    TestServer::start_configured(sandbox, SessionOptions::default(), |state| {
        state.with_tokens(Tokens::new(
            vec![
                ApiToken::new("alice", &Token::new(ALICE), None),
                ApiToken::new("bob", &Token::new(BOB), None),
            ],
            None,
        ))
    })
    .await
}

async fn docker_server() -> TestServer {
    let sandbox = DockerSandbox::new(DockerConfig {
        state_dir: common::temp_state_dir(),
        packages: installs_allowed(),
        ..DockerConfig::default()
    })
    .await
    .unwrap_or_else(|err| panic!("{err} (build the image: kernel-image/build.sh)"));
    server_on(Arc::new(sandbox)).await
}

async fn local_server() -> TestServer {
    let sandbox = LocalSandbox::new(common::python(), common::temp_state_dir())
        .expect("local sandbox")
        .with_packages(installs_allowed());
    server_on(Arc::new(sandbox)).await
}

async fn call(
    server: &TestServer,
    token: &str,
    method: &reqwest::Method,
    path: &str,
    body: Vec<u8>,
) -> (u16, Value, String) {
    let resp = server
        .http()
        .request(method.clone(), server.url(path))
        .bearer_auth(token)
        .body(body)
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
    )
}

/// A body that would do harm if the route accepted it.
fn attack_body(method: &reqwest::Method, path: &str) -> Vec<u8> {
    if path.contains("/files/") && method == reqwest::Method::PUT {
        b"import os\nos.system('echo owned')\n".to_vec()
    } else if path.ends_with("/packages") {
        json!({"packages": ["six"]}).to_string().into_bytes()
    } else {
        Vec::new()
    }
}

/// Alice's session: a variable in the kernel and a file in its working directory.
async fn alices_session(server: &TestServer) -> (String, Ws) {
    let (status, created, text) = call(
        server,
        ALICE,
        &reqwest::Method::POST,
        "/v1/sessions",
        Vec::new(),
    )
    .await;
    assert_eq!(status, 201, "{text}");
    let id = created["id"].as_str().expect("id").to_owned();
    let url = format!("ws://{}/v1/sessions/{id}/ws?token={ALICE}", server.addr);
    let (stream, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("alice's ws");
    let mut ws = Ws { stream };
    ws.wait_kernel("idle").await;
    assert_eq!(ws.run("marker = 41").await.status(), "ok");
    let (status, _, text) = call(
        server,
        ALICE,
        &reqwest::Method::PUT,
        &format!("/v1/sessions/{id}/files/keep.py"),
        KEPT.into(),
    )
    .await;
    assert_eq!(status, 201, "{text}");
    (id, ws)
}

/// Bob tries every route naming Alice's session; each is a 404 saying there is no such
/// session, and Alice's session, kernel and files are as they were.
async fn another_token_reaches_nothing(server: &TestServer) {
    let (id, mut ws) = alices_session(server).await;
    let routes: Vec<_> = api::routes()
        .into_iter()
        .filter(api::Route::names_session)
        .collect();
    assert!(
        routes.len() >= 13,
        "the walk lost routes: {:?}",
        routes.iter().map(|r| r.path).collect::<Vec<_>>()
    );
    for route in &routes {
        let path = route
            .path
            .replace("{id}", &id)
            .replace("{*path}", "keep.py");
        let method = reqwest::Method::from_bytes(route.method.as_str().as_bytes()).expect("method");
        let (status, body, text) =
            call(server, BOB, &method, &path, attack_body(&method, &path)).await;
        assert_eq!(status, 404, "bob {method} {path}: {text}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(
            error == format!("no session {id}") || error == format!("no kernel {id}"),
            "bob {method} {path}: {text}"
        );
        // The same path as Bob's WebSocket upgrade (token in the query, as browsers send it).
        if path.ends_with("/ws") || path.ends_with("/channels") {
            let url = format!("ws://{}{path}?token={BOB}", server.addr);
            let err = tokio_tungstenite::connect_async(url)
                .await
                .expect_err("bob's upgrade is refused");
            assert!(
                err.to_string().contains("404"),
                "bob upgrades {path}: {err}"
            );
        }
    }
    // The attack of the issue: Bob uploads a module into Alice's working directory.
    let (status, _, text) = call(
        server,
        BOB,
        &reqwest::Method::PUT,
        &format!("/v1/sessions/{id}/files/evil.py"),
        b"print('owned')\n".to_vec(),
    )
    .await;
    assert_eq!(status, 404, "{text}");

    // Nothing happened to Alice's session.
    let (status, _, text) = call(
        server,
        ALICE,
        &reqwest::Method::GET,
        &format!("/v1/sessions/{id}"),
        Vec::new(),
    )
    .await;
    assert_eq!(status, 200, "alice's session is still there: {text}");
    let (status, listing, text) = call(
        server,
        ALICE,
        &reqwest::Method::GET,
        &format!("/v1/sessions/{id}/files"),
        Vec::new(),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let names: Vec<&str> = listing["entries"]
        .as_array()
        .map(|e| e.iter().filter_map(|e| e["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        names,
        ["keep.py"],
        "no file written, none deleted: {listing}"
    );
    let (status, _, kept) = call(
        server,
        ALICE,
        &reqwest::Method::GET,
        &format!("/v1/sessions/{id}/files/keep.py"),
        Vec::new(),
    )
    .await;
    assert_eq!(
        (status, kept.as_str()),
        (200, KEPT),
        "the file is unchanged"
    );
    let cell = ws.run("print(marker + 1)").await;
    assert_eq!(
        cell.stdout(),
        "42\n",
        "the kernel was neither restarted nor replaced: {:?}",
        cell.events
    );
    let session = server.sessions.get(&id).expect("session");
    let installs = session
        .subscribe_from(Some(0))
        .missed
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Install(_)))
        .count();
    assert_eq!(installs, 0, "no install was started in alice's session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_another_token_reaches_nothing() {
    common::run_against(docker_server().await, another_token_reaches_nothing).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_another_token_reaches_nothing() {
    common::run_against(local_server().await, another_token_reaches_nothing).await;
}

/// The walk finds session routes by their `{id}`: a route naming a session any other way
/// (`{session_id}`, `{kernel}`) would escape it — and the ownership check the router adds to
/// every `{id}` route. So no route may have path parameters other than these.
#[test]
fn routes_name_sessions_only_as_id() {
    const KNOWN: [&str; 4] = ["{id}", "{name}", "{*path}", "{*file}"];
    for route in api::routes() {
        let mut rest = route.path;
        while let Some(start) = rest.find('{') {
            let end = rest[start..]
                .find('}')
                .map_or(rest.len(), |e| start + e + 1);
            let param = &rest[start..end];
            assert!(
                KNOWN.contains(&param),
                "{} {}: unknown path parameter {param}; a session is always `{{id}}`",
                route.method,
                route.path
            );
            rest = &rest[end..];
        }
        if route.path.contains("{name}") {
            assert!(
                route.path.contains("kernelspecs"),
                "{}: `{{name}}` is for kernelspecs only",
                route.path
            );
        }
    }
}

/// A token in the query string is for WebSocket upgrades only: a plain request carrying one
/// (and no header) is a 401 that says so, while the upgrade with the same token works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_tokens_only_authenticate_websocket_upgrades() {
    common::run_against(local_server().await, async |server| {
        let (id, _ws) = alices_session(server).await;
        for path in [
            "/v1/sessions".to_owned(),
            format!("/v1/sessions/{id}"),
            format!("/v1/sessions/{id}/files/keep.py"),
            "/api/kernels".to_owned(),
            format!("/v1/sessions/{id}/ws"),
        ] {
            let resp = server
                .http()
                .get(server.url(&format!("{path}?token={ALICE}")))
                .send()
                .await
                .expect("get");
            assert_eq!(resp.status(), 401, "GET {path}?token=");
            let body: Value = resp.json().await.expect("json");
            assert!(
                body["error"]
                    .as_str()
                    .is_some_and(|m| m.contains("WebSocket upgrades only")),
                "{body}"
            );
        }
        let url = format!("ws://{}/v1/sessions/{id}/ws?token={ALICE}", server.addr);
        let (stream, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("the upgrade with ?token= works");
        let mut ws = Ws { stream };
        ws.wait_kernel("idle").await;
    })
    .await;
}
