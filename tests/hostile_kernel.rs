//! A hostile kernel against the server's wire client: a cell writes raw ZMTP to its own socket
//! file descriptors (the kernel's end of every connection to the server). The server must
//! survive, report that session's kernel `dead` with the reason, and keep every other session
//! working. The server runs as a subprocess: an abort would otherwise take the test with it.
//!
//! The same attacks against the wire client alone (in process) check the typed `WireFault`.
//!
//! Local backend (needs the kernel venv: `cargo run -- setup`); the Docker variant needs the
//! kernel image (`kernel-image/build.sh`) and is skipped without Docker.
mod common;
#[path = "common/kernel.rs"]
mod kernel_common;

use std::time::Duration;

use common::serve_process::ServeProcess;
use kernelbox::kernel::{Channel, ClientOptions, Incoming, KernelClient, WireFault};
use serde_json::{Value, json};
use tokio::process::Command;

/// Writes `payload` to every connected socket of the kernel process (its ZeroMQ connections to
/// the server, whichever way they were opened); sockets that refuse a write are skipped.
fn attack(payload: &str) -> String {
    format!(
        r#"
import os, socket
payload = {payload}
hit = 0
for name in os.listdir('/proc/self/fd'):
    fd = int(name)
    try:
        if not os.readlink(f'/proc/self/fd/{{fd}}').startswith('socket:'):
            continue
        probe = socket.socket(fileno=os.dup(fd))
        try:
            probe.getpeername()  # connected sockets only
        finally:
            probe.close()
        os.write(fd, payload)
        hit += 1
    except OSError:
        pass
print('wrote to', hit, 'sockets')
"#
    )
}

/// A long-frame header declaring 2^62 bytes: the reproduced abort.
const HUGE_FRAME: &str = r"b'\x02' + (2**62).to_bytes(8, 'big')";
/// A frame header with the reserved command flag and a truncated greeting-like mess.
const MALFORMED: &str = r"b'\x04\x05\xffNOPE!' * 64";

/// `kernelbox serve` as a child process.
struct Server {
    process: ServeProcess,
    token: String,
}

impl Server {
    async fn start(backend_args: &[&str], extra: &[&str]) -> Self {
        let dir = common::temp_state_dir();
        let token = format!("hostile-{}", uuid::Uuid::new_v4().simple());
        let mut command = Command::new(env!("CARGO_BIN_EXE_kernelbox"));
        command
            .args([
                "serve",
                "--bind",
                "127.0.0.1:0",
                "--pool-size",
                "0",
                "--ephemeral",
            ])
            .args(backend_args)
            .args(extra)
            .env("KERNELBOX_STATE_DIR", &dir)
            .env("XDG_STATE_HOME", &dir)
            .env("KERNELBOX_TOKEN", &token)
            .env("KERNELBOX_LOG", "info");
        Self {
            process: ServeProcess::spawn(command).await,
            token,
        }
    }

    fn log(&self) -> String {
        self.process.log()
    }

    /// Panics (with the server's log) if the server process has ended.
    fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.process.child.try_wait() {
            panic!("the server died ({status}):\n{}", self.log());
        }
    }

    /// The session's next `kernel` `dead` event; panics with the server's log if the server
    /// died meanwhile (its WebSocket then breaks) or nothing came in 30 s.
    async fn wait_dead(&mut self, ws: &mut common::Ws) -> Value {
        use futures::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let frame = tokio::time::timeout_at(deadline, ws.stream.next()).await;
            let text = match frame {
                Ok(Some(Ok(Message::Text(text)))) => text,
                Ok(Some(Ok(_))) => continue,
                Ok(_) => {
                    // The connection broke: give the process a moment to be reaped.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    self.assert_alive();
                    panic!("the WebSocket broke; server log:\n{}", self.log());
                }
                Err(_) => panic!("no dead event in 30 s; server log:\n{}", self.log()),
            };
            let event: Value = serde_json::from_str(&text).expect("event is JSON");
            if event["type"] == "kernel" && event["state"] == "dead" {
                self.assert_alive();
                return event;
            }
        }
    }

    async fn session(&self) -> (String, common::Ws) {
        let resp = reqwest::Client::new()
            .post(format!("http://{}/v1/sessions", self.process.addr))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("POST /v1/sessions");
        assert_eq!(resp.status(), 201, "{:?}", resp.text().await);
        let body: Value = resp.json().await.expect("JSON body");
        let id = body["id"].as_str().expect("session id").to_owned();
        let url = format!(
            "ws://{}/v1/sessions/{id}/ws?token={}",
            self.process.addr, self.token
        );
        let (stream, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("ws connect");
        let mut ws = common::Ws { stream };
        ws.wait_kernel("idle").await;
        (id, ws)
    }

    async fn delete(&self, id: &str) {
        let _ = reqwest::Client::new()
            .delete(format!("http://{}/v1/sessions/{id}", self.process.addr))
            .bearer_auth(&self.token)
            .send()
            .await;
    }
}

