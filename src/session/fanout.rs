//! Fan-out with replay. Every event of a session goes into one bounded buffer (events and
//! bytes); each subscriber is a cursor into it, woken when events arrive. Events every live
//! subscriber has taken are kept for replay up to [`ReplayLimits`]; events some subscriber has
//! not taken yet are kept up to [`UNREAD_ALLOWANCE`] times those limits, so a burst (one 20 MB
//! output, 10,000 small ones) never cuts off a client that keeps up. A subscriber that falls
//! further behind is told how many it lost (`Lagged`), never slows the kernel or other
//! subscribers, and memory stays bounded whatever the number or speed of subscribers. A client
//! that reconnects resumes from its last seen sequence number: it gets what it missed (if still
//! buffered), in order, exactly once, then live events.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::sync::Notify;

use super::events::{EventKind, InstallEvent, SessionEvent};

/// Why [`Subscriber::recv`] returned no event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecvError {
    /// This many events passed out of the buffer before the subscriber read them; the next
    /// `recv` returns the oldest event still buffered.
    #[error("fell behind by {0} events")]
    Lagged(u64),
    /// The session ended and every event was read.
    #[error("the session is closed")]
    Closed,
}

/// A subscription: what was missed since the client's last seen event, then the live stream.
pub struct Subscription {
    /// Buffered events after the client's last seen sequence number, oldest first.
    pub missed: Vec<Arc<SessionEvent>>,
    /// Events after the last seen one that were no longer buffered (the buffer overflowed).
    pub dropped: u64,
    /// Every event from now on.
    pub live: Subscriber,
    /// Sequence number of the last event before `live` begins (what `missed` ends with, or the
    /// session's latest event when nothing is replayed).
    pub last_seq: u64,
}

/// Bounds of the replay buffer.
#[derive(Debug, Clone, Copy)]
pub struct ReplayLimits {
    /// Most events kept.
    pub events: usize,
    /// Most bytes (estimated size of the events' content) kept besides the newest event, which
    /// is always kept.
    pub bytes: usize,
}

/// How many times the replay limits events a live subscriber has not taken yet may hold before
/// the slowest subscriber loses some (and is cut off by the API).
pub const UNREAD_ALLOWANCE: usize = 4;

struct Buffer {
    /// Events with consecutive sequence numbers, oldest first.
    events: VecDeque<(Arc<SessionEvent>, usize)>,
    bytes: usize,
    /// Sequence number of the last event published.
    last_seq: u64,
    closed: bool,
    /// Each live subscriber's next sequence number, by subscriber key.
    cursors: HashMap<u64, u64>,
    next_key: u64,
}

impl Buffer {
    /// Sequence number of the oldest buffered event (`last_seq + 1` when empty).
    fn first_seq(&self) -> u64 {
        self.events
            .front()
            .map_or(self.last_seq + 1, |(e, _)| e.seq)
    }
}

/// A session's event buffer, shared by its actor (publisher) and its handle (subscribers).
pub(crate) struct Fanout {
    buffer: Mutex<Buffer>,
    arrived: Notify,
    limits: ReplayLimits,
}

impl Fanout {
    /// A fan-out whose first event will be number `last_seq + 1`.
    pub(crate) fn new(limits: ReplayLimits, last_seq: u64) -> Self {
        Self {
            buffer: Mutex::new(Buffer {
                events: VecDeque::new(),
                bytes: 0,
                last_seq,
                closed: false,
                cursors: HashMap::new(),
                next_key: 0,
            }),
            arrived: Notify::new(),
            limits,
        }
    }

