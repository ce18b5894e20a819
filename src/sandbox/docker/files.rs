//! The files of a session's tmpfs working dir, served through its keeper container (which holds
//! the volume mounted at [`KEEP_DIR`] and runs whether the kernel runs, restarts or died).
//!
//! - Paths are resolved inside the keeper (`realpath`): a symlink leading out of the working dir
//!   is refused, one staying inside is followed.
//! - list and delete: a small `sh` script exec'd in the keeper (`find -printf`, `rm -rf`).
//! - read: the engine's archive API (`GET /containers/{keeper}/archive`), the tar stream parsed
//!   on the fly, so the download is streamed.
//! - write: the body is spooled to a host temp file (counting against the limit), then sent as a
//!   one-entry tar to the archive API (`PUT`), owned by the kernel's user.
//!
//! Between the check and the engine's operation a kernel could swap a directory for a symlink;
//! the engine then resolves it inside the keeper's own (read-only, image-only) filesystem, never
//! the host's.

use std::sync::Arc;

use async_trait::async_trait;
use bollard::Docker;
use bollard::exec::{StartExecOptions, StartExecResults};
use bollard::models::ExecConfig;
use bollard::query_parameters::{DownloadFromContainerOptions, UploadToContainerOptions};
use bytes::{Bytes, BytesMut};
use chrono::DateTime;
use futures::stream::{self, BoxStream};
use futures::{StreamExt, TryStreamExt};
use tokio::io::AsyncSeekExt;

use super::is_not_found;
use crate::sandbox::files::{
    ByteStream, Download, FileEntry, FilesError, Listing, MAX_LIST_ENTRIES, SessionFiles, WorkPath,
    rfc3339, spool,
};

/// Where the keeper mounts the working-dir volume.
pub(super) const KEEP_DIR: &str = "/keep";

