//! What every handler shares ([`AppState`]), and the only way a handler reaches a session by id:
//! the [`OwnedSession`] extractor, which answers `404` unless the request's [`Principal`] owns
//! the session.
//!
//! The session manager is a private field of [`AppState`], visible in this module only: handlers
//! elsewhere in `api/` can list and create their principal's sessions through `AppState`'s
//! methods, but cannot look a session up by a raw id, so a new handler cannot forget the
//! ownership check — without [`OwnedSession`] it has no session to act on.

use std::sync::Arc;

use axum::extract::{FromRequestParts, RawPathParams, Request};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::Response;
use dashmap::DashMap;

use super::auth::{ApiToken, Principal, Token, Tokens};
use super::error::AppError;
use super::files;
use super::jupyter::kernelspecs::KernelSpecs;
use crate::session::{
    CreateSession, KernelState, Readiness, Session, SessionError, SessionInfo, SessionManager,
};

/// Most Jupyter clients whose reconnect position is remembered (oldest forgotten first).
pub(crate) const MAX_JUPYTER_CURSORS: usize = 10_000;

/// Jupyter clients' reconnect positions: (kernel id, client session id) → last event number.
pub(crate) type JupyterCursors = DashMap<(String, String), u64>;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// Every live session. Private to this module: handlers reach a session by id only through
    /// [`OwnedSession`].
    sessions: Arc<SessionManager>,
    /// The API tokens (principals owning sessions).
    pub tokens: Arc<Tokens>,
    /// Browser origins allowed besides the server's own (`*`: any).
    pub allowed_origins: Arc<Vec<String>>,
    /// The kernels Jupyter clients may start.
    pub kernelspecs: Arc<KernelSpecs>,
    /// The last event each Jupyter client (kernel id, client session id) received, so a
    /// reconnect resumes where it left off.
    jupyter_cursors: Arc<JupyterCursors>,
    /// Largest file upload accepted, in bytes (`413` beyond).
    pub max_upload_bytes: u64,
    /// Bytes that uploads in progress may hold server-wide (in KiB permits; see
    /// [`files::UploadBudget`]).
    pub(crate) upload_budget: Arc<files::UploadBudget>,
}

impl AppState {
    /// State for a server with one token (principal `default`) and the default kernelspecs.
    pub fn new(sessions: Arc<SessionManager>, token: Token) -> Self {
        let tokens = Tokens::new(vec![ApiToken::new("default", &token, None)], None);
        Self {
            sessions,
            tokens: Arc::new(tokens),
            allowed_origins: Arc::new(Vec::new()),
            kernelspecs: Arc::new(KernelSpecs::default()),
            jupyter_cursors: Arc::new(DashMap::new()),
            max_upload_bytes: files::DEFAULT_MAX_UPLOAD_BYTES,
            upload_budget: Arc::new(files::UploadBudget::new(files::DEFAULT_UPLOAD_BUDGET_BYTES)),
        }
    }

    /// The same state allowing browser requests from `origins` too.
    pub fn with_allowed_origins(mut self, origins: Vec<String>) -> Self {
        self.allowed_origins = Arc::new(origins);
        self
    }

    /// The same state with other API tokens.
    pub fn with_tokens(mut self, tokens: Tokens) -> Self {
        self.tokens = Arc::new(tokens);
        self
    }

    /// The same state with another upload limit (bytes).
    pub fn with_max_upload_bytes(mut self, bytes: u64) -> Self {
        self.max_upload_bytes = bytes;
        self
    }

    /// The same state letting uploads in progress hold at most `bytes` together (`503` for an
    /// upload that does not fit until others finish).
    pub fn with_upload_budget_bytes(mut self, bytes: u64) -> Self {
        self.upload_budget = Arc::new(files::UploadBudget::new(bytes));
        self
    }

    /// The same state with another kernelspec table.
    pub fn with_kernelspecs(mut self, kernelspecs: KernelSpecs) -> Self {
        self.kernelspecs = Arc::new(kernelspecs);
        self
    }

    /// The sessions `principal` owns (the only listing handlers get).
    pub(crate) fn owned_sessions(&self, principal: &Principal) -> Vec<SessionInfo> {
        self.sessions
            .list()
            .into_iter()
            .filter(|i| i.owner.as_ref() == Some(&principal.name))
            .collect()
    }

    /// Starts a session owned by `principal`, within its session limit (whatever `request`
    /// says about the owner).
    pub(crate) async fn create_session(
        &self,
        principal: &Principal,
        request: CreateSession,
    ) -> Result<Arc<Session>, SessionError> {
        self.sessions
            .create(CreateSession {
                owner: Some(principal.name.clone()),
                owner_limit: principal.max_sessions,
                ..request
            })
            .await
    }

