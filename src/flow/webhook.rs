//! Ticket-created webhooks: a helpdesk pushes the new ticket, and the import stage ends at
//! once instead of at the next poll. Polling goes on regardless (a webhook can be lost), and
//! whichever sees the ticket first ends the stage; the other then finds nothing to do.

use std::sync::Arc;

use serde_json::Value;

use super::{Engine, Probe, now_ms};
use crate::{
    canary::{Token, find_tokens, life::Stage},
    metrics::Ignored,
};

/// What a webhook delivery did.
#[derive(Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Matched {
    /// Canaries of this probe whose import stage it ended.
    pub imported: usize,
    /// Tokens that failed authentication (counted as forged).
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

/// The ticket id, where SupportBee-like payloads put it (`ticket.id`, or `id`).
fn ticket_id(v: &Value) -> Option<String> {
    let id = v
        .get("ticket")
        .and_then(|t| t.get("id"))
        .or_else(|| v.get("id"))?;
    match id {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Applies one webhook payload to `probe`'s canaries.
pub fn ticket_created(engine: &Engine, probe: &Arc<Probe>, payload: &Value) -> Matched {
    let mut texts = Vec::new();
    strings(payload, &mut texts);
    let mut seen = std::collections::HashSet::new();
    let mut matched = Matched::default();
    let id = ticket_id(payload);
    for text in texts {
        for t in find_tokens(text) {
            let Ok(token) = Token::parse(t) else { continue };
            if !seen.insert(token.id().to_string()) {
                continue;
            }
            if !token.verify(&probe.key, &probe.name) {
                engine.ignored(&probe.name, Ignored::Forged);
                matched.forged += 1;
                continue;
            }
            let now = now_ms();
            let mut applied = false;
            let c = engine.update(&probe.name, token.id(), |c| {
                if c.current() != Some(Stage::Import) {
                    return Vec::new(); // already imported (by a poll or an earlier webhook)
                }
                applied = true;
                c.ticket_id = id.clone();
                c.observe(Stage::Import, now)
            });
            // An auto-reply seen before the import ends the canary here.
            if let Some(c) = c.filter(|c| applied && c.is_finished()) {
                super::clean_up(probe, &c);
            }
            matched.imported += usize::from(applied);
        }
    }
    matched
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_strings_and_ids_anywhere() {
        let v: Value = serde_json::json!({
            "ticket": {"id": 42, "subject": "a", "content": {"body": "b"}, "tags": ["c"]}
        });
        let mut out = Vec::new();
        strings(&v, &mut out);
        out.sort();
        assert_eq!(out, vec!["a", "b", "c"]);
        assert_eq!(ticket_id(&v).as_deref(), Some("42"));
        assert_eq!(
            ticket_id(&serde_json::json!({"id": "x7"})).as_deref(),
            Some("x7")
        );
        assert_eq!(ticket_id(&serde_json::json!({"nope": 1})), None);
    }
}
