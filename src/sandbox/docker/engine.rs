//! What the server checks about the engine and itself before it runs any kernel: whether an
//! engine is configured at all (what `--backend auto` decides on), the engine's security state
//! (seccomp, AppArmor/SELinux, user namespaces, rootless), that the configured OCI runtime
//! exists, and that the kernel's uid is neither root nor the server's own.

use std::collections::HashMap;
use std::fmt;

use bollard::models::{Runtime, SystemInfo};

use super::DockerConfig;
use crate::sandbox::SandboxError;

/// Where the server expects a Docker engine, or that none is installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineLocation {
    /// An engine is configured (explicit address, `DOCKER_HOST`, or a socket at the socket
    /// path): if it does not answer, that is a fault, not a reason to run kernels unisolated.
    Configured(String),
    /// No address is configured and there is no socket at the socket path: no engine here.
    NotInstalled,
}

impl EngineLocation {
    /// Where `config` (and the process's `DOCKER_HOST`) say the engine is.
    pub fn of(config: &DockerConfig) -> Self {
        if let Some(host) = &config.docker_host {
            return Self::Configured(format!("the configured engine address {host}"));
        }
        if let Some(host) = docker_host_env() {
            return Self::Configured(format!("DOCKER_HOST={host}"));
        }
        // `exists` follows symlinks; a dangling one is "nothing here". A socket file that is there
        // but refuses connections is an engine that is installed and down.
        if std::fs::symlink_metadata(&config.socket).is_ok() {
            return Self::Configured(format!("the socket {}", config.socket.display()));
        }
        Self::NotInstalled
    }
}

/// `DOCKER_HOST`, when set and not empty.
pub(super) fn docker_host_env() -> Option<String> {
    std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty())
}

/// The engine's security state as `docker info` reports it (`SecurityOptions`, runtimes): names
/// and profile names only, nothing that identifies the host, so it may be shown on `/healthz`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct EngineSecurity {
    /// The seccomp profile containers get by default (`default`, `builtin`, a path's name), if
    /// seccomp is on.
    pub seccomp: Option<String>,
    /// AppArmor confines containers (default profile `docker-default`).
    pub apparmor: bool,
    /// SELinux labels containers.
    pub selinux: bool,
    /// User namespace remapping: container root is not host root.
    pub userns: bool,
    /// The engine itself runs without root privileges.
    pub rootless: bool,
    /// The OCI runtimes the engine knows (`runc`, `runsc`, …), sorted.
    pub runtimes: Vec<String>,
    /// The runtime containers get when none is asked for.
    pub default_runtime: Option<String>,
}

impl EngineSecurity {
    /// Reads the state from the engine's `info` answer.
    pub fn from_info(info: &SystemInfo) -> Self {
        let mut state = Self::default();
        for option in info.security_options.iter().flatten() {
            // Each option is `name=seccomp,profile=default` (older engines: just `seccomp`).
            let fields: HashMap<&str, &str> = option
                .split(',')
                .filter_map(|field| field.split_once('='))
                .collect();
            let name = fields.get("name").copied().unwrap_or(option.as_str());
            match name {
                "seccomp" => {
                    let profile = fields.get("profile").copied().unwrap_or("default");
                    // An engine started with `--seccomp-profile=unconfined` lists seccomp with
                    // that profile: no filtering at all.
                    // A custom profile is named by its path: say only that it is custom.
                    if profile != "unconfined" {
                        let shown = if profile.contains('/') {
                            "custom"
                        } else {
                            profile
                        };
                        state.seccomp = Some(shown.to_owned());
                    }
                }
                "apparmor" => state.apparmor = true,
                "selinux" => state.selinux = true,
                "userns" => state.userns = true,
                "rootless" => state.rootless = true,
                _ => {}
            }
        }
        let runtimes: Option<&HashMap<String, Runtime>> = info.runtimes.as_ref();
        state.runtimes = runtimes
            .map(|r| r.keys().cloned().collect())
            .unwrap_or_default();
        state.runtimes.sort();
        state.default_runtime.clone_from(&info.default_runtime);
        state
    }

    /// The protections this engine lacks, each with what it means for kernels; empty when all
    /// are there. Either user namespaces or a rootless engine counts for "container root is not
    /// host root"; either AppArmor or SELinux for a mandatory access control profile.
    pub fn missing(&self) -> Vec<&'static str> {
        let mut missing = Vec::new();
        if self.seccomp.is_none() {
            missing.push("seccomp (kernels may make every system call)");
        }
        if !self.apparmor && !self.selinux {
            missing.push("AppArmor/SELinux (no mandatory access control profile)");
        }
        if !self.userns && !self.rootless {
            missing
                .push("user namespaces / rootless (a container escape is an escape as host root)");
        }
        missing
    }

    /// Checks that the engine knows `runtime` (the `--runtime` setting).
    pub fn check_runtime(&self, runtime: &str) -> Result<(), SandboxError> {
        if self.runtimes.iter().any(|r| r == runtime) {
            return Ok(());
        }
        Err(SandboxError::Unavailable {
            what: format!("the OCI runtime {runtime:?}"),
            reason: format!(
                "the Docker engine does not know it (it knows: {})",
                self.runtimes.join(", ")
            ),
            hint: "Register it in the engine's daemon.json (\"runtimes\") and reload the engine \
                   (SIGHUP), or leave --runtime unset for the engine's default"
                .to_owned(),
        })
    }
}

