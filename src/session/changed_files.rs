//! The files a cell wrote, reported in its `done` event.
//!
//! How: the first native cell a kernel process runs carries a `user_expressions` entry
//! ([`USER_EXPRESSION`]) that installs a small `post_execute` hook in the kernel (kept on its
//! `sys` module, out of the user's namespace). After every cell the hook scans `output/` under
//! the kernel's initial working directory (at most [`MAX_SCANNED`] files, depth first, sorted),
//! compares it with the previous scan and, when something was created or changed (size or
//! mtime), adds a payload (`source: kernelbox.files`) to the cell's `execute_reply`. A cell that
//! changed nothing costs one directory scan in the kernel and not a byte on the wire; no cell
//! costs an extra round trip. The hook runs whether the cell succeeded or failed.
//!
//! The installing expression runs after its cell (IPython evaluates user expressions only for
//! cells that succeed, so it is sent again until one does) and reports that cell's changes
//! itself. A new kernel process (restart, takeover) gets the hook again; installing twice
//! replaces the old hook. Kernels that are not IPython answer the expression with an error and
//! are not asked again: their cells have no `files`.

use serde::Serialize;
use serde_json::{Value, json};

/// The key of the installing expression in `user_expressions`.
pub(crate) const USER_EXPRESSION: &str = "kernelbox_files";

/// The `source` of the payload entry the hook adds to an `execute_reply`.
pub(crate) const PAYLOAD_SOURCE: &str = "kernelbox.files";

/// The directory (relative to the working dir) whose files are reported.
pub const OUTPUT_DIR: &str = "output";

/// Most files one scan looks at.
pub const MAX_SCANNED: usize = 1000;

/// A file a cell created or changed.
#[derive(Debug, Clone, PartialEq, Serialize, schemars::JsonSchema)]
pub struct ChangedFile {
    /// Path relative to the working directory (e.g. `output/result.txt`): what the files API
    /// takes.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Modification time (RFC 3339, UTC).
    pub modified: String,
}

/// The hook's source, run once per kernel process with `ROOT` and `LIMIT` defined. It reports
/// the installing cell's own changes at once (its `post_execute` has passed).
const HELPER: &str = r#"
import os, sys
from IPython import get_ipython

def _scan(root=ROOT, limit=LIMIT, _state=sys.__dict__.setdefault('_kernelbox_files_state', {})):
    cur = {}
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, 'output')):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            try:
                st = os.stat(full)
            except OSError:
                continue
            cur[os.path.relpath(full, root)] = (st.st_size, st.st_mtime_ns)
            if len(cur) >= limit:
                break
        if len(cur) >= limit:
            break
    prev = _state.get('prev', {})
    _state['prev'] = cur
    return [{'path': p, 'size': s, 'modified_ns': m}
            for p, (s, m) in cur.items() if prev.get(p) != (s, m)]

def _kernelbox_files_hook(_scan=_scan, _ip=get_ipython()):
    changed = _scan()
    if changed:
        _ip.payload_manager.write_payload({'source': SOURCE, 'files': changed})

_ip = get_ipython()
_old = getattr(sys, '_kernelbox_files_hook', None)
if _old is not None:
    try:
        _ip.events.unregister('post_execute', _old)
    except ValueError:
        pass
_ip.events.register('post_execute', _kernelbox_files_hook)
sys._kernelbox_files_hook = _kernelbox_files_hook
_kernelbox_files_hook()
"#;

/// Whether the kernel process has the hook, as far as the session knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hook {
    /// Not yet: the next cell carries the installing expression.
    Absent,
    /// Installed: every reply's payload says what changed.
    Installed,
    /// The kernel cannot have it (not IPython): no `files`.
    Unsupported,
}

/// Tracks a kernel's files hook and reads the changed files out of execute replies.
#[derive(Debug)]
pub(crate) struct FilesTracker {
    /// The kernel's working directory, as the kernel sees it.
    root: String,
    hook: Hook,
}

impl FilesTracker {
    /// A tracker for a kernel whose working directory (as the kernel sees it) is `work_dir`.
    pub(crate) fn new(work_dir: &str) -> Self {
        Self {
            root: work_dir.to_owned(),
            hook: Hook::Absent,
        }
    }

