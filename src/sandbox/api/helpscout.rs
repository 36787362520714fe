//! Help Scout's Mailbox API 2.0 dialect of the sandbox API (`/v2/…`), as much of it as the
//! prober's Help Scout adapter uses, in the documented shapes (HELPDESKS.md section 3): HAL
//! collections under `_embedded`, a `page` object, ISO 8601 times, OAuth2 client credentials.
//! Written from the documentation, not measured against a real account.
//!
//! | method | path | |
//! |---|---|---|
//! | POST | `/v2/oauth2/token` | form (or JSON) `grant_type=client_credentials`, `client_id`, `client_secret` → `access_token`, `expires_in`; 401 `invalid_client` for a wrong secret |
//! | GET | `/v2/conversations` | `mailbox`, `status` (`active` default, `all`, `closed`, …), `sortField=createdAt`, `sortOrder`, `embed=threads`, `page` (25 a page); with `query`: search, which lags (`search_lag`) |
//! | GET | `/v2/conversations/{id}` | one conversation (`embed=threads` too) |
//! | GET | `/v2/conversations/{id}/threads` | its threads, newest first |
//! | GET | `/v2/conversations/{id}/threads/{thread}/original-source` | the customer thread's mail as received, JSON `original` |
//! | POST | `/v2/conversations/{id}/reply` | `{"customer": {"id": …}, "text": …}` → 201 with `Resource-ID`, mailed to the customer |
//! | PATCH | `/v2/conversations/{id}` | `{"op": "replace", "path": "/status", "value": "closed" \| "active" \| "pending"}` → 204 |
//! | DELETE | `/v2/conversations/{id}` | → 204 |
//!
//! Every route but the token endpoint wants `Authorization: Bearer {access token}`, a token
//! this sandbox issued and that has not expired (401 otherwise). The client secret is the
//! sandbox's API token; any non-empty `client_id` is taken. There is one mailbox, id
//! [`MAILBOX_ID`]; `imported: true` and `spam` are refused (400) rather than silently
//! honoured, since a canary must never use them. Notes are not served (404).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use axum::{
    Extension, Json, Router,
    extract::{Path, Query, Request, State},
    http::{HeaderMap, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::sandbox::{
    faults::{Fault, Stage},
    helpdesk::{Hub, Ticket, TicketError},
};

/// The sandbox's one mailbox.
pub const MAILBOX_ID: u64 = 1;
/// List Conversations' page size (HELPDESKS.md 3.2).
const PAGE_SIZE: usize = 25;

/// Help Scout: OAuth2 bearer tokens; `X-RateLimit-Limit-Minute` and
/// `X-RateLimit-Remaining-Minute`; the `convo.created` webhook signed with base64 HMAC-SHA1 of
/// the body in `X-HelpScout-Signature`.
pub const DIALECT: super::Dialect = super::Dialect {
    name: "helpscout",
    routes,
    prefixes: &["/v2/"],
    rate_headers: Some(("X-RateLimit-Limit-Minute", "X-RateLimit-Remaining-Minute")),
    webhook: Some(webhook),
    conflicts: &[],
    // Help Scout's Auto Reply is a per-mailbox setting, off until turned on (our reading; HELPDESKS.md does not say).
    acknowledges: false,
};

/// Access tokens issued, and when each expires.
#[derive(Default)]
struct Tokens(Mutex<HashMap<String, Instant>>);

pub fn routes(hub: Arc<Hub>) -> Router<Arc<Hub>> {
    Router::new()
        .route("/v2/conversations", get(list))
        .route(
            "/v2/conversations/{id}",
            get(show).patch(update).delete(delete),
        )
        .route("/v2/conversations/{id}/threads", get(threads))
        .route(
            "/v2/conversations/{id}/threads/{thread}/original-source",
            get(original_source),
        )
        .route("/v2/conversations/{id}/reply", post(reply))
        .route_layer(middleware::from_fn_with_state(hub, require_bearer))
        .route("/v2/oauth2/token", post(token))
        .layer(Extension(Arc::new(Tokens::default())))
}

/// Help Scout's error shape: `logRef`, `message`, `_embedded.errors`.
fn problem(status: StatusCode, message: &str) -> Response {
    (
        status,
        Json(json!({
            "logRef": format!("sandbox-{}", uuid::Uuid::new_v4().simple()),
            "message": message,
            "_embedded": { "errors": [] },
        })),
    )
        .into_response()
}

async fn require_bearer(
    Extension(tokens): Extension<Arc<Tokens>>,
    req: Request,
    next: Next,
) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let live = given.is_some_and(|g| {
        let mut t = tokens.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        t.retain(|_, exp| *exp > now);
        t.contains_key(&g)
    });
    if live {
        next.run(req).await
    } else {
        problem(StatusCode::UNAUTHORIZED, "Invalid or expired access token")
    }
}

