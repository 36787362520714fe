//! Freshdesk's API v2 dialect of the sandbox API (`/api/v2/…`, developers.freshdesk.com/api/;
//! `/work/shared/HELPDESKS.md` section 2), as much of it as the prober's Freshdesk adapter uses,
//! in Freshdesk's documented shapes: HTTP basic auth with the API key as the user (any
//! password), bare JSON arrays for lists, `page`/`per_page` with a `link: <…>; rel="next"`
//! header when there is more, `X-RateLimit-Total`/`X-RateLimit-Remaining` under the sandbox's
//! rate limit, a search that sees a ticket only after the sandbox's `search_lag`.
//!
//! | method | path | |
//! |---|---|---|
//! | GET | `/api/v2/tickets` | `order_by` (`created_at`, `updated_at`), `order_type` (`desc` default), `updated_since`, `include=description`, `filter` (`deleted`, `spam`), `email`, `page`, `per_page` (≤ 100) |
//! | GET | `/api/v2/tickets/{id}` | one ticket, description included |
//! | PUT | `/api/v2/tickets/{id}` | `{"status": 2..5}`: 4 Resolved and 5 Closed archive, 2 Open and 3 Pending reopen; 405 on a deleted ticket |
//! | DELETE | `/api/v2/tickets/{id}` | to the trash → 204; 404 if already deleted |
//! | PUT | `/api/v2/tickets/{id}/restore` | out of the trash → 204 |
//! | POST | `/api/v2/tickets/{id}/reply` | `{"body": HTML}` → 201, its text mailed to the requester |
//! | GET | `/api/v2/tickets/{id}/conversations` | the replies (the first mail is the ticket's description) |
//! | GET | `/api/v2/search/tickets` | `query="status:2 AND created_at:>'2026-12-01'"`: only `status`, `created_at`, `updated_at`; `{"results", "total"}`, 30 a page, `page` ≤ 10 |
//!
//! Deleted tickets are the neutral core's trashed ones, closed ones its archived ones; nothing
//! is deleted for good (Freshdesk's API cannot). The ticket-created webhook is what a
//! "Trigger webhook" action of a ticket-creation automation would send with a JSON body of
//! ticket placeholders and a custom `Authorization: Bearer SECRET` header (Freshdesk signs
//! nothing).

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, Query, Request, State, rejection::JsonRejection},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use base64::Engine as _;
use chrono::{DateTime, NaiveDate, Utc};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::sandbox::{
    events::Timestamp,
    faults::{Fault, Stage},
    helpdesk::{Hub, Ticket},
};

/// Freshdesk: basic auth with the API key; its rate-limit headers; a ticket-created
/// automation webhook with the bearer secret. Its `/api/v2/` paths are Zendesk's too.
pub const DIALECT: super::Dialect = super::Dialect {
    name: "freshdesk",
    routes,
    prefixes: &["/api/v2/"],
    rate_headers: Some(("x-ratelimit-total", "x-ratelimit-remaining")),
    webhook: Some(webhook),
    conflicts: &["zendesk"],
    // Freshdesk's requester notification "New Ticket Created" (Admin > Email Notifications), on in a new account (our reading; HELPDESKS.md does not say).
    acknowledges: true,
};

/// Freshdesk's ticket statuses.
const OPEN: u64 = 2;
const PENDING: u64 = 3;
const RESOLVED: u64 = 4;
const CLOSED: u64 = 5;
/// `source` 1: the ticket came by email; a conversation's `source` 0: a reply.
const SOURCE_EMAIL: u64 = 1;
const SOURCE_REPLY: u64 = 0;
/// The agent the sandbox's API key belongs to.
const AGENT_ID: u64 = 9_000_000_001;
/// The support address replies go out from.
const SUPPORT_EMAIL: &str = "support@helpdesk.test";

