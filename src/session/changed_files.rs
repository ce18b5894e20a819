//! The files a cell wrote, reported in its `done` event.
//!
//! How: every native `execute_request` carries a `user_expressions` entry
//! ([`USER_EXPRESSION`]) that the kernel evaluates right after the cell (only when the cell
//! succeeded — that is how IPython treats user expressions). The expression scans `output/` under
//! the kernel's initial working directory (at most [`MAX_SCANNED`] files, depth first, sorted),
//! compares it with the previous scan (kept on the kernel's `sys` module, out of the user's
//! namespace) and returns the paths created or changed (size or mtime) as JSON. This costs no
//! extra round trip to the engine or the kernel: the answer arrives in the `execute_reply` the
//! session waits for anyway. A cell that fails reports nothing; what it wrote shows up after the
//! next cell that succeeds. Kernels that are not Python just answer with an error, ignored.

use serde::Serialize;
use serde_json::Value;

/// The key of the user expression in `user_expressions`.
pub(crate) const USER_EXPRESSION: &str = "kernelbox_files";

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

/// The helper's source, defined once per kernel process on `sys`.
const HELPER: &str = r#"
import os, sys, json
def _kernelbox_changed_files(root, limit, _state={}):
    base = os.path.join(root, 'output')
    cur = {}
    for dirpath, dirnames, filenames in os.walk(base):
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
    changed = [{'path': p, 'size': s, 'modified_ns': m}
               for p, (s, m) in cur.items() if prev.get(p) != (s, m)]
    class _Json:
        def __init__(self, text): self.text = text
        def __repr__(self): return self.text
        def _repr_pretty_(self, p, cycle): p.text(self.text)
    return _Json(json.dumps(changed))
sys._kernelbox_changed_files = _kernelbox_changed_files
"#;

/// The Python expression for `user_expressions`, scanning `output/` under `work_dir` (the
/// kernel's own view of its working directory).
pub(crate) fn user_expression(work_dir: &str) -> String {
    let literal = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "''".to_owned());
    format!(
        "(lambda s: (getattr(s, '_kernelbox_changed_files', None) or \
         (exec({helper}, {{}}), s._kernelbox_changed_files)[1])({root}, {MAX_SCANNED}))\
         (__import__('sys'))",
        helper = literal(HELPER),
        root = literal(work_dir),
    )
}

/// The changed files in an `execute_reply`'s content; `None` when the expression did not run
/// or failed.
pub(crate) fn from_reply(content: &Value) -> Option<Vec<ChangedFile>> {
    let result = content.get("user_expressions")?.get(USER_EXPRESSION)?;
    if result.get("status").and_then(Value::as_str) != Some("ok") {
        return None;
    }
    let text = result.get("data")?.get("text/plain")?.as_str()?;
    let list: Vec<Value> = serde_json::from_str(text).ok()?;
    Some(
        list.iter()
            .filter_map(|entry| {
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
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_reply_with_the_expression_gives_the_files() {
        let content = json!({"status": "ok", "user_expressions": {USER_EXPRESSION: {
            "status": "ok",
            "data": {"text/plain": r#"[{"path": "output/a.txt", "size": 3, "modified_ns": 1700000000000000000}]"#},
            "metadata": {}}}});
        let files = from_reply(&content).unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].path, "output/a.txt");
        assert_eq!(files[0].size, 3);
        assert_eq!(files[0].modified, "2023-11-14T22:13:20.000Z");
    }

    #[test]
    fn a_failed_expression_gives_nothing() {
        let content = json!({"status": "ok", "user_expressions": {USER_EXPRESSION: {
            "status": "error", "ename": "NameError"}}});
        assert_eq!(from_reply(&content), None);
        assert_eq!(from_reply(&json!({"status": "error"})), None);
    }
}
