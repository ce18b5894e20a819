//! The host side of the backend: the state dir, this server's persistent instance id, and the
//! per-session directories (the server's own `conf` dir with the connection file, the kernel's
//! `ipc` socket dir, the host working dir).
//!
//! The server runs as root on the host and the kernel controls everything in the directories
//! it can write (`ipc`, `work`): symlinks, hard links, fifos, entries swapped at any moment. So
//! the server never writes there; what it writes (the connection file) goes to `conf`, which only
//! the server can write and which the kernel sees through a read-only mount. Files there are
//! created with `openat(O_CREAT | O_EXCL | O_NOFOLLOW)` from the directory's descriptor,
//! `fchown`/`fchmod`ed on their own descriptor and renamed within the directory.

use std::fs;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{OFlag, openat, renameat};
use nix::sys::stat::{Mode, fchmod, fstat};
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, unlinkat};

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
    /// Creates the directory (0700) if needed. It and its `sessions` dir must be the server's
    /// and writable by nobody else (a state dir in a shared place such as `/tmp` could have been
    /// made first by another host user): every path the server uses below it is trusted.
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
        for dir in [root.clone(), root.join("sessions")] {
            let meta = fs::metadata(&dir)
                .map_err(io_error(format!("cannot inspect {}", dir.display())))?;
            if meta.uid() != nix::unistd::geteuid().as_raw() || meta.mode() & 0o022 != 0 {
                return Err(SandboxError::Unavailable {
                    what: "the state dir".to_owned(),
                    reason: format!(
                        "{} belongs to uid {} with mode {:o}: not the server's alone",
                        dir.display(),
                        meta.uid(),
                        meta.mode() & 0o7777
                    ),
                    hint: "Use a state dir that the server's user owns and nobody else can \
                           write (--state-dir)"
                        .to_owned(),
                });
            }
        }
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
            conf: root.join("conf"),
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
    /// `<state>/sessions/<id>` (0700, the server's), removed with the session.
    pub(super) root: PathBuf,
    /// The server's own (0755, not writable by the kernel's uid), mounted read-only into the
    /// container: the connection file. Everything the server writes for the kernel goes here.
    pub(super) conf: PathBuf,
    /// The kernel's (its uid, 0700), mounted read-write: the kernel binds its ipc sockets here.
    /// The server only connects to sockets in it and never writes or opens files in it.
    pub(super) ipc: PathBuf,
    /// The host working dir (only with `WorkDirStorage::HostDir`).
    pub(super) work: PathBuf,
}

impl SessionDirs {
    /// Creates the session dir (0700, the server's), the server's `conf` dir (0755) and the
    /// `kernel_dirs` owned by the kernel's uid:gid (0700), which must create sockets and files
    /// there.
    pub(super) fn create(
        &self,
        kernel_dirs: &[&Path],
        uid: u32,
        gid: u32,
    ) -> Result<(), SandboxError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .map_err(io_error(format!("cannot create {}", self.root.display())))?;
        // Not recursive: an existing directory (never the kernel's: the session dir is the
        // server's alone) is an error rather than adopted.
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&self.conf)
            .map_err(io_error(format!("cannot create {}", self.conf.display())))?;
        for dir in kernel_dirs {
            fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .map_err(io_error(format!("cannot create {}", dir.display())))?;
            lchown(dir, uid, gid)?;
        }
        Ok(())
    }

    /// Writes `contents` as `name` in the server's `conf` dir, readable by the kernel's uid only
    /// (0400) and by nobody else: a fresh file (`O_EXCL | O_NOFOLLOW`, random name) created,
    /// chowned and chmodded through its own descriptor, then renamed into place within the
    /// directory. The directory must be a real directory, the server's, and writable by nobody
    /// else, so no path in it can have been planted.
    pub(super) fn write_conf_file(
        &self,
        name: &str,
        contents: &[u8],
        uid: u32,
        gid: u32,
    ) -> Result<(), SandboxError> {
        let dir = open_server_dir(&self.conf)?;
        let tmp = format!(".{name}.{}.tmp", hex::encode(rand::random::<[u8; 8]>()));
        let shown = self.conf.join(&tmp);
        let errno = |what: &str, path: &Path| {
            let context = format!("cannot {what} {}", path.display());
            move |err: nix::errno::Errno| SandboxError::Io {
                context,
                source: err.into(),
            }
        };
        let fd = openat(
            &dir,
            tmp.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(errno("create", &shown))?;
        let written = (|| {
            let mut file = fs::File::from(fd);
            file.write_all(contents)
                .map_err(io_error(format!("cannot write {}", shown.display())))?;
            fchown(&file, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid))).map_err(|err| {
                SandboxError::Io {
                    context: chown_context(&shown, uid, gid),
                    source: err.into(),
                }
            })?;
            fchmod(&file, Mode::from_bits_truncate(0o400)).map_err(errno("chmod", &shown))?;
            renameat(&dir, tmp.as_str(), &dir, name).map_err(errno("rename", &shown))
        })();
        if written.is_err() {
            let _ = unlinkat(&dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
        }
        written
    }

    /// Whether the kernel's socket dir is still a real directory owned by the kernel's uid and
    /// every socket of `names` present in it is a socket (never followed: `lstat`) owned by
    /// that uid. For adoption: a kernel that swapped its sockets for symlinks or files is not
    /// taken over.
    pub(super) fn check_kernel_sockets(&self, names: &[String], uid: u32) -> Result<(), String> {
        let meta = fs::symlink_metadata(&self.ipc)
            .map_err(|err| format!("its socket directory {} is gone: {err}", self.ipc.display()))?;
        if !meta.file_type().is_dir() || meta.uid() != uid {
            return Err(format!(
                "{} is not a directory of the kernel's uid {uid}",
                self.ipc.display()
            ));
        }
        for name in names {
            let path = self.ipc.join(name);
            match fs::symlink_metadata(&path) {
                // Not bound yet (a kernel just restarted): the readiness wait handles it.
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(format!("cannot inspect {}: {err}", path.display())),
                Ok(meta) if meta.file_type().is_socket() && meta.uid() == uid => {}
                Ok(_) => {
                    return Err(format!(
                        "{} is not a socket of the kernel's uid {uid}",
                        path.display()
                    ));
                }
            }
        }
        Ok(())
    }

    /// Removes the session's directories; already gone is fine.
    pub(super) fn remove(&self) -> Result<(), SandboxError> {
        remove_dir_if_present(&self.root)
    }
}

