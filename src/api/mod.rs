//! The HTTP + WebSocket front (axum): authentication, the REST resources and the native JSON
//! event protocol. Knows sessions, never ZeroMQ or Docker.

pub mod auth;
pub mod error;
pub mod native;
pub mod sessions;

use std::sync::Arc;

use axum::Router;
use axum::middleware::from_fn_with_state;
use axum::routing::get;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;

use crate::session::SessionManager;
pub use auth::Token;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// Every live session.
    pub sessions: Arc<SessionManager>,
    /// The API token.
    pub token: Token,
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
        .route_layer(from_fn_with_state(state.clone(), auth::require_token));
    Router::new()
        .route("/healthz", get(healthz))
        .nest("/v1", v1)
        .with_state(state)
}

async fn healthz(
    axum::extract::State(state): axum::extract::State<AppState>,
) -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({
        "status": "ok",
        "backend": state.sessions.backend(),
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
