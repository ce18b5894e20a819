//! One session's kernel container: what it looks like (hardening, mounts, labels) and its
//! lifecycle ([`DockerKernel`]), with exits observed from the engine.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, ContainerStateStatusEnum, HostConfig, HostConfigLogConfig, Mount,
    MountType, PortBinding, VolumeCreateRequest,
};
use bollard::query_parameters::{
    KillContainerOptions, ListContainersOptions, RestartContainerOptions, StartContainerOptions,
    WaitContainerOptions,
};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;

use super::config::{KernelTransport, WorkDirStorage};
use super::state::{MAX_SOCKET_PATH, SessionDirs};
use super::{
    BACKEND, LABEL_INSTANCE, LABEL_MANAGED, LABEL_ROLE, LABEL_SESSION, Shared, control,
    engine_error, is_not_found, remove_container, remove_volume,
};
use crate::kernel::connection::Transport;
use crate::kernel::{Channel, ConnectionInfo};
use crate::sandbox::files::{HostFiles, SessionFiles};
use crate::sandbox::packages::{PACKAGES_DIR, PackageInstaller};
use crate::sandbox::{ExitReason, KernelProcess, LaunchSpec, PersistedKernel, SandboxError};

/// `kernelbox.role` of kernel containers.
pub(super) const ROLE_KERNEL: &str = "kernel";
/// `kernelbox.role` of working-dir keepers.
const ROLE_KEEPER: &str = "keeper";
/// Where the per-session ipc dir is mounted in the container.
const CONTAINER_IPC_DIR: &str = "/run/kernelbox";
/// The connection file's name in the ipc dir.
const CONNECTION_FILE: &str = "kernel.json";
/// The kernel's working directory (the image's WORKDIR).
pub(super) const CONTAINER_WORK_DIR: &str = "/home/kernel/work";
/// Container-side ports of the kernel's channels with the tcp transport.
const TCP_PORTS: [u16; 5] = [5555, 5556, 5557, 5558, 5559];

/// What the current run of a kernel container has come to.
#[derive(Debug, Clone)]
struct RunState {
    /// Bumped for every run (start, restart); a watcher only reports for its own run.
    generation: u64,
    /// `Some` once the run is over.
    exit: Option<ExitReason>,
}

/// The parts of a kernel that lifecycle operations change, behind one lock so restart,
/// interrupt and shutdown never interleave.
#[derive(Debug)]
struct Run {
    container_id: String,
    watcher: Option<JoinHandle<()>>,
    shut_down: bool,
}

/// A kernel running in a Docker container: the [`KernelProcess`] of [`DockerSandbox`](super::DockerSandbox).
/// Removes its container (best effort) if dropped without [`shutdown`](KernelProcess::shutdown).
#[derive(Debug)]
pub struct DockerKernel {
    shared: Arc<Shared>,
    session_id: String,
    dirs: SessionDirs,
    /// Host-side connection info (what the server connects to).
    connection: ConnectionInfo,
    /// The connection file as the kernel reads it (ipc only; rewritten before each restart).
    connection_file: Option<Vec<u8>>,
    /// How to create the kernel container again if it vanished.
    body: ContainerCreateBody,
    keeper_id: Option<String>,
    volume: Option<String>,
    /// The working dir's files (through the keeper, or the host dir).
    files: Arc<dyn SessionFiles>,
    /// Installs packages into the working dir.
    installer: Arc<dyn PackageInstaller>,
    state: Arc<watch::Sender<RunState>>,
    run: Mutex<Run>,
}

impl DockerKernel {
    /// The id of the current kernel container (changes only if it had to be recreated).
    pub async fn container_id(&self) -> String {
        self.run.lock().await.container_id.clone()
    }

    /// The session this kernel belongs to.
    pub fn session_id(&self) -> &str {
        &self.session_id
    }
}

/// The Docker part of a [`PersistedKernel`]: what [`adopt`] needs besides the connection info.
#[derive(Debug, Serialize, Deserialize)]
struct Details {
    /// The kernel container when the record was written (found by its labels if it was
    /// recreated since).
    container_id: String,
    /// The working-dir keeper, if any.
    keeper_id: Option<String>,
    /// The working-dir volume, if any.
    volume: Option<String>,
    /// The connection file as the kernel reads it (ipc), rewritten before each restart.
    connection_file: Option<String>,
    /// How to create the kernel container again if it vanishes.
    body: ContainerCreateBody,
}

