//! The prober's HTTP surface. It reads state; it never drives a canary.
//!
//! | method | path | |
//! |---|---|---|
//! | GET | `/metrics` | Prometheus text exposition |
//! | GET | `/healthz` | the process is alive (always 200) |
//! | GET | `/readyz` | 200 once config is loaded and the ledger open, else 503 |
//! | GET | `/api/v1/status` | probes, stages, in-flight and recent canaries, as JSON |
//! | GET | `/` | the same, as a page for humans |

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

use crate::{
    canary::life::{Canary, Outcome},
    flow::{Engine, engine::ProbeStatus, now_ms},
};

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

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn canary_row(c: &Canary, now: u64) -> String {
    let mut cells = String::new();
    for (stage, r) in &c.stages {
        let text = match (r.started_ms, r.done_ms, &r.failed) {
            (_, _, Some(f)) => format!("failed: {} ({})", f.reason, esc(&f.detail)),
            (Some(s), Some(d), _) => format!(
                "{:.2}s{}",
                (d.saturating_sub(s)) as f64 / 1000.0,
                if r.overdue { " late" } else { "" }
            ),
            (Some(s), None, _) if !c.is_finished() => format!(
                "in flight {:.1}s{}",
                now.saturating_sub(s) as f64 / 1000.0,
                if r.overdue { " OVERDUE" } else { "" }
            ),
            _ => "–".to_string(),
        };
        cells.push_str(&format!("<td class=\"{}\">{}: {}</td>", stage, stage, text));
    }
    let outcome = match c.outcome {
        None => "in flight",
        Some(Outcome::OnTime) => "on time",
        Some(Outcome::Late) => "late",
        Some(Outcome::Failed) => "failed",
        Some(Outcome::Lost) => "lost",
    };
    format!(
        "<tr><td>{}</td><td>{}</td>{}</tr>",
        esc(&c.id),
        outcome,
        cells
    )
}

fn probe_section(p: &ProbeStatus, now: u64) -> String {
    let mut rows = String::new();
    for c in p.in_flight.iter().chain(p.recent.iter()).take(50) {
        rows.push_str(&canary_row(c, now));
    }
    let stages: String = p
        .stages
        .iter()
        .map(|s| {
            format!(
                "<li>{}: {} in flight{}</li>",
                s.stage,
                s.in_flight,
                s.oldest_in_flight_ms
                    .map(|a| format!(", oldest {:.1}s", a as f64 / 1000.0))
                    .unwrap_or_default()
            )
        })
        .collect();
    format!(
        "<section class=\"probe {state}\"><h2>{name} <span class=\"state\">{state}</span></h2>\
         <p class=\"why\">{why}</p><ul>{stages}</ul><table>{rows}</table></section>",
        state = p.state,
        name = esc(&p.name),
        why = esc(&p.why),
    )
}

async fn page(State(s): State<WebState>) -> Html<String> {
    let now = now_ms();
    let body: String = s
        .engine
        .status(now)
        .iter()
        .map(|p| probe_section(p, now))
        .collect();
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>mailcanary</title>\
         <meta http-equiv=\"refresh\" content=\"5\">\
         <style>body{{font-family:sans-serif}} .failing .state{{color:#b00}} .ok .state{{color:#070}} \
         .degraded .state{{color:#a60}} td{{padding:2px 8px;border-bottom:1px solid #ddd}}</style>\
         </head><body><h1>mailcanary</h1>{body}\
         <p><a href=\"/api/v1/status\">status JSON</a> · <a href=\"/metrics\">metrics</a></p></body></html>"
    ))
}
