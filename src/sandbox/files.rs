//! A session's working directory as clients see it: list, read, write and delete files by a
//! path relative to it. [`WorkPath`] is the only way in: it rejects absolute paths, `..` and
//! other tricks before any backend sees them; each backend also refuses to follow a symlink out
//! of the working directory. [`HostFiles`] serves a directory on the server's own filesystem
//! (the local backend, and the Docker backend with a host working dir); the Docker backend's
//! tmpfs working dir is served through its keeper container (`docker::files`).

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::stream::BoxStream;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::{Mode, SFlag, fstat, fstatat, mkdirat};
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

/// A working directory on the server's own filesystem. Every path is opened with
/// `openat2(RESOLVE_BENEATH)` from the directory's own descriptor, so the kernel resolves it and
/// refuses (EXDEV) anything leading out — symlinks, however and whenever a kernel swaps them in —
/// while symlinks staying inside are followed. Writes go to a fresh file (`O_EXCL`) in the
/// opened parent directory, renamed into place there; deletes unlink in the opened parent. This
/// matters for the Docker backend's host working dir: a root server must never be tricked into
/// writing outside it. Needs Linux 5.6 or newer (openat2).
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

    /// The working directory itself (the server made it, in a directory only the server can
    /// write; `O_NOFOLLOW` all the same).
    fn open_root(&self) -> Result<OwnedFd, FilesError> {
        nix::fcntl::open(
            &self.root,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|err| FilesError::Backend {
            op: "open",
            path: ".".to_owned(),
            reason: format!("the working directory is unavailable: {err}"),
        })
    }

    /// Opens `rel` (a [`WorkPath`] string, `""` for the root) beneath `dir`.
    fn beneath(dir: impl AsFd, rel: &str, flags: OFlag, mode: Mode) -> Result<OwnedFd, Errno> {
        let rel = if rel.is_empty() { "." } else { rel };
        let how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC)
            .mode(mode)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        openat2(dir, rel, how)
    }

    fn errno(op: &'static str, path: &WorkPath, err: Errno) -> FilesError {
        match err {
            Errno::ENOENT => FilesError::NotFound(path.to_string()),
            Errno::EXDEV | Errno::ELOOP => FilesError::Escapes(path.as_str().to_owned()),
            Errno::ENOTDIR => FilesError::NotADirectory(path.to_string()),
            Errno::EISDIR => FilesError::IsADirectory(path.to_string()),
            Errno::ENOSPC | Errno::EDQUOT => FilesError::NoSpace,
            Errno::ENOSYS => FilesError::Backend {
                op,
                path: path.to_string(),
                reason: "the files API needs openat2 (Linux 5.6 or newer)".to_owned(),
            },
            other => FilesError::Backend {
                op,
                path: path.to_string(),
                reason: other.desc().to_owned(),
            },
        }
    }

    fn io(op: &'static str, path: &WorkPath, err: std::io::Error) -> FilesError {
        match err.raw_os_error() {
            Some(code) => Self::errno(op, path, Errno::from_raw(code)),
            None => FilesError::Backend {
                op,
                path: path.to_string(),
                reason: err.to_string(),
            },
        }
    }

    /// The directory `dir` (beneath the root), creating missing components as the owner.
    fn make_dirs(&self, root: &OwnedFd, dir: &WorkPath) -> Result<OwnedFd, FilesError> {
        let dir_flags = OFlag::O_PATH | OFlag::O_DIRECTORY;
        let parts: Vec<&str> = if dir.is_root() {
            Vec::new()
        } else {
            dir.as_str().split('/').collect()
        };
        let mut current = Self::beneath(root, "", dir_flags, Mode::empty())
            .map_err(|e| Self::errno("write", dir, e))?;
        for i in 0..parts.len() {
            let prefix = parts[..=i].join("/");
            current = match Self::beneath(root, &prefix, dir_flags, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => {
                    match mkdirat(&current, parts[i], Mode::from_bits_truncate(0o755)) {
                        Ok(()) => self.chown_at(&current, parts[i]),
                        Err(Errno::EEXIST) => {}
                        Err(e) => return Err(Self::errno("write", dir, e)),
                    }
                    Self::beneath(root, &prefix, dir_flags, Mode::empty())
                        .map_err(|e| Self::errno("write", dir, e))?
                }
                Err(e) => return Err(Self::errno("write", dir, e)),
            };
        }
        Ok(current)
    }

    /// Hands a file the server created to the owner, through its descriptor.
    fn chown_fd(&self, fd: &OwnedFd) {
        if let Some((uid, gid)) = self.owner
            && let Err(err) = nix::unistd::fchown(
                fd,
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(gid)),
            )
        {
            tracing::debug!(%err, "cannot chown an uploaded file");
        }
    }

    /// Hands a directory the server just made to the owner; never through a symlink (the kernel
    /// may have swapped one in since: then the link itself is chowned, which gives nothing).
    fn chown_at(&self, dir: &OwnedFd, name: &str) {
        if let Some((uid, gid)) = self.owner
            && let Err(err) = nix::unistd::fchownat(
                dir,
                name,
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(gid)),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
        {
            tracing::debug!(%err, name, "cannot chown an uploaded file");
        }
    }
}

/// The `/proc` path of an open descriptor (std's directory reading and recursive removal work
/// on paths; this one names exactly the opened directory).
fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