    /// The sandbox backend's name (for `/healthz` and `/readyz`).
    pub(crate) fn backend(&self) -> &'static str {
        self.sessions.backend()
    }

    /// How the backend isolates kernels, as the engine reported it at start (for `/healthz`).
    pub(crate) fn isolation(&self) -> serde_json::Value {
        self.sessions.isolation()
    }

    /// How many sessions are live (for `/healthz`).
    pub(crate) fn session_count(&self) -> usize {
        self.sessions.list().len()
    }

    /// Live sessions per state (for `/metrics`).
    pub(crate) fn count_by_state(&self) -> [(KernelState, usize); KernelState::ALL.len()] {
        self.sessions.count_by_state()
    }

    /// Ready kernels in the warm pool and its target (for `/metrics`).
    pub(crate) fn pool(&self) -> (usize, usize) {
        (self.sessions.pool_ready(), self.sessions.pool_target())
    }

    /// Whether new sessions can be served at once (for `/readyz`).
    pub(crate) async fn readiness(&self) -> Readiness {
        self.sessions.readiness().await
    }

    /// Records where a Jupyter client's connection ended.
    pub(crate) fn remember_jupyter_cursor(&self, key: (String, String), seq: u64) {
        if self.sessions.get(&key.0).is_none() {
            return;
        }
        remember_cursor(&self.jupyter_cursors, key, seq, |session| {
            self.sessions.get(session).is_some()
        });
    }

    /// Where a Jupyter client's previous connection to this kernel ended.
    pub(crate) fn jupyter_cursor(&self, key: &(String, String)) -> Option<u64> {
        self.jupyter_cursors.get(key).map(|seq| *seq)
    }

    /// Forgets the Jupyter clients of a closed session.
    pub(crate) fn forget_jupyter_cursors(&self, session: &str) {
        self.jupyter_cursors.retain(|(s, _), _| s != session);
    }
}

/// Records `seq` for `key` in `cursors`, keeping at most [`MAX_JUPYTER_CURSORS`]: when full,
/// the cursors of sessions that are not `live` are forgotten, then, if still full, anyone's.
///
/// No map guard is held across another call into the map (a `DashMap` iterator holds its
/// shard's lock, and removing from that shard while it lives deadlocks the thread).
pub(crate) fn remember_cursor(
    cursors: &JupyterCursors,
    key: (String, String),
    seq: u64,
    live: impl Fn(&str) -> bool,
) {
    if cursors.len() >= MAX_JUPYTER_CURSORS && !cursors.contains_key(&key) {
        cursors.retain(|(session, _), _| live(session));
        if cursors.len() >= MAX_JUPYTER_CURSORS {
            // The iterator (and its shard lock) is gone at the end of this statement.
            let any = cursors.iter().next().map(|e| e.key().clone());
            if let Some(any) = any {
                cursors.remove(&any);
            }
        }
    }
    cursors.insert(key, seq);
}

/// A session the request's principal owns, taken from the route's `{id}`: the only way a
/// handler gets a session by id. Any other principal's session, like an unknown id, is a `404`
/// (so ids cannot be probed); a request without a principal (a route the token layer does not
/// cover) is a `401`.
#[derive(Clone)]
pub struct OwnedSession {
    session: Arc<Session>,
    state: AppState,
}

impl OwnedSession {
    /// The session.
    pub fn session(&self) -> &Arc<Session> {
        &self.session
    }

    /// The session, to move into a connection's task.
    pub fn into_session(self) -> Arc<Session> {
        self.session
    }

    /// Closes the session: stops its kernel, removes its sandbox and forgets its Jupyter
    /// clients' cursors.
    pub async fn close(&self) -> Result<(), SessionError> {
        self.state.sessions.remove(self.session.id()).await?;
        self.state.forget_jupyter_cursors(self.session.id());
        Ok(())
    }
}

impl std::ops::Deref for OwnedSession {
    type Target = Session;

    fn deref(&self) -> &Session {
        &self.session
    }
}

/// The 404 of a session the principal does not own, in the words of the API asked.
fn not_found(parts: &Parts, id: &str) -> AppError {
    if parts.uri.path().starts_with("/api/") {
        AppError::no_kernel(id)
    } else {
        AppError::no_session(id)
    }
}

impl FromRequestParts<AppState> for OwnedSession {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        if let Some(owned) = parts.extensions.get::<OwnedSession>() {
            return Ok(owned.clone());
        }
        let principal = parts
            .extensions
            .get::<Principal>()
            .cloned()
            .ok_or_else(AppError::unauthorized)?;
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|e| AppError::bad_request(format!("invalid path: {e}")))?;
        let id = params
            .iter()
            .find_map(|(name, value)| (name == "id").then(|| value.to_owned()))
            .ok_or_else(|| AppError::bad_request("this route names no session"))?;
        let session = state
            .sessions
            .get(&id)
            .filter(|s| s.owner() == Some(&principal.name))
            .ok_or_else(|| not_found(parts, &id))?;
        Ok(Self {
            session,
            state: state.clone(),
        })
    }
}

/// Middleware on every route with a session `{id}`: the request goes on only when its
/// principal owns the session ([`OwnedSession`], then handed to the handler as an extension),
/// so even a handler that never asks for the session cannot act on someone else's.
pub(crate) async fn require_owned_session(
    owned: OwnedSession,
    mut request: Request,
    next: Next,
) -> Response {
    request.extensions_mut().insert(owned);
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 12: with the map full, remembering one more cursor forgot "anyone's" while the
    /// iterator that found it still held its shard's lock, so the `remove` on that shard
    /// deadlocked the runtime thread. Past the limit, remembering must go on and stay bounded.
    #[test]
    fn remembering_more_than_the_limit_of_cursors_does_not_hang() {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let cursors = JupyterCursors::new();
            for i in 0..MAX_JUPYTER_CURSORS + 500 {
                remember_cursor(
                    &cursors,
                    ("kernel".into(), format!("client-{i}")),
                    1,
                    |_| true,
                );
            }
            let _ = done_tx.send(cursors.len());
        });
        let len = done_rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("remembering 10,500 cursors did not finish within 60 s: deadlocked");
        assert_eq!(len, MAX_JUPYTER_CURSORS);
    }
}
