//! A session's working directory as clients see it: list, read, write and delete files by a
//! path relative to it. [`WorkPath`] is the only way in: it rejects absolute paths, `..` and
//! other tricks before any backend sees them; each backend also refuses to follow a symlink out
//! of the working directory. [`HostFiles`] serves a directory on the server's own filesystem
//! (the local backend, and the Docker backend with a host working dir); the Docker backend's
//! tmpfs working dir is served through its keeper container (`docker::files`).

use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::stream::BoxStream;
use serde::Serialize;
use tokio::io::AsyncWriteExt;

/// A stream of file contents.
pub type ByteStream = BoxStream<'static, Result<Bytes, std::io::Error>>;

/// Most entries a listing returns (a directory with more is cut, and says so).
pub const MAX_LIST_ENTRIES: usize = 10_000;

/// Errors of file operations, each saying what the client should know.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// The path is not a plain relative path inside the working directory.
    #[error("invalid path {path:?}: {reason}")]
    InvalidPath {
        /// The path as the client gave it.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The path leads out of the working directory through a symlink.
    #[error("path {0:?} leads outside the session's working directory (through a symlink)")]
    Escapes(String),
    /// Nothing at that path.
    #[error("no such file or directory: {0}")]
    NotFound(String),
    /// A file was expected, a directory found.
    #[error("{0} is a directory")]
    IsADirectory(String),
    /// A directory was expected, something else found.
    #[error("{0} is not a directory")]
    NotADirectory(String),
    /// The upload is larger than the server accepts.
    #[error("the file is larger than this server's upload limit of {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// The working directory is full (its size limit).
    #[error("no space left in the session's working directory")]
    NoSpace,
    /// The upload's body could not be read.
    #[error("reading the upload failed: {0}")]
    Body(String),
    /// The backend could not carry out the operation (engine trouble, container gone).
    #[error("cannot {op} {path}: {reason}")]
    Backend {
        /// What was being done (list, read, write, delete).
        op: &'static str,
        /// The path it was done to.
        path: String,
        /// Why it failed.
        reason: String,
    },
    /// The session's sandbox offers no file access.
    #[error("this session's sandbox offers no file access")]
    Unsupported,
}

/// A validated path inside a working directory: relative, normalised (no `.` or empty
/// components), without `..`, NUL or backslashes. The empty path is the working dir itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkPath(String);

impl WorkPath {
    /// Checks and normalises a client's path (`a//b/./c` → `a/b/c`; `""`, `"."` and `"/"`-free
    /// forms of the root → the root).
    pub fn parse(raw: &str) -> Result<Self, FilesError> {
        let invalid = |reason| FilesError::InvalidPath {
            path: raw.to_owned(),
            reason,
        };
        if raw.contains('\0') {
            return Err(invalid("it contains a NUL byte"));
        }
        if raw.contains('\\') {
            return Err(invalid("it contains a backslash"));
        }
        if raw.starts_with('/') {
            return Err(invalid(
                "absolute paths are not allowed; paths are relative to the working directory",
            ));
        }
        let mut parts = Vec::new();
        for component in Path::new(raw).components() {
            match component {
                Component::Normal(part) => match part.to_str() {
                    Some(part) => parts.push(part),
                    None => return Err(invalid("it is not valid UTF-8")),
                },
                Component::CurDir => {}
                Component::ParentDir => {
                    return Err(invalid("`..` is not allowed"));
                }
                Component::RootDir | Component::Prefix(_) => {
                    return Err(invalid("absolute paths are not allowed"));
                }
            }
        }
        let path = parts.join("/");
        if path.len() > 4096 {
            return Err(invalid("it is longer than 4096 bytes"));
        }
        Ok(Self(path))
    }

    /// The normalised path (`""` for the working dir itself).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is the working directory itself.
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The parent directory and the last component (`None` for the root).
    pub fn split_last(&self) -> Option<(WorkPath, &str)> {
        if self.is_root() {
            return None;
        }
        Some(match self.0.rsplit_once('/') {
            Some((parent, name)) => (WorkPath(parent.to_owned()), name),
            None => (WorkPath(String::new()), self.0.as_str()),
        })
    }

    /// `self/name` (for listings).
    pub fn join(&self, name: &str) -> String {
        if self.is_root() {
            name.to_owned()
        } else {
            format!("{}/{name}", self.0)
        }
    }
}