pub fn routes(hub: Arc<Hub>) -> Router<Arc<Hub>> {
    Router::new()
        .route("/api/v2/tickets", get(list))
        .route("/api/v2/tickets/{id}", get(show).put(update).delete(delete))
        .route("/api/v2/tickets/{id}/restore", put(restore))
        .route("/api/v2/tickets/{id}/reply", post(reply))
        .route("/api/v2/tickets/{id}/conversations", get(conversations))
        .route("/api/v2/search/tickets", get(search))
        .route_layer(middleware::from_fn_with_state(hub, require_key))
}

fn webhook(
    t: &Ticket,
    secret: &str,
    _now: std::time::SystemTime,
) -> (Vec<u8>, Vec<(String, String)>) {
    // The placeholders a ticket-creation rule would put in its JSON content
    // ({{ticket.id}}, {{ticket.subject}}, {{ticket.description}}, …).
    let body = json!({ "freshdesk_webhook": {
        "ticket_id": t.id,
        "ticket_subject": t.subject,
        "ticket_description": html(&t.body),
        "ticket_status": "Open",
        "ticket_source": "Email",
        "ticket_requester_email": t.requester,
        "ticket_created_at": stamp(&t.created_at),
        "ticket_url": format!("https://helpdesk.test/a/tickets/{}", t.id),
    }})
    .to_string()
    .into_bytes();
    (
        body,
        vec![("authorization".into(), format!("Bearer {secret}"))],
    )
}

/// Freshdesk's error body: `{"description": …, "errors": [{field, message, code}]}`.
fn invalid(field: &str, message: &str, code: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({
            "description": "Validation failed",
            "errors": [{ "field": field, "message": message, "code": code }],
        })),
    )
        .into_response()
}

fn bad_json() -> Response {
    invalid(
        "body",
        "Request body has invalid json format",
        "invalid_json",
    )
}

/// The ticket `id`, if it can be changed: 404 if unknown, 405 if deleted (or spam), as
/// Freshdesk answers.
fn writable(hub: &Hub, id: u64) -> Result<Ticket, Box<Response>> {
    match hub.get(id) {
        None => Err(Box::new(not_found())),
        Some(t) if t.trashed => Err(Box::new(StatusCode::METHOD_NOT_ALLOWED.into_response())),
        Some(t) => Ok(t),
    }
}

fn not_found() -> Response {
    // Freshdesk answers an unknown ticket 404 with an empty body.
    StatusCode::NOT_FOUND.into_response()
}

async fn require_key(State(hub): State<Arc<Hub>>, req: Request, next: Next) -> Response {
    let user = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.split_once(':').map(|(u, _)| u.to_string()));
    // The password is anything (conventionally `X`): the key alone authenticates.
    if user.as_deref() == Some(hub.config.api_token.as_str()) {
        next.run(req).await
    } else {
        (
            StatusCode::UNAUTHORIZED,
            Json(json!({
                "code": "invalid_credentials",
                "message": "You have to be logged in to perform this action.",
            })),
        )
            .into_response()
    }
}

