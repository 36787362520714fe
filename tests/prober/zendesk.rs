//! The Zendesk adapter through whole canary lives on the sandbox speaking Zendesk's dialect:
//! a search index a minute behind does not delay the measured import (the ticket list is
//! read, not search); a rate limit that answers 429 is waited out (`Retry-After`) and its
//! remaining figure reaches `mailcanary_helpdesk_rate_limit_remaining`; the sandbox's own
//! signed ticket-created webhook ends the import stage before the next poll, while a tampered
//! or replayed delivery is refused.

use std::time::{Duration, Instant, SystemTime};

use mailcanary::{
    config,
    daemon::{Daemon, Options},
    sandbox::{Fault, Sandbox, SandboxConfig, Stage},
};
use serde_json::Value;

use crate::common::*;

const COMPLETED: &str = "mailcanary_canaries_completed_total";
const AGENT: &str = "agent@helpdesk.test";

/// The drill probe of `sb` on `api = "zendesk"`.
fn zendesk_text(sb: &Sandbox, k: &Knobs) -> String {
    zendesk_file(sb, k).render()
}

/// The drill config on Zendesk as the sandbox's agent.
fn zendesk_file(sb: &Sandbox, k: &Knobs) -> ConfigFile {
    let mut file = vendor_file(sb, k, "zendesk", "");
    file.probe_mut(PROBE)
        .helpdesk_mut()
        .set_vendor("zendesk", "email", AGENT);
    file
}

async fn zendesk_sandbox(f: impl FnOnce(&mut SandboxConfig)) -> Sandbox {
    vendor_sandbox("zendesk", f).await
}

/// `GET` on the sandbox's Zendesk API as the agent: status, rate-limit remaining header, JSON.
async fn api_get(sb: &Sandbox, path: &str) -> (u16, Option<String>, Value) {
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{AGENT}/token:sandbox"));
    let r = http()
        .get(format!("{}{path}", sb.api_url()))
        .header("authorization", format!("Basic {basic}"))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let left = r
        .headers()
        .get("x-rate-limit-remaining")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    (status, left, r.json().await.unwrap_or(Value::Null))
}

/// Search sees a ticket only a minute after it was made; the canaries' import (2 s deadline)
/// is measured from the ticket list, so it is on time all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zendesk_import_is_not_delayed_by_a_lagging_search_index() {
    let sb = zendesk_sandbox(|c| c.search_lag = Duration::from_secs(60)).await;
    // Archive (solve) rather than delete, so the tickets stay to be searched for below.
    let mut file = zendesk_file(&sb, &Knobs::default());
    file.probe_mut(PROBE).helpdesk_mut().cleanup = some("archive");
    let text = file.render();
    let cfg = config::parse_str(&text, "zendesk.toml").unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(&cfg, dir.path()).await;
    let s = until(d.addr, Duration::from_secs(30), "3 canaries", |s| {
        v(s, COMPLETED, &[]) >= 3.0
    })
    .await;
    no_failures(&s);
    let import = |m: &str| v(&s, m, &[("stage", "import")]);
    let (n, sum) = (
        import("mailcanary_stage_duration_seconds_count"),
        import("mailcanary_stage_duration_seconds_sum"),
    );
    assert!(n >= 3.0, "{n}");
    assert!(
        sum / n < 2.0,
        "mean import {:.2} s: delayed by the search lag",
        sum / n
    );
    // The index really lags: search finds none of the canaries, the list has them all.
    let (status, _, found) = api_get(&sb, "/api/v2/search.json?query=mailcanary").await;
    assert_eq!((status, &found["count"]), (200, &Value::from(0)), "{found}");
    let (_, _, list) = api_get(
        &sb,
        "/api/v2/tickets.json?sort_by=created_at&sort_order=desc",
    )
    .await;
    assert!(list["count"].as_u64().unwrap() >= 3, "{list}");
    d.stop().await;
    sb.shutdown().await;
}

/// The account's budget is spent before the prober starts: its calls meet 429 with
/// `Retry-After` until the minute ends, and the canaries complete once it has; the gauge shows
/// what Zendesk's `X-Rate-Limit-Remaining` said last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zendesk_canaries_complete_through_429s_and_the_gauge_shows_what_is_left() {
    const LIMIT: u32 = 20;
    let sb = zendesk_sandbox(|c| c.rate_limit = Some(LIMIT)).await;
    for _ in 0..LIMIT {
        assert_eq!(api_get(&sb, "/api/v2/tickets.json").await.0, 200);
    }
    let (status, left, _) = api_get(&sb, "/api/v2/tickets.json").await;
    assert_eq!((status, left.as_deref()), (429, Some("0")), "budget spent");

    let k = Knobs {
        interval: "15s",
        import_deadline: "90s",
        end_to_end: "3m",
        poll_interval: "1s",
        ..Knobs::default()
    };
    let cfg = config::parse_str(&zendesk_text(&sb, &k), "zendesk.toml").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(&cfg, dir.path()).await;
    let t0 = Instant::now();
    let s = until(d.addr, Duration::from_secs(150), "2 canaries", |s| {
        v(s, COMPLETED, &[]) >= 2.0
    })
    .await;
    assert!(
        t0.elapsed() > Duration::from_secs(20),
        "completed while the budget was spent? {:?}",
        t0.elapsed()
    );
    let left = s
        .value(
            "mailcanary_helpdesk_rate_limit_remaining",
            &[("probe", PROBE)],
        )
        .expect("the gauge is exported");
    assert!(
        left.is_finite() && left >= 0.0 && left < f64::from(LIMIT),
        "remaining {left}"
    );
    d.stop().await;
    sb.shutdown().await;
}

