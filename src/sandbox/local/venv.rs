//! `kernelbox setup`: the Python venv the local backend runs kernels from, created once in the
//! cache dir with the same pinned packages as the kernel image.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use sha2::{Digest, Sha256};
use tokio::process::Command;

use crate::config::cache_dir;
use crate::sandbox::SandboxError;

/// The pinned packages every kernel has (shared with the kernel image).
pub const REQUIREMENTS: &str = include_str!("../../../kernel-image/requirements.txt");

/// Makes SIGINT reach the thread running user code (shared with the kernel image).
pub const SITECUSTOMIZE: &str = include_str!("../../../kernel-image/sitecustomize.py");

/// The venv's directory inside the cache.
pub fn venv_dir() -> PathBuf {
    cache_dir().join("venv")
}

/// The python of the venv `setup` makes.
pub fn venv_python() -> PathBuf {
    venv_dir().join("bin").join("python")
}

fn stamp(requirements: &str) -> String {
    let mut hash = Sha256::new();
    hash.update(requirements.as_bytes());
    hash.update(SITECUSTOMIZE.as_bytes());
    hex::encode(hash.finalize())
}

/// Whether the venv exists and was made from the current requirements.
pub fn is_ready() -> bool {
    let stamp_file = venv_dir().join(".kernelbox-stamp");
    std::fs::read_to_string(stamp_file).is_ok_and(|s| s.trim() == stamp(REQUIREMENTS))
}

/// Creates (or refreshes) the venv with `base_python`, printing progress lines to stderr.
/// Does nothing when the venv is already up to date. Returns the venv's python.
pub async fn ensure(base_python: &Path) -> Result<PathBuf, SandboxError> {
    let dir = venv_dir();
    if is_ready() {
        return Ok(venv_python());
    }
    eprintln!(
        "kernelbox: creating the kernel venv at {} (once; about a minute)…",
        dir.display()
    );
    if let Some(parent) = dir.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|source| SandboxError::Io {
                context: format!("creating {}", parent.display()),
                source,
            })?;
    }
    run(Command::new(base_python)
        .arg("-m")
        .arg("venv")
        .arg("--clear")
        .arg(&dir))
    .await?;
    let req_file = dir.join("requirements.txt");
    tokio::fs::write(&req_file, REQUIREMENTS)
        .await
        .map_err(|source| SandboxError::Io {
            context: format!("writing {}", req_file.display()),
            source,
        })?;
    eprintln!("kernelbox: installing ipykernel, matplotlib, numpy, pandas…");
    run(Command::new(venv_python())
        .args(["-m", "pip", "install", "--progress-bar", "on", "-r"])
        .arg(&req_file))
    .await?;
    install_sitecustomize().await?;
    let stamp_file = dir.join(".kernelbox-stamp");
    tokio::fs::write(&stamp_file, stamp(REQUIREMENTS))
        .await
        .map_err(|source| SandboxError::Io {
            context: format!("writing {}", stamp_file.display()),
            source,
        })?;
    eprintln!("kernelbox: kernel venv ready.");
    Ok(venv_python())
}

/// Writes [`SITECUSTOMIZE`] into the venv's site-packages.
async fn install_sitecustomize() -> Result<(), SandboxError> {
    let out = Command::new(venv_python())
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['purelib'])",
        ])
        .output()
        .await
        .map_err(|e| SandboxError::Launch(format!("asking the venv for its site-packages: {e}")))?;
    let site = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let file = site.join("sitecustomize.py");
    tokio::fs::write(&file, SITECUSTOMIZE)
        .await
        .map_err(|source| SandboxError::Io {
            context: format!("writing {}", file.display()),
            source,
        })
}

async fn run(cmd: &mut Command) -> Result<(), SandboxError> {
    let shown = format!("{:?}", cmd.as_std());
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .await
        .map_err(|e| SandboxError::Launch(format!("running {shown}: {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(SandboxError::Unavailable {
            what: "the kernel venv".into(),
            reason: format!("{shown} failed with {status}"),
            hint: "Check that python3 with the venv module is installed and PyPI is reachable."
                .into(),
        })
    }
}