fn stamp(t: &Timestamp) -> String {
    t.0.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn updated_at(t: &Ticket) -> Timestamp {
    t.replies
        .last()
        .map(|r| r.created_at)
        .unwrap_or(t.created_at)
}

fn status(t: &Ticket) -> u64 {
    if t.archived { CLOSED } else { OPEN }
}

/// A stable numeric contact id for a requester's address.
fn requester_id(email: &str) -> u64 {
    // FNV-1a: the same address is the same contact across calls and runs.
    let h = email.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    9_000_000_000 + h % 1_000_000_000
}

/// Text as Freshdesk's HTML `description`/`body`.
fn html(text: &str) -> String {
    let escaped = text
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    format!(
        "<div>{}</div>",
        escaped
            .trim_end()
            .replace("\r\n", "\n")
            .replace('\n', "<br>")
    )
}

/// An HTML body as Freshdesk's `body_text`: line breaks for `<br>` and block ends, tags
/// dropped, the common entities decoded.
fn text_of(html: &str) -> String {
    let mut out = String::new();
    let mut rest = html;
    while let Some(at) = rest.find('<') {
        out.push_str(&rest[..at]);
        let Some(end) = rest[at..].find('>') else {
            rest = "";
            break;
        };
        let tag = rest[at + 1..at + end].trim().to_ascii_lowercase();
        if tag.starts_with("br") || tag == "/div" || tag == "/p" {
            out.push('\n');
        }
        rest = &rest[at + end + 1..];
    }
    out.push_str(rest);
    out.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&nbsp;", " ")
        .replace("&amp;", "&")
}

fn ticket_json(t: &Ticket, description: bool) -> Value {
    let mut v = json!({
        "id": t.id,
        "subject": t.subject,
        "status": status(t),
        "priority": 1,
        "source": SOURCE_EMAIL,
        "type": null,
        "requester_id": requester_id(&t.requester),
        "responder_id": null,
        "group_id": null,
        "company_id": null,
        "to_emails": [SUPPORT_EMAIL],
        "cc_emails": [],
        "fwd_emails": [],
        "reply_cc_emails": [],
        "fr_escalated": false,
        "is_escalated": false,
        "spam": false,
        "deleted": t.trashed,
        "tags": [],
        "custom_fields": {},
        "created_at": stamp(&t.created_at),
        "updated_at": stamp(&updated_at(t)),
        "due_by": stamp(&t.created_at),
        "fr_due_by": stamp(&t.created_at),
    });
    if description {
        v["description"] = json!(html(&t.body));
        v["description_text"] = json!(t.body);
    }
    v
}

#[derive(Deserialize)]
struct ListParams {
    order_by: Option<String>,
    order_type: Option<String>,
    updated_since: Option<String>,
    include: Option<String>,
    filter: Option<String>,
    email: Option<String>,
    page: Option<usize>,
    per_page: Option<usize>,
}

/// `page` (1..=max) and `per_page` (1..=100, default 30), or the validation error.
fn paging(
    page: Option<usize>,
    per_page: Option<usize>,
    max_page: usize,
) -> Result<(usize, usize), Box<Response>> {
    let page = page.unwrap_or(1);
    if page == 0 || page > max_page {
        return Err(Box::new(invalid(
            "page",
            &format!("It should be a Positive Number less than or equal to {max_page}"),
            "invalid_value",
        )));
    }
    let per_page = per_page.unwrap_or(30);
    if per_page == 0 || per_page > 100 {
        return Err(Box::new(invalid(
            "per_page",
            "It should be a Positive Number less than or equal to 100",
            "invalid_value",
        )));
    }
    Ok((page, per_page))
}

/// The answer to a list: the page as a bare array, and `link: <…>; rel="next"` if more follow.
fn page_answer(items: Vec<Value>, more: Option<String>) -> Response {
    let mut r = Json(Value::Array(items)).into_response();
    if let Some(next) = more
        && let Ok(v) = format!("<{next}>; rel=\"next\"").parse()
    {
        r.headers_mut().insert(header::LINK, v);
    }
    r
}

async fn list(
    State(hub): State<Arc<Hub>>,
    req_uri: axum::http::Uri,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(p)) = params else {
        return invalid(
            "query",
            "Unexpected/invalid query parameters",
            "invalid_field",
        );
    };
    let (page, per_page) = match paging(p.page, p.per_page, 300) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let by_updated = match p.order_by.as_deref() {
        None | Some("created_at") => false,
        Some("updated_at") => true,
        Some("due_by" | "status") => false,
        Some(_) => {
            return invalid(
                "order_by",
                "It should be one of these values: 'created_at,due_by,updated_at,status'",
                "invalid_value",
            );
        }
    };
    let ascending = match p.order_type.as_deref() {
        None | Some("desc") => false,
        Some("asc") => true,
        Some(_) => {
            return invalid(
                "order_type",
                "It should be one of these values: 'asc,desc'",
                "invalid_value",
            );
        }
    };
    let since = match p.updated_since.as_deref() {
        // Without it, Freshdesk lists only the last 30 days' tickets.
        None => Some(Timestamp(Utc::now() - chrono::Duration::days(30))),
        Some(s) => match DateTime::parse_from_rfc3339(s) {
            Ok(t) => Some(Timestamp(t.with_timezone(&Utc))),
            Err(_) => {
                return invalid(
                    "updated_since",
                    "It should be in the 'YYYY-MM-DDTHH:MM:SSZ' format",
                    "invalid_value",
                );
            }
        },
    };
    let description = match p.include.as_deref() {
        None => false,
        Some("description") => true,
        Some(_) => {
            return invalid(
                "include",
                "It should be one of these values: 'requester,stats,description'",
                "invalid_value",
            );
        }
    };
    let deleted = match p.filter.as_deref() {
        None => false,
        Some("deleted") => true,
        // The sandbox marks nothing as spam; its other predefined filters match nothing here.
        Some("spam" | "new_and_my_open" | "watching") => {
            return page_answer(Vec::new(), None);
        }
        Some(_) => {
            return invalid(
                "filter",
                "It should be one of these values: 'new_and_my_open,watching,spam,deleted'",
                "invalid_value",
            );
        }
    };
    let email = p.email.map(|e| e.trim().to_lowercase());
    let mut all = hub
        .list(
            |t| {
                t.trashed == deleted
                    && since.is_none_or(|s| updated_at(t) >= s)
                    && email.as_ref().is_none_or(|e| *e == t.requester)
            },
            1,
            usize::MAX,
        )
        .tickets;
    // Newest first by creation already (ids grow with time); by update or ascending on request.
    if by_updated {
        all.sort_by_key(|t| std::cmp::Reverse(updated_at(t)));
    }
    if ascending {
        all.reverse();
    }
    let total = all.len();
    let items = all
        .iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .map(|t| ticket_json(t, description))
        .collect();
    let more = (page * per_page < total && page < 300).then(|| {
        let query = req_uri.query().unwrap_or_default();
        let kept: Vec<&str> = query
            .split('&')
            .filter(|kv| !kv.is_empty() && !kv.starts_with("page="))
            .collect();
        let mut next = format!("{}?", req_uri.path());
        for kv in kept {
            next.push_str(kv);
            next.push('&');
        }
        next.push_str(&format!("page={}", page + 1));
        next
    });
    page_answer(items, more)
}