impl std::fmt::Display for WorkPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_root() {
            f.write_str(".")
        } else {
            f.write_str(&self.0)
        }
    }
}

/// One entry of a working directory.
#[derive(Debug, Clone, PartialEq, Serialize, schemars::JsonSchema)]
pub struct FileEntry {
    /// The last component of the path.
    pub name: String,
    /// The path relative to the working directory.
    pub path: String,
    /// Size in bytes (0 for directories).
    pub size: u64,
    /// Last modification time (RFC 3339, UTC).
    pub modified: String,
    /// Whether it is a directory.
    pub is_dir: bool,
}

/// A listing of one directory.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Listing {
    /// The entries, sorted by name.
    pub entries: Vec<FileEntry>,
    /// Whether the directory had more than [`MAX_LIST_ENTRIES`] entries (the rest are left out).
    pub truncated: bool,
}

/// A file being downloaded.
pub struct Download {
    /// Its size in bytes.
    pub size: u64,
    /// Its contents.
    pub body: ByteStream,
}

impl std::fmt::Debug for Download {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Download")
            .field("size", &self.size)
            .finish()
    }
}

/// File access to one session's working directory; shared by the session's handle, usable
/// while the kernel runs, restarts or is dead.
#[async_trait]
pub trait SessionFiles: std::fmt::Debug + Send + Sync + 'static {
    /// The entries of directory `dir`.
    async fn list(&self, dir: &WorkPath) -> Result<Listing, FilesError>;

    /// Opens file `path` for download.
    async fn read(&self, path: &WorkPath) -> Result<Download, FilesError>;

    /// Creates or replaces file `path` (and its missing parent directories) with `body`,
    /// refusing more than `limit` bytes ([`FilesError::TooLarge`]; nothing is written then).
    async fn write(
        &self,
        path: &WorkPath,
        body: ByteStream,
        limit: u64,
    ) -> Result<FileEntry, FilesError>;

    /// Removes file or directory (recursively) `path`; a symlink is removed, not followed.
    async fn delete(&self, path: &WorkPath) -> Result<(), FilesError>;
}

/// RFC 3339 (UTC, milliseconds) of a time.
pub(crate) fn rfc3339(time: SystemTime) -> String {
    DateTime::<Utc>::from(time).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Reads `body` into `file`, failing with [`FilesError::TooLarge`] beyond `limit` bytes.
/// Returns the number of bytes written.
pub(crate) async fn spool(
    mut body: ByteStream,
    file: &mut tokio::fs::File,
    limit: u64,
    path: &WorkPath,
) -> Result<u64, FilesError> {
    let mut written: u64 = 0;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|err| FilesError::Body(err.to_string()))?;
        written += chunk.len() as u64;
        if written > limit {
            return Err(FilesError::TooLarge { limit });
        }
        file.write_all(&chunk)
            .await
            .map_err(|err| write_error(path, err))?;
    }
    file.flush().await.map_err(|err| write_error(path, err))?;
    Ok(written)
}

fn write_error(path: &WorkPath, err: std::io::Error) -> FilesError {
    if err.raw_os_error() == Some(nix::libc::ENOSPC) {
        FilesError::NoSpace
    } else {
        FilesError::Backend {
            op: "write",
            path: path.to_string(),
            reason: err.to_string(),
        }
    }
}

/// A working directory on the server's own filesystem. Symlinks inside it are followed as long
/// as they stay inside; one leading out is refused. (The check and the operation are separate
/// steps: a kernel racing to swap a directory for a symlink in between could still redirect one
/// operation — the local backend isolates nothing anyway; the Docker backend's default tmpfs
/// working dir is not served from here.)
#[derive(Debug, Clone)]
pub struct HostFiles {
    root: PathBuf,
    owner: Option<(u32, u32)>,
}

impl HostFiles {
    /// Files under `root`; what is written is chowned to `owner` (uid, gid) when given (a root
    /// server writing for a non-root kernel).
    pub fn new(root: PathBuf, owner: Option<(u32, u32)>) -> Self {
        Self { root, owner }
    }

    /// The canonical root.
    fn canonical_root(&self) -> Result<PathBuf, FilesError> {
        std::fs::canonicalize(&self.root).map_err(|err| FilesError::Backend {
            op: "open",
            path: ".".to_owned(),
            reason: format!("the working directory is unavailable: {err}"),
        })
    }