    /// Buffers `event` (dropping the oldest past the limits) and wakes the subscribers.
    pub(crate) fn publish(&self, event: Arc<SessionEvent>) {
        let size = estimated_size(&event);
        if let Ok(mut buffer) = self.buffer.lock() {
            buffer.last_seq = event.seq;
            buffer.bytes += size;
            buffer.events.push_back((event, size));
            let limits = self.limits;
            // Looked up only once the buffer is over its limits: not on every publish.
            let mut slowest = None;
            while buffer.events.len() > 1 {
                let (count, older_bytes) = (buffer.events.len(), buffer.bytes - size);
                if count <= limits.events.max(1) && older_bytes <= limits.bytes {
                    break;
                }
                let slowest = *slowest.get_or_insert_with(|| {
                    buffer.cursors.values().min().copied().unwrap_or(u64::MAX)
                });
                let unread = buffer.events.front().is_some_and(|(e, _)| e.seq >= slowest);
                let over_allowance = count > limits.events.max(1).saturating_mul(UNREAD_ALLOWANCE)
                    || older_bytes > limits.bytes.saturating_mul(UNREAD_ALLOWANCE);
                if unread && !over_allowance {
                    break;
                }
                match buffer.events.pop_front() {
                    Some((_, s)) => buffer.bytes -= s,
                    None => break,
                }
            }
        }
        self.arrived.notify_waiters();
    }

    /// Ends the stream: subscribers get what is buffered, then [`RecvError::Closed`].
    pub(crate) fn close(&self) {
        if let Ok(mut buffer) = self.buffer.lock() {
            buffer.closed = true;
        }
        self.arrived.notify_waiters();
    }

    /// Subscribes to live events and, when `since` is given, hands back the buffered events
    /// after that sequence number first. `since: None` replays nothing.
    pub(crate) fn subscribe(self: &Arc<Self>, since: Option<u64>) -> Subscription {
        let Ok(mut buffer) = self.buffer.lock() else {
            return Subscription {
                missed: Vec::new(),
                dropped: 0,
                live: Subscriber {
                    fanout: self.clone(),
                    next: u64::MAX,
                    key: None,
                },
                last_seq: 0,
            };
        };
        let (missed, dropped) = match since {
            None => (Vec::new(), 0),
            Some(since) => {
                let missed: Vec<Arc<SessionEvent>> = buffer
                    .events
                    .iter()
                    .filter(|(e, _)| e.seq > since)
                    .map(|(e, _)| e.clone())
                    .collect();
                let first_kept = missed.first().map_or(buffer.last_seq + 1, |e| e.seq);
                (missed, first_kept.saturating_sub(since + 1))
            }
        };
        let last_seq = buffer.last_seq;
        let key = buffer.next_key;
        buffer.next_key += 1;
        buffer.cursors.insert(key, last_seq + 1);
        drop(buffer);
        Subscription {
            missed,
            dropped,
            live: Subscriber {
                fanout: self.clone(),
                next: last_seq + 1,
                key: Some(key),
            },
            last_seq,
        }
    }

    /// Live subscribers now.
    pub(crate) fn subscribers(&self) -> usize {
        self.buffer.lock().map_or(0, |b| b.cursors.len())
    }

    /// Sequence number of the latest event.
    pub(crate) fn last_seq(&self) -> u64 {
        self.buffer.lock().map_or(0, |b| b.last_seq)
    }
}

/// One subscriber's place in a session's events.
pub struct Subscriber {
    fanout: Arc<Fanout>,
    /// Sequence number of the next event to hand out.
    next: u64,
    /// Where the buffer keeps this subscriber's cursor (`None`: never registered).
    key: Option<u64>,
}

impl Subscriber {
    /// The next event, waiting for it if need be. Cancel-safe.
    pub async fn recv(&mut self) -> Result<Arc<SessionEvent>, RecvError> {
        let fanout = self.fanout.clone();
        loop {
            let arrived = fanout.arrived.notified();
            tokio::pin!(arrived);
            // Registered before looking, so an event published in between still wakes us.
            arrived.as_mut().enable();
            if let Some(result) = self.try_recv() {
                return result;
            }
            arrived.await;
        }
    }

    /// The next event if one is there now (`None`: none yet), without waiting: for taking what
    /// else is ready after [`Subscriber::recv`].
    pub fn try_recv(&mut self) -> Option<Result<Arc<SessionEvent>, RecvError>> {
        let Ok(mut buffer) = self.fanout.buffer.lock() else {
            return Some(Err(RecvError::Closed));
        };
        let first = buffer.first_seq();
        if self.next < first {
            let lost = first - self.next;
            self.next = first;
            self.record(&mut buffer);
            return Some(Err(RecvError::Lagged(lost)));
        }
        if self.next > buffer.last_seq {
            return buffer.closed.then_some(Err(RecvError::Closed));
        }
        let index = usize::try_from(self.next - first).ok()?;
        let event = buffer.events.get(index).map(|(e, _)| e.clone())?;
        self.next += 1;
        self.record(&mut buffer);
        Some(Ok(event))
    }

