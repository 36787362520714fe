//! The Zammad adapter (`api = "zammad"`) against the sandbox's Zammad dialect (its documented
//! API, not a real account): whole canary lives while the search index lags a minute (the
//! adapter finds tickets in the database, so the measured import is not delayed), under a rate
//! limit low enough to answer 429 (`Retry-After` waited out, the canaries complete), and with
//! Zammad's signed trigger webhooks: one the sandbox sends ends the import stage before the
//! next poll, a tampered one is refused and changes nothing.

use std::time::{Duration, Instant};

use mailcanary::{
    config::{self, Config},
    edges::helpdesk::webhook::{hex, hmac_sha1},
    sandbox::{DelayRange, Sandbox},
};
use serde_json::{Value, json};

use crate::common::*;

const COMPLETED: &str = "mailcanary_canaries_completed_total";
const HOOK_SECRET: &str = "zammad-hook-secret-3";

/// The drill probe, on the sandbox's Zammad dialect.
fn zammad_config(sb: &Sandbox, k: &Knobs) -> Config {
    let text = vendor_text(sb, k, "zammad", "");
    config::parse_str(&text, "zammad.toml").unwrap_or_else(|e| panic!("{e}"))
}

/// A sandbox speaking Zammad first (its webhooks are Zammad's), with `f` applied.
async fn zammad_sandbox(f: impl FnOnce(&mut mailcanary::sandbox::SandboxConfig)) -> Sandbox {
    vendor_sandbox("zammad", f).await
}

fn failures(s: &mailcanary::metrics::testing::Samples) -> f64 {
    s.family("mailcanary_stage_failures_total")
        .iter()
        .map(|x| x.value)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zammad_canaries_complete_while_the_search_index_lags_a_minute() {
    let sb = zammad_sandbox(|c| c.search_lag = Duration::from_secs(60)).await;
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(&zammad_config(&sb, &Knobs::default()), dir.path()).await;
    let s = until(d.addr, Duration::from_secs(30), "3 canaries", |s| {
        v(s, COMPLETED, &[]) >= 3.0
    })
    .await;
    assert_eq!(failures(&s), 0.0, "no stage failed");
    let (count, sum) = import_count_and_sum(&s);
    assert!(count >= 3.0);
    assert!(
        sum / count < 2.0,
        "the import is measured from the database, not the 60 s index: mean {}",
        sum / count
    );
    // The finished canaries' tickets were closed (cleanup = "trash": Zammad has no trash).
    let tickets = http()
        .get(format!("{}/api/v1/tickets?expand=true", sb.api_url()))
        .header("authorization", "Token token=sandbox")
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert!(
        tickets
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["state"] == "closed"),
        "{tickets}"
    );
    d.stop().await;
    sb.shutdown().await;
}

/// The sandbox's rate limiter answers 429 with `Retry-After` (the rest of its minute) once 8
/// requests were made; the import (2 s) is polled every 200 ms, so the limit is hit while the
/// canary waits for it. The client waits as told (capped) instead of hammering, and the canary
/// completes once the minute is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zammad_canaries_complete_past_a_rate_limit() {
    let sb = zammad_sandbox(|c| {
        c.rate_limit = Some(8);
        c.import_delay = DelayRange::fixed(Duration::from_secs(2));
    })
    .await;
    let k = Knobs {
        interval: "1h",
        import_deadline: "2m",
        end_to_end: "3m",
        ..Knobs::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(&zammad_config(&sb, &k), dir.path()).await;
    // The limit is hit: the import notes the API's refusal.
    until(d.addr, Duration::from_secs(30), "a 429", |s| {
        v(
            s,
            "mailcanary_stage_failures_total",
            &[("stage", "import"), ("reason", "api")],
        ) >= 1.0
    })
    .await;
    let st = status(d.addr.port()).await.unwrap();
    assert!(st.to_string().contains("429"), "refused with 429: {st}");
    let s = until(d.addr, Duration::from_secs(100), "the canary", |s| {
        v(s, COMPLETED, &[]) >= 1.0
    })
    .await;
    assert_eq!(
        v(&s, "mailcanary_canaries_lost_total", &[]),
        0.0,
        "nothing lost"
    );
    d.stop().await;
    sb.shutdown().await;
}

