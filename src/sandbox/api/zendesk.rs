//! Zendesk Support's dialect of the sandbox API (`/api/v2/…`, developer.zendesk.com; facts in
//! HELPDESKS.md section 1): as much of it as the prober's Zendesk adapter uses, with Zendesk's
//! JSON shapes, offset pagination, rate-limit headers and signed ticket-created webhooks. Not a
//! real account: the shapes are the documented ones.
//!
//! | method | path | |
//! |---|---|---|
//! | GET | `/api/v2/tickets.json` | `sort_by` (`created_at`, `id`, `updated_at`), `sort_order` (`asc`, `desc`), `page`, `per_page` (max 100); `next_page`/`previous_page` URLs, `count`; deleted tickets left out; sees a ticket at once |
//! | GET | `/api/v2/tickets/{id}.json` | one ticket (`{"ticket": …}`); 404 once deleted |
//! | PUT | `/api/v2/tickets/{id}.json` | `{"ticket":{"comment":{"body":…,"public":true},"status":…}}`: a public comment is mailed to the requester; an internal note (`public:false`) is accepted and never mailed (the sandbox keeps no notes); `solved`/`closed` archive, other statuses reopen |
//! | DELETE | `/api/v2/tickets/{id}.json` | soft delete → 204 |
//! | DELETE | `/api/v2/deleted_tickets/{id}.json` | a soft-deleted ticket for good → 200 with a `job_status`; 404 otherwise |
//! | GET | `/api/v2/tickets/{id}/comments.json` | the inbound mail (with `metadata.system.message_id`) and each public reply, oldest first |
//! | GET | `/api/v2/search.json` | `query=type:ticket "…"`: free text matched in subject and description, **only once the search lag has passed** |
//!
//! Authentication: `Authorization: Basic base64("{email}/token:{api_token}")` (any email) or
//! `Authorization: Bearer {api_token}`, with the sandbox's API token; else 401
//! `{"error":"Couldn't authenticate you"}`. Rate-limit headers `X-Rate-Limit` and
//! `X-Rate-Limit-Remaining`. The webhook is the event-subscribed `zen:event-type:ticket.created`
//! payload, signed as Zendesk signs: `X-Zendesk-Webhook-Signature` = base64(HMAC-SHA256(secret,
//! timestamp + body)), `X-Zendesk-Webhook-Signature-Timestamp` ISO 8601.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, Query, Request, State, rejection::JsonRejection},
    http::StatusCode,
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{delete, get},
};
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::sandbox::{
    faults::{Fault, Stage},
    helpdesk::{Hub, Ticket},
};

/// Zendesk: Basic `{email}/token:{token}` or Bearer; `X-Rate-Limit(-Remaining)`; signed
/// ticket-created webhooks. Its `/api/v2/` paths are Freshdesk's too.
pub const DIALECT: super::Dialect = super::Dialect {
    name: "zendesk",
    routes,
    prefixes: &["/api/v2/"],
    rate_headers: Some(("x-rate-limit", "x-rate-limit-remaining")),
    webhook: Some(webhook),
    conflicts: &["freshdesk"],
    // Zendesk's standard trigger "Notify requester and CCs of received request" (support.zendesk.com, "About the standard Support triggers").
    acknowledges: true,
};

/// The sandbox's account id, in webhooks.
const ACCOUNT_ID: u64 = 10_000_001;

pub fn routes(hub: Arc<Hub>) -> Router<Arc<Hub>> {
    Router::new()
        .route("/api/v2/tickets.json", get(list))
        .route(
            "/api/v2/tickets/{file}",
            get(show).put(update).delete(soft_delete),
        )
        .route("/api/v2/tickets/{id}/comments.json", get(comments))
        .route("/api/v2/deleted_tickets/{file}", delete(destroy))
        .route("/api/v2/search.json", get(search))
        .route_layer(middleware::from_fn_with_state(hub, require_token))
}

/// Basic `{email}/token:{token}` or Bearer `{token}` (an OAuth access token).
fn authorized(hub: &Hub, req: &Request) -> bool {
    let Some(value) = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    if let Some(bearer) = value.strip_prefix("Bearer ") {
        return bearer == hub.config.api_token;
    }
    let Some(basic) = value.strip_prefix("Basic ") else {
        return false;
    };
    let Some(pair) = base64::engine::general_purpose::STANDARD
        .decode(basic.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
    else {
        return false;
    };
    match pair.split_once(':') {
        Some((user, token)) => {
            user.strip_suffix("/token")
                .is_some_and(|email| email.contains('@'))
                && token == hub.config.api_token
        }
        None => false,
    }
}

async fn require_token(State(hub): State<Arc<Hub>>, req: Request, next: Next) -> Response {
    if authorized(&hub, &req) {
        next.run(req).await
    } else {
        (
            StatusCode::UNAUTHORIZED,
            Json(json!({ "error": "Couldn't authenticate you" })),
        )
            .into_response()
    }
}

fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({ "error": "RecordNotFound", "description": "Not found" })),
    )
        .into_response()
}

