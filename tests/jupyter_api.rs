//! The Jupyter-compatible API (Kernel Gateway REST + kernel WebSocket) spoken to directly, on
//! real kernels (local backend), and reconnect-with-replay for both APIs.

mod common;

use std::time::Duration;

use common::TestServer;
use common::jupyter::JupyterWs;
use kernelbox::api::KernelSpecs;
use kernelbox::sandbox::local::LocalSandbox;
use kernelbox::session::SessionOptions;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// A server on the local backend with a second kernelspec that starts ipykernel by its own
/// command line (how kernels of other languages are configured).
async fn server() -> TestServer {
    let python = common::python();
    let specs = KernelSpecs::from_json(
        &json!({"kernelspecs": {"python3-own-argv": {
            "display_name": "Python (own argv)",
            "language": "python",
            "argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        }}})
        .to_string(),
    )
    .expect("kernelspecs");
    let sandbox = LocalSandbox::new(python, common::temp_state_dir()).expect("sandbox");
    TestServer::start_with(
        std::sync::Arc::new(sandbox),
        SessionOptions::default(),
        specs,
    )
    .await
}

async fn call(server: &TestServer, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut req = server
        .http()
        .request(method, server.url(path))
        .header("Authorization", format!("token {}", server.token));
    if let Some(body) = body {
        req = req.json(&body);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn start_kernel(server: &TestServer, name: &str) -> String {
    let (status, model) = call(server, "POST", "/api/kernels", Some(json!({"name": name}))).await;
    assert_eq!(status, 201, "{model}");
    model["id"].as_str().expect("id").to_owned()
}

fn channels_url(server: &TestServer, id: &str) -> String {
    format!("ws://{}/api/kernels/{id}/channels", server.addr)
}

async fn open(server: &TestServer, id: &str, session: &str) -> JupyterWs {
    JupyterWs::connect(&channels_url(server, id), session, &server.token).await
}

/// `%Y-%m-%dT%H:%M:%S.%fZ`, as jupyter_server parses it.
fn is_jupyter_timestamp(s: &str) -> bool {
    let b = s.as_bytes();
    s.len() == 27
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'.'
        && b[26] == b'Z'
        && s[20..26].bytes().all(|c| c.is_ascii_digit())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rest_endpoint_answers_as_kernel_gateway_does() {
    let server = server().await;
    let (status, api) = call(&server, "GET", "/api", None).await;
    assert_eq!(status, 200);
    assert!(api["version"].is_string());

    let (status, specs) = call(&server, "GET", "/api/kernelspecs", None).await;
    assert_eq!(status, 200);
    assert_eq!(specs["default"], "python3");
    for name in ["python3", "python3-own-argv"] {
        let spec = &specs["kernelspecs"][name];
        assert_eq!(spec["name"], name, "{specs}");
        assert!(spec["spec"]["display_name"].is_string());
        assert!(spec["resources"].is_object());
    }
    let (status, one) = call(&server, "GET", "/api/kernelspecs/python3", None).await;
    assert_eq!((status, &one["spec"]["language"]), (200, &json!("python")));
    let (status, missing) = call(&server, "GET", "/api/kernelspecs/cobol", None).await;
    assert_eq!(status, 404);
    assert!(
        missing["message"].as_str().unwrap_or("").contains("cobol"),
        "{missing}"
    );
    let (status, _) = call(&server, "GET", "/kernelspecs/python3/logo-64x64.png", None).await;
    assert_eq!(status, 404);
    let (status, bad) = call(
        &server,
        "POST",
        "/api/kernels",
        Some(json!({"name": "cobol"})),
    )
    .await;
    assert_eq!(status, 404, "unknown kernelspec is a 404, not a 500: {bad}");

    let (status, model) = call(&server, "POST", "/api/kernels", Some(json!({"name": "python3", "env": {"KERNEL_USERNAME": "ada", "KERNEL_WORKING_DIR": "/nowhere"}}))).await;
    assert_eq!(status, 201, "{model}");
    let id = model["id"].as_str().expect("id").to_owned();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "ids are UUIDs: {id}");
    assert_eq!(model["name"], "python3");
    assert!(
        is_jupyter_timestamp(model["last_activity"].as_str().unwrap_or("")),
        "{model}"
    );
    assert!(model["execution_state"].is_string());
    assert!(model["connections"].is_u64());

    let (status, list) = call(&server, "GET", "/api/kernels", None).await;
    assert_eq!(status, 200);
    assert!(
        list.as_array()
            .expect("array")
            .iter()
            .any(|k| k["id"] == id.as_str())
    );
    let (status, one) = call(&server, "GET", &format!("/api/kernels/{id}"), None).await;
    assert_eq!((status, &one["id"]), (200, &json!(id)));

    let (status, _) = call(
        &server,
        "POST",
        &format!("/api/kernels/{id}/interrupt"),
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 204);
    let (status, restarted) = call(
        &server,
        "POST",
        &format!("/api/kernels/{id}/restart"),
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 200, "{restarted}");
    assert_eq!(restarted["execution_state"], "idle");

    let unknown = uuid::Uuid::new_v4();
    for (method, path) in [
        ("GET", format!("/api/kernels/{unknown}")),
        ("DELETE", format!("/api/kernels/{unknown}")),
        ("POST", format!("/api/kernels/{unknown}/interrupt")),
        ("POST", format!("/api/kernels/{unknown}/restart")),
    ] {
        let (status, body) = call(&server, method, &path, Some(json!({}))).await;
        assert_eq!(status, 404, "{method} {path}: {body}");
        assert!(
            body["message"]
                .as_str()
                .unwrap_or("")
                .contains(&unknown.to_string())
        );
    }

    // The other token forms; and none at all.
    let bearer = server
        .http()
        .get(server.url("/api/kernels"))
        .bearer_auth(&server.token)
        .send()
        .await
        .expect("get");
    assert_eq!(bearer.status(), 200);
    // `?token=` is for WebSocket upgrades only (tests/security.rs).
    let query = server
        .http()
        .get(server.url(&format!("/api/kernels?token={}", server.token)))
        .send()
        .await
        .expect("get");
    assert_eq!(query.status(), 401);
    let none = server
        .http()
        .get(server.url("/api/kernels"))
        .send()
        .await
        .expect("get");
    assert_eq!(none.status(), 401);

    let (status, _) = call(&server, "DELETE", &format!("/api/kernels/{id}"), None).await;
    assert_eq!(status, 204);
    let (status, _) = call(&server, "GET", &format!("/api/kernels/{id}"), None).await;
    assert_eq!(status, 404);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jupyter_client_runs_cells_keeps_state_and_sees_restarts() {
    let server = server().await;
    let id = start_kernel(&server, "python3").await;
    let mut ws = open(&server, &id, "client-a").await;
    let info = ws.request("kernel_info_request", json!({})).await;
    assert_eq!(info["content"]["status"], "ok", "{info}");
    assert_eq!(info["parent_header"]["session"], "client-a");

    assert_eq!(ws.execute("x = 41").await.reply["content"]["status"], "ok");
    let sum = ws.execute("x + 1").await;
    assert_eq!(sum.result_text().as_deref(), Some("42"));
    assert!(
        !sum.of("execute_input").is_empty(),
        "iopub is relayed whole"
    );

    let plot = ws
        .execute("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3]); plt.show()")
        .await;
    let png = plot.of("display_data")[0]["content"]["data"]["image/png"]
        .as_str()
        .expect("png")
        .to_owned();
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(png.trim())
        .expect("base64");
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));

    // Interrupt over REST while a cell sleeps.
    let sleeping = ws.submit("import time; time.sleep(60)").await;
    ws.until(|m| {
        m["msg_type"] == "execute_input" && m["parent_header"]["msg_id"] == sleeping.as_str()
    })
    .await;
    let (status, _) = call(
        &server,
        "POST",
        &format!("/api/kernels/{id}/interrupt"),
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 204);
    let interrupted = ws.collect(&sleeping).await;
    assert_eq!(interrupted.reply["content"]["ename"], "KeyboardInterrupt");
    assert_eq!(ws.execute("x").await.result_text().as_deref(), Some("41"));

    // Restart over REST: the WebSocket sees the synthetic restarting status, then state is gone.
    let (status, _) = call(
        &server,
        "POST",
        &format!("/api/kernels/{id}/restart"),
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 200);
    ws.until(|m| m["channel"] == "iopub" && m["content"]["execution_state"] == "restarting")
        .await;
    let gone = ws.execute("x").await;
    assert_eq!(gone.reply["content"]["ename"], "NameError");

    // A restart asked for on the control channel works too.
    let msg = ws.message("control", "shutdown_request", json!({"restart": true}));
    let shutdown = ws.send(msg).await;
    let reply = ws
        .until(|m| m["parent_header"]["msg_id"] == shutdown.as_str())
        .await;
    assert_eq!(reply["content"]["status"], "ok", "{reply}");
    assert_eq!(
        ws.execute("1 + 1").await.result_text().as_deref(),
        Some("2")
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernelspec_with_its_own_command_starts_that_kernel() {
    let server = server().await;
    let id = start_kernel(&server, "python3-own-argv").await;
    let (_, model) = call(&server, "GET", &format!("/api/kernels/{id}"), None).await;
    assert_eq!(model["name"], "python3-own-argv");
    let mut ws = open(&server, &id, "c").await;
    assert_eq!(
        ws.execute("6 * 7").await.result_text().as_deref(),
        Some("42")
    );
    server.stop().await;
}

/// Each bad frame is dropped; the connection stays open and the session keeps its state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_never_break_the_connection_or_the_session() {
    let server = server().await;
    let id = start_kernel(&server, "python3").await;
    let mut ws = open(&server, &id, "bad").await;
    assert_eq!(
        ws.execute("kept = 'yes'").await.reply["content"]["status"],
        "ok"
    );
    let bad_frames = [
        Message::Text("this is not json".into()),
        Message::Text(r#"{"channel": "shell", "content": {}}"#.into()),
        Message::Text(json!({"channel": "nowhere", "header": {"msg_id": "1", "msg_type": "kernel_info_request", "session": "bad"}}).to_string().into()),
        Message::Text(json!({"channel": "iopub", "header": {"msg_id": "2", "msg_type": "stream", "session": "bad"}}).to_string().into()),
        Message::Binary(vec![0xde, 0xad, 0xbe, 0xef, 0, 1, 2].into()),
        Message::Text("[1, 2, 3]".into()),
    ];
    for frame in bad_frames {
        ws.send_raw(frame.clone()).await;
        let info = ws.request("kernel_info_request", json!({})).await;
        assert_eq!(info["content"]["status"], "ok", "after {frame:?}");
    }
    // A well-formed request of an unknown type gets an error reply naming it.
    let odd = ws.message("shell", "make_coffee_request", json!({}));
    let odd_id = ws.send(odd).await;
    let reply = ws
        .until(|m| m["parent_header"]["msg_id"] == odd_id.as_str())
        .await;
    assert_eq!(reply["msg_type"], "make_coffee_reply");
    assert_eq!(reply["content"]["status"], "error");
    assert!(
        reply["content"]["evalue"]
            .as_str()
            .unwrap_or("")
            .contains("make_coffee_request")
    );
    assert_eq!(
        ws.execute("kept").await.result_text().as_deref(),
        Some("'yes'")
    );
    server.stop().await;
}

const COUNTING_CELL: &str =
    "import time\nfor i in range(30):\n    print(i, flush=True)\n    time.sleep(0.05)";

fn expected_count() -> String {
    (0..30).map(|i| format!("{i}\n")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jupyter_client_that_reconnects_mid_cell_misses_nothing_and_gets_nothing_twice() {
    let server = server().await;
    let id = start_kernel(&server, "python3").await;
    let mut ws = open(&server, &id, "resumer").await;
    let cell = ws.submit(COUNTING_CELL).await;
    let mut text = String::new();
    while text.len() < 6 {
        let msg = ws.next().await;
        if msg["msg_type"] == "stream" && msg["parent_header"]["msg_id"] == cell.as_str() {
            text.push_str(msg["content"]["text"].as_str().unwrap_or(""));
        }
    }
    drop(ws);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut ws = open(&server, &id, "resumer").await;
    let rest = ws.collect(&cell).await;
    text.push_str(&rest.stdout());
    assert_eq!(text, expected_count());
    assert_eq!(rest.reply["content"]["status"], "ok");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_client_that_resumes_mid_cell_misses_nothing_and_gets_nothing_twice() {
    let server = server().await;
    let (id, mut ws) = server.session().await;
    let cell = ws.submit(COUNTING_CELL).await;
    let mut text = String::new();
    let mut last_seq = 0;
    while text.len() < 6 {
        let event = ws.next().await;
        last_seq = event["seq"].as_u64().unwrap_or(last_seq);
        if event["type"] == "stream" && event["id"] == cell.as_str() {
            text.push_str(event["text"].as_str().unwrap_or(""));
        }
    }
    drop(ws);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mut ws = server.ws_since(&id, last_seq).await;
    let resumed = ws.next().await;
    assert_eq!(resumed["type"], "resumed", "{resumed}");
    assert_eq!(resumed["dropped"], 0);
    let mut seqs = vec![];
    let rest = ws.collect(&cell).await;
    for event in &rest.events {
        seqs.push(event["seq"].as_u64().expect("seq"));
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
    assert!(
        seqs.first().is_some_and(|s| *s > last_seq),
        "nothing doubled: {seqs:?}"
    );
    text.push_str(&rest.stdout());
    assert_eq!(text, expected_count());
    assert_eq!(rest.status(), "ok");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overflowing_replay_buffer_says_how_much_was_dropped() {
    let python = common::python();
    let sandbox = LocalSandbox::new(python, common::temp_state_dir()).expect("sandbox");
    let options = SessionOptions {
        replay: kernelbox::session::ReplayLimits {
            events: 5,
            bytes: 1 << 20,
        },
        ..SessionOptions::default()
    };
    let server = TestServer::start(std::sync::Arc::new(sandbox), options).await;
    let (id, mut ws) = server.session().await;
    let seen = ws
        .run("1")
        .await
        .events
        .last()
        .and_then(|e| e["seq"].as_u64())
        .expect("seq");
    drop(ws);
    let mut other = server.ws(&id).await;
    let cell = other.run("for i in range(20): print(i, flush=True)").await;
    assert_eq!(cell.status(), "ok");
    let mut ws = server.ws_since(&id, seen).await;
    let resumed = ws.next().await;
    assert_eq!(resumed["type"], "resumed");
    assert!(resumed["dropped"].as_u64().unwrap_or(0) > 0, "{resumed}");
    assert!(resumed["replayed"].as_u64().unwrap_or(99) <= 5, "{resumed}");
    server.stop().await;
}

/// The `v1.kernel.websocket.jupyter.org` subprotocol, framed by hand as JupyterLab does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_v1_binary_subprotocol_is_spoken_when_asked_for() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    fn frame(channel: &str, parts: &[Vec<u8>]) -> Vec<u8> {
        let mut all = vec![channel.as_bytes().to_vec()];
        all.extend(parts.iter().cloned());
        let mut offsets = vec![8 * (all.len() as u64 + 2)];
        for p in &all {
            offsets.push(offsets.last().copied().unwrap_or(0) + p.len() as u64);
        }
        let mut out = (offsets.len() as u64).to_le_bytes().to_vec();
        for o in &offsets {
            out.extend_from_slice(&o.to_le_bytes());
        }
        for p in all {
            out.extend(p);
        }
        out
    }
    fn unframe(bytes: &[u8]) -> (String, Vec<Value>) {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let off: Vec<usize> = (0..n)
            .map(|i| {
                u64::from_le_bytes(bytes[8 * (i + 1)..8 * (i + 2)].try_into().unwrap()) as usize
            })
            .collect();
        let channel = String::from_utf8(bytes[off[0]..off[1]].to_vec()).unwrap();
        let parts = (1..n - 1)
            .take(4)
            .map(|i| serde_json::from_slice(&bytes[off[i]..off[i + 1]]).unwrap())
            .collect();
        (channel, parts)
    }

    let server = server().await;
    let id = start_kernel(&server, "python3").await;
    let mut request = format!("{}?session_id=v1", channels_url(&server, &id))
        .into_client_request()
        .unwrap();
    let headers = request.headers_mut();
    headers.insert(
        "Authorization",
        format!("token {}", server.token).parse().unwrap(),
    );
    headers.insert(
        "Sec-WebSocket-Protocol",
        "v1.kernel.websocket.jupyter.org".parse().unwrap(),
    );
    let (mut ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap()),
        Some("v1.kernel.websocket.jupyter.org")
    );
    let header = json!({"msg_id": "k1", "msg_type": "kernel_info_request", "session": "v1",
                        "username": "t", "date": "", "version": "5.3"});
    let parts = [header, json!({}), json!({}), json!({})].map(|v| serde_json::to_vec(&v).unwrap());
    ws.send(Message::Binary(frame("shell", &parts).into()))
        .await
        .unwrap();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("reply in time")
            .expect("open")
            .expect("frame");
        let Message::Binary(bytes) = msg else {
            continue;
        };
        let (channel, parts) = unframe(&bytes);
        if channel == "shell" {
            assert_eq!(parts[0]["msg_type"], "kernel_info_reply");
            assert_eq!(parts[1]["msg_id"], "k1");
            assert_eq!(parts[3]["status"], "ok");
            break;
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dying_kernel_is_a_dead_status_and_a_restart_brings_it_back() {
    let server = server().await;
    let id = start_kernel(&server, "python3").await;
    let mut ws = open(&server, &id, "mortal").await;
    ws.submit("import os; os._exit(3)").await;
    ws.until(|m| m["channel"] == "iopub" && m["content"]["execution_state"] == "dead")
        .await;
    let (_, model) = call(&server, "GET", &format!("/api/kernels/{id}"), None).await;
    assert_eq!(model["execution_state"], "dead");
    let (status, model) = call(
        &server,
        "POST",
        &format!("/api/kernels/{id}/restart"),
        Some(json!({})),
    )
    .await;
    assert_eq!(
        (status, &model["execution_state"]),
        (200, &json!("idle")),
        "{model}"
    );
    assert_eq!(
        ws.execute("1 + 2").await.result_text().as_deref(),
        Some("3")
    );
    server.stop().await;
}
