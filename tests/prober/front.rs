//! The Front adapter through whole canary lives on the sandbox's Front dialect: the lagging
//! search does not delay the import (the inbox list sees the conversation at once), the reply
//! does not archive the conversation, 429s are waited out and the rate-limit gauge shows
//! Front's `x-ratelimit-remaining`, and Front-signed webhooks (sent by the sandbox itself)
//! end the import stage before the next poll while tampered, replayed or unsigned ones are
//! refused and the challenge is echoed.

use std::time::{Duration, Instant, SystemTime};

use mailcanary::{
    config,
    edges::helpdesk::webhook::{b64, hmac_sha256},
    sandbox::{DelayRange, Sandbox},
};
use serde_json::{Value, json};

use crate::common::*;

const COMPLETED: &str = "mailcanary_canaries_completed_total";
const HOOK_SECRET: &str = "front-hook-s3cret";

/// The drill probe on the sandbox's Front dialect.
fn front_config(sb: &Sandbox, k: &Knobs, cleanup: &str) -> config::Config {
    let mut file = vendor_file(sb, k, "front", "");
    let hd = file.probe_mut(PROBE).helpdesk_mut();
    hd.cleanup = some(cleanup);
    hd.set_vendor("front", "inbox_id", "inb_sandbox");
    let text = file.render();
    config::parse_str(&text, "front.toml").unwrap_or_else(|e| panic!("{e}"))
}

