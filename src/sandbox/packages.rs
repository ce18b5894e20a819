//! Installing Python packages into one session's own environment: `pip install --target` a
//! directory in the session's working dir ([`PACKAGES_DIR`]), which the kernel has on its
//! `sys.path` (`PYTHONPATH`). The image's own venv stays read-only and shared.
//!
//! The operator's [`PackagePolicy`] decides whether installs happen at all (default: no), which
//! index pip uses, and with which CA bundle. On Docker the install runs in a short-lived
//! installer container of the kernel image (same hardening, the session's working dir mounted,
//! network only for it): the kernel itself never gets network access.
//!
//! pip runs with the network, so nothing the session wrote may run inside it: the interpreter
//! is isolated (`python -I`: no current directory, `PYTHONPATH` or user site on `sys.path`), its
//! current directory is outside the working dir, and only wheels are installed
//! (`--only-binary :all:`: no package's build code runs) unless the operator allows sdists.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

/// The packages directory, relative to the working dir (hidden; counts against its size).
pub const PACKAGES_DIR: &str = ".kernelbox/site-packages";

/// Most packages one install may name.
pub const MAX_PACKAGES: usize = 64;

/// What an operator allows for package installs.
#[derive(Debug, Clone)]
pub struct PackagePolicy {
    /// Whether sessions may install packages at all. Default false.
    pub allow: bool,
    /// pip's `--index-url` (a mirror or proxy); `None`: pip's default (PyPI).
    pub index_url: Option<String>,
    /// A CA bundle on the server's host for pip to trust (e.g. behind a TLS-intercepting
    /// proxy); mounted read-only into the installer only. `None`: pip's own bundle.
    pub ca_bundle: Option<PathBuf>,
    /// The Docker network the installer container joins. Default `bridge`.
    pub network: String,
    /// How long one install may take before it is stopped. Default 5 minutes.
    pub timeout: Duration,
    /// Whether pip may build source distributions (running their `setup.py` or build backend,
    /// with the installer's network). Default false: wheels only.
    pub allow_sdist: bool,
}

impl Default for PackagePolicy {
    fn default() -> Self {
        Self {
            allow: false,
            index_url: None,
            ca_bundle: None,
            network: "bridge".to_owned(),
            timeout: Duration::from_secs(300),
            allow_sdist: false,
        }
    }
}

/// Errors of package installs.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The operator did not enable installs.
    #[error(
        "package installs are disabled on this server (the operator enables them with \
         --allow-package-installs)"
    )]
    Disabled,
    /// A requirement is not a plain package name with optional extras and version specifiers.
    #[error(
        "invalid package {0:?}: expected a name with optional [extras] and version specifiers, e.g. `requests` or `toolz==1.0.0`"
    )]
    InvalidPackage(String),
    /// Too many packages at once, or none.
    #[error("an install names 1 to {MAX_PACKAGES} packages, not {0}")]
    Count(usize),
    /// pip failed.
    #[error("pip failed (exit code {code}): {message}")]
    Failed {
        /// pip's exit code.
        code: i64,
        /// pip's error lines.
        message: String,
    },
    /// The install took longer than the policy allows.
    #[error("the install did not finish within {0:?} and was stopped")]
    Timeout(Duration),
    /// The backend could not run pip.
    #[error("cannot run the install: {0}")]
    Backend(String),
}

/// Installs packages into one session's environment.
#[async_trait]
pub trait PackageInstaller: std::fmt::Debug + Send + Sync + 'static {
    /// Runs pip for `packages` (already [`validate`]d), sending each line of its output to
    /// `progress` as it comes. Returns once pip has finished.
    async fn install(
        &self,
        packages: &[String],
        progress: mpsc::Sender<String>,
    ) -> Result<(), InstallError>;
}

/// Checks requirements: 1 to [`MAX_PACKAGES`] of them, each a name (letters, digits, `.`, `_`,
/// `-`) with optional `[extras]` and version specifiers (`==1.0`, `>=2,<3`). No options, paths,
/// URLs or whitespace, so nothing can steer pip elsewhere.
pub fn validate(packages: &[String]) -> Result<(), InstallError> {
    if packages.is_empty() || packages.len() > MAX_PACKAGES {
        return Err(InstallError::Count(packages.len()));
    }
    for package in packages {
        let ok = package.len() <= 200
            && package.starts_with(|c: char| c.is_ascii_alphanumeric())
            && package.chars().all(|c| {
                c.is_ascii_alphanumeric()
                    || matches!(
                        c,
                        '.' | '_' | '-' | '[' | ']' | ',' | '=' | '<' | '>' | '~' | '!' | '*' | '+'
                    )
            });
        if !ok {
            return Err(InstallError::InvalidPackage(package.clone()));
        }
    }
    Ok(())
}

