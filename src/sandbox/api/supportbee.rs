//! SupportBee's dialect of the sandbox API (<https://developers.supportbee.com>): its routes,
//! its JSON shapes, `auth_token` in the query. The tickets are the neutral core's (`Hub`).

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, Query, Request, State, rejection::JsonRejection},
    http::StatusCode,
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error;
use crate::sandbox::{
    events::Timestamp,
    faults::{Fault, Stage},
    helpdesk::{Hub, Ticket, TicketError},
};

/// SupportBee: `auth_token` in the query; no rate-limit headers documented; a ticket-created
/// webhook of `{"ticket": …}` with the bearer secret (SupportBee's web hooks carry no
/// signature).
pub const DIALECT: super::Dialect = super::Dialect {
    name: "supportbee",
    routes,
    prefixes: &["/tickets"],
    rate_headers: None,
    webhook: Some(webhook),
    conflicts: &[],
    // SupportBee documents no acknowledgement that is on by default.
    acknowledges: false,
};

fn webhook(
    t: &Ticket,
    secret: &str,
    _now: std::time::SystemTime,
) -> (Vec<u8>, Vec<(String, String)>) {
    let body = json!({ "ticket": ticket_json(t) }).to_string().into_bytes();
    (
        body,
        vec![("authorization".into(), format!("Bearer {secret}"))],
    )
}

/// Every SupportBee route, behind its token check.
pub fn routes(hub: Arc<Hub>) -> Router<Arc<Hub>> {
    Router::new()
        .route("/tickets", get(list_tickets))
        .route("/tickets/search", get(search_tickets))
        .route("/tickets/{id}", get(show_ticket).delete(delete_ticket))
        .route("/tickets/{id}/replies", get(list_replies).post(post_reply))
        .route("/tickets/{id}/archive", post(archive).delete(unarchive))
        .route("/tickets/{id}/trash", post(trash).delete(untrash))
        .route_layer(middleware::from_fn_with_state(hub, require_token))
}

#[derive(Deserialize)]
struct TokenParam {
    auth_token: Option<String>,
}

async fn require_token(State(hub): State<Arc<Hub>>, req: Request, next: Next) -> Response {
    let given = Query::<TokenParam>::try_from_uri(req.uri())
        .ok()
        .and_then(|Query(p)| p.auth_token);
    if given.as_deref() == Some(hub.config.api_token.as_str()) {
        next.run(req).await
    } else {
        error(StatusCode::UNAUTHORIZED, "missing or invalid auth_token")
    }
}

fn ticket_json(t: &Ticket) -> Value {
    json!({
        "id": t.id,
        "subject": t.subject,
        "created_at": t.created_at,
        "last_activity_at": t.replies.last().map(|r| r.created_at).unwrap_or(t.created_at),
        "archived": t.archived,
        "trash": t.trashed,
        "replies_count": t.replies.len(),
        "requester": { "email": t.requester, "name": t.requester },
        "content": { "body": t.body, "text": t.body, "html": "" },
        "message_id": t.message_id,
    })
}

#[derive(Deserialize)]
struct ListParams {
    since: Option<String>,
    requester_emails: Option<String>,
    archived: Option<String>,
    trash: Option<bool>,
    page: Option<usize>,
    per_page: Option<usize>,
}

fn page_json(tickets: Vec<Ticket>, total: usize, page: usize, per_page: usize) -> Response {
    Json(json!({
        "total": total,
        "current_page": page,
        "per_page": per_page,
        "total_pages": total.div_ceil(per_page),
        "tickets": tickets.iter().map(ticket_json).collect::<Vec<_>>(),
    }))
    .into_response()
}

fn paging(page: Option<usize>, per_page: Option<usize>) -> (usize, usize) {
    (
        page.unwrap_or(1).max(1),
        per_page.unwrap_or(15).clamp(1, 100),
    )
}

async fn list_tickets(
    State(hub): State<Arc<Hub>>,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(p)) = params else {
        return error(StatusCode::BAD_REQUEST, "invalid query parameters");
    };
    let since = match p.since.as_deref().map(DateTime::parse_from_rfc3339) {
        None => None,
        Some(Ok(t)) => Some(Timestamp(t.with_timezone(&Utc))),
        Some(Err(_)) => return error(StatusCode::BAD_REQUEST, "since must be RFC 3339"),
    };
    let emails: Option<Vec<String>> = p.requester_emails.as_deref().map(|s| {
        s.split(',')
            .map(|e| e.trim().to_lowercase())
            .filter(|e| !e.is_empty())
            .collect()
    });
    // SupportBee: archived=true|false|any (default false); trash=true|false (default false).
    let archived = match p.archived.as_deref() {
        None | Some("false") => Some(false),
        Some("true") => Some(true),
        Some("any") => None,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "archived must be true, false or any",
            );
        }
    };
    let trash = p.trash.unwrap_or(false);
    let (page, per_page) = paging(p.page, p.per_page);
    let result = hub.list(
        |t| {
            t.trashed == trash
                && archived.is_none_or(|a| t.archived == a)
                && since.is_none_or(|s| t.created_at >= s)
                && emails.as_ref().is_none_or(|es| es.contains(&t.requester))
        },
        page,
        per_page,
    );
    page_json(result.tickets, result.total, page, per_page)
}

