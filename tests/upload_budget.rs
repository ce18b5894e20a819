//! Uploads are bounded in bytes (issue 12): one upload by `--max-upload-mb` (`413`, checked
//! while the body streams: tests/files.rs), and all uploads in progress together by
//! `--max-uploads-mb`, so concurrent uploads cannot multiply what the server spools. An upload
//! that does not fit gets `503` with a message, before its body is read, and leaves nothing
//! behind; once the others finish it fits again. Real local sessions.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::TestServer;
use kernelbox::sandbox::local::LocalSandbox;
use kernelbox::session::SessionOptions;
use serde_json::Value;

const MIB: u64 = 1 << 20;

async fn server() -> TestServer {
    let sandbox = LocalSandbox::new(common::python(), common::temp_state_dir()).expect("local");
    TestServer::start_configured(Arc::new(sandbox), SessionOptions::default(), |state| {
        state
            .with_max_upload_bytes(MIB)
            .with_upload_budget_bytes(MIB + MIB / 2)
    })
    .await
}

fn url(server: &TestServer, id: &str, path: &str) -> String {
    server.url(&format!("/v1/sessions/{id}/files/{path}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_in_progress_share_one_byte_budget() {
    common::run_against(server().await, async |server| {
        let id = server.create_session().await;
        // A chunked upload (no declared size: it reserves the whole 1 MiB limit) that sends
        // 100 KB and then waits.
        let (more_tx, more_rx) = tokio::sync::oneshot::channel::<()>();
        let first_chunk = futures::stream::once(async {
            Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'a'; 100_000]))
        });
        let rest = futures::stream::once(async move {
            let _ = more_rx.await;
            Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'b'; 100_000]))
        });
        let slow = server
            .http()
            .put(url(server, &id, "slow.bin"))
            .bearer_auth(&server.token)
            .body(reqwest::Body::wrap_stream(futures::StreamExt::chain(
                first_chunk,
                rest,
            )))
            .send();
        let slow = tokio::spawn(slow);

        // Meanwhile a 1 MiB upload does not fit in what is left (0.5 MiB): 503, says why.
        let mut refused = None;
        for _ in 0..100 {
            let resp = server
                .http()
                .put(url(server, &id, "big.bin"))
                .bearer_auth(&server.token)
                .body(vec![b'c'; MIB as usize])
                .send()
                .await
                .expect("put");
            if resp.status() == 503 {
                refused = Some(resp.json::<Value>().await.expect("json"));
                break;
            }
            // The slow upload has not reached the server yet: the big one went through.
            assert_eq!(resp.status(), 201);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let refused = refused.expect("the second upload is refused while the first runs");
        assert!(
            refused["error"]
                .as_str()
                .is_some_and(|m| m.contains("too many uploads in progress")),
            "{refused}"
        );
        // A small one still fits.
        let small = server
            .http()
            .put(url(server, &id, "small.txt"))
            .bearer_auth(&server.token)
            .body("fits")
            .send()
            .await
            .expect("put");
        assert_eq!(small.status(), 201);

        // The slow upload finishes; its reservation is given back.
        let _ = more_tx.send(());
        let slow = slow.await.expect("task").expect("slow put");
        assert_eq!(slow.status(), 201);
        let big = server
            .http()
            .put(url(server, &id, "big.bin"))
            .bearer_auth(&server.token)
            .body(vec![b'c'; MIB as usize])
            .send()
            .await
            .expect("put");
        assert_eq!(big.status(), 201, "the budget came back");
        let listing: Value = server
            .http()
            .get(server.url(&format!("/v1/sessions/{id}/files")))
            .bearer_auth(&server.token)
            .send()
            .await
            .expect("list")
            .json()
            .await
            .expect("json");
        let mut names: Vec<&str> = listing["entries"]
            .as_array()
            .map(|e| e.iter().filter_map(|e| e["name"].as_str()).collect())
            .unwrap_or_default();
        names.sort_unstable();
        assert_eq!(
            names,
            ["big.bin", "slow.bin", "small.txt"],
            "a refused upload leaves nothing behind: {listing}"
        );
    })
    .await;
}