impl fmt::Display for EngineSecurity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let on = |b: bool| if b { "on" } else { "off" };
        write!(
            f,
            "seccomp={} apparmor={} selinux={} userns={} rootless={} runtimes=[{}] default_runtime={}",
            self.seccomp.as_deref().unwrap_or("off"),
            on(self.apparmor),
            on(self.selinux),
            on(self.userns),
            on(self.rootless),
            self.runtimes.join(","),
            self.default_runtime.as_deref().unwrap_or("?"),
        )
    }
}

/// Refuses a kernel uid that is root or the server's own (`server_uid`): a kernel running as
/// the server's user could signal or trace the server, and read its files (the session store
/// with every kernel's key, the API tokens).
pub fn check_kernel_ids(uid: u32, gid: u32, server_uid: u32) -> Result<(), SandboxError> {
    let refuse = |reason: String, hint: &str| {
        Err(SandboxError::Unavailable {
            what: "the Docker backend".to_owned(),
            reason,
            hint: hint.to_owned(),
        })
    };
    if uid == 0 || gid == 0 {
        return refuse(
            format!("kernels would run as root ({uid}:{gid})"),
            "Set --kernel-uid/--kernel-gid to an unprivileged id (default 1000)",
        );
    }
    if uid == server_uid {
        return refuse(
            format!(
                "kernels would run as uid {uid}, the server's own uid: a kernel could signal, \
                 trace or read the server and its files"
            ),
            "Run the server as another user (root: it hands each session's directory to the \
             kernel's uid), or set --kernel-uid to a uid the server does not run as",
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(options: &[&str], runtimes: &[&str]) -> SystemInfo {
        SystemInfo {
            security_options: Some(options.iter().map(|s| (*s).to_owned()).collect()),
            runtimes: Some(
                runtimes
                    .iter()
                    .map(|r| ((*r).to_owned(), Runtime::default()))
                    .collect(),
            ),
            default_runtime: Some("runc".to_owned()),
            ..Default::default()
        }
    }

    #[test]
    fn reads_security_options() {
        let state = EngineSecurity::from_info(&info(
            &[
                "name=seccomp,profile=builtin",
                "name=apparmor",
                "name=userns",
                "name=cgroupns",
            ],
            &["runsc", "runc"],
        ));
        assert_eq!(state.seccomp.as_deref(), Some("builtin"));
        assert!(state.apparmor && state.userns && !state.rootless && !state.selinux);
        assert_eq!(state.runtimes, ["runc", "runsc"]);
        assert!(state.missing().is_empty(), "{:?}", state.missing());
        assert!(state.check_runtime("runsc").is_ok());
        assert!(state.check_runtime("kata").is_err());
    }

    #[test]
    fn missing_protections_are_named() {
        let custom = EngineSecurity::from_info(&info(&["name=seccomp,profile=/etc/x.json"], &[]));
        assert_eq!(
            custom.seccomp.as_deref(),
            Some("custom"),
            "no host path is shown"
        );
        let state = EngineSecurity::from_info(&info(&["name=seccomp,profile=unconfined"], &[]));
        let missing = state.missing().join("; ");
        assert!(missing.contains("seccomp"), "{missing}");
        assert!(missing.contains("AppArmor"), "{missing}");
        assert!(missing.contains("user namespaces"), "{missing}");
        let rootless = EngineSecurity::from_info(&info(&["seccomp", "name=rootless"], &[]));
        assert_eq!(rootless.seccomp.as_deref(), Some("default"));
        assert_eq!(rootless.missing().len(), 1, "{:?}", rootless.missing());
    }

    #[test]
    fn kernel_uid_is_neither_root_nor_the_servers() {
        assert!(check_kernel_ids(1000, 1000, 0).is_ok());
        assert!(check_kernel_ids(0, 1000, 1001).is_err());
        assert!(check_kernel_ids(1000, 0, 1001).is_err());
        let same = check_kernel_ids(1000, 1000, 1000).map_err(|e| e.to_string());
        assert!(
            same.as_ref()
                .is_err_and(|e| e.contains("the server's own uid")),
            "{same:?}"
        );
    }
}
