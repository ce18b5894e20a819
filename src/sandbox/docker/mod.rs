//! The Docker backend (bollard): one hardened container per session, talking to the server over
//! ipc sockets in a bind-mounted per-session directory.
//!
//! - [`config`]: [`DockerConfig`], what an operator can tune.
//! - [`image`]: the kernel image's tag (hash of the embedded build inputs) and its offline build.
//! - [`container`]: what a kernel container looks like and [`DockerKernel`], its lifecycle.
//! - [`state`]: the host side: state dir, instance id, per-session directories.

mod config;
mod container;
mod engine;
mod files;
mod image;
mod packages;
mod state;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bollard::Docker;
use bollard::query_parameters::{
    ListContainersOptions, ListVolumesOptions, RemoveContainerOptions, RemoveVolumeOptions,
};

pub use config::{
    DEFAULT_KERNEL_UID, DEFAULT_SOCKET, DockerConfig, KernelTransport, WorkDirStorage,
};
pub use container::DockerKernel;
pub use engine::{EngineLocation, EngineSecurity, check_kernel_ids};
pub use image::{IMAGE_REPOSITORY, ImageError, build_image, default_image_tag, image_exists};

use super::{KernelProcess, LaunchSpec, PersistedKernel, Sandbox, SandboxError};

/// Label on every container and volume kernelbox creates, so operators can find them all.
pub const LABEL_MANAGED: &str = "kernelbox.managed";
/// Label naming the server instance that owns a container; cleanup only touches its own.
pub const LABEL_INSTANCE: &str = "kernelbox.instance";
/// Label naming the session a container belongs to.
pub const LABEL_SESSION: &str = "kernelbox.session";
/// This backend's [`Sandbox::name`], also recorded in the kernels it persists.
const BACKEND: &str = "docker";
/// What [`SandboxError::Unreachable`] calls the engine.
const ENGINE: &str = "the Docker engine";
/// How long the readiness check waits for the engine to answer a ping.
const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Label telling a session's kernel container (`kernel`) from its working-dir keeper (`keeper`).
pub const LABEL_ROLE: &str = "kernelbox.role";

/// What every part of the backend shares: the engine connection, the configuration and this
/// server's instance id.
#[derive(Debug)]
struct Shared {
    docker: Docker,
    config: DockerConfig,
    instance_id: String,
    state: state::StateDir,
    security: EngineSecurity,
}

/// The Docker [`Sandbox`]: starts one hardened kernel container per session on a Docker engine.
#[derive(Debug, Clone)]
pub struct DockerSandbox {
    shared: Arc<Shared>,
}

impl DockerSandbox {
    /// Connects to the engine and checks that the kernel image is there, so a misconfigured
    /// server fails at start with what to do ([`SandboxError::Unavailable`]) rather than at the
    /// first session. Refuses a kernel uid that is root or the server's own, and a `runtime`
    /// the engine does not know; logs the engine's security state (seccomp, AppArmor/SELinux,
    /// user namespaces) and warns about what it lacks. Creates the state dir and reads (or
    /// creates) the instance id.
    pub async fn new(config: DockerConfig) -> Result<Self, SandboxError> {
        check_kernel_ids(config.uid, config.gid, nix::unistd::getuid().as_raw())?;
        let docker = connect(&config).await?;
        let security = engine_security(&docker).await?;
        tracing::info!(engine = %security, "Docker engine security");
        let missing = security.missing();
        if !missing.is_empty() {
            tracing::warn!(
                missing = %missing.join("; "),
                "the Docker engine lacks protections: kernels are less isolated than they could be"
            );
        }
        if let Some(runtime) = &config.runtime {
            security.check_runtime(runtime)?;
            tracing::info!(runtime, "kernel containers run under this OCI runtime");
        }
        match image_exists(&docker, &config.image).await {
            Ok(true) => {}
            Ok(false) => {
                let hint = if config.image == default_image_tag() {
                    "Build it with `kernelbox image build` (or `kernel-image/build.sh`)".to_owned()
                } else {
                    format!(
                        "Pull or build {}, or leave the image setting at its default and run \
                         `kernelbox image build`",
                        config.image
                    )
                };
                return Err(SandboxError::Unavailable {
                    what: format!("kernel image {}", config.image),
                    reason: "the Docker engine does not have it".to_owned(),
                    hint,
                });
            }
            Err(err) => {
                return Err(SandboxError::Unavailable {
                    what: format!("kernel image {}", config.image),
                    reason: err.to_string(),
                    hint: "Check that the Docker engine is healthy".to_owned(),
                });
            }
        }
        let state = state::StateDir::open(&config.state_dir)?;
        if config.transport == KernelTransport::Ipc {
            check_handover(&config.state_dir, config.uid, config.gid)?;
        }
        let instance_id = match &config.instance_id {
            Some(id) => state::validate_instance_id(id)?,
            None => state.instance_id()?,
        };
        Ok(Self {
            shared: Arc::new(Shared {
                docker,
                config,
                instance_id,
                state,
                security,
            }),
        })
    }

    /// The engine's security state as it was at start.
    pub fn security(&self) -> &EngineSecurity {
        &self.shared.security
    }