    /// The host path of `path`, with every existing component checked: symlinks may only lead
    /// to places inside the root. Missing trailing components are fine (for writes).
    fn resolve(&self, path: &WorkPath, follow_last: bool) -> Result<PathBuf, FilesError> {
        let root = self.canonical_root()?;
        let mut current = root.clone();
        let parts: Vec<&str> = if path.is_root() {
            Vec::new()
        } else {
            path.as_str().split('/').collect()
        };
        for (i, part) in parts.iter().enumerate() {
            let next = current.join(part);
            let last = i + 1 == parts.len();
            match std::fs::symlink_metadata(&next) {
                Ok(meta) if meta.file_type().is_symlink() && (follow_last || !last) => {
                    let target = std::fs::canonicalize(&next)
                        .map_err(|_| FilesError::Escapes(path.as_str().to_owned()))?;
                    if !target.starts_with(&root) {
                        return Err(FilesError::Escapes(path.as_str().to_owned()));
                    }
                    current = target;
                }
                Ok(_) => current = next,
                Err(_) => {
                    // Missing: the rest cannot be symlinks yet.
                    for rest in &parts[i..] {
                        current.push(rest);
                    }
                    return Ok(current);
                }
            }
        }
        Ok(current)
    }

    fn io(op: &'static str, path: &WorkPath, err: std::io::Error) -> FilesError {
        match err.kind() {
            std::io::ErrorKind::NotFound => FilesError::NotFound(path.to_string()),
            _ if err.raw_os_error() == Some(nix::libc::ENOSPC) => FilesError::NoSpace,
            _ if err.raw_os_error() == Some(nix::libc::ENOTDIR) => {
                FilesError::NotADirectory(path.to_string())
            }
            _ => FilesError::Backend {
                op,
                path: path.to_string(),
                reason: err.to_string(),
            },
        }
    }

    fn chown(&self, path: &Path) {
        if let Some((uid, gid)) = self.owner
            && let Err(err) = std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        {
            tracing::debug!(%err, path = %path.display(), "cannot chown an uploaded file");
        }
    }
}

#[async_trait]
impl SessionFiles for HostFiles {
    async fn list(&self, dir: &WorkPath) -> Result<Listing, FilesError> {
        let this = self.clone();
        let dir = dir.clone();
        blocking(move || {
            let host = this.resolve(&dir, true)?;
            let meta = std::fs::metadata(&host).map_err(|e| Self::io("list", &dir, e))?;
            if !meta.is_dir() {
                return Err(FilesError::NotADirectory(dir.to_string()));
            }
            let mut entries = Vec::new();
            let mut truncated = false;
            for entry in std::fs::read_dir(&host).map_err(|e| Self::io("list", &dir, e))? {
                let entry = entry.map_err(|e| Self::io("list", &dir, e))?;
                if entries.len() >= MAX_LIST_ENTRIES {
                    truncated = true;
                    break;
                }
                let Ok(meta) = entry.metadata() else { continue };
                let name = entry.file_name().to_string_lossy().into_owned();
                entries.push(FileEntry {
                    path: dir.join(&name),
                    name,
                    size: if meta.is_dir() { 0 } else { meta.len() },
                    modified: meta.modified().map(rfc3339).unwrap_or_default(),
                    is_dir: meta.is_dir(),
                });
            }
            entries.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(Listing { entries, truncated })
        })
        .await
    }

    async fn read(&self, path: &WorkPath) -> Result<Download, FilesError> {
        let host = {
            let this = self.clone();
            let path = path.clone();
            blocking(move || this.resolve(&path, true)).await?
        };
        // Check before opening: opening a FIFO the kernel made would wait for a writer.
        let meta = tokio::fs::metadata(&host)
            .await
            .map_err(|e| Self::io("read", path, e))?;
        if meta.is_dir() {
            return Err(FilesError::IsADirectory(path.to_string()));
        }
        if !meta.is_file() {
            return Err(FilesError::InvalidPath {
                path: path.to_string(),
                reason: "it is not a regular file",
            });
        }
        let file = tokio::fs::File::open(&host)
            .await
            .map_err(|e| Self::io("read", path, e))?;
        let meta = file
            .metadata()
            .await
            .map_err(|e| Self::io("read", path, e))?;
        Ok(Download {
            size: meta.len(),
            body: tokio_util::io::ReaderStream::new(file).boxed(),
        })
    }