/// Runs `code` (the attack) in one session of `server`, with a bystander session next to it.
async fn survives(mut server: Server, code: &str, reason_has: &str) {
    let (victim, mut attacked) = server.session().await;
    let (bystander, mut other) = server.session().await;
    assert_eq!(
        other.run("6 * 7").await.result_text().as_deref(),
        Some("42")
    );

    attacked.submit(code).await;
    let dead = server.wait_dead(&mut attacked).await;
    let reason = dead["reason"].as_str().unwrap_or_default().to_owned();
    assert!(
        reason.contains(reason_has),
        "the death's reason should say why: {dead}\nserver log:\n{}",
        server.log()
    );

    eprintln!("reported: {reason}");
    // The other session goes on, on the same server process.
    assert_eq!(
        other.run("6 * 7").await.result_text().as_deref(),
        Some("42")
    );
    let cell = other.run("print('still here')").await;
    assert_eq!(cell.stdout(), "still here\n");
    server.assert_alive();

    // The attacked session can be restarted into a fresh kernel.
    attacked.send(serde_json::json!({"type": "restart"})).await;
    attacked.wait_kernel("idle").await;
    assert_eq!(
        attacked.run("1 + 1").await.result_text().as_deref(),
        Some("2")
    );
    server.assert_alive();

    server.delete(&victim).await;
    server.delete(&bystander).await;
}

fn local() -> Vec<String> {
    vec![
        "--backend".into(),
        "local".into(),
        "--python".into(),
        common::python().display().to_string(),
    ]
}

async fn local_server(extra: &[&str]) -> Server {
    let args = local();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start(&args, extra).await
}

#[tokio::test]
async fn a_frame_declaring_2_pow_62_bytes_kills_only_its_own_session() {
    survives(local_server(&[]).await, &attack(HUGE_FRAME), "oversized").await;
}

#[tokio::test]
async fn malformed_zmtp_kills_only_its_own_session() {
    survives(local_server(&[]).await, &attack(MALFORMED), "malformed").await;
}

#[tokio::test]
async fn a_message_over_the_configured_maximum_kills_only_its_own_session() {
    // A real 3 MB message (a print) against a 1 MiB limit: no crafted bytes needed.
    let server = local_server(&["--max-kernel-message-mb", "1"]).await;
    survives(server, "print('x' * 3_000_000)", "oversized").await;
}

#[tokio::test]
async fn a_frame_declaring_2_pow_62_bytes_from_a_docker_kernel() {
    if std::process::Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        eprintln!("skipped: no Docker");
        return;
    }
    let server = Server::start(&["--backend", "docker"], &[]).await;
    survives(server, &attack(HUGE_FRAME), "oversized").await;
}

/// The wire client alone, in this process, against a real kernel that runs `code`: the first
/// fault it reports (an abort would end this test binary).
async fn client_fault(code: &str, opts: ClientOptions) -> WireFault {
    let kernel = kernel_common::TestKernel::start_tcp();
    let (client, mut rx) = KernelClient::connect(&kernel.info, opts)
        .await
        .unwrap_or_else(|e| panic!("connect failed: {e}"));
    let content = json!({"code": code, "silent": false, "store_history": false,
        "user_expressions": {}, "allow_stdin": false, "stop_on_error": true});
    client
        .request(Channel::Shell, "execute_request", content, None)
        .await
        .expect("send execute_request");
    let fault = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(item) = rx.recv().await {
            if let Incoming::Fault(fault) = item {
                return Some(*fault);
            }
        }
        None
    })
    .await;
    match fault {
        Ok(Some(fault)) => fault,
        Ok(None) => panic!("the client's channel closed without a fault"),
        Err(_) => panic!("no fault in 30 s"),
    }
}

#[tokio::test]
async fn the_client_reports_a_2_pow_62_byte_frame_as_oversized() {
    let fault = client_fault(&attack(HUGE_FRAME), ClientOptions::default()).await;
    assert!(
        matches!(fault, WireFault::Oversized { size, max, .. }
            if size > 1 << 62 && max == kernelbox::kernel::DEFAULT_MAX_MESSAGE_SIZE),
        "{fault:?}"
    );
}

#[tokio::test]
async fn the_client_reports_malformed_zmtp() {
    let fault = client_fault(&attack(MALFORMED), ClientOptions::default()).await;
    assert!(matches!(fault, WireFault::Malformed { .. }), "{fault:?}");
}

#[tokio::test]
async fn the_client_limit_is_configurable() {
    let opts = ClientOptions {
        max_message_size: 1 << 20,
        ..ClientOptions::default()
    };
    let fault = client_fault("print('x' * 3_000_000)", opts).await;
    assert!(
        matches!(fault, WireFault::Oversized { channel: "iopub", size, max: 1_048_576 }
            if size > 1 << 20),
        "{fault:?}"
    );
}