async fn show(State(hub): State<Arc<Hub>>, Path(id): Path<u64>) -> Response {
    match hub.get(id) {
        Some(t) => Json(ticket_json(&t, true)).into_response(),
        None => not_found(),
    }
}

#[derive(Deserialize)]
struct Update {
    status: Option<Value>,
}

async fn update(
    State(hub): State<Arc<Hub>>,
    Path(id): Path<u64>,
    body: Result<Json<Update>, JsonRejection>,
) -> Response {
    let Ok(Json(u)) = body else {
        return bad_json();
    };
    // Freshdesk: a deleted (or spam) ticket cannot be updated.
    if let Err(r) = writable(&hub, id) {
        return *r;
    }
    let archived = match u.status.as_ref().map(|s| s.as_u64()) {
        None => None,
        Some(Some(OPEN | PENDING)) => Some(false),
        Some(Some(RESOLVED | CLOSED)) => Some(true),
        Some(_) => {
            return invalid(
                "status",
                "It should be one of these values: '2,3,4,5'",
                "invalid_value",
            );
        }
    };
    if let Some(a) = archived
        && hub.faults.get(Stage::Api) != Fault::Drop
        && hub.set_archived(id, a).is_err()
    {
        return not_found();
    }
    match hub.get(id) {
        // Under `api=drop` the answer claims the change that was lost.
        Some(mut t) => {
            if let Some(a) = archived {
                t.archived = a;
            }
            Json(ticket_json(&t, true)).into_response()
        }
        None => not_found(),
    }
}

