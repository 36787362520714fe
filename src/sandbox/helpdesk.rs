//! The helpdesk's state: tickets, the queues between the pipeline's stages, and the hub that ties
//! them to the fault board, the mailboxes and the ground-truth log.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard},
};

use tokio::{sync::mpsc, time::Instant};

use super::{
    SandboxConfig,
    events::{EventLog, MessageEvents, Timestamp},
    faults::{FaultBoard, Stage},
    mailbox::Mailboxes,
};

/// A mail the MX accepted, waiting for the import workers.
#[derive(Debug)]
pub struct InboundMail {
    pub seq: u64,
    pub received: Instant,
    pub requester: String,
    pub subject: String,
    pub body: String,
    pub message_id: String,
}

/// A reply waiting for the outbound mailer.
#[derive(Debug)]
pub struct OutboundJob {
    pub kind: OutboundKind,
    pub seq: u64,
    pub ticket_id: u64,
    pub posted: Instant,
    pub to: String,
    pub subject: String,
    /// Message-ID of the mail the ticket came from, without angle brackets.
    pub in_reply_to: String,
    pub body: String,
}

/// What the outbound mailer sends: an agent's reply, or the acknowledgement of a new ticket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutboundKind {
    Reply,
    Acknowledgement,
}

#[derive(Clone, Debug)]
pub struct Reply {
    pub id: u64,
    pub body: String,
    pub created_at: Timestamp,
}

#[derive(Clone, Debug)]
pub struct Ticket {
    pub id: u64,
    pub seq: u64,
    pub subject: String,
    pub body: String,
    pub requester: String,
    pub message_id: String,
    pub created_at: Timestamp,
    pub archived: bool,
    pub trashed: bool,
    pub replies: Vec<Reply>,
}

impl Hub {
    /// The mail a ticket was made from, as a vendor that keeps the original hands it back
    /// (Help Scout's original source, Front's EML): its headers as imported and the body.
    pub fn original_source(&self, t: &Ticket) -> String {
        let to = self
            .config
            .support_addresses
            .first()
            .map_or("", |s| s.as_str());
        format!(
            "Message-ID: <{}>\r\nFrom: {}\r\nTo: {to}\r\nSubject: {}\r\nDate: {}\r\n\
             Content-Type: text/plain; charset=utf-8\r\n\r\n{}",
            t.message_id,
            t.requester,
            t.subject,
            t.created_at.0.to_rfc2822(),
            t.body.replace('\n', "\r\n"),
        )
    }
}

/// What a list or search returns besides the page itself.
pub struct Page {
    pub tickets: Vec<Ticket>,
    pub total: usize,
}

/// Why a ticket operation failed.
#[derive(Debug, PartialEq, Eq)]
pub enum TicketError {
    NotFound,
    /// `DELETE` of a ticket that is not in the trash.
    NotTrashed,
}

#[derive(Default)]
struct Tickets {
    next_id: u64,
    next_reply_id: u64,
    by_id: BTreeMap<u64, Ticket>,
}

/// The receiving ends of the pipeline's queues, handed to the workers once.
pub struct Queues {
    pub import: mpsc::UnboundedReceiver<InboundMail>,
    pub outbound: mpsc::UnboundedReceiver<OutboundJob>,
}

/// Shared state of one sandbox.
pub struct Hub {
    pub config: SandboxConfig,
    pub faults: FaultBoard,
    pub mailboxes: Arc<Mailboxes>,
    tickets: Mutex<Tickets>,
    events: Mutex<EventLog>,
    import_tx: mpsc::UnboundedSender<InboundMail>,
    outbound_tx: mpsc::UnboundedSender<OutboundJob>,
    /// The API requests of the current minute, for `rate_limit`: (window start, count).
    pub(crate) rate: Mutex<(Instant, u32)>,
}

/// Locks a mutex, ignoring poisoning: every critical section here leaves the data consistent
/// before anything that could panic, and a sandbox must keep serving.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The parts of an inbound mail a helpdesk keeps.
#[derive(Debug, Clone)]
pub struct ParsedMail {
    pub requester: String,
    pub subject: String,
    pub body: String,
    pub message_id: String,
}