/// Resolves `$1` (relative to the working dir) into `$p`; exit 5 when it leads outside.
const RESOLVE: &str = r#"p=$(realpath -m -- "/keep/$1") || exit 6
case "$p" in /keep|/keep/*) ;; *) exit 5;; esac
"#;

/// Exit codes of the scripts.
const EXIT_NOT_FOUND: i64 = 3;
const EXIT_NOT_DIR: i64 = 4;
const EXIT_ESCAPES: i64 = 5;
const EXIT_IS_DIR: i64 = 7;

/// The working dir of one session, reached through its keeper.
#[derive(Debug)]
pub(super) struct KeeperFiles {
    pub(super) docker: Docker,
    pub(super) keeper_id: String,
    pub(super) uid: u32,
    pub(super) gid: u32,
}

/// What an exec'd script said.
struct ExecOutput {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit_code: i64,
}

impl KeeperFiles {
    fn backend(op: &'static str, path: &WorkPath, reason: impl ToString) -> FilesError {
        FilesError::Backend {
            op,
            path: path.to_string(),
            reason: reason.to_string(),
        }
    }

    /// Runs `sh -c script sh args…` in the keeper, keeping at most `max_stdout` bytes of stdout.
    async fn exec(
        &self,
        op: &'static str,
        path: &WorkPath,
        script: String,
        args: &[&str],
        max_stdout: usize,
    ) -> Result<ExecOutput, FilesError> {
        let mut cmd = vec!["sh".to_owned(), "-c".to_owned(), script, "sh".to_owned()];
        cmd.extend(args.iter().map(|a| (*a).to_owned()));
        let exec = self
            .docker
            .create_exec(
                &self.keeper_id,
                ExecConfig {
                    cmd: Some(cmd),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    working_dir: Some(KEEP_DIR.to_owned()),
                    ..Default::default()
                },
            )
            .await
            .map_err(|err| Self::backend(op, path, keeper_error(&err)))?;
        let started = self
            .docker
            .start_exec(&exec.id, None::<StartExecOptions>)
            .await
            .map_err(|err| Self::backend(op, path, keeper_error(&err)))?;
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        if let StartExecResults::Attached { mut output, .. } = started {
            while let Some(chunk) = output.next().await {
                match chunk {
                    Ok(bollard::container::LogOutput::StdOut { message }) => {
                        if stdout.len() < max_stdout {
                            stdout.extend_from_slice(&message);
                        }
                    }
                    Ok(bollard::container::LogOutput::StdErr { message }) => {
                        if stderr.len() < 4096 {
                            stderr.extend_from_slice(&message);
                        }
                    }
                    Ok(_) => {}
                    Err(err) => return Err(Self::backend(op, path, err)),
                }
            }
        }
        let inspect = self
            .docker
            .inspect_exec(&exec.id)
            .await
            .map_err(|err| Self::backend(op, path, err))?;
        Ok(ExecOutput {
            stdout,
            stderr,
            exit_code: inspect.exit_code.unwrap_or(-1),
        })
    }

    /// Maps a script's exit code to the error it stands for.
    fn check(op: &'static str, path: &WorkPath, out: &ExecOutput) -> Result<(), FilesError> {
        match out.exit_code {
            0 => Ok(()),
            EXIT_NOT_FOUND => Err(FilesError::NotFound(path.to_string())),
            EXIT_NOT_DIR => Err(FilesError::NotADirectory(path.to_string())),
            EXIT_ESCAPES => Err(FilesError::Escapes(path.as_str().to_owned())),
            EXIT_IS_DIR => Err(FilesError::IsADirectory(path.to_string())),
            code => {
                let stderr = String::from_utf8_lossy(&out.stderr);
                if stderr.contains("No space left") {
                    return Err(FilesError::NoSpace);
                }
                Err(Self::backend(
                    op,
                    path,
                    format!("exit code {code}: {}", stderr.trim()),
                ))
            }
        }
    }

    /// The keeper-side path of `path`, checked to stay inside the working dir.
    async fn resolve(&self, op: &'static str, path: &WorkPath) -> Result<String, FilesError> {
        let script = format!("{RESOLVE}printf %s \"$p\"");
        let out = self.exec(op, path, script, &[path.as_str()], 8192).await?;
        Self::check(op, path, &out)?;
        String::from_utf8(out.stdout).map_err(|err| Self::backend(op, path, err))
    }
}

/// An engine error as a reason a client understands.
fn keeper_error(err: &bollard::errors::Error) -> String {
    if is_not_found(err) {
        "the session's working-dir keeper container is gone".to_owned()
    } else {
        err.to_string()
    }
}

#[async_trait]
impl SessionFiles for KeeperFiles {
    async fn list(&self, dir: &WorkPath) -> Result<Listing, FilesError> {
        let script = format!(
            "{RESOLVE}[ -e \"$p\" ] || exit {EXIT_NOT_FOUND}\n[ -d \"$p\" ] || exit {EXIT_NOT_DIR}\n\
             exec find \"$p\" -mindepth 1 -maxdepth 1 -printf '%y %s %T@ %f\\0'"
        );
        // ~100 bytes an entry is plenty for names up to a few dozen bytes.
        let out = self
            .exec("list", dir, script, &[dir.as_str()], MAX_LIST_ENTRIES * 300)
            .await?;
        Self::check("list", dir, &out)?;
        let mut entries = Vec::new();
        let mut truncated = false;
        for record in out.stdout.split(|b| *b == 0) {
            if record.is_empty() {
                continue;
            }
            if entries.len() >= MAX_LIST_ENTRIES {
                truncated = true;
                break;
            }
            let record = String::from_utf8_lossy(record);
            let mut fields = record.splitn(4, ' ');
            let (Some(kind), Some(size), Some(mtime), Some(name)) =
                (fields.next(), fields.next(), fields.next(), fields.next())
            else {
                // A record cut by the output cap.
                truncated = true;
                break;
            };
            let is_dir = kind == "d";
            let modified = mtime
                .parse::<f64>()
                .ok()
                .and_then(|secs| {
                    DateTime::from_timestamp(secs.trunc() as i64, (secs.fract() * 1e9) as u32)
                })
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                .unwrap_or_default();
            entries.push(FileEntry {
                name: name.to_owned(),
                path: dir.join(name),
                size: if is_dir { 0 } else { size.parse().unwrap_or(0) },
                modified,
                is_dir,
            });
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Listing { entries, truncated })
    }

    async fn read(&self, path: &WorkPath) -> Result<Download, FilesError> {
        let resolved = self.resolve("read", path).await?;
        let mut tar = self
            .docker
            .download_from_container(
                &self.keeper_id,
                Some(DownloadFromContainerOptions { path: resolved }),
            )
            .map_err(std::io::Error::other)
            .boxed();
        let mut buffer = BytesMut::new();
        // Skip extension headers (PAX, GNU long names) up to the file's own header.
        let header = loop {
            let block = match take(&mut tar, &mut buffer, 512).await {
                Ok(Some(block)) => block,
                Ok(None) => return Err(Self::backend("read", path, "empty archive")),
                Err(err) => {
                    let engine = err
                        .get_ref()
                        .and_then(|e| e.downcast_ref::<bollard::errors::Error>());
                    return Err(match engine {
                        Some(engine) if is_not_found(engine) => {
                            FilesError::NotFound(path.to_string())
                        }
                        _ => Self::backend("read", path, err),
                    });
                }
            };
            let header = tar::Header::from_byte_slice(&block).clone();
            let kind = header.entry_type();
            if kind.is_pax_global_extensions()
                || kind.is_pax_local_extensions()
                || kind.is_gnu_longname()
                || kind.is_gnu_longlink()
            {
                let size = header
                    .entry_size()
                    .map_err(|err| Self::backend("read", path, err))?;
                let padded = size.div_ceil(512) * 512;
                let padded = usize::try_from(padded)
                    .map_err(|_| Self::backend("read", path, "huge tar extension header"))?;
                take(&mut tar, &mut buffer, padded)
                    .await
                    .map_err(|err| Self::backend("read", path, err))?;
                continue;
            }
            break header;
        };
        let kind = header.entry_type();
        if kind.is_dir() {
            return Err(FilesError::IsADirectory(path.to_string()));
        }
        if !kind.is_file() {
            return Err(FilesError::InvalidPath {
                path: path.to_string(),
                reason: "it is not a regular file",
            });
        }
        let size = header
            .entry_size()
            .map_err(|err| Self::backend("read", path, err))?;
        Ok(Download {
            size,
            body: limited(tar, buffer, size),
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
        // Spool first: the tar header needs the size, and an oversized upload must leave
        // nothing behind.
        let spool_path =
            std::env::temp_dir().join(format!("kernelbox-upload-{}", uuid::Uuid::new_v4()));
        let result = self
            .write_spooled(path, &parent, name, body, limit, &spool_path)
            .await;
        let _ = tokio::fs::remove_file(&spool_path).await;
        result
    }

    async fn delete(&self, path: &WorkPath) -> Result<(), FilesError> {
        let Some((parent, name)) = path.split_last() else {
            return Err(FilesError::InvalidPath {
                path: String::new(),
                reason: "the working directory itself cannot be deleted",
            });
        };
        // The parent is resolved, the last component is not: a symlink is removed, not followed.
        let script = format!(
            "{RESOLVE}t=\"$p/$2\"\n[ -e \"$t\" ] || [ -L \"$t\" ] || exit {EXIT_NOT_FOUND}\n\
             exec rm -rf -- \"$t\""
        );
        let out = self
            .exec("delete", path, script, &[parent.as_str(), name], 1024)
            .await?;
        Self::check("delete", path, &out)
    }
}

impl KeeperFiles {
    async fn write_spooled(
        &self,
        path: &WorkPath,
        parent: &WorkPath,
        name: &str,
        body: ByteStream,
        limit: u64,
        spool_path: &std::path::Path,
    ) -> Result<FileEntry, FilesError> {
        let mut file = tokio::fs::OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(spool_path)
            .await
            .map_err(|err| Self::backend("write", path, format!("cannot spool: {err}")))?;
        let size = spool(body, &mut file, limit, path).await?;
        // Make the parent directories (as the kernel's user) and check the target.
        let script = format!(
            "{RESOLVE}mkdir -p -- \"$p\" || exit 8\n[ -d \"$p/$2\" ] && exit {EXIT_IS_DIR}\n\
             printf %s \"$p\""
        );
        let out = self
            .exec("write", path, script, &[parent.as_str(), name], 8192)
            .await?;
        Self::check("write", path, &out)?;
        let dest =
            String::from_utf8(out.stdout).map_err(|err| Self::backend("write", path, err))?;

        let mut header = tar::Header::new_gnu();
        // Names of 100 bytes and more travel in a GNU long-name entry before the header.
        let short_name = if name.len() >= 100 {
            "kernelbox-long-name"
        } else {
            name
        };
        header
            .set_path(short_name)
            .map_err(|err| Self::backend("write", path, err))?;
        header.set_size(size);
        header.set_mode(0o644);
        header.set_uid(u64::from(self.uid));
        header.set_gid(u64::from(self.gid));
        let now = std::time::SystemTime::now();
        header.set_mtime(
            now.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        );
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        let mut head = BytesMut::new();
        if name.len() >= 100 {
            let mut long = tar::Header::new_gnu();
            if let Some(gnu) = long.as_gnu_mut() {
                gnu.name[..13].copy_from_slice(b"././@LongLink");
            }
            long.set_mode(0o644);
            long.set_entry_type(tar::EntryType::GNULongName);
            long.set_size(name.len() as u64 + 1);
            long.set_cksum();
            head.extend_from_slice(long.as_bytes());
            let mut data = name.as_bytes().to_vec();
            data.push(0);
            data.resize(data.len().div_ceil(512) * 512, 0);
            head.extend_from_slice(&data);
        }
        head.extend_from_slice(header.as_bytes());
        let padding = (512 - (size % 512) as usize) % 512;
        let mut tail = vec![0u8; padding];
        tail.extend_from_slice(&[0u8; 1024]);

        file.seek(std::io::SeekFrom::Start(0))
            .await
            .map_err(|err| Self::backend("write", path, err))?;
        let contents = tokio_util::io::ReaderStream::new(file);
        let archive = stream::once(async move { Ok(head.freeze()) })
            .chain(contents)
            .chain(stream::once(async move { Ok(Bytes::from(tail)) }));
        self.docker
            .upload_to_container(
                &self.keeper_id,
                Some(UploadToContainerOptions {
                    path: dest,
                    no_overwrite_dir_non_dir: Some("true".to_owned()),
                    ..Default::default()
                }),
                bollard::body_try_stream(archive),
            )
            .await
            .map_err(|err| {
                let reason = keeper_error(&err);
                if reason.contains("no space left") {
                    FilesError::NoSpace
                } else {
                    Self::backend("write", path, reason)
                }
            })?;
        Ok(FileEntry {
            name: name.to_owned(),
            path: path.as_str().to_owned(),
            size,
            modified: rfc3339(now),
            is_dir: false,
        })
    }
}

/// Takes exactly `n` bytes from the stream (buffered in `buffer`); `None` if it ended first
/// with nothing buffered.
async fn take(
    tar: &mut BoxStream<'static, Result<Bytes, std::io::Error>>,
    buffer: &mut BytesMut,
    n: usize,
) -> Result<Option<Bytes>, std::io::Error> {
    while buffer.len() < n {
        match tar.next().await {
            Some(chunk) => buffer.extend_from_slice(&chunk?),
            None if buffer.is_empty() => return Ok(None),
            None => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the archive ended early",
                ));
            }
        }
    }
    Ok(Some(buffer.split_to(n).freeze()))
}

/// The next `size` bytes of the tar stream (what is already buffered first); the rest of the
/// archive (padding, trailer) is dropped.
fn limited(
    tar: BoxStream<'static, Result<Bytes, std::io::Error>>,
    buffer: BytesMut,
    size: u64,
) -> ByteStream {
    let state = (Some(tar), buffer, size);
    stream::unfold(state, |(tar, mut buffer, remaining)| async move {
        if remaining == 0 {
            return None;
        }
        let mut tar = tar?;
        if buffer.is_empty() {
            match tar.next().await {
                Some(Ok(chunk)) => buffer.extend_from_slice(&chunk),
                Some(Err(err)) => return Some((Err(err), (None, buffer, 0))),
                None => {
                    let err = std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the archive ended early",
                    );
                    return Some((Err(err), (None, buffer, 0)));
                }
            }
        }
        let n = usize::try_from(remaining)
            .unwrap_or(usize::MAX)
            .min(buffer.len());
        let chunk = buffer.split_to(n).freeze();
        Some((Ok(chunk), (Some(tar), buffer, remaining - n as u64)))
    })
    .boxed()
}

/// The files of a keeper-held working dir, as the session sees them.
pub(super) fn keeper_files(
    docker: Docker,
    keeper_id: String,
    uid: u32,
    gid: u32,
) -> Arc<dyn SessionFiles> {
    Arc::new(KeeperFiles {
        docker,
        keeper_id,
        uid,
        gid,
    })
}
