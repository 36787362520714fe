//! The background jobs: import workers (mail → ticket) and the outbound mailer (reply → mailbox).
//!
//! Each queue has a single consumer, so work leaves in arrival order. A job is due at its
//! enqueue time plus a delay drawn from the configured range (plus a `delay:` fault), so a burst
//! of a thousand mails takes about one delay, not a thousand. The consumer re-reads the fault
//! board before every job: `stall` parks the whole queue (the backlog piles up, as in the seed's
//! outage) and clearing it drains the queue in order; `error` fails the job and retries it;
//! `drop` loses it and records where.

use std::{sync::Arc, time::Duration};

use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{
    DelayRange,
    faults::{Fault, Stage},
    helpdesk::{Hub, InboundMail, OutboundJob, OutboundKind},
};

/// How long a failed job waits before it is retried (an `error` fault).
const RETRY_AFTER: Duration = Duration::from_millis(500);

/// A unit of work in one of the queues.
trait Job {
    fn seq(&self) -> u64;
    fn enqueued(&self) -> Instant;
}

impl Job for InboundMail {
    fn seq(&self) -> u64 {
        self.seq
    }
    fn enqueued(&self) -> Instant {
        self.received
    }
}

impl Job for OutboundJob {
    fn seq(&self) -> u64 {
        self.seq
    }
    fn enqueued(&self) -> Instant {
        self.posted
    }
}

pub async fn run_import(
    hub: Arc<Hub>,
    rx: mpsc::UnboundedReceiver<InboundMail>,
    shutdown: CancellationToken,
) {
    let delay = hub.config.import_delay;
    // At most `import_rate` tickets a second (a worker pool's throughput), whatever the queue
    // holds.
    let gap = hub
        .config
        .import_rate
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(1.0 / r));
    run_queue(hub, rx, Stage::Import, delay, gap, shutdown, |hub, mail| {
        let seq = mail.seq;
        let id = hub.create_ticket(mail);
        debug!(seq, ticket = id, "imported");
    })
    .await
}

pub async fn run_outbound(
    hub: Arc<Hub>,
    rx: mpsc::UnboundedReceiver<OutboundJob>,
    shutdown: CancellationToken,
) {
    let delay = hub.config.outbound_delay;
    run_queue(hub, rx, Stage::Outbound, delay, None, shutdown, deliver).await
}

/// The single consumer of one queue. Returns on shutdown or when the queue closes. With a
/// `gap`, two jobs complete at least that far apart.
async fn run_queue<J: Job>(
    hub: Arc<Hub>,
    mut rx: mpsc::UnboundedReceiver<J>,
    stage: Stage,
    delay: DelayRange,
    gap: Option<Duration>,
    shutdown: CancellationToken,
    complete: impl Fn(&Hub, J),
) {
    let mut next_free = Instant::now();
    loop {
        let job = tokio::select! {
            _ = shutdown.cancelled() => return,
            job = rx.recv() => match job { Some(j) => j, None => return },
        };
        let base_due = job.enqueued() + delay.sample();
        loop {
            let fault = tokio::select! {
                _ = shutdown.cancelled() => return,
                f = hub.faults.wait_unstalled(stage) => f,
            };
            let extra = match fault {
                Fault::Delay(d) => d,
                _ => Duration::ZERO,
            };
            let due = base_due + extra;
            if Instant::now() < due {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep_until(due) => {}
                }
                // The fault may have changed while we slept: decide again.
                continue;
            }
            match fault {
                // Throttle and garbage are the api's only (refused when set elsewhere).
                Fault::Ok | Fault::Delay(_) | Fault::Stall | Fault::Throttle | Fault::Garbage => {
                    if let Some(gap) = gap {
                        if Instant::now() < next_free {
                            tokio::select! {
                                _ = shutdown.cancelled() => return,
                                _ = tokio::time::sleep_until(next_free) => {}
                            }
                        }
                        next_free = Instant::now() + gap;
                    }
                    complete(&hub, job);
                    break;
                }
                Fault::Drop => {
                    debug!(seq = job.seq(), %stage, "dropped by fault");
                    hub.record_dropped(job.seq(), stage);
                    break;
                }
                Fault::Error => {
                    debug!(seq = job.seq(), %stage, "job failed by fault; retrying");
                    hub.record_failure(job.seq(), stage);
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(RETRY_AFTER) => {}
                    }
                }
            }
        }
    }
}