impl ParsedMail {
    /// Parses what the MX received. Never fails: a mail without a From, Subject or Message-ID
    /// gets the envelope sender, an empty subject and a generated id, as a real helpdesk would.
    pub fn parse(raw: &[u8], envelope_from: &str, hostname: &str) -> Self {
        let parsed = mail_parser::MessageParser::default().parse(raw);
        let (mut requester, mut subject, mut body, mut message_id) =
            (String::new(), String::new(), String::new(), String::new());
        if let Some(m) = &parsed {
            if let Some(addr) = m.from().and_then(|f| f.first()).and_then(|a| a.address()) {
                requester = addr.to_string();
            }
            subject = m.subject().unwrap_or_default().to_string();
            body = m.body_text(0).map(|b| b.into_owned()).unwrap_or_default();
            message_id = m.message_id().unwrap_or_default().to_string();
        }
        if requester.is_empty() {
            requester = envelope_from.to_string();
        }
        if message_id.is_empty() {
            message_id = format!("sandbox-{}@{hostname}", uuid::Uuid::new_v4().simple());
        }
        Self {
            requester: requester.to_lowercase(),
            subject,
            body,
            message_id,
        }
    }
}

impl Hub {
    pub fn new(
        config: SandboxConfig,
        faults: FaultBoard,
        mailboxes: Arc<Mailboxes>,
    ) -> (Arc<Self>, Queues) {
        let (import_tx, import) = mpsc::unbounded_channel();
        let (outbound_tx, outbound) = mpsc::unbounded_channel();
        let events = Mutex::new(EventLog::new(config.event_capacity));
        let hub = Arc::new(Self {
            config,
            faults,
            mailboxes,
            tickets: Mutex::new(Tickets {
                next_id: 1,
                next_reply_id: 1,
                ..Tickets::default()
            }),
            events,
            import_tx,
            outbound_tx,
            rate: Mutex::new((Instant::now(), 0)),
        });
        (hub, Queues { import, outbound })
    }

    pub fn is_support_address(&self, rcpt: &str) -> bool {
        self.config
            .support_addresses
            .iter()
            .any(|a| a.eq_ignore_ascii_case(rcpt))
    }

    /// Records a mail the MX accepted; if `queue`, hands it to the import workers, else it was
    /// dropped by an inbound fault and the events say so.
    pub fn receive(&self, mail: ParsedMail, queue: bool) -> u64 {
        let seq = lock(&self.events).received(&mail.message_id, &mail.subject, &mail.requester);
        if !queue {
            lock(&self.events).dropped(seq, Stage::Inbound);
            return seq;
        }
        let job = InboundMail {
            seq,
            received: Instant::now(),
            requester: mail.requester,
            subject: mail.subject,
            body: mail.body,
            message_id: mail.message_id,
        };
        // The receiver lives as long as the import worker; after shutdown nothing is lost that
        // matters.
        let _ = self.import_tx.send(job);
        seq
    }

    pub fn record_dropped(&self, seq: u64, stage: Stage) {
        lock(&self.events).dropped(seq, stage);
    }

    pub fn record_failure(&self, seq: u64, stage: Stage) {
        lock(&self.events).update(seq, |e| match stage {
            Stage::Import => e.import_failures += 1,
            _ => e.outbound_failures += 1,
        });
    }

    /// The import worker's last step: the mail becomes a visible ticket.
    pub fn create_ticket(&self, mail: InboundMail) -> u64 {
        let now = Timestamp::now();
        let id = {
            let mut t = lock(&self.tickets);
            let id = t.next_id;
            t.next_id += 1;
            t.by_id.insert(
                id,
                Ticket {
                    id,
                    seq: mail.seq,
                    subject: mail.subject,
                    body: mail.body,
                    requester: mail.requester,
                    message_id: mail.message_id,
                    created_at: now,
                    archived: false,
                    trashed: false,
                    replies: Vec::new(),
                },
            );
            id
        };
        lock(&self.events).update(mail.seq, |e| {
            e.ticket_id = Some(id);
            e.ticket_created_at = Some(now);
        });
        if let Some(url) = &self.config.webhook_url
            && let Some(ticket) = self.get(id)
        {
            super::api::send_webhook(&self.config, url, &ticket);
        }
        if self.config.acknowledges() {
            let job = {
                let t = lock(&self.tickets);
                let ticket = &t.by_id[&id];
                let quoted: String = ticket.body.lines().map(|l| format!("> {l}\n")).collect();
                OutboundJob {
                    kind: OutboundKind::Acknowledgement,
                    seq: ticket.seq,
                    ticket_id: id,
                    posted: Instant::now(),
                    to: ticket.requester.clone(),
                    subject: format!("[Ticket #{id}] Received: {}", ticket.subject),
                    in_reply_to: ticket.message_id.clone(),
                    body: format!(
                        "Thank you for your message. A ticket has been opened for it (#{id}); \
                         we will be in touch.\n\nYou wrote:\n{quoted}"
                    ),
                }
            };
            let _ = self.outbound_tx.send(job);
        }
        id
    }