    /// This server's instance id (the `kernelbox.instance` label of its containers).
    pub fn instance_id(&self) -> &str {
        &self.shared.instance_id
    }

    /// The configuration in use.
    pub fn config(&self) -> &DockerConfig {
        &self.shared.config
    }

    /// Starts a kernel and returns it as the concrete type (tests and tools that need the
    /// container id); [`Sandbox::launch`] boxes this.
    pub async fn launch_kernel(&self, spec: &LaunchSpec) -> Result<DockerKernel, SandboxError> {
        container::launch(self.shared.clone(), spec).await
    }

    /// Takes over a kernel container a previous server process left running and returns it as
    /// the concrete type; [`Sandbox::adopt`] boxes this.
    pub async fn adopt_kernel(
        &self,
        kernel: &PersistedKernel,
    ) -> Result<DockerKernel, SandboxError> {
        container::adopt(self.shared.clone(), kernel).await
    }
}

/// Connects to the engine (`config.docker_host`, else `DOCKER_HOST`, else `config.socket`),
/// agrees on an API version and pings it.
async fn connect(config: &DockerConfig) -> Result<Docker, SandboxError> {
    let unavailable = |reason: String| SandboxError::Unavailable {
        what: "the Docker engine".to_owned(),
        reason,
        hint: "Start Docker (or set DOCKER_HOST / the engine address), make sure this user may \
               use its socket, or use the local backend"
            .to_owned(),
    };
    let docker = match (&config.docker_host, engine::docker_host_env()) {
        (Some(host), _) => Docker::connect_with_host(host),
        (None, Some(_)) => Docker::connect_with_defaults(),
        (None, None) => Docker::connect_with_socket(
            &config.socket.to_string_lossy(),
            120,
            bollard::API_DEFAULT_VERSION,
        ),
    }
    .map_err(|err| unavailable(format!("cannot connect: {err}")))?;
    let docker = docker
        .negotiate_version()
        .await
        .map_err(|err| unavailable(format!("cannot reach it: {err}")))?;
    docker
        .ping()
        .await
        .map_err(|err| unavailable(format!("it does not answer: {err}")))?;
    Ok(docker)
}

/// Checks, with a probe directory in the state dir, that the server can hand a directory to the
/// kernel's uid:gid (0700, as it does each session's ipc dir) and still create files in it (as
/// it must connect to the kernel's sockets there): that needs root (or CAP_CHOWN and
/// CAP_DAC_OVERRIDE). Failing here says so at start instead of at the first session.
fn check_handover(state_dir: &std::path::Path, uid: u32, gid: u32) -> Result<(), SandboxError> {
    use std::os::unix::fs::DirBuilderExt;
    let probe = state_dir.join(format!(
        ".handover-probe-{}",
        hex::encode(rand::random::<[u8; 4]>())
    ));
    let io = |context: String| move |source| SandboxError::Io { context, source };
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&probe)
        .map_err(io(format!("cannot create {}", probe.display())))?;
    let result = std::os::unix::fs::chown(&probe, Some(uid), Some(gid))
        .and_then(|()| std::fs::write(probe.join("socket-probe"), b""));
    let _ = std::fs::remove_dir_all(&probe);
    result.map_err(|err| SandboxError::Unavailable {
        what: "the Docker backend".to_owned(),
        reason: format!(
            "the server (uid {}) cannot hand a session directory to the kernel's uid {uid}:{gid} \
             and still use the kernel's sockets in it: {err}",
            nix::unistd::getuid()
        ),
        hint: "Run the server as root (kernels still run as the unprivileged kernel uid); the \
               kernel's uid must differ from the server's"
            .to_owned(),
    })
}

/// The engine's security options and runtimes (`docker info`).
async fn engine_security(docker: &Docker) -> Result<EngineSecurity, SandboxError> {
    let info = docker
        .info()
        .await
        .map_err(|err| SandboxError::Unavailable {
            what: "the Docker engine".to_owned(),
            reason: format!("it does not describe itself (info): {err}"),
            hint: "Check that the Docker engine is healthy".to_owned(),
        })?;
    Ok(EngineSecurity::from_info(&info))
}

#[async_trait]
impl Sandbox for DockerSandbox {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn installs_packages(&self) -> bool {
        self.shared.config.packages.allow
    }

    /// Containers, plus the engine's security state at start and the runtime in use.
    fn isolation(&self) -> serde_json::Value {
        let security = &self.shared.security;
        serde_json::json!({
            "isolated": true,
            "runtime": self
                .shared
                .config
                .runtime
                .as_deref()
                .or(security.default_runtime.as_deref()),
            "seccomp": security.seccomp,
            "apparmor": security.apparmor,
            "selinux": security.selinux,
            "userns": security.userns,
            "rootless": security.rootless,
        })
    }