/// Builds the reply mail and stores it in the requester's mailbox.
fn deliver(hub: &Hub, job: OutboundJob) {
    match build_reply(hub, &job) {
        Ok((raw, message_id)) => {
            let raw = stamp_trace(&hub.config.hostname, job.seq, raw);
            let uid = hub.mailboxes.deliver(&job.to, raw);
            match job.kind {
                OutboundKind::Reply => hub.delivered(job.seq, &message_id),
                OutboundKind::Acknowledgement => hub.acknowledged(job.seq),
            }
            debug!(
                seq = job.seq,
                ticket = job.ticket_id,
                uid,
                "reply delivered"
            );
        }
        Err(e) => {
            // Only an unusable requester address gets here (the helpdesk took any From):
            // a real mailer would bounce it, so the reply is lost and the events say so.
            warn!(seq = job.seq, ticket = job.ticket_id, error = %e, "reply undeliverable");
            hub.record_dropped(job.seq, Stage::Outbound);
        }
    }
}

/// The trace headers a real path writes, on top of the built mail: the helpdesk's outbound
/// hop into the mailbox provider's MX over TLS (`ESMTPS`, with the TLS version and cipher as
/// Postfix writes them with `smtpd_tls_received_header = yes`), the MX's `LMTP` hand-off to
/// the mailbox server, and the mailbox provider's `Authentication-Results` (authserv-id
/// `mx.<hostname>`: DKIM, SPF and DMARC pass). Simulated, so `mailcanary run` on the
/// embedded default shows hops and verdicts; both hops dated now.
fn stamp_trace(hostname: &str, seq: u64, raw: Vec<u8>) -> Vec<u8> {
    let date = chrono::Utc::now().to_rfc2822();
    let mut out = format!(
        "Authentication-Results: mx.{hostname}; dkim=pass header.d={hostname}; \
         spf=pass smtp.mailfrom={hostname}; dmarc=pass header.from={hostname}\r\n\
         Received: from mx.{hostname}\r\n\tby imap.{hostname} with LMTP id S{seq}; {date}\r\n\
         Received: from outbound.{hostname} (outbound.{hostname} [127.0.0.1])\r\n\
         \t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))\r\n\
         \tby mx.{hostname} (mailcanary sandbox) with ESMTPS id S{seq}; {date}\r\n"
    )
    .into_bytes();
    out.extend_from_slice(&raw);
    out
}

/// The reply as the helpdesk sends it: `Re:` subject, threading headers to the original.
fn build_reply(hub: &Hub, job: &OutboundJob) -> Result<(Vec<u8>, String), String> {
    use lettre::message::{Mailbox, Message, header::ContentType};
    let from: Mailbox = hub
        .config
        .support_addresses
        .first()
        .map(String::as_str)
        .unwrap_or("support@helpdesk.test")
        .parse()
        .map_err(|e| format!("support address: {e}"))?;
    let to: Mailbox = job
        .to
        .parse()
        .map_err(|e| format!("requester address: {e}"))?;
    let subject = if job.kind == OutboundKind::Acknowledgement
        || job.subject.to_ascii_lowercase().starts_with("re:")
    {
        job.subject.clone()
    } else {
        format!("Re: {}", job.subject)
    };
    let message_id = format!(
        "reply-{}-{}@{}",
        job.ticket_id,
        uuid::Uuid::new_v4().simple(),
        hub.config.hostname
    );
    let original = format!("<{}>", job.in_reply_to);
    let mut builder = Message::builder();
    if job.kind == OutboundKind::Acknowledgement {
        // RFC 3834: an automatic response, as RT and django-helpdesk mark theirs.
        builder = builder.header(AutoSubmitted);
    }
    let msg = builder
        .from(from)
        .to(to)
        .subject(subject)
        .date_now()
        .message_id(Some(format!("<{message_id}>")))
        .in_reply_to(original.clone())
        .references(original)
        .header(ContentType::TEXT_PLAIN)
        .body(job.body.clone())
        .map_err(|e| format!("building reply: {e}"))?;
    Ok((msg.formatted(), message_id))
}

/// `Auto-Submitted: auto-replied` (RFC 3834).
#[derive(Clone)]
struct AutoSubmitted;

impl lettre::message::header::Header for AutoSubmitted {
    fn name() -> lettre::message::header::HeaderName {
        lettre::message::header::HeaderName::new_from_ascii_str("Auto-Submitted")
    }

    fn parse(_: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(AutoSubmitted)
    }

    fn display(&self) -> lettre::message::header::HeaderValue {
        lettre::message::header::HeaderValue::new(Self::name(), "auto-replied".into())
    }
}