    async fn write(
        &self,
        path: &WorkPath,
        body: ByteStream,
        limit: u64,
    ) -> Result<FileEntry, FilesError> {
        let Some((parent, name)) = path.split_last() else {
            return Err(FilesError::IsADirectory(path.to_string()));
        };
        let name = name.to_owned();
        let this = self.clone();
        let parent_for_mkdir = parent.clone();
        let parent_host = blocking(move || {
            let host = this.resolve(&parent_for_mkdir, true)?;
            // Create missing directories one by one, each owned by the kernel's user.
            let root = this.canonical_root()?;
            let mut current = root.clone();
            if let Ok(rest) = host.strip_prefix(&root) {
                for part in rest.components() {
                    current.push(part);
                    match std::fs::create_dir(&current) {
                        Ok(()) => this.chown(&current),
                        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                        Err(e) => return Err(Self::io("write", &parent_for_mkdir, e)),
                    }
                }
            }
            Ok(host)
        })
        .await?;
        let target = parent_host.join(&name);
        if std::fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
            return Err(FilesError::IsADirectory(path.to_string()));
        }
        // Write next to the target, then rename: a failed or oversized upload leaves nothing,
        // and a symlink at the target is replaced, never followed.
        let temp = parent_host.join(format!(".{name}.kernelbox-upload-{}", uuid::Uuid::new_v4()));
        let mut file = tokio::fs::File::create(&temp)
            .await
            .map_err(|e| Self::io("write", path, e))?;
        let written = spool(body, &mut file, limit, path).await;
        drop(file);
        let written = match written {
            Ok(n) => n,
            Err(err) => {
                let _ = tokio::fs::remove_file(&temp).await;
                return Err(err);
            }
        };
        self.chown(&temp);
        if let Err(err) = tokio::fs::rename(&temp, &target).await {
            let _ = tokio::fs::remove_file(&temp).await;
            return Err(Self::io("write", path, err));
        }
        Ok(FileEntry {
            name,
            path: path.as_str().to_owned(),
            size: written,
            modified: rfc3339(SystemTime::now()),
            is_dir: false,
        })
    }

    async fn delete(&self, path: &WorkPath) -> Result<(), FilesError> {
        if path.is_root() {
            return Err(FilesError::InvalidPath {
                path: String::new(),
                reason: "the working directory itself cannot be deleted",
            });
        }
        let this = self.clone();
        let path = path.clone();
        blocking(move || {
            let host = this.resolve(&path, false)?;
            let meta =
                std::fs::symlink_metadata(&host).map_err(|e| Self::io("delete", &path, e))?;
            if meta.is_dir() {
                std::fs::remove_dir_all(&host)
            } else {
                std::fs::remove_file(&host)
            }
            .map_err(|e| Self::io("delete", &path, e))
        })
        .await
    }
}

/// Runs filesystem work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, FilesError> + Send + 'static,
) -> Result<T, FilesError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|err| {
        Err(FilesError::Backend {
            op: "access",
            path: String::new(),
            reason: format!("the file task failed: {err}"),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_relative_paths_are_normalised() {
        assert_eq!(WorkPath::parse("a//b/./c").unwrap().as_str(), "a/b/c");
        assert_eq!(WorkPath::parse("output/").unwrap().as_str(), "output");
        assert!(WorkPath::parse("").unwrap().is_root());
        assert!(WorkPath::parse(".").unwrap().is_root());
    }

    #[test]
    fn traversal_and_absolute_paths_are_refused() {
        for bad in [
            "../x",
            "a/../../x",
            "a/..",
            "/etc/passwd",
            "a\\..\\b",
            "a\0b",
        ] {
            assert!(
                matches!(WorkPath::parse(bad), Err(FilesError::InvalidPath { .. })),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn split_last_gives_parent_and_name() {
        let p = WorkPath::parse("a/b/c.txt").unwrap();
        let (parent, name) = p.split_last().unwrap();
        assert_eq!((parent.as_str(), name), ("a/b", "c.txt"));
        let p = WorkPath::parse("c.txt").unwrap();
        let (parent, name) = p.split_last().unwrap();
        assert_eq!((parent.as_str(), name), ("", "c.txt"));
    }
}
