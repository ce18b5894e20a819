//! How both WebSocket fronts size their sockets: what a client may send at most, and a small read
//! buffer, because clients send little (cells, replies) and 1,000 idle clients must stay cheap
//! (the library's default read buffer is 128 KiB per socket, allocated up front).

use axum::extract::ws::WebSocketUpgrade;

/// The largest message a client may send (a cell's code, an input reply, a Jupyter message).
const MAX_CLIENT_MESSAGE: usize = 16 << 20;

/// Read buffer per socket; larger client messages are read in several chunks.
const READ_BUFFER: usize = 4 << 10;

/// Applies the server's socket limits to an upgrade.
pub(crate) fn configure(ws: WebSocketUpgrade) -> WebSocketUpgrade {
    ws.max_message_size(MAX_CLIENT_MESSAGE)
        .max_frame_size(MAX_CLIENT_MESSAGE)
        .read_buffer_size(READ_BUFFER)
}
