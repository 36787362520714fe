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
//! | POST | `/webhooks/{probe}` | a ticket-created webhook; `Authorization: Bearer SECRET` or `?secret=SECRET` |
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

mod page;

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
        .route("/webhooks/{probe}", post(webhook))
        .with_state(state)
}

async fn metrics(State(s): State<WebState>) -> Response {
    // A scrape only reads the registry: the ticker (every 250 ms) moves time for the canaries
    // and sets the gauges, so `oldest_in_flight` is at most a tick old. A scrape used to run the
    // tick itself, which commits overdue transitions under the engine's lock: with 1,000
    // canaries going overdue at once it waited seconds on that work, past Prometheus's scrape
    // timeout, and the prober looked down exactly when it was busiest.
    // Off the async workers: rendering 1,000 probes takes about 0.2 s of CPU, which IMAP
    // watchers and timers must not wait for.
    let engine = s.engine.clone();
    let rendered = tokio::task::spawn_blocking(move || engine.metrics().render()).await;
    match rendered {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            body,
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

/// Compares without an early exit, so the time taken does not reveal how much matched.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

async fn webhook(
    State(s): State<WebState>,
    Path(name): Path<String>,
    Query(q): Query<SecretParam>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(probe) = s.probes.iter().find(|p| p.name == name) else {
        return (StatusCode::NOT_FOUND, "no such probe\n").into_response();
    };
    let Some(expected) = &probe.webhook_secret else {
        return (
            StatusCode::FORBIDDEN,
            "webhooks are not enabled for this probe (set helpdesk.webhook_secret)\n",
        )
            .into_response();
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string)
        .or(q.secret);
    if !given.is_some_and(|g| same_secret(&g, expected)) {
        return (StatusCode::UNAUTHORIZED, "bad or missing webhook secret\n").into_response();
    }
    let Ok(payload) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "the body must be JSON\n").into_response();
    };
    let matched = ticket_created(&s.engine, probe, &payload);
    (StatusCode::ACCEPTED, Json(matched)).into_response()
}