/// The error context of a failed chown to the kernel's uid, with what to do about it.
fn chown_context(path: &Path, uid: u32, gid: u32) -> String {
    format!(
        "cannot hand {} to the kernel's uid {uid}:{gid} (run the server as root)",
        path.display()
    )
}

/// Chowns `path` itself, never what it points to.
fn lchown(path: &Path, uid: u32, gid: u32) -> Result<(), SandboxError> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(|source| SandboxError::Io {
        context: chown_context(path, uid, gid),
        source,
    })
}

/// Opens one of the server's own directories: not through a symlink (`O_NOFOLLOW`), and only
/// if it belongs to the server and nobody else may write in it.
fn open_server_dir(path: &Path) -> Result<OwnedFd, SandboxError> {
    let context = |what: &str| format!("cannot {what} {}", path.display());
    let dir = nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|err| SandboxError::Io {
        context: context("open"),
        source: err.into(),
    })?;
    let stat = fstat(&dir).map_err(|err| SandboxError::Io {
        context: context("inspect"),
        source: err.into(),
    })?;
    if stat.st_uid != nix::unistd::geteuid().as_raw() || stat.st_mode & 0o022 != 0 {
        return Err(SandboxError::Io {
            context: context("use"),
            source: std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "it is not the server's own directory (owner or mode changed)",
            ),
        });
    }
    Ok(dir)
}

/// Removes a directory tree. std's `remove_dir_all` never follows symlinks (it opens each
/// directory with `O_NOFOLLOW` from its parent's descriptor and unlinks what is not a directory,
/// symlinks included), so a kernel that plants symlinks or swaps a directory for one while this
/// runs can only get its link removed.
fn remove_dir_if_present(path: &Path) -> Result<(), SandboxError> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(io_error(format!("cannot remove {}", path.display()))(err)),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

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

    /// A state dir of its own under the system temp dir, removed on drop.
    struct Scratch(PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn session_dirs() -> (Scratch, SessionDirs) {
        let root = std::env::temp_dir().join(format!(
            "kbstate-{}",
            hex::encode(rand::random::<[u8; 6]>())
        ));
        let state = StateDir::open(&root).unwrap();
        let dirs = state.session("s");
        let (uid, gid) = (nix::unistd::geteuid(), nix::unistd::getegid());
        dirs.create(&[dirs.ipc.as_path()], uid.as_raw(), gid.as_raw())
            .unwrap();
        (Scratch(root), dirs)
    }

    fn ids() -> (u32, u32) {
        (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        )
    }

    #[test]
    fn the_connection_file_is_replaced_whole_and_readable_by_its_owner_only() {
        let (_scratch, dirs) = session_dirs();
        let (uid, gid) = ids();
        dirs.write_conf_file("kernel.json", b"first", uid, gid)
            .unwrap();
        dirs.write_conf_file("kernel.json", b"second", uid, gid)
            .unwrap();
        let path = dirs.conf.join("kernel.json");
        assert_eq!(fs::read(&path).unwrap(), b"second");
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o400);
        let names: Vec<_> = fs::read_dir(&dirs.conf).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file is left behind");
    }

    #[test]
    fn a_conf_dir_that_is_a_symlink_or_writable_by_others_is_not_written() {
        let (_scratch, dirs) = session_dirs();
        let (uid, gid) = ids();
        fs::set_permissions(&dirs.conf, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(dirs.write_conf_file("kernel.json", b"x", uid, gid).is_err());
        fs::remove_dir(&dirs.conf).unwrap();
        std::os::unix::fs::symlink(&dirs.ipc, &dirs.conf).unwrap();
        assert!(dirs.write_conf_file("kernel.json", b"x", uid, gid).is_err());
        assert!(!dirs.ipc.join("kernel.json").exists());
    }

    #[test]
    fn only_real_sockets_of_the_kernels_uid_pass_the_adoption_check() {
        let (_scratch, dirs) = session_dirs();
        let (uid, _) = ids();
        let names = vec!["k-1".to_owned(), "k-2".to_owned()];
        // Not bound yet is fine.
        dirs.check_kernel_sockets(&names, uid).unwrap();
        let _listener = std::os::unix::net::UnixListener::bind(dirs.ipc.join("k-1")).unwrap();
        dirs.check_kernel_sockets(&names, uid).unwrap();
        assert!(dirs.check_kernel_sockets(&names, uid + 1).is_err());
        std::os::unix::fs::symlink("/etc/passwd", dirs.ipc.join("k-2")).unwrap();
        assert!(dirs.check_kernel_sockets(&names, uid).is_err());
    }

    #[test]
    fn instance_ids_are_checked() {
        assert!(validate_instance_id("kb0123abcd").is_ok());
        assert!(validate_instance_id("a b").is_err());
        assert!(validate_instance_id("").is_err());
    }
}
