//! The prober's HTTP surface. It reads state; it never drives a canary.
//!
//! | method | path | |
//! |---|---|---|
//! | GET | `/metrics` | Prometheus text exposition |
//! | GET | `/healthz` | the process is alive (always 200) |
//! | GET | `/readyz` | 200 once config is loaded and the ledger open, else 503 |
//! | GET | `/api/v1/status` | probes, stages, in-flight and recent canaries, as JSON |
//! | GET | `/` | the dashboard: the same data, for humans (`page.rs`) |

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::{Html, IntoResponse, Response},
    routing::get,
};
use serde_json::json;

use crate::flow::{Engine, now_ms};

mod page;

#[derive(Clone)]
pub struct WebState {
    pub engine: Arc<Engine>,
    pub ready: Arc<AtomicBool>,
}

pub fn router(state: WebState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/v1/status", get(status))
        .route("/", get(page))
        .with_state(state)
}

async fn metrics(State(s): State<WebState>) -> Response {
    // Refresh the gauges at scrape time so `oldest_in_flight` is exact, not up to a tick old.
    s.engine.tick(now_ms());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.engine.metrics().render(),
    )
        .into_response()
}

async fn readyz(State(s): State<WebState>) -> Response {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
    }
}

async fn status(State(s): State<WebState>) -> Response {
    let now = now_ms();
    Json(json!({ "now_ms": now, "probes": s.engine.status(now) })).into_response()
}

async fn page(State(s): State<WebState>) -> Html<String> {
    let now = now_ms();
    Html(page::render(&s.engine.status(now), now))
}
