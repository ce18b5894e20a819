//! What a kernel container is made of: the hardened create bodies of the kernel and its
//! working-dir keeper, the lock-down they share with the installer, and the engine calls that
//! create and start them (with the tcp transport's ports).

use super::*;

/// The hardened kernel container: no network (unless allowed), no capabilities, no privilege
/// gain, read-only root, size-limited /tmp, memory without swap, CPU and pids limits, non-root.
pub(super) fn kernel_body(
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
/// `/tmp` tmpfs, the memory (no swap), CPU and process limits, small logs, the operator's OCI
/// runtime (`--runtime`). One place, so the settings SECURITY.md lists cannot drift apart
/// between containers.
pub(in crate::sandbox::docker) fn hardened_host_config(
    config: &crate::sandbox::docker::DockerConfig,
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
        runtime: config.runtime.clone(),
        ..Default::default()
    }
}

/// The keeper: an idle `sleep` holding the working-dir volume mounted, as locked down as the
/// kernel and tiny. The files API works on the volume through it (archive API, short execs),
/// so the mount is writable and a few processes are allowed besides tini and sleep.
pub(super) fn keeper_body(
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
                target: Some(crate::sandbox::docker::files::KEEP_DIR.to_owned()),
                source: Some(volume.to_owned()),
                typ: Some(MountType::VOLUME),
                ..Default::default()
            }]),
            memory: Some(KEEPER_MEMORY),
            memory_swap: Some(KEEPER_MEMORY),
            nano_cpus: Some(50_000_000),
            // Under another runtime (gVisor) the sandbox's own threads count too: 32 is too few
            // for runsc to boot.
            pids_limit: Some(if config.runtime.is_some() { 128 } else { 32 }),
            init: Some(false),
            log_config: Some(small_log()),
            runtime: config.runtime.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Container logs (the kernel's own stdout/stderr, not cell output) capped at 1 MB, so a
/// kernel cannot fill the engine's disk through them.
fn small_log() -> HostConfigLogConfig {
    HostConfigLogConfig {
        typ: Some("json-file".to_owned()),
        config: Some(HashMap::from([
            ("max-size".to_owned(), "1m".to_owned()),
            ("max-file".to_owned(), "1".to_owned()),
        ])),
    }
}

pub(super) async fn create(
    docker: &Docker,
    body: ContainerCreateBody,
) -> Result<String, SandboxError> {
    docker
        .create_container(None, body)
        .await
        .map(|created| created.id)
        .map_err(|err| engine_error("cannot create container", err, SandboxError::Launch))
}

/// Creates and starts a container; returns its id if it was created (to undo) and how the
/// whole went.
pub(super) async fn create_and_start(
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

pub(super) async fn start(docker: &Docker, id: &str) -> Result<(), SandboxError> {
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
pub(super) fn loopback_ports(host: &str) -> Result<Option<(String, [u16; 5])>, SandboxError> {
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
pub(super) async fn tcp_connection(
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
