//! The helpdesk's HTTP API: vendor dialects over the neutral ticket core, one file each, all
//! served at once under their vendors' own paths (so one sandbox serves every adapter):
//! `supportbee.rs` (the root paths below), `rt.rs` (`/REST/2.0/…`, Request Tracker 5's REST2),
//! `django_helpdesk.rs` (`/api/…`, django-helpdesk's DRF API), `zammad.rs` (`/api/v1/…`,
//! Zammad's REST API; its segment `v1` is no django-helpdesk route), `zendesk.rs`
//! (`/api/v2/….json`, Zendesk Support's REST API), `freshdesk.rs` (`/api/v2/…`, Freshdesk's
//! API v2; it conflicts with Zendesk's: `--api` picks) and `front.rs` (`/conversations…`,
//! `/inboxes/…`, Front's Core API); plus the sandbox's own
//! control endpoints, which every dialect shares. Adding a vendor is one file here and its
//! `DIALECT` in [`DIALECTS`].
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
mod freshdesk;
mod front;
mod helpscout;
mod rt;
mod supportbee;
mod zammad;
mod zendesk;

/// A vendor's ticket-created webhook for a ticket: `(ticket, secret, now)` to the body and
/// the headers, signed in the vendor's scheme.
pub type SignedWebhook =
    fn(&Ticket, &str, std::time::SystemTime) -> (Vec<u8>, Vec<(String, String)>);

/// One vendor's dialect: its routes and what the shared layers need to speak for it.
pub struct Dialect {
    /// As `mailcanary sandbox --api` and the prober's `helpdesk.api` name it.
    pub name: &'static str,
    pub routes: fn(Arc<Hub>) -> Router<Arc<Hub>>,
    /// The path prefixes it serves (how the rate limiter knows whose headers to send; the
    /// longest match wins).
    pub prefixes: &'static [&'static str],
    /// Its rate-limit headers on every answer, `(limit, remaining)`, if the vendor sends them.
    pub rate_headers: Option<(&'static str, &'static str)>,
    /// Its ticket-created webhook for `ticket`: body and headers, signed with `secret` at
    /// `now` in the vendor's scheme; `None` if the vendor has no webhooks.
    pub webhook: Option<SignedWebhook>,
    /// Dialects that claim the same paths: only one of them is served, `--api`'s if it is one.
    pub conflicts: &'static [&'static str],
    /// Whether the vendor acknowledges a new ticket by mail out of the box (a default trigger,
    /// scrip or notification): then `--api` this dialect acknowledges unless `--auto-ack off`.
    pub acknowledges: bool,
}

/// Every dialect, in the order they are tried.
pub const DIALECTS: &[Dialect] = &[
    supportbee::DIALECT,
    rt::DIALECT,
    django_helpdesk::DIALECT,
    zammad::DIALECT,
    zendesk::DIALECT,
    front::DIALECT,
    helpscout::DIALECT,
    freshdesk::DIALECT,
];

/// The dialect called `name`.
pub fn dialect(name: &str) -> Option<&'static Dialect> {
    DIALECTS.iter().find(|d| d.name == name)
}

/// The dialects served: `--api`'s, then every other one that claims no path of one already
/// served.
fn served(api: &str) -> Vec<&'static Dialect> {
    let mut out: Vec<&'static Dialect> = dialect(api).into_iter().collect();
    for d in DIALECTS {
        let clash = out.iter().any(|m| {
            m.name == d.name || m.conflicts.contains(&d.name) || d.conflicts.contains(&m.name)
        });
        if !clash {
            out.push(d);
        }
    }
    out
}

/// Sends `ticket`'s ticket-created webhook to `url` in the `--api` dialect's scheme, in the
/// background (a webhook is best effort for the vendor too; the ground truth is the API).
pub fn send_webhook(config: &crate::sandbox::SandboxConfig, url: &str, ticket: &Ticket) {
    let Some(make) = dialect(&config.api).and_then(|d| d.webhook) else {
        return;
    };
    let (body, headers) = make(ticket, &config.webhook_secret, std::time::SystemTime::now());
    let url = url.to_string();
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    rt.spawn(async move {
        let client = match crate::edges::rustls_client_config(None).map(|tls| {
            reqwest::Client::builder()
                .tls_backend_preconfigured(tls)
                .timeout(std::time::Duration::from_secs(5))
                .build()
        }) {
            Ok(Ok(c)) => c,
            _ => return,
        };
        let mut req = client
            .post(&url)
            .header("content-type", "application/json")
            .body(body);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        match req.send().await {
            Ok(r) => tracing::debug!(status = %r.status(), "sandbox webhook sent"),
            Err(e) => tracing::warn!(error = %e, "sandbox webhook failed"),
        }
    });
}

/// `rate_limit` requests a minute (a fixed window): past it, 429 with `Retry-After` and the
/// vendor's headers; within it, the vendor's headers on every answer.
async fn rate_limit(State(hub): State<Arc<Hub>>, req: Request, next: Next) -> Response {
    let Some(limit) = hub.config.rate_limit else {
        return next.run(req).await;
    };
    let path = req.uri().path();
    // The served dialect with the longest prefix of the path (`/api/v2/` before `/api/`).
    let headers = served(&hub.config.api)
        .into_iter()
        .filter_map(|d| {
            let p = d
                .prefixes
                .iter()
                .filter(|p| path.starts_with(**p))
                .map(|p| p.len())
                .max()?;
            Some((p, d))
        })
        .max_by_key(|(p, _)| *p)
        .and_then(|(_, d)| d.rate_headers);
    let (used, reset) = {
        let mut w = hub.rate.lock().unwrap_or_else(|p| p.into_inner());
        let now = tokio::time::Instant::now();
        if now.duration_since(w.0) >= hub.config.rate_window {
            *w = (now, 0);
        }
        w.1 += 1;
        (
            w.1,
            hub.config
                .rate_window
                .saturating_sub(now.duration_since(w.0)),
        )
    };
    let remaining = limit.saturating_sub(used);
    let mut response = if used > limit {
        let mut r = error(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded");
        let secs = reset.as_secs().max(1).to_string();
        r.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            secs.parse().expect("digits"),
        );
        r
    } else {
        next.run(req).await
    };
    if let Some((limit_h, remaining_h)) = headers {
        let h = response.headers_mut();
        h.insert(limit_h, limit.to_string().parse().expect("digits"));
        h.insert(remaining_h, remaining.to_string().parse().expect("digits"));
    }
    response
}

use super::{
    faults::{Fault, Stage},
    helpdesk::{Hub, Ticket},
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
    let mut helpdesk = Router::new();
    for d in served(&hub.config.api) {
        helpdesk = helpdesk.merge((d.routes)(hub.clone()));
    }
    let faulted = helpdesk
        .route("/health", get(health))
        .layer(middleware::from_fn_with_state(hub.clone(), api_fault))
        .layer(middleware::from_fn_with_state(hub.clone(), rate_limit));
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
