//! The host side of the backend: the state dir, this server's persistent instance id, and the
//! per-session directories (ipc sockets + connection file, host working dir).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::sandbox::SandboxError;

/// Longest unix socket path the kernel may bind (`sun_path` is 108 bytes with its NUL).
pub(super) const MAX_SOCKET_PATH: usize = 107;

fn io_error(context: String) -> impl FnOnce(std::io::Error) -> SandboxError {
    move |source| SandboxError::Io { context, source }
}

/// The server's state directory (`DockerConfig::state_dir`).
#[derive(Debug)]
pub(super) struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Creates the directory (0700) if needed.
    pub(super) fn open(root: &Path) -> Result<Self, SandboxError> {
        let root = std::path::absolute(root)
            .map_err(io_error(format!("cannot resolve {}", root.display())))?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root.join("sessions"))
            .map_err(io_error(format!(
                "cannot create the state dir {}",
                root.display()
            )))?;
        Ok(Self { root })
    }

    /// The persistent instance id in `instance-id`, created (random) on first use, so a
    /// restarted server recognises and cleans up its own leftovers and nobody else's.
    pub(super) fn instance_id(&self) -> Result<String, SandboxError> {
        let path = self.root.join("instance-id");
        let fresh = format!("kb{}", hex::encode(rand::random::<[u8; 6]>()));
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(mut file) => {
                file.write_all(format!("{fresh}\n").as_bytes())
                    .map_err(io_error(format!("cannot write {}", path.display())))?;
                Ok(fresh)
            }
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
                let text = fs::read_to_string(&path)
                    .map_err(io_error(format!("cannot read {}", path.display())))?;
                validate_instance_id(text.trim())
            }
            Err(err) => Err(io_error(format!("cannot create {}", path.display()))(err)),
        }
    }

    /// The directories of one session (not created yet).
    pub(super) fn session(&self, session_id: &str) -> SessionDirs {
        let root = self.root.join("sessions").join(dir_name(session_id));
        SessionDirs {
            ipc: root.join("ipc"),
            work: root.join("work"),
            root,
        }
    }

    /// Removes every session directory but those of the sessions in `keep` (cleanup at server
    /// start and stop).
    pub(super) fn remove_sessions_except(
        &self,
        keep: &std::collections::HashSet<String>,
    ) -> Result<(), SandboxError> {
        let kept: std::collections::HashSet<std::ffi::OsString> =
            keep.iter().map(|id| dir_name(id).into()).collect();
        let sessions = self.root.join("sessions");
        let entries = match fs::read_dir(&sessions) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(err) => return Err(io_error(format!("cannot list {}", sessions.display()))(err)),
        };
        for entry in entries {
            let entry = entry.map_err(io_error(format!("cannot list {}", sessions.display())))?;
            if !kept.contains(&entry.file_name()) {
                remove_dir_if_present(&entry.path())?;
            }
        }
        Ok(())
    }
}

/// An instance id must be usable in labels and volume names.
pub(super) fn validate_instance_id(id: &str) -> Result<String, SandboxError> {
    let ok = !id.is_empty()
        && id.len() <= 32
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(id.to_owned())
    } else {
        Err(SandboxError::Unavailable {
            what: "the instance id".to_owned(),
            reason: format!("{id:?} is not 1-32 letters, digits, '-' or '_'"),
            hint: "Fix or delete <state_dir>/instance-id, or set a valid instance id".to_owned(),
        })
    }
}

/// A directory name for a session: the id itself when it is short and harmless, else a hash.
pub(super) fn dir_name(session_id: &str) -> String {
    let harmless = (1..=40).contains(&session_id.len())
        && session_id.starts_with(|c: char| c.is_ascii_alphanumeric())
        && session_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if harmless {
        session_id.to_owned()
    } else {
        let digest = Sha256::digest(session_id.as_bytes());
        format!("h{}", &hex::encode(digest)[..24])
    }
}

/// One session's host directories.
#[derive(Debug, Clone)]
pub(super) struct SessionDirs {
    /// `<state>/sessions/<id>`, removed with the session.
    pub(super) root: PathBuf,
    /// Mounted at `/run/kernelbox`: the connection file and the kernel's ipc sockets.
    pub(super) ipc: PathBuf,
    /// The host working dir (only with `WorkDirStorage::HostDir`).
    pub(super) work: PathBuf,
}

impl SessionDirs {
    /// Creates the session dir (0700, the server's) and `sub` dirs owned by the kernel's uid:gid
    /// (0700), which must create sockets and files there.
    pub(super) fn create(&self, subs: &[&Path], uid: u32, gid: u32) -> Result<(), SandboxError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .map_err(io_error(format!("cannot create {}", self.root.display())))?;
        for dir in subs {
            fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .map_err(io_error(format!("cannot create {}", dir.display())))?;
            chown(dir, uid, gid)?;
        }
        Ok(())
    }

    /// Writes `contents` as `name` in the ipc dir, readable and writable by the kernel only.
    pub(super) fn write_kernel_file(
        &self,
        name: &str,
        contents: &[u8],
        uid: u32,
        gid: u32,
    ) -> Result<(), SandboxError> {
        let path = self.ipc.join(name);
        let tmp = self.ipc.join(format!(".{name}.tmp"));
        fs::write(&tmp, contents).map_err(io_error(format!("cannot write {}", tmp.display())))?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))
            .map_err(io_error(format!("cannot chmod {}", tmp.display())))?;
        chown(&tmp, uid, gid)?;
        fs::rename(&tmp, &path).map_err(io_error(format!("cannot write {}", path.display())))
    }

    /// Removes the session's directories; already gone is fine.
    pub(super) fn remove(&self) -> Result<(), SandboxError> {
        remove_dir_if_present(&self.root)
    }
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), SandboxError> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|source| SandboxError::Io {
        context: format!(
            "cannot hand {} to the kernel's uid {uid}:{gid} (run the server as root)",
            path.display()
        ),
        source,
    })
}

fn remove_dir_if_present(path: &Path) -> Result<(), SandboxError> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(io_error(format!("cannot remove {}", path.display()))(err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn harmless_session_ids_name_their_dir() {
        assert_eq!(dir_name("3f2a-b_c.d"), "3f2a-b_c.d");
    }

    #[test]
    fn odd_session_ids_are_hashed() {
        for id in ["", "../etc", "a/b", ".hidden", &"x".repeat(41)] {
            let name = dir_name(id);
            assert!(
                name.starts_with('h') && name.len() == 25,
                "{id:?} -> {name}"
            );
        }
    }

    #[test]
    fn instance_ids_are_checked() {
        assert!(validate_instance_id("kb0123abcd").is_ok());
        assert!(validate_instance_id("a b").is_err());
        assert!(validate_instance_id("").is_err());
    }
}
