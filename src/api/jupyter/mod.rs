//! The Jupyter-compatible API: Jupyter Kernel Gateway's REST resources and kernel WebSocket, so
//! `jupyter lab --gateway-url=…` and other Jupyter clients run their kernels in kernelbox
//! sandboxes unchanged. Kernels here are the same sessions the native API serves.

pub mod channels;
pub mod kernels;
pub mod kernelspecs;
pub mod wire;

use axum::Router;
use axum::routing::{get, post};

use super::AppState;

/// The Kernel Gateway routes (authentication is applied by the caller).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api", get(kernels::version))
        .route("/api/kernelspecs", get(kernels::kernelspecs))
        .route("/api/kernelspecs/{name}", get(kernels::kernelspec))
        .route(
            "/kernelspecs/{name}/{*file}",
            get(kernels::kernelspec_resource),
        )
        .route("/api/kernels", get(kernels::list).post(kernels::start))
        .route(
            "/api/kernels/{id}",
            get(kernels::get).delete(kernels::delete),
        )
        .route("/api/kernels/{id}/interrupt", post(kernels::interrupt))
        .route("/api/kernels/{id}/restart", post(kernels::restart))
        .route("/api/kernels/{id}/channels", get(channels::upgrade))
}
