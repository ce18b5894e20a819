//! The session layer's Prometheus metrics, recorded through the `metrics` facade: a no-op until a
//! recorder is installed (the API's `/metrics` installs one). Every name starts with
//! `kernelbox_`; labels are static strings only (no ids, no code), so recording costs no
//! allocation. Gauges of sessions by state and of the warm pool are not recorded here: the
//! scrape computes them from the [`SessionManager`](super::SessionManager).

use metrics::{Counter, describe_counter, describe_gauge, describe_histogram};

use crate::sandbox::ExitReason;

/// Gauge: live sessions by `state` (starting, idle, busy, restarting, dead, closed).
pub const SESSIONS: &str = "kernelbox_sessions";
/// Counter: cells that finished, by `outcome` (ok, error, aborted, timeout, rejected).
pub const EXECUTIONS: &str = "kernelbox_executions_total";
/// Histogram: seconds from sending a cell to the kernel to its completion (cells that ran).
pub const EXECUTE_DURATION: &str = "kernelbox_execute_duration_seconds";
/// Counter: kernels started, by `kind` (cold, pool, restart, adopted).
pub const KERNEL_STARTS: &str = "kernelbox_kernel_starts_total";
/// Counter: kernels that ended, by `reason`.
pub const KERNEL_DEATHS: &str = "kernelbox_kernel_deaths_total";
/// Counter: sessions closed by idle culling.
pub const SESSIONS_CULLED: &str = "kernelbox_sessions_culled_total";
/// Gauge: ready kernels waiting in the warm pool.
pub const POOL_READY: &str = "kernelbox_pool_ready";
/// Gauge: ready kernels the warm pool is kept at.
pub const POOL_TARGET: &str = "kernelbox_pool_target";

/// Upper bounds (seconds) of the execute-duration histogram's buckets: 1 ms to 5 min.
pub const EXECUTE_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

/// Registers the help text of the session layer's metrics with the installed recorder.
pub fn describe() {
    describe_gauge!(
        SESSIONS,
        "Live sessions by the state of their kernel (computed at scrape time)."
    );
    describe_counter!(
        EXECUTIONS,
        "Cells finished, by outcome: ok, error, aborted (kernel died or restarted), timeout, \
         rejected (never queued)."
    );
    describe_histogram!(
        EXECUTE_DURATION,
        "Seconds from sending a cell to the kernel until all its output arrived (cells that ran)."
    );
    describe_counter!(
        KERNEL_STARTS,
        "Kernels started, by kind: cold (for a new session), pool (warm pool refill), restart, \
         adopted (taken over from a previous server process)."
    );
    describe_counter!(
        KERNEL_DEATHS,
        "Kernels that ended, by reason: exited, signal, out_of_memory, heartbeat_lost, vanished, \
         not_ready, restart_failed (unexpected); restart_requested, timeout_restart, closed (the \
         server's own doing)."
    );
    describe_counter!(SESSIONS_CULLED, "Sessions closed because they were idle.");
    describe_gauge!(
        POOL_READY,
        "Ready kernels waiting in the warm pool (computed at scrape time)."
    );
    describe_gauge!(POOL_TARGET, "Ready kernels the warm pool is kept at.");
}

/// How a kernel came to be started.
#[derive(Debug, Clone, Copy)]
pub(crate) enum StartKind {
    /// Launched for a new session that could not take a pooled kernel.
    Cold,
    /// Launched to refill the warm pool.
    Pool,
    /// A session's kernel restarted (client's request or a stuck timed-out cell).
    Restart,
    /// Taken over from a previous server process.
    Adopted,
}

/// Counts a kernel start.
pub(crate) fn kernel_started(kind: StartKind) {
    match kind {
        StartKind::Cold => metrics::counter!(KERNEL_STARTS, "kind" => "cold").increment(1),
        StartKind::Pool => metrics::counter!(KERNEL_STARTS, "kind" => "pool").increment(1),
        StartKind::Restart => metrics::counter!(KERNEL_STARTS, "kind" => "restart").increment(1),
        StartKind::Adopted => metrics::counter!(KERNEL_STARTS, "kind" => "adopted").increment(1),
    }
}

/// Why a session's kernel ended.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Death {
    /// The process exited with a code.
    Exited,
    /// The process was killed by a signal.
    Signal,
    /// The out-of-memory killer ended it.
    OutOfMemory,
    /// The heartbeat stopped answering.
    HeartbeatLost,
    /// The kernel broke the wire protocol (an oversized or malformed message).
    WireFault,
    /// The sandbox vanished or could not be watched.
    Vanished,
    /// It never proved ready.
    NotReady,
    /// A restart failed (the session is dead).
    RestartFailed,
    /// A client asked for a restart.
    RestartRequested,
    /// A timed-out cell did not stop after its interrupt.
    TimeoutRestart,
    /// The session was closed.
    Closed,
}

impl From<&ExitReason> for Death {
    fn from(reason: &ExitReason) -> Self {
        match reason {
            ExitReason::OutOfMemory => Death::OutOfMemory,
            ExitReason::ExitCode(_) => Death::Exited,
            ExitReason::Signal(_) => Death::Signal,
            ExitReason::HeartbeatLost => Death::HeartbeatLost,
            ExitReason::Vanished(_) => Death::Vanished,
        }
    }
}

/// Counts a kernel's end.
pub(crate) fn kernel_died(death: Death) {
    let counter = match death {
        Death::Exited => metrics::counter!(KERNEL_DEATHS, "reason" => "exited"),
        Death::Signal => metrics::counter!(KERNEL_DEATHS, "reason" => "signal"),
        Death::OutOfMemory => metrics::counter!(KERNEL_DEATHS, "reason" => "out_of_memory"),
        Death::HeartbeatLost => metrics::counter!(KERNEL_DEATHS, "reason" => "heartbeat_lost"),
        Death::WireFault => metrics::counter!(KERNEL_DEATHS, "reason" => "wire_fault"),
        Death::Vanished => metrics::counter!(KERNEL_DEATHS, "reason" => "vanished"),
        Death::NotReady => metrics::counter!(KERNEL_DEATHS, "reason" => "not_ready"),
        Death::RestartFailed => metrics::counter!(KERNEL_DEATHS, "reason" => "restart_failed"),
        Death::RestartRequested => {
            metrics::counter!(KERNEL_DEATHS, "reason" => "restart_requested")
        }
        Death::TimeoutRestart => metrics::counter!(KERNEL_DEATHS, "reason" => "timeout_restart"),
        Death::Closed => metrics::counter!(KERNEL_DEATHS, "reason" => "closed"),
    };
    counter.increment(1);
}

/// The executions counter for a cell's `done` status (static labels: no allocation).
pub(crate) fn executions(status: &'static str) -> Counter {
    match status {
        "ok" => metrics::counter!(EXECUTIONS, "outcome" => "ok"),
        "aborted" => metrics::counter!(EXECUTIONS, "outcome" => "aborted"),
        "timeout" => metrics::counter!(EXECUTIONS, "outcome" => "timeout"),
        "rejected" => metrics::counter!(EXECUTIONS, "outcome" => "rejected"),
        _ => metrics::counter!(EXECUTIONS, "outcome" => "error"),
    }
}
