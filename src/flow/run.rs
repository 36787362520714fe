//! One canary's run over the edges: submit, then (helpdesk probes) find the ticket and post the
//! reply. Delivery is observed by the mailbox dispatcher, not here.
//!
//! Every observation goes through [`Engine::update`]; this module only drives the edges and
//! retries. A run ends when its part is done or the canary finished (failed, lost) meanwhile.

use std::{sync::Arc, time::Duration};

use tracing::{debug, warn};

use super::{
    Probe,
    engine::{Engine, now_ms},
};
use crate::{
    canary::{
        Token,
        life::{Canary, Reason, Stage},
        message::{self, CanaryMail},
    },
    config::ReplyMode,
    edges::helpdesk::TicketRef,
};

/// Sends a new canary for `probe`'s mailbox number `mailbox` and drives it as far as this
/// process can.
pub async fn start_canary(engine: Arc<Engine>, probe: Arc<Probe>, mailbox: usize) {
    let Some(m) = probe.mailboxes.get(mailbox) else {
        return;
    };
    // Not before its watchers look: they would never see what arrived before they did.
    m.watchers_ready().await;
    let created = now_ms();
    let sent_at = std::time::UNIX_EPOCH + Duration::from_millis(created);
    let token = Token::issue(&probe.key, &probe.name, sent_at);
    let mail = CanaryMail {
        probe: probe.name.clone(),
        token: token.clone(),
        from: m.from.clone(),
        to: m.to.clone(),
        sent_at,
        hostname: probe.hostname.clone(),
    };
    let message = mail.build();
    let mut canary = Canary::new(
        &probe.name,
        token.id(),
        token.as_str(),
        &message::message_id(&token, &probe.hostname),
        probe.plan.clone(),
        engine.limits_for(
            &probe.name,
            Some(&m.name),
            &probe.limits,
            probe.auto.as_ref(),
        ),
        created,
    );
    canary.mailbox = Some(m.name.clone());
    let id = canary.id.clone();
    // Written before DATA is sent: a crash from here on leaves a canary to resume, not a
    // canary nobody knows about.
    // The engine counts a canary it could not record (skipped, and a submit failure with
    // reason `ledger`); the ledger writer logs the episode once.
    if let Err(e) = engine.begin(canary).await {
        debug!(probe = %probe.name, error = %e, "cannot record the canary; not sending it");
        return;
    }
    match probe.submitter.submit(&message).await {
        Ok(_) => {
            engine.update(&probe.name, &id, |c| c.observe(Stage::Submit, now_ms()));
        }
        Err(e) => {
            let detail = e.to_string();
            engine.update(&probe.name, &id, |c| c.fail(e.reason(), &detail, now_ms()));
            return;
        }
    }
    drive(engine, probe, id).await;
}

