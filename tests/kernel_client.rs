//! The wire client against a real ipykernel (no mocks): readiness, execute, stdout, stdin, interrupt,
//! tcp, heartbeat loss, a kernel dying mid-cell, a wrong key, and drop.
//!
//! Needs `KERNELBOX_PYTHON` (or the cached venv) with ipykernel installed.

#[path = "common/kernel.rs"]
mod kernel_common;

use std::time::Duration;

use kernel_common::{TestKernel, read_reply, read_until, summary};
use kernelbox::kernel::{Channel, ClientOptions, Incoming, KernelClient, KernelError, Message};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};

/// At most this many kernels at once: the machine is small and shared.
static KERNELS: Semaphore = Semaphore::const_new(3);

const STEP: Duration = Duration::from_secs(10);

fn options() -> ClientOptions {
    ClientOptions {
        ready_timeout: Duration::from_secs(60),
        ..ClientOptions::default()
    }
}

fn execute(code: &str) -> Value {
    json!({
        "code": code,
        "silent": false,
        "store_history": true,
        "user_expressions": {},
        "allow_stdin": true,
        "stop_on_error": true,
    })
}

async fn connect(
    kernel: &TestKernel,
    opts: ClientOptions,
) -> (KernelClient, mpsc::Receiver<Incoming>) {
    KernelClient::connect(&kernel.info, opts)
        .await
        .unwrap_or_else(|e| panic!("connect failed: {e}"))
}

/// Runs `1+1` and checks the whole exchange belongs to our request.
async fn one_plus_one(client: &KernelClient, rx: &mut mpsc::Receiver<Incoming>) {
    let id = client
        .request(Channel::Shell, "execute_request", execute("1+1"), None)
        .await
        .unwrap();
    let msgs = read_reply(rx, &id, STEP).await;
    let on = |channel| -> Vec<&str> {
        msgs.iter()
            .filter(|(c, _)| *c == channel)
            .map(|(_, m)| m.msg_type())
            .collect()
    };
    assert_eq!(
        on(Channel::IoPub),
        ["status", "execute_input", "execute_result", "status"]
    );
    assert_eq!(on(Channel::Shell), ["execute_reply"]);
    let busy = &msgs[0].1;
    assert_eq!(busy.msg_type(), "status");
    assert_eq!(busy.content["execution_state"], "busy");
    let result = msgs
        .iter()
        .find(|(_, m)| m.msg_type() == "execute_result")
        .expect("no execute_result");
    assert_eq!(result.0, Channel::IoPub);
    assert_eq!(result.1.content["data"]["text/plain"], "2");
    let reply = msgs
        .iter()
        .find(|(_, m)| m.msg_type() == "execute_reply")
        .expect("no execute_reply");
    assert_eq!(reply.0, Channel::Shell);
    assert_eq!(reply.1.content["status"], "ok");
    // The last iopub message is the idle status (the shell reply travels on another socket, so
    // it may come before or after it).
    let last_iopub = msgs
        .iter()
        .rev()
        .find(|(c, _)| *c == Channel::IoPub)
        .expect("iopub messages");
    assert_eq!(last_iopub.1.content["execution_state"], "idle");
}

#[tokio::test]
async fn ready_then_execute_over_ipc_and_drop_closes() {
    let _slot = KERNELS.acquire().await.unwrap();
    let kernel = TestKernel::start_ipc();
    let (client, mut rx) = connect(&kernel, options()).await;

    let info = client.kernel_info();
    assert_eq!(info["status"], "ok");
    assert!(info["protocol_version"].as_str().unwrap().starts_with('5'));
    assert_eq!(info["language_info"]["name"], "python");

    one_plus_one(&client, &mut rx).await;

    for channel in [Channel::IoPub, Channel::Heartbeat] {
        let msg = Message::new("kernel_info_request", client.session_id(), json!({}));
        assert!(matches!(
            client.send(channel, msg).await,
            Err(KernelError::WrongChannel(_))
        ));
    }

    // Readiness chatter never shows up: whatever is left is nobody's business but ours.
    tokio::time::sleep(Duration::from_millis(300)).await;
    if let Ok(item) = rx.try_recv() {
        panic!("unexpected leftover: {}", summary(&[item]));
    }

    drop(client);
    let end = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await;
    assert!(
        matches!(end, Ok(None)),
        "dropping the client must end every task"
    );
}

