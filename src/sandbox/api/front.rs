//! Front's dialect of the sandbox API (Front's Core API, as its OpenAPI spec documents it;
//! `HELPDESKS.md` section 4): conversations and messages over the neutral tickets, ids
//! `cnv_N` and `msg_…`, `_results` and `_pagination`, unix seconds, `Authorization: Bearer …`.
//!
//! | method | path | |
//! |---|---|---|
//! | GET | `/inboxes/{inbox_id}/conversations` | `limit` (max 100), `page_token`; by last activity, newest first; not trashed |
//! | GET | `/conversations/search/{query}` | phrases (`"…"`) and words in subject or body, filters (`inbox:`, …) ignored; hidden for `search_lag` |
//! | GET | `/conversations/{id}` | one conversation |
//! | PATCH | `/conversations/{id}` | `{"status": "archived" \| "open" \| "deleted"}` → 204 (`deleted` is the trash) |
//! | DELETE | `/conversations/{id}` | for good, only from the trash (400 otherwise) → 204 |
//! | GET | `/conversations/{id}/messages` | the inbound message and each reply, newest first |
//! | GET | `/messages/{id}` | the inbound message; its EML with `Accept: message/rfc822` |
//! | POST | `/conversations/{id}/messages` | a reply `{"body": …, "text": …, "options": {"archive": …}}` → 202, mailed to the contact; archives the conversation unless `options.archive` is `false` |
//!
//! The sandbox has one inbox, served under any inbox id. Every answer carries Front's
//! `x-ratelimit-limit` and `x-ratelimit-remaining` when a rate limit is set; a new
//! conversation is pushed as an application webhook (`inbound_received`), signed
//! base64(HMAC-SHA256(secret, timestamp ":" body)) with the timestamp in milliseconds.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, Query, Request, State, rejection::JsonRejection},
    http::{HeaderMap, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::sandbox::{
    events::Timestamp,
    faults::{Fault, Stage},
    helpdesk::{Hub, Ticket, TicketError},
};

/// Front: Bearer API token; `x-ratelimit-*` headers; application webhooks signed over
/// `timestamp:body`. Intercom's API also lives at `/conversations`: the two are never served
/// together.
pub const DIALECT: super::Dialect = super::Dialect {
    name: "front",
    routes,
    prefixes: &["/conversations", "/inboxes/"],
    rate_headers: Some(("x-ratelimit-limit", "x-ratelimit-remaining")),
    webhook: Some(webhook),
    conflicts: &["intercom"],
    // Front sends no acknowledgement unless a rule is made to (none by default).
    acknowledges: false,
};

/// The inbox the webhook names (any id is served).
const INBOX: &str = "inb_sandbox";

pub fn routes(hub: Arc<Hub>) -> Router<Arc<Hub>> {
    Router::new()
        .route("/inboxes/{inbox}/conversations", get(list))
        .route("/conversations/search/{query}", get(search))
        .route(
            "/conversations/{id}",
            get(show).patch(update).delete(delete),
        )
        .route("/conversations/{id}/messages", get(messages).post(reply))
        .route("/messages/{id}", get(message))
        .route_layer(middleware::from_fn_with_state(hub, require_token))
}

async fn require_token(State(hub): State<Arc<Hub>>, req: Request, next: Next) -> Response {
    if super::authorized(&hub, &req, "Bearer") {
        next.run(req).await
    } else {
        error(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "invalid API token",
        )
    }
}

/// Front's error body (its shape is not confirmed in the sources: `HELPDESKS.md` 4.7).
fn error(status: StatusCode, title: &str, message: &str) -> Response {
    (
        status,
        Json(json!({ "_error": {
            "status": status.as_u16(),
            "title": title,
            "message": message,
        }})),
    )
        .into_response()
}

fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "Not found", "conversation not found")
}

fn epoch(t: &Timestamp) -> f64 {
    t.0.timestamp_millis() as f64 / 1000.0
}

fn last_activity(t: &Ticket) -> &Timestamp {
    t.replies.last().map_or(&t.created_at, |r| &r.created_at)
}

