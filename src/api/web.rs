//! The browser notebook at `/`: a single page whose assets are embedded in the binary (no CDN,
//! works offline). The page asks for the token itself, so these routes need none; every API
//! call it makes is authenticated.

use std::sync::LazyLock;

use axum::http::Method;
use axum::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE};
use axum::response::IntoResponse;
use axum::routing::get;
use base64::Engine as _;
use sha2::{Digest, Sha256};

use super::{Access, Route};

const INDEX: &str = include_str!("../../web/index.html");
const NOTEBOOK_JS: &str = include_str!("../../web/notebook.js");
const NOTEBOOK_CSS: &str = include_str!("../../web/notebook.css");
const CLIENT_JS: &str = include_str!("../../clients/js/kernelbox.js");
const OUTPUT_FRAME_JS: &str = include_str!("../../web/output-frame.js");

/// The page's policy: its own scripts and styles only; images from data/blob URLs (kernel
/// output); user HTML only inside sandboxed `srcdoc` frames, which never get this origin.
///
/// Those frames inherit this policy, so the user's inline scripts stay blocked there too. The
/// one inline script allowed (by its hash) is `output-frame.js`, which the notebook puts in
/// each frame to report the frame's height: loading it by URL would not do, as a sandboxed
/// frame's requests carry `Origin: null`.
static CSP: LazyLock<String> = LazyLock::new(|| {
    let frame_script = base64::engine::general_purpose::STANDARD
        .encode(Sha256::digest(OUTPUT_FRAME_JS.as_bytes()));
    format!(
        "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; \
         script-src 'self' 'sha256-{frame_script}'; connect-src 'self' ws: wss:; \
         frame-src 'self' data: blob: about:; object-src 'none'; base-uri 'none'"
    )
});

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (CONTENT_TYPE, content_type),
            (CACHE_CONTROL, "no-cache"),
            (CONTENT_SECURITY_POLICY, CSP.as_str()),
        ],
        body,
    )
}

/// The notebook's routes (no token: the page asks for it), for [`crate::api::routes`].
pub fn routes() -> Vec<Route> {
    let page = |path, content_type, body| {
        Route::new(
            Method::GET,
            path,
            Access::Public,
            get(move || async move { asset(content_type, body) }),
        )
    };
    vec![
        page("/", "text/html; charset=utf-8", INDEX),
        page(
            "/static/notebook.js",
            "text/javascript; charset=utf-8",
            NOTEBOOK_JS,
        ),
        page(
            "/static/notebook.css",
            "text/css; charset=utf-8",
            NOTEBOOK_CSS,
        ),
        page(
            "/static/kernelbox.js",
            "text/javascript; charset=utf-8",
            CLIENT_JS,
        ),
        page(
            "/static/output-frame.js",
            "text/javascript; charset=utf-8",
            OUTPUT_FRAME_JS,
        ),
    ]
}
