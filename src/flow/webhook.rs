//! Ticket-created webhooks: a helpdesk pushes the new ticket, and the canary's run asks the
//! helpdesk's API at once instead of at the next poll. A webhook only hints: the import stage
//! ends when the API shows the ticket, so a forged or premature webhook cannot end it, and a
//! lost one costs nothing (polling goes on regardless).
//!
//! A vendor's webhook is account-wide: the one configured for this probe may carry the token
//! of a sibling probe on the same helpdesk. Such a token is that probe's, not a forgery: its
//! canary is hinted the same way, as mailbox recognition classifies tokens against every
//! probe.

use std::sync::Arc;

use serde_json::Value;

use super::{Engine, Probe};
use crate::{
    canary::{Token, find_tokens},
    metrics::Ignored,
};

/// What a webhook delivery did.
#[derive(Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Matched {
    /// Canaries of this probe waiting for their import, whose runs now look for the ticket.
    pub hinted: usize,
    /// Canaries of other probes (an account-wide webhook) hinted the same way.
    pub siblings: usize,
    /// Tokens no probe signed (counted as forged on the probe the webhook came for).
    pub forged: usize,
}

/// Every string in a JSON document, depth first (the ticket's subject and body are somewhere
/// in it; helpdesks differ on where).
fn strings<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::String(s) => out.push(s),
        Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        Value::Object(o) => o.values().for_each(|x| strings(x, out)),
        _ => {}
    }
}

/// The distinct well-formed tokens in the strings of `payload`, in order. Deduplicated by the
/// whole token, not its id: a forgery of a real canary's id must not hide the real token met
/// after it.
fn tokens(payload: &Value) -> Vec<Token> {
    let mut texts = Vec::new();
    strings(payload, &mut texts);
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for text in texts {
        for t in find_tokens(text) {
            if seen.insert(t.to_string())
                && let Ok(token) = Token::parse(t)
            {
                out.push(token);
            }
        }
    }
    out
}

/// For the fuzz target (`fuzz/`): the payload path of [`ticket_created`] without an engine:
/// JSON, its tokens, and how many of them `key` signed for `probe`.
#[doc(hidden)]
pub fn payload_tokens(body: &[u8], key: &crate::canary::Key, probe: &str) -> usize {
    match serde_json::from_slice::<Value>(body) {
        Ok(payload) => tokens(&payload)
            .iter()
            .filter(|t| t.verify(key, probe))
            .count(),
        Err(_) => 0,
    }
}

/// Applies one authentic webhook payload sent for `probe`, classifying each token against
/// every probe of this prober (`all`).
pub fn ticket_created(
    engine: &Engine,
    all: &[Arc<Probe>],
    probe: &Arc<Probe>,
    payload: &Value,
) -> Matched {
    let mut matched = Matched::default();
    for token in tokens(payload) {
        let owner = std::iter::once(probe)
            .chain(all.iter())
            .find(|p| token.verify(&p.key, &p.name));
        match owner {
            None => {
                engine.ignored(&probe.name, Ignored::Forged);
                matched.forged += 1;
            }
            Some(p) => {
                if engine.hint(&p.name, token.id()) {
                    if p.name == probe.name {
                        matched.hinted += 1;
                    } else {
                        matched.siblings += 1;
                    }
                }
            }
        }
    }
    matched
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_strings_anywhere() {
        let v: Value = serde_json::json!({
            "ticket": {"id": 42, "subject": "a", "content": {"body": "b"}, "tags": ["c"]}
        });
        let mut out = Vec::new();
        strings(&v, &mut out);
        out.sort();
        assert_eq!(out, vec!["a", "b", "c"]);
    }
}
