//! Ground truth: what really happened to each message, so measured latencies can be checked.
//!
//! The log is capped (oldest evicted first) so a sandbox running for days stays flat in memory.

use std::collections::VecDeque;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Serialize, Serializer};

use super::faults::Stage;

/// A wall-clock instant, serialized as RFC 3339 with milliseconds (`2026-11-23T20:30:00.123Z`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub DateTime<Utc>);

impl Timestamp {
    pub fn now() -> Self {
        Self(Utc::now())
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_rfc3339_opts(SecondsFormat::Millis, true))
    }
}

/// Where a fault lost a message.
#[derive(Clone, Debug, Serialize)]
pub struct Dropped {
    pub stage: Stage,
    pub at: Timestamp,
}

/// The life of one inbound message, keyed by the sandbox's own id (`seq`).
#[derive(Clone, Debug, Serialize)]
pub struct MessageEvents {
    pub seq: u64,
    /// The Message-ID header of the inbound mail, without angle brackets.
    pub message_id: String,
    pub subject: String,
    pub requester: String,
    pub received_at: Timestamp,
    pub ticket_id: Option<u64>,
    pub ticket_created_at: Option<Timestamp>,
    pub reply_posted_at: Option<Timestamp>,
    pub delivered_at: Option<Timestamp>,
    /// When the acknowledgement of the new ticket reached the mailbox (`--auto-ack`).
    pub ack_delivered_at: Option<Timestamp>,
    /// Message-ID of the delivered reply.
    pub reply_message_id: Option<String>,
    pub dropped: Option<Dropped>,
    /// Failed attempts of the import job (an `import=error` fault makes it retry).
    pub import_failures: u32,
    /// Failed attempts of the outbound job.
    pub outbound_failures: u32,
}

/// The capped log.
pub struct EventLog {
    capacity: usize,
    next_seq: u64,
    entries: VecDeque<MessageEvents>,
}

impl EventLog {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            next_seq: 1,
            entries: VecDeque::new(),
        }
    }

    /// Records a received message and returns its sequence number.
    pub fn received(&mut self, message_id: &str, subject: &str, requester: &str) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.entries.len() == self.capacity {
            self.entries.pop_front();
        }
        self.entries.push_back(MessageEvents {
            seq,
            message_id: message_id.to_string(),
            subject: subject.to_string(),
            requester: requester.to_string(),
            received_at: Timestamp::now(),
            ticket_id: None,
            ticket_created_at: None,
            reply_posted_at: None,
            delivered_at: None,
            ack_delivered_at: None,
            reply_message_id: None,
            dropped: None,
            import_failures: 0,
            outbound_failures: 0,
        });
        seq
    }

    /// Applies `f` to the entry of `seq`, if it is still in the log. Entries are in `seq` order
    /// with no gaps, so this is an index computation, not a search.
    pub fn update(&mut self, seq: u64, f: impl FnOnce(&mut MessageEvents)) {
        let Some(first) = self.entries.front().map(|e| e.seq) else {
            return;
        };
        if let Some(idx) = seq.checked_sub(first)
            && let Some(entry) = self.entries.get_mut(idx as usize)
        {
            f(entry);
        }
    }

    pub fn dropped(&mut self, seq: u64, stage: Stage) {
        self.update(seq, |e| {
            e.dropped = Some(Dropped {
                stage,
                at: Timestamp::now(),
            })
        });
    }

    /// Entries with `seq > after`, oldest first.
    pub fn since(&self, after: u64) -> Vec<MessageEvents> {
        self.entries
            .iter()
            .filter(|e| e.seq > after)
            .cloned()
            .collect()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capped_and_updatable() {
        let mut log = EventLog::new(3);
        for i in 0..5 {
            log.received(&format!("m{i}"), "s", "r@x");
        }
        assert_eq!(log.len(), 3);
        log.update(1, |e| e.ticket_id = Some(9)); // evicted: no effect, no panic
        log.update(4, |e| e.ticket_id = Some(4));
        let all = log.since(0);
        assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!(all[1].ticket_id, Some(4));
        assert_eq!(log.since(4).len(), 1);
    }
}
