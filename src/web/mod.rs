//! The prober's HTTP surface. It reads state; it never drives a canary.
//!
//! | method | path | |
//! |---|---|---|
//! | GET | `/metrics` | Prometheus text exposition |
//! | GET | `/healthz` | the process is alive (always 200) |
//! | GET | `/readyz` | 200 once config is loaded and while the ledger can be written, else 503 with why |
//! | GET | `/api/v1/status` | probes, stages, in-flight and recent canaries, as JSON |
//! | GET | `/api/v1/history` | per probe and stage: latency over 24 h, on-time share over 24 h and 7 d |
//! | GET | `/` | the dashboard: the same data, for humans (`page.rs`) |
//! | POST | `/webhooks/{probe}` | a ticket-created webhook, signed as the probe's vendor signs, else `Authorization: Bearer SECRET` or `?secret=SECRET` |
//!
//! The webhook is the one route that leads to a canary changing, and it does so only through
//! the flow (`flow::webhook`): this layer authenticates and forwards.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{Html, IntoResponse, Response},
    routing::{get, post},
};
use serde_json::json;

use crate::flow::{Engine, Probe, now_ms, webhook::ticket_created};

pub mod exposure;
mod page;
pub mod serve;

#[derive(Clone)]
pub struct WebState {
    pub engine: Arc<Engine>,
    pub ready: Arc<AtomicBool>,
    /// The probes, for webhooks (their names, keys and webhook secrets).
    pub probes: Vec<Arc<Probe>>,
}

pub fn router(state: WebState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/v1/status", get(status))
        .route("/api/v1/incidents", get(incidents))
        .route("/api/v1/history", get(history))
        .route("/", get(page))
        .route(
            "/webhooks/{probe}",
            post(webhook).layer(axum::extract::DefaultBodyLimit::max(
                crate::edges::helpdesk::webhook::MAX_BODY,
            )),
        )
        .layer(axum::extract::DefaultBodyLimit::max(serve::MAX_BODY))
        .with_state(state)
}

async fn metrics(State(s): State<WebState>) -> Response {
    // A scrape only reads the registry: the ticker (every 250 ms) moves time for the canaries
    // and sets the gauges, so `oldest_in_flight` is at most a tick old. A scrape used to run the
    // tick itself, which commits overdue transitions under the engine's lock: with 1,000
    // canaries going overdue at once it waited seconds on that work, past Prometheus's scrape
    // timeout, and the prober looked down exactly when it was busiest.
    // Off the async workers: rendering 1,000 probes takes about 0.2 s of CPU, which IMAP
    // watchers and timers must not wait for. The exposition is cached between changes
    // (`Metrics::exposition`), so that is paid only when something a scrape shows moved.
    let engine = s.engine.clone();
    let rendered = tokio::task::spawn_blocking(move || engine.metrics().exposition_parts()).await;
    match rendered {
        Ok(parts) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            axum::body::Body::from_stream(futures::stream::iter(
                parts.map(Ok::<_, std::convert::Infallible>),
            )),
        )
            .into_response(),
        Err(err) => {
            tracing::error!(error = %err, "rendering metrics");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "rendering metrics failed\n",
            )
                .into_response()
        }
    }
}

async fn readyz(State(s): State<WebState>) -> Response {
    if !s.ready.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response();
    }
    match s.engine.ledger_error() {
        None => (StatusCode::OK, "ready\n").into_response(),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: the ledger cannot be written, so no canary is sent: {why}\n"),
        )
            .into_response(),
    }
}

async fn status(State(s): State<WebState>) -> Response {
    let now = now_ms();
    Json(json!({ "now_ms": now, "probes": s.engine.status(now) })).into_response()
}

/// Every probe's incidents, open first, then newest first. Times are canary times
/// (`now_ms` is the same clock); `wall_offset_ms` moves them onto the wall clock.
async fn incidents(State(s): State<WebState>) -> Response {
    let now = now_ms();
    Json(json!({
        "now_ms": now,
        "wall_offset_ms": crate::clock::to_wall_ms(now) as i64 - now as i64,
        "incidents": s.engine.incidents(),
    }))
    .into_response()
}

/// Per probe and stage: latency over the last 24 h (10-minute bins) and the share on time
/// over 24 h and 7 d, with the last 7 days by the hour. Times are wall-clock ms.
async fn history(State(s): State<WebState>) -> Response {
    let now = crate::clock::to_wall_ms(now_ms());
    let probes: Vec<serde_json::Value> = s
        .engine
        .history(now)
        .into_iter()
        .map(|(name, stages)| json!({ "name": name, "stages": stages }))
        .collect();
    Json(json!({ "now_wall_ms": now, "probes": probes })).into_response()
}

async fn page(State(s): State<WebState>) -> Html<String> {
    let now = now_ms();
    Html(page::render(
        &s.engine.status(now),
        &s.engine.incidents(),
        &s.engine.history(crate::clock::to_wall_ms(now)),
        now,
    ))
}

#[derive(serde::Deserialize)]
struct SecretParam {
    secret: Option<String>,
}

/// A ticket-created webhook. Authenticated as the probe's vendor signs (or with the bearer
/// secret where it does not sign): 401 when not authentic, 413 past the body cap. An
/// authentic one is answered 202 whatever it names, garbage included, since vendors disable
/// an endpoint that keeps failing; it hints the canaries it names, whose runs then ask the API.
async fn webhook(
    State(s): State<WebState>,
    Path(name): Path<String>,
    Query(q): Query<SecretParam>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    use crate::edges::helpdesk::webhook::{Delivery, Verdict};
    let Some(probe) = s.probes.iter().find(|p| p.name == name) else {
        return (StatusCode::NOT_FOUND, "no such probe\n").into_response();
    };
    let Some(secret) = &probe.webhook_secret else {
        return (
            StatusCode::FORBIDDEN,
            "webhooks are not enabled for this probe (set helpdesk.webhook_secret)\n",
        )
            .into_response();
    };
    let delivery = Delivery {
        headers: &headers,
        query_secret: q.secret.as_deref(),
        body: &body,
        now: std::time::SystemTime::now(),
    };
    match (probe.webhook_verify)(secret, &delivery) {
        Verdict::Refused(why) => {
            s.engine.metrics().webhook(&probe.name, "refused");
            tracing::debug!(probe = %probe.name, why, "webhook refused");
            return (StatusCode::UNAUTHORIZED, format!("{why}\n")).into_response();
        }
        Verdict::Challenge(echo) => {
            s.engine.metrics().webhook(&probe.name, "challenge");
            return (StatusCode::OK, echo).into_response();
        }
        Verdict::Authentic => s.engine.metrics().webhook(&probe.name, "authentic"),
    }
    let matched = match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(payload) => ticket_created(&s.engine, &s.probes, probe, &payload),
        Err(e) => {
            tracing::debug!(probe = %probe.name, error = %e, "authentic webhook without JSON; nothing to hint");
            Default::default()
        }
    };
    (StatusCode::ACCEPTED, Json(matched)).into_response()
}