#[derive(Deserialize)]
struct Grant {
    grant_type: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
}

/// The documented form body, or JSON (either is parsed whatever the Content-Type says).
fn grant(body: &[u8]) -> Option<Grant> {
    if let Ok(g) = serde_json::from_slice::<Grant>(body) {
        return Some(g);
    }
    let text = std::str::from_utf8(body).ok()?;
    let url = reqwest::Url::parse(&format!("http://form.invalid/?{text}")).ok()?;
    let field = |name: &str| {
        url.query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    };
    Some(Grant {
        grant_type: field("grant_type"),
        client_id: field("client_id"),
        client_secret: field("client_secret"),
    })
}

async fn token(
    State(hub): State<Arc<Hub>>,
    Extension(tokens): Extension<Arc<Tokens>>,
    body: axum::body::Bytes,
) -> Response {
    let oauth_error =
        |status: StatusCode, error: &str| (status, Json(json!({ "error": error }))).into_response();
    let Some(g) = grant(&body) else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request");
    };
    if g.grant_type.as_deref() != Some("client_credentials") {
        return oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type");
    }
    if g.client_id.as_deref().is_none_or(|c| c.trim().is_empty())
        || g.client_secret.as_deref() != Some(hub.config.api_token.as_str())
    {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client");
    }
    let lifetime = hub.config.oauth_token_lifetime;
    let access = uuid::Uuid::new_v4().simple().to_string();
    tokens
        .0
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(access.clone(), Instant::now() + lifetime);
    Json(json!({
        "token_type": "bearer",
        "access_token": access,
        // Whole seconds, as OAuth2 has it; at least 1.
        "expires_in": lifetime.as_secs().max(1),
    }))
    .into_response()
}

/// A customer id for a requester address: stable, as a Help Scout customer is.
fn customer_id(email: &str) -> u64 {
    // FNV-1a, 32 bits: small positive ids.
    let h = email.to_lowercase().bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    u64::from(h)
}

fn time(t: &crate::sandbox::events::Timestamp) -> String {
    t.0.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn status(t: &Ticket) -> &'static str {
    if t.archived { "closed" } else { "active" }
}

fn customer_json(t: &Ticket) -> Value {
    json!({ "id": customer_id(&t.requester), "email": t.requester, "type": "customer" })
}

/// The conversation's threads, newest first: the agent's replies, then the customer's mail.
fn threads_json(t: &Ticket) -> Vec<Value> {
    let mut out: Vec<Value> = t
        .replies
        .iter()
        .rev()
        .map(|r| {
            json!({
                "id": t.id * 1000 + 1 + r.id,
                "type": "reply",
                "status": status(t),
                "state": "published",
                "body": r.body,
                "source": { "type": "api", "via": "user" },
                "createdBy": { "id": 1, "type": "user", "email": "agent@helpdesk.test" },
                "createdAt": time(&r.created_at),
            })
        })
        .collect();
    out.push(json!({
        "id": t.id * 1000,
        "type": "customer",
        "status": "active",
        "state": "published",
        "body": t.body,
        "source": { "type": "email", "via": "customer" },
        "createdBy": customer_json(t),
        "customer": customer_json(t),
        "createdAt": time(&t.created_at),
    }));
    out
}

fn conversation_json(t: &Ticket, embed_threads: bool) -> Value {
    let mut c = json!({
        "id": t.id,
        "number": t.id,
        "threads": t.replies.len() + 1,
        "type": "email",
        "folderId": 1,
        "status": status(t),
        "state": "published",
        "subject": t.subject,
        "preview": t.body.chars().take(255).collect::<String>(),
        "mailboxId": MAILBOX_ID,
        "createdBy": customer_json(t),
        "createdAt": time(&t.created_at),
        "source": { "type": "email", "via": "customer" },
        "primaryCustomer": customer_json(t),
        "_links": { "self": { "href": format!("/v2/conversations/{}", t.id) } },
    });
    if embed_threads {
        c["_embedded"] = json!({ "threads": threads_json(t) });
    }
    c
}

fn webhook(
    t: &Ticket,
    secret: &str,
    _now: std::time::SystemTime,
) -> (Vec<u8>, Vec<(String, String)>) {
    let body = conversation_json(t, true).to_string().into_bytes();
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).expect("any key");
    mac.update(&body);
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    (
        body,
        vec![
            ("X-HelpScout-Event".into(), "convo.created".into()),
            ("X-HelpScout-Signature".into(), signature),
        ],
    )
}