#[async_trait]
impl SessionFiles for HostFiles {
    async fn list(&self, dir: &WorkPath) -> Result<Listing, FilesError> {
        let this = self.clone();
        let dir = dir.clone();
        blocking(move || {
            let root = this.open_root()?;
            let fd = Self::beneath(
                &root,
                dir.as_str(),
                OFlag::O_RDONLY | OFlag::O_DIRECTORY,
                Mode::empty(),
            )
            .map_err(|e| Self::errno("list", &dir, e))?;
            let mut entries = Vec::new();
            let mut truncated = false;
            let reader = std::fs::read_dir(fd_path(&fd)).map_err(|e| Self::io("list", &dir, e))?;
            for entry in reader {
                let entry = entry.map_err(|e| Self::io("list", &dir, e))?;
                if entries.len() >= MAX_LIST_ENTRIES {
                    truncated = true;
                    break;
                }
                // DirEntry::metadata does not follow symlinks.
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
        let this = self.clone();
        let target = path.clone();
        let (file, size) = blocking(move || {
            let root = this.open_root()?;
            // O_NONBLOCK: opening a FIFO the kernel made must not wait for a writer.
            let fd = Self::beneath(
                &root,
                target.as_str(),
                OFlag::O_RDONLY | OFlag::O_NONBLOCK,
                Mode::empty(),
            )
            .map_err(|e| Self::errno("read", &target, e))?;
            let stat = fstat(&fd).map_err(|e| Self::errno("read", &target, e))?;
            let kind = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT;
            if kind == SFlag::S_IFDIR {
                return Err(FilesError::IsADirectory(target.to_string()));
            }
            if kind != SFlag::S_IFREG {
                return Err(FilesError::InvalidPath {
                    path: target.to_string(),
                    reason: "it is not a regular file",
                });
            }
            Ok((
                std::fs::File::from(fd),
                u64::try_from(stat.st_size).unwrap_or(0),
            ))
        })
        .await?;
        Ok(Download {
            size,
            body: tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(file)).boxed(),
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
        let temp = format!(".{name}.kernelbox-upload-{}", uuid::Uuid::new_v4().simple());
        let this = self.clone();
        let (target, temp_name) = (path.clone(), temp.clone());
        let name_for_open = name.clone();
        // Open the parent (making it), check the target, create the temp file in it.
        let (parent_fd, file) = blocking(move || {
            let root = this.open_root()?;
            let parent_fd = this.make_dirs(&root, &parent)?;
            if let Ok(stat) = fstatat(
                &parent_fd,
                name_for_open.as_str(),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            ) && SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
            {
                return Err(FilesError::IsADirectory(target.to_string()));
            }
            let fd = nix::fcntl::openat(
                &parent_fd,
                temp_name.as_str(),
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o644),
            )
            .map_err(|e| Self::errno("write", &target, e))?;
            // On the descriptor: the kernel may already have replaced the name.
            this.chown_fd(&fd);
            Ok((parent_fd, std::fs::File::from(fd)))
        })
        .await?;
        let mut file = tokio::fs::File::from_std(file);
        let written = spool(body, &mut file, limit, path).await;
        drop(file);
        let target = path.clone();
        let outcome = blocking(move || {
            let result = written.and_then(|n| {
                nix::fcntl::renameat(&parent_fd, temp.as_str(), &parent_fd, name.as_str())
                    .map(|()| n)
                    .map_err(|e| Self::errno("write", &target, e))
            });
            if result.is_err() {
                let _ = nix::unistd::unlinkat(
                    &parent_fd,
                    temp.as_str(),
                    nix::unistd::UnlinkatFlags::NoRemoveDir,
                );
            }
            result
        })
        .await?;
        Ok(FileEntry {
            name: path
                .split_last()
                .map(|(_, n)| n.to_owned())
                .unwrap_or_default(),
            path: path.as_str().to_owned(),
            size: outcome,
            modified: rfc3339(SystemTime::now()),
            is_dir: false,
        })
    }

    async fn delete(&self, path: &WorkPath) -> Result<(), FilesError> {
        let Some((parent, name)) = path.split_last() else {
            return Err(FilesError::InvalidPath {
                path: String::new(),
                reason: "the working directory itself cannot be deleted",
            });
        };
        let name = name.to_owned();
        let this = self.clone();
        let path = path.clone();
        blocking(move || {
            let root = this.open_root()?;
            let parent_fd = Self::beneath(
                &root,
                parent.as_str(),
                OFlag::O_PATH | OFlag::O_DIRECTORY,
                Mode::empty(),
            )
            .map_err(|e| Self::errno("delete", &path, e))?;
            let stat = fstatat(&parent_fd, name.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
                .map_err(|e| Self::errno("delete", &path, e))?;
            if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR {
                // std's remove_dir_all never follows symlinks, also if one is swapped in.
                std::fs::remove_dir_all(fd_path(&parent_fd).join(&name))
                    .map_err(|e| Self::io("delete", &path, e))
            } else {
                nix::unistd::unlinkat(
                    &parent_fd,
                    name.as_str(),
                    nix::unistd::UnlinkatFlags::NoRemoveDir,
                )
                .map_err(|e| Self::errno("delete", &path, e))
            }
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