    /// Tells the buffer how far this subscriber has read.
    fn record(&self, buffer: &mut Buffer) {
        if let Some(cursor) = self.key.and_then(|k| buffer.cursors.get_mut(&k)) {
            *cursor = self.next;
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let Some(key) = self.key else { return };
        if let Ok(mut buffer) = self.fanout.buffer.lock() {
            buffer.cursors.remove(&key);
        }
    }
}

/// A cheap estimate of an event's memory: its text plus what holding it costs (the event and,
/// for a kernel message, the message with its headers: about 1 KB for a small one), so that the
/// byte limit bounds memory for small events too.
fn estimated_size(event: &SessionEvent) -> usize {
    /// The shared event itself, with allocation overhead.
    const BASE: usize = 128;
    /// A kernel message: the `Message` (~500 bytes) and its allocations besides the text counted.
    const MESSAGE: usize = 640;
    match &event.kind {
        EventKind::Kernel { msg, .. } => {
            BASE + MESSAGE
                + header_size(&msg.header)
                + msg.parent_header.as_ref().map_or(0, header_size)
                + msg.content.len()
                + json_size(&msg.metadata)
                + msg.identities.iter().map(|b| b.len()).sum::<usize>()
                + msg.buffers.iter().map(|b| b.len()).sum::<usize>()
        }
        EventKind::Rejected { message } | EventKind::Limit { message, .. } => BASE + message.len(),
        EventKind::State { reason, .. } => BASE + reason.as_ref().map_or(0, String::len),
        EventKind::Install(install) => {
            BASE + match install {
                InstallEvent::Started { packages } => packages.iter().map(String::len).sum(),
                InstallEvent::Output { line } => line.len(),
                InstallEvent::Failed { message } => message.len(),
                InstallEvent::Done { error } => error.as_ref().map_or(0, String::len),
            }
        }
        EventKind::Accepted { .. } | EventKind::Done { .. } => BASE,
    }
}

/// The text a header holds.
fn header_size(header: &crate::kernel::Header) -> usize {
    header.msg_id.len()
        + header.session.len()
        + header.username.len()
        + header.date.len()
        + header.msg_type.len()
        + header.version.len()
        + header
            .extra
            .iter()
            .map(|(k, v)| k.len() + json_size(v))
            .sum::<usize>()
}

/// The approximate serialized size of `value`, without serializing it.
pub(crate) fn json_size(value: &Value) -> usize {
    match value {
        Value::String(s) => s.len() + 2,
        Value::Array(items) => 2 + items.iter().map(json_size).sum::<usize>(),
        Value::Object(map) => {
            2 + map
                .iter()
                .map(|(k, v)| k.len() + 4 + json_size(v))
                .sum::<usize>()
        }
        _ => 8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64) -> Arc<SessionEvent> {
        Arc::new(SessionEvent {
            seq,
            cell: None,
            kind: EventKind::Accepted { position: 0 },
        })
    }

    fn fanout(events: usize) -> Arc<Fanout> {
        Arc::new(Fanout::new(
            ReplayLimits {
                events,
                bytes: usize::MAX,
            },
            0,
        ))
    }

    fn now(sub: &mut Subscriber) -> Option<Result<u64, RecvError>> {
        sub.try_recv().map(|r| r.map(|e| e.seq))
    }

    #[test]
    fn a_resuming_subscriber_gets_exactly_what_it_missed_then_live_events() {
        let f = fanout(100);
        for seq in 1..=5 {
            f.publish(event(seq));
        }
        let mut sub = f.subscribe(Some(2));
        let seqs: Vec<u64> = sub.missed.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [3, 4, 5]);
        assert_eq!((sub.dropped, sub.last_seq), (0, 5));
        f.publish(event(6));
        assert_eq!(now(&mut sub.live), Some(Ok(6)));
        assert_eq!(now(&mut sub.live), None, "nothing doubled");
    }

