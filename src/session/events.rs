//! What a session tells its subscribers: kernel messages routed to the cell they belong to, and
//! the session's own lifecycle. Raw Jupyter messages stay whole so every front end (native JSON,
//! Jupyter-compatible) can render them its own way.

use std::sync::Arc;

use serde::Serialize;

use super::changed_files::ChangedFile;
use crate::kernel::{Channel, Message};

/// Lifecycle states of a session's kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum KernelState {
    /// The sandbox is starting the kernel or the client is proving it ready.
    Starting,
    /// Ready, no cell running.
    Idle,
    /// A cell is running.
    Busy,
    /// A restart is in progress.
    Restarting,
    /// The kernel died; a restart makes the session usable again.
    Dead,
    /// The session was closed; nothing more will happen.
    Closed,
}

impl KernelState {
    /// Every state, in lifecycle order.
    pub const ALL: [KernelState; 6] = [
        KernelState::Starting,
        KernelState::Idle,
        KernelState::Busy,
        KernelState::Restarting,
        KernelState::Dead,
        KernelState::Closed,
    ];

    /// The lowercase name clients see.
    pub fn as_str(self) -> &'static str {
        match self {
            KernelState::Starting => "starting",
            KernelState::Idle => "idle",
            KernelState::Busy => "busy",
            KernelState::Restarting => "restarting",
            KernelState::Dead => "dead",
            KernelState::Closed => "closed",
        }
    }
}

/// One event of a session, numbered in the order it happened.
#[derive(Debug, Clone)]
pub struct SessionEvent {
    /// Per-session sequence number, from 1, without gaps.
    pub seq: u64,
    /// The client's id of the cell or request this event belongs to, if any.
    pub cell: Option<Arc<str>>,
    /// What happened.
    pub kind: EventKind,
}

/// The kinds of session events.
#[derive(Debug, Clone)]
pub enum EventKind {
    /// A cell was queued; `position` cells run before it (0: it runs now).
    Accepted {
        /// Cells ahead of it.
        position: usize,
    },
    /// A message from the kernel: iopub output, a stdin input request or a shell reply to a
    /// complete/inspect request.
    Kernel {
        /// Where it came from.
        channel: Channel,
        /// The message, shared by every subscriber.
        msg: Arc<Message>,
    },
    /// A cell finished: all its output has been delivered.
    Done {
        /// `ok`, `error`, `aborted` (kernel died or restarted) or `timeout`.
        status: &'static str,
        /// The kernel's execution count for the cell, when it reported one.
        execution_count: Option<i64>,
        /// Wall time from sending the cell to its completion.
        duration_ms: u64,
        /// Files under `output/` the cell created or changed (`None`: not known, e.g. the cell
        /// failed or the kernel is not Python).
        files: Option<Vec<ChangedFile>>,
        /// The kernel's final iopub `idle` for the cell never came (iopub is lossy: ipykernel
        /// drops past its high-water mark when the reader lags): the cell was finished
        /// once iopub had been quiet for `IDLE_GRACE` after its `execute_reply`, and output may be missing.
        idle_lost: bool,
    },
    /// The kernel's lifecycle changed.
    State {
        /// The new state.
        state: KernelState,
        /// Why, for `dead` (e.g. "out of memory") and failures.
        reason: Option<String>,
    },
    /// A limit was hit (cell timeout, output cap): what happened and what was done about it.
    Limit {
        /// Which limit: `CellTimeout` or `OutputLimit`.
        limit: &'static str,
        /// What happened, for the client.
        message: String,
    },
    /// Progress of a package install (the event's id is the install's).
    Install(InstallEvent),
    /// A request could not be carried out (e.g. the kernel is dead, the queue is full).
    Rejected {
        /// What was wrong, for the client.
        message: String,
    },
}

/// The phases of a package install.
#[derive(Debug, Clone)]
pub enum InstallEvent {
    /// pip started for these packages.
    Started {
        /// The requirements being installed.
        packages: Vec<String>,
    },
    /// One line of pip's output (stdout and stderr).
    Output {
        /// The line, without its newline.
        line: String,
    },
    /// The install failed (sent just before its `Done`), with what went wrong.
    Failed {
        /// pip's error lines, or why pip could not run.
        message: String,
    },
    /// The install finished: successfully when `error` is `None`.
    Done {
        /// What went wrong (pip's own error lines when pip failed).
        error: Option<String>,
    },
}
