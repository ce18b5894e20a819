//! The HTTP + WebSocket front.
