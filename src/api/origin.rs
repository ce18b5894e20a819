//! Browser-origin checks. Browsers attach an `Origin` header to cross-site requests and to every
//! WebSocket upgrade, and do not apply CORS to WebSockets: without this check any web page a
//! user visits could drive their kernels with a token it found or was given. Requests whose
//! `Origin` is neither this server itself nor on the operator's allow-list get a 403; allowed
//! origins also get CORS headers so browser apps on them can call the REST API.

use axum::extract::{Request, State};
use axum::http::header::{HOST, ORIGIN};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::AppState;
use super::error::AppError;

/// Whether `origin` (`scheme://host[:port]`) names the host the request was sent to.
fn same_origin(origin: &str, host: Option<&str>) -> bool {
    let Some(host) = host else { return false };
    let authority = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    authority.is_some_and(|a| a.eq_ignore_ascii_case(host))
}

/// Middleware: 403 for requests from a browser origin that is neither this server nor allowed.
pub async fn check_origin(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, AppError> {
    if let Some(origin) = request.headers().get(ORIGIN) {
        let origin = origin.to_str().unwrap_or("<not text>");
        let host = request.headers().get(HOST).and_then(|h| h.to_str().ok());
        let allowed = same_origin(origin, host)
            || state
                .allowed_origins
                .iter()
                .any(|a| a == origin || a == "*");
        if !allowed {
            let shown: String = origin.chars().take(100).collect();
            return Err(AppError {
                status: StatusCode::FORBIDDEN,
                message: format!(
                    "requests from origin {shown} are not allowed: the operator can allow it \
                     with --allowed-origin"
                ),
            });
        }
    }
    Ok(next.run(request).await)
}

/// CORS headers for the allowed origins (none when the list is empty).
pub fn cors(allowed: &[String]) -> Option<CorsLayer> {
    if allowed.is_empty() {
        return None;
    }
    let origin = if allowed.iter().any(|a| a == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            allowed
                .iter()
                .filter_map(|a| HeaderValue::from_str(a).ok())
                .collect::<Vec<_>>(),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(origin)
            .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]),
    )
}

#[cfg(test)]
mod tests {
    use super::same_origin;

    #[test]
    fn same_origin_compares_scheme_less_authority() {
        assert!(same_origin("http://127.0.0.1:8888", Some("127.0.0.1:8888")));
        assert!(same_origin("https://Box.example", Some("box.example")));
        assert!(!same_origin("http://evil.example", Some("127.0.0.1:8888")));
        assert!(!same_origin("http://127.0.0.1:8888", None));
        assert!(!same_origin("null", Some("null")));
    }
}