#[derive(Deserialize)]
struct SearchParams {
    query: Option<String>,
    page: Option<usize>,
    per_page: Option<usize>,
}

async fn search_tickets(
    State(hub): State<Arc<Hub>>,
    params: Result<Query<SearchParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(p)) = params else {
        return error(StatusCode::BAD_REQUEST, "invalid query parameters");
    };
    let Some(query) = p.query.filter(|q| !q.trim().is_empty()) else {
        return error(StatusCode::BAD_REQUEST, "query is required");
    };
    let needle = query.to_lowercase();
    let (page, per_page) = paging(p.page, p.per_page);
    let result = hub.list(
        |t| {
            !t.trashed
                && hub.searchable(t)
                && (t.subject.to_lowercase().contains(&needle)
                    || t.body.to_lowercase().contains(&needle))
        },
        page,
        per_page,
    );
    page_json(result.tickets, result.total, page, per_page)
}

fn ticket_error(e: TicketError) -> Response {
    match e {
        TicketError::NotFound => error(StatusCode::NOT_FOUND, "ticket not found"),
        TicketError::NotTrashed => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "only a trashed ticket can be deleted",
        ),
    }
}

async fn show_ticket(State(hub): State<Arc<Hub>>, Path(id): Path<u64>) -> Response {
    match hub.get(id) {
        Some(t) => Json(json!({ "ticket": ticket_json(&t) })).into_response(),
        None => ticket_error(TicketError::NotFound),
    }
}

#[derive(Deserialize)]
struct ReplyRequest {
    reply: ReplyBody,
}
#[derive(Deserialize)]
struct ReplyBody {
    content_attributes: ReplyContent,
}
#[derive(Deserialize)]
struct ReplyContent {
    body: String,
}

async fn post_reply(
    State(hub): State<Arc<Hub>>,
    Path(id): Path<u64>,
    body: Result<Json<ReplyRequest>, JsonRejection>,
) -> Response {
    let req = match body {
        Ok(Json(r)) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("invalid reply: {}", e.body_text()),
            );
        }
    };
    let lose = hub.faults.get(Stage::Api) == Fault::Drop;
    match hub.post_reply(id, req.reply.content_attributes.body, lose) {
        Ok(r) => (
            StatusCode::CREATED,
            Json(json!({ "reply": {
                "id": r.id,
                "created_at": r.created_at,
                "ticket": id,
                "content": { "body": r.body, "text": r.body, "html": "" },
            }})),
        )
            .into_response(),
        Err(e) => ticket_error(e),
    }
}

async fn list_replies(State(hub): State<Arc<Hub>>, Path(id): Path<u64>) -> Response {
    match hub.get(id) {
        Some(t) => Json(json!({
            "replies": t.replies.iter().map(|r| json!({
                "id": r.id,
                "created_at": r.created_at,
                "content": { "body": r.body, "text": r.body, "html": "" },
            })).collect::<Vec<_>>(),
        }))
        .into_response(),
        None => ticket_error(TicketError::NotFound),
    }
}

/// Archive/trash changes, skipped (but answered 204) under `api=drop`.
fn flag_change(hub: &Hub, f: impl FnOnce(&Hub) -> Result<(), TicketError>) -> Response {
    if hub.faults.get(Stage::Api) == Fault::Drop {
        return StatusCode::NO_CONTENT.into_response();
    }
    match f(hub) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => ticket_error(e),
    }
}

async fn archive(State(hub): State<Arc<Hub>>, Path(id): Path<u64>) -> Response {
    flag_change(&hub, |h| h.set_archived(id, true))
}
async fn unarchive(State(hub): State<Arc<Hub>>, Path(id): Path<u64>) -> Response {
    flag_change(&hub, |h| h.set_archived(id, false))
}
async fn trash(State(hub): State<Arc<Hub>>, Path(id): Path<u64>) -> Response {
    flag_change(&hub, |h| h.set_trashed(id, true))
}
async fn untrash(State(hub): State<Arc<Hub>>, Path(id): Path<u64>) -> Response {
    flag_change(&hub, |h| h.set_trashed(id, false))
}
async fn delete_ticket(State(hub): State<Arc<Hub>>, Path(id): Path<u64>) -> Response {
    flag_change(&hub, |h| h.delete(id))
}
