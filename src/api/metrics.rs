//! Observability routes: `/metrics` (Prometheus text exposition, rendered by
//! `metrics-exporter-prometheus` from the process-wide recorder) and `/readyz`. Both carry
//! counts and states only — no session ids, code, output or secrets — and need no token.
//!
//! The recorder is installed at most once per process ([`install`]); until then every metric
//! macro is a no-op and `/metrics` answers 503. The WebSocket fronts record what they relay
//! through a per-connection [`Relay`], whose handles make each count one atomic add.

use std::sync::OnceLock;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::Message as WsMessage;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use metrics::{Counter, Gauge, describe_counter, describe_gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::json;

use super::AppState;
use crate::session::metrics as session_metrics;

/// Gauge: connected WebSocket clients, by `front` (native, jupyter).
pub const WS_CLIENTS: &str = "kernelbox_ws_clients";
/// Counter: bytes of frames sent to WebSocket clients, by `front` (native, jupyter).
pub const RELAYED_BYTES: &str = "kernelbox_relayed_bytes_total";

/// The Prometheus text format's content type.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How often histogram samples are folded into their buckets between scrapes (bounds memory
/// when nobody scrapes).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

static RECORDER: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder and describes every metric; later calls
/// return the first call's outcome. Fails when another recorder was installed first.
pub fn install() -> Result<&'static PrometheusHandle, &'static str> {
    RECORDER
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(session_metrics::EXECUTE_DURATION.to_owned()),
                    session_metrics::EXECUTE_BUCKETS,
                )
                .map_err(|e| e.to_string())?
                .install_recorder()
                .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
            describe();
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(UPKEEP_EVERY);
                        upkeep.run_upkeep();
                    }
                });
            if let Err(e) = spawned {
                // Scrapes still fold samples in; only memory between scrapes is unbounded.
                tracing::warn!(error = %e, "cannot start the metrics upkeep thread");
            }
            Ok(handle)
        })
        .as_ref()
        .map_err(String::as_str)
}

/// The installed recorder's handle, if [`install`] succeeded.
pub fn handle() -> Option<&'static PrometheusHandle> {
    RECORDER.get().and_then(|r| r.as_ref().ok())
}

/// Registers the help text of every kernelbox metric.
fn describe() {
    session_metrics::describe();
    describe_gauge!(WS_CLIENTS, "WebSocket clients connected now, by front.");
    describe_counter!(
        RELAYED_BYTES,
        "Bytes of frames sent to WebSocket clients, by front."
    );
}

/// `GET /metrics`: the Prometheus text exposition (503 when no recorder is installed). The
/// gauges of sessions by state and of the warm pool are computed now, from the live sessions.
pub async fn scrape(State(state): State<AppState>) -> Response {
    let Some(handle) = handle() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "metrics are not enabled: no metrics recorder is installed in this process\n",
        )
            .into_response();
    };
    for (kernel_state, n) in state.count_by_state() {
        metrics::gauge!(session_metrics::SESSIONS, "state" => kernel_state.as_str()).set(n as f64);
    }
    let (pool_ready, pool_target) = state.pool();
    metrics::gauge!(session_metrics::POOL_READY).set(pool_ready as f64);
    metrics::gauge!(session_metrics::POOL_TARGET).set(pool_target as f64);
    ([(header::CONTENT_TYPE, TEXT_FORMAT)], handle.render()).into_response()
}

/// `GET /readyz`: 200 when the sandbox backend answers and the warm pool is filled, else 503
/// with what is not ready. Says what is wrong, not the backend's error text (that is logged).
pub async fn readyz(State(state): State<AppState>) -> Response {
    let readiness = state.readiness().await;
    let backend = state.backend();
    let mut not_ready = Vec::new();
    if readiness.backend.is_err() {
        not_ready.push(format!("the {backend} backend does not answer"));
    }
    if readiness.pool_ready < readiness.pool_target {
        not_ready.push(format!(
            "the warm pool holds {} of its {} ready kernels",
            readiness.pool_ready, readiness.pool_target
        ));
    }
    let ready = not_ready.is_empty();
    let body = json!({
        "status": if ready { "ready" } else { "not ready" },
        "backend": {
            "name": backend,
            "reachable": readiness.backend.is_ok(),
        },
        "pool": {
            "ready": readiness.pool_ready,
            "target": readiness.pool_target,
        },
        "not_ready": not_ready,
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

/// Which WebSocket front a connection speaks.
#[derive(Debug, Clone, Copy)]
pub enum Front {
    /// The native JSON protocol (`/v1/sessions/{id}/ws`).
    Native,
    /// The Jupyter Kernel Gateway channels (`/api/kernels/{id}/channels`).
    Jupyter,
}

/// One WebSocket connection's metrics: counted as a client while it lives, and the bytes of the
/// frames it was sent.
pub(crate) struct Relay {
    bytes: Counter,
    clients: Gauge,
}

impl Relay {
    /// Counts a client of `front` connected (until the `Relay` is dropped).
    pub(crate) fn open(front: Front) -> Self {
        let (bytes, clients) = match front {
            Front::Native => (
                metrics::counter!(RELAYED_BYTES, "front" => "native"),
                metrics::gauge!(WS_CLIENTS, "front" => "native"),
            ),
            Front::Jupyter => (
                metrics::counter!(RELAYED_BYTES, "front" => "jupyter"),
                metrics::gauge!(WS_CLIENTS, "front" => "jupyter"),
            ),
        };
        clients.increment(1.0);
        Self { bytes, clients }
    }

    /// Counts frames the client was sent, `len` bytes in all (see [`frame_len`]).
    pub(crate) fn sent(&self, len: usize) {
        self.bytes.increment(len as u64);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.clients.decrement(1.0);
    }
}

/// The payload bytes of a data frame (0 for control frames).
pub(crate) fn frame_len(frame: &WsMessage) -> usize {
    match frame {
        WsMessage::Text(text) => text.len(),
        WsMessage::Binary(bytes) => bytes.len(),
        _ => 0,
    }
}
