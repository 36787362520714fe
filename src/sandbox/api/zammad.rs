//! Zammad's dialect of the sandbox API (`/api/v1/…`, docs.zammad.org/en/latest/api/), as much
//! of it as the prober's Zammad adapter uses, with the shapes the docs and the zammad/zammad
//! repository give: `Authorization: Token token=…` (or `Bearer …`), tickets with `expand=true`
//! carrying association names, articles of the mail channel. Not measured on a real Zammad.
//!
//! | method | path | |
//! |---|---|---|
//! | GET | `/api/v1/tickets` | every ticket, **id ascending** (as `tickets_controller.rb#index`), `page`, `per_page` (at most 100) |
//! | GET, POST | `/api/v1/tickets/search` | `query` (the lagging index: [`Hub::searchable`]) or a JSON `condition` (the database: no lag); `sort_by`, `order_by`, `limit`, `page`/`per_page`, `expand` |
//! | GET | `/api/v1/tickets/{id}` | one ticket |
//! | PUT | `/api/v1/tickets/{id}` | `{"state": "closed" \| "open" \| "new"}` |
//! | DELETE | `/api/v1/tickets/{id}` | gone for good → 200 `{}` |
//! | GET | `/api/v1/ticket_articles/by_ticket/{id}` | the mail that made the ticket, then each reply |
//! | POST | `/api/v1/ticket_articles` | `{"ticket_id", "type": "email", "to", "body", …}` → 201, mailed to the requester |
//!
//! An article of type `email` is mailed whether `internal` is true or not, as Zammad does (its
//! docs: `internal` only hides it in the UI); other types (notes) are refused with 422, since
//! the neutral core keeps no unmailed articles. Conditions: only `ticket.title` with
//! `contains` narrows here; any other condition is accepted and narrows nothing (Zammad has
//! many; the adapter uses that one). Search without `expand` answers Zammad's asset form
//! (`tickets`, `tickets_count`, `assets.Ticket`).
//!
//! No rate-limit headers (Zammad documents none). Its trigger webhook is the default payload,
//! `{"ticket": …, "article": …}`, with `X-Zammad-Trigger`, `X-Zammad-Delivery` and
//! `X-Hub-Signature: sha1=<hex HMAC-SHA1(signature token, body)>`.

use std::sync::Arc;

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, Query, Request, State},
    http::{Method, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::sandbox::{
    events::Timestamp,
    faults::{Fault, Stage},
    helpdesk::{Hub, Ticket},
};

/// Zammad: `Authorization: Token token=…`; no rate-limit headers; trigger webhooks signed
/// with `X-Hub-Signature`.
pub const DIALECT: super::Dialect = super::Dialect {
    name: "zammad",
    routes,
    prefixes: &["/api/v1/"],
    rate_headers: None,
    webhook: Some(webhook),
    conflicts: &[],
    // Zammad ships the trigger "auto reply (on new tickets)" active.
    acknowledges: true,
};

/// The address the sandbox's agent replies come from.
const SUPPORT: &str = "Support <support@helpdesk.test>";

pub fn routes(hub: Arc<Hub>) -> Router<Arc<Hub>> {
    Router::new()
        .route("/api/v1/tickets", get(list))
        .route("/api/v1/tickets/search", get(search).post(search))
        .route("/api/v1/tickets/{id}", get(show).put(update).delete(delete))
        .route("/api/v1/ticket_articles/by_ticket/{id}", get(articles))
        .route("/api/v1/ticket_articles", post(create_article))
        .route_layer(middleware::from_fn_with_state(hub, require_token))
}

/// Zammad's error body: `error` and `error_human`.
fn error(status: StatusCode, text: &str) -> Response {
    (status, Json(json!({ "error": text, "error_human": text }))).into_response()
}

async fn require_token(State(hub): State<Arc<Hub>>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Token token=")
                .or_else(|| v.strip_prefix("Bearer "))
        });
    if given == Some(hub.config.api_token.as_str()) {
        next.run(req).await
    } else {
        let mut r = error(StatusCode::UNAUTHORIZED, "Authentication required");
        r.headers_mut().insert(
            "x-failure",
            axum::http::HeaderValue::from_static("Authentication required"),
        );
        r
    }
}

