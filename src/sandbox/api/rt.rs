//! Request Tracker 5's REST2 dialect of the sandbox API (`/REST/2.0/…`, `lib/RT/REST2.pm` in
//! bestpractical/rt), as much of it as the prober's RT adapter uses, with RT's shapes as
//! measured on RT 5.0.3: ids as strings in collections, `Authorization: token …`.
//!
//! | method | path | |
//! |---|---|---|
//! | GET | `/REST/2.0/tickets?query=…` | TicketSQL: only `Subject LIKE '…'` is read (the rest narrows nothing here) |
//! | GET | `/REST/2.0/ticket/{id}` | one ticket |
//! | POST | `/REST/2.0/ticket/{id}/correspond` | `{"Content": …}` → 201, mailed to the requester |
//! | PUT | `/REST/2.0/ticket/{id}` | `{"Status": "resolved" \| "rejected"}` |
//! | DELETE | `/REST/2.0/ticket/{id}` | status `deleted` → 204 |
//! | GET | `/REST/2.0/ticket/{id}/attachments` | the mail and each correspondence, `Content` base64, `MessageId` |

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, Query, Request, State, rejection::JsonRejection},
    http::StatusCode,
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error;
use crate::sandbox::{
    faults::{Fault, Stage},
    helpdesk::{Hub, Ticket},
};

/// RT 5: `Authorization: token …`; no rate limit, no built-in webhooks.
pub const DIALECT: super::Dialect = super::Dialect {
    name: "rt",
    routes,
    prefixes: &["/REST/2.0/"],
    rate_headers: None,
    webhook: None,
    conflicts: &[],
    // RT's default scrip "On Create Autoreply To Requestors" (seen on the real RT 5 in the suite).
    acknowledges: true,
};

pub fn routes(hub: Arc<Hub>) -> Router<Arc<Hub>> {
    Router::new()
        .route("/REST/2.0/tickets", get(search))
        .route(
            "/REST/2.0/ticket/{id}",
            get(show).put(update).delete(delete),
        )
        .route(
            "/REST/2.0/ticket/{id}/correspond",
            axum::routing::post(correspond),
        )
        .route("/REST/2.0/ticket/{id}/attachments", get(attachments))
        .route_layer(middleware::from_fn_with_state(hub, require_token))
}

async fn require_token(State(hub): State<Arc<Hub>>, req: Request, next: Next) -> Response {
    if super::authorized(&hub, &req, "token") {
        next.run(req).await
    } else {
        (
            StatusCode::UNAUTHORIZED,
            Json(json!({ "message": "Unauthorized" })),
        )
            .into_response()
    }
}

fn status(t: &Ticket) -> &'static str {
    match (t.trashed, t.archived, t.replies.is_empty()) {
        (true, _, _) => "rejected",
        (_, true, _) => "resolved",
        (_, _, true) => "new",
        _ => "open",
    }
}

fn created(t: &Ticket) -> String {
    t.created_at.0.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// The literal of the first `Subject LIKE '…'` in a TicketSQL query (`\'` and `\\` unescaped).
fn subject_like(query: &str) -> Option<String> {
    let at = query.find("Subject LIKE '")? + "Subject LIKE '".len();
    let mut out = String::new();
    let mut chars = query[at..].chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?),
            '\'' => return Some(out),
            c => out.push(c),
        }
    }
    None
}

#[derive(Deserialize)]
struct SearchParams {
    query: Option<String>,
}

async fn search(
    State(hub): State<Arc<Hub>>,
    params: Result<Query<SearchParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Some(needle) = params
        .ok()
        .and_then(|Query(p)| p.query)
        .as_deref()
        .and_then(subject_like)
        .map(|s| s.to_lowercase())
    else {
        return error(StatusCode::BAD_REQUEST, "query must hold Subject LIKE '…'");
    };
    let page = hub.list(
        |t| !t.trashed && t.subject.to_lowercase().contains(&needle),
        1,
        100,
    );
    let items: Vec<Value> = page
        .tickets
        .iter()
        .rev() // oldest first, as `orderby=Created&order=ASC` asks
        .map(|t| {
            json!({
                "type": "ticket",
                "id": t.id.to_string(),
                "_url": format!("/REST/2.0/ticket/{}", t.id),
                "Subject": t.subject,
                "Created": created(t),
                "Status": status(t),
            })
        })
        .collect();
    Json(json!({
        "count": items.len(),
        "page": 1,
        "per_page": 100,
        "total": page.total,
        "items": items,
    }))
    .into_response()
}

fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({ "message": "Resource does not exist" })),
    )
        .into_response()
}

async fn show(State(hub): State<Arc<Hub>>, Path(id): Path<u64>) -> Response {
    match hub.get(id) {
        Some(t) => Json(json!({
            "id": t.id,
            "Subject": t.subject,
            "Status": status(&t),
            "Created": created(&t),
            "Requestor": [{ "id": t.requester, "type": "user" }],
        }))
        .into_response(),
        None => not_found(),
    }
}

#[derive(Deserialize)]
struct Correspond {
    #[serde(rename = "Content")]
    content: String,
}

async fn correspond(
    State(hub): State<Arc<Hub>>,
    Path(id): Path<u64>,
    body: Result<Json<Correspond>, JsonRejection>,
) -> Response {
    let Ok(Json(c)) = body else {
        return error(StatusCode::BAD_REQUEST, "Content is required");
    };
    let lose = hub.faults.get(Stage::Api) == Fault::Drop;
    match hub.post_reply(id, c.content, lose) {
        Ok(_) => (
            StatusCode::CREATED,
            Json(json!([format!("Correspondence added")])),
        )
            .into_response(),
        Err(_) => not_found(),
    }
}

#[derive(Deserialize)]
struct Update {
    #[serde(rename = "Status")]
    status: Option<String>,
}

async fn update(
    State(hub): State<Arc<Hub>>,
    Path(id): Path<u64>,
    body: Result<Json<Update>, JsonRejection>,
) -> Response {
    let Ok(Json(u)) = body else {
        return error(
            StatusCode::BAD_REQUEST,
            "a JSON object of fields is required",
        );
    };
    let Some(before) = hub.get(id) else {
        return not_found();
    };
    let changed = match u.status.as_deref() {
        None => Ok(()),
        Some("resolved") => hub.set_archived(id, true),
        Some("rejected" | "deleted") => hub.set_trashed(id, true),
        Some("open" | "new" | "stalled") => Ok(()),
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("'{other}' is not a valid status"),
            );
        }
    };
    match (changed, hub.get(id)) {
        (Ok(()), Some(after)) => Json(json!([format!(
            "Ticket {id}: Status changed from '{}' to '{}'",
            status(&before),
            status(&after)
        )]))
        .into_response(),
        _ => not_found(),
    }
}

/// The ticket's attachments: the mail that made it and every correspondence, `Content` base64
/// encoded as RT gives it.
async fn attachments(State(hub): State<Arc<Hub>>, Path(id): Path<u64>) -> Response {
    let Some(t) = hub.get(id) else {
        return not_found();
    };
    let items: Vec<Value> = std::iter::once(&t.body)
        .chain(t.replies.iter().map(|r| &r.body))
        .enumerate()
        .map(|(i, body)| {
            json!({
                "type": "attachment",
                "id": (t.id * 1000 + i as u64).to_string(),
                "Content": base64(body.as_bytes()),
                // RT keeps the mail's Message-ID without its brackets; its replies' here are
                // RT's own, which the sandbox does not make up.
                "MessageId": if i == 0 { t.message_id.as_str() } else { "" },
            })
        })
        .collect();
    Json(json!({ "count": items.len(), "page": 1, "per_page": 100, "total": items.len(), "items": items }))
        .into_response()
}

/// Standard base64 with padding, lines of 76 as Perl's MIME::Base64 writes.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for (i, chunk) in data.chunks(3).enumerate() {
        if i > 0 && i % 19 == 0 {
            out.push('\n');
        }
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out.push('\n');
    out
}

/// RT's DELETE only sets the status `deleted`.
async fn delete(State(hub): State<Arc<Hub>>, Path(id): Path<u64>) -> Response {
    match hub.set_trashed(id, true) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(_) => not_found(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_what_perl_writes() {
        assert_eq!(base64(b"hello mcreply-x"), "aGVsbG8gbWNyZXBseS14\n");
        assert_eq!(base64(b"hi"), "aGk=\n");
        assert_eq!(base64(&[b'a'; 60]).lines().next().unwrap().len(), 76);
    }

    #[test]
    fn the_subject_literal_is_read_from_ticketsql() {
        assert_eq!(
            subject_like("Subject LIKE 'mc-abc' AND Created > '2026-11-30'").as_deref(),
            Some("mc-abc")
        );
        assert_eq!(
            subject_like(r"Subject LIKE 'it\'s'").as_deref(),
            Some("it's")
        );
        assert_eq!(subject_like("Status = 'new'"), None);
        assert_eq!(subject_like("Subject LIKE 'open"), None);
    }
}