#[derive(Deserialize)]
struct ListParams {
    mailbox: Option<String>,
    status: Option<String>,
    #[serde(rename = "sortField")]
    sort_field: Option<String>,
    #[serde(rename = "sortOrder")]
    sort_order: Option<String>,
    embed: Option<String>,
    page: Option<usize>,
    query: Option<String>,
}

/// The phrases of a search `query` (`(subject:"x" OR body:"y")`): its quoted parts, or the
/// whole of it.
fn phrases(query: &str) -> Vec<String> {
    let quoted: Vec<String> = query
        .split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_lowercase)
        .filter(|s| !s.is_empty())
        .collect();
    if quoted.is_empty() {
        vec![query.trim().to_lowercase()]
    } else {
        quoted
    }
}

async fn list(
    State(hub): State<Arc<Hub>>,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(p)) = params else {
        return problem(StatusCode::BAD_REQUEST, "Invalid query parameters");
    };
    let mailboxes: Option<Vec<u64>> = match p.mailbox.as_deref() {
        None => None,
        Some(s) => match s.split(',').map(|m| m.trim().parse::<u64>()).collect() {
            Ok(v) => Some(v),
            Err(_) => return problem(StatusCode::BAD_REQUEST, "mailbox must be ids"),
        },
    };
    if mailboxes.as_ref().is_some_and(|m| !m.contains(&MAILBOX_ID)) {
        return page_json(Vec::new(), 0, 1);
    }
    let wanted = p.status.as_deref().unwrap_or("active");
    if !["all", "active", "closed", "open", "pending", "spam"].contains(&wanted) {
        return problem(StatusCode::BAD_REQUEST, "Invalid status");
    }
    if p.sort_field.as_deref().is_some_and(|f| f != "createdAt") {
        return problem(
            StatusCode::BAD_REQUEST,
            "The sandbox sorts by createdAt only",
        );
    }
    let ascending = match p.sort_order.as_deref() {
        None | Some("desc") => false,
        Some("asc") => true,
        Some(_) => return problem(StatusCode::BAD_REQUEST, "sortOrder must be asc or desc"),
    };
    let search = p.query.as_deref().filter(|q| !q.trim().is_empty());
    let needles = search.map(phrases);
    let keep = |t: &Ticket| {
        !t.trashed
            && match wanted {
                "all" => true,
                "spam" => false,
                "active" | "open" => status(t) == "active",
                s => status(t) == s,
            }
            // Search is index-backed and lags; the plain list does not.
            && needles.as_ref().is_none_or(|ns| {
                hub.searchable(t)
                    && ns.iter().any(|n| {
                        t.subject.to_lowercase().contains(n) || t.body.to_lowercase().contains(n)
                    })
            })
    };
    let mut all = hub.list(keep, 1, usize::MAX).tickets;
    if ascending {
        all.reverse();
    }
    let page = p.page.unwrap_or(1).max(1);
    let total = all.len();
    let embed = p.embed.as_deref().is_some_and(|e| e.contains("threads"));
    let convs = all
        .iter()
        .skip((page - 1) * PAGE_SIZE)
        .take(PAGE_SIZE)
        .map(|t| conversation_json(t, embed))
        .collect();
    page_json(convs, total, page)
}

fn page_json(conversations: Vec<Value>, total: usize, page: usize) -> Response {
    let pages = total.div_ceil(PAGE_SIZE);
    let mut links = json!({
        "first": { "href": "/v2/conversations?page=1" },
        "last": { "href": format!("/v2/conversations?page={}", pages.max(1)) },
    });
    if page < pages {
        links["next"] = json!({ "href": format!("/v2/conversations?page={}", page + 1) });
    }
    if page > 1 {
        links["prev"] = json!({ "href": format!("/v2/conversations?page={}", page - 1) });
    }
    Json(json!({
        "_embedded": { "conversations": conversations },
        "_links": links,
        "page": { "size": PAGE_SIZE, "totalElements": total, "totalPages": pages, "number": page },
    }))
    .into_response()
}

fn not_found() -> Response {
    problem(StatusCode::NOT_FOUND, "Conversation not found")
}

fn live(hub: &Hub, id: u64) -> Option<Ticket> {
    hub.get(id).filter(|t| !t.trashed)
}

#[derive(Deserialize)]
struct ShowParams {
    embed: Option<String>,
}

async fn show(
    State(hub): State<Arc<Hub>>,
    Path(id): Path<u64>,
    params: Result<Query<ShowParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let embed = params
        .ok()
        .and_then(|Query(p)| p.embed)
        .is_some_and(|e| e.contains("threads"));
    match live(&hub, id) {
        Some(t) => Json(conversation_json(&t, embed)).into_response(),
        None => not_found(),
    }
}