async fn delete(State(hub): State<Arc<Hub>>, Path(id): Path<u64>) -> Response {
    match hub.get(id) {
        None => not_found(),
        // Already in the trash (UNVERIFIED: what Freshdesk answers a second DELETE).
        Some(t) if t.trashed => not_found(),
        Some(_) if hub.faults.get(Stage::Api) == Fault::Drop => {
            StatusCode::NO_CONTENT.into_response()
        }
        Some(_) => match hub.set_trashed(id, true) {
            Ok(()) => StatusCode::NO_CONTENT.into_response(),
            Err(_) => not_found(),
        },
    }
}

async fn restore(State(hub): State<Arc<Hub>>, Path(id): Path<u64>) -> Response {
    if hub.get(id).is_none() {
        return not_found();
    }
    if hub.faults.get(Stage::Api) != Fault::Drop && hub.set_trashed(id, false).is_err() {
        return not_found();
    }
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize)]
struct ReplyRequest {
    body: Option<String>,
}

fn conversation_json(ticket: &Ticket, id: u64, body_html: &str, at: &Timestamp) -> Value {
    json!({
        "id": id,
        "ticket_id": ticket.id,
        "body": body_html,
        "body_text": text_of(body_html),
        "incoming": false,
        "private": false,
        "source": SOURCE_REPLY,
        "user_id": AGENT_ID,
        "support_email": SUPPORT_EMAIL,
        "from_email": SUPPORT_EMAIL,
        "to_emails": [ticket.requester],
        "cc_emails": [],
        "bcc_emails": [],
        "attachments": [],
        "created_at": stamp(at),
        "updated_at": stamp(at),
    })
}

async fn reply(
    State(hub): State<Arc<Hub>>,
    Path(id): Path<u64>,
    body: Result<Json<ReplyRequest>, JsonRejection>,
) -> Response {
    let Ok(Json(r)) = body else {
        return bad_json();
    };
    let Some(html_body) = r.body.filter(|b| !b.trim().is_empty()) else {
        return invalid(
            "body",
            "It should not be blank as this is a mandatory field",
            "missing_field",
        );
    };
    let t = match writable(&hub, id) {
        Ok(t) => t,
        Err(r) => return *r,
    };
    let lose = hub.faults.get(Stage::Api) == Fault::Drop;
    // The core keeps and mails the reply's text (Freshdesk mails HTML with a text part).
    match hub.post_reply(id, text_of(&html_body), lose) {
        Ok(reply) => (
            StatusCode::CREATED,
            Json(conversation_json(
                &t,
                reply.id,
                &html_body,
                &reply.created_at,
            )),
        )
            .into_response(),
        Err(_) => not_found(),
    }
}

#[derive(Deserialize)]
struct PageParams {
    page: Option<usize>,
    per_page: Option<usize>,
}

async fn conversations(
    State(hub): State<Arc<Hub>>,
    Path(id): Path<u64>,
    params: Result<Query<PageParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(p)) = params else {
        return invalid(
            "query",
            "Unexpected/invalid query parameters",
            "invalid_field",
        );
    };
    let (page, per_page) = match paging(p.page, p.per_page, usize::MAX) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let Some(t) = hub.get(id) else {
        return not_found();
    };
    let items = t
        .replies
        .iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .map(|r| conversation_json(&t, r.id, &html(&r.body), &r.created_at))
        .collect();
    let more = (page * per_page < t.replies.len()).then(|| {
        format!(
            "/api/v2/tickets/{id}/conversations?per_page={per_page}&page={}",
            page + 1
        )
    });
    page_answer(items, more)
}

#[derive(Deserialize)]
struct SearchParams {
    query: Option<String>,
    page: Option<usize>,
}

/// One condition of a search query.
enum Cond {
    Status(u64),
    Created(std::cmp::Ordering, NaiveDate),
    Updated(std::cmp::Ordering, NaiveDate),
}

