//! The Jupyter-compatible API: Jupyter Kernel Gateway's REST resources and kernel WebSocket, so
//! `jupyter lab --gateway-url=…` and other Jupyter clients run their kernels in kernelbox
//! sandboxes unchanged. Kernels here are the same sessions the native API serves.

pub mod channels;
pub mod kernels;
pub mod kernelspecs;
pub mod wire;

use axum::http::Method;
use axum::routing::{delete, get, post};

use super::{Access, Route};

/// The Kernel Gateway routes, for [`crate::api::routes`].
pub fn routes() -> Vec<Route> {
    use Access::Token;
    vec![
        Route::new(Method::GET, "/api", Token, get(kernels::version)),
        Route::new(
            Method::GET,
            "/api/kernelspecs",
            Token,
            get(kernels::kernelspecs),
        ),
        Route::new(
            Method::GET,
            "/api/kernelspecs/{name}",
            Token,
            get(kernels::kernelspec),
        ),
        Route::new(
            Method::GET,
            "/kernelspecs/{name}/{*file}",
            Token,
            get(kernels::kernelspec_resource),
        ),
        Route::new(Method::GET, "/api/kernels", Token, get(kernels::list)),
        Route::new(Method::POST, "/api/kernels", Token, post(kernels::start)),
        Route::new(Method::GET, "/api/kernels/{id}", Token, get(kernels::get)),
        Route::new(
            Method::DELETE,
            "/api/kernels/{id}",
            Token,
            delete(kernels::delete),
        ),
        Route::new(
            Method::POST,
            "/api/kernels/{id}/interrupt",
            Token,
            post(kernels::interrupt),
        ),
        Route::new(
            Method::POST,
            "/api/kernels/{id}/restart",
            Token,
            post(kernels::restart),
        ),
        Route::new(
            Method::GET,
            "/api/kernels/{id}/channels",
            Token,
            get(channels::upgrade),
        ),
    ]
}
