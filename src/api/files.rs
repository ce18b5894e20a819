//! REST resources for a session's working directory (both APIs' sessions — a Jupyter kernel id
//! is a session id): `GET /v1/sessions/{id}/files[?path=dir]` lists, and
//! `GET`/`PUT`/`DELETE /v1/sessions/{id}/files/{path}` download, upload and delete. Bodies are
//! streamed both ways (in the chunks they arrive in: nothing is buffered whole); uploads beyond
//! the server's limit get `413` — checked against a declared length before the body is read,
//! and counted while it streams — and uploads beyond the server-wide [`UploadBudget`] `503`.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::AppError;
use super::{AppState, OwnedSession};
use crate::session::{FileEntry, FilesError, SessionError, WorkPath};

/// Default upload limit: 100 MiB.
pub const DEFAULT_MAX_UPLOAD_BYTES: u64 = 100 << 20;

/// Default of the bytes all uploads in progress may hold together: 1 GiB.
pub const DEFAULT_UPLOAD_BUDGET_BYTES: u64 = 1 << 30;

/// The bytes uploads in progress may hold together, server-wide. A body is streamed in small
/// chunks, but until it is complete it is spooled (Docker: to a host temp file, which may be
/// memory on a tmpfs `/tmp`), so concurrent uploads would otherwise multiply
/// `--max-upload-mb` without bound. Each upload reserves its declared size (or the upload
/// limit, when it declares none) before its body is read, and gives it back when it ends.
pub struct UploadBudget {
    /// Free budget in KiB.
    kib: Arc<Semaphore>,
    bytes: u64,
}

impl UploadBudget {
    /// A budget of `bytes`.
    pub fn new(bytes: u64) -> Self {
        let kib = usize::try_from(bytes.div_ceil(1024))
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        Self {
            kib: Arc::new(Semaphore::new(kib)),
            bytes,
        }
    }

    /// Reserves `bytes` of the budget for one upload, or says why not.
    fn reserve(&self, bytes: u64) -> Result<OwnedSemaphorePermit, AppError> {
        let busy = || AppError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: format!(
                "too many uploads in progress: together they may hold {} bytes and this one \
                 needs {bytes} more; retry when others have finished",
                self.bytes
            ),
        };
        let kib = u32::try_from(bytes.div_ceil(1024)).map_err(|_| busy())?;
        self.kib
            .clone()
            .try_acquire_many_owned(kib)
            .map_err(|_| busy())
    }
}

/// Query of the listing: which directory (default: the working directory itself).
#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    /// A directory relative to the working directory.
    #[serde(default)]
    pub path: Option<String>,
}

/// A directory listing as the API shows it.
#[derive(Debug, Serialize)]
pub struct ListingView {
    /// The directory, relative to the working directory (`""` for the working directory).
    pub path: String,
    /// Its entries, sorted by name.
    pub entries: Vec<FileEntry>,
    /// Whether entries were left out (more than the listing limit).
    pub truncated: bool,
}

fn parse(path: &str) -> Result<WorkPath, AppError> {
    WorkPath::parse(path).map_err(|e| AppError::from(SessionError::Files(e)))
}

/// `GET /v1/sessions/{id}/files[?path=dir]`: the entries of a directory.
pub async fn list(
    session: OwnedSession,
    Query(query): Query<ListQuery>,
) -> Result<Json<ListingView>, AppError> {
    let dir = parse(query.path.as_deref().unwrap_or(""))?;
    let listing = session.list_files(&dir).await?;
    Ok(Json(ListingView {
        path: dir.as_str().to_owned(),
        entries: listing.entries,
        truncated: listing.truncated,
    }))
}

/// `GET /v1/sessions/{id}/files/{path}`: the file's bytes, streamed.
pub async fn download(
    session: OwnedSession,
    Path((_, path)): Path<(String, String)>,
) -> Result<Response, AppError> {
    let path = parse(&path)?;
    let download = session.read_file(&path).await?;
    let name = path
        .split_last()
        .map(|(_, name)| name.replace(['"', '\\', '\r', '\n'], "_"))
        .unwrap_or_default();
    let mut response = Body::from_stream(download.body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(download.size));
    if let Ok(value) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    Ok(response)
}

/// `PUT /v1/sessions/{id}/files/{path}`: creates or replaces the file (and missing parent
/// directories) with the request body; `201` with the file's entry.
pub async fn upload(
    State(state): State<AppState>,
    session: OwnedSession,
    Path((_, path)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<FileEntry>), AppError> {
    let path = parse(&path)?;
    let limit = state.max_upload_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(SessionError::Files(FilesError::TooLarge { limit }).into());
    }
    // A declared length is the most the body can be (hyper enforces it); else the limit.
    let reserved = declared.unwrap_or(limit);
    let _budget = state.upload_budget.reserve(reserved)?;
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let entry = session.write_file(&path, Box::pin(stream), limit).await?;
    Ok((StatusCode::CREATED, Json(entry)))
}

/// `DELETE /v1/sessions/{id}/files/{path}`: removes the file or directory; `204`.
pub async fn delete(
    session: OwnedSession,
    Path((_, path)): Path<(String, String)>,
) -> Result<StatusCode, AppError> {
    let path = parse(&path)?;
    session.delete_file(&path).await?;
    Ok(StatusCode::NO_CONTENT)
}
