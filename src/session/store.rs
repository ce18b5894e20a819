//! The session store: what a server must remember of its live sessions so that the next server
//! process takes them over instead of losing them (id, owner, kernelspec name, creation time, the
//! last event number, and the sandbox's description of the kernel — containers, connection info,
//! key). An embedded SQLite database, one row per session, written when a session starts and
//! ends; small and rare writes, so calls are synchronous.
//!
//! The file holds kernels' signing keys: it is created 0600 in a 0700 directory.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};

use crate::sandbox::PersistedKernel;

/// The schema version this code writes (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 1;

/// Errors of the session store, each with the file and what was being done.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file or its directory cannot be created or opened.
    #[error("cannot open the session store {path}: {reason}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A read or write failed.
    #[error("session store {path}: cannot {action}: {source}")]
    Query {
        /// The database file.
        path: PathBuf,
        /// What was being done.
        action: String,
        /// The underlying error.
        source: rusqlite::Error,
    },
    /// The file was written by a newer kernelbox.
    #[error(
        "session store {path} has schema version {found}; this kernelbox knows up to \
         {SCHEMA_VERSION}: use a newer kernelbox or another --state-db"
    )]
    NewerSchema {
        /// The database file.
        path: PathBuf,
        /// The file's version.
        found: i64,
    },
    /// The kernel description could not be encoded.
    #[error("cannot encode the kernel of session {id}: {source}")]
    Encode {
        /// The session.
        id: String,
        /// The underlying error.
        source: serde_json::Error,
    },
}

/// One stored session.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSession {
    /// The session id (what clients use in URLs).
    pub id: String,
    /// The API token identity that owns the session; `None` until ownership exists.
    pub owner: Option<String>,
    /// The kernelspec name clients see.
    pub kernel_name: String,
    /// When the session was created.
    pub created: DateTime<Utc>,
    /// The sequence number of the session's last event when the server let go of it, so event
    /// numbers go on where they were and clients resuming with `?since=` stay consistent.
    pub last_seq: u64,
    /// What the sandbox needs to take the kernel over.
    pub kernel: PersistedKernel,
}

/// A row that could not be read back (a corrupt or foreign record): the caller forgets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnreadableSession {
    /// The session id of the row.
    pub id: String,
    /// What was wrong with it.
    pub reason: String,
}