fn time(t: &Timestamp) -> String {
    t.0.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn state(t: &Ticket) -> (&'static str, u64) {
    match (t.archived, t.replies.is_empty()) {
        (true, _) => ("closed", 4),
        (false, true) => ("new", 1),
        (false, false) => ("open", 2),
    }
}

fn number(t: &Ticket) -> String {
    (31000 + t.id).to_string()
}

/// A ticket, with association names (`expand=true`) or ids.
fn ticket_json(t: &Ticket, expand: bool) -> Value {
    let (name, state_id) = state(t);
    let updated = t.replies.last().map_or(&t.created_at, |r| &r.created_at);
    let mut v = json!({
        "id": t.id,
        "number": number(t),
        "title": t.subject,
        "group_id": 1,
        "state_id": state_id,
        "priority_id": 2,
        "customer_id": 1000 + t.id,
        "article_count": 1 + t.replies.len(),
        "created_at": time(&t.created_at),
        "updated_at": time(updated),
    });
    if expand {
        v["group"] = json!("Users");
        v["state"] = json!(name);
        v["priority"] = json!("2 normal");
        v["customer"] = json!(t.requester);
    }
    v
}

/// The ticket's articles: the inbound mail, then each agent reply (emails, public).
fn articles_json(t: &Ticket) -> Vec<Value> {
    let mut out = vec![json!({
        "id": t.id * 1000,
        "ticket_id": t.id,
        "type": "email",
        "sender": "Customer",
        "internal": false,
        "from": t.requester,
        "to": "support@helpdesk.test",
        "subject": t.subject,
        "body": t.body,
        "content_type": "text/plain",
        "message_id": format!("<{}>", t.message_id),
        "created_at": time(&t.created_at),
    })];
    out.extend(t.replies.iter().map(|r| {
        json!({
            "id": t.id * 1000 + r.id,
            "ticket_id": t.id,
            "type": "email",
            "sender": "Agent",
            "internal": false,
            "from": SUPPORT,
            "to": t.requester,
            "subject": t.subject,
            "body": r.body,
            "content_type": "text/plain",
            "in_reply_to": format!("<{}>", t.message_id),
            "created_at": time(&r.created_at),
        })
    }));
    out
}

#[derive(Deserialize, Default)]
struct Params {
    page: Option<usize>,
    per_page: Option<usize>,
    expand: Option<String>,
    query: Option<String>,
    limit: Option<usize>,
    sort_by: Option<String>,
    order_by: Option<String>,
}

fn truthy(s: Option<&str>) -> bool {
    matches!(s, Some("true" | "1"))
}

/// `GET /api/v1/tickets`: oldest first, as Zammad's index orders by id ascending.
async fn list(
    State(hub): State<Arc<Hub>>,
    params: Result<Query<Params>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(p)) = params else {
        return error(StatusCode::UNPROCESSABLE_ENTITY, "invalid parameters");
    };
    let per_page = p.per_page.unwrap_or(100).clamp(1, 100);
    let page = p.page.unwrap_or(1).max(1);
    let mut all = hub.list(|t| !t.trashed, 1, usize::MAX).tickets;
    all.reverse();
    let expand = truthy(p.expand.as_deref());
    let items: Vec<Value> = all
        .iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .map(|t| ticket_json(t, expand))
        .collect();
    Json(items).into_response()
}