fn invalid(description: &str) -> Response {
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        Json(json!({ "error": "RecordInvalid", "description": description })),
    )
        .into_response()
}

fn bad_request(description: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({ "error": "InvalidPaginationParameter", "description": description })),
    )
        .into_response()
}

/// `{id}.json` of a path.
fn id_of(file: &str) -> Option<u64> {
    file.strip_suffix(".json")?.parse().ok()
}

fn stamp(t: &crate::sandbox::events::Timestamp) -> String {
    t.0.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn status(t: &Ticket) -> &'static str {
    match (t.archived, t.replies.is_empty()) {
        (true, _) => "solved",
        (_, true) => "new",
        _ => "open",
    }
}

fn ticket_json(t: &Ticket) -> Value {
    json!({
        "id": t.id,
        "url": format!("/api/v2/tickets/{}.json", t.id),
        "subject": t.subject,
        "raw_subject": t.subject,
        "description": t.body,
        "status": status(t),
        "type": null,
        "priority": null,
        "requester_id": requester_id(t),
        "created_at": stamp(&t.created_at),
        "updated_at": stamp(t.replies.last().map(|r| &r.created_at).unwrap_or(&t.created_at)),
        "via": {
            "channel": "email",
            "source": {
                "from": { "address": t.requester, "name": t.requester },
                "to": { "address": "support@helpdesk.test" },
                "rel": null,
            },
        },
    })
}

/// A stable user id for the requester (the sandbox has no users).
fn requester_id(t: &Ticket) -> u64 {
    t.requester.bytes().fold(1_000u64, |h, b| {
        h.wrapping_mul(31).wrapping_add(u64::from(b))
    }) % 1_000_000_000
}

#[derive(Deserialize)]
struct ListParams {
    sort_by: Option<String>,
    sort_order: Option<String>,
    page: Option<usize>,
    per_page: Option<usize>,
}

/// Offset pagination: `next_page`/`previous_page` as full URLs of the same query.
fn page_links(uri: &axum::http::Uri, page: usize, per_page: usize, total: usize) -> (Value, Value) {
    let link = |p: usize| {
        let rest: Vec<String> = uri
            .query()
            .unwrap_or_default()
            .split('&')
            .filter(|kv| !kv.is_empty() && !kv.starts_with("page="))
            .map(str::to_string)
            .chain(std::iter::once(format!("page={p}")))
            .collect();
        Value::String(format!("{}?{}", uri.path(), rest.join("&")))
    };
    let next = if page * per_page < total {
        link(page + 1)
    } else {
        Value::Null
    };
    let previous = if page > 1 {
        link(page - 1)
    } else {
        Value::Null
    };
    (next, previous)
}

async fn list(
    State(hub): State<Arc<Hub>>,
    uri: axum::http::Uri,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(p)) = params else {
        return bad_request("invalid query parameters");
    };
    let per_page = p.per_page.unwrap_or(100);
    if per_page == 0 || per_page > 100 {
        return bad_request("per_page must be between 1 and 100");
    }
    let page = p.page.unwrap_or(1).max(1);
    // Newest first is the hub's order (by id, which is creation order).
    let newest_first = match (p.sort_by.as_deref(), p.sort_order.as_deref()) {
        (None | Some("created_at" | "id" | "updated_at"), Some("desc")) => true,
        (None | Some("created_at" | "id" | "updated_at"), None | Some("asc")) => false,
        _ => return bad_request("sort_by or sort_order is not supported"),
    };
    let all = hub.list(|t| !t.trashed, 1, usize::MAX);
    let mut tickets = all.tickets;
    if !newest_first {
        tickets.reverse();
    }
    let shown: Vec<Value> = tickets
        .iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .map(ticket_json)
        .collect();
    let (next, previous) = page_links(&uri, page, per_page, all.total);
    Json(json!({
        "tickets": shown,
        "next_page": next,
        "previous_page": previous,
        "count": all.total,
    }))
    .into_response()
}

async fn show(State(hub): State<Arc<Hub>>, Path(file): Path<String>) -> Response {
    match id_of(&file).and_then(|id| hub.get(id)) {
        Some(t) if !t.trashed => Json(json!({ "ticket": ticket_json(&t) })).into_response(),
        _ => not_found(),
    }
}

