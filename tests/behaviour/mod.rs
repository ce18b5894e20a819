//! What a session promises its clients, written once and run against every backend
//! (`tests/sessions_local.rs`, `tests/sessions_docker.rs`).
#![allow(dead_code)]

use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::common::TestServer;

/// Runs each named behaviour as its own test against a server made by `$make`; the server is
/// stopped (sessions closed, sandboxes removed) even when the behaviour fails.
#[macro_export]
macro_rules! behaviours {
    ($make:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                use futures::FutureExt;
                let server = $make.await;
                let outcome = std::panic::AssertUnwindSafe(behaviour::$name(&server))
                    .catch_unwind()
                    .await;
                server.stop().await;
                if let Err(panic) = outcome {
                    std::panic::resume_unwind(panic);
                }
            }
        )*
    };
}

/// `x = 41` then `x + 1` → execute_result "42": variables live on between cells.
pub async fn variables_persist(server: &TestServer) {
    let (_, mut ws) = server.session().await;
    let first = ws.run("x = 41").await;
    assert_eq!(first.status(), "ok", "{:?}", first.events);
    let second = ws.run("x + 1").await;
    assert_eq!(
        second.result_text().as_deref(),
        Some("42"),
        "{:?}",
        second.events
    );
    assert_eq!(second.status(), "ok");
    let done = second.events.last().expect("done");
    assert!(
        done["execution_count"].as_i64().is_some_and(|n| n >= 2),
        "{done}"
    );
}

/// stdout and stderr arrive in the order the cell wrote them, before `done`.
pub async fn stdout_and_stderr_keep_their_order(server: &TestServer) {
    let (_, mut ws) = server.session().await;
    let cell = ws
        .run("import sys\nprint('one', flush=True)\nprint('two', file=sys.stderr, flush=True)\nprint('three', flush=True)")
        .await;
    let streams: Vec<(String, String)> = cell
        .of("stream")
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap_or("").to_owned(),
                e["text"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        streams,
        vec![
            ("stdout".to_owned(), "one\n".to_owned()),
            ("stderr".to_owned(), "two\n".to_owned()),
            ("stdout".to_owned(), "three\n".to_owned()),
        ]
    );
    assert_eq!(cell.status(), "ok");
}

/// A matplotlib cell produces a display_data whose image/png is a real PNG.
pub async fn matplotlib_png_arrives(server: &TestServer) {
    let (_, mut ws) = server.session().await;
    let cell = ws
        .run("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.title('squares')\nplt.show()")
        .await;
    assert_eq!(cell.status(), "ok", "{:?}", cell.events);
    let displays = cell.of("display_data");
    let png = displays
        .iter()
        .find_map(|e| e["data"]["image/png"].as_str())
        .unwrap_or_else(|| panic!("no image/png in {:?}", cell.events));
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(png.trim())
        .expect("image/png is base64");
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(
        bytes.len() > 1000,
        "PNG suspiciously small: {} bytes",
        bytes.len()
    );
}

/// `1/0` gives an error event and an `error` done; the session keeps working.
pub async fn errors_are_reported_and_the_session_survives(server: &TestServer) {
    let (_, mut ws) = server.session().await;
    let cell = ws.run("1/0").await;
    assert_eq!(
        cell.ename().as_deref(),
        Some("ZeroDivisionError"),
        "{:?}",
        cell.events
    );
    let error = cell.of("error")[0].clone();
    assert!(error["traceback"].as_array().is_some_and(|t| !t.is_empty()));
    assert_eq!(cell.status(), "error");
    let next = ws.run("'still here'").await;
    assert_eq!(next.result_text().as_deref(), Some("'still here'"));
}