fn conversation_id(t: &Ticket) -> String {
    format!("cnv_{}", t.id)
}

/// `cnv_N` to the ticket id.
fn ticket_id(id: &str) -> Option<u64> {
    id.strip_prefix("cnv_")?.parse().ok()
}

fn status(t: &Ticket) -> &'static str {
    if t.trashed {
        "deleted"
    } else if t.archived {
        "archived"
    } else {
        "unassigned"
    }
}

fn base(headers: &HeaderMap) -> String {
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    format!("http://{host}")
}

fn conversation_json(base: &str, t: &Ticket) -> Value {
    let id = conversation_id(t);
    json!({
        "_links": {
            "self": format!("{base}/conversations/{id}"),
            "related": { "messages": format!("{base}/conversations/{id}/messages") },
        },
        "id": id,
        "subject": t.subject,
        "status": status(t),
        "assignee": null,
        "recipient": { "handle": t.requester, "role": "from" },
        "tags": [],
        "links": [],
        "is_private": false,
        "created_at": epoch(&t.created_at),
    })
}

fn blurb(text: &str) -> String {
    text.chars().take(100).collect()
}

fn messages_json(hub: &Hub, base: &str, t: &Ticket) -> Vec<Value> {
    let support = hub
        .config
        .support_addresses
        .first()
        .cloned()
        .unwrap_or_default();
    let message = |id: String, inbound: bool, at: &Timestamp, body: &str| {
        let (from, to) = if inbound {
            (t.requester.as_str(), support.as_str())
        } else {
            (support.as_str(), t.requester.as_str())
        };
        json!({
            "_links": { "self": format!("{base}/messages/{id}") },
            "id": id,
            "type": "email",
            "is_inbound": inbound,
            "is_draft": false,
            "created_at": epoch(at),
            "subject": t.subject,
            "blurb": blurb(body),
            "body": body,
            "text": body,
            "recipients": [
                { "handle": from, "role": "from" },
                { "handle": to, "role": "to" },
            ],
            "attachments": [],
            "metadata": {},
        })
    };
    let mut out: Vec<Value> = t
        .replies
        .iter()
        .rev()
        .map(|r| message(format!("msg_r{}", r.id), false, &r.created_at, &r.body))
        .collect();
    out.push(message(
        format!("msg_c{}", t.id),
        true,
        &t.created_at,
        &t.body,
    ));
    out
}

#[derive(Deserialize)]
struct PageParams {
    limit: Option<usize>,
    page_token: Option<String>,
}

/// One page of `keep`'s conversations by last activity, newest first, Front-shaped; `next`
/// is `path` with the next `page_token`.
fn page(
    hub: &Hub,
    headers: &HeaderMap,
    path: &str,
    p: PageParams,
    keep: impl Fn(&Ticket) -> bool,
) -> Response {
    let limit = p.limit.unwrap_or(50).clamp(1, 100);
    let Ok(page) = p.page_token.as_deref().unwrap_or("1").parse::<usize>() else {
        return error(StatusCode::BAD_REQUEST, "Bad request", "invalid page_token");
    };
    let mut all = hub.list(keep, 1, usize::MAX).tickets;
    all.sort_by_key(|t| std::cmp::Reverse(last_activity(t).0));
    let total = all.len();
    let base = base(headers);
    let results: Vec<Value> = all
        .iter()
        .skip(page.saturating_sub(1) * limit)
        .take(limit)
        .map(|t| conversation_json(&base, t))
        .collect();
    let next = (page.max(1) * limit < total)
        .then(|| format!("{base}{path}?limit={limit}&page_token={}", page.max(1) + 1));
    Json(json!({
        "_pagination": { "next": next },
        "_links": { "self": format!("{base}{path}") },
        "_total": total,
        "_results": results,
    }))
    .into_response()
}

