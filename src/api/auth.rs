//! Token authentication: `Authorization: Bearer <token>` (or `token <token>`, as Jupyter
//! clients send it), or `?token=` on WebSocket upgrades only (browsers cannot set headers on
//! them); a plain request with `?token=` and no header is a `401`.
//! A server may have several API tokens, each a principal that owns the sessions it creates
//! (another token sees none of them), with its own session limit and request rate limit.
//! Tokens are compared in constant time and never logged.

use std::num::NonZeroU32;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::http::header::{AUTHORIZATION, UPGRADE};
use axum::middleware::Next;
use axum::response::Response;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::AppState;
use super::error::AppError;

/// An API token's secret.
#[derive(Clone)]
pub struct Token(Arc<str>);

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

/// Who a request comes from: the name of the token it carried, and that token's limits.
/// Handlers receive it as a request extension.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The token's name (owner of the sessions it creates).
    pub name: Arc<str>,
    /// Most sessions this token may hold at once (`None`: only the server's limit).
    pub max_sessions: Option<usize>,
}

/// One configured API token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiToken {
    /// A name for logs and ownership (never the secret).
    pub name: String,
    /// The secret clients send.
    #[serde(rename = "token")]
    secret: String,
    /// Most sessions this token may hold at once.
    #[serde(default)]
    pub max_sessions: Option<usize>,
}

impl ApiToken {
    /// A token called `name` with secret `token`.
    pub fn new(name: &str, token: &Token, max_sessions: Option<usize>) -> Self {
        Self {
            name: name.to_owned(),
            secret: token.expose().to_owned(),
            max_sessions,
        }
    }
}

/// Errors reading a tokens file.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    /// Unreadable file.
    #[error("cannot read tokens file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not a valid list of tokens.
    #[error("invalid tokens file {path}: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// What was wrong.
        reason: String,
    },
}

/// Reads `[{"name": "alice", "token": "…", "max_sessions": 5}, …]`.
pub fn read_tokens_file(path: &std::path::Path) -> Result<Vec<ApiToken>, TokensError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| TokensError::Read {
        path: shown.clone(),
        source,
    })?;
    let tokens: Vec<ApiToken> = serde_json::from_str(&text).map_err(|e| TokensError::Invalid {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    let invalid = |reason: String| TokensError::Invalid {
        path: shown.clone(),
        reason,
    };
    if tokens.is_empty() {
        return Err(invalid("no tokens".into()));
    }
    for (i, t) in tokens.iter().enumerate() {
        if t.secret.len() < 16 {
            return Err(invalid(format!(
                "token {:?} is shorter than 16 characters",
                t.name
            )));
        }
        if tokens[..i].iter().any(|o| o.name == t.name) {
            return Err(invalid(format!("two tokens are named {:?}", t.name)));
        }
        if tokens[..i].iter().any(|o| o.secret == t.secret) {
            return Err(invalid(format!(
                "tokens {:?} and another share a secret",
                t.name
            )));
        }
    }
    Ok(tokens)
}

/// Every API token, and the per-token request rate limiter.
pub struct Tokens {
    entries: Vec<(Token, Principal)>,
    limiter: Option<DefaultKeyedRateLimiter<Arc<str>>>,
    rate: Option<NonZeroU32>,
}

impl Tokens {
    /// The tokens, with `rate_per_s` requests per second (and as much burst) per token, if set.
    pub fn new(tokens: Vec<ApiToken>, rate_per_s: Option<NonZeroU32>) -> Self {
        let entries = tokens
            .into_iter()
            .map(|t| {
                (
                    Token::new(&t.secret),
                    Principal {
                        name: t.name.into(),
                        max_sessions: t.max_sessions,
                    },
                )
            })
            .collect();
        Self {
            entries,
            limiter: rate_per_s.map(|r| RateLimiter::keyed(Quota::per_second(r))),
            rate: rate_per_s,
        }
    }

    /// The principal whose token `candidate` is. Every token is compared (in constant time), so
    /// the time taken does not tell which one matched.
    pub fn find(&self, candidate: &str) -> Option<&Principal> {
        let mut found = None;
        for (token, principal) in &self.entries {
            if token.matches(candidate) && found.is_none() {
                found = Some(principal);
            }
        }
        found
    }

    /// Counts a request against `principal`'s rate; `false` when it is over.
    fn allow(&self, principal: &Principal) -> bool {
        self.limiter
            .as_ref()
            .is_none_or(|l| l.check_key(&principal.name).is_ok())
    }
}

/// Whether the request asks to become a WebSocket (`Upgrade: websocket`): the only requests
/// whose token may come in the query string, as browsers cannot set headers on them.
fn is_websocket_upgrade(request: &Request) -> bool {
    request
        .headers()
        .get_all(UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case("websocket"))
}

/// The token a request carries: from its `Authorization` header, or, for WebSocket upgrades
/// only, from `?token=` (a token in any other URL would end up in logs and browser history).
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
    if !is_websocket_upgrade(request) {
        return None;
    }
    let query = request.uri().query()?;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == "token").then(|| v.to_owned())
    })
}

/// Middleware: rejects requests without a known token with 401, and requests over their
/// token's rate with 429; hands the [`Principal`] to the handler.
pub async fn require_token(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Result<Response, AppError> {
    let principal = presented(&request)
        .and_then(|token| state.tokens.find(&token).cloned())
        .ok_or_else(|| {
            if is_websocket_upgrade(&request) {
                AppError::unauthorized()
            } else {
                AppError::unauthorized_http()
            }
        })?;
    if !state.tokens.allow(&principal) {
        let rate = state.tokens.rate.map_or(0, NonZeroU32::get);
        return Err(AppError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!(
                "too many requests: this token may make {rate} requests per second; slow down"
            ),
        });
    }
    request.extensions_mut().insert(principal);
    Ok(next.run(request).await)
}
