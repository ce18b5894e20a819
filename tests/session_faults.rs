//! Faults that must lose nothing and leave nothing stuck (issue 13), each reproduced against
//! a real ipykernel on the local backend.

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
        let interrupted = tokio::time::timeout(PROMPTLY, async {
            loop {
                let e = ws.next().await;
                if e["id"] == cell.as_str() && e["type"] == "error" {
                    return e;
                }
                if e["type"] == "rejected" || e["type"] == "error" {
                    refused += 1;
                }
            }
        })
        .await
        .expect("the interrupt did not stop the cell promptly");
        assert_eq!(interrupted["ename"], "KeyboardInterrupt", "{interrupted}");
        eprintln!("refused before the interrupt: {refused}");

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