#[tokio::test]
async fn stdout_arrives_as_stream() {
    let _slot = KERNELS.acquire().await.unwrap();
    let kernel = TestKernel::start_ipc();
    let (client, mut rx) = connect(&kernel, options()).await;

    let id = client
        .request(
            Channel::Shell,
            "execute_request",
            execute("print('hello from kernel')"),
            None,
        )
        .await
        .unwrap();
    let msgs = read_reply(&mut rx, &id, STEP).await;
    let text: String = msgs
        .iter()
        .filter(|(c, m)| *c == Channel::IoPub && m.msg_type() == "stream")
        .inspect(|(_, m)| assert_eq!(m.content["name"], "stdout"))
        .map(|(_, m)| m.content["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(text, "hello from kernel\n");
}

#[tokio::test]
async fn input_round_trip_over_stdin() {
    let _slot = KERNELS.acquire().await.unwrap();
    let kernel = TestKernel::start_ipc();
    let (client, mut rx) = connect(&kernel, options()).await;

    let id = client
        .request(
            Channel::Shell,
            "execute_request",
            execute("x = input('name? ')\nprint('got', x)"),
            None,
        )
        .await
        .unwrap();
    let seen = read_until(&mut rx, STEP, |item| {
        matches!(
            item,
            Incoming::Message {
                channel: Channel::Stdin,
                ..
            }
        )
    })
    .await;
    let Some(Incoming::Message { msg: request, .. }) = seen.into_iter().last() else {
        unreachable!()
    };
    assert_eq!(request.msg_type(), "input_request");
    assert_eq!(request.content["prompt"], "name? ");
    assert_eq!(request.parent_id(), Some(id.as_str()));

    client
        .request(
            Channel::Stdin,
            "input_reply",
            json!({"value": "kernelbox"}),
            Some(&request.header),
        )
        .await
        .unwrap();
    let msgs = read_reply(&mut rx, &id, STEP).await;
    assert!(
        msgs.iter().any(|(_, m)| m.msg_type() == "stream"
            && m.content["text"]
                .as_str()
                .unwrap()
                .contains("got kernelbox")),
        "no echo of the input in {:?}",
        msgs.iter().map(|(_, m)| m.msg_type()).collect::<Vec<_>>()
    );
    let reply = msgs.iter().find(|(c, _)| *c == Channel::Shell).unwrap();
    assert_eq!(reply.1.content["status"], "ok");
}

#[tokio::test]
async fn interrupt_on_control_stops_sleep_quickly() {
    let _slot = KERNELS.acquire().await.unwrap();
    let kernel = TestKernel::start_ipc();
    let (client, mut rx) = connect(&kernel, options()).await;

    let id = client
        .request(
            Channel::Shell,
            "execute_request",
            execute("import time\ntime.sleep(30)"),
            None,
        )
        .await
        .unwrap();
    read_until(&mut rx, STEP, |item| {
        matches!(item, Incoming::Message { msg, .. }
            if msg.msg_type() == "execute_input" && msg.parent_id() == Some(id.as_str()))
    })
    .await;
    // Let the cell actually enter time.sleep.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = tokio::time::Instant::now();
    let interrupt = client
        .request(Channel::Control, "interrupt_request", json!({}), None)
        .await
        .unwrap();
    let mut interrupt_replied = false;
    let mut error_name = None;
    let mut execute_status = None;
    read_until(&mut rx, Duration::from_secs(5), |item| {
        if let Incoming::Message { channel, msg } = item {
            match (channel, msg.msg_type()) {
                (Channel::Control, "interrupt_reply") => {
                    interrupt_replied = msg.parent_id() == Some(interrupt.as_str())
                }
                (Channel::IoPub, "error") if msg.parent_id() == Some(id.as_str()) => {
                    error_name = msg.content["ename"].as_str().map(str::to_owned)
                }
                (Channel::Shell, "execute_reply") if msg.parent_id() == Some(id.as_str()) => {
                    execute_status = msg.content["status"].as_str().map(str::to_owned)
                }
                _ => {}
            }
        }
        interrupt_replied && execute_status.is_some()
    })
    .await;
    let took = started.elapsed();
    assert_eq!(error_name.as_deref(), Some("KeyboardInterrupt"));
    assert_eq!(execute_status.as_deref(), Some("error"));
    assert!(took < Duration::from_secs(3), "interrupt took {took:?}");
}

#[tokio::test]
async fn tcp_transport_works() {
    let _slot = KERNELS.acquire().await.unwrap();
    let kernel = TestKernel::start_tcp();
    let (client, mut rx) = connect(&kernel, options()).await;
    one_plus_one(&client, &mut rx).await;
}

#[tokio::test]
async fn stopped_kernel_loses_heartbeat() {
    let _slot = KERNELS.acquire().await.unwrap();
    let kernel = TestKernel::start_ipc();
    let opts = ClientOptions {
        heartbeat_interval: Duration::from_millis(200),
        heartbeat_misses: 3,
        ..options()
    };
    let (_client, mut rx) = connect(&kernel, opts).await;

    // A live kernel answers: no HeartbeatLost for a while (the kernel's own unparented
    // `status: starting` may show up; it is a real kernel message and is forwarded).
    let quiet = tokio::time::timeout(Duration::from_millis(1000), async {
        while let Some(item) = rx.recv().await {
            assert!(!matches!(item, Incoming::HeartbeatLost), "live kernel lost");
        }
    })
    .await;
    assert!(quiet.is_err(), "incoming channel closed early");

    kernel.signal("STOP");
    let started = tokio::time::Instant::now();
    let seen = read_until(&mut rx, Duration::from_secs(5), |item| {
        matches!(item, Incoming::HeartbeatLost)
    })
    .await;
    let took = started.elapsed();
    kernel.signal("CONT");
    assert_eq!(
        seen.len(),
        1,
        "only HeartbeatLost expected: {}",
        summary(&seen)
    );
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(2),
        "HeartbeatLost after {took:?}"
    );
    // Reported once only.
    let again = tokio::time::timeout(Duration::from_millis(800), rx.recv()).await;
    assert!(again.is_err(), "unexpected {again:?}");
}

/// A kernel killed mid-cell: the client does not hang. Each socket task sees its peer go away
/// and ends, so `send` returns `Err(Closed)` at once; the heartbeat reports `HeartbeatLost` after
/// its misses, and then the incoming channel closes (`None`).
#[tokio::test]
async fn kernel_killed_mid_cell_does_not_hang() {
    let _slot = KERNELS.acquire().await.unwrap();
    let mut kernel = TestKernel::start_ipc();
    let opts = ClientOptions {
        heartbeat_interval: Duration::from_millis(200),
        heartbeat_misses: 3,
        ..options()
    };
    let (client, mut rx) = connect(&kernel, opts).await;

    let id = client
        .request(
            Channel::Shell,
            "execute_request",
            execute("import time\ntime.sleep(30)"),
            None,
        )
        .await
        .unwrap();
    read_until(&mut rx, STEP, |item| {
        matches!(item, Incoming::Message { msg, .. }
            if msg.msg_type() == "execute_input" && msg.parent_id() == Some(id.as_str()))
    })
    .await;

    kernel.child.kill().await.unwrap();

    let mut lost = false;
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(item) = rx.recv().await {
            match item {
                Incoming::HeartbeatLost => lost = true,
                Incoming::Message { channel, msg } => {
                    panic!("unexpected {}/{}", channel.as_str(), msg.msg_type())
                }
                // A killed kernel's connections close; that is no protocol fault.
                Incoming::Fault(fault) => panic!("unexpected fault: {fault}"),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "incoming channel did not close");
    assert!(lost, "no HeartbeatLost before close");

    let sent = tokio::time::timeout(
        Duration::from_secs(1),
        client.request(Channel::Shell, "execute_request", execute("1"), None),
    )
    .await
    .expect("send after death hung");
    assert!(matches!(sent, Err(KernelError::Closed)), "{sent:?}");
    assert!(client.is_closed());
}

#[tokio::test]
async fn wrong_key_is_never_ready() {
    let _slot = KERNELS.acquire().await.unwrap();
    let kernel = TestKernel::start_ipc();
    let mut info = kernel.info.clone();
    info.key = "not-the-kernels-key".into();
    let opts = ClientOptions {
        ready_timeout: Duration::from_secs(8),
        ..options()
    };
    let result = KernelClient::connect(&info, opts).await;
    assert!(
        matches!(result, Err(KernelError::NotReady(_))),
        "{:?}",
        result.err()
    );
}

/// A kernel that stops reading its shell socket (here: SIGSTOP) never makes `send` wait: the
/// socket's buffers fill, then the client's bounded queue, then sends are refused at once with
/// `Backlog`. Control still takes messages (its own queue), and once the kernel runs again
/// everything queued reaches it.
#[tokio::test]
async fn send_never_waits_on_a_kernel_that_stopped_reading() {
    let _slot = KERNELS.acquire().await.unwrap();
    let kernel = TestKernel::start_ipc();
    let (client, mut rx) = connect(&kernel, options()).await;
    kernel.signal("STOP");
    // 1 MiB requests: the byte bound (64 MiB) is reached after some 64 past the socket buffers.
    let code = format!("# {}", "p".repeat(1 << 20));
    let mut refused = None;
    for i in 0..1000 {
        let content = json!({"code": code, "cursor_pos": 1});
        let sent = tokio::time::timeout(
            Duration::from_secs(5),
            client.request(Channel::Shell, "complete_request", content, None),
        )
        .await;
        match sent {
            Err(_) => {
                kernel.signal("CONT");
                panic!("send {i} waited on a stopped kernel");
            }
            Ok(Err(e)) => {
                refused = Some((i, e));
                break;
            }
            Ok(Ok(_)) => {}
        }
    }
    let control = client
        .request(Channel::Control, "kernel_info_request", json!({}), None)
        .await;
    kernel.signal("CONT");
    let (i, error) = refused.expect("no send was refused");
    assert!(
        matches!(
            error,
            KernelError::Backlog {
                channel: "shell",
                ..
            }
        ),
        "send {i}: {error}"
    );
    assert!(i > 10, "refused too early, at send {i}");
    let control = control.expect("control refused while only shell is backed up");
    read_until(&mut rx, Duration::from_secs(60), |item| {
        matches!(item, Incoming::Message { channel: Channel::Control, msg }
            if msg.parent_id() == Some(control.as_str()))
    })
    .await;
    drop(kernel);
}
