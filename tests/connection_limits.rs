//! The server bounds its connections (issue 12): at most `max_connections` at once (an
//! upgraded WebSocket keeps its slot), more are closed at once while the open ones keep
//! working; and a client that trickles a request's headers (slowloris) is disconnected after
//! the header read timeout. Short limits, generous bounds: nothing here measures timing.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Ws;
use kernelbox::api::{self, AppState, ConnectionLimits, Token};
use kernelbox::sandbox::local::LocalSandbox;
use kernelbox::session::{SessionManager, SessionOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

const TOKEN: &str = "connection-limits-token-0123";

/// A server with `limits`, stopped (gracefully) by [`Server::stop`].
struct Server {
    addr: SocketAddr,
    sessions: Arc<SessionManager>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(limits: ConnectionLimits) -> Self {
        let sandbox = LocalSandbox::new(common::python(), common::temp_state_dir()).expect("local");
        let options = SessionOptions {
            pool_size: 0,
            ..SessionOptions::default()
        };
        let sessions = SessionManager::new(Arc::new(sandbox), options);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = AppState::new(sessions.clone(), Token::new(TOKEN));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(api::serve_with(listener, state, limits, async move {
            let _ = stopped.await;
        }));
        Self {
            addr,
            sessions,
            stop,
            task,
        }
    }

    /// Closes every session, then stops the server; it must return once its connections end.
    async fn stop(self) {
        self.sessions.shutdown().await;
        let _ = self.stop.send(());
        let served = tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the server stops within 30 s of its shutdown signal");
        served.expect("server task").expect("server");
    }
}

/// Sends one keep-alive `GET /healthz` on `tcp` and reads its response's head and body.
async fn healthz(tcp: &mut TcpStream) -> String {
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .expect("write");
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&response).contains("\"status\":\"ok\"") {
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
            .await
            .expect("the server answers within 10 s")
            .expect("read");
        assert!(
            n > 0,
            "closed mid-answer: {:?}",
            String::from_utf8_lossy(&response)
        );
        response.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&response).into_owned()
}

/// Whether the server closes `tcp` (end of stream or reset) within `bound`, without answering.
async fn closed_within(tcp: &mut TcpStream, bound: Duration) -> bool {
    let mut buf = [0u8; 1024];
    match tokio::time::timeout(bound, tcp.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(n)) => panic!(
            "the server answered instead: {:?}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_closed_while_open_ones_keep_working() {
    let server = Server::start(ConnectionLimits {
        max_connections: 2,
        header_read_timeout: Duration::from_secs(30),
    })
    .await;
    // Slot 1: a session's WebSocket (it keeps the slot after the upgrade).
    let created: serde_json::Value = reqwest::Client::new()
        .post(format!("http://{}/v1/sessions", server.addr))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("json");
    let id = created["id"].as_str().expect("id").to_owned();
    // (reqwest's pooled connection above may still hold a slot for a moment; wait it out.)
    let url = format!("ws://{}/v1/sessions/{id}/ws?token={TOKEN}", server.addr);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut ws = loop {
        match tokio_tungstenite::connect_async(&url).await {
            Ok((stream, _)) => break Ws { stream },
            Err(e) => {
                assert!(Instant::now() < deadline, "cannot open the WebSocket: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    ws.wait_kernel("idle").await;
    // Slot 2: a kept-alive HTTP connection.
    let mut kept = loop {
        let mut tcp = TcpStream::connect(server.addr).await.expect("connect");
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 4096];
        match tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => break tcp,
            _ => {
                assert!(Instant::now() < deadline, "no second slot came free");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };

    // A third connection is closed at once, before any answer.
    let mut third = TcpStream::connect(server.addr).await.expect("connect");
    let _ = third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        .await;
    assert!(
        closed_within(&mut third, Duration::from_secs(10)).await,
        "a connection beyond the limit is closed"
    );

    // The open ones keep working.
    assert!(healthz(&mut kept).await.starts_with("HTTP/1.1 200"));
    let cell = ws.run("print(6 * 7)").await;
    assert_eq!(cell.stdout(), "42\n");

    // Closing the WebSocket gives its slot back.
    drop(ws);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut tcp = TcpStream::connect(server.addr).await.expect("connect");
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 4096];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await
            && n > 0
        {
            assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the WebSocket's slot never came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(kept);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stalls_in_its_headers_is_disconnected() {
    let server = Server::start(ConnectionLimits {
        max_connections: 16,
        header_read_timeout: Duration::from_secs(1),
    })
    .await;
    // Half a request line, then nothing.
    let mut slow = TcpStream::connect(server.addr).await.expect("connect");
    slow.write_all(b"GET /heal").await.expect("write");
    assert!(
        closed_within(&mut slow, Duration::from_secs(15)).await,
        "a client stalling mid-request-line is disconnected after the header read timeout"
    );
    // Headers begun but never finished.
    let mut slow = TcpStream::connect(server.addr).await.expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Slow: ")
        .await
        .expect("write");
    assert!(
        closed_within(&mut slow, Duration::from_secs(15)).await,
        "a client stalling mid-headers is disconnected"
    );
    // A prompt client is served as ever.
    let mut prompt = TcpStream::connect(server.addr).await.expect("connect");
    assert!(healthz(&mut prompt).await.starts_with("HTTP/1.1 200"));
    drop(prompt);
    server.stop().await;
}