/// `input()` asks the client, and the reply reaches the code.
pub async fn input_round_trip(server: &TestServer) {
    let (_, mut ws) = server.session().await;
    let id = ws
        .submit("name = input('who are you? ')\nprint('hello', name)")
        .await;
    let request = ws.until(|e| e["type"] == "input_request").await;
    assert_eq!(request["id"], id.as_str());
    assert_eq!(request["prompt"], "who are you? ");
    assert_eq!(request["password"], false);
    ws.send(json!({"type": "input_reply", "value": "ada"}))
        .await;
    let cell = ws.collect(&id).await;
    assert_eq!(cell.stdout(), "hello ada\n", "{:?}", cell.events);
    assert_eq!(cell.status(), "ok");
}

/// Interrupting `time.sleep(60)` ends the cell within 2 s, with variables kept.
pub async fn interrupt_stops_a_long_cell_and_keeps_state(server: &TestServer) {
    let (_, mut ws) = server.session().await;
    assert_eq!(ws.run("import time\ny = 7").await.status(), "ok");
    let id = ws.submit("time.sleep(60)").await;
    ws.until(|e| e["id"] == id.as_str() && e["type"] == "status" && e["state"] == "busy")
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let asked = Instant::now();
    ws.send(json!({"type": "interrupt"})).await;
    let cell = ws.collect(&id).await;
    let took = asked.elapsed();
    assert!(took < Duration::from_secs(2), "interrupt took {took:?}");
    assert_eq!(
        cell.ename().as_deref(),
        Some("KeyboardInterrupt"),
        "{:?}",
        cell.events
    );
    assert_eq!(ws.run("y").await.result_text().as_deref(), Some("7"));
}

/// A restart gives a fresh kernel: earlier variables are gone, the session works.
pub async fn restart_clears_state(server: &TestServer) {
    let (_, mut ws) = server.session().await;
    ws.run("gone = 1").await;
    ws.send(json!({"type": "restart"})).await;
    ws.wait_kernel("restarting").await;
    ws.wait_kernel("idle").await;
    let cell = ws.run("gone").await;
    assert_eq!(
        cell.ename().as_deref(),
        Some("NameError"),
        "{:?}",
        cell.events
    );
    assert_eq!(ws.run("2 * 21").await.result_text().as_deref(), Some("42"));
}

/// Two sessions share nothing.
pub async fn sessions_are_isolated(server: &TestServer) {
    let (_, mut a) = server.session().await;
    let (_, mut b) = server.session().await;
    a.run("secret = 'a'").await;
    let cell = b.run("secret").await;
    assert_eq!(
        cell.ename().as_deref(),
        Some("NameError"),
        "{:?}",
        cell.events
    );
    assert_eq!(a.run("secret").await.result_text().as_deref(), Some("'a'"));
}

