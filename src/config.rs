//! Where kernelbox keeps things on the host, shared by the CLI, the backends and the tests.

use std::path::PathBuf;

/// Where kernelbox caches what is slow to make (the local venv): `$KERNELBOX_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/kernelbox`, else `~/.cache/kernelbox`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KERNELBOX_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("kernelbox");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(".cache").join("kernelbox")
}

/// Where per-session directories (connection files, ipc sockets, working dirs) live:
/// `$KERNELBOX_STATE_DIR`, else `/tmp/kernelbox-<uid>`. Kept short: unix socket paths inside it
/// must stay under 108 bytes.
pub fn state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KERNELBOX_STATE_DIR") {
        return PathBuf::from(dir);
    }
    PathBuf::from(format!("/tmp/kernelbox-{}", nix::unistd::getuid()))
}