async fn threads(State(hub): State<Arc<Hub>>, Path(id): Path<u64>) -> Response {
    match live(&hub, id) {
        Some(t) => {
            let threads = threads_json(&t);
            let n = threads.len();
            Json(json!({
                "_embedded": { "threads": threads },
                "page": { "size": 50, "totalElements": n, "totalPages": 1, "number": 1 },
            }))
            .into_response()
        }
        None => not_found(),
    }
}

/// The customer thread's mail as received (`original`), as Help Scout's "Get original
/// source" answers in JSON; agent threads have none here.
async fn original_source(
    State(hub): State<Arc<Hub>>,
    Path((id, thread)): Path<(u64, u64)>,
) -> Response {
    match live(&hub, id) {
        Some(t) if thread == t.id * 1000 => {
            Json(json!({ "original": hub.original_source(&t) })).into_response()
        }
        _ => not_found(),
    }
}

async fn reply(
    State(hub): State<Arc<Hub>>,
    Path(id): Path<u64>,
    body: axum::body::Bytes,
) -> Response {
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return problem(StatusCode::BAD_REQUEST, "Request body is not JSON");
    };
    let Some(t) = live(&hub, id) else {
        return not_found();
    };
    let Some(text) = req["text"].as_str().filter(|s| !s.trim().is_empty()) else {
        return problem(StatusCode::BAD_REQUEST, "text is required");
    };
    if req["customer"]["id"].as_u64() != Some(customer_id(&t.requester)) {
        return problem(
            StatusCode::BAD_REQUEST,
            "customer.id is required and must be the conversation's customer",
        );
    }
    if req["imported"].as_bool() == Some(true) {
        return problem(
            StatusCode::BAD_REQUEST,
            "imported replies are not mailed; the sandbox refuses them",
        );
    }
    let lose = hub.faults.get(Stage::Api) == Fault::Drop;
    match hub.post_reply(id, text.to_string(), lose) {
        Ok(r) => {
            let thread = (id * 1000 + 1 + r.id).to_string();
            let mut headers = HeaderMap::new();
            headers.insert("Resource-ID", thread.parse().expect("digits"));
            (StatusCode::CREATED, headers).into_response()
        }
        Err(TicketError::NotFound | TicketError::NotTrashed) => not_found(),
    }
}

async fn update(
    State(hub): State<Arc<Hub>>,
    Path(id): Path<u64>,
    body: axum::body::Bytes,
) -> Response {
    let Ok(patch) = serde_json::from_slice::<Value>(&body) else {
        return problem(StatusCode::BAD_REQUEST, "Request body is not JSON");
    };
    if live(&hub, id).is_none() {
        return not_found();
    }
    if patch["op"] != "replace" || patch["path"] != "/status" {
        return problem(
            StatusCode::BAD_REQUEST,
            "The sandbox takes op replace of /status only",
        );
    }
    let closed = match patch["value"].as_str() {
        Some("closed") => true,
        Some("active" | "open" | "pending") => false,
        Some("spam") => {
            return problem(
                StatusCode::BAD_REQUEST,
                "spam trains the filter against the sender; the sandbox refuses it",
            );
        }
        _ => return problem(StatusCode::BAD_REQUEST, "Invalid status"),
    };
    if hub.faults.get(Stage::Api) == Fault::Drop {
        return StatusCode::NO_CONTENT.into_response();
    }
    match hub.set_archived(id, closed) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(_) => not_found(),
    }
}

async fn delete(State(hub): State<Arc<Hub>>, Path(id): Path<u64>) -> Response {
    if live(&hub, id).is_none() {
        return not_found();
    }
    if hub.faults.get(Stage::Api) == Fault::Drop {
        return StatusCode::NO_CONTENT.into_response();
    }
    // The neutral core deletes only what is in the trash.
    match hub.set_trashed(id, true).and_then(|()| hub.delete(id)) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(_) => not_found(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_phrases_are_the_quoted_parts() {
        assert_eq!(
            phrases("(subject:\"MC-1\" OR body:\"mc-2\")"),
            vec!["mc-1", "mc-2"]
        );
        assert_eq!(phrases(" mc-3 "), vec!["mc-3"]);
    }

    #[test]
    fn customer_ids_are_stable_and_case_blind() {
        assert_eq!(customer_id("A@b.test"), customer_id("a@B.test"));
        assert_ne!(customer_id("a@b.test"), customer_id("c@b.test"));
    }
}
