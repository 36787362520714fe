//! django-helpdesk's dialect of the sandbox API (`/api/…`, Django REST Framework), with the
//! shapes measured on django-helpdesk 2.6.1: `Authorization: Token …`, DRF pages of tickets
//! ordered by id ascending (`page=last` works), no created time on a ticket but its first
//! follow-up's `date`, replies as public follow-ups.
//!
//! | method | path | |
//! |---|---|---|
//! | GET | `/api/tickets/` | `status=1,2`, `page_size`, `page` (a number or `last`) |
//! | GET | `/api/tickets/{id}/` | one ticket with its `followup_set` |
//! | PATCH | `/api/tickets/{id}/` | `{"status": 4}` closes |
//! | DELETE | `/api/tickets/{id}/` | 204 |
//! | POST | `/api/followups/` | `{"ticket": ID, "comment": …, "public": true}` → 201, mailed |

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, Query, Request, State, rejection::JsonRejection},
    http::{HeaderMap, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::sandbox::{
    faults::{Fault, Stage},
    helpdesk::{Hub, Ticket},
};

/// django-helpdesk: `Authorization: Token …` (DRF); no rate limit, no webhooks.
pub const DIALECT: super::Dialect = super::Dialect {
    name: "django-helpdesk",
    routes,
    prefixes: &["/api/"],
    rate_headers: None,
    webhook: None,
    conflicts: &[],
    // django-helpdesk mails the submitter "(Opened)" for every new ticket (seen on the real one in the suite).
    acknowledges: true,
};

/// django-helpdesk's `Ticket.OPEN_STATUS`, `REOPENED_STATUS`, `CLOSED_STATUS`.
const OPEN: u64 = 1;
const REOPENED: u64 = 2;
const CLOSED: u64 = 4;

pub fn routes(hub: Arc<Hub>) -> Router<Arc<Hub>> {
    Router::new()
        .route("/api/tickets/", get(list))
        .route("/api/tickets/{id}/", get(show).patch(update).delete(delete))
        .route("/api/followups/", post(follow_up))
        .route_layer(middleware::from_fn_with_state(hub, require_token))
}

fn detail(status: StatusCode, text: &str) -> Response {
    (status, Json(json!({ "detail": text }))).into_response()
}

async fn require_token(State(hub): State<Arc<Hub>>, req: Request, next: Next) -> Response {
    if super::authorized(&hub, &req, "Token") {
        next.run(req).await
    } else {
        detail(
            StatusCode::UNAUTHORIZED,
            "Authentication credentials were not provided.",
        )
    }
}

fn status(t: &Ticket) -> u64 {
    if t.archived { CLOSED } else { OPEN }
}

fn date(t: &crate::sandbox::events::Timestamp) -> String {
    t.0.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn ticket_json(t: &Ticket) -> Value {
    // The import's follow-up first (its date is the ticket's only created time), then the
    // agent's public follow-ups.
    let mut followups = vec![json!({
        "id": t.id * 1000,
        "ticket": t.id,
        "title": format!("E-Mail Received from {}", t.requester),
        "comment": t.body,
        "public": true,
        "date": date(&t.created_at),
        "message_id": t.message_id,
    })];
    followups.extend(t.replies.iter().map(|r| {
        json!({
            "id": t.id * 1000 + 1 + r.id,
            "ticket": t.id,
            "title": "Comment",
            "comment": r.body,
            "public": true,
            "date": date(&r.created_at),
            "message_id": null,
        })
    }));
    json!({
        "id": t.id,
        "queue": 1,
        "title": t.subject,
        "description": t.body,
        "submitter_email": t.requester,
        "status": status(t),
        "followup_set": followups,
    })
}

#[derive(Deserialize)]
struct ListParams {
    status: Option<String>,
    page: Option<String>,
    page_size: Option<usize>,
}

async fn list(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(p)) = params else {
        return detail(StatusCode::BAD_REQUEST, "invalid query parameters");
    };
    let wanted: Option<Vec<u64>> = match p.status.as_deref() {
        None => None,
        Some(s) => match s.split(',').map(|x| x.trim().parse::<u64>()).collect() {
            Ok(v) => Some(v),
            Err(_) => return detail(StatusCode::BAD_REQUEST, "status must be numbers"),
        },
    };
    let keep = |t: &Ticket| !t.trashed && wanted.as_ref().is_none_or(|w| w.contains(&status(t)));
    // Every match, oldest (lowest id) first.
    let mut all = hub.list(keep, 1, usize::MAX).tickets;
    all.reverse();
    let size = p.page_size.unwrap_or(10).clamp(1, 1000);
    let pages = all.len().div_ceil(size).max(1);
    let page = match p.page.as_deref() {
        None => 1,
        Some("last") => pages,
        Some(n) => match n.parse::<usize>() {
            Ok(n) if (1..=pages).contains(&n) => n,
            _ => return detail(StatusCode::NOT_FOUND, "Invalid page."),
        },
    };
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    let link = |n: usize| {
        let mut url = format!("http://{host}/api/tickets/?page_size={size}");
        if n > 1 {
            url.push_str(&format!("&page={n}"));
        }
        if let Some(s) = &p.status {
            url.push_str(&format!("&status={s}"));
        }
        url
    };
    let results: Vec<Value> = all
        .iter()
        .skip((page - 1) * size)
        .take(size)
        .map(ticket_json)
        .collect();
    Json(json!({
        "count": all.len(),
        "next": (page < pages).then(|| link(page + 1)),
        "previous": (page > 1).then(|| link(page - 1)),
        "results": results,
    }))
    .into_response()
}

fn no_ticket() -> Response {
    detail(StatusCode::NOT_FOUND, "No Ticket matches the given query.")
}

async fn show(State(hub): State<Arc<Hub>>, Path(id): Path<u64>) -> Response {
    match hub.get(id).filter(|t| !t.trashed) {
        Some(t) => Json(ticket_json(&t)).into_response(),
        None => no_ticket(),
    }
}

#[derive(Deserialize)]
struct Patch {
    status: Option<u64>,
}

async fn update(
    State(hub): State<Arc<Hub>>,
    Path(id): Path<u64>,
    body: Result<Json<Patch>, JsonRejection>,
) -> Response {
    let Ok(Json(patch)) = body else {
        return detail(StatusCode::BAD_REQUEST, "JSON parse error");
    };
    if hub.get(id).is_none_or(|t| t.trashed) {
        return no_ticket();
    }
    let result = match patch.status {
        None => Ok(()),
        Some(CLOSED) => hub.set_archived(id, true),
        Some(OPEN | REOPENED) => hub.set_archived(id, false),
        Some(other) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({ "status": [format!("\"{other}\" is not a valid choice.")] })),
            )
                .into_response();
        }
    };
    match (result, hub.get(id)) {
        (Ok(()), Some(t)) => Json(ticket_json(&t)).into_response(),
        _ => no_ticket(),
    }
}