/// Takes over the kernel container of a session that a previous server process launched: it
/// must still run, carry this instance's labels and (ipc) still have its sockets on this host.
/// Reconnecting is the caller's business (new sockets, readiness as after a launch).
pub(super) async fn adopt(
    shared: Arc<Shared>,
    kernel: &PersistedKernel,
) -> Result<DockerKernel, SandboxError> {
    let session = &kernel.session_id;
    let refuse = |why: String| SandboxError::NotAdoptable(format!("session {session}: {why}"));
    if kernel.backend != BACKEND {
        return Err(refuse(format!(
            "its kernel ran on the {} backend, not {BACKEND}",
            kernel.backend
        )));
    }
    let details: Details = serde_json::from_value(kernel.details.clone())
        .map_err(|err| refuse(format!("unreadable record of its containers: {err}")))?;
    let docker = &shared.docker;
    let inspect_error =
        |id: &str, err| engine_error(format_args!("cannot inspect container {id}"), err, refuse);
    let (container_id, inspect) = match docker.inspect_container(&details.container_id, None).await
    {
        Ok(inspect) => (details.container_id.clone(), inspect),
        // Recreated by a restart since the record was written: find it by its labels.
        Err(err) if is_not_found(&err) => {
            let id = find_kernel_container(&shared, session)
                .await?
                .ok_or_else(|| refuse("its kernel container is gone".to_owned()))?;
            match docker.inspect_container(&id, None).await {
                Ok(inspect) => (id, inspect),
                Err(err) if is_not_found(&err) => {
                    return Err(refuse("its kernel container is gone".to_owned()));
                }
                Err(err) => return Err(inspect_error(&id, err)),
            }
        }
        Err(err) => return Err(inspect_error(&details.container_id, err)),
    };
    let labels = inspect
        .config
        .as_ref()
        .and_then(|config| config.labels.clone())
        .unwrap_or_default();
    let label = |name: &str| labels.get(name).map(String::as_str).unwrap_or("");
    if label(LABEL_INSTANCE) != shared.instance_id || label(LABEL_SESSION) != session.as_str() {
        return Err(refuse(format!(
            "container {container_id} belongs to instance {:?} and session {:?}, not to this              server's instance {}",
            label(LABEL_INSTANCE),
            label(LABEL_SESSION),
            shared.instance_id
        )));
    }
    let state = inspect.state.unwrap_or_default();
    if state.running != Some(true) {
        let status = state
            .status
            .map_or_else(|| "not running".to_owned(), |s| s.to_string());
        return Err(refuse(format!(
            "its kernel container {container_id} is {status}"
        )));
    }
    if kernel.connection.transport == Transport::Ipc {
        // The directory of the kernel's sockets, bind-mounted into the container: without it
        // (state dir wiped, another host) the kernel cannot be reached. The sockets themselves
        // may not be there yet if the kernel has just been (re)started.
        let shell = kernel.connection.ipc_path(Channel::Shell);
        let dir = shell.parent().unwrap_or(std::path::Path::new("/"));
        if !dir.is_dir() {
            return Err(refuse(format!(
                "its kernel's socket directory {} is gone from this host",
                dir.display()
            )));
        }
    }
    if let Some(keeper) = &details.keeper_id {
        // Best effort, as at a restart: a keeper stopped from outside keeps nothing.
        if let Err(err) = docker
            .start_container(keeper, None::<StartContainerOptions>)
            .await
        {
            tracing::debug!(%err, session = %session, "cannot (re)start the working-dir keeper");
        }
    }
    let state = Arc::new(watch::Sender::new(RunState {
        generation: 0,
        exit: None,
    }));
    let watcher = spawn_watcher(docker.clone(), container_id.clone(), 0, state.clone());
    let dirs = shared.state.session(session);
    let (files, installer) = working_dir_access(
        &shared,
        session,
        &dirs,
        details.keeper_id.as_deref(),
        details.volume.as_deref(),
    );
    Ok(DockerKernel {
        files,
        installer,
        dirs,
        shared: shared.clone(),
        session_id: session.clone(),
        connection: kernel.connection.clone(),
        connection_file: details.connection_file.map(String::into_bytes),
        body: details.body,
        keeper_id: details.keeper_id,
        volume: details.volume,
        state,
        run: Mutex::new(Run {
            container_id,
            watcher: Some(watcher),
            shut_down: false,
        }),
    })
}

/// How the server reaches a session's working dir: its files (through the keeper, or the host
/// dir) and the package installer that writes into it.
fn working_dir_access(
    shared: &Arc<Shared>,
    session_id: &str,
    dirs: &SessionDirs,
    keeper_id: Option<&str>,
    volume: Option<&str>,
) -> (Arc<dyn SessionFiles>, Arc<dyn PackageInstaller>) {
    let config = &shared.config;
    let docker = &shared.docker;
    let files: Arc<dyn SessionFiles> = match keeper_id {
        Some(keeper) => {
            super::files::keeper_files(docker.clone(), keeper.to_owned(), config.uid, config.gid)
        }
        None => Arc::new(HostFiles::new(
            dirs.work.clone(),
            Some((config.uid, config.gid)),
        )),
    };
    let work_mount = match volume {
        Some(name) => Mount {
            target: Some(CONTAINER_WORK_DIR.to_owned()),
            source: Some(name.to_owned()),
            typ: Some(MountType::VOLUME),
            ..Default::default()
        },
        None => Mount {
            target: Some(CONTAINER_WORK_DIR.to_owned()),
            source: Some(dirs.work.to_string_lossy().into_owned()),
            typ: Some(MountType::BIND),
            ..Default::default()
        },
    };
    let installer = Arc::new(super::packages::DockerInstaller {
        shared: shared.clone(),
        session_id: session_id.to_owned(),
        work_mount,
    });
    (files, installer)
}

