//! The Docker backend against the real engine and the real kernel image, through the
//! `Sandbox`/`KernelProcess` traits and the wire client. Needs the image:
//! `kernel-image/build.sh` (prints its tag; builds it when missing).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::query_parameters::{
    KillContainerOptions, ListContainersOptions, RemoveContainerOptions,
};
use kernelbox::kernel::{Channel, ClientOptions, Incoming, KernelClient};
use kernelbox::sandbox::docker::{
    DockerConfig, DockerKernel, DockerSandbox, KernelTransport, LABEL_INSTANCE, WorkDirStorage,
    default_image_tag,
};
use kernelbox::sandbox::{ExitReason, KernelProcess, LaunchSpec, Sandbox, SandboxError};
use serde_json::{Value, json};
use tokio::sync::mpsc;

const MIB: i64 = 1024 * 1024;
/// Generous: two engineers compile on the same two cores.
const TIMEOUT: Duration = Duration::from_secs(60);

/// A sandbox with its own state dir and instance id whose containers, volumes and state dir are
/// removed when it is dropped, even when the test panics.
struct Fixture {
    sandbox: DockerSandbox,
    state_dir: PathBuf,
}

impl Fixture {
    async fn new() -> Self {
        Self::with(|_| {}).await
    }

    async fn with(tune: impl FnOnce(&mut DockerConfig)) -> Self {
        let state_dir = PathBuf::from(format!(
            "/tmp/kbd-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        ));
        let mut config = DockerConfig {
            state_dir: state_dir.clone(),
            ..DockerConfig::default()
        };
        tune(&mut config);
        let sandbox = DockerSandbox::new(config)
            .await
            .unwrap_or_else(|err| panic!("{err} (build the image: kernel-image/build.sh)"));
        Self { sandbox, state_dir }
    }

    async fn launch(&self, session: &str) -> DockerKernel {
        self.sandbox
            .launch_kernel(&LaunchSpec {
                session_id: session.to_owned(),
                ..LaunchSpec::default()
            })
            .await
            .expect("launch")
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        remove_instance(self.sandbox.instance_id());
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// Removes everything labelled with `instance` with the docker CLI (works without a runtime).
fn remove_instance(instance: &str) {
    let filter = format!("label={LABEL_INSTANCE}={instance}");
    let ids = std::process::Command::new("docker")
        .args(["ps", "-aq", "--filter", &filter])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default();
    for id in ids.split_whitespace() {
        let _ = std::process::Command::new("docker")
            .args(["rm", "-f", id])
            .output();
    }
    let volumes = std::process::Command::new("docker")
        .args(["volume", "ls", "-q", "--filter", &filter])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default();
    for volume in volumes.split_whitespace() {
        let _ = std::process::Command::new("docker")
            .args(["volume", "rm", "-f", volume])
            .output();
    }
}

async fn docker() -> Docker {
    Docker::connect_with_defaults()
        .unwrap()
        .negotiate_version()
        .await
        .unwrap()
}

/// The containers labelled with `instance`.
async fn containers_of(instance: &str) -> Vec<String> {
    let filters = std::collections::HashMap::from([(
        "label".to_owned(),
        vec![format!("{LABEL_INSTANCE}={instance}")],
    )]);
    docker()
        .await
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_iter()
        .filter_map(|c| c.id)
        .collect()
}

/// A connected wire client.
struct Client {
    client: KernelClient,
    incoming: mpsc::Receiver<Incoming>,
}

/// What one cell produced.
#[derive(Debug, Default)]
struct Outcome {
    status: String,
    stdout: String,
    stderr: String,
    results: Vec<Value>,
    displays: Vec<Value>,
    error: Option<Value>,
}

impl Outcome {
    fn text(&self) -> String {
        self.results
            .iter()
            .filter_map(|r| r["data"]["text/plain"].as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Client {
    async fn connect(kernel: &dyn KernelProcess) -> Self {
        let (client, incoming) =
            KernelClient::connect(kernel.connection(), ClientOptions::default())
                .await
                .expect("kernel ready");
        Self { client, incoming }
    }

    /// Like `connect`, retrying while the engine's port proxy accepts connections the kernel is
    /// not listening behind yet (the wire client treats that failed greeting as fatal).
    async fn connect_retrying(kernel: &dyn KernelProcess) -> Self {
        let started = Instant::now();
        loop {
            match KernelClient::connect(kernel.connection(), ClientOptions::default()).await {
                Ok((client, incoming)) => return Self { client, incoming },
                Err(err) if started.elapsed() < TIMEOUT => {
                    eprintln!("not ready yet: {err}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(err) => panic!("kernel not ready: {err}"),
            }
        }
    }

    /// Sends `code` without waiting; returns the request's msg_id.
    async fn submit(&self, code: &str) -> String {
        self.client
            .request(
                Channel::Shell,
                "execute_request",
                json!({"code": code, "silent": false, "store_history": true,
                       "user_expressions": {}, "allow_stdin": false, "stop_on_error": true}),
                None,
            )
            .await
            .expect("send execute_request")
    }

    /// Collects the outputs of `msg_id` until its reply and idle status have both arrived.
    async fn collect(&mut self, msg_id: &str) -> Outcome {
        let mut outcome = Outcome::default();
        let (mut replied, mut idle) = (false, false);
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        while !(replied && idle) {
            let incoming = tokio::time::timeout_at(deadline, self.incoming.recv())
                .await
                .expect("cell timed out")
                .expect("client closed");
            let Incoming::Message { channel, msg } = incoming else {
                continue;
            };
            if msg.parent_header.as_ref().map(|h| h.msg_id.as_str()) != Some(msg_id) {
                continue;
            }
            let content = &msg.content;
            match (channel, msg.msg_type()) {
                (Channel::Shell, "execute_reply") => {
                    outcome.status = content["status"].as_str().unwrap_or("").to_owned();
                    replied = true;
                }
                (Channel::IoPub, "status") => idle |= content["execution_state"] == "idle",
                (Channel::IoPub, "stream") => {
                    let text = content["text"].as_str().unwrap_or("");
                    if content["name"] == "stderr" {
                        outcome.stderr.push_str(text);
                    } else {
                        outcome.stdout.push_str(text);
                    }
                }
                (Channel::IoPub, "execute_result") => outcome.results.push(content.value().clone()),
                (Channel::IoPub, "display_data") => outcome.displays.push(content.value().clone()),
                (Channel::IoPub, "error") => outcome.error = Some(content.value().clone()),
                _ => {}
            }
        }
        outcome
    }

    async fn run(&mut self, code: &str) -> Outcome {
        let id = self.submit(code).await;
        self.collect(&id).await
    }

    /// Runs `code` and returns its stdout, asserting it succeeded.
    async fn stdout(&mut self, code: &str) -> String {
        let outcome = self.run(code).await;
        assert_eq!(outcome.status, "ok", "{code}: {outcome:?}");
        outcome.stdout
    }
}

async fn exited_within(kernel: &dyn KernelProcess, limit: Duration) -> ExitReason {
    tokio::time::timeout(limit, kernel.exited())
        .await
        .expect("exited() did not resolve")
}

#[tokio::test]
async fn the_default_tag_is_the_build_scripts_tag() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new("bash")
        .arg(root.join("kernel-image/build.sh"))
        .arg("--print-tag")
        .output()
        .expect("run build.sh");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        default_image_tag()
    );
}

#[tokio::test]
async fn a_missing_engine_or_image_is_unavailable_with_a_hint() {
    let no_engine = DockerSandbox::new(DockerConfig {
        docker_host: Some("unix:///nonexistent/docker.sock".to_owned()),
        state_dir: PathBuf::from("/tmp/kbd-unused"),
        ..DockerConfig::default()
    })
    .await;
    match no_engine {
        Err(SandboxError::Unavailable { what, hint, .. }) => {
            assert!(what.contains("Docker engine"), "{what}");
            assert!(hint.contains("DOCKER_HOST"), "{hint}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let no_image = DockerSandbox::new(DockerConfig {
        image: "kernelbox-kernel:000000000000".to_owned(),
        state_dir: PathBuf::from("/tmp/kbd-unused"),
        ..DockerConfig::default()
    })
    .await;
    match no_image {
        Err(SandboxError::Unavailable { what, hint, .. }) => {
            assert!(what.contains("kernelbox-kernel:000000000000"), "{what}");
            assert!(hint.contains("kernelbox image build"), "{hint}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let _ = std::fs::remove_dir_all("/tmp/kbd-unused");
}

#[tokio::test]
async fn network_requests_are_refused_unless_allowed() {
    let fixture = Fixture::new().await;
    let refused = fixture
        .sandbox
        .launch(&LaunchSpec {
            session_id: "wants-net".to_owned(),
            network: true,
            ..LaunchSpec::default()
        })
        .await;
    assert!(
        matches!(refused, Err(SandboxError::Policy(_))),
        "{:?}",
        refused.err()
    );
    assert!(
        containers_of(fixture.sandbox.instance_id())
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn the_container_is_hardened_and_labelled() {
    let fixture = Fixture::with(|c| {
        c.memory_bytes = 512 * MIB;
        c.pids_limit = 128;
        c.cpus = 0.5;
    })
    .await;
    let kernel = fixture.launch("hardened").await;
    let id = kernel.container_id().await;
    let inspect = docker().await.inspect_container(&id, None).await.unwrap();
    let host = inspect.host_config.unwrap();
    assert_eq!(host.network_mode.as_deref(), Some("none"));
    assert_eq!(host.readonly_rootfs, Some(true));
    assert_eq!(host.cap_drop, Some(vec!["ALL".to_owned()]));
    assert_eq!(
        host.security_opt,
        Some(vec!["no-new-privileges".to_owned()])
    );
    assert_eq!(host.pids_limit, Some(128));
    assert_eq!(host.memory, Some(512 * MIB));
    assert_eq!(host.memory_swap, Some(512 * MIB));
    assert_eq!(host.nano_cpus, Some(500_000_000));
    assert_eq!(host.privileged, Some(false));
    assert!(host.tmpfs.unwrap()["/tmp"].contains("size="));
    let config = inspect.config.unwrap();
    assert_eq!(config.user.as_deref(), Some("1000:1000"));
    assert_eq!(config.entrypoint.unwrap()[0], "/usr/bin/tini");
    let labels = config.labels.unwrap();
    assert_eq!(labels["kernelbox.session"], "hardened");
    assert_eq!(labels["kernelbox.instance"], fixture.sandbox.instance_id());
    assert_eq!(labels["kernelbox.managed"], "true");
    // Nothing of the server's environment leaks in.
    let env = config.env.unwrap_or_default();
    assert!(
        env.iter()
            .all(|e| !e.starts_with("PIP_") && !e.starts_with("CARGO")),
        "{env:?}"
    );

    // The kernel's sockets appear in the host-side ipc dir the connection info names.
    let info = kernel.connection();
    assert!(
        info.ip.starts_with(fixture.state_dir.to_str().unwrap()),
        "{}",
        info.ip
    );
    let started = Instant::now();
    while !(1..=5).all(|n| Path::new(&format!("{}-{n}", info.ip)).exists()) {
        assert!(started.elapsed() < TIMEOUT, "no ipc sockets at {}", info.ip);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    kernel.shutdown().await.unwrap();
    kernel.shutdown().await.unwrap();
    assert!(
        containers_of(fixture.sandbox.instance_id())
            .await
            .is_empty()
    );
    assert!(!Path::new(&info.ip).parent().unwrap().exists());
    assert!(matches!(
        exited_within(&kernel, TIMEOUT).await,
        ExitReason::Vanished(_)
    ));
}

#[tokio::test]
async fn the_kernel_runs_code_inside_a_locked_down_container() {
    let fixture = Fixture::new().await;
    let kernel = fixture.launch("locked").await;
    let mut client = Client::connect(&kernel).await;
    assert_eq!(client.run("1+1").await.text(), "2");

    let probe = client
        .stdout(
            r#"
import os, socket
def attempt(f):
    try:
        f(); return "ok"
    except Exception as e:
        return type(e).__name__
def tcp():
    s = socket.socket(); s.settimeout(2); s.connect(("1.1.1.1", 53))
def dns():
    socket.getaddrinfo("pypi.org", 443)
def write_root():
    open("/kernelbox-probe", "w")
caps = [l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff")][0]
print(attempt(tcp), attempt(dns), os.getuid(), caps, attempt(write_root),
      os.path.exists("/var/run/docker.sock"), os.getcwd(), sep="|")
"#,
        )
        .await;
    let fields: Vec<&str> = probe.trim().split('|').collect();
    assert_ne!(fields[0], "ok", "tcp to 1.1.1.1:53 worked: {probe}");
    assert_ne!(fields[1], "ok", "DNS worked: {probe}");
    assert_ne!(fields[2], "0", "runs as root: {probe}");
    assert_eq!(fields[3], "0000000000000000", "capabilities: {probe}");
    assert_eq!(fields[4], "OSError", "/ is writable: {probe}");
    assert_eq!(fields[5], "False", "docker socket visible: {probe}");
    assert_eq!(fields[6], "/home/kernel/work");
    kernel.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_exit_code_is_reported_and_restart_brings_the_kernel_back() {
    let fixture = Fixture::new().await;
    let kernel = fixture.launch("exits").await;
    let mut client = Client::connect(&kernel).await;
    client
        .stdout("open('kept.txt', 'w').write('still here')")
        .await;
    client.submit("import os; os._exit(3)").await;
    let reason = exited_within(&kernel, TIMEOUT).await;
    assert_eq!(reason, ExitReason::ExitCode(3));
    assert_eq!(reason.to_string(), "exited with code 3");
    // Repeatable.
    assert_eq!(
        exited_within(&kernel, TIMEOUT).await,
        ExitReason::ExitCode(3)
    );

    let before = kernel.connection().clone();
    kernel.restart().await.unwrap();
    assert_eq!(kernel.connection(), &before);
    let waiting = tokio::time::timeout(Duration::from_millis(500), kernel.exited()).await;
    assert!(
        waiting.is_err(),
        "exited() reports the old run after restart"
    );
    let mut client = Client::connect(&kernel).await;
    assert_eq!(
        client.stdout("print(open('kept.txt').read())").await.trim(),
        "still here"
    );
    kernel.shutdown().await.unwrap();
}

#[tokio::test]
async fn out_of_memory_is_reported_and_files_survive_the_restart() {
    let fixture = Fixture::with(|c| {
        c.memory_bytes = 512 * MIB;
        c.work_dir_size_bytes = 32 * MIB;
    })
    .await;
    let kernel = fixture.launch("oom").await;
    let mut client = Client::connect(&kernel).await;
    client
        .stdout("open('notes.txt', 'w').write('before the crash')")
        .await;
    // The working dir is size-limited.
    let full = client
        .stdout(
            r#"
try:
    with open('big.bin', 'wb') as f:
        for _ in range(64):
            f.write(b'\0' * (1 << 20))
    print('wrote 64 MiB')
except OSError as e:
    print('errno', e.errno)
import os; os.remove('big.bin')
"#,
        )
        .await;
    assert_eq!(full.trim(), "errno 28", "working dir not limited: {full}");

    client.submit("x = b'x' * (4 << 30)").await;
    assert_eq!(
        exited_within(&kernel, TIMEOUT).await,
        ExitReason::OutOfMemory
    );

    kernel.restart().await.unwrap();
    let mut client = Client::connect(&kernel).await;
    assert_eq!(client.run("1+1").await.text(), "2");
    assert_eq!(
        client
            .stdout("print(open('notes.txt').read())")
            .await
            .trim(),
        "before the crash"
    );
    kernel.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_fork_loop_hits_the_pids_limit_and_the_kernel_survives() {
    let fixture = Fixture::with(|c| c.pids_limit = 64).await;
    let kernel = fixture.launch("forks").await;
    let mut client = Client::connect(&kernel).await;
    let out = client
        .stdout(
            r#"
import os, time
children, failure = [], None
for _ in range(1000):
    try:
        pid = os.fork()
    except OSError as e:
        failure = e.errno
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    children.append(pid)
for pid in children:
    os.kill(pid, 9)
for pid in children:
    os.waitpid(pid, 0)
print(len(children), failure)
"#,
        )
        .await;
    let mut fields = out.split_whitespace();
    let forked: usize = fields.next().unwrap().parse().unwrap();
    assert!(forked < 64, "forked {forked} processes: {out}");
    assert_eq!(fields.next(), Some("11"), "expected EAGAIN: {out}");
    assert_eq!(client.run("1+1").await.text(), "2");
    kernel.shutdown().await.unwrap();
}

#[tokio::test]
async fn interrupt_reaches_the_kernel_through_tini() {
    let fixture = Fixture::new().await;
    let kernel = fixture.launch("interrupt").await;
    let mut client = Client::connect(&kernel).await;
    client.stdout("x = 42").await;
    let id = client.submit("import time; time.sleep(30)").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = Instant::now();
    kernel.signal_interrupt().await.unwrap();
    let outcome = client.collect(&id).await;
    assert_eq!(outcome.status, "error");
    assert_eq!(outcome.error.unwrap()["ename"], "KeyboardInterrupt");
    assert!(sent.elapsed() < Duration::from_secs(5));
    assert_eq!(client.run("x").await.text(), "42");
    kernel.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_kill_or_removal_from_outside_is_reported() {
    let fixture = Fixture::new().await;
    let kernel = fixture.launch("killed").await;
    let docker = docker().await;
    docker
        .kill_container(&kernel.container_id().await, None::<KillContainerOptions>)
        .await
        .unwrap();
    assert_eq!(
        exited_within(&kernel, TIMEOUT).await,
        ExitReason::ExitCode(137)
    );

    kernel.restart().await.unwrap();
    docker
        .remove_container(
            &kernel.container_id().await,
            Some(RemoveContainerOptions {
                force: true,
                ..Default::default()
            }),
        )
        .await
        .unwrap();
    let reason = exited_within(&kernel, TIMEOUT).await;
    assert!(matches!(reason, ExitReason::Vanished(_)), "{reason:?}");

    // A vanished container is recreated by restart.
    kernel.restart().await.unwrap();
    let mut client = Client::connect(&kernel).await;
    assert_eq!(client.run("1+1").await.text(), "2");
    kernel.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_chinese_plot_renders_without_warnings_and_pyplot_imports_fast() {
    let fixture = Fixture::new().await;
    let kernel = fixture.launch("plot").await;
    let mut client = Client::connect(&kernel).await;
    let outcome = client
        .run(
            r#"
import time
started = time.perf_counter()
import matplotlib.pyplot as plt
import_seconds = time.perf_counter() - started
fig, ax = plt.subplots()
ax.plot([1, 2, 3], [1, 4, 9])
ax.set_title("中文标题：平方")
ax.set_xlabel("横轴")
plt.show()
print(f"{import_seconds:.3f}")
"#,
        )
        .await;
    assert_eq!(outcome.status, "ok", "{outcome:?}");
    assert_eq!(outcome.stderr, "", "warnings while plotting");
    assert!(
        outcome
            .displays
            .iter()
            .any(|d| d["data"]["image/png"].is_string()),
        "no PNG: {outcome:?}"
    );
    let import_seconds: f64 = outcome.stdout.trim().parse().unwrap();
    eprintln!("first `import matplotlib.pyplot`: {import_seconds} s");
    assert!(import_seconds < 3.0, "import took {import_seconds} s");
    kernel.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_host_working_dir_is_shared_with_the_host() {
    let fixture = Fixture::with(|c| c.work_dir = WorkDirStorage::HostDir).await;
    let kernel = fixture.launch("hostdir").await;
    let mut client = Client::connect(&kernel).await;
    client.stdout("open('hello.txt', 'w').write('hi')").await;
    let on_host = fixture.state_dir.join("sessions/hostdir/work/hello.txt");
    assert_eq!(std::fs::read_to_string(on_host).unwrap(), "hi");
    kernel.restart().await.unwrap();
    let mut client = Client::connect(&kernel).await;
    assert_eq!(
        client
            .stdout("print(open('hello.txt').read())")
            .await
            .trim(),
        "hi"
    );
    kernel.shutdown().await.unwrap();
}

#[tokio::test]
async fn cleanup_removes_this_instances_containers_only() {
    let ours = Fixture::new().await;
    let theirs = Fixture::new().await;
    assert_ne!(ours.sandbox.instance_id(), theirs.sandbox.instance_id());
    let _a = ours.launch("a").await;
    let _b = ours.launch("b").await;
    let other = theirs.launch("c").await;

    // A restarted server (same state dir) has the same instance id and cleans up its leftovers.
    let restarted = DockerSandbox::new(ours.sandbox.config().clone())
        .await
        .unwrap();
    assert_eq!(restarted.instance_id(), ours.sandbox.instance_id());
    assert_eq!(restarted.cleanup().await.unwrap(), 2);
    assert!(containers_of(ours.sandbox.instance_id()).await.is_empty());
    assert!(!ours.state_dir.join("sessions/a").exists());

    let id = other.container_id().await;
    let inspect = docker().await.inspect_container(&id, None).await.unwrap();
    assert_eq!(inspect.state.unwrap().running, Some(true));
    other.shutdown().await.unwrap();
}

/// Container start → kernel ready (wire client connected and `kernel_info` answered), median of
/// 10. Run with `cargo test --test docker_sandbox -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "a measurement, not a check"]
async fn start_to_ready_latency() {
    let fixture = Fixture::new().await;
    let mut samples = Vec::new();
    for n in 0..10 {
        let started = Instant::now();
        let kernel = fixture.launch(&format!("latency-{n}")).await;
        let launched = started.elapsed();
        let client = Client::connect(&kernel).await;
        let ready = started.elapsed();
        eprintln!("run {n}: launch {launched:?}, ready {ready:?}");
        samples.push(ready);
        drop(client);
        kernel.shutdown().await.unwrap();
    }
    samples.sort();
    eprintln!("median start -> ready: {:?}", samples[samples.len() / 2]);
}

/// The tcp transport (for engines on other hosts, with no shared directory): the kernel's ports
/// are published on the loopback address only, and stay the same across restarts.
#[tokio::test]
async fn the_tcp_transport_works_through_published_ports() {
    let fixture = Fixture::with(|c| {
        c.transport = KernelTransport::Tcp {
            connect_host: "127.0.0.1".to_owned(),
        };
    })
    .await;
    let kernel = fixture.launch("tcp").await;
    assert_eq!(kernel.connection().ip, "127.0.0.1");
    let mut client = Client::connect_retrying(&kernel).await;
    assert_eq!(client.run("1+1").await.text(), "2");
    kernel.restart().await.unwrap();
    let mut client = Client::connect_retrying(&kernel).await;
    assert_eq!(client.run("2+2").await.text(), "4");
    kernel.shutdown().await.unwrap();
}
