//! One session's kernel container: [`DockerKernel`] and its launch (session dirs, connection
//! file, mounts, volume and keeper). What the containers are made of is in `spec`, their life
//! after launch (watcher, restart, shutdown, removal) in `lifecycle`, taking one over from a
//! previous server process in `adopt`.

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
/// Where the per-session ipc dir (the kernel's, for its sockets) is mounted in the container,
/// read-write.
const CONTAINER_IPC_DIR: &str = "/run/kernelbox/ipc";
/// Where the per-session conf dir (the server's, with the connection file) is mounted in the
/// container, read-only: the kernel can neither change the file nor plant anything next to it.
const CONTAINER_CONF_DIR: &str = "/run/kernelbox/conf";
/// The connection file's name in the conf dir.
const CONNECTION_FILE: &str = "kernel.json";
/// The kernel's working directory (the image's WORKDIR).
pub(super) const CONTAINER_WORK_DIR: &str = "/home/kernel/work";
/// Container-side ports of the kernel's channels with the tcp transport.
const TCP_PORTS: [u16; 5] = [5555, 5556, 5557, 5558, 5559];

mod adopt;
mod lifecycle;
mod spec;

pub(super) use adopt::adopt;
use lifecycle::spawn_watcher;
pub(super) use spec::hardened_host_config;
use spec::{create_and_start, keeper_body, kernel_body, loopback_ports, tcp_connection};

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
/// Its `Debug` leaves out the connection file and the container body, which carry the key.
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

impl std::fmt::Debug for DockerKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerKernel")
            .field("session_id", &self.session_id)
            .field("connection", &self.connection)
            .field("keeper_id", &self.keeper_id)
            .field("volume", &self.volume)
            .finish_non_exhaustive()
    }
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
            dirs.write_conf_file(CONNECTION_FILE, &file, config.uid, config.gid)?;
            mounts.push(Mount {
                target: Some(CONTAINER_CONF_DIR.to_owned()),
                source: Some(dirs.conf.to_string_lossy().into_owned()),
                typ: Some(MountType::BIND),
                read_only: Some(true),
                ..Default::default()
            });
            mounts.push(Mount {
                target: Some(CONTAINER_IPC_DIR.to_owned()),
                source: Some(dirs.ipc.to_string_lossy().into_owned()),
                typ: Some(MountType::BIND),
                ..Default::default()
            });
            let mut outside = ConnectionInfo::ipc(&host_prefix, key);
            outside.kernel_name = "python3".to_owned();
            outside.socket_owner = Some(shared.config.uid);
            let path = format!("{CONTAINER_CONF_DIR}/{CONNECTION_FILE}");
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