async fn delete(State(hub): State<Arc<Hub>>, Path(id): Path<u64>) -> Response {
    if hub.set_trashed(id, true).is_err() || hub.delete(id).is_err() {
        return no_ticket();
    }
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize)]
struct FollowUp {
    ticket: u64,
    comment: String,
    #[serde(default)]
    public: bool,
}

async fn follow_up(
    State(hub): State<Arc<Hub>>,
    body: Result<Json<FollowUp>, JsonRejection>,
) -> Response {
    let f = match body {
        Ok(Json(f)) => f,
        Err(e) => return detail(StatusCode::BAD_REQUEST, &e.body_text()),
    };
    if !f.public {
        // A private follow-up is a staff note: never mailed. The sandbox does not keep notes.
        return detail(
            StatusCode::BAD_REQUEST,
            "sandbox: private follow-ups (internal notes) are not modelled",
        );
    }
    let lose = hub.faults.get(Stage::Api) == Fault::Drop;
    match hub.post_reply(f.ticket, f.comment, lose) {
        Ok(r) => (
            StatusCode::CREATED,
            Json(json!({
                "id": f.ticket * 1000 + 1 + r.id,
                "ticket": f.ticket,
                "comment": r.body,
                "public": true,
                "date": date(&r.created_at),
            })),
        )
            .into_response(),
        Err(_) => (
            StatusCode::BAD_REQUEST,
            Json(json!({ "ticket": [format!("Invalid pk \"{}\" - object does not exist.", f.ticket)] })),
        )
            .into_response(),
    }
}
