//! The helpdesk's HTTP API: vendor dialects over the neutral ticket core, one file each, all
//! served at once under their vendors' own paths (so one sandbox serves every adapter):
//! `supportbee.rs` (the root paths below), `rt.rs` (`/REST/2.0/…`, Request Tracker 5's REST2)
//! and `django_helpdesk.rs` (`/api/…`, django-helpdesk's DRF API); plus the sandbox's own
//! control endpoints, which every dialect shares. Adding a vendor is one file here and one
//! `merge` in [`router`].
//!
//! SupportBee's routes:
//!
//! | method | path | |
//! |---|---|---|
//! | GET | `/health` | 200 unless the `api` stage is faulted (the "web app looks healthy") |
//! | GET | `/tickets` | `since`, `requester_emails`, `archived`, `trash`, `page`, `per_page` |
//! | GET | `/tickets/search` | `query` matches subject and body |
//! | GET | `/tickets/{id}` | one ticket |
//! | POST | `/tickets/{id}/replies` | `{"reply":{"content_attributes":{"body":"…"}}}` → 201 |
//! | POST/DELETE | `/tickets/{id}/archive` | archive / unarchive → 204 |
//! | POST/DELETE | `/tickets/{id}/trash` | trash / untrash → 204 |
//! | DELETE | `/tickets/{id}` | delete a trashed ticket → 204 |
//! | GET/PUT | `/sandbox/faults` | all faults / set some (`{"import":"stall"}`) |
//! | GET | `/sandbox/events` | ground truth, `?after=SEQ` |
//!
//! Each dialect authenticates the way its vendor does (SupportBee: `auth_token` in the query;
//! RT: `Authorization: token …`; django-helpdesk: `Authorization: Token …`), all with the
//! sandbox's API token; `/health` and `/sandbox/*` need none, and `/sandbox/*` is never
//! faulted, so a fault can always be cleared.
//!
//! The `api` fault applies to every dialect alike: `error` answers 500, `throttle` 429 with
//! `Retry-After: 1`, `garbage` 200 with an HTML page where JSON belongs, `stall` and `delay`
//! hold requests, `drop` answers success and loses the change.

use std::{collections::BTreeMap, sync::Arc};

use axum::{
    Json, Router,
    extract::{Query, Request, State},
    http::StatusCode,
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

mod django_helpdesk;
mod rt;
mod supportbee;

use super::{
    faults::{Fault, Stage},
    helpdesk::Hub,
};

pub async fn serve(listener: TcpListener, hub: Arc<Hub>, shutdown: CancellationToken) {
    let app = router(hub);
    let _ = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
}

/// The whole HTTP surface; public so tests can drive it without a socket.
pub fn router(hub: Arc<Hub>) -> Router {
    // The vendors' dialects over the neutral ticket core (`helpdesk.rs`): their routes, their
    // JSON, their authentication, under paths that do not overlap.
    let helpdesk = supportbee::routes(hub.clone())
        .merge(rt::routes(hub.clone()))
        .merge(django_helpdesk::routes(hub.clone()));
    let faulted = helpdesk
        .route("/health", get(health))
        .layer(middleware::from_fn_with_state(hub.clone(), api_fault));
    Router::new()
        .route("/sandbox/faults", get(get_faults).put(put_faults))
        .route("/sandbox/events", get(get_events))
        .merge(faulted)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint") })
        .with_state(hub)
}

/// Whether `req` carries `Authorization: {scheme} {the sandbox's API token}` (RT's `token`,
/// django-helpdesk's `Token`).
fn authorized(hub: &Hub, req: &Request, scheme: &str) -> bool {
    req.headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix(scheme))
        .and_then(|v| v.strip_prefix(' '))
        == Some(hub.config.api_token.as_str())
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

/// Applies the `api` fault. `drop` is handled by the write handlers: they answer success and do
/// nothing, the way a web app whose job enqueue silently fails does.
async fn api_fault(State(hub): State<Arc<Hub>>, req: Request, next: Next) -> Response {
    let fault = match hub.faults.get(Stage::Api) {
        Fault::Stall => hub.faults.wait_unstalled(Stage::Api).await,
        f => f,
    };
    match fault {
        Fault::Error => error(StatusCode::INTERNAL_SERVER_ERROR, "internal server error"),
        Fault::Throttle => (
            StatusCode::TOO_MANY_REQUESTS,
            [(axum::http::header::RETRY_AFTER, "1")],
            Json(json!({ "error": "rate limit exceeded" })),
        )
            .into_response(),
        // A proxy's or framework's error page where the API's JSON belongs.
        Fault::Garbage => (
            StatusCode::OK,
            [(axum::http::header::CONTENT_TYPE, "text/html")],
            "<!doctype html><html><body><h1>Welcome</h1></body></html>",
        )
            .into_response(),
        Fault::Delay(d) => {
            tokio::time::sleep(d).await;
            next.run(req).await
        }
        _ => next.run(req).await,
    }
}

async fn health(State(_hub): State<Arc<Hub>>) -> Response {
    Json(json!({ "status": "ok" })).into_response()
}

async fn get_faults(State(hub): State<Arc<Hub>>) -> Response {
    Json(hub.faults.all()).into_response()
}

async fn put_faults(State(hub): State<Arc<Hub>>, body: axum::body::Bytes) -> Response {
    // Parsed whatever the Content-Type says: `curl -d '{"import":"stall"}'` must just work.
    let Ok(changes) = serde_json::from_slice::<BTreeMap<String, String>>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "expected a JSON object such as {\"import\": \"stall\"}",
        );
    };
    // Validate everything first so a bad entry changes nothing.
    let mut parsed = Vec::new();
    for (stage, mode) in &changes {
        match (stage.parse::<Stage>(), mode.parse::<Fault>()) {
            (Ok(s), Ok(f)) => match f.check_stage(s) {
                Ok(()) => parsed.push((s, f)),
                Err(e) => return error(StatusCode::BAD_REQUEST, &e),
            },
            (Err(e), _) | (_, Err(e)) => return error(StatusCode::BAD_REQUEST, &e),
        }
    }
    for (s, f) in parsed {
        tracing::info!(stage = %s, fault = %f, "sandbox fault set");
        hub.faults.set(s, f);
    }
    Json(hub.faults.all()).into_response()
}

#[derive(Deserialize)]
struct EventParams {
    after: Option<u64>,
}

async fn get_events(
    State(hub): State<Arc<Hub>>,
    params: Result<Query<EventParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let after = params.ok().and_then(|Query(p)| p.after).unwrap_or(0);
    Json(json!({ "events": hub.events_since(after) })).into_response()
}
