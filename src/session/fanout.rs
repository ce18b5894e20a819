//! Fan-out with replay: every event of a session goes to the live subscribers (a bounded
//! broadcast channel that never waits on them) and into a bounded replay buffer, so a client
//! that reconnects after missing events gets them back, in order, exactly once.
//!
//! Publishing and subscribing take the same lock, so a subscriber's replayed events and its live
//! ones meet without a gap and without a duplicate.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::sync::broadcast;

use super::events::{EventKind, InstallEvent, SessionEvent};

/// A subscription: what was missed since the client's last seen event, then the live stream.
pub struct Subscription {
    /// Buffered events after the client's last seen sequence number, oldest first.
    pub missed: Vec<Arc<SessionEvent>>,
    /// Events after the last seen one that were no longer buffered (the buffer overflowed).
    pub dropped: u64,
    /// Every event from now on.
    pub live: broadcast::Receiver<Arc<SessionEvent>>,
    /// Sequence number of the last event before `live` begins (what `missed` ends with, or the
    /// session's latest event when nothing is replayed).
    pub last_seq: u64,
}

/// Bounds of the replay buffer.
#[derive(Debug, Clone, Copy)]
pub struct ReplayLimits {
    /// Most events kept.
    pub events: usize,
    /// Most bytes (estimated size of the events' content) kept.
    pub bytes: usize,
}

struct Buffer {
    events: VecDeque<(Arc<SessionEvent>, usize)>,
    bytes: usize,
    /// Sequence number of the last event published.
    last_seq: u64,
}

/// A session's event fan-out and replay buffer, shared by its actor (publisher) and its handle
/// (subscribers).
pub(crate) struct Fanout {
    buffer: Mutex<Buffer>,
    live: broadcast::Sender<Arc<SessionEvent>>,
    limits: ReplayLimits,
}

impl Fanout {
    /// A fan-out whose live subscribers may lag `capacity` events.
    pub(crate) fn new(capacity: usize, limits: ReplayLimits) -> Self {
        let (live, _) = broadcast::channel(capacity.max(1));
        Self {
            buffer: Mutex::new(Buffer {
                events: VecDeque::new(),
                bytes: 0,
                last_seq: 0,
            }),
            live,
            limits,
        }
    }

    /// Buffers `event` and sends it to every live subscriber.
    pub(crate) fn publish(&self, event: Arc<SessionEvent>) {
        let size = estimated_size(&event);
        let Ok(mut buffer) = self.buffer.lock() else {
            let _ = self.live.send(event);
            return;
        };
        buffer.last_seq = event.seq;
        if self.limits.events == 0 || size > self.limits.bytes {
            // Not replayable: nothing before it may be replayed either (a resume would skip it
            // silently), so the buffer restarts after it and resumes count it as dropped.
            buffer.events.clear();
            buffer.bytes = 0;
        } else {
            buffer.bytes += size;
            buffer.events.push_back((event.clone(), size));
            while buffer.events.len() > self.limits.events || buffer.bytes > self.limits.bytes {
                match buffer.events.pop_front() {
                    Some((_, s)) => buffer.bytes -= s,
                    None => break,
                }
            }
        }
        let _ = self.live.send(event);
    }

    /// Subscribes to live events and, when `since` is given, replays the buffered events after
    /// that sequence number first. `since: None` replays nothing.
    pub(crate) fn subscribe(&self, since: Option<u64>) -> Subscription {
        let Ok(buffer) = self.buffer.lock() else {
            return Subscription {
                missed: Vec::new(),
                dropped: 0,
                live: self.live.subscribe(),
                last_seq: 0,
            };
        };
        let live = self.live.subscribe();
        let Some(since) = since else {
            return Subscription {
                missed: Vec::new(),
                dropped: 0,
                live,
                last_seq: buffer.last_seq,
            };
        };
        let missed: Vec<Arc<SessionEvent>> = buffer
            .events
            .iter()
            .filter(|(e, _)| e.seq > since)
            .map(|(e, _)| e.clone())
            .collect();
        let first_kept = missed.first().map_or(buffer.last_seq + 1, |e| e.seq);
        let dropped = first_kept.saturating_sub(since + 1);
        Subscription {
            missed,
            dropped,
            live,
            last_seq: buffer.last_seq,
        }
    }

    /// Live subscribers now.
    pub(crate) fn subscribers(&self) -> usize {
        self.live.receiver_count()
    }

    /// Sequence number of the latest event.
    pub(crate) fn last_seq(&self) -> u64 {
        self.buffer.lock().map_or(0, |b| b.last_seq)
    }
}

/// A cheap estimate of an event's memory: the text in its kernel message plus a per-node cost.
fn estimated_size(event: &SessionEvent) -> usize {
    const BASE: usize = 128;
    match &event.kind {
        EventKind::Kernel { msg, .. } => {
            BASE + json_size(&msg.content)
                + json_size(&msg.metadata)
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

fn json_size(value: &Value) -> usize {
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

    fn fanout(events: usize) -> Fanout {
        Fanout::new(
            16,
            ReplayLimits {
                events,
                bytes: usize::MAX,
            },
        )
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
        assert_eq!(sub.dropped, 0);
        f.publish(event(6));
        assert_eq!(sub.live.try_recv().map(|e| e.seq).ok(), Some(6));
        assert!(sub.live.try_recv().is_err(), "nothing doubled");
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
    fn the_byte_bound_holds() {
        let f = Fanout::new(
            16,
            ReplayLimits {
                events: 1000,
                bytes: 3 * 128,
            },
        );
        for seq in 1..=10 {
            f.publish(event(seq));
        }
        assert_eq!(f.subscribe(Some(0)).missed.len(), 3);
    }

    #[test]
    fn an_event_too_big_to_buffer_counts_as_dropped() {
        let f = Fanout::new(
            16,
            ReplayLimits {
                events: 1000,
                bytes: 1000,
            },
        );
        f.publish(event(1));
        let big = Arc::new(SessionEvent {
            seq: 2,
            cell: None,
            kind: EventKind::Rejected {
                message: "x".repeat(5000),
            },
        });
        f.publish(big);
        f.publish(event(3));
        let sub = f.subscribe(Some(0));
        let seqs: Vec<u64> = sub.missed.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [3]);
        assert_eq!(sub.dropped, 2, "events 1 and 2 cannot be replayed");
    }

    #[test]
    fn an_up_to_date_or_new_subscriber_gets_no_replay() {
        let f = fanout(100);
        for seq in 1..=4 {
            f.publish(event(seq));
        }
        let sub = f.subscribe(Some(4));
        assert!(sub.missed.is_empty());
        assert_eq!(sub.dropped, 0);
        assert!(f.subscribe(None).missed.is_empty());
    }
}