    /// Ready when the engine answers a ping within [`READY_TIMEOUT`].
    async fn ready(&self) -> Result<(), SandboxError> {
        match tokio::time::timeout(READY_TIMEOUT, self.shared.docker.ping()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(err)) => Err(engine_error("ping failed", err, |reason| {
                SandboxError::Unreachable {
                    what: ENGINE,
                    reason,
                }
            })),
            Err(_) => Err(SandboxError::Unreachable {
                what: ENGINE,
                reason: format!("no answer to a ping within {READY_TIMEOUT:?}"),
            }),
        }
    }

    async fn launch(&self, spec: &LaunchSpec) -> Result<Box<dyn KernelProcess>, SandboxError> {
        Ok(Box::new(self.launch_kernel(spec).await?))
    }

    async fn adopt(
        &self,
        kernel: &PersistedKernel,
    ) -> Result<Box<dyn KernelProcess>, SandboxError> {
        Ok(Box::new(self.adopt_kernel(kernel).await?))
    }

    /// Removes every container and volume labelled with this instance's id, and the session
    /// directories, except those of the sessions in `keep`. Returns how many kernel containers
    /// were removed.
    async fn cleanup_except(&self, keep: &HashSet<String>) -> Result<usize, SandboxError> {
        let shared = &self.shared;
        let filters = HashMap::from([(
            "label".to_owned(),
            vec![format!("{LABEL_INSTANCE}={}", shared.instance_id)],
        )]);
        let containers = shared
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters.clone()),
                ..Default::default()
            }))
            .await
            .map_err(|err| {
                engine_error("cannot list containers", err, |r| control("clean up", r))
            })?;
        let kept = |labels: Option<&HashMap<String, String>>| {
            labels
                .and_then(|labels| labels.get(LABEL_SESSION))
                .is_some_and(|session| keep.contains(session))
        };
        let mut kernels = 0;
        for summary in containers {
            let Some(id) = summary.id else { continue };
            if kept(summary.labels.as_ref()) {
                continue;
            }
            remove_container(&shared.docker, &id).await?;
            let is_kernel = summary
                .labels
                .as_ref()
                .and_then(|labels| labels.get(LABEL_ROLE))
                .is_none_or(|role| role == container::ROLE_KERNEL);
            if is_kernel {
                kernels += 1;
            }
        }
        let volumes = shared
            .docker
            .list_volumes(Some(ListVolumesOptions {
                filters: Some(filters),
            }))
            .await
            .map_err(|err| engine_error("cannot list volumes", err, |r| control("clean up", r)))?;
        for volume in volumes.volumes.unwrap_or_default() {
            if !kept(Some(&volume.labels)) {
                remove_volume(&shared.docker, &volume.name).await?;
            }
        }
        shared.state.remove_sessions_except(keep)?;
        Ok(kernels)
    }
}

/// A [`SandboxError::Control`] for `op`.
fn control(op: &'static str, reason: String) -> SandboxError {
    SandboxError::Control { op, reason }
}

/// Whether an engine error means that the engine could not be reached or did not answer (as
/// opposed to an answer refusing the request).
fn is_unreachable(err: &bollard::errors::Error) -> bool {
    use bollard::errors::Error as E;
    matches!(
        err,
        E::IOError { .. }
            | E::HyperLegacyError { .. }
            | E::HyperResponseError { .. }
            | E::RequestTimeoutError
            | E::SocketNotFoundError(_)
    )
}

/// An engine error with `context`: [`SandboxError::Unreachable`] when the engine did not answer
/// (with the error's causes, which say why: "No such file or directory", "Connection refused"),
/// else what `other` makes of the message.
fn engine_error(
    context: impl fmt::Display,
    err: bollard::errors::Error,
    other: impl FnOnce(String) -> SandboxError,
) -> SandboxError {
    if is_unreachable(&err) {
        let mut reason = format!("{context}: {err}");
        let mut source = std::error::Error::source(&err);
        while let Some(cause) = source {
            let text = cause.to_string();
            if !reason.ends_with(&text) {
                reason.push_str(": ");
                reason.push_str(&text);
            }
            source = cause.source();
        }
        SandboxError::Unreachable {
            what: ENGINE,
            reason,
        }
    } else {
        other(format!("{context}: {err}"))
    }
}

/// Whether an engine error means "no such object".
fn is_not_found(err: &bollard::errors::Error) -> bool {
    matches!(
        err,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// Force-removes a container (and its anonymous volumes); already gone is fine.
async fn remove_container(docker: &Docker, id: &str) -> Result<(), SandboxError> {
    match docker
        .remove_container(
            id,
            Some(RemoveContainerOptions {
                force: true,
                v: true,
                ..Default::default()
            }),
        )
        .await
    {
        Ok(()) => Ok(()),
        Err(err) if is_not_found(&err) => Ok(()),
        Err(err) => Err(engine_error(
            format_args!("cannot remove container {id}"),
            err,
            |r| control("shut down", r),
        )),
    }
}

/// Removes a volume; already gone is fine.
async fn remove_volume(docker: &Docker, name: &str) -> Result<(), SandboxError> {
    match docker
        .remove_volume(name, Some(RemoveVolumeOptions { force: true }))
        .await
    {
        Ok(()) => Ok(()),
        Err(err) if is_not_found(&err) => Ok(()),
        Err(err) => Err(engine_error(
            format_args!("cannot remove volume {name}"),
            err,
            |r| control("shut down", r),
        )),
    }
}
