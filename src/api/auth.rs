//! Token authentication: `Authorization: Bearer <token>` (or `token <token>`, as Jupyter
//! clients send it), or `?token=` for browsers' WebSocket upgrades, which cannot set headers.
//! Tokens are compared in constant time.

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;
use subtle::ConstantTimeEq;

use super::AppState;
use super::error::AppError;

/// The server's API token.
#[derive(Clone)]
pub struct Token(std::sync::Arc<str>);

impl Token {
    /// Wraps a configured token.
    pub fn new(token: &str) -> Self {
        Self(token.into())
    }

    /// A fresh random token (48 hex characters), for servers started without one.
    pub fn generate() -> Self {
        Self(hex::encode(rand::random::<[u8; 24]>()).into())
    }

    /// The token's text (to print once at start; never logged).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `candidate` is the token, in constant time.
    pub fn matches(&self, candidate: &str) -> bool {
        bool::from(self.0.as_bytes().ct_eq(candidate.as_bytes()))
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// The token a request carries, from its header or its query string.
pub fn presented(request: &Request) -> Option<String> {
    if let Some(value) = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let (scheme, token) = value.split_once(' ')?;
        if scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("token") {
            return Some(token.trim().to_owned());
        }
        return None;
    }
    let query = request.uri().query()?;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == "token").then(|| v.to_owned())
    })
}

/// Middleware: rejects requests without the right token with 401.
pub async fn require_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, AppError> {
    match presented(&request) {
        Some(token) if state.token.matches(&token) => Ok(next.run(request).await),
        _ => Err(AppError::unauthorized()),
    }
}