/// The SQLite-backed session store.
pub struct SessionStore {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for SessionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SessionStore {
    /// Opens (creating if needed) the store at `path`: the directory 0700, the file 0600, the
    /// schema brought up to date.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_error = |reason: String| StoreError::Open {
            path: path.to_owned(),
            reason,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| open_error(format!("cannot create {}: {e}", dir.display())))?;
        }
        // Create the file ourselves so that it is never readable by others, even briefly.
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| open_error(e.to_string()))?;
        let conn = Connection::open(path).map_err(|e| open_error(e.to_string()))?;
        let store = Self {
            path: path.to_owned(),
            conn: Mutex::new(conn),
        };
        store.migrate()?;
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn migrate(&self) -> Result<(), StoreError> {
        self.with(
            "set up the schema",
            |conn| -> Result<Result<(), i64>, rusqlite::Error> {
                // WAL with NORMAL sync: a commit is an append, durable across a server crash
                // (not across a power cut, which takes the containers with it anyway).
                conn.pragma_update(None, "journal_mode", "WAL")?;
                conn.pragma_update(None, "synchronous", "NORMAL")?;
                conn.busy_timeout(std::time::Duration::from_secs(5))?;
                let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
                if version > SCHEMA_VERSION {
                    return Ok(Err(version));
                }
                if version < 1 {
                    conn.execute_batch(
                        "CREATE TABLE IF NOT EXISTS sessions (
                        id          TEXT PRIMARY KEY NOT NULL,
                        owner       TEXT,
                        kernel_name TEXT NOT NULL,
                        created     TEXT NOT NULL,
                        last_seq    INTEGER NOT NULL DEFAULT 0,
                        backend     TEXT NOT NULL,
                        kernel      TEXT NOT NULL
                    );
                    PRAGMA user_version = 1;",
                    )?;
                }
                Ok(Ok(()))
            },
        )?
        .map_err(|found| StoreError::NewerSchema {
            path: self.path.clone(),
            found,
        })
    }

    /// Records a session (replacing a record with the same id).
    pub fn insert(&self, session: &StoredSession) -> Result<(), StoreError> {
        let kernel =
            serde_json::to_string(&session.kernel).map_err(|source| StoreError::Encode {
                id: session.id.clone(),
                source,
            })?;
        let last_seq = i64::try_from(session.last_seq).unwrap_or(i64::MAX);
        self.with("record a session", |conn| {
            conn.execute(
                "INSERT OR REPLACE INTO sessions
                     (id, owner, kernel_name, created, last_seq, backend, kernel)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    session.id,
                    session.owner,
                    session.kernel_name,
                    session.created.to_rfc3339(),
                    last_seq,
                    session.kernel.backend,
                    kernel,
                ],
            )
            .map(drop)
        })
    }

    /// Forgets a session; `false` if it was not recorded.
    pub fn remove(&self, id: &str) -> Result<bool, StoreError> {
        self.with("forget a session", |conn| {
            conn.execute("DELETE FROM sessions WHERE id = ?1", params![id])
                .map(|n| n > 0)
        })
    }

    /// Records the sequence number of a session's last event; `false` if it is not recorded.
    pub fn set_last_seq(&self, id: &str, seq: u64) -> Result<bool, StoreError> {
        let seq = i64::try_from(seq).unwrap_or(i64::MAX);
        self.with("record a session's last event", |conn| {
            conn.execute(
                "UPDATE sessions SET last_seq = ?2 WHERE id = ?1",
                params![id, seq],
            )
            .map(|n| n > 0)
        })
    }

    /// One session's record, if there is a readable one.
    pub fn get(&self, id: &str) -> Result<Option<StoredSession>, StoreError> {
        let row = self.with("read a session", |conn| {
            conn.query_row(
                "SELECT id, owner, kernel_name, created, last_seq, kernel
                 FROM sessions WHERE id = ?1",
                params![id],
                Row::read,
            )
            .optional()
        })?;
        Ok(row.and_then(|row| row.parse().ok()))
    }

    /// Every recorded session, oldest first; rows that cannot be read back come separately.
    pub fn list(&self) -> Result<(Vec<StoredSession>, Vec<UnreadableSession>), StoreError> {
        let rows = self.with("list sessions", |conn| {
            let mut statement = conn.prepare(
                "SELECT id, owner, kernel_name, created, last_seq, kernel
                 FROM sessions ORDER BY created, id",
            )?;
            statement
                .query_map([], Row::read)?
                .collect::<Result<Vec<Row>, _>>()
        })?;
        let mut sessions = Vec::new();
        let mut unreadable = Vec::new();
        for row in rows {
            match row.parse() {
                Ok(session) => sessions.push(session),
                Err(bad) => unreadable.push(bad),
            }
        }
        Ok((sessions, unreadable))
    }

    /// Runs `f` on the connection, mapping its error to a [`StoreError::Query`] saying `action`.
    fn with<T>(
        &self,
        action: &str,
        f: impl FnOnce(&Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, StoreError> {
        // A panic while holding the lock cannot leave the connection half-used: SQLite rolls an
        // unfinished statement back, so a poisoned lock is still fine to use.
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        f(&conn).map_err(|source| StoreError::Query {
            path: self.path.clone(),
            action: action.to_owned(),
            source,
        })
    }
}

/// A row as read, before its text columns are parsed.
struct Row {
    id: String,
    owner: Option<String>,
    kernel_name: String,
    created: String,
    last_seq: i64,
    kernel: String,
}

impl Row {
    fn read(row: &rusqlite::Row<'_>) -> Result<Self, rusqlite::Error> {
        Ok(Self {
            id: row.get(0)?,
            owner: row.get(1)?,
            kernel_name: row.get(2)?,
            created: row.get(3)?,
            last_seq: row.get(4)?,
            kernel: row.get(5)?,
        })
    }

    fn parse(self) -> Result<StoredSession, UnreadableSession> {
        let bad = |reason: String| UnreadableSession {
            id: self.id.clone(),
            reason,
        };
        let created = DateTime::parse_from_rfc3339(&self.created)
            .map_err(|e| bad(format!("bad creation time {:?}: {e}", self.created)))?
            .with_timezone(&Utc);
        let kernel: PersistedKernel = serde_json::from_str(&self.kernel)
            .map_err(|e| bad(format!("unreadable kernel description: {e}")))?;
        Ok(StoredSession {
            created,
            last_seq: u64::try_from(self.last_seq).unwrap_or(0),
            kernel,
            id: self.id,
            owner: self.owner,
            kernel_name: self.kernel_name,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::kernel::ConnectionInfo;

    fn temp_db() -> (PathBuf, impl Drop) {
        struct Remove(PathBuf);
        impl Drop for Remove {
            fn drop(&mut self) {
                let _ = fs::remove_dir_all(&self.0);
            }
        }
        let dir = std::env::temp_dir().join(format!("kb-store-{}", uuid::Uuid::new_v4()));
        (dir.join("nested").join("sessions.db"), Remove(dir))
    }

    fn session(id: &str) -> StoredSession {
        StoredSession {
            id: id.to_owned(),
            owner: None,
            kernel_name: "python3".to_owned(),
            created: DateTime::parse_from_rfc3339("2026-11-25T02:00:00.123456Z")
                .map(|t| t.with_timezone(&Utc))
                .unwrap_or_default(),
            last_seq: 0,
            kernel: PersistedKernel {
                backend: "docker".to_owned(),
                session_id: id.to_owned(),
                connection: ConnectionInfo::ipc(Path::new("/state/sessions/x/ipc/k"), "k3y".into()),
                details: serde_json::json!({"container_id": "c0ffee", "keeper_id": null}),
            },
        }
    }

    #[test]
    fn a_recorded_session_reads_back_whole_after_reopening() {
        let (path, _guard) = temp_db();
        let mut original = session("s1");
        original.owner = Some("team-a".to_owned());
        SessionStore::open(&path)
            .unwrap()
            .insert(&original)
            .unwrap();

        let reopened = SessionStore::open(&path).unwrap();
        let (sessions, unreadable) = reopened.list().unwrap();
        assert_eq!(sessions, vec![original.clone()]);
        assert!(unreadable.is_empty());
        assert_eq!(reopened.get("s1").unwrap(), Some(original));
    }

    #[test]
    fn the_file_and_its_directory_are_private() {
        let (path, _guard) = temp_db();
        SessionStore::open(&path).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600, "the file holds kernels' keys");
        assert_eq!(mode(path.parent().unwrap()), 0o700);
    }

    #[test]
    fn removed_sessions_are_forgotten_and_removing_twice_says_so() {
        let (path, _guard) = temp_db();
        let store = SessionStore::open(&path).unwrap();
        store.insert(&session("s1")).unwrap();
        store.insert(&session("s2")).unwrap();
        assert!(store.remove("s1").unwrap());
        assert!(!store.remove("s1").unwrap());
        let ids: Vec<String> = store.list().unwrap().0.into_iter().map(|s| s.id).collect();
        assert_eq!(ids, ["s2"]);
    }

    #[test]
    fn inserting_an_id_again_replaces_its_record() {
        let (path, _guard) = temp_db();
        let store = SessionStore::open(&path).unwrap();
        store.insert(&session("s1")).unwrap();
        let mut changed = session("s1");
        changed.kernel.details = serde_json::json!({"container_id": "recreated"});
        store.insert(&changed).unwrap();
        assert_eq!(store.list().unwrap().0, vec![changed]);
    }

    #[test]
    fn the_last_event_number_is_kept() {
        let (path, _guard) = temp_db();
        let store = SessionStore::open(&path).unwrap();
        store.insert(&session("s1")).unwrap();
        assert!(store.set_last_seq("s1", 1234).unwrap());
        assert!(!store.set_last_seq("unknown", 1).unwrap());
        assert_eq!(store.get("s1").unwrap().map(|s| s.last_seq), Some(1234));
    }

    #[test]
    fn a_corrupt_row_is_reported_apart_and_the_others_still_read() {
        let (path, _guard) = temp_db();
        let store = SessionStore::open(&path).unwrap();
        store.insert(&session("good")).unwrap();
        store
            .with("corrupt a row", |conn| {
                conn.execute(
                    "INSERT INTO sessions (id, kernel_name, created, backend, kernel)
                     VALUES ('bad', 'python3', 'yesterday', 'docker', '{')",
                    [],
                )
            })
            .unwrap();
        let (sessions, unreadable) = store.list().unwrap();
        assert_eq!(sessions.len(), 1);
        assert_eq!(sessions[0].id, "good");
        assert_eq!(unreadable.len(), 1);
        assert_eq!(unreadable[0].id, "bad");
        assert!(
            unreadable[0].reason.contains("creation time"),
            "{unreadable:?}"
        );
    }

    #[test]
    fn a_store_from_a_newer_kernelbox_is_refused_with_what_to_do() {
        let (path, _guard) = temp_db();
        SessionStore::open(&path)
            .unwrap()
            .with("bump the version", |conn| {
                conn.pragma_update(None, "user_version", 99)
            })
            .unwrap();
        let err = SessionStore::open(&path).unwrap_err().to_string();
        assert!(err.contains("schema version 99"), "{err}");
    }

    #[test]
    fn an_unusable_path_says_which_file() {
        let err = SessionStore::open(Path::new("/proc/kernelbox/sessions.db"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/proc/kernelbox/sessions.db"), "{err}");
    }
}