/// How pip is started: the isolated interpreter (`-I`: neither the current directory nor
/// `PYTHON*` variables nor the user site reach `sys.path`, so a `pip/` package the session wrote
/// cannot stand in for pip), then `-m pip`. [`pip_args`] follow.
pub(crate) const PIP_PREFIX: [&str; 3] = ["-I", "-m", "pip"];

/// pip's arguments after [`PIP_PREFIX`] for installing `packages` into `target`: wheels only
/// unless the policy allows sdists.
pub(crate) fn pip_args(policy: &PackagePolicy, target: &str, packages: &[String]) -> Vec<String> {
    let mut args: Vec<String> = [
        "install",
        "--no-input",
        "--disable-pip-version-check",
        "--no-cache-dir",
        "--progress-bar",
        "off",
        "--no-warn-script-location",
        "--target",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.push(target.to_owned());
    if !policy.allow_sdist {
        args.push("--only-binary=:all:".to_owned());
    }
    if let Some(index) = &policy.index_url {
        args.push("--index-url".to_owned());
        args.push(index.clone());
    }
    args.push("--".to_owned());
    args.extend(packages.iter().cloned());
    args
}

/// pip's own explanation in its output: the `ERROR:` lines (else the last lines).
pub(crate) fn pip_error(output: &[String]) -> String {
    let errors: Vec<&str> = output
        .iter()
        .map(String::as_str)
        .filter(|line| line.starts_with("ERROR:"))
        .collect();
    if !errors.is_empty() {
        return errors.join("\n");
    }
    let start = output.len().saturating_sub(5);
    output[start..].join("\n")
}

/// Splits a byte stream into lines: complete lines are returned, the rest stays in `pending`.
pub(crate) fn lines(pending: &mut Vec<u8>, chunk: &[u8]) -> Vec<String> {
    pending.extend_from_slice(chunk);
    let mut out = Vec::new();
    while let Some(pos) = pending.iter().position(|b| *b == b'\n') {
        let line: Vec<u8> = pending.drain(..=pos).collect();
        out.push(
            String::from_utf8_lossy(&line)
                .trim_end_matches(['\r', '\n'])
                .to_owned(),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn plain_requirements_pass() {
        validate(&v(&[
            "requests",
            "toolz==1.0.0",
            "pandas[excel]>=2,<3",
            "zope.interface",
        ]))
        .unwrap();
    }

    #[test]
    fn options_paths_and_urls_are_refused() {
        for bad in [
            "--index-url=http://evil",
            "-r/etc/passwd",
            "./local",
            "/abs/path",
            "pkg @ https://x/y.whl",
            "a b",
            "",
        ] {
            assert!(validate(&v(&[bad])).is_err(), "{bad:?} was accepted");
        }
        assert!(validate(&[]).is_err());
    }

    #[test]
    fn wheels_only_unless_sdists_are_allowed() {
        let wheels = pip_args(&PackagePolicy::default(), "/t", &v(&["six"]));
        assert!(wheels.contains(&"--only-binary=:all:".to_owned()));
        let sdists = PackagePolicy {
            allow_sdist: true,
            ..PackagePolicy::default()
        };
        let args = pip_args(&sdists, "/t", &v(&["six"]));
        assert!(!args.iter().any(|a| a.starts_with("--only-binary")));
        assert_eq!(&args[args.len() - 2..], ["--", "six"]);
    }

    #[test]
    fn pip_errors_are_its_error_lines() {
        let out = v(&[
            "Collecting nope",
            "ERROR: Could not find a version that satisfies the requirement nope",
            "ERROR: No matching distribution found for nope",
        ]);
        assert_eq!(
            pip_error(&out),
            "ERROR: Could not find a version that satisfies the requirement nope\n\
             ERROR: No matching distribution found for nope"
        );
    }

    #[test]
    fn lines_are_split_across_chunks() {
        let mut pending = Vec::new();
        assert_eq!(lines(&mut pending, b"Coll"), Vec::<String>::new());
        assert_eq!(
            lines(&mut pending, b"ecting six\nDone\r\nx"),
            v(&["Collecting six", "Done"])
        );
        assert_eq!(pending, b"x");
    }
}
