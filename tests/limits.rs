//! Limits, each hit for real against Docker sessions, with the message the client gets.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::TestServer;
use futures::StreamExt;
use kernelbox::sandbox::docker::{DockerConfig, DockerSandbox};
use kernelbox::session::SessionOptions;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

async fn docker_server(options: SessionOptions) -> TestServer {
    let sandbox = DockerSandbox::new(DockerConfig {
        state_dir: common::temp_state_dir(),
        ..DockerConfig::default()
    })
    .await
    .unwrap_or_else(|err| panic!("{err} (build the image: kernel-image/build.sh)"));
    TestServer::start(Arc::new(sandbox), options).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cell_that_ignores_its_interrupt_gets_the_kernel_restarted() {
    let options = SessionOptions {
        timeout_restart_grace: Duration::from_secs(2),
        ..SessionOptions::default()
    };
    common::run_against(docker_server(options).await, async |server| {
        let (_, mut ws) = server.session().await;
        ws.run("doomed = 1").await;
        let id = uuid::Uuid::new_v4().simple().to_string();
        let stubborn = "import time\nwhile True:\n    try:\n        time.sleep(0.1)\n    except KeyboardInterrupt:\n        pass";
        ws.send(json!({"type": "execute", "id": id, "code": stubborn, "timeout_s": 1}))
            .await;
        let cell = ws.collect(&id).await;
        let notes: Vec<&str> = cell
            .of("error")
            .iter()
            .filter(|e| e["ename"] == "CellTimeout")
            .filter_map(|e| e["evalue"].as_str())
            .collect();
        assert!(notes.iter().any(|n| n.contains("interrupting")), "{notes:?}");
        assert!(notes.iter().any(|n| n.contains("restarting the kernel")), "{notes:?}");
        assert_eq!(cell.status(), "timeout");
        ws.wait_kernel("idle").await;
        let after = ws.run("doomed").await;
        assert_eq!(after.ename().as_deref(), Some("NameError"), "the kernel was restarted");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_past_the_cell_cap_is_dropped_and_counted() {
    let options = SessionOptions {
        max_cell_output_bytes: 100_000,
        ..SessionOptions::default()
    };
    common::run_against(docker_server(options).await, async |server| {
        let (_, mut ws) = server.session().await;
        let cell = ws
            .run("for i in range(1000):\n    print('x' * 999, flush=True)")
            .await;
        assert_eq!(cell.status(), "ok");
        assert!(
            cell.stdout().len() <= 100_000,
            "{} bytes relayed",
            cell.stdout().len()
        );
        let notes: Vec<&str> = cell
            .of("error")
            .iter()
            .filter(|e| e["ename"] == "OutputLimit")
            .filter_map(|e| e["evalue"].as_str())
            .collect();
        assert_eq!(
            notes.len(),
            2,
            "one when it starts dropping, one with the total: {notes:?}"
        );
        assert!(notes[1].starts_with("dropped "), "{}", notes[1]);
        assert!(
            notes[1].contains("97.7 KiB"),
            "the limit is named: {}",
            notes[1]
        );
        // The next cell starts from zero.
        assert_eq!(ws.run("print('fine')").await.stdout(), "fine\n");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_are_culled_but_busy_and_connected_ones_are_not() {
    let options = SessionOptions {
        cull_idle: Some(Duration::from_secs(1)),
        ..SessionOptions::default()
    };
    common::run_against(docker_server(options).await, async |server| {
        let (idle, ws) = server.session().await;
        drop(ws);
        let (connected, _kept_open) = server.session().await;
        let (busy, mut busy_ws) = server.session().await;
        busy_ws.submit("import time; time.sleep(5)").await;
        busy_ws
            .until(|e| e["type"] == "status" && e["state"] == "busy")
            .await;
        drop(busy_ws);
        let deadline = Instant::now() + Duration::from_secs(4);
        while server.sessions.get(&idle).is_some() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            server.sessions.get(&idle).is_none(),
            "the idle session was culled"
        );
        assert!(
            server.sessions.get(&connected).is_some(),
            "connected sessions are kept"
        );
        assert!(
            server.sessions.get(&busy).is_some(),
            "busy sessions are kept"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_limit_is_a_429_with_a_message() {
    let options = SessionOptions {
        max_sessions: 1,
        ..SessionOptions::default()
    };
    common::run_against(docker_server(options).await, async |server| {
        server.create_session().await;
        let resp = server
            .http()
            .post(server.url("/v1/sessions"))
            .bearer_auth(&server.token)
            .send()
            .await
            .expect("post");
        assert_eq!(resp.status(), 429);
        let body: serde_json::Value = resp.json().await.expect("json");
        assert!(
            body["error"]
                .as_str()
                .unwrap_or("")
                .contains("maximum of 1 sessions"),
            "{body}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_websocket_message_is_refused_and_the_session_lives_on() {
    common::run_against(
        docker_server(SessionOptions::default()).await,
        async |server| {
            let (id, mut ws) = server.session().await;
            let huge = format!(r#"{{"type":"execute","code":"{}"}}"#, "x".repeat(17 << 20));
            let _ = futures::SinkExt::send(&mut ws.stream, Message::Text(huge.into())).await;
            let closed = tokio::time::timeout(Duration::from_secs(10), async {
                while let Some(frame) = ws.stream.next().await {
                    match frame {
                        Ok(Message::Close(frame)) => return frame.map(|f| f.code),
                        Ok(_) => continue,
                        Err(_) => return None,
                    }
                }
                None
            })
            .await
            .expect("the connection ends");
            if let Some(code) = closed {
                assert_eq!(code, CloseCode::Size, "closed as too big");
            }
            let mut again = server.ws(&id).await;
            assert_eq!(again.run("1 + 1").await.result_text().as_deref(), Some("2"));
        },
    )
    .await;
}

/// A client that stops reading while a cell floods output is cut off with a reason; the kernel,
/// the other clients and other sessions never wait for it, and memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_and_nobody_waits_for_it() {
    common::run_against(
        docker_server(SessionOptions::default()).await,
        async |server| {
            let (id, mut reader) = server.session().await;
            // A client with a tiny receive buffer, so the kernel's socket buffers cannot hide it.
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
            let tcp = socket.connect(server.addr).await.expect("connect");
            let url = format!(
                "ws://{}/v1/sessions/{id}/ws?token={}",
                server.addr, server.token
            );
            let (stream, _) =
                tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(tcp))
                    .await
                    .expect("ws handshake");
            let mut stalled = common::Ws { stream };
            stalled.next().await; // the greeting; then it reads nothing more
            let (_, mut other) = server.session().await;
            let rss_before = rss_kib();
            let flood = reader
                .submit("for i in range(300):\n    print('y' * 65536, flush=True)")
                .await;
            // Another session keeps working during the flood.
            let started = Instant::now();
            assert_eq!(
                other.run("21 * 2").await.result_text().as_deref(),
                Some("42")
            );
            let other_took = started.elapsed();
            let flooded = reader.collect(&flood).await;
            assert_eq!(flooded.status(), "ok");
            assert_eq!(
                flooded.stdout().len(),
                300 * 65537,
                "the reading client got everything"
            );
            let rss_after = rss_kib();
            eprintln!(
                "flood of 49 MB: test process RSS {rss_before} KiB → {rss_after} KiB; \
             other session's cell took {other_took:?}"
            );
            // Past the server's patience with a client that does not read…
            tokio::time::sleep(kernelbox::api::outbound::SLOW_CLIENT + Duration::from_secs(2))
                .await;
            // …the stalled client finds its connection ended with a close frame saying how to resume
            // (or, if even the close frame could not reach it, simply ended).
            let ended = tokio::time::timeout(Duration::from_secs(40), async {
                while let Some(frame) = stalled.stream.next().await {
                    match frame {
                        Ok(Message::Close(frame)) => return Some(frame),
                        Ok(_) => continue,
                        Err(_) => return None,
                    }
                }
                None
            })
            .await
            .expect("the stalled connection is ended by the server");
            if let Some(close) = ended.flatten() {
                assert_eq!(u16::from(close.code), 4008);
                assert!(close.reason.contains("since="), "{}", close.reason);
            }
        },
    )
    .await;
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
