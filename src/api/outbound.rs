//! How both WebSocket fronts send: frames that are ready together go out together (one flush,
//! usually one write), and a client that cannot keep up is cut off (close code 4008 with a
//! reason saying how to resume) rather than let anything wait for it. A client is too slow when
//! it falls behind its session's event buffer, or when a batch of frames has waited
//! [`SLOW_CLIENT`] for it to read.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message as WsMessage};
use futures::{Sink, SinkExt};
use tokio::sync::mpsc;

use super::metrics::{Relay, frame_len};
use crate::session::{RecvError, SessionEvent, Subscriber};

/// Close code for a client cut off because it fell behind (an application code: 4000–4999).
pub const CLOSE_TOO_SLOW: u16 = 4008;

/// How long one frame may wait for a client to read before the client is cut off.
pub const SLOW_CLIENT: Duration = Duration::from_secs(10);

/// Most frames sent with one flush.
pub const BATCH_FRAMES: usize = 64;

/// Most bytes of frames sent with one flush (more are sent with the next).
pub const BATCH_BYTES: usize = 1 << 20;

/// Frames ready for a client, sent with one flush.
#[derive(Default)]
struct Batch {
    frames: Vec<WsMessage>,
    bytes: usize,
}

impl Batch {
    /// Adds a frame.
    fn push(&mut self, frame: WsMessage) {
        self.bytes += frame_len(&frame);
        self.frames.push(frame);
    }

    /// Whether it holds as much as one flush should send.
    fn is_full(&self) -> bool {
        self.frames.len() >= BATCH_FRAMES || self.bytes >= BATCH_BYTES
    }

    /// Whether it holds nothing.
    fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
}

/// How a batch of frames for a client fared.
enum Sent {
    /// The client took it.
    Delivered,
    /// The connection is gone.
    Gone,
    /// The client did not take it in time and was cut off.
    CutOff,
}

/// Sends the frames of `batch` in order with one flush, cutting the client off (with `reason`,
/// made only then) when it does not take them within [`SLOW_CLIENT`]; counts what was delivered
/// on `relay`.
async fn send_or_cut_off<S>(
    sink: &mut S,
    relay: &Relay,
    batch: Batch,
    reason: impl FnOnce() -> String,
) -> Sent
where
    S: Sink<WsMessage> + Unpin,
{
    let Batch { frames, bytes } = batch;
    let send = async {
        for frame in frames {
            sink.feed(frame).await?;
        }
        sink.flush().await
    };
    match tokio::time::timeout(SLOW_CLIENT, send).await {
        Ok(Ok(())) => {
            relay.sent(bytes);
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

/// How a front turns what it sends into frames, and tells a client how to resume.
pub(crate) struct Outbound<R, E, D, H> {
    /// The frame of a reply meant for this client alone.
    pub reply: R,
    /// The frame of a session event for this client, if it gets one.
    pub event: E,
    /// Called with each event's sequence number once the client has it (or had nothing to get).
    pub delivered: D,
    /// How to resume, given the last event the client has: the end of a cut-off reason.
    pub resume: H,
}

/// Sends a client its replies and the session's events until either ends or the client is cut
/// off. What is ready together is rendered and sent together with one flush; `last_seq` is the
/// last event the client already has.
pub(crate) async fn pump<S, T, R, E, D, H>(
    sink: &mut S,
    relay: &Relay,
    replies: &mut mpsc::Receiver<T>,
    events: &mut Subscriber,
    mut last_seq: u64,
    front: Outbound<R, E, D, H>,
) where
    S: Sink<WsMessage> + Unpin,
    R: Fn(T) -> WsMessage,
    E: Fn(&SessionEvent) -> Option<WsMessage>,
    D: Fn(u64),
    H: Fn(u64) -> String,
{
    loop {
        let mut batch = Batch::default();
        let mut seq = None;
        let mut ended = None;
        let mut take = |event: std::sync::Arc<SessionEvent>, batch: &mut Batch| {
            seq = Some(event.seq);
            if let Some(frame) = (front.event)(&event) {
                batch.push(frame);
            }
        };
        tokio::select! {
            reply = replies.recv() => match reply {
                Some(reply) => batch.push((front.reply)(reply)),
                None => break,
            },
            event = events.recv() => match event {
                Ok(event) => take(event, &mut batch),
                Err(e) => ended = Some(e),
            },
        }
        // Whatever else is ready goes out with the same flush.
        while ended.is_none() && !batch.is_full() {
            match events.try_recv() {
                None => break,
                Some(Ok(event)) => take(event, &mut batch),
                Some(Err(e)) => ended = Some(e),
            }
        }
        if !batch.is_empty() {
            let reason = || format!("too slow: not reading; {}", (front.resume)(last_seq));
            match send_or_cut_off(sink, relay, batch, reason).await {
                Sent::Delivered => {}
                Sent::Gone => break,
                Sent::CutOff => return,
            }
        }
        if let Some(seq) = seq {
            last_seq = seq;
            (front.delivered)(seq);
        }
        match ended {
            None => {}
            Some(RecvError::Lagged(missed)) => {
                let reason = format!(
                    "too slow: {missed} events behind; {}",
                    (front.resume)(last_seq)
                );
                cut_off(sink, reason).await;
                return;
            }
            Some(RecvError::Closed) => break,
        }
    }
    let _ = sink.close().await;
}
