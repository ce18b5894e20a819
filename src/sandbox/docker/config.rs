//! What an operator can tune about the Docker backend: the image, resource limits, the network
//! policy, where per-session state lives and how the kernel is reached.

use std::path::PathBuf;

use super::image::default_image_tag;
use crate::sandbox::packages::PackagePolicy;

const MIB: i64 = 1024 * 1024;

/// Where a local Docker engine's socket is, unless configured otherwise.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// The uid (and gid) kernels run as by default: the kernel image's `kernel` user.
pub const DEFAULT_KERNEL_UID: u32 = 1000;

/// Where a kernel's working directory (`/home/kernel/work`, its current directory) lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WorkDirStorage {
    /// A size-limited tmpfs Docker volume (`work_dir_size_bytes`), kept mounted across kernel
    /// restarts by a tiny idle "keeper" container of the same session, so files survive restarts
    /// (even after an out-of-memory kill) and vanish with the session. Its pages count against the
    /// kernel container's memory limit while that container runs.
    #[default]
    KeptTmpfs,
    /// A host directory `<state_dir>/sessions/<id>/work`, bind-mounted: files survive restarts
    /// and do not use memory, but the engine cannot limit its size on this kind of storage
    /// (`work_dir_size_bytes` is ignored), so a kernel can fill the host's disk.
    HostDir,
}

/// How the server reaches the kernel's ZeroMQ sockets.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum KernelTransport {
    /// Unix sockets in a per-session host directory bind-mounted into the container; the
    /// container keeps network mode `none`. Needs the engine on the server's machine.
    #[default]
    Ipc,
    /// TCP ports published by the engine on `connect_host` (for remote engines). The container
    /// then sits on `network_mode_when_allowed`, which normally grants it outbound network access:
    /// only use this with a network the operator has locked down.
    Tcp {
        /// The host name or address the server connects to for published ports.
        connect_host: String,
    },
}

/// Configuration of [`DockerSandbox`](super::DockerSandbox). Every field has a default that is
/// safe on a shared machine; operators change what their hosts need.
#[derive(Debug, Clone)]
pub struct DockerConfig {
    /// The kernel image. Default: [`default_image_tag`], the tag the embedded build inputs hash
    /// to, built by `kernelbox image build` or `kernel-image/build.sh`.
    pub image: String,
    /// The engine address (`unix:///…`, `tcp://…`); `None` uses `DOCKER_HOST` or `socket`.
    pub docker_host: Option<String>,
    /// The local engine's socket, used when neither `docker_host` nor `DOCKER_HOST` is set; its
    /// absence is what "no engine installed" means to `--backend auto`. Default
    /// [`DEFAULT_SOCKET`].
    pub socket: PathBuf,
    /// The OCI runtime kernel, keeper and installer containers run under (e.g. gVisor's `runsc`),
    /// which the engine must know (`docker info` → Runtimes). `None`: the engine's default
    /// (normally `runc`).
    pub runtime: Option<String>,
    /// Memory limit of a kernel container in bytes; swap is forbidden (memory-swap = memory).
    /// Includes the /tmp tmpfs and a `KeptTmpfs` working dir's contents. Default 1 GiB.
    pub memory_bytes: i64,
    /// CPU quota in CPUs (NanoCpus), e.g. 1.0 = one full core. Default 1.0.
    pub cpus: f64,
    /// Maximum number of processes and threads in a kernel container. Default 256.
    pub pids_limit: i64,
    /// Size of the tmpfs at /tmp (also holds per-container IPython/matplotlib state).
    /// Default 128 MiB.
    pub tmp_size_bytes: i64,
    /// Size limit of the working directory (for [`WorkDirStorage::KeptTmpfs`]). Default 256 MiB.
    pub work_dir_size_bytes: i64,
    /// Where the working directory lives. Default [`WorkDirStorage::KeptTmpfs`].
    pub work_dir: WorkDirStorage,
    /// The uid the kernel runs as: never root, never the server's own (a kernel with the
    /// server's uid could signal, trace or read the server and its files).
    /// [`DockerSandbox::new`](super::DockerSandbox::new) refuses either. Default
    /// [`DEFAULT_KERNEL_UID`]. The server must be able to hand it the session directories
    /// (chown) and still reach the sockets in them, i.e. run as root.
    pub uid: u32,
    /// The gid the kernel runs as. Default [`DEFAULT_KERNEL_UID`].
    pub gid: u32,
    /// Whether a session may ask for network access (`LaunchSpec::network`). Default false: such
    /// requests are refused with [`SandboxError::Policy`](crate::sandbox::SandboxError::Policy).
    pub allow_network_requests: bool,
    /// The Docker network a kernel joins when it was allowed network access. Default `bridge`.
    pub network_mode_when_allowed: String,
    /// Host directory for this server's state: the `instance-id` file and `sessions/<id>/`
    /// (ipc sockets, connection file, host working dirs). One per server process: servers sharing
    /// it share an instance id and clean up each other's containers. Default
    /// `$XDG_STATE_HOME/kernelbox` or `~/.local/state/kernelbox`.
    pub state_dir: PathBuf,
    /// Labels this server's containers (`kernelbox.instance`) so cleanup never touches another
    /// server's. `None` (default): read `<state_dir>/instance-id`, creating it once.
    pub instance_id: Option<String>,
    /// How the server reaches the kernel. Default [`KernelTransport::Ipc`].
    pub transport: KernelTransport,
    /// Whether and how sessions may install packages. Default: they may not.
    pub packages: PackagePolicy,
}

impl Default for DockerConfig {
    fn default() -> Self {
        Self {
            image: default_image_tag(),
            docker_host: None,
            socket: PathBuf::from(DEFAULT_SOCKET),
            runtime: None,
            memory_bytes: 1024 * MIB,
            cpus: 1.0,
            pids_limit: 256,
            tmp_size_bytes: 128 * MIB,
            work_dir_size_bytes: 256 * MIB,
            work_dir: WorkDirStorage::default(),
            uid: DEFAULT_KERNEL_UID,
            gid: DEFAULT_KERNEL_UID,
            allow_network_requests: false,
            network_mode_when_allowed: "bridge".to_owned(),
            state_dir: default_state_dir(),
            instance_id: None,
            transport: KernelTransport::default(),
            packages: PackagePolicy::default(),
        }
    }
}

fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("kernelbox");
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => PathBuf::from(home).join(".local/state/kernelbox"),
        None => PathBuf::from("/var/lib/kernelbox"),
    }
}