/// Continues a canary from whatever stage it is in (a fresh one after submit, or one resumed
/// from the ledger after a restart).
pub async fn drive(engine: Arc<Engine>, probe: Arc<Probe>, id: String) {
    let Some(helpdesk) = probe.helpdesk.clone() else {
        return; // mail loop: only delivery is left, and the dispatcher sees it.
    };
    let poll = probe.poll_interval;
    // A reply POST of this run failed in a way that may have taken effect (a timeout, a 5xx
    // other than 503): it is never sent again unless the vendor says the reply is not there.
    let mut reply_maybe_posted = false;
    // Woken early when something else (a webhook, the dispatcher) changes or names this
    // canary: its own bell, so another canary's event does not wake this run.
    let bell = engine.bell(&probe.name, &id);
    loop {
        let Some(c) = engine.get(&probe.name, &id) else {
            return; // finished meanwhile (lost, or delivered early and completed)
        };
        let result = match c.current() {
            Some(Stage::Import) => {
                let since = std::time::UNIX_EPOCH
                    + Duration::from_millis(c.created_ms.saturating_sub(60_000));
                match helpdesk.find_ticket(&c.token, since).await {
                    Ok(Some(t)) => {
                        let c = engine.update(&probe.name, &id, |c| {
                            c.ticket_id = Some(t.id.clone());
                            c.observe(Stage::Import, now_ms())
                        });
                        if helpdesk.says_message_id()
                            && let Some(c) = &c
                        {
                            // Beside the canary, not in its way: the reply is not held back
                            // for it, and the ticket is cleaned up only after the delivery.
                            tokio::spawn(check_message_id(
                                engine.clone(),
                                probe.clone(),
                                c.clone(),
                                t,
                            ));
                        }
                        clean_up_if_finished(&probe, c);
                        continue;
                    }
                    Ok(None) => Ok(()),
                    Err(e) => Err((e.reason(), e.to_string())),
                }
            }
            Some(Stage::Reply) if probe.reply == ReplyMode::Post => {
                let ticket = TicketRef {
                    id: c.ticket_id.clone().unwrap_or_default(),
                    created_at: None,
                };
                let token = Token::parse(&c.token).ok();
                let mark = token.as_ref().map(|t| probe.key.reply_mark(t));
                let body = match (&token, &mark, &probe.reply_body) {
                    (Some(t), Some(m), Some(text)) => message::custom_reply_body(text, t, m),
                    (Some(t), Some(m), None) => message::reply_body(t, m),
                    // Our own token always parses; keep the canary recognisable regardless.
                    _ => c.token.clone(),
                };
                // Look before posting: an earlier POST (this run's, or one before a restart)
                // may have failed with the reply kept (django-helpdesk: 500, reply saved).
                let already = match &mark {
                    Some(m) => helpdesk.reply_posted(&ticket, m).await,
                    None => Ok(None),
                };
                let posted = match already {
                    Ok(Some(true)) => {
                        debug!(probe = %probe.name, canary = %id, "the reply is on the ticket already; not posting it again");
                        Ok(())
                    }
                    // This vendor cannot tell, and the last POST may have taken effect: never
                    // a second reply. If it was posted, its arrival ends the reply stage (see
                    // Engine::delivered); if not, the reply deadline says so.
                    Ok(None) if reply_maybe_posted => Err((
                        Reason::Api,
                        "the last reply POST may have taken effect and the helpdesk cannot say; not posting again".to_string(),
                    )),
                    Ok(_) => helpdesk.post_reply(&ticket, &body).await.map_err(|e| {
                        reply_maybe_posted |= e.maybe_applied();
                        (e.reason(), e.to_string())
                    }),
                    Err(e) => Err((e.reason(), e.to_string())),
                };
                match posted {
                    Ok(()) => {
                        let c =
                            engine.update(&probe.name, &id, |c| c.observe(Stage::Reply, now_ms()));
                        clean_up_if_finished(&probe, c);
                        continue;
                    }
                    Err(e) => Err(e),
                }
            }
            // Delivery (or nothing) left: the dispatcher takes it from here.
            _ => return,
        };
        if let Some(left) = helpdesk.rate_limit_remaining() {
            engine.metrics().set_rate_limit_remaining(&probe.name, left);
        }
        if let Err((reason, detail)) = result {
            debug!(probe = %probe.name, canary = %id, %reason, %detail, "helpdesk call failed; retrying");
            engine.update(&probe.name, &id, |c| {
                c.note_error(reason, &detail, now_ms())
            });
        }
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            _ = bell.rung() => {}
        }
    }
}

/// Asks the helpdesk which mail it made the canary's ticket from, and records whether that
/// is the canary (`Canary::message_id_matched`, `mailcanary_import_message_id_total`). A
/// failed question is only logged: the import is already proven by the token.
async fn check_message_id(engine: Arc<Engine>, probe: Arc<Probe>, c: Canary, ticket: TicketRef) {
    let Some(helpdesk) = &probe.helpdesk else {
        return;
    };
    let seen = match helpdesk.inbound_message_id(&ticket).await {
        Ok(seen) => seen,
        Err(e) => {
            debug!(probe = %probe.name, canary = %c.id, error = %e, "could not ask the helpdesk for the ticket's Message-ID");
            return;
        }
    };
    let (result, matched) =
        crate::edges::helpdesk::message_id_verdict(seen.as_deref(), &c.message_id);
    engine.metrics().message_id(&probe.name, result);
    if matched == Some(false) {
        warn!(probe = %probe.name, canary = %c.id, ticket = %ticket.id, seen = seen.as_deref().unwrap_or_default(), sent = %c.message_id, "the ticket carries the canary's token but was made from another mail (its Message-ID is not the canary's)");
    }
    if matched.is_some() {
        engine.update(&probe.name, &c.id, |c| {
            c.message_id_matched = matched;
            Vec::new()
        });
    }
}

/// A stage ended here and an early delivery completed the canary with it: nobody else will
/// see it finish, so its clean-up starts here.
fn clean_up_if_finished(probe: &Arc<Probe>, c: Option<Canary>) {
    if let Some(c) = c.filter(Canary::is_finished) {
        super::clean_up(probe, &c);
    }
}

/// Prepares a canary found in the ledger at start-up; true if a run should drive it on.
pub fn resume(engine: &Arc<Engine>, c: &Canary) -> bool {
    if c.current() == Some(Stage::Submit) {
        // The process died between writing the canary and hearing the server's answer to
        // DATA: whether the mail was accepted is unknown. Keep watching for it rather than
        // guess a duration or call it failed; if it was refused, a deadline says so.
        engine.update(&c.probe, &c.id, |c| c.skip_unknown());
    }
    true
}