/// The kernel container of `session` of this instance, found by its labels (running or not).
async fn find_kernel_container(
    shared: &Shared,
    session: &str,
) -> Result<Option<String>, SandboxError> {
    let filters = HashMap::from([(
        "label".to_owned(),
        vec![
            format!("{LABEL_INSTANCE}={}", shared.instance_id),
            format!("{LABEL_SESSION}={session}"),
            format!("{LABEL_ROLE}={ROLE_KERNEL}"),
        ],
    )]);
    let containers = shared
        .docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .map_err(|err| {
            engine_error("cannot list containers", err, |r| {
                SandboxError::NotAdoptable(format!("session {session}: {r}"))
            })
        })?;
    Ok(containers.into_iter().find_map(|summary| summary.id))
}

/// Everything created so far for a launch, undone if a later step fails.
#[derive(Default)]
struct Created {
    containers: Vec<String>,
    volume: Option<String>,
}

/// Starts a session's kernel container (and, for a kept tmpfs working dir, its volume and keeper).
pub(super) async fn launch(
    shared: Arc<Shared>,
    spec: &LaunchSpec,
) -> Result<DockerKernel, SandboxError> {
    let config = &shared.config;
    if spec.network && !config.allow_network_requests {
        return Err(SandboxError::Policy(
            "this server does not give kernels network access".to_owned(),
        ));
    }
    for key in spec.env.keys() {
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            return Err(SandboxError::Launch(format!(
                "invalid environment variable name {key:?}"
            )));
        }
    }
    let dirs = shared.state.session(&spec.session_id);
    let mut created = Created::default();
    match launch_inner(&shared, spec, &dirs, &mut created).await {
        Ok(kernel) => Ok(kernel),
        Err(err) => {
            for id in &created.containers {
                if let Err(cleanup_err) = remove_container(&shared.docker, id).await {
                    tracing::warn!(%cleanup_err, "cannot undo a failed launch");
                }
            }
            if let Some(volume) = &created.volume
                && let Err(cleanup_err) = remove_volume(&shared.docker, volume).await
            {
                tracing::warn!(%cleanup_err, "cannot undo a failed launch");
            }
            if let Err(cleanup_err) = dirs.remove() {
                tracing::warn!(%cleanup_err, "cannot undo a failed launch");
            }
            Err(err)
        }
    }
}