async fn list(
    State(hub): State<Arc<Hub>>,
    Path(inbox): Path<String>,
    headers: HeaderMap,
    params: Result<Query<PageParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(p)) = params else {
        return error(StatusCode::BAD_REQUEST, "Bad request", "invalid query");
    };
    let path = format!("/inboxes/{inbox}/conversations");
    page(&hub, &headers, &path, p, |t| !t.trashed)
}

/// The words and quoted phrases of a search query, lowercased, filters (`key:value`) left out.
fn needles(query: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = query.trim();
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('"') {
            let end = r.find('"').unwrap_or(r.len());
            out.push(r[..end].to_lowercase());
            rest = r.get(end + 1..).unwrap_or("").trim_start();
        } else {
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            let word = &rest[..end];
            if !word.contains(':') {
                out.push(word.to_lowercase());
            }
            rest = rest[end..].trim_start();
        }
    }
    out.retain(|n| !n.is_empty());
    out
}

async fn search(
    State(hub): State<Arc<Hub>>,
    Path(query): Path<String>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    params: Result<Query<PageParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(p)) = params else {
        return error(StatusCode::BAD_REQUEST, "Bad request", "invalid query");
    };
    let words = needles(&query);
    page(&hub, &headers, uri.path(), p, |t| {
        !t.trashed
            && hub.searchable(t)
            && words
                .iter()
                .all(|w| t.subject.to_lowercase().contains(w) || t.body.to_lowercase().contains(w))
    })
}

fn ticket(hub: &Hub, id: &str) -> Option<Ticket> {
    hub.get(ticket_id(id)?)
}

async fn show(State(hub): State<Arc<Hub>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    match ticket(&hub, &id) {
        Some(t) => Json(conversation_json(&base(&headers), &t)).into_response(),
        None => not_found(),
    }
}

async fn messages(
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(t) = ticket(&hub, &id) else {
        return not_found();
    };
    let base = base(&headers);
    Json(json!({
        "_pagination": { "next": null },
        "_links": { "self": format!("{base}/conversations/{id}/messages") },
        "_results": messages_json(&hub, &base, &t),
    }))
    .into_response()
}

/// One message: JSON, or with `Accept: message/rfc822` the inbound mail as EML (Front's
/// `get-message`; only the inbound message here, replies are Front's own).
async fn message(
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(t) = id
        .strip_prefix("msg_c")
        .and_then(|n| n.parse::<u64>().ok())
        .and_then(|n| hub.get(n))
    else {
        return not_found();
    };
    let eml = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("message/rfc822"));
    if eml {
        return (
            [(axum::http::header::CONTENT_TYPE, "message/rfc822")],
            hub.original_source(&t),
        )
            .into_response();
    }
    let base = base(&headers);
    match messages_json(&hub, &base, &t).pop() {
        Some(m) => Json(m).into_response(),
        None => not_found(),
    }
}

#[derive(Deserialize)]
struct ReplyRequest {
    body: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    options: ReplyOptions,
}

#[derive(Deserialize)]
struct ReplyOptions {
    /// Front's default: the conversation is archived when the reply is sent.
    #[serde(default = "yes")]
    archive: bool,
}

impl Default for ReplyOptions {
    fn default() -> Self {
        ReplyOptions { archive: true }
    }
}

fn yes() -> bool {
    true
}

fn ticket_error(e: TicketError) -> Response {
    match e {
        TicketError::NotFound => not_found(),
        TicketError::NotTrashed => error(
            StatusCode::BAD_REQUEST,
            "Bad request",
            "only a conversation in the trash can be deleted",
        ),
    }
}

async fn reply(
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
    body: Result<Json<ReplyRequest>, JsonRejection>,
) -> Response {
    let req = match body {
        Ok(Json(r)) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "Bad request",
                &format!("invalid reply: {}", e.body_text()),
            );
        }
    };
    let Some(tid) = ticket_id(&id) else {
        return not_found();
    };
    let lose = hub.faults.get(Stage::Api) == Fault::Drop;
    let text = req.text.unwrap_or(req.body);
    match hub.post_reply(tid, text, lose) {
        Ok(r) => {
            if req.options.archive && !lose {
                let _ = hub.set_archived(tid, true);
            }
            (
                StatusCode::ACCEPTED,
                Json(json!({ "status": "accepted", "message_uid": format!("r{}", r.id) })),
            )
                .into_response()
        }
        Err(e) => ticket_error(e),
    }
}