#[derive(Deserialize)]
struct UpdateRequest {
    ticket: TicketUpdate,
}

#[derive(Deserialize)]
struct TicketUpdate {
    comment: Option<CommentIn>,
    status: Option<String>,
}

#[derive(Deserialize)]
struct CommentIn {
    body: Option<String>,
    html_body: Option<String>,
    /// Zendesk's default is public.
    public: Option<bool>,
}

async fn update(
    State(hub): State<Arc<Hub>>,
    Path(file): Path<String>,
    body: Result<Json<UpdateRequest>, JsonRejection>,
) -> Response {
    let Some(id) = id_of(&file) else {
        return not_found();
    };
    let Ok(Json(req)) = body else {
        return invalid("expected {\"ticket\": {…}}");
    };
    match hub.get(id) {
        Some(t) if !t.trashed => {}
        _ => return not_found(),
    }
    let lose = hub.faults.get(Stage::Api) == Fault::Drop;
    let archive = match req.ticket.status.as_deref() {
        None => None,
        Some("solved" | "closed") => Some(true),
        Some("new" | "open" | "pending" | "hold") => Some(false),
        Some(other) => return invalid(&format!("Status: {other:?} is not a valid status")),
    };
    if let Some(c) = req.ticket.comment {
        let Some(text) = c.body.or(c.html_body).filter(|b| !b.trim().is_empty()) else {
            return invalid("Comment: body is required");
        };
        // An internal note is never mailed; the sandbox keeps none.
        if c.public.unwrap_or(true) && hub.post_reply(id, text, lose).is_err() {
            return not_found();
        }
    }
    if let Some(a) = archive
        && !lose
        && hub.set_archived(id, a).is_err()
    {
        return not_found();
    }
    match hub.get(id) {
        Some(t) => {
            Json(json!({ "ticket": ticket_json(&t), "audit": { "ticket_id": id } })).into_response()
        }
        None => not_found(),
    }
}

async fn soft_delete(State(hub): State<Arc<Hub>>, Path(file): Path<String>) -> Response {
    let Some(id) = id_of(&file) else {
        return not_found();
    };
    match hub.get(id) {
        Some(t) if !t.trashed => {}
        _ => return not_found(),
    }
    if hub.faults.get(Stage::Api) != Fault::Drop && hub.set_trashed(id, true).is_err() {
        return not_found();
    }
    StatusCode::NO_CONTENT.into_response()
}

/// Deleting a soft-deleted ticket for good is a background job in Zendesk; here it is done
/// at once and the job reported complete.
async fn destroy(State(hub): State<Arc<Hub>>, Path(file): Path<String>) -> Response {
    let Some(id) = id_of(&file) else {
        return not_found();
    };
    match hub.get(id) {
        Some(t) if t.trashed => {}
        _ => return not_found(),
    }
    if hub.faults.get(Stage::Api) != Fault::Drop && hub.delete(id).is_err() {
        return not_found();
    }
    Json(json!({ "job_status": {
        "id": format!("sandbox-delete-{id}"),
        "status": "completed",
        "job_type": "TicketDeletionJob",
    }}))
    .into_response()
}

async fn comments(State(hub): State<Arc<Hub>>, Path(id): Path<u64>) -> Response {
    let Some(t) = hub.get(id).filter(|t| !t.trashed) else {
        return not_found();
    };
    let first = json!({
        "id": t.id * 1000,
        "type": "Comment",
        "body": t.body,
        "plain_body": t.body,
        "html_body": "",
        "public": true,
        "author_id": requester_id(&t),
        "created_at": stamp(&t.created_at),
        "via": { "channel": "email" },
        "metadata": { "system": { "message_id": format!("<{}>", t.message_id) } },
    });
    let replies = t.replies.iter().map(|r| {
        json!({
            "id": t.id * 1000 + r.id,
            "type": "Comment",
            "body": r.body,
            "plain_body": r.body,
            "html_body": "",
            "public": true,
            "author_id": 1,
            "created_at": stamp(&r.created_at),
            "via": { "channel": "api" },
            "metadata": { "system": {} },
        })
    });
    let all: Vec<Value> = std::iter::once(first).chain(replies).collect();
    Json(json!({
        "count": all.len(),
        "comments": all,
        "next_page": null,
        "previous_page": null,
    }))
    .into_response()
}

#[derive(Deserialize)]
struct SearchParams {
    query: Option<String>,
}