async fn launch_inner(
    shared: &Arc<Shared>,
    spec: &LaunchSpec,
    dirs: &SessionDirs,
    created: &mut Created,
) -> Result<DockerKernel, SandboxError> {
    let config = &shared.config;
    let docker = &shared.docker;
    let key = ConnectionInfo::random_key();
    let mut labels = HashMap::from([
        (LABEL_MANAGED.to_owned(), "true".to_owned()),
        (LABEL_INSTANCE.to_owned(), shared.instance_id.clone()),
        (LABEL_SESSION.to_owned(), spec.session_id.clone()),
    ]);

    // The host side: ipc dir + connection file, or a host working dir.
    let mut subdirs = Vec::new();
    if config.transport == KernelTransport::Ipc {
        subdirs.push(dirs.ipc.as_path());
    }
    if config.work_dir == WorkDirStorage::HostDir {
        subdirs.push(dirs.work.as_path());
    }
    dirs.create(&subdirs, config.uid, config.gid)?;

    let mut mounts = Vec::new();
    let (connection, connection_file, cmd) = match &config.transport {
        KernelTransport::Ipc => {
            let host_prefix = dirs.ipc.join("k");
            let longest = host_prefix.as_os_str().len() + "-5".len();
            if longest > MAX_SOCKET_PATH {
                return Err(SandboxError::Launch(format!(
                    "the kernel's socket paths under {} would be {longest} bytes, over the unix \
                     limit of {MAX_SOCKET_PATH}: use a shorter state dir",
                    dirs.ipc.display()
                )));
            }
            let mut inside = ConnectionInfo::ipc(
                &std::path::Path::new(CONTAINER_IPC_DIR).join("k"),
                key.clone(),
            );
            inside.kernel_name = "python3".to_owned();
            let file = serde_json::to_vec_pretty(&inside).map_err(|err| {
                SandboxError::Launch(format!("cannot encode connection file: {err}"))
            })?;
            dirs.write_kernel_file(CONNECTION_FILE, &file, config.uid, config.gid)?;
            mounts.push(Mount {
                target: Some(CONTAINER_IPC_DIR.to_owned()),
                source: Some(dirs.ipc.to_string_lossy().into_owned()),
                typ: Some(MountType::BIND),
                ..Default::default()
            });
            let mut outside = ConnectionInfo::ipc(&host_prefix, key);
            outside.kernel_name = "python3".to_owned();
            let path = format!("{CONTAINER_IPC_DIR}/{CONNECTION_FILE}");
            let cmd = if spec.kernel.argv.is_empty() {
                vec!["-f".to_owned(), path]
            } else {
                spec.kernel.argv_with(&path)
            };
            (outside, Some(file), cmd)
        }
        KernelTransport::Tcp { .. } if !spec.kernel.argv.is_empty() => {
            return Err(SandboxError::Launch(
                "kernels with their own command need the ipc transport (a shared connection \
                 file)"
                    .to_owned(),
            ));
        }
        KernelTransport::Tcp { .. } => {
            // No shared directory with a remote engine: the kernel gets its endpoints and key as
            // arguments and writes its own connection file in /tmp.
            let [shell, iopub, stdin, control, hb] = TCP_PORTS;
            let cmd = vec![
                "-f".to_owned(),
                "/tmp/kernelbox/kernel.json".to_owned(),
                "--ip=0.0.0.0".to_owned(),
                format!("--shell={shell}"),
                format!("--iopub={iopub}"),
                format!("--stdin={stdin}"),
                format!("--control={control}"),
                format!("--hb={hb}"),
                format!("--Session.key={key}"),
                "--Session.signature_scheme=hmac-sha256".to_owned(),
            ];
            // The host ports are known once the container runs.
            let placeholder = ConnectionInfo {
                transport: Transport::Tcp,
                ..ConnectionInfo::ipc(std::path::Path::new(""), key)
            };
            (placeholder, None, cmd)
        }
    };

    // The working dir.
    let volume = match config.work_dir {
        WorkDirStorage::KeptTmpfs => {
            let name = format!(
                "kernelbox-{}-{}",
                shared.instance_id,
                super::state::dir_name(&spec.session_id)
            );
            let options = format!(
                "size={},uid={},gid={},mode=0700,nosuid,nodev",
                config.work_dir_size_bytes, config.uid, config.gid
            );
            docker
                .create_volume(VolumeCreateRequest {
                    name: Some(name.clone()),
                    driver: Some("local".to_owned()),
                    driver_opts: Some(HashMap::from([
                        ("type".to_owned(), "tmpfs".to_owned()),
                        ("device".to_owned(), "tmpfs".to_owned()),
                        ("o".to_owned(), options),
                    ])),
                    labels: Some(labels.clone()),
                    ..Default::default()
                })
                .await
                .map_err(|err| {
                    engine_error(
                        format_args!("cannot create working-dir volume {name}"),
                        err,
                        SandboxError::Launch,
                    )
                })?;
            created.volume = Some(name.clone());
            mounts.push(Mount {
                target: Some(CONTAINER_WORK_DIR.to_owned()),
                source: Some(name.clone()),
                typ: Some(MountType::VOLUME),
                ..Default::default()
            });
            Some(name)
        }
        WorkDirStorage::HostDir => {
            mounts.push(Mount {
                target: Some(CONTAINER_WORK_DIR.to_owned()),
                source: Some(dirs.work.to_string_lossy().into_owned()),
                typ: Some(MountType::BIND),
                ..Default::default()
            });
            None
        }
    };

    labels.insert(LABEL_ROLE.to_owned(), ROLE_KERNEL.to_owned());
    let network = if spec.network || matches!(config.transport, KernelTransport::Tcp { .. }) {
        config.network_mode_when_allowed.clone()
    } else {
        "none".to_owned()
    };
    // The keeper holds the tmpfs volume mounted while the kernel container restarts. Both
    // containers start concurrently: the keeper is not on the kernel's critical path.
    let keeper_body = volume.as_ref().map(|name| {
        let mut keeper_labels = labels.clone();
        keeper_labels.insert(LABEL_ROLE.to_owned(), ROLE_KEEPER.to_owned());
        keeper_body(shared, name, keeper_labels)
    });
    // With a local engine, kernelbox picks the host ports itself: bound to the loopback address
    // only, and the same across container restarts (an engine assigns new random ports at every
    // start, and may report them late). A remote engine assigns them.
    let host_ports = match &config.transport {
        KernelTransport::Tcp { connect_host } => loopback_ports(connect_host)?,
        KernelTransport::Ipc => None,
    };
    let body = kernel_body(
        shared,
        spec,
        labels,
        cmd,
        mounts,
        network,
        host_ports.as_ref(),
    );
    let keeper = async {
        match keeper_body {
            Some(keeper_body) => Some(create_and_start(docker, keeper_body).await),
            None => None,
        }
    };
    let ((kernel_id, kernel_started), keeper) =
        tokio::join!(create_and_start(docker, body.clone()), keeper);
    created.containers.extend(kernel_id.clone());
    let keeper_id = match keeper {
        Some((keeper_id, keeper_started)) => {
            created.containers.extend(keeper_id.clone());
            keeper_started?;
            keeper_id
        }
        None => None,
    };
    kernel_started?;
    let id = kernel_id.ok_or_else(|| SandboxError::Launch("no container id".to_owned()))?;

    let connection = match &config.transport {
        KernelTransport::Tcp { connect_host } => match &host_ports {
            Some((_, ports)) => {
                let mut info = connection;
                info.ip = connect_host.clone();
                [
                    info.shell_port,
                    info.iopub_port,
                    info.stdin_port,
                    info.control_port,
                    info.hb_port,
                ] = *ports;
                info
            }
            None => tcp_connection(docker, &id, connect_host, connection).await?,
        },
        KernelTransport::Ipc => connection,
    };

    let state = Arc::new(watch::Sender::new(RunState {
        generation: 0,
        exit: None,
    }));
    let watcher = spawn_watcher(docker.clone(), id.clone(), 0, state.clone());
    let (files, installer) = working_dir_access(
        shared,
        &spec.session_id,
        dirs,
        keeper_id.as_deref(),
        volume.as_deref(),
    );
    Ok(DockerKernel {
        installer,
        shared: shared.clone(),
        session_id: spec.session_id.clone(),
        dirs: dirs.clone(),
        connection,
        connection_file,
        body,
        keeper_id,
        volume,
        files,
        state,
        run: Mutex::new(Run {
            container_id: id,
            watcher: Some(watcher),
            shut_down: false,
        }),
    })
}

