//! `AppError`: every failure a handler can return, as an HTTP status and a JSON body
//! `{"error": "<what was wrong>"}`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::session::{FilesError, SessionError};
use crate::session::{InstallError, SandboxError};

/// A failed request: the status to answer with and a message that says what was wrong.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct AppError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What the client should know.
    pub message: String,
}

impl AppError {
    /// A 401 with a hint on how to authenticate.
    pub fn unauthorized() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: "missing or wrong token: send `Authorization: Bearer <token>`".into(),
        }
    }

    /// A 401 for a plain (not WebSocket) request: its token must come in the header, as a
    /// `?token=` is accepted on WebSocket upgrades only.
    pub fn unauthorized_http() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: "missing or wrong token: send `Authorization: Bearer <token>` \
                      (`?token=` is accepted on WebSocket upgrades only)"
                .into(),
        }
    }

    /// A 404 for an unknown session.
    pub fn no_session(id: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("no session {id}"),
        }
    }

    /// A 404 for an unknown kernel (Jupyter API).
    pub fn no_kernel(id: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("no kernel {id}"),
        }
    }

    /// A 400 for a malformed request body.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

impl From<SessionError> for AppError {
    fn from(e: SessionError) -> Self {
        let status = match &e {
            SessionError::NotFound(_) => StatusCode::NOT_FOUND,
            SessionError::Closed(_) => StatusCode::GONE,
            SessionError::Overloaded(_)
            | SessionError::QueueFull { .. }
            | SessionError::Limit(_) => StatusCode::TOO_MANY_REQUESTS,
            SessionError::Sandbox(SandboxError::Policy(_)) => StatusCode::FORBIDDEN,
            SessionError::Sandbox(_) | SessionError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
            SessionError::Files(files) => match files {
                FilesError::InvalidPath { .. }
                | FilesError::Escapes(_)
                | FilesError::IsADirectory(_)
                | FilesError::NotADirectory(_)
                | FilesError::Body(_) => StatusCode::BAD_REQUEST,
                FilesError::NotFound(_) => StatusCode::NOT_FOUND,
                FilesError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                FilesError::NoSpace => StatusCode::INSUFFICIENT_STORAGE,
                FilesError::Unsupported => StatusCode::NOT_IMPLEMENTED,
                FilesError::Backend { .. } => StatusCode::SERVICE_UNAVAILABLE,
            },
            SessionError::Install(InstallError::Disabled) => StatusCode::FORBIDDEN,
            SessionError::Install(InstallError::InvalidPackage(_) | InstallError::Count(_)) => {
                StatusCode::BAD_REQUEST
            }
            SessionError::Install(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        Self {
            status,
            message: e.to_string(),
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        (
            self.status,
            // `error` for kernelbox clients; `message` and `reason` as Jupyter clients read them.
            Json(serde_json::json!({
                "error": self.message,
                "message": self.message,
                "reason": self.status.canonical_reason().unwrap_or(""),
            })),
        )
            .into_response()
    }
}