/// The tokens of the drill probe's canaries in flight past their submit stage.
async fn in_flight(port: u16) -> Vec<String> {
    let st = status(port).await.unwrap();
    st["probes"][0]["in_flight"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|c| {
            c["stages"].as_array().is_some_and(|s| {
                s.iter()
                    .any(|s| s[0] == "submit" && !s[1]["done_ms"].is_null())
            })
        })
        .filter_map(|c| c["token"].as_str().map(str::to_string))
        .collect()
}

/// A Zendesk ticket-created delivery for a ticket carrying `token`, signed by the sandbox's
/// dialect with `secret` at `at`.
fn signed(token: &str, secret: &str, at: SystemTime) -> (Vec<u8>, Vec<(String, String)>) {
    use mailcanary::sandbox::{events::Timestamp, helpdesk::Ticket};
    let ticket = Ticket {
        id: 99,
        seq: 99,
        subject: format!("mailcanary {token}"),
        body: format!("Canary {token}."),
        requester: "canary@prober.test".into(),
        message_id: format!("{token}@prober.test"),
        created_at: Timestamp(chrono::Utc::now()),
        archived: false,
        trashed: false,
        replies: Vec::new(),
    };
    let make = mailcanary::sandbox::api::dialect("zendesk")
        .and_then(|d| d.webhook)
        .expect("Zendesk signs webhooks");
    make(&ticket, secret, at)
}

async fn deliver(url: &str, body: Vec<u8>, headers: &[(String, String)]) -> u16 {
    let mut req = http()
        .post(url)
        .header("content-type", "application/json")
        .body(body);
    for (k, v) in headers {
        req = req.header(k, v);
    }
    req.send().await.unwrap().status().as_u16()
}

/// Polling once a minute, import stalled: a tampered and a replayed delivery naming the
/// canary get 401 and change nothing. Once the import runs, the sandbox's own signed webhook
/// reaches the prober and the canary completes long before the next poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zendesks_signed_webhook_ends_the_import_stage_and_forgeries_are_refused() {
    const SECRET: &str = "hook-secret-9";
    let port = free_port();
    let hook = format!("http://127.0.0.1:{port}/webhooks/{PROBE}");
    let sb = zendesk_sandbox(|c| {
        c.webhook_url = Some(hook.clone());
        c.webhook_secret = SECRET.into();
        c.search_lag = Duration::from_secs(60);
    })
    .await;
    sb.faults().set(Stage::Import, Fault::Stall);
    let k = Knobs {
        interval: "1h",
        import_deadline: "90s",
        poll_interval: "60s",
        webhook_secret: Some(SECRET),
        ..Knobs::default()
    };
    let cfg = config::parse_str(&zendesk_text(&sb, &k), "zendesk.toml").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let d = Daemon::start(
        &cfg,
        Options {
            state_dir: dir.path().to_path_buf(),
            listen: ([127, 0, 0, 1], port).into(),
            schedule: true,
        },
    )
    .await
    .expect("daemon starts");
    let t0 = Instant::now();
    let token = loop {
        if let Some(t) = in_flight(port).await.pop() {
            break t;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no canary in flight"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // Tampered: a signed delivery whose body was changed after signing.
    let (body, headers) = signed(&token, SECRET, SystemTime::now());
    let tampered = String::from_utf8(body)
        .unwrap()
        .replace("Canary", "Forged")
        .into_bytes();
    assert_eq!(deliver(&hook, tampered, &headers).await, 401, "tampered");
    // Replayed: authentic, but signed ten minutes ago.
    let (body, headers) = signed(&token, SECRET, SystemTime::now() - Duration::from_secs(600));
    assert_eq!(deliver(&hook, body, &headers).await, 401, "replayed");
    // Signed with another secret.
    let (body, headers) = signed(&token, "not-the-secret", SystemTime::now());
    assert_eq!(deliver(&hook, body, &headers).await, 401, "wrong secret");
    let s = scrape(d.addr).await;
    assert_eq!(
        v(&s, "mailcanary_webhooks_total", &[("result", "refused")]),
        3.0
    );
    assert_eq!(
        v(&s, "mailcanary_webhooks_total", &[("result", "authentic")]),
        0.0
    );
    assert_eq!(
        in_flight(port).await,
        vec![token.clone()],
        "nothing changed"
    );

    // The helpdesk imports the mail and pushes its signed webhook; the 60 s poll is far off.
    sb.faults().set(Stage::Import, Fault::Ok);
    let t1 = Instant::now();
    let s = until(
        d.addr,
        Duration::from_secs(20),
        "the canary completed",
        |s| v(s, COMPLETED, &[]) >= 1.0,
    )
    .await;
    assert!(t1.elapsed() < Duration::from_secs(20));
    assert!(
        v(&s, "mailcanary_webhooks_total", &[("result", "authentic")]) >= 1.0,
        "the sandbox's webhook was authentic"
    );
    assert_eq!(
        v(
            &s,
            "mailcanary_stage_duration_seconds_count",
            &[("stage", "import")]
        ),
        1.0
    );
    let import = v(
        &s,
        "mailcanary_stage_duration_seconds_sum",
        &[("stage", "import")],
    );
    assert!(
        import < 30.0,
        "import {import:.1} s: waited for a poll, not the webhook"
    );
    no_failures(&s);
    d.stop().await;
    sb.shutdown().await;
}