/// The sandbox's conversations, as its Front dialect lists them.
async fn conversations(sb: &Sandbox) -> Vec<Value> {
    let v: Value = http()
        .get(format!(
            "{}/inboxes/inb_sandbox/conversations?limit=100",
            sb.api_url()
        ))
        .bearer_auth("sandbox")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["_results"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_front_canary_is_found_despite_a_60s_search_lag_and_its_reply_leaves_it_open() {
    let sb = sandbox_with(|c| c.search_lag = Duration::from_secs(60)).await;
    let knobs = Knobs {
        interval: "1h",
        ..Knobs::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(&front_config(&sb, &knobs, "none"), dir.path()).await;
    let s = until(
        d.addr,
        Duration::from_secs(20),
        "the canary completed",
        |s| v(s, COMPLETED, &[]) >= 1.0,
    )
    .await;
    no_failures(&s);
    let import = v(
        &s,
        "mailcanary_stage_duration_seconds_sum",
        &[("stage", "import")],
    );
    assert!(
        import < 2.0,
        "import measured at {import} s: the 60 s search lag must not delay it"
    );
    // The search index still hides it: only the list can have found it.
    let search = format!("{}/conversations/search/mailcanary", sb.api_url());
    let hits: Value = http()
        .get(&search)
        .bearer_auth("sandbox")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(hits["_results"], json!([]), "search lags: {hits}");
    // The reply was sent with options.archive = false: the conversation is still open.
    let all = conversations(&sb).await;
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0]["status"], "unassigned", "{:?}", all[0]);
    let events = sb.events();
    assert!(events[0].delivered_at.is_some(), "the reply was mailed");
    d.stop().await;

    // Front's default, which the adapter overrides: a reply archives the conversation.
    let id = all[0]["id"].as_str().unwrap();
    let r = http()
        .post(format!("{}/conversations/{id}/messages", sb.api_url()))
        .bearer_auth("sandbox")
        .json(&json!({ "body": "a second reply" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    assert_eq!(conversations(&sb).await[0]["status"], "archived");
    sb.shutdown().await;
}

/// The sandbox answers 429 past 6 requests a minute (a fixed window from its start), all spent
/// before the prober starts: the canary waits it out, completes, and the gauge shows what Front's header said was left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn front_canaries_complete_through_429s_and_the_gauge_shows_the_remaining_figure() {
    let sb = sandbox_with(|c| c.rate_limit = Some(6)).await;
    let knobs = Knobs {
        interval: "1h",
        import_deadline: "2m",
        end_to_end: "5m",
        ..Knobs::default()
    };
    // The minute's budget is spent before the prober starts (racing the prober's own polls
    // for it let the ticket be found first on a loaded machine, and the 429s then met the
    // reply): every call of its first minute meets 429.
    let probe_url = format!("{}/inboxes/inb_sandbox/conversations", sb.api_url());
    let t0 = Instant::now();
    loop {
        let r = http()
            .get(&probe_url)
            .bearer_auth("sandbox")
            .send()
            .await
            .unwrap();
        if r.status().as_u16() == 429 {
            assert!(r.headers().contains_key("retry-after"));
            assert_eq!(r.headers()["x-ratelimit-remaining"], "0");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "never limited");
    }
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(&front_config(&sb, &knobs, "trash"), dir.path()).await;
    let s = until(
        d.addr,
        Duration::from_secs(90),
        "the canary completed after the window",
        |s| v(s, COMPLETED, &[]) >= 1.0,
    )
    .await;
    // The 429s, once the client's retries ran out, are the API's trouble, seen in the import
    // stage; nothing else failed.
    let failed: Vec<_> = s
        .family("mailcanary_stage_failures_total")
        .into_iter()
        .filter(|x| x.value > 0.0)
        .map(|x| (x.labels["stage"].clone(), x.labels["reason"].clone()))
        .collect();
    assert_eq!(failed, vec![("import".to_string(), "api".to_string())]);
    let left = s
        .value(
            "mailcanary_helpdesk_rate_limit_remaining",
            &[("probe", PROBE)],
        )
        .expect("the gauge is set");
    assert!(
        (0.0..6.0).contains(&left),
        "the remaining figure of a 6 a minute limit: {left}"
    );
    d.stop().await;
    sb.shutdown().await;
}

/// A Front application-webhook delivery of `body`, signed at `at` with `secret`.
fn signed(secret: &str, body: &str, at: SystemTime) -> Vec<(&'static str, String)> {
    let ms = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        .to_string();
    let sig = b64(&hmac_sha256(
        secret.as_bytes(),
        &[ms.as_bytes(), b":", body.as_bytes()],
    ));
    vec![
        ("x-front-signature", sig),
        ("x-front-request-timestamp", ms),
    ]
}

async fn post(url: &str, headers: &[(&str, String)], body: &str) -> (u16, String) {
    let mut req = http().post(url).body(body.to_string());
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

fn webhook_knobs() -> Knobs {
    Knobs {
        interval: "1h",
        // Polling once a minute: only a webhook can make a canary fast.
        poll_interval: "60s",
        import_deadline: "2m",
        end_to_end: "5m",
        webhook_secret: Some(HOOK_SECRET),
        ..Knobs::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandboxs_front_signed_webhook_ends_the_import_before_the_next_poll() {
    let port = free_port();
    let sb = sandbox_with(|c| {
        c.api = "front".into();
        push_webhooks_to(c, port, HOOK_SECRET);
        // The prober's first poll, right after the submit, comes before the import.
        c.import_delay = DelayRange::fixed(Duration::from_millis(800));
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let d = daemon_on(
        &front_config(&sb, &webhook_knobs(), "archive"),
        dir.path(),
        port,
    )
    .await;
    let s = until(
        d.addr,
        Duration::from_secs(15),
        "the canary completed before the 60 s poll",
        |s| v(s, COMPLETED, &[]) >= 1.0,
    )
    .await;
    assert_eq!(
        v(&s, "mailcanary_webhooks_total", &[("result", "authentic")]),
        1.0
    );
    assert_eq!(
        v(&s, "mailcanary_webhooks_total", &[("result", "refused")]),
        0.0
    );
    let import = v(
        &s,
        "mailcanary_stage_duration_seconds_sum",
        &[("stage", "import")],
    );
    assert!(import < 10.0, "import took {import} s");
    no_failures(&s);
    d.stop().await;
    sb.shutdown().await;
}

/// The tokens of the drill probe's canaries in flight past their submit stage.
async fn in_flight(port: u16) -> Vec<(String, bool)> {
    let st = status(port).await.unwrap();
    st["probes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == PROBE)
        .flat_map(|p| p["in_flight"].as_array().cloned().unwrap_or_default())
        .filter_map(|c| {
            let stages = c["stages"].as_array()?.clone();
            let done = |name: &str| {
                stages
                    .iter()
                    .any(|s| s[0] == name && !s[1]["done_ms"].is_null())
            };
            done("submit").then(|| (c["token"].as_str().unwrap().to_string(), done("import")))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_replayed_and_unsigned_front_webhooks_are_refused_and_the_challenge_echoed() {
    let sb = sandbox_with(|c| c.import_delay = DelayRange::fixed(Duration::from_millis(800))).await;
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(&front_config(&sb, &webhook_knobs(), "archive"), dir.path()).await;
    let port = d.addr.port();
    let hook = format!("http://{}/webhooks/{PROBE}", d.addr);
    let t0 = Instant::now();
    let token = loop {
        if let Some((t, _)) = in_flight(port).await.into_iter().next() {
            break t;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no canary in flight"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Wait for the conversation, so that a hint would end the import at once.
    let t1 = Instant::now();
    while conversations(&sb).await.is_empty() {
        assert!(t1.elapsed() < Duration::from_secs(10), "no conversation");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let body = json!({
        "type": "inbound_received",
        "payload": { "conversation": { "subject": format!("mailcanary {token}") } }
    })
    .to_string();

    // The challenge: echoed with 200, nothing else.
    let (code, echo) = post(&hook, &[("x-front-challenge", "chal-7f2".to_string())], "").await;
    assert_eq!((code, echo.as_str()), (200, "chal-7f2"));

    // Tampered: signed, then one character of the body changed.
    let tampered = body.replace("inbound_received", "inbound_receiveD");
    let (code, _) = post(
        &hook,
        &signed(HOOK_SECRET, &body, SystemTime::now()),
        &tampered,
    )
    .await;
    assert_eq!(code, 401, "tampered body");
    // Signed with another secret.
    let (code, _) = post(
        &hook,
        &signed("not-the-secret", &body, SystemTime::now()),
        &body,
    )
    .await;
    assert_eq!(code, 401, "wrong secret");
    // Replayed: correctly signed, ten minutes ago.
    let old = SystemTime::now() - Duration::from_secs(600);
    let (code, why) = post(&hook, &signed(HOOK_SECRET, &body, old), &body).await;
    assert_eq!(code, 401, "replayed");
    assert!(why.contains("replay window"), "{why}");
    // Unsigned, or with the bearer secret other vendors use.
    let (code, _) = post(&hook, &[], &body).await;
    assert_eq!(code, 401, "unsigned");
    let (code, _) = post(
        &hook,
        &[("authorization", format!("Bearer {HOOK_SECRET}"))],
        &body,
    )
    .await;
    assert_eq!(code, 401, "bearer is not Front's scheme");

    // Nothing changed: the canary still waits for its import (the next poll is a minute away).
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        in_flight(port).await,
        vec![(token.clone(), false)],
        "a refused webhook hinted nothing"
    );
    let s = scrape(d.addr).await;
    assert_eq!(
        v(&s, "mailcanary_webhooks_total", &[("result", "refused")]),
        5.0
    );
    assert_eq!(
        v(&s, "mailcanary_webhooks_total", &[("result", "challenge")]),
        1.0
    );

    // The same body, correctly signed now: the canary completes long before the next poll.
    let (code, answer) = post(&hook, &signed(HOOK_SECRET, &body, SystemTime::now()), &body).await;
    assert_eq!(code, 202, "{answer}");
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["hinted"], 1, "{answer}");
    until(
        d.addr,
        Duration::from_secs(15),
        "the canary completed after the authentic webhook",
        |s| v(s, COMPLETED, &[]) >= 1.0,
    )
    .await;
    d.stop().await;
    sb.shutdown().await;
}