/// The hardened kernel container: no network (unless allowed), no capabilities, no privilege
/// gain, read-only root, size-limited /tmp, memory without swap, CPU and pids limits, non-root.
fn kernel_body(
    shared: &Shared,
    spec: &LaunchSpec,
    labels: HashMap<String, String>,
    cmd: Vec<String>,
    mounts: Vec<Mount>,
    network: String,
    host_ports: Option<&(String, [u16; 5])>,
) -> ContainerCreateBody {
    let config = &shared.config;
    let tcp = matches!(config.transport, KernelTransport::Tcp { .. });
    // Without PYDEVD_DISABLE_FILE_VALIDATION, debugpy warns about frozen modules on stderr (and
    // so on iopub) at every kernel start.
    // PYTHONPATH: the session's own packages (installed with `pip install --target`).
    let env = [
        "PYDEVD_DISABLE_FILE_VALIDATION=1".to_owned(),
        format!("PYTHONPATH={CONTAINER_WORK_DIR}/{PACKAGES_DIR}"),
    ]
    .into_iter()
    .chain(spec.env.iter().map(|(k, v)| format!("{k}={v}")))
    .collect();
    let port_bindings = tcp.then(|| {
        TCP_PORTS
            .iter()
            .enumerate()
            .map(|(i, port)| {
                let binding = match host_ports {
                    Some((ip, ports)) => PortBinding {
                        host_ip: Some(ip.clone()),
                        host_port: Some(ports[i].to_string()),
                    },
                    None => PortBinding {
                        host_ip: None,
                        host_port: Some(String::new()),
                    },
                };
                (format!("{port}/tcp"), Some(vec![binding]))
            })
            .collect()
    });
    // A kernel with its own command replaces the image's entrypoint; Docker's init then reaps
    // and forwards signals in place of the default image's tini.
    let own_command = !spec.kernel.argv.is_empty();
    let (entrypoint, cmd) = if own_command {
        (Some(cmd), Some(Vec::new()))
    } else {
        (None, Some(cmd))
    };
    ContainerCreateBody {
        image: Some(
            spec.kernel
                .image
                .clone()
                .unwrap_or_else(|| config.image.clone()),
        ),
        user: Some(format!("{}:{}", config.uid, config.gid)),
        entrypoint,
        cmd,
        env: Some(env),
        labels: Some(labels),
        working_dir: Some(CONTAINER_WORK_DIR.to_owned()),
        hostname: Some("kernel".to_owned()),
        exposed_ports: tcp.then(|| TCP_PORTS.iter().map(|p| format!("{p}/tcp")).collect()),
        host_config: Some(HostConfig {
            port_bindings,
            // The default image's entrypoint is tini; a second init would only add a process.
            init: Some(own_command),
            ..hardened_host_config(config, network, mounts)
        }),
        ..Default::default()
    }
}

/// The lock-down every container that runs user code or the kernel image gets (kernel,
/// package installer): all capabilities dropped, no new privileges, read-only root, a small
/// `/tmp` tmpfs, the memory (no swap), CPU and process limits, small logs. One place, so the
/// settings SECURITY.md lists cannot drift apart between containers.
pub(super) fn hardened_host_config(
    config: &super::DockerConfig,
    network: String,
    mounts: Vec<Mount>,
) -> HostConfig {
    HostConfig {
        network_mode: Some(network),
        cap_drop: Some(vec!["ALL".to_owned()]),
        security_opt: Some(vec!["no-new-privileges".to_owned()]),
        readonly_rootfs: Some(true),
        tmpfs: Some(HashMap::from([(
            "/tmp".to_owned(),
            format!("rw,nosuid,nodev,size={},mode=1777", config.tmp_size_bytes),
        )])),
        mounts: Some(mounts),
        memory: Some(config.memory_bytes),
        memory_swap: Some(config.memory_bytes),
        nano_cpus: Some((config.cpus * 1e9) as i64),
        pids_limit: Some(config.pids_limit),
        log_config: Some(small_log()),
        ..Default::default()
    }
}

