//! The helpdesk's HTTP API: a vendor dialect over the neutral ticket core (`supportbee.rs`:
//! SupportBee's), plus the sandbox's own control endpoints, which every dialect shares.
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
//! Helpdesk routes need `auth_token` (query, as SupportBee does); `/health` and `/sandbox/*` do
//! not, and `/sandbox/*` is never faulted, so a fault can always be cleared.

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
    // The vendor's dialect over the neutral ticket core (`helpdesk.rs`): its routes, its JSON,
    // its authentication. A second dialect is one more file here and one more `merge`.
    let helpdesk = supportbee::routes(hub.clone());
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
            (Ok(s), Ok(f)) => parsed.push((s, f)),
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
