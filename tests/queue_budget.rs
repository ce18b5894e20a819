//! A session's queued cells and forwarded Jupyter messages are bounded in bytes
//! (`--max-queued-mb`): behind a long-running cell, a flood of large cells is refused with a
//! clear message once the budget is held, and the session works normally afterwards.

mod common;

use std::sync::Arc;
use std::time::Duration;

use kernelbox::sandbox::local::LocalSandbox;
use kernelbox::session::SessionOptions;
use serde_json::json;

const BUDGET: usize = 1 << 20;
/// Each flooding cell: a statement plus a 256 KiB comment, so four fit in the budget.
const CELL_BYTES: usize = 256 << 10;

fn big_cell(n: usize) -> String {
    let mut code = format!("flood_{n} = {n}  #");
    code.push_str(&"x".repeat(CELL_BYTES - code.len()));
    code
}

async fn server() -> common::TestServer {
    let sandbox = LocalSandbox::new(common::python(), common::temp_state_dir()).expect("sandbox");
    let options = SessionOptions {
        max_queued_bytes: BUDGET,
        ..SessionOptions::default()
    };
    common::TestServer::start(Arc::new(sandbox), options).await
}

#[tokio::test]
async fn queued_cells_beyond_the_byte_budget_are_refused_and_the_session_recovers() {
    let server = server().await;
    common::run_against(server, async |server| {
        let (_id, mut ws) = server.session().await;
        let sleeper = ws.submit("import time; time.sleep(60)").await;
        ws.until(|e| e["type"] == "kernel" && e["state"] == "busy")
            .await;
        // The running cell was sent to the kernel: its bytes are back. Ten 256 KiB cells:
        // four fit in 1 MiB, the rest are refused.
        let mut ids = Vec::new();
        for n in 0..10 {
            ids.push(ws.submit(&big_cell(n)).await);
        }
        let (mut accepted, mut refused) = (Vec::new(), Vec::new());
        while accepted.len() + refused.len() < ids.len() {
            let event = ws.next().await;
            let Some(id) = event["id"].as_str() else {
                continue;
            };
            if !ids.iter().any(|i| i == id) {
                continue;
            }
            match event["type"].as_str() {
                Some("accepted") => accepted.push(id.to_owned()),
                Some("error") => {
                    assert_eq!(event["ename"], "Rejected", "{event}");
                    let evalue = event["evalue"].as_str().unwrap_or_default();
                    assert!(evalue.contains("budget"), "{evalue}");
                    assert!(evalue.contains(&BUDGET.to_string()), "{evalue}");
                    refused.push(id.to_owned());
                }
                _ => {}
            }
        }
        assert_eq!(
            accepted.len(),
            4,
            "accepted {accepted:?}, refused {refused:?}"
        );
        assert_eq!(
            refused.len(),
            6,
            "accepted {accepted:?}, refused {refused:?}"
        );
        assert_eq!(accepted, ids[..4], "the first four are queued, in order");

        // Stop the sleeper: the queued cells run, and give their bytes back as they go.
        ws.send(json!({"type": "interrupt"})).await;
        let cell = ws.collect(&sleeper).await;
        assert_eq!(cell.status(), "error", "{:?}", cell.events);
        for id in &accepted {
            let cell = ws.collect(id).await;
            assert_eq!(cell.status(), "ok", "{:?}", cell.events);
        }
        // The whole budget is free again: a full burst fits once more.
        let again: Vec<String> = {
            let mut again = Vec::new();
            for n in 10..14 {
                again.push(ws.submit(&big_cell(n)).await);
            }
            again
        };
        for id in &again {
            let cell = ws.collect(id).await;
            assert_eq!(cell.status(), "ok", "{:?}", cell.events);
        }
        let cell = ws.run("print(flood_0 + flood_13)").await;
        assert_eq!(cell.stdout().trim(), "13", "{:?}", cell.events);
    })
    .await;
}

/// A Jupyter client's `execute_request` refused for the budget gets an `execute_reply` with
/// status `error` saying why, instead of silence.
#[tokio::test]
async fn a_refused_jupyter_request_gets_an_error_reply() {
    let server = server().await;
    common::run_against(server, async |server| {
        let id = server.create_session().await;
        let mut native = server.ws(&id).await;
        native.wait_kernel("idle").await;
        let mut jupyter = common::jupyter::JupyterWs::connect(
            &format!("ws://{}/api/kernels/{id}/channels", server.addr),
            "budget-test-client",
            &server.token,
        )
        .await;
        // Hold the kernel (and so the forwarded requests' turn) with a sleeping native cell, then
        // fill the budget with queued native cells.
        native.submit("import time; time.sleep(60)").await;
        native
            .until(|e| e["type"] == "kernel" && e["state"] == "busy")
            .await;
        for n in 0..4 {
            native.submit(&big_cell(n)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let msg_id = jupyter
            .send(jupyter.message(
                "shell",
                "execute_request",
                json!({"code": big_cell(99), "silent": false}),
            ))
            .await;
        let reply = jupyter
            .until(|m| m["msg_type"] == "execute_reply" && m["parent_header"]["msg_id"] == msg_id)
            .await;
        assert_eq!(reply["content"]["status"], "error", "{reply}");
        assert_eq!(reply["content"]["ename"], "Rejected", "{reply}");
        let evalue = reply["content"]["evalue"].as_str().unwrap_or_default();
        assert!(evalue.contains("budget"), "{evalue}");
        native.send(json!({"type": "interrupt"})).await;
    })
    .await;
}