    /// The `user_expressions` of the next cell: the installer while the hook is absent.
    pub(crate) fn user_expressions(&self) -> Value {
        match self.hook {
            Hook::Absent => json!({ USER_EXPRESSION: self.installer() }),
            Hook::Installed | Hook::Unsupported => json!({}),
        }
    }

    /// The expression that installs the hook (made when needed: once per kernel process).
    fn installer(&self) -> String {
        let literal = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "''".to_owned());
        format!(
            "exec({helper}, {{'ROOT': {root}, 'LIMIT': {MAX_SCANNED}, 'SOURCE': {source}}})",
            helper = literal(HELPER),
            root = literal(&self.root),
            source = literal(PAYLOAD_SOURCE),
        )
    }

    /// The kernel process was replaced (restart, reconnect): its hook is gone.
    pub(crate) fn kernel_replaced(&mut self) {
        if self.hook == Hook::Installed {
            self.hook = Hook::Absent;
        }
    }

    /// The files a cell created or changed, from its `execute_reply`'s content; `None` when
    /// not known (the hook is not installed yet, or cannot be).
    pub(crate) fn read_reply(&mut self, content: &Value) -> Option<Vec<ChangedFile>> {
        let installer = content
            .get("user_expressions")
            .and_then(|u| u.get(USER_EXPRESSION))
            .and_then(|r| r.get("status"))
            .and_then(Value::as_str);
        match (self.hook, installer) {
            (_, Some("ok")) => self.hook = Hook::Installed,
            (Hook::Absent, Some(_)) => self.hook = Hook::Unsupported,
            _ => {}
        }
        if self.hook != Hook::Installed {
            return None;
        }
        let changed = content
            .get("payload")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|p| p.get("source").and_then(Value::as_str) == Some(PAYLOAD_SOURCE))
            .filter_map(|p| p.get("files").and_then(Value::as_array))
            .flatten()
            .filter_map(changed_file)
            .collect();
        Some(changed)
    }
}

/// One entry of the hook's list.
fn changed_file(entry: &Value) -> Option<ChangedFile> {
    let path = entry.get("path")?.as_str()?.to_owned();
    let size = entry.get("size")?.as_u64()?;
    let nanos = entry.get("modified_ns")?.as_i64()?;
    let modified = chrono::DateTime::from_timestamp_nanos(nanos)
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    Some(ChangedFile {
        path,
        size,
        modified,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(installer: Option<&str>, files: Option<Value>) -> Value {
        let mut content = json!({"status": "ok", "user_expressions": {}, "payload": []});
        if let Some(status) = installer {
            content["user_expressions"][USER_EXPRESSION] = json!({"status": status});
        }
        if let Some(files) = files {
            content["payload"] = json!([{"source": PAYLOAD_SOURCE, "files": files}]);
        }
        content
    }

    #[test]
    fn the_installer_goes_out_until_a_reply_says_it_ran() {
        let mut t = FilesTracker::new("/work");
        assert!(t.user_expressions()[USER_EXPRESSION].is_string());
        // A failed cell: IPython evaluated nothing, so nothing is known and it is sent again.
        assert_eq!(
            t.read_reply(&json!({"status": "error", "user_expressions": {}})),
            None
        );
        assert!(t.user_expressions()[USER_EXPRESSION].is_string());

        let files = json!([{"path": "output/a.txt", "size": 3, "modified_ns": 1_700_000_000_000_000_000_i64}]);
        let got = t.read_reply(&reply(Some("ok"), Some(files))).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].path, "output/a.txt");
        assert_eq!(got[0].size, 3);
        assert_eq!(got[0].modified, "2023-11-14T22:13:20.000Z");
        assert_eq!(t.user_expressions(), json!({}));

        // Installed: a reply without the payload means nothing changed.
        assert_eq!(t.read_reply(&reply(None, None)), Some(Vec::new()));
        // A new kernel process needs the hook again.
        t.kernel_replaced();
        assert!(t.user_expressions()[USER_EXPRESSION].is_string());
    }

    #[test]
    fn a_kernel_that_cannot_run_the_installer_is_not_asked_again() {
        let mut t = FilesTracker::new("/work");
        assert_eq!(t.read_reply(&reply(Some("error"), None)), None);
        assert_eq!(t.user_expressions(), json!({}));
        assert_eq!(t.read_reply(&reply(None, None)), None);
        t.kernel_replaced();
        assert_eq!(t.user_expressions(), json!({}));
    }
}