/// The keeper: an idle `sleep` holding the working-dir volume mounted, as locked down as the
/// kernel and tiny. The files API works on the volume through it (archive API, short execs),
/// so the mount is writable and a few processes are allowed besides tini and sleep.
fn keeper_body(
    shared: &Shared,
    volume: &str,
    labels: HashMap<String, String>,
) -> ContainerCreateBody {
    let config = &shared.config;
    const KEEPER_MEMORY: i64 = 16 * 1024 * 1024;
    ContainerCreateBody {
        image: Some(config.image.clone()),
        user: Some(format!("{}:{}", config.uid, config.gid)),
        entrypoint: Some(vec!["/usr/bin/tini".to_owned(), "--".to_owned()]),
        cmd: Some(vec!["sleep".to_owned(), "infinity".to_owned()]),
        env: Some(Vec::new()),
        labels: Some(labels),
        host_config: Some(HostConfig {
            network_mode: Some("none".to_owned()),
            cap_drop: Some(vec!["ALL".to_owned()]),
            security_opt: Some(vec!["no-new-privileges".to_owned()]),
            readonly_rootfs: Some(true),
            mounts: Some(vec![Mount {
                target: Some(super::files::KEEP_DIR.to_owned()),
                source: Some(volume.to_owned()),
                typ: Some(MountType::VOLUME),
                ..Default::default()
            }]),
            memory: Some(KEEPER_MEMORY),
            memory_swap: Some(KEEPER_MEMORY),
            nano_cpus: Some(50_000_000),
            pids_limit: Some(32),
            init: Some(false),
            log_config: Some(small_log()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Container logs (the kernel's own stdout/stderr, not cell output) capped at 1 MB, so a
/// kernel cannot fill the engine's disk through them.
pub(super) fn small_log() -> HostConfigLogConfig {
    HostConfigLogConfig {
        typ: Some("json-file".to_owned()),
        config: Some(HashMap::from([
            ("max-size".to_owned(), "1m".to_owned()),
            ("max-file".to_owned(), "1".to_owned()),
        ])),
    }
}

async fn create(docker: &Docker, body: ContainerCreateBody) -> Result<String, SandboxError> {
    docker
        .create_container(None, body)
        .await
        .map(|created| created.id)
        .map_err(|err| engine_error("cannot create container", err, SandboxError::Launch))
}

/// Creates and starts a container; returns its id if it was created (to undo) and how the
/// whole went.
async fn create_and_start(
    docker: &Docker,
    body: ContainerCreateBody,
) -> (Option<String>, Result<(), SandboxError>) {
    match create(docker, body).await {
        Ok(id) => {
            let started = start(docker, &id).await;
            (Some(id), started)
        }
        Err(err) => (None, Err(err)),
    }
}

async fn start(docker: &Docker, id: &str) -> Result<(), SandboxError> {
    docker
        .start_container(id, None::<StartContainerOptions>)
        .await
        .map_err(|err| {
            engine_error(
                format_args!("cannot start container {id}"),
                err,
                SandboxError::Launch,
            )
        })
}

/// Five free ports on `host` when it is a loopback address (the engine runs here), with the
/// address to bind them to; `None` for other hosts.
fn loopback_ports(host: &str) -> Result<Option<(String, [u16; 5])>, SandboxError> {
    let ip: std::net::IpAddr = match host {
        "localhost" => std::net::Ipv4Addr::LOCALHOST.into(),
        other => match other.parse() {
            Ok(ip) => ip,
            Err(_) => return Ok(None),
        },
    };
    if !ip.is_loopback() {
        return Ok(None);
    }
    // Hold all five listeners at once so the kernel gets five distinct ports.
    let listeners = (0..5)
        .map(|_| std::net::TcpListener::bind((ip, 0)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| SandboxError::Io {
            context: format!("finding free ports on {ip}"),
            source,
        })?;
    let mut ports = [0u16; 5];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener
            .local_addr()
            .map_err(|source| SandboxError::Io {
                context: format!("finding free ports on {ip}"),
                source,
            })?
            .port();
    }
    Ok(Some((ip.to_string(), ports)))
}

/// Fills in the host ports the engine published for a tcp kernel.
async fn tcp_connection(
    docker: &Docker,
    id: &str,
    connect_host: &str,
    mut info: ConnectionInfo,
) -> Result<ConnectionInfo, SandboxError> {
    let inspect = docker.inspect_container(id, None).await.map_err(|err| {
        engine_error(
            format_args!("cannot inspect container {id}"),
            err,
            SandboxError::Launch,
        )
    })?;
    let ports = inspect
        .network_settings
        .and_then(|settings| settings.ports)
        .unwrap_or_default();
    let host_port = |port: u16| -> Result<u16, SandboxError> {
        ports
            .get(&format!("{port}/tcp"))
            .and_then(|bindings| bindings.as_ref())
            .and_then(|bindings| bindings.first())
            .and_then(|binding| binding.host_port.as_deref())
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| {
                SandboxError::Launch(format!("the engine did not publish port {port} of {id}"))
            })
    };
    let [shell, iopub, stdin, control, hb] = TCP_PORTS;
    info.ip = connect_host.to_owned();
    info.shell_port = host_port(shell)?;
    info.iopub_port = host_port(iopub)?;
    info.stdin_port = host_port(stdin)?;
    info.control_port = host_port(control)?;
    info.hb_port = host_port(hb)?;
    Ok(info)
}

/// Watches one run of a container and records how it ended, unless a newer run replaced it.
fn spawn_watcher(
    docker: Docker,
    id: String,
    generation: u64,
    state: Arc<watch::Sender<RunState>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let reason = watch_run(&docker, &id).await;
        state.send_if_modified(|run| {
            if run.generation == generation && run.exit.is_none() {
                run.exit = Some(reason);
                true
            } else {
                false
            }
        });
    })
}

/// Waits until the container stops running, then asks the engine why.
async fn watch_run(docker: &Docker, id: &str) -> ExitReason {
    loop {
        let options = WaitContainerOptions {
            condition: "not-running".to_owned(),
        };
        let mut waiting = docker.wait_container(id, Some(options));
        match waiting.next().await {
            // bollard reports a non-zero exit as an error; either way the run is over.
            Some(Ok(_)) | Some(Err(bollard::errors::Error::DockerContainerWaitError { .. })) => {
                break;
            }
            Some(Err(err)) if is_not_found(&err) => {
                return ExitReason::Vanished("the container was removed".to_owned());
            }
            Some(Err(err)) => {
                tracing::debug!(container = id, %err, "waiting for the container failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            None => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    match docker.inspect_container(id, None).await {
        Ok(inspect) => {
            let state = inspect.state.unwrap_or_default();
            let removing = matches!(
                state.status,
                Some(ContainerStateStatusEnum::REMOVING | ContainerStateStatusEnum::DEAD)
            );
            if state.oom_killed == Some(true) {
                ExitReason::OutOfMemory
            } else if removing {
                // `docker rm -f` kills first: the run ended because the container is going away.
                ExitReason::Vanished("the container was removed".to_owned())
            } else {
                ExitReason::ExitCode(state.exit_code.unwrap_or(-1))
            }
        }
        Err(err) if is_not_found(&err) => {
            ExitReason::Vanished("the container was removed".to_owned())
        }
        Err(err) => ExitReason::Vanished(format!("cannot inspect the container: {err}")),
    }
}

#[async_trait]
impl KernelProcess for DockerKernel {
    fn connection(&self) -> &ConnectionInfo {
        &self.connection
    }

    async fn exited(&self) -> ExitReason {
        let mut rx = self.state.subscribe();
        loop {
            if let Some(reason) = &rx.borrow_and_update().exit {
                return reason.clone();
            }
            if rx.changed().await.is_err() {
                return ExitReason::Vanished("the kernel handle was dropped".to_owned());
            }
        }
    }

    async fn is_alive(&self) -> Option<bool> {
        if self.state.borrow().exit.is_some() {
            return Some(false);
        }
        // Held for a restart or shutdown: cannot tell now.
        let run = self.run.try_lock().ok()?;
        if run.shut_down {
            return Some(false);
        }
        let id = run.container_id.clone();
        drop(run);
        let inspect = self.shared.docker.inspect_container(&id, None);
        match tokio::time::timeout(Duration::from_secs(2), inspect).await {
            Ok(Ok(inspect)) => Some(inspect.state.and_then(|s| s.running).unwrap_or(false)),
            Ok(Err(err)) if is_not_found(&err) => Some(false),
            // The engine did not answer (in time).
            _ => None,
        }
    }

    async fn signal_interrupt(&self) -> Result<(), SandboxError> {
        let run = self.run.lock().await;
        if run.shut_down {
            return Err(control("interrupt", "the kernel was shut down".to_owned()));
        }
        // PID 1 is tini, which forwards the signal to the kernel process.
        self.shared
            .docker
            .kill_container(
                &run.container_id,
                Some(KillContainerOptions {
                    signal: "SIGINT".to_owned(),
                }),
            )
            .await
            .map_err(|err| {
                engine_error("cannot signal the container", err, |r| {
                    control("interrupt", r)
                })
            })
    }

    async fn restart(&self) -> Result<(), SandboxError> {
        let mut run = self.run.lock().await;
        if run.shut_down {
            return Err(control("restart", "the kernel was shut down".to_owned()));
        }
        let mut generation = 0;
        self.state.send_modify(|state| {
            state.generation += 1;
            state.exit = None;
            generation = state.generation;
        });
        if let Some(watcher) = run.watcher.take() {
            watcher.abort();
        }
        let result = self.restart_container(&mut run).await;
        match &result {
            Ok(()) => {
                run.watcher = Some(spawn_watcher(
                    self.shared.docker.clone(),
                    run.container_id.clone(),
                    generation,
                    self.state.clone(),
                ));
            }
            Err(err) => {
                let reason = ExitReason::Vanished(format!("restart failed: {err}"));
                self.state.send_modify(|state| state.exit = Some(reason));
            }
        }
        result
    }

    fn files(&self) -> Option<Arc<dyn SessionFiles>> {
        Some(self.files.clone())
    }

    fn kernel_work_dir(&self) -> Option<String> {
        Some(CONTAINER_WORK_DIR.to_owned())
    }

    fn packages(&self) -> Option<Arc<dyn PackageInstaller>> {
        Some(self.installer.clone())
    }

    async fn shutdown(&self) -> Result<(), SandboxError> {
        let mut run = self.run.lock().await;
        if run.shut_down {
            return Ok(());
        }
        self.state.send_modify(|state| {
            state.generation += 1;
            state.exit = Some(ExitReason::Vanished("shut down".to_owned()));
        });
        if let Some(watcher) = run.watcher.take() {
            watcher.abort();
        }
        let docker = &self.shared.docker;
        remove_container(docker, &run.container_id).await?;
        if let Some(keeper) = &self.keeper_id {
            remove_container(docker, keeper).await?;
        }
        // An install still running holds the working dir too.
        self.remove_installers().await;
        if let Some(volume) = &self.volume {
            remove_volume(docker, volume).await?;
        }
        self.dirs.remove()?;
        run.shut_down = true;
        Ok(())
    }

    async fn persisted(&self) -> Option<PersistedKernel> {
        let run = self.run.lock().await;
        if run.shut_down {
            return None;
        }
        let connection_file = match &self.connection_file {
            Some(bytes) => match String::from_utf8(bytes.clone()) {
                Ok(text) => Some(text),
                Err(err) => {
                    tracing::warn!(%err, "the connection file is not UTF-8: cannot persist it");
                    return None;
                }
            },
            None => None,
        };
        let details = Details {
            container_id: run.container_id.clone(),
            keeper_id: self.keeper_id.clone(),
            volume: self.volume.clone(),
            connection_file,
            body: self.body.clone(),
        };
        match serde_json::to_value(&details) {
            Ok(details) => Some(PersistedKernel {
                backend: BACKEND.to_owned(),
                session_id: self.session_id.clone(),
                connection: self.connection.clone(),
                details,
            }),
            Err(err) => {
                tracing::warn!(%err, "cannot encode the kernel's containers for the store");
                None
            }
        }
    }

    /// Stops watching the container and forgets it: it keeps running, with its keeper, volume
    /// and session directory, for the next server process to adopt.
    async fn detach(&self) -> Result<(), SandboxError> {
        let mut run = self.run.lock().await;
        if run.shut_down {
            return Ok(());
        }
        self.state.send_modify(|state| {
            state.generation += 1;
            state.exit = Some(ExitReason::Vanished("detached from the server".to_owned()));
        });
        if let Some(watcher) = run.watcher.take() {
            watcher.abort();
        }
        // From here on this handle is done with the container: Drop leaves it alone.
        run.shut_down = true;
        Ok(())
    }
}

impl DockerKernel {
    /// Removes this session's installer containers (best effort).
    async fn remove_installers(&self) {
        let docker = &self.shared.docker;
        let filters = HashMap::from([(
            "label".to_owned(),
            vec![
                format!("{LABEL_INSTANCE}={}", self.shared.instance_id),
                format!("{LABEL_SESSION}={}", self.session_id),
                format!("{LABEL_ROLE}={}", super::packages::ROLE_INSTALLER),
            ],
        )]);
        let options = bollard::query_parameters::ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        };
        match docker.list_containers(Some(options)).await {
            Ok(containers) => {
                for id in containers.into_iter().filter_map(|c| c.id) {
                    if let Err(err) = remove_container(docker, &id).await {
                        tracing::warn!(%err, "cannot remove an installer container");
                    }
                }
            }
            Err(err) => tracing::warn!(%err, "cannot list installer containers"),
        }
    }

    /// Kills the current run and starts the container again (same mounts, so the working dir
    /// and connection info stay); recreates the container if it was removed from outside.
    async fn restart_container(&self, run: &mut Run) -> Result<(), SandboxError> {
        let docker = &self.shared.docker;
        if let Some(file) = &self.connection_file {
            // The kernel may have rewritten or removed it; it must say exactly what we connect to.
            let config = &self.shared.config;
            self.dirs
                .write_kernel_file(CONNECTION_FILE, file, config.uid, config.gid)?;
        }
        if let Some(keeper) = &self.keeper_id {
            // Best effort: a keeper stopped from outside keeps nothing.
            if let Err(err) = docker
                .start_container(keeper, None::<StartContainerOptions>)
                .await
            {
                tracing::debug!(%err, "cannot (re)start the working-dir keeper");
            }
        }
        let options = RestartContainerOptions {
            t: Some(0),
            signal: None,
        };
        match docker
            .restart_container(&run.container_id, Some(options))
            .await
        {
            Ok(()) => Ok(()),
            Err(err) if is_not_found(&err) => {
                let id = create(docker, self.body.clone()).await?;
                run.container_id = id.clone();
                start(docker, &id).await
            }
            Err(err) => Err(engine_error(
                format_args!("cannot restart container {}", run.container_id),
                err,
                |r| control("restart", r),
            )),
        }
    }
}

impl Drop for DockerKernel {
    fn drop(&mut self) {
        let run = self.run.get_mut();
        if let Some(watcher) = run.watcher.take() {
            watcher.abort();
        }
        if run.shut_down {
            return;
        }
        // Dropped without (a successful) shutdown: remove it in the background.
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let docker = self.shared.docker.clone();
        let mut containers = vec![run.container_id.clone()];
        containers.extend(self.keeper_id.clone());
        let volume = self.volume.clone();
        let dirs = self.dirs.clone();
        handle.spawn(remove_when_possible(docker, containers, volume, dirs));
    }
}

/// How long a dropped kernel's removal is retried while the engine is unreachable.
const REMOVAL_RETRY_FOR: Duration = Duration::from_secs(600);

/// Removes a kernel's containers, volume and directories, retrying while the engine is
/// unreachable: a session closed meanwhile has its containers removed once the engine is back.
/// Whatever is still there when the server stops, the next start's housekeeping removes.
async fn remove_when_possible(
    docker: Docker,
    containers: Vec<String>,
    volume: Option<String>,
    dirs: SessionDirs,
) {
    let started = tokio::time::Instant::now();
    let mut backoff = Duration::from_millis(500);
    loop {
        let mut result = Ok(());
        for id in &containers {
            result = result.and(remove_container(&docker, id).await);
        }
        if let Some(volume) = &volume {
            result = result.and(remove_volume(&docker, volume).await);
        }
        match result {
            Ok(()) => break,
            Err(SandboxError::Unreachable { .. }) if started.elapsed() < REMOVAL_RETRY_FOR => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
            Err(err) => {
                tracing::warn!(%err, ?containers, "cannot remove a closed kernel's containers; the next start's housekeeping will");
                break;
            }
        }
    }
    if let Err(err) = dirs.remove() {
        tracing::debug!(%err, "cannot remove a closed kernel's directories");
    }
}