/// Bad frames of every kind each get an `error` event naming what was wrong; the connection
/// and the session stay up.
pub async fn bad_frames_get_errors_and_nothing_breaks(server: &TestServer) {
    let (_, mut ws) = server.session().await;
    ws.run("kept = 5").await;
    let cases: Vec<(Message, &str)> = vec![
        (Message::Text("this is not json".into()), "expected"),
        (
            Message::Text(r#"{"type": "explode"}"#.into()),
            "unknown variant `explode`",
        ),
        (
            Message::Text(r#"{"type": "execute", "id": "m"}"#.into()),
            "missing field `code`",
        ),
        (
            Message::Text(r#"{"type": "execute", "code": 5}"#.into()),
            "invalid type",
        ),
        (
            Message::Text(r#"{"code": "1"}"#.into()),
            "missing field `type`",
        ),
        (
            Message::Binary(vec![0, 159, 146, 150].into()),
            "binary frames",
        ),
        (
            Message::Text(r#"{"type": "execute", "code": "1", "timeout_s": -1}"#.into()),
            "timeout_s",
        ),
    ];
    for (frame, expected) in cases {
        let shown = format!("{frame:?}");
        ws.send_raw(frame).await;
        let error = ws.until(|e| e["type"] == "error").await;
        assert_eq!(error["ename"], "InvalidMessage", "{shown}: {error}");
        let text = error["evalue"].as_str().unwrap_or("");
        assert!(
            text.contains(expected),
            "{shown}: {text:?} should mention {expected:?}"
        );
    }
    assert_eq!(ws.run("kept").await.result_text().as_deref(), Some("5"));
}

/// A client that disconnects mid-cell does not stop the cell; another client sees its effect.
pub async fn a_disconnecting_client_does_not_stop_the_cell(server: &TestServer) {
    let (id, mut ws) = server.session().await;
    let cell = ws
        .submit("import time\ntime.sleep(1)\nfinished = 'yes'")
        .await;
    ws.until(|e| e["id"] == cell.as_str() && e["type"] == "accepted")
        .await;
    drop(ws);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut again = server.ws(&id).await;
    assert_eq!(
        again.run("finished").await.result_text().as_deref(),
        Some("'yes'")
    );
}

/// Cells sent back to back run one at a time, in order, each told its place in the queue.
pub async fn cells_run_in_submission_order(server: &TestServer) {
    let (_, mut ws) = server.session().await;
    let ids = [
        ws.submit("import time\norder = []\ntime.sleep(0.3)\norder.append(1)")
            .await,
        ws.submit("order.append(2)").await,
        ws.submit("order.append(3)\norder").await,
    ];
    let mut positions = Vec::new();
    let mut done = Vec::new();
    let mut last = None;
    while done.len() < 3 {
        let event = ws.next().await;
        match event["type"].as_str() {
            Some("accepted") => positions.push(event["position"].as_u64().unwrap_or(99)),
            Some("done") => done.push(event["id"].as_str().unwrap_or("").to_owned()),
            Some("execute_result") => {
                last = event["data"]["text/plain"].as_str().map(str::to_owned)
            }
            _ => {}
        }
    }
    assert_eq!(positions, vec![0, 1, 2]);
    assert_eq!(done, ids.to_vec());
    assert_eq!(last.as_deref(), Some("[1, 2, 3]"));
}

/// Completion, inspection and kernel info answer with the request's id.
pub async fn completion_and_inspection(server: &TestServer) {
    let (_, mut ws) = server.session().await;
    ws.run("import os").await;
    ws.send(json!({"type": "complete", "id": "c1", "code": "os.pa", "cursor": 5}))
        .await;
    let reply = ws.until(|e| e["type"] == "complete_reply").await;
    assert_eq!(reply["id"], "c1");
    let matches: Vec<&str> = reply["matches"]
        .as_array()
        .map(|m| m.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    assert!(
        matches.contains(&"os.path") || matches.contains(&"path"),
        "{reply}"
    );
    ws.send(json!({"type": "inspect", "id": "i1", "code": "len", "cursor": 3}))
        .await;
    let reply = ws.until(|e| e["type"] == "inspect_reply").await;
    assert_eq!(reply["id"], "i1");
    assert_eq!(reply["found"], true);
    ws.send(json!({"type": "kernel_info", "id": "k1"})).await;
    let reply = ws.until(|e| e["type"] == "kernel_info_reply").await;
    assert_eq!(reply["id"], "k1");
    assert_eq!(reply["language_info"]["name"], "python", "{reply}");
    assert!(
        reply["protocol_version"]
            .as_str()
            .is_some_and(|v| v.starts_with('5')),
        "{reply}"
    );
}

/// A cell's `timeout_s` interrupts it and its `done` says `timeout`.
pub async fn cell_timeout_interrupts(server: &TestServer) {
    let (_, mut ws) = server.session().await;
    ws.send(json!({"type": "execute", "id": "slow", "code": "import time\ntime.sleep(30)", "timeout_s": 0.5})).await;
    let cell = ws.collect("slow").await;
    assert_eq!(cell.status(), "timeout", "{:?}", cell.events);
    assert_eq!(ws.run("1").await.result_text().as_deref(), Some("1"));
}
