//! A kernel plants symlinks, fifos and swapped directories wherever it can write, then makes
//! the server act (restart, shutdown): the server, running as root on the host, must never
//! follow them. Against the real engine and the real kernel image (`kernel-image/build.sh`).
//!
//! The attack these reproduce: the directory the server wrote the connection file into on a
//! restart was writable by the kernel and mounted into its container, so a symlink named like
//! the server's temporary file made the server overwrite, chmod and chown any host file.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kernelbox::kernel::{Channel, ClientOptions, Incoming, KernelClient};
use kernelbox::sandbox::docker::{DockerConfig, DockerKernel, DockerSandbox, LABEL_INSTANCE};
use kernelbox::sandbox::{KernelProcess, LaunchSpec};
use serde_json::json;
use tokio::sync::mpsc;

/// Generous: several engineers compile on the same two cores.
const TIMEOUT: Duration = Duration::from_secs(60);
/// A restart that nothing interferes with takes a second or two.
const PROMPT_RESTART: Duration = Duration::from_secs(20);

/// A sandbox with its own state dir and instance id, removed (containers, volumes, dirs) on drop.
struct Fixture {
    sandbox: DockerSandbox,
    state_dir: PathBuf,
    /// Host files the kernel aims at, outside the state dir.
    targets: PathBuf,
}

