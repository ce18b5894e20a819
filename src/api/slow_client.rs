//! What both WebSocket fronts do with a client that cannot keep up: it is cut off (close code
//! 4008 with a reason saying how to resume) rather than let anything wait for it. A client is
//! too slow when it falls behind its session's event buffer, or when one frame has waited
//! [`SLOW_CLIENT`] for it to read.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message as WsMessage};
use futures::{Sink, SinkExt};

use super::metrics::{Relay, frame_len};

/// Close code for a client cut off because it fell behind (an application code: 4000–4999).
pub const CLOSE_TOO_SLOW: u16 = 4008;

/// How long one frame may wait for a client to read before the client is cut off.
pub const SLOW_CLIENT: Duration = Duration::from_secs(10);

/// How a frame for a client fared.
pub(crate) enum Sent {
    /// The client took it.
    Delivered,
    /// The connection is gone.
    Gone,
    /// The client did not take it in time and was cut off.
    CutOff,
}

/// Sends `frame`, cutting the client off (with `reason`, made only then) when it does not take
/// it within [`SLOW_CLIENT`]; counts what was delivered on `relay`.
pub(crate) async fn send_or_cut_off<S>(
    sink: &mut S,
    relay: &Relay,
    frame: WsMessage,
    reason: impl FnOnce() -> String,
) -> Sent
where
    S: Sink<WsMessage> + Unpin,
{
    let len = frame_len(&frame);
    match tokio::time::timeout(SLOW_CLIENT, sink.send(frame)).await {
        Ok(Ok(())) => {
            relay.sent(len);
            Sent::Delivered
        }
        Ok(Err(_)) => Sent::Gone,
        Err(_) => {
            cut_off(sink, reason()).await;
            Sent::CutOff
        }
    }
}

/// Tells a too-slow client why it is cut off, briefly: its socket may be full, and then the
/// connection just ends.
pub(crate) async fn cut_off<S>(sink: &mut S, reason: String)
where
    S: Sink<WsMessage> + Unpin,
{
    tracing::info!(%reason, "disconnecting a client that cannot keep up");
    let close = WsMessage::Close(Some(CloseFrame {
        code: CLOSE_TOO_SLOW,
        reason: reason.into(),
    }));
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(close)).await;
}