/// `GET|POST /api/v1/tickets/search`: with a `query`, Elasticsearch (it sees a ticket only
/// once indexed); with a `condition` alone, SQL (at once). Parameters come from the query
/// string and, for POST, from a JSON body (Rails merges both).
async fn search(
    State(hub): State<Arc<Hub>>,
    method: Method,
    params: Result<Query<Params>, axum::extract::rejection::QueryRejection>,
    body: Bytes,
) -> Response {
    let Ok(Query(mut p)) = params else {
        return error(StatusCode::UNPROCESSABLE_ENTITY, "invalid parameters");
    };
    let mut condition = Value::Null;
    if method == Method::POST && !body.is_empty() {
        let Ok(Value::Object(b)) = serde_json::from_slice::<Value>(&body) else {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "the body must be a JSON object",
            );
        };
        let text = |k: &str| {
            b.get(k).and_then(|v| match v {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                Value::Bool(x) => Some(x.to_string()),
                _ => None,
            })
        };
        let num = |k: &str| text(k).and_then(|s| s.parse::<usize>().ok());
        p.query = p.query.or_else(|| text("query"));
        p.expand = p.expand.or_else(|| text("expand"));
        p.sort_by = p.sort_by.or_else(|| text("sort_by"));
        p.order_by = p.order_by.or_else(|| text("order_by"));
        p.limit = p.limit.or_else(|| num("limit"));
        p.page = p.page.or_else(|| num("page"));
        p.per_page = p.per_page.or_else(|| num("per_page"));
        condition = b.get("condition").cloned().unwrap_or(Value::Null);
    }
    let query = p
        .query
        .as_deref()
        .map(|q| q.replace(['"', '*'], "").trim().to_lowercase())
        .filter(|q| !q.is_empty());
    let title_contains = condition
        .get("ticket.title")
        .filter(|c| c.get("operator").and_then(Value::as_str) == Some("contains"))
        .and_then(|c| c.get("value"))
        .and_then(Value::as_str)
        .map(str::to_lowercase);
    let keep = |t: &Ticket| {
        if t.trashed {
            return false;
        }
        if let Some(q) = &query {
            // The index: lagging, and matching title, article body and sender.
            if !hub.searchable(t)
                || !(t.subject.to_lowercase().contains(q)
                    || t.body.to_lowercase().contains(q)
                    || t.requester.contains(q))
            {
                return false;
            }
        }
        title_contains
            .as_ref()
            .is_none_or(|v| t.subject.to_lowercase().contains(v))
    };
    // Zammad's default: updated_at desc. The core's order is newest created first.
    let mut all = hub.list(keep, 1, usize::MAX).tickets;
    let sort_by = p.sort_by.as_deref().unwrap_or("updated_at");
    if sort_by == "updated_at" {
        all.sort_by(|a, b| {
            let u = |t: &Ticket| t.replies.last().map_or(t.created_at.0, |r| r.created_at.0);
            u(b).cmp(&u(a))
        });
    }
    if p.order_by.as_deref() == Some("asc") {
        all.reverse();
    }
    let limit = p.per_page.or(p.limit).unwrap_or(50).clamp(1, 200);
    let page = p.page.unwrap_or(1).max(1);
    let hits: Vec<&Ticket> = all.iter().skip((page - 1) * limit).take(limit).collect();
    if truthy(p.expand.as_deref()) {
        return Json(
            hits.iter()
                .map(|t| ticket_json(t, true))
                .collect::<Vec<_>>(),
        )
        .into_response();
    }
    let assets: serde_json::Map<String, Value> = hits
        .iter()
        .map(|t| (t.id.to_string(), ticket_json(t, false)))
        .collect();
    Json(json!({
        "tickets": hits.iter().map(|t| t.id).collect::<Vec<_>>(),
        "tickets_count": hits.len(),
        "assets": { "Ticket": assets },
    }))
    .into_response()
}

fn not_found(id: u64) -> Response {
    error(
        StatusCode::NOT_FOUND,
        &format!("Couldn't find Ticket with 'id'={id}"),
    )
}

fn live(hub: &Hub, id: u64) -> Option<Ticket> {
    hub.get(id).filter(|t| !t.trashed)
}

async fn show(
    State(hub): State<Arc<Hub>>,
    Path(id): Path<u64>,
    params: Result<Query<Params>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let expand = params
        .ok()
        .is_some_and(|Query(p)| truthy(p.expand.as_deref()));
    match live(&hub, id) {
        Some(t) => Json(ticket_json(&t, expand)).into_response(),
        None => not_found(id),
    }
}

async fn update(State(hub): State<Arc<Hub>>, Path(id): Path<u64>, body: Bytes) -> Response {
    let Ok(Value::Object(b)) = serde_json::from_slice::<Value>(&body) else {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the body must be a JSON object",
        );
    };
    if live(&hub, id).is_none() {
        return not_found(id);
    }
    let state = match (b.get("state").and_then(Value::as_str), b.get("state_id")) {
        (Some(s), _) => Some(s.to_string()),
        (None, Some(Value::Number(n))) => match n.as_u64() {
            Some(4) => Some("closed".into()),
            Some(1) => Some("new".into()),
            Some(2) => Some("open".into()),
            _ => Some(format!("state_id {n}")),
        },
        _ => None,
    };
    // `drop`: answered as if saved, and nothing changes.
    if hub.faults.get(Stage::Api) != Fault::Drop {
        let changed = match state.as_deref() {
            None => Ok(()),
            Some("closed") => hub.set_archived(id, true),
            Some("open" | "new") => hub.set_archived(id, false),
            Some(other) => {
                return error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    &format!("No lookup value found for 'state': {other:?}"),
                );
            }
        };
        if changed.is_err() {
            return not_found(id);
        }
    }
    match hub.get(id) {
        Some(t) => Json(ticket_json(&t, false)).into_response(),
        None => not_found(id),
    }
}