    #[test]
    fn an_overflowing_buffer_says_how_much_was_dropped() {
        let f = fanout(3);
        for seq in 1..=10 {
            f.publish(event(seq));
        }
        let sub = f.subscribe(Some(2));
        let seqs: Vec<u64> = sub.missed.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [8, 9, 10]);
        assert_eq!(sub.dropped, 5, "events 3..=7 are gone");
    }

    #[test]
    fn a_subscriber_that_falls_behind_is_told_how_far_and_memory_stays_bounded() {
        let f = fanout(4);
        let mut sub = f.subscribe(None).live;
        let allowance = (4 * UNREAD_ALLOWANCE) as u64;
        for seq in 1..=allowance + 6 {
            f.publish(event(seq));
        }
        assert_eq!(now(&mut sub), Some(Err(RecvError::Lagged(6))));
        assert_eq!(now(&mut sub), Some(Ok(7)));
        let kept = f.buffer.lock().map(|b| b.events.len()).ok();
        assert_eq!(kept, Some(4 * UNREAD_ALLOWANCE));
    }

    #[test]
    fn unread_events_outlive_the_replay_limit_for_a_subscriber_that_keeps_up() {
        let f = fanout(4);
        let mut sub = f.subscribe(None).live;
        for seq in 1..=8 {
            f.publish(event(seq));
        }
        for seq in 1..=8 {
            assert_eq!(
                now(&mut sub),
                Some(Ok(seq)),
                "a burst twice the limit loses nothing"
            );
        }
        f.publish(event(9));
        let kept = f.buffer.lock().map(|b| b.events.len()).ok();
        assert_eq!(kept, Some(4), "read events fall back to the replay limit");
        drop(sub);
        for seq in 10..=30 {
            f.publish(event(seq));
        }
        let kept = f.buffer.lock().map(|b| b.events.len()).ok();
        assert_eq!(
            kept,
            Some(4),
            "with nobody reading, only the replay limit is kept"
        );
    }

    #[test]
    fn the_byte_bound_holds_and_a_big_event_pushes_out_nothing_unread() {
        let f = Arc::new(Fanout::new(
            ReplayLimits {
                events: 1000,
                bytes: 1000,
            },
            0,
        ));
        let mut sub = f.subscribe(None).live;
        f.publish(event(1));
        let big = Arc::new(SessionEvent {
            seq: 2,
            cell: None,
            kind: EventKind::Rejected {
                message: "x".repeat(5000),
            },
        });
        f.publish(big);
        assert_eq!(now(&mut sub), Some(Ok(1)), "the big event evicts nothing");
        assert_eq!(now(&mut sub), Some(Ok(2)), "the big event arrives");
        f.publish(event(3));
        let resumed = f.subscribe(Some(0));
        assert_eq!(
            resumed.dropped, 2,
            "events 1 and 2 can no longer be replayed"
        );
        assert_eq!(resumed.missed.len(), 1);
    }

    #[test]
    fn an_adopted_session_numbers_on_and_closing_ends_subscribers() {
        let f = Arc::new(Fanout::new(
            ReplayLimits {
                events: 10,
                bytes: usize::MAX,
            },
            500,
        ));
        let mut sub = f.subscribe(None).live;
        f.publish(event(501));
        assert_eq!(now(&mut sub), Some(Ok(501)));
        assert_eq!(f.subscribers(), 1);
        f.close();
        assert_eq!(now(&mut sub), Some(Err(RecvError::Closed)));
        drop(sub);
        assert_eq!(f.subscribers(), 0);
    }

    #[tokio::test]
    async fn recv_waits_for_the_next_event() {
        let f = fanout(10);
        let mut sub = f.subscribe(None).live;
        let publisher = f.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            publisher.publish(event(1));
        });
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), sub.recv()).await;
        assert_eq!(got.ok().and_then(Result::ok).map(|e| e.seq), Some(1));
    }
}