/// The free text of a search query: every term but `key:value` filters, quotes dropped.
fn free_text(query: &str) -> String {
    let mut out = Vec::new();
    let mut rest = query.trim();
    while !rest.is_empty() {
        if let Some(q) = rest.strip_prefix('"') {
            let (phrase, after) = q.split_once('"').unwrap_or((q, ""));
            out.push(phrase.to_string());
            rest = after.trim_start();
        } else {
            let (term, after) = rest.split_once(' ').unwrap_or((rest, ""));
            if !term.contains(':') {
                out.push(term.to_string());
            }
            rest = after.trim_start();
        }
    }
    out.join(" ").to_lowercase()
}

async fn search(
    State(hub): State<Arc<Hub>>,
    params: Result<Query<SearchParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Some(query) = params.ok().and_then(|Query(p)| p.query) else {
        return bad_request("query is required");
    };
    let needle = free_text(&query);
    let page = hub.list(
        |t| {
            !t.trashed
                && hub.searchable(t)
                && !needle.is_empty()
                && (t.subject.to_lowercase().contains(&needle)
                    || t.body.to_lowercase().contains(&needle))
        },
        1,
        100,
    );
    let results: Vec<Value> = page
        .tickets
        .iter()
        .map(|t| {
            let mut v = ticket_json(t);
            v["result_type"] = json!("ticket");
            v
        })
        .collect();
    Json(json!({
        "results": results,
        "count": page.total,
        "next_page": null,
        "previous_page": null,
    }))
    .into_response()
}

/// The event-subscribed ticket-created webhook, signed as Zendesk signs.
fn webhook(
    t: &Ticket,
    secret: &str,
    now: std::time::SystemTime,
) -> (Vec<u8>, Vec<(String, String)>) {
    let stamp_now = chrono::DateTime::<chrono::Utc>::from(now)
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let body = json!({
        "type": "zen:event-type:ticket.created",
        "account_id": ACCOUNT_ID,
        "id": uuid::Uuid::new_v4().to_string(),
        "time": stamp_now,
        "zendesk_event_version": "2022-11-06",
        "subject": format!("zen:ticket:{}", t.id),
        "detail": {
            "id": t.id.to_string(),
            "subject": t.subject,
            "description": t.body,
            "status": "NEW",
            "via": { "channel": "email" },
            "requester_id": requester_id(t).to_string(),
            "created_at": stamp(&t.created_at),
            "updated_at": stamp(&t.created_at),
        },
        "event": {},
    })
    .to_string()
    .into_bytes();
    (
        body.clone(),
        signed_headers(secret, &stamp_now, &body, t.id),
    )
}

/// Zendesk's webhook headers for `body` signed at `stamp`: base64(HMAC-SHA256(secret, stamp ||
/// body)), no separator.
pub(crate) fn signed_headers(
    secret: &str,
    stamp: &str,
    body: &[u8],
    ticket: u64,
) -> Vec<(String, String)> {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key");
    mac.update(stamp.as_bytes());
    mac.update(body);
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    vec![
        ("x-zendesk-webhook-signature".into(), signature),
        ("x-zendesk-webhook-signature-timestamp".into(), stamp.into()),
        ("x-zendesk-webhook-id".into(), "01SANDBOXWEBHOOK".into()),
        (
            "x-zendesk-webhook-invocation-id".into(),
            format!("{}{ticket}", uuid::Uuid::new_v4().simple()),
        ),
        ("x-zendesk-account-id".into(), ACCOUNT_ID.to_string()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_reads_the_free_text_of_a_query() {
        assert_eq!(free_text("type:ticket \"mc-AbC-1\""), "mc-abc-1");
        assert_eq!(free_text("type:ticket status:new canary"), "canary");
        assert_eq!(free_text("\"open"), "open");
    }

    #[test]
    fn webhooks_are_signed_as_zendesk_documents() {
        // Python: base64.b64encode(hmac.new(secret, stamp + body, sha256).digest())
        let h = signed_headers(
            "dGhpc19zZWNyZXRfaXNfZm9yX3Rlc3Rpbmdfb25seQ==",
            "2021-03-25T05:09:27Z",
            br#"{"type":"zen:event-type:ticket.created","detail":{"id":"1"}}"#,
            1,
        );
        assert_eq!(h[0].1, "59iIk3Z7H2woMHXazkN0ESvjfocBZQjZGNs48j4RIgU=");
        assert_eq!(h[1].1, "2021-03-25T05:09:27Z");
    }

    #[test]
    fn ids_come_from_json_file_names() {
        assert_eq!(id_of("35436.json"), Some(35436));
        assert_eq!(id_of("35436"), None);
    }
}