/// Polling once a minute; the import takes 500 ms, so the poll right after submit misses the
/// ticket and only the webhook can make the canary fast.
fn slow_poll() -> Knobs {
    Knobs {
        interval: "1h",
        poll_interval: "60s",
        webhook_secret: Some(HOOK_SECRET),
        // Far past the time the test takes to post its webhooks on a loaded machine: a
        // deadline failure would wake the run too, and it would find the ticket by polling.
        import_deadline: "20s",
        end_to_end: "40s",
        ..Knobs::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zammad_webhook_from_the_sandbox_ends_the_import_before_the_next_poll() {
    let port = free_port();
    let sb = zammad_sandbox(|c| {
        c.import_delay = DelayRange::fixed(Duration::from_millis(500));
        push_webhooks_to(c, port, HOOK_SECRET);
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let d = daemon_on(&zammad_config(&sb, &slow_poll()), dir.path(), port).await;
    let s = until(d.addr, Duration::from_secs(15), "the canary", |s| {
        v(s, COMPLETED, &[]) >= 1.0
    })
    .await;
    assert_eq!(
        v(&s, "mailcanary_webhooks_total", &[("result", "authentic")]),
        1.0,
        "the sandbox's X-Hub-Signature verified"
    );
    let import = v(
        &s,
        "mailcanary_stage_duration_seconds_sum",
        &[("stage", "import")],
    );
    assert!(import < 10.0, "import ended by the webhook: {import} s");
    d.stop().await;
    sb.shutdown().await;
}

/// Whether the drill probe's one canary in flight is still waiting for its import.
async fn import_pending(port: u16) -> bool {
    let st = status(port).await.unwrap();
    st["probes"][0]["in_flight"]
        .as_array()
        .and_then(|a| a.first())
        .and_then(|c| c["stages"].as_array())
        .is_some_and(|s| {
            s.iter()
                .any(|s| s[0] == "import" && s[1]["done_ms"].is_null())
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_zammad_webhook_is_refused_and_changes_nothing() {
    let sb =
        zammad_sandbox(|c| c.import_delay = DelayRange::fixed(Duration::from_millis(500))).await;
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(&zammad_config(&sb, &slow_poll()), dir.path()).await;
    // The ticket, once imported (the prober's poll came too early and waits a minute).
    let t0 = Instant::now();
    let ticket = loop {
        let list: Value = http()
            .get(format!("{}/api/v1/tickets?expand=true", sb.api_url()))
            .header("authorization", "Token token=sandbox")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if let Some(t) = list.get(0) {
            break t.clone();
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "no ticket");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let articles: Value = http()
        .get(format!(
            "{}/api/v1/ticket_articles/by_ticket/{}",
            sb.api_url(),
            ticket["id"]
        ))
        .header("authorization", "Token token=sandbox")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let body = json!({ "ticket": ticket, "article": articles[0] }).to_string();
    let signature = format!(
        "sha1={}",
        hex(&hmac_sha1(HOOK_SECRET.as_bytes(), &[body.as_bytes()]))
    );
    let hook = format!("http://{}/webhooks/{PROBE}", d.addr);
    let send = |body: String, sig: Option<String>| {
        let mut req = http()
            .post(&hook)
            .header("content-type", "application/json")
            .header("x-zammad-trigger", "mailcanary ticket created")
            .body(body);
        if let Some(s) = sig {
            req = req.header("x-hub-signature", s);
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert!(import_pending(d.addr.port()).await, "waiting for the poll");
    // The body changed after signing (another state), a signature with another key, none.
    let tampered = body.replacen("\"state\":\"new\"", "\"state\":\"open\"", 1);
    assert_ne!(tampered, body);
    assert_eq!(send(tampered, Some(signature.clone())).await, 401);
    let other = format!(
        "sha1={}",
        hex(&hmac_sha1(b"not-the-secret", &[body.as_bytes()]))
    );
    assert_eq!(send(body.clone(), Some(other)).await, 401);
    assert_eq!(send(body.clone(), None).await, 401);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        import_pending(d.addr.port()).await,
        "refused webhooks end nothing"
    );
    let s = scrape(d.addr).await;
    assert_eq!(
        v(&s, "mailcanary_webhooks_total", &[("result", "refused")]),
        3.0
    );
    assert_eq!(
        v(&s, "mailcanary_webhooks_total", &[("result", "authentic")]),
        0.0
    );
    // The untouched delivery is taken, and the canary completes without waiting for the poll.
    assert_eq!(send(body, Some(signature)).await, 202);
    until(d.addr, Duration::from_secs(10), "the canary", |s| {
        v(s, COMPLETED, &[]) >= 1.0
    })
    .await;
    d.stop().await;
    sb.shutdown().await;
}