    /// Whether search endpoints see `t` yet: a ticket is hidden from them for `search_lag`
    /// after it was made, as a vendor's search index lags (list endpoints see it at once).
    pub fn searchable(&self, t: &Ticket) -> bool {
        let age = chrono::Utc::now().signed_duration_since(t.created_at.0);
        age.to_std().unwrap_or_default() >= self.config.search_lag
    }

    /// Tickets matching `keep`, newest first, one page of them.
    pub fn list(&self, keep: impl Fn(&Ticket) -> bool, page: usize, per_page: usize) -> Page {
        let t = lock(&self.tickets);
        let matching: Vec<&Ticket> = t.by_id.values().rev().filter(|t| keep(t)).collect();
        let total = matching.len();
        let tickets = matching
            .into_iter()
            .skip(page.saturating_sub(1) * per_page)
            .take(per_page)
            .cloned()
            .collect();
        Page { tickets, total }
    }

    pub fn get(&self, id: u64) -> Option<Ticket> {
        lock(&self.tickets).by_id.get(&id).cloned()
    }

    /// Adds an agent reply; unless `lose` (an `api=drop` fault), queues it for delivery.
    pub fn post_reply(&self, id: u64, body: String, lose: bool) -> Result<Reply, TicketError> {
        let now = Timestamp::now();
        let (reply, job) = {
            let mut t = lock(&self.tickets);
            let reply_id = t.next_reply_id;
            let ticket = t.by_id.get_mut(&id).ok_or(TicketError::NotFound)?;
            let reply = Reply {
                id: reply_id,
                body: body.clone(),
                created_at: now,
            };
            if !lose {
                ticket.replies.push(reply.clone());
            }
            let job = OutboundJob {
                kind: OutboundKind::Reply,
                seq: ticket.seq,
                ticket_id: id,
                posted: Instant::now(),
                to: ticket.requester.clone(),
                subject: ticket.subject.clone(),
                in_reply_to: ticket.message_id.clone(),
                body,
            };
            t.next_reply_id += 1;
            (reply, job)
        };
        if lose {
            lock(&self.events).dropped(job.seq, Stage::Api);
        } else {
            lock(&self.events).update(job.seq, |e| e.reply_posted_at = Some(now));
            let _ = self.outbound_tx.send(job);
        }
        Ok(reply)
    }

    pub fn set_archived(&self, id: u64, archived: bool) -> Result<(), TicketError> {
        let mut t = lock(&self.tickets);
        let ticket = t.by_id.get_mut(&id).ok_or(TicketError::NotFound)?;
        ticket.archived = archived;
        Ok(())
    }

    pub fn set_trashed(&self, id: u64, trashed: bool) -> Result<(), TicketError> {
        let mut t = lock(&self.tickets);
        let ticket = t.by_id.get_mut(&id).ok_or(TicketError::NotFound)?;
        ticket.trashed = trashed;
        Ok(())
    }

    /// Deletes a trashed ticket for good, freeing it.
    pub fn delete(&self, id: u64) -> Result<(), TicketError> {
        let mut t = lock(&self.tickets);
        match t.by_id.get(&id) {
            None => Err(TicketError::NotFound),
            Some(ticket) if !ticket.trashed => Err(TicketError::NotTrashed),
            Some(_) => {
                t.by_id.remove(&id);
                Ok(())
            }
        }
    }

    /// The outbound mailer's last step: the reply is in the requester's mailbox.
    /// The acknowledgement of ticket `seq` reached the requester's mailbox.
    pub fn acknowledged(&self, seq: u64) {
        let now = Timestamp::now();
        lock(&self.events).update(seq, |e| e.ack_delivered_at = Some(now));
    }

    pub fn delivered(&self, seq: u64, reply_message_id: &str) {
        let now = Timestamp::now();
        lock(&self.events).update(seq, |e| {
            e.delivered_at = Some(now);
            e.reply_message_id = Some(reply_message_id.to_string());
        });
    }

    pub fn events_since(&self, after: u64) -> Vec<MessageEvents> {
        lock(&self.events).since(after)
    }

    pub fn events_snapshot(&self) -> Vec<MessageEvents> {
        self.events_since(0)
    }
}
