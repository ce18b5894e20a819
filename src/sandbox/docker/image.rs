//! The kernel image: its tag (a hash of the build inputs, which are embedded in the binary) and
//! building it offline with the embedded `kernel-image/build.sh`, so the binary alone knows its
//! default image and can build it.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use bollard::Docker;
use sha2::{Digest, Sha256};
use tokio::process::Command;

/// The repository part of kernel image tags.
pub const IMAGE_REPOSITORY: &str = "kernelbox-kernel";

/// The files the image is built from, in hashing order: the same list, order and hashing rule
/// as `inputs` in `kernel-image/build.sh` (name, newline, contents; first 12 hex of sha256).
const INPUTS: [(&str, &[u8]); 9] = [
    ("build.sh", include_bytes!("../../../kernel-image/build.sh")),
    (
        "setup-rootfs.sh",
        include_bytes!("../../../kernel-image/setup-rootfs.sh"),
    ),
    (
        "Dockerfile",
        include_bytes!("../../../kernel-image/Dockerfile"),
    ),
    (
        "packages.txt",
        include_bytes!("../../../kernel-image/packages.txt"),
    ),
    (
        "requirements.txt",
        include_bytes!("../../../kernel-image/requirements.txt"),
    ),
    (
        "kernel-entrypoint.sh",
        include_bytes!("../../../kernel-image/kernel-entrypoint.sh"),
    ),
    (
        "matplotlibrc",
        include_bytes!("../../../kernel-image/matplotlibrc"),
    ),
    (
        "ipython_kernel_config.py",
        include_bytes!("../../../kernel-image/ipython_kernel_config.py"),
    ),
    (
        "sitecustomize.py",
        include_bytes!("../../../kernel-image/sitecustomize.py"),
    ),
];

/// Why the kernel image could not be checked or built.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The engine could not be asked about the image.
    #[error("cannot inspect image {image}: {source}")]
    Inspect {
        /// The image asked about.
        image: String,
        /// The engine's answer.
        source: bollard::errors::Error,
    },
    /// Preparing or running the build script failed at the OS level.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The build script ran and failed (its progress lines on stderr say why).
    #[error("kernel image build failed ({status}); see the [kernel-image] lines above")]
    BuildFailed {
        /// The script's exit status.
        status: std::process::ExitStatus,
    },
    /// The script built a different tag than the binary expects (inputs out of sync).
    #[error("the build script produced {got:?}, expected {expected:?}")]
    UnexpectedTag {
        /// What the script printed.
        got: String,
        /// [`default_image_tag`].
        expected: String,
    },
}

/// The tag of the image built from this binary's embedded inputs,
/// `kernelbox-kernel:<12 hex>`: the default [`DockerConfig::image`](super::DockerConfig::image).
/// It changes exactly when an input changes, so an existing tag never needs rebuilding.
pub fn default_image_tag() -> String {
    let mut hasher = Sha256::new();
    for (name, contents) in INPUTS {
        hasher.update(name.as_bytes());
        hasher.update(b"\n");
        hasher.update(contents);
    }
    let digest = hex::encode(hasher.finalize());
    format!("{IMAGE_REPOSITORY}:{}", &digest[..12])
}

/// Whether the engine has `image` (any tag or id). Used to fail early with a hint rather than
/// at the first launch, and by `kernelbox image build` to skip work.
pub async fn image_exists(docker: &Docker, image: &str) -> Result<bool, ImageError> {
    match docker.inspect_image(image).await {
        Ok(_) => Ok(true),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(false),
        Err(source) => Err(ImageError::Inspect {
            image: image.to_owned(),
            source,
        }),
    }
}

/// Builds the default kernel image ([`default_image_tag`]) on this machine without a registry,
/// for `kernelbox image build`: writes the embedded `kernel-image/` inputs to a temporary
/// directory and runs its `build.sh` (debootstrap + pip; needs root, the `docker` CLI, and network
/// access to the Debian mirror of the host's apt sources and to PyPI). Its progress lines go
/// straight to this process's stderr. Returns at once when the tag already exists unless `force`.
/// Returns the tag. Takes about two minutes on a 2-core machine.
pub async fn build_image(force: bool) -> Result<String, ImageError> {
    let dir = std::env::temp_dir().join(format!(
        "kernelbox-image-inputs-{}",
        hex::encode(rand::random::<[u8; 6]>())
    ));
    let result = run_build_script(&dir, force).await;
    // Best effort: a leftover temp dir of a few KiB is not worth failing the build for.
    let _ = tokio::fs::remove_dir_all(&dir).await;
    result
}

async fn run_build_script(dir: &Path, force: bool) -> Result<String, ImageError> {
    write_inputs(dir).await?;
    let mut command = Command::new("bash");
    command.arg(dir.join("build.sh"));
    if force {
        command.arg("--force");
    }
    let output = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| ImageError::Io {
            context: "cannot run bash for kernel-image/build.sh".to_owned(),
            source,
        })?;
    if !output.status.success() {
        return Err(ImageError::BuildFailed {
            status: output.status,
        });
    }
    let got = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let expected = default_image_tag();
    if got != expected {
        return Err(ImageError::UnexpectedTag { got, expected });
    }
    Ok(got)
}

/// Writes the embedded inputs into `dir` (created) so the script finds its siblings.
async fn write_inputs(dir: &Path) -> Result<PathBuf, ImageError> {
    // Fresh and private (a random name in the shared temp dir): an existing one, or a symlink
    // someone planted there, is an error rather than used.
    tokio::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .await
        .map_err(|source| ImageError::Io {
            context: format!("cannot create {}", dir.display()),
            source,
        })?;
    for (name, contents) in INPUTS {
        let path = dir.join(name);
        tokio::fs::write(&path, contents)
            .await
            .map_err(|source| ImageError::Io {
                context: format!("cannot write {}", path.display()),
                source,
            })?;
    }
    Ok(dir.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_is_repository_and_twelve_hex() {
        let tag = default_image_tag();
        let (repo, hash) = tag.split_once(':').unwrap();
        assert_eq!(repo, IMAGE_REPOSITORY);
        assert_eq!(hash.len(), 12);
        assert!(hash.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