#[derive(Deserialize)]
struct UpdateRequest {
    status: Option<String>,
}

async fn update(
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
    body: Result<Json<UpdateRequest>, JsonRejection>,
) -> Response {
    let Ok(Json(req)) = body else {
        return error(StatusCode::BAD_REQUEST, "Bad request", "invalid JSON body");
    };
    let Some(tid) = ticket_id(&id) else {
        return not_found();
    };
    let change: fn(&Hub, u64) -> Result<(), TicketError> = match req.status.as_deref() {
        Some("archived") => |h, id| h.set_archived(id, true),
        Some("open") => |h, id| {
            h.set_trashed(id, false)?;
            h.set_archived(id, false)
        },
        Some("deleted") => |h, id| h.set_trashed(id, true),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "Bad request",
                "status must be archived, open or deleted here (the sandbox has no spam)",
            );
        }
    };
    if hub.faults.get(Stage::Api) == Fault::Drop {
        return StatusCode::NO_CONTENT.into_response();
    }
    match change(&hub, tid) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => ticket_error(e),
    }
}

async fn delete(State(hub): State<Arc<Hub>>, Path(id): Path<String>) -> Response {
    let Some(tid) = ticket_id(&id) else {
        return not_found();
    };
    if hub.faults.get(Stage::Api) == Fault::Drop {
        return StatusCode::NO_CONTENT.into_response();
    }
    match hub.delete(tid) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => ticket_error(e),
    }
}

/// The application webhook of an `inbound_received` event for the new conversation: a
/// preview of the event (the conversation and the message's subject and blurb), signed as
/// Front signs application webhooks.
fn webhook(
    t: &Ticket,
    secret: &str,
    now: std::time::SystemTime,
) -> (Vec<u8>, Vec<(String, String)>) {
    use crate::edges::helpdesk::webhook::{b64, hmac_sha256};
    let id = conversation_id(t);
    let body = json!({
        "type": "inbound_received",
        "authorization": { "id": "cmp_sandbox" },
        "payload": {
            "_links": { "self": format!("/events/evt_{}", t.id) },
            "id": format!("evt_{}", t.id),
            "type": "inbound",
            "emitted_at": epoch(&t.created_at),
            "conversation": {
                "_links": { "self": format!("/conversations/{id}") },
                "id": id,
                "subject": t.subject,
                "status": status(t),
            },
            "source": { "_meta": { "type": "inboxes" }, "data": [{ "id": INBOX }] },
            "target": {
                "_meta": { "type": "message" },
                "data": {
                    "_links": { "self": format!("/messages/msg_c{}", t.id) },
                    "id": format!("msg_c{}", t.id),
                    "type": "email",
                    "is_inbound": true,
                    "subject": t.subject,
                    "blurb": blurb(&t.body),
                },
            },
        },
    })
    .to_string()
    .into_bytes();
    let ms = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
        .to_string();
    let signature = b64(&hmac_sha256(
        secret.as_bytes(),
        &[ms.as_bytes(), b":", &body],
    ));
    (
        body,
        vec![
            ("x-front-signature".into(), signature),
            ("x-front-request-timestamp".into(), ms),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_queries_split_into_phrases_and_words_without_filters() {
        assert_eq!(
            needles(r#""mc-abc-1" inbox:inb_x Hello  "two words""#),
            vec!["mc-abc-1", "hello", "two words"]
        );
        assert!(needles("inbox:inb_x is:open").is_empty());
        assert_eq!(needles(r#""unterminated"#), vec!["unterminated"]);
    }

    #[test]
    fn conversation_ids_round_trip() {
        assert_eq!(ticket_id("cnv_42"), Some(42));
        assert_eq!(ticket_id("42"), None);
        assert_eq!(ticket_id("cnv_x"), None);
    }
}
