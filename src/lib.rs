//! kernelbox: a server that gives every client session its own sandboxed Jupyter kernel.
//!
//! The layers depend downward only:
//! - [`api`] — HTTP + WebSocket front (axum); knows sessions, never ZeroMQ or Docker.
//! - [`session`] — one kernel + its ordered execution queue, subscribers and lifecycle.
//! - [`kernel`] — the Jupyter wire protocol client (ZeroMQ, HMAC signing, framing).
//! - [`sandbox`] — where kernels run: a Docker container or a local process.
//!
//! Beside them, [`repl`] is a client: the interactive terminal REPL, speaking the native protocol
//! to a server over the network like any other client.

pub mod api;
pub mod config;
pub mod kernel;
pub mod repl;
pub mod sandbox;
pub mod session;
