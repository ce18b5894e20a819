//! The Kernel Gateway REST resources: `/api`, `/api/kernelspecs`, `/kernelspecs/{name}/{file}`
//! and `/api/kernels`. Kernels are kernelbox sessions: the same ids, visible from both APIs.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::super::error::AppError;
use super::super::{AppState, OwnedSession, Principal};
use crate::session::{CreateSession, EventKind, KernelState, SessionInfo};

/// How long `POST /api/kernels/{id}/restart` waits for the new kernel to be ready.
const RESTART_WAIT: Duration = Duration::from_secs(60);

/// `GET /api`: the API version (what Jupyter servers report).
pub async fn version() -> Json<Value> {
    Json(json!({
        "version": "2.14.0",
        "kernelbox": env!("CARGO_PKG_VERSION"),
    }))
}

/// `GET /api/kernelspecs`.
pub async fn kernelspecs(State(state): State<AppState>) -> Json<Value> {
    Json(state.kernelspecs.listing())
}

/// `GET /api/kernelspecs/{name}`.
pub async fn kernelspec(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, AppError> {
    state
        .kernelspecs
        .model(&name)
        .map(Json)
        .ok_or_else(|| no_kernelspec(&state, &name))
}

/// `GET /kernelspecs/{name}/{file}`: kernelspec resources (logos). kernelbox ships none.
pub async fn kernelspec_resource(
    State(state): State<AppState>,
    Path((name, file)): Path<(String, String)>,
) -> AppError {
    if state.kernelspecs.get(&name).is_none() {
        return no_kernelspec(&state, &name);
    }
    AppError {
        status: StatusCode::NOT_FOUND,
        message: format!("kernelspec {name} has no resource {file}"),
    }
}

fn no_kernelspec(state: &AppState, name: &str) -> AppError {
    let known: Vec<&str> = state.kernelspecs.names().collect();
    AppError {
        status: StatusCode::NOT_FOUND,
        message: format!("no kernelspec {name:?}; known: {}", known.join(", ")),
    }
}

/// The Jupyter kernel model of a session.
pub fn model(info: &SessionInfo) -> Value {
    json!({
        "id": info.id.as_ref(),
        "name": info.kernel_name.as_ref(),
        "last_activity": info.last_activity.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
        "execution_state": execution_state(info.state),
        "connections": info.connections,
    })
}

/// Jupyter's name for a session state.
pub fn execution_state(state: KernelState) -> &'static str {
    match state {
        KernelState::Starting => "starting",
        KernelState::Idle => "idle",
        KernelState::Busy => "busy",
        KernelState::Restarting => "restarting",
        KernelState::Dead | KernelState::Closed => "dead",
    }
}

/// The body of `POST /api/kernels`.
#[derive(Debug, Default, Deserialize)]
pub struct StartBody {
    /// Kernelspec name (default: the default spec).
    #[serde(default)]
    name: Option<String>,
    /// Environment for the kernel; only `KERNEL_*` variables are passed on (as Kernel Gateway
    /// does), except `KERNEL_WORKING_DIR`, a path on the client's host.
    #[serde(default)]
    env: BTreeMap<String, Value>,
}

/// `POST /api/kernels`: starts a kernel → 201 + model.
pub async fn start(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), AppError> {
    let body: StartBody = if body.iter().all(u8::is_ascii_whitespace) {
        StartBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| AppError::bad_request(format!("invalid kernel request: {e}")))?
    };
    let name = body
        .name
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| state.kernelspecs.default_name().to_owned());
    let kernel = state
        .kernelspecs
        .command(&name)
        .ok_or_else(|| no_kernelspec(&state, &name))?;
    let env = body
        .env
        .into_iter()
        .filter(|(k, _)| k.starts_with("KERNEL_") && k != "KERNEL_WORKING_DIR")
        .filter(|(k, _)| !k.starts_with("KERNEL_LAUNCH_TIMEOUT"))
        .map(|(k, v)| {
            let v = match v {
                Value::String(s) => s,
                other => other.to_string(),
            };
            (k, v)
        })
        .collect();
    let session = state
        .create_session(
            &principal,
            CreateSession {
                env,
                kernel,
                kernel_name: name,
                ..CreateSession::default()
            },
        )
        .await?;
    Ok((StatusCode::CREATED, Json(model(&session.info()))))
}

/// `GET /api/kernels`: every kernel.
pub async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Json<Value> {
    Json(Value::Array(
        state.owned_sessions(&principal).iter().map(model).collect(),
    ))
}

/// `GET /api/kernels/{id}`.
pub async fn get(session: OwnedSession) -> Json<Value> {
    Json(model(&session.info()))
}

/// `DELETE /api/kernels/{id}` → 204.
pub async fn delete(session: OwnedSession) -> Result<StatusCode, AppError> {
    session.close().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/kernels/{id}/interrupt` → 204.
pub async fn interrupt(session: OwnedSession) -> Result<StatusCode, AppError> {
    session.interrupt()?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/kernels/{id}/restart` → 200 + model, once the new kernel is ready (or dead).
pub async fn restart(session: OwnedSession) -> Result<Json<Value>, AppError> {
    let id = session.id().to_owned();
    let mut events = session.subscribe();
    session.restart()?;
    let settled = async {
        let mut restarting = false;
        while let Ok(event) = events.recv().await {
            if let EventKind::State { state, .. } = &event.kind {
                match state {
                    KernelState::Restarting => restarting = true,
                    KernelState::Idle | KernelState::Dead if restarting => return,
                    KernelState::Closed => return,
                    _ => {}
                }
            }
        }
    };
    if tokio::time::timeout(RESTART_WAIT, settled).await.is_err() {
        return Err(AppError {
            status: StatusCode::GATEWAY_TIMEOUT,
            message: format!("kernel {id} did not come back within {RESTART_WAIT:?}"),
        });
    }
    Ok(Json(model(&session.info())))
}