async fn delete(State(hub): State<Arc<Hub>>, Path(id): Path<u64>) -> Response {
    if live(&hub, id).is_none() {
        return not_found(id);
    }
    if hub.faults.get(Stage::Api) != Fault::Drop
        && (hub.set_trashed(id, true).is_err() || hub.delete(id).is_err())
    {
        return not_found(id);
    }
    Json(json!({})).into_response()
}

async fn articles(State(hub): State<Arc<Hub>>, Path(id): Path<u64>) -> Response {
    match live(&hub, id) {
        Some(t) => Json(articles_json(&t)).into_response(),
        None => not_found(id),
    }
}

async fn create_article(State(hub): State<Arc<Hub>>, body: Bytes) -> Response {
    let Ok(Value::Object(b)) = serde_json::from_slice::<Value>(&body) else {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the body must be a JSON object",
        );
    };
    let id = match b.get("ticket_id") {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.parse().ok(),
        _ => None,
    };
    let Some(id) = id else {
        return error(StatusCode::UNPROCESSABLE_ENTITY, "Need ticket_id!");
    };
    let Some(text) = b.get("body").and_then(Value::as_str) else {
        return error(StatusCode::UNPROCESSABLE_ENTITY, "Need body!");
    };
    // Zammad mails an email article even when it is internal; a note it never mails. The
    // neutral core keeps only mailed replies.
    if b.get("type").and_then(Value::as_str) != Some("email") {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "sandbox: only articles of type email (mailed replies) are modelled",
        );
    }
    let Some(ticket) = live(&hub, id) else {
        return not_found(id);
    };
    let internal = b.get("internal").and_then(Value::as_bool).unwrap_or(false);
    let lose = hub.faults.get(Stage::Api) == Fault::Drop;
    match hub.post_reply(id, text.to_string(), lose) {
        Ok(r) => (
            StatusCode::CREATED,
            Json(json!({
                "id": id * 1000 + r.id,
                "ticket_id": id,
                "type": "email",
                "sender": "Agent",
                "internal": internal,
                "from": SUPPORT,
                "to": b.get("to").cloned().unwrap_or(json!(ticket.requester)),
                "subject": b.get("subject").cloned().unwrap_or(json!(ticket.subject)),
                "body": r.body,
                "content_type": b.get("content_type").cloned().unwrap_or(json!("text/plain")),
                "created_at": time(&r.created_at),
            })),
        )
            .into_response(),
        Err(_) => not_found(id),
    }
}

/// The default payload of a trigger's webhook: the ticket and the article that fired it, with
/// Zammad's headers and its signature over the raw body.
fn webhook(
    t: &Ticket,
    secret: &str,
    _now: std::time::SystemTime,
) -> (Vec<u8>, Vec<(String, String)>) {
    let mut ticket = ticket_json(t, true);
    ticket["article_ids"] = json!([t.id * 1000]);
    let article = articles_json(t).swap_remove(0);
    let body = json!({ "ticket": ticket, "article": article })
        .to_string()
        .into_bytes();
    (
        body.clone(),
        vec![
            (
                "x-zammad-trigger".into(),
                "mailcanary ticket created".into(),
            ),
            (
                "x-zammad-delivery".into(),
                uuid::Uuid::new_v4().simple().to_string(),
            ),
            ("x-hub-signature".into(), signature(secret, &body)),
        ],
    )
}

/// `sha1=<hex HMAC-SHA1(secret, body)>`, computed here apart from the prober's verifier.
fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).expect("any key");
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha1={hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hex_hmac_sha1_of_the_body() {
        // The same vector as the adapter's test (computed with openssl).
        assert_eq!(
            signature(
                "zammad-signature-token",
                br#"{"ticket":{"id":1,"title":"mailcanary mc-x"},"article":{"id":1}}"#
            ),
            "sha1=dc812ae2b4147e4e88a3401cf8d2b9dce3439f4a"
        );
    }
}