impl Fixture {
    async fn new() -> Self {
        let tag = &uuid::Uuid::new_v4().simple().to_string()[..10];
        let state_dir = PathBuf::from(format!("/tmp/kbp-{tag}"));
        let targets = PathBuf::from(format!("/tmp/kbp-targets-{tag}"));
        std::fs::create_dir_all(&targets).unwrap();
        let config = DockerConfig {
            state_dir: state_dir.clone(),
            ..DockerConfig::default()
        };
        let sandbox = DockerSandbox::new(config)
            .await
            .unwrap_or_else(|err| panic!("{err} (build the image: kernel-image/build.sh)"));
        Self {
            sandbox,
            state_dir,
            targets,
        }
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

    /// A root-owned file only root may write, with known contents.
    fn sentinel(&self, name: &str) -> Sentinel {
        let path = self.targets.join(name);
        std::fs::write(&path, "the host's own contents\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        Sentinel::of(path)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let filter = format!("label={LABEL_INSTANCE}={}", self.sandbox.instance_id());
        for what in [["ps", "-aq"], ["volume", "ls"]] {
            let mut args: Vec<&str> = what.to_vec();
            if what[0] == "volume" {
                args.push("-q");
            }
            let ids = std::process::Command::new("docker")
                .args(&args)
                .args(["--filter", &filter])
                .output()
                .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
                .unwrap_or_default();
            for id in ids.split_whitespace() {
                let rm: &[&str] = if what[0] == "volume" {
                    &["volume", "rm", "-f"]
                } else {
                    &["rm", "-f"]
                };
                let _ = std::process::Command::new("docker")
                    .args(rm)
                    .arg(id)
                    .output();
            }
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
        let _ = std::fs::remove_dir_all(&self.targets);
    }
}

/// A host file's contents, mode and owner, to compare after the attack.
#[derive(Debug, PartialEq)]
struct Sentinel {
    path: PathBuf,
    contents: Vec<u8>,
    mode: u32,
    owner: (u32, u32),
}

impl Sentinel {
    fn of(path: PathBuf) -> Self {
        let meta = std::fs::symlink_metadata(&path).expect("sentinel exists");
        Self {
            contents: std::fs::read(&path).unwrap(),
            mode: meta.mode(),
            owner: (meta.uid(), meta.gid()),
            path,
        }
    }

    fn assert_untouched(&self) {
        let now = Sentinel::of(self.path.clone());
        assert_eq!(
            &now, self,
            "the server changed a host file the kernel pointed it at"
        );
    }
}

/// A connected wire client.
struct Client {
    client: KernelClient,
    incoming: mpsc::Receiver<Incoming>,
}

impl Client {
    async fn connect(kernel: &dyn KernelProcess) -> Self {
        let (client, incoming) =
            KernelClient::connect(kernel.connection(), ClientOptions::default())
                .await
                .expect("kernel ready");
        Self { client, incoming }
    }

    /// Runs `code`, asserts it succeeded and returns its stdout.
    async fn stdout(&mut self, code: &str) -> String {
        let msg_id = self
            .client
            .request(
                Channel::Shell,
                "execute_request",
                json!({"code": code, "silent": false, "store_history": true,
                       "user_expressions": {}, "allow_stdin": false, "stop_on_error": true}),
                None,
            )
            .await
            .expect("send execute_request");
        let (mut status, mut stdout, mut idle, mut error) = (None, String::new(), false, None);
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        while status.is_none() || !idle {
            let incoming = tokio::time::timeout_at(deadline, self.incoming.recv())
                .await
                .expect("cell timed out")
                .expect("client closed");
            let Incoming::Message { channel, msg } = incoming else {
                continue;
            };
            if msg.parent_header.as_ref().map(|h| h.msg_id.as_str()) != Some(msg_id.as_str()) {
                continue;
            }
            let content = &msg.content;
            match (channel, msg.msg_type()) {
                (Channel::Shell, "execute_reply") => {
                    status = content["status"].as_str().map(str::to_owned);
                }
                (Channel::IoPub, "status") => idle |= content["execution_state"] == "idle",
                (Channel::IoPub, "stream") => {
                    stdout.push_str(content["text"].as_str().unwrap_or(""));
                }
                (Channel::IoPub, "error") => error = Some(content.value().clone()),
                _ => {}
            }
        }
        assert_eq!(status.as_deref(), Some("ok"), "{code}: {error:?}");
        stdout
    }
}

/// Python that plants, in every directory under /run/kernelbox the kernel can write (and the
/// directories themselves where it can), symlinks named like every file the server writes or
/// might write there, pointing at `target`. Prints what it planted.
fn plant_symlinks(target: &Path) -> String {
    format!(
        r#"
import os
target = {target:?}
names = ['.kernel.json.tmp', 'kernel.json', '.kernel.json.new', 'kernel.json.tmp']
planted = []
for top, dirs, files in os.walk('/run/kernelbox'):
    for name in names:
        path = os.path.join(top, name)
        try:
            if os.path.lexists(path):
                os.remove(path)
            os.symlink(target, path)
            planted.append(path)
        except OSError:
            pass
print('planted', planted)
"#,
        target = target.to_string_lossy()
    )
}

/// Restarts and checks the kernel is back and working, all within `PROMPT_RESTART`.
async fn restart_promptly(kernel: &DockerKernel) {
    let started = Instant::now();
    tokio::time::timeout(PROMPT_RESTART, kernel.restart())
        .await
        .expect("the restart hung")
        .expect("restart");
    let mut client = tokio::time::timeout(PROMPT_RESTART, Client::connect(kernel))
        .await
        .expect("the restarted kernel never became ready");
    assert_eq!(client.stdout("print(6 * 7)").await.trim(), "42");
    assert!(
        started.elapsed() < PROMPT_RESTART,
        "restart took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinks_the_kernel_plants_do_not_make_a_restart_write_host_files() {
    let fixture = Fixture::new().await;
    let sentinel = fixture.sentinel("sentinel");
    let kernel = fixture.launch("planted").await;
    let mut client = Client::connect(&kernel).await;
    let planted = client.stdout(&plant_symlinks(&sentinel.path)).await;
    eprintln!("{planted}");
    drop(client);

    restart_promptly(&kernel).await;
    sentinel.assert_untouched();
    // Twice: the second restart finds whatever the first one left.
    restart_promptly(&kernel).await;
    sentinel.assert_untouched();
    kernel.shutdown().await.unwrap();
    sentinel.assert_untouched();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_file_is_out_of_the_kernels_reach() {
    let fixture = Fixture::new().await;
    let kernel = fixture.launch("readonly").await;
    let mut client = Client::connect(&kernel).await;
    // The kernel reads its connection file (it must), but can neither change nor replace it,
    // nor create anything next to it.
    let out = client
        .stdout(
            r#"
import glob, json, os
found = [p for p in glob.glob('/run/kernelbox/**/kernel.json', recursive=True)]
print(len(found))
for path in found:
    json.load(open(path))
    for attempt in (lambda: open(path, 'a'), lambda: os.remove(path),
                    lambda: os.symlink('/etc/passwd', os.path.join(os.path.dirname(path), 'x')),
                    lambda: os.rename(path, path + '.old')):
        try:
            attempt()
            print('allowed')
        except OSError as err:
            print('refused', err.errno)
"#,
        )
        .await;
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("1"), "{out}");
    assert!(
        lines.all(|line| line.starts_with("refused")),
        "the kernel could touch its connection file's directory:\n{out}"
    );
    kernel.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_or_a_directory_swapped_for_a_symlink_does_not_block_or_redirect_the_server() {
    let fixture = Fixture::new().await;
    let sentinel = fixture.sentinel("kept");
    let kernel = fixture.launch("swapped").await;
    let mut client = Client::connect(&kernel).await;
    // Fifos where files are expected, and, in the socket directory, an entry that is a symlink
    // to a host directory holding the sentinel: removing the session's directories must unlink
    // the link, not empty the directory behind it.
    client
        .stdout(&format!(
            r#"
import os
for top, dirs, files in os.walk('/run/kernelbox'):
    for name in ('.kernel.json.tmp', 'kernel.json', 'fifo'):
        path = os.path.join(top, name)
        try:
            if os.path.lexists(path):
                os.remove(path)
            os.mkfifo(path)
        except OSError:
            pass
    try:
        os.symlink({dir:?}, os.path.join(top, 'hostdir'))
    except OSError:
        pass
"#,
            dir = fixture.targets.to_string_lossy()
        ))
        .await;
    drop(client);
    restart_promptly(&kernel).await;
    tokio::time::timeout(TIMEOUT, kernel.shutdown())
        .await
        .expect("shutdown hung")
        .unwrap();
    sentinel.assert_untouched();
    assert!(
        !fixture.state_dir.join("sessions/swapped").exists(),
        "the session's directories are removed"
    );
}
