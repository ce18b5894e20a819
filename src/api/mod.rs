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
mod state;
pub mod web;
mod ws_config;

use axum::Router;
use axum::http::Method;
use axum::middleware::from_fn_with_state;
use axum::routing::{MethodRouter, delete, get, post, put};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use auth::{ApiToken, Principal, Token, Tokens};
pub use jupyter::kernelspecs::KernelSpecs;
pub use state::{AppState, OwnedSession};

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone (probes, metrics, the notebook's static page).
    Public,
    /// A request with a known token ([`auth::require_token`]). A route whose path has a
    /// session `{id}` also needs its principal to own that session ([`OwnedSession`]): the
    /// router adds that check to every such route, whatever the table says.
    Token,
}

/// One route of the application: every route is declared in [`routes`], and [`router`] builds
/// the application from that table only, so tests can walk every route (e.g. every one with a
/// session `{id}`) without drifting from what the server serves.
pub struct Route {
    /// The HTTP method.
    pub method: Method,
    /// The path, in axum's syntax (`{id}` is a session or kernel id).
    pub path: &'static str,
    /// Who may call it.
    pub access: Access,
    handler: MethodRouter<AppState>,
}

impl Route {
    /// A route of the table (only `api` builds them: handlers are its business).
    pub(crate) fn new(
        method: Method,
        path: &'static str,
        access: Access,
        handler: MethodRouter<AppState>,
    ) -> Self {
        Self {
            method,
            path,
            access,
            handler,
        }
    }

    /// Whether the path names a session (`{id}`), so that only its owner may call it.
    pub fn names_session(&self) -> bool {
        self.path.contains("{id}")
    }
}

/// Every route the server serves.
pub fn routes() -> Vec<Route> {
    use Access::{Public, Token};
    let mut table = vec![
        Route::new(Method::GET, "/healthz", Public, get(healthz)),
        Route::new(Method::GET, "/readyz", Public, get(metrics::readyz)),
        Route::new(Method::GET, "/metrics", Public, get(metrics::scrape)),
        Route::new(Method::GET, "/v1/sessions", Token, get(sessions::list)),
        Route::new(Method::POST, "/v1/sessions", Token, post(sessions::create)),
        Route::new(Method::GET, "/v1/sessions/{id}", Token, get(sessions::get)),
        Route::new(
            Method::DELETE,
            "/v1/sessions/{id}",
            Token,
            delete(sessions::delete),
        ),
        Route::new(
            Method::GET,
            "/v1/sessions/{id}/ws",
            Token,
            get(native::upgrade),
        ),
        Route::new(
            Method::POST,
            "/v1/sessions/{id}/packages",
            Token,
            post(sessions::install),
        ),
        Route::new(
            Method::GET,
            "/v1/sessions/{id}/files",
            Token,
            get(files::list),
        ),
        Route::new(
            Method::GET,
            "/v1/sessions/{id}/files/{*path}",
            Token,
            get(files::download),
        ),
        Route::new(
            Method::PUT,
            "/v1/sessions/{id}/files/{*path}",
            Token,
            put(files::upload),
        ),
        Route::new(
            Method::DELETE,
            "/v1/sessions/{id}/files/{*path}",
            Token,
            delete(files::delete),
        ),
    ];
    table.extend(jupyter::routes());
    table.extend(web::routes());
    table
}

/// The whole HTTP application, from [`routes`].
pub fn router(state: AppState) -> Router {
    let mut app = Router::new();
    for route in routes() {
        let names_session = route.names_session();
        let mut handler = route.handler;
        if names_session {
            handler = handler.route_layer(from_fn_with_state(
                state.clone(),
                state::require_owned_session,
            ));
        }
        if route.access == Access::Token || names_session {
            handler = handler.route_layer(from_fn_with_state(state.clone(), auth::require_token));
        }
        app = app.route(route.path, handler);
    }
    let cors = origin::cors(&state.allowed_origins);
    let app = app
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
        "backend": state.backend(),
        "isolation": state.isolation(),
        "sessions": state.session_count(),
    }))
}

/// How many connections the server holds and how long a client may take to send a request's
/// headers.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Most open connections (WebSockets included); connections beyond are closed at once.
    pub max_connections: usize,
    /// Longest time from the start of reading a request (or of waiting for the next one on a
    /// kept-alive connection) until its headers are complete; the connection is closed then
    /// (against clients that trickle headers to hold connections: "slowloris").
    pub header_read_timeout: Duration,
}

/// Default of `--max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default of `--header-read-timeout-s`.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
        }
    }
}

/// Serves the application on `listener` until `shutdown` resolves, with the default
/// [`ConnectionLimits`].
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, state, ConnectionLimits::default(), shutdown).await
}

/// Serves the application on `listener` until `shutdown` resolves, then lets open requests
/// finish (idle kept-alive connections are closed) before returning.
///
/// Each connection is HTTP/1 (hyper, upgrades to WebSocket allowed) with TCP_NODELAY (small
/// event frames must not wait for Nagle's algorithm), `limits.header_read_timeout` for every
/// request's headers, and one of `limits.max_connections` slots, held until its socket closes
/// (an upgraded WebSocket keeps it).
pub async fn serve_with(
    listener: TcpListener,
    state: AppState,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(state);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    // Every connection task holds a receiver: `closed()` on the sender is all of them ending.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (tcp, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(
                max_connections = limits.max_connections,
                "connection limit reached: closing a new connection"
            );
            drop(tcp);
            continue;
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let io = TokioIo::new(Counted { tcp, _slot: slot });
        let connection = http
            .serve_connection(io, TowerToHyperService::new(app.clone()))
            .with_upgrades();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut connection = std::pin::pin!(connection);
            // The watch guard is dropped inside: only `()` crosses the next await.
            let stopping = async move {
                let _ = stop.wait_for(|stop| *stop).await;
            };
            let outcome = tokio::select! {
                outcome = connection.as_mut() => outcome,
                () = stopping => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = outcome {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    drop(stop_rx);
    let _ = stop_tx.send(true);
    stop_tx.closed().await;
    Ok(())
}

/// A connection's socket holding its slot of the connection limit: the slot is given back
/// when the socket is dropped, after the HTTP connection or the WebSocket it became.
struct Counted {
    tcp: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}
