//! The HTTP + WebSocket front (axum): authentication, the REST resources and the native JSON
//! event protocol. Knows sessions, never ZeroMQ or Docker.

pub mod auth;
pub mod error;
pub mod files;
pub mod jupyter;
pub mod metrics;
pub mod native;
pub mod origin;
pub mod outbound;
pub mod sessions;
pub mod web;
mod ws_config;

use std::sync::Arc;

use axum::Router;
use axum::middleware::from_fn_with_state;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use tokio::net::TcpListener;

use dashmap::DashMap;

use crate::session::{Session, SessionManager};
pub use auth::{ApiToken, Principal, Token, Tokens};
pub use jupyter::kernelspecs::KernelSpecs;

/// Most Jupyter clients whose reconnect position is remembered (oldest forgotten first).
const MAX_JUPYTER_CURSORS: usize = 10_000;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// Every live session.
    pub sessions: Arc<SessionManager>,
    /// The API tokens (principals owning sessions).
    pub tokens: Arc<Tokens>,
    /// Browser origins allowed besides the server's own (`*`: any).
    pub allowed_origins: Arc<Vec<String>>,
    /// The kernels Jupyter clients may start.
    pub kernelspecs: Arc<KernelSpecs>,
    /// The last event each Jupyter client (kernel id, client session id) received, so a
    /// reconnect resumes where it left off.
    pub jupyter_cursors: Arc<DashMap<(String, String), u64>>,
    /// Largest file upload accepted, in bytes (`413` beyond).
    pub max_upload_bytes: u64,
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

    /// Session `id` if `principal` owns it; other principals' sessions do not exist for it
    /// (the same 404 as an unknown id).
    pub fn owned_session(&self, principal: &Principal, id: &str) -> Option<Arc<Session>> {
        self.sessions
            .get(id)
            .filter(|s| s.owner() == Some(&principal.name))
    }

    /// The same state with another upload limit (bytes).
    pub fn with_max_upload_bytes(mut self, bytes: u64) -> Self {
        self.max_upload_bytes = bytes;
        self
    }

    /// The same state with another kernelspec table.
    pub fn with_kernelspecs(mut self, kernelspecs: KernelSpecs) -> Self {
        self.kernelspecs = Arc::new(kernelspecs);
        self
    }

    /// Records where a Jupyter client's connection ended.
    pub(crate) fn remember_jupyter_cursor(&self, key: (String, String), seq: u64) {
        if self.sessions.get(&key.0).is_none() {
            return;
        }
        if self.jupyter_cursors.len() >= MAX_JUPYTER_CURSORS
            && !self.jupyter_cursors.contains_key(&key)
        {
            // Forget the clients of sessions that are gone, then, if still full, anyone's.
            self.jupyter_cursors
                .retain(|(session, _), _| self.sessions.get(session).is_some());
            if self.jupyter_cursors.len() >= MAX_JUPYTER_CURSORS
                && let Some(any) = self.jupyter_cursors.iter().next().map(|e| e.key().clone())
            {
                self.jupyter_cursors.remove(&any);
            }
        }
        self.jupyter_cursors.insert(key, seq);
    }

    /// Forgets the Jupyter clients of a closed session.
    pub(crate) fn forget_jupyter_cursors(&self, session: &str) {
        self.jupyter_cursors.retain(|(s, _), _| s != session);
    }
}

/// The whole HTTP application.
pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/sessions", get(sessions::list).post(sessions::create))
        .route(
            "/sessions/{id}",
            get(sessions::get).delete(sessions::delete),
        )
        .route("/sessions/{id}/ws", get(native::upgrade))
        .route("/sessions/{id}/packages", post(sessions::install))
        .route("/sessions/{id}/files", get(files::list))
        .route(
            "/sessions/{id}/files/{*path}",
            get(files::download)
                .put(files::upload)
                .delete(files::delete),
        )
        .route_layer(from_fn_with_state(state.clone(), auth::require_token));
    let jupyter =
        jupyter::routes().route_layer(from_fn_with_state(state.clone(), auth::require_token));
    let cors = origin::cors(&state.allowed_origins);
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(metrics::readyz))
        .route("/metrics", get(metrics::scrape))
        .nest("/v1", v1)
        .merge(jupyter)
        .merge(web::routes())
        .layer(from_fn_with_state(state.clone(), origin::check_origin))
        .with_state(state);
    match cors {
        Some(cors) => app.layer(cors),
        None => app,
    }
}

async fn healthz(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({
        "status": "ok",
        "backend": state.sessions.backend(),
        "isolation": state.sessions.isolation(),
        "sessions": state.sessions.list().len(),
    }))
}

/// Serves the application on `listener` until `shutdown` resolves, with TCP_NODELAY on every
/// connection (small event frames must not wait for Nagle's algorithm).
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}
