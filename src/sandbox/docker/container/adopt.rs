//! Taking over a kernel container that a previous server process launched: its record
//! ([`Details`]), the checks it must pass (this instance's labels, still running, the
//! read-only conf mount, real sockets of the kernel's uid) and finding it again by labels.

use super::*;

/// The Docker part of a [`PersistedKernel`]: what [`adopt`] needs besides the connection info.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Details {
    /// The kernel container when the record was written (found by its labels if it was
    /// recreated since).
    pub(super) container_id: String,
    /// The working-dir keeper, if any.
    pub(super) keeper_id: Option<String>,
    /// The working-dir volume, if any.
    pub(super) volume: Option<String>,
    /// The connection file as the kernel reads it (ipc), rewritten before each restart.
    pub(super) connection_file: Option<String>,
    /// How to create the kernel container again if it vanishes.
    pub(super) body: ContainerCreateBody,
}

/// Takes over the kernel container of a session that a previous server process launched: it
/// must still run, carry this instance's labels and (ipc) still have its sockets on this host.
/// Reconnecting is the caller's business (new sockets, readiness as after a launch).
pub(in crate::sandbox::docker) async fn adopt(
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
    let dirs = shared.state.session(session);
    if kernel.connection.transport == Transport::Ipc {
        // Launched by a kernelbox that wrote the connection file into the kernel's own socket
        // dir: restarting it would mean writing where the kernel can plant symlinks.
        if !has_read_only_conf(&details.body) {
            return Err(refuse(
                "it was launched with its connection file in a directory the kernel can write                  (an older kernelbox); start a new session"
                    .to_owned(),
            ));
        }
        // The directory of the kernel's sockets, bind-mounted into the container: without it
        // (state dir wiped, another host) the kernel cannot be reached. The sockets themselves
        // may not be there yet if the kernel has just been (re)started; those that are must be
        // sockets of the kernel's uid, not something it planted in their place.
        let names: Vec<String> = CHANNELS
            .iter()
            .filter_map(|channel| {
                let path = kernel.connection.ipc_path(*channel);
                let in_dir = path.parent() == Some(dirs.ipc.as_path());
                in_dir
                    .then(|| path.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .flatten()
            })
            .collect();
        if names.len() != CHANNELS.len() {
            return Err(refuse(format!(
                "its kernel's sockets are not in its socket directory {}",
                dirs.ipc.display()
            )));
        }
        dirs.check_kernel_sockets(&names, shared.config.uid)
            .map_err(refuse)?;
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
        connection: ConnectionInfo {
            socket_owner: (kernel.connection.transport == Transport::Ipc)
                .then_some(shared.config.uid),
            ..kernel.connection.clone()
        },
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

/// The five channels, for checks over all of a kernel's sockets.
const CHANNELS: [Channel; 5] = [
    Channel::Shell,
    Channel::IoPub,
    Channel::Stdin,
    Channel::Control,
    Channel::Heartbeat,
];

/// Whether `body` mounts the server's conf dir read-only where the kernel reads its connection
/// file (every container this version creates does).
fn has_read_only_conf(body: &ContainerCreateBody) -> bool {
    body.host_config
        .as_ref()
        .and_then(|host| host.mounts.as_ref())
        .is_some_and(|mounts| {
            mounts.iter().any(|mount| {
                mount.target.as_deref() == Some(CONTAINER_CONF_DIR) && mount.read_only == Some(true)
            })
        })
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
