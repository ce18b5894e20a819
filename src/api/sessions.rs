//! REST resources of the native API: `/v1/sessions`.

use std::collections::BTreeMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, StatusCode, header::HOST};
use serde::{Deserialize, Serialize};

use super::error::AppError;
use super::{AppState, OwnedSession, Principal};
use crate::session::{CreateSession, KernelState, SessionInfo};

/// Body of `POST /v1/sessions` (all optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    /// Ask for network access (refused unless the operator allows it).
    #[serde(default)]
    pub network: bool,
    /// Extra environment variables for the kernel.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Python packages to install before the first cell runs (refused with 403 unless the
    /// operator allows installs); progress on the WebSocket as install events with id
    /// `packages`.
    #[serde(default)]
    pub packages: Vec<String>,
}

/// Body of `POST /v1/sessions/{id}/packages`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstallBody {
    /// pip requirements: names with optional `[extras]` and version specifiers.
    pub packages: Vec<String>,
    /// The id the install's events carry (generated when absent).
    #[serde(default)]
    pub id: Option<String>,
}

/// Answer of `POST /v1/sessions/{id}/packages`.
#[derive(Debug, Serialize)]
pub struct InstallAccepted {
    /// The id the install's events carry.
    pub id: String,
}

/// `POST /v1/sessions/{id}/packages`: starts installing packages into the session's own
/// environment; `202` with the install's id. Progress and the outcome come on the session's
/// WebSocket (`install_started`, `install_output`, `install_done`).
pub async fn install(
    session: OwnedSession,
    body: Bytes,
) -> Result<(StatusCode, Json<InstallAccepted>), AppError> {
    let body: InstallBody = serde_json::from_slice(&body)
        .map_err(|e| AppError::bad_request(format!("invalid install request: {e}")))?;
    let install_id = body
        .id
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    session.install(install_id.as_str().into(), body.packages)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(InstallAccepted { id: install_id }),
    ))
}

/// A session as the REST API shows it.
#[derive(Debug, Serialize)]
pub struct SessionView {
    /// Session id.
    pub id: String,
    /// Kernel state.
    pub state: KernelState,
    /// The sandbox backend.
    pub backend: &'static str,
    /// Creation time (RFC 3339).
    pub created: String,
    /// Last command or output (RFC 3339).
    pub last_activity: String,
    /// Latest execution count.
    pub execution_count: i64,
    /// Cells waiting.
    pub queued: usize,
    /// Connected clients.
    pub connections: usize,
    /// The WebSocket path of the session.
    pub ws_path: String,
    /// The absolute WebSocket URL, when the request said which host it reached.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ws_url: Option<String>,
}

impl SessionView {
    fn new(info: SessionInfo, headers: &HeaderMap) -> Self {
        let ws_path = format!("/v1/sessions/{}/ws", info.id);
        let ws_url = headers
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .map(|host| format!("ws://{host}{ws_path}"));
        Self {
            id: info.id.to_string(),
            state: info.state,
            backend: info.backend,
            created: info.created.to_rfc3339(),
            last_activity: info.last_activity.to_rfc3339(),
            execution_count: info.execution_count,
            queued: info.queued,
            connections: info.connections,
            ws_path,
            ws_url,
        }
    }
}

/// `POST /v1/sessions`: starts a session; 201 with its view.
pub async fn create(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<SessionView>), AppError> {
    let body: CreateBody = if body.iter().all(u8::is_ascii_whitespace) {
        CreateBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| AppError::bad_request(format!("invalid session request: {e}")))?
    };
    let session = state
        .create_session(
            &principal,
            CreateSession {
                network: body.network,
                env: body.env,
                packages: body.packages,
                ..CreateSession::default()
            },
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(SessionView::new(session.info(), &headers)),
    ))
}

/// `GET /v1/sessions`: every live session.
pub async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    headers: HeaderMap,
) -> Json<Vec<SessionView>> {
    Json(
        state
            .owned_sessions(&principal)
            .into_iter()
            .map(|i| SessionView::new(i, &headers))
            .collect(),
    )
}

/// `GET /v1/sessions/{id}`.
pub async fn get(session: OwnedSession, headers: HeaderMap) -> Json<SessionView> {
    Json(SessionView::new(session.info(), &headers))
}

/// `DELETE /v1/sessions/{id}`: stops the kernel and removes its sandbox; 204.
pub async fn delete(session: OwnedSession) -> Result<StatusCode, AppError> {
    session.close().await?;
    Ok(StatusCode::NO_CONTENT)
}