impl Cond {
    fn parse(term: &str) -> Option<Cond> {
        let (field, value) = term.trim().split_once(':')?;
        let date = |v: &str| {
            let (ord, d) = match v.as_bytes().first()? {
                b'>' => (std::cmp::Ordering::Greater, &v[1..]),
                b'<' => (std::cmp::Ordering::Less, &v[1..]),
                _ => (std::cmp::Ordering::Equal, v),
            };
            let d = d.trim().strip_prefix('\'')?.strip_suffix('\'')?;
            Some((ord, NaiveDate::parse_from_str(d, "%Y-%m-%d").ok()?))
        };
        match field.trim() {
            "status" => value.trim().parse().ok().map(Cond::Status),
            "created_at" => date(value.trim()).map(|(o, d)| Cond::Created(o, d)),
            "updated_at" => date(value.trim()).map(|(o, d)| Cond::Updated(o, d)),
            _ => None,
        }
    }

    fn holds(&self, t: &Ticket) -> bool {
        // Freshdesk's `:>` and `:<` include the day given.
        let on = |at: &Timestamp, ord: &std::cmp::Ordering, d: &NaiveDate| {
            let day = at.0.date_naive();
            match ord {
                std::cmp::Ordering::Greater => day >= *d,
                std::cmp::Ordering::Less => day <= *d,
                std::cmp::Ordering::Equal => day == *d,
            }
        };
        match self {
            Cond::Status(s) => status(t) == *s,
            Cond::Created(o, d) => on(&t.created_at, o, d),
            Cond::Updated(o, d) => on(&updated_at(t), o, d),
        }
    }
}

/// `"a AND b OR c"`: OR of ANDs (no parentheses), each term one [`Cond`].
fn parse_query(q: &str) -> Option<Vec<Vec<Cond>>> {
    let q = q.trim().strip_prefix('"')?.strip_suffix('"')?;
    if q.len() > 512 || q.trim().is_empty() {
        return None;
    }
    q.split(" OR ")
        .map(|any| any.split(" AND ").map(Cond::parse).collect())
        .collect()
}

async fn search(
    State(hub): State<Arc<Hub>>,
    params: Result<Query<SearchParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(p)) = params else {
        return invalid(
            "query",
            "Unexpected/invalid query parameters",
            "invalid_field",
        );
    };
    let Some(query) = p.query.as_deref().and_then(parse_query) else {
        return invalid(
            "query",
            "It should be a double-quoted query of status, created_at or updated_at \
             conditions joined by AND/OR, at most 512 characters",
            "invalid_value",
        );
    };
    let (page, per_page) = match paging(p.page, Some(30), 10) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let result = hub.list(
        |t| {
            !t.trashed
                && hub.searchable(t)
                && query.iter().any(|all| all.iter().all(|c| c.holds(t)))
        },
        page,
        per_page,
    );
    Json(json!({
        "results": result.tickets.iter().map(|t| ticket_json(t, false)).collect::<Vec<_>>(),
        "total": result.total,
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_and_text_round_trip() {
        let h = html("Agent reply mc-1 <ok> & done\nmcreply-2\n");
        assert_eq!(
            h,
            "<div>Agent reply mc-1 &lt;ok&gt; &amp; done<br>mcreply-2</div>"
        );
        assert_eq!(text_of(&h), "Agent reply mc-1 <ok> & done\nmcreply-2\n");
    }

    #[test]
    fn search_queries_are_ors_of_ands() {
        let q = parse_query("\"status:2 AND created_at:>'2026-12-01' OR status:5\"").unwrap();
        assert_eq!((q.len(), q[0].len(), q[1].len()), (2, 2, 1));
        assert!(parse_query("status:2").is_none(), "not quoted");
        assert!(
            parse_query("\"subject:'mc-1'\"").is_none(),
            "no subject search"
        );
    }

    #[test]
    fn a_requester_is_one_contact() {
        assert_eq!(requester_id("a@b.test"), requester_id("a@b.test"));
        assert_ne!(requester_id("a@b.test"), requester_id("c@b.test"));
    }
}
