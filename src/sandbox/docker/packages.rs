//! Package installs for a Docker session: a short-lived installer container of the kernel image
//! runs `pip install --target` into the session's working dir. It is as locked down as the
//! kernel (no capabilities, no privilege gain, read-only root, non-root, memory and pids limits)
//! except that it joins the policy's network; the kernel container itself stays without network.
//! The operator's CA bundle, if any, is mounted read-only into the installer only.
//!
//! What the session wrote never runs in it: `python -I -m pip` from `/tmp` (the installer's own
//! tmpfs), wheels only unless the operator allows sdists (see [`crate::sandbox::packages`]).

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use bollard::models::{ContainerCreateBody, Mount, MountType};
use bollard::query_parameters::{LogsOptions, StartContainerOptions, WaitContainerOptions};
use futures::StreamExt;
use tokio::sync::mpsc;

use super::container::{CONTAINER_WORK_DIR, hardened_host_config};
use super::{LABEL_INSTANCE, LABEL_MANAGED, LABEL_ROLE, LABEL_SESSION, Shared, remove_container};
use crate::sandbox::packages::{
    InstallError, PACKAGES_DIR, PIP_PREFIX, PackageInstaller, lines, pip_args, pip_error,
};

/// `kernelbox.role` of installer containers.
pub(super) const ROLE_INSTALLER: &str = "installer";
/// Where the CA bundle is mounted in the installer.
const CA_BUNDLE: &str = "/etc/kernelbox/ca-bundle.pem";
/// The kernel image's python.
const PYTHON: &str = "/opt/venv/bin/python";

/// Installs packages for one Docker session.
#[derive(Debug)]
pub(super) struct DockerInstaller {
    pub(super) shared: Arc<Shared>,
    pub(super) session_id: String,
    /// The session's working-dir mount (its tmpfs volume or host dir).
    pub(super) work_mount: Mount,
}

/// Removes the installer container when the install ends, however it ends.
struct Removal {
    docker: bollard::Docker,
    id: String,
}

impl Drop for Removal {
    fn drop(&mut self) {
        let docker = self.docker.clone();
        let id = std::mem::take(&mut self.id);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                if let Err(err) = remove_container(&docker, &id).await {
                    tracing::warn!(%err, "cannot remove an installer container");
                }
            });
        }
    }
}

impl DockerInstaller {
    fn body(&self, packages: &[String]) -> ContainerCreateBody {
        let config = &self.shared.config;
        let policy = &config.packages;
        let target = format!("{CONTAINER_WORK_DIR}/{PACKAGES_DIR}");
        let mut args: Vec<String> = PIP_PREFIX.iter().map(|s| (*s).to_owned()).collect();
        args.extend(pip_args(policy, &target, packages));
        let mut env = vec![
            "HOME=/tmp".to_owned(),
            "PYTHONUNBUFFERED=1".to_owned(),
            "PIP_NO_COLOR=1".to_owned(),
        ];
        let mut mounts = vec![self.work_mount.clone()];
        if let Some(ca) = &policy.ca_bundle {
            env.push(format!("PIP_CERT={CA_BUNDLE}"));
            env.push(format!("SSL_CERT_FILE={CA_BUNDLE}"));
            mounts.push(Mount {
                target: Some(CA_BUNDLE.to_owned()),
                source: Some(ca.to_string_lossy().into_owned()),
                typ: Some(MountType::BIND),
                read_only: Some(true),
                ..Default::default()
            });
        }
        let labels = HashMap::from([
            (LABEL_MANAGED.to_owned(), "true".to_owned()),
            (LABEL_INSTANCE.to_owned(), self.shared.instance_id.clone()),
            (LABEL_SESSION.to_owned(), self.session_id.clone()),
            (LABEL_ROLE.to_owned(), ROLE_INSTALLER.to_owned()),
        ]);
        ContainerCreateBody {
            image: Some(config.image.clone()),
            user: Some(format!("{}:{}", config.uid, config.gid)),
            entrypoint: Some(vec![PYTHON.to_owned()]),
            cmd: Some(args),
            env: Some(env),
            labels: Some(labels),
            // Not the working dir: nothing there may be found as a module or config file.
            working_dir: Some("/tmp".to_owned()),
            host_config: Some(hardened_host_config(config, policy.network.clone(), mounts)),
            ..Default::default()
        }
    }

    /// Follows the installer's output until it exits; returns its exit code and output lines.
    async fn follow(
        &self,
        id: &str,
        progress: &mpsc::Sender<String>,
    ) -> Result<(i64, Vec<String>), InstallError> {
        let docker = &self.shared.docker;
        let mut logs = docker.logs(
            id,
            Some(LogsOptions {
                follow: true,
                stdout: true,
                stderr: true,
                ..Default::default()
            }),
        );
        let mut output = Vec::new();
        let mut pending = Vec::new();
        while let Some(chunk) = logs.next().await {
            let chunk = chunk.map_err(|err| InstallError::Backend(err.to_string()))?;
            for line in lines(&mut pending, &chunk.into_bytes()) {
                // A client that stopped listening must not stop the install.
                let _ = progress.send(line.clone()).await;
                if output.len() < 1000 {
                    output.push(line);
                }
            }
        }
        if !pending.is_empty() {
            let line = String::from_utf8_lossy(&pending).into_owned();
            let _ = progress.send(line.clone()).await;
            output.push(line);
        }
        let code = match docker
            .wait_container(id, None::<WaitContainerOptions>)
            .next()
            .await
        {
            Some(Ok(response)) => response.status_code,
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => code,
            Some(Err(err)) => return Err(InstallError::Backend(err.to_string())),
            None => return Err(InstallError::Backend("the installer vanished".to_owned())),
        };
        Ok((code, output))
    }
}

#[async_trait]
impl PackageInstaller for DockerInstaller {
    async fn install(
        &self,
        packages: &[String],
        progress: mpsc::Sender<String>,
    ) -> Result<(), InstallError> {
        let policy = &self.shared.config.packages;
        if !policy.allow {
            return Err(InstallError::Disabled);
        }
        let docker = &self.shared.docker;
        let id = docker
            .create_container(None, self.body(packages))
            .await
            .map_err(|err| InstallError::Backend(format!("cannot create the installer: {err}")))?
            .id;
        let _removal = Removal {
            docker: docker.clone(),
            id: id.clone(),
        };
        docker
            .start_container(&id, None::<StartContainerOptions>)
            .await
            .map_err(|err| InstallError::Backend(format!("cannot start the installer: {err}")))?;
        let (code, output) = tokio::time::timeout(policy.timeout, self.follow(&id, &progress))
            .await
            .map_err(|_| InstallError::Timeout(policy.timeout))??;
        if code == 0 {
            Ok(())
        } else {
            Err(InstallError::Failed {
                code,
                message: pip_error(&output),
            })
        }
    }
}
