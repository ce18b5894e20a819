//! A kernel container's life after launch: the watcher that reports how each run ended, the
//! [`KernelProcess`] operations (interrupt, restart, shutdown, persist, detach) and removal of
//! a kernel dropped without shutdown.

use super::adopt::Details;
use super::spec::{create, start};
use super::*;

/// Watches one run of a container and records how it ended, unless a newer run replaced it.
pub(super) fn spawn_watcher(
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
            Ok(Err(err)) if crate::sandbox::docker::is_not_found(&err) => Some(false),
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
                format!(
                    "{LABEL_ROLE}={}",
                    crate::sandbox::docker::packages::ROLE_INSTALLER
                ),
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
            // The kernel cannot change it (read-only mount of the server's dir); written again
            // anyway so it says exactly what we connect to, whatever happened on the host.
            let config = &self.shared.config;
            self.dirs
                .write_conf_file(CONNECTION_FILE, file, config.uid, config.gid)?;
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
