//! `POST /webhooks/{probe}`: a pushed ticket makes the canary's run ask the API at once, so
//! the import stage ends before the next poll; only with the probe's secret; a webhook only
//! hints (the API confirms), and a sibling probe's token in it is that probe's, not forged.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::*;

async fn post(url: &str, auth: Option<&str>, body: &str) -> (u16, Value) {
    let mut req = http().post(url).body(body.to_string());
    if let Some(a) = auth {
        req = req.header("authorization", format!("Bearer {a}"));
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_ends_the_import_stage_before_the_next_poll() {
    let sb = sandbox().await;
    // Polling once a minute: only the webhook can make this canary fast.
    let knobs = Knobs {
        interval: "1h",
        poll_interval: "60s",
        webhook_secret: Some("hook-secret-9"),
        // Far past the time the test takes to post its webhooks on a loaded machine: a
        // deadline failure would wake the run too, and it would find the ticket by polling.
        import_deadline: "20s",
        end_to_end: "40s",
        ..Knobs::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(&config(&sb, &knobs), dir.path()).await;
    let hook = format!("http://{}/webhooks/{PROBE}", d.addr);

    // The ticket, once the sandbox has imported it (the prober's first poll came too early).
    let search = format!(
        "{}/tickets/search?auth_token=sandbox&query=mailcanary",
        sb.api_url()
    );
    let t0 = Instant::now();
    let ticket = loop {
        let v: Value = http()
            .get(&search)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if let Some(t) = v["tickets"].get(0) {
            break t.clone();
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "no ticket");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let payload = json!({ "ticket": ticket }).to_string();

    assert_eq!(post(&hook, None, &payload).await.0, 401, "no secret");
    assert_eq!(
        post(&hook, Some("wrong"), &payload).await.0,
        401,
        "wrong secret"
    );
    // Authentic but not JSON: 2xx all the same (vendors disable endpoints that keep
    // failing), and nothing hinted.
    let (status, body) = post(&hook, Some("hook-secret-9"), "{nope").await;
    assert_eq!((status, &body["hinted"]), (202, &json!(0)), "{body}");
    let other = format!("http://{}/webhooks/nosuchprobe", d.addr);
    assert_eq!(post(&other, Some("hook-secret-9"), &payload).await.0, 404);

    let (status, body) = post(&hook, Some("hook-secret-9"), &payload).await;
    assert_eq!(status, 202);
    assert_eq!(body["hinted"], 1, "{body}");
    // The secret may also come in the URL, for helpdesks that only let you set one.
    let (status, _) = post(&format!("{hook}?secret=hook-secret-9"), None, &payload).await;
    assert_eq!(status, 202);

    // The run wakes up: reply and delivery follow without waiting for the 60 s poll.
    let s = until(
        d.addr,
        Duration::from_secs(10),
        "the canary completed",
        |s| v(s, "mailcanary_canaries_completed_total", &[]) >= 1.0,
    )
    .await;
    assert_eq!(
        v(
            &s,
            "mailcanary_stage_duration_seconds_count",
            &[("stage", "import")]
        ),
        1.0
    );
    assert!(
        v(
            &s,
            "mailcanary_stage_duration_seconds_sum",
            &[("stage", "import")]
        ) < 10.0
    );
    d.stop().await;
    sb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_refused_for_a_probe_without_a_secret() {
    let sb = sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(&config(&sb, &Knobs::default()), dir.path()).await;
    let hook = format!("http://{}/webhooks/{PROBE}", d.addr);
    assert_eq!(post(&hook, Some("anything"), "{}").await.0, 403);
    d.stop().await;
    sb.shutdown().await;
}

/// The tokens of the canaries of `probe` in flight past their submit stage, from the status.
async fn in_flight_tokens(port: u16, probe: &str) -> Vec<String> {
    let st = status(port).await.unwrap();
    st["probes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == probe)
        .flat_map(|p| p["in_flight"].as_array().cloned().unwrap_or_default())
        .filter(|c| {
            c["stages"].as_array().is_some_and(|s| {
                s.iter()
                    .any(|s| s[0] == "submit" && !s[1]["done_ms"].is_null())
            })
        })
        .filter_map(|c| c["token"].as_str().map(str::to_string))
        .collect()
}

/// A webhook is a hint, not a verdict: naming a canary whose ticket the API does not show yet
/// (import stalled) ends nothing. A vendor's webhook is account-wide: the token of a sibling
/// probe on the same helpdesk is that probe's (hinted), not a forgery; a token no probe signed
/// is forged. Once the API shows the tickets, both canaries complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_only_hints_and_a_sibling_token_is_not_forged() {
    use mailcanary::sandbox::{Fault, Stage};
    let sb = sandbox().await;
    sb.faults().set(Stage::Import, Fault::Stall);
    let knobs = Knobs {
        interval: "1h",
        poll_interval: "60s",
        webhook_secret: Some("hook-secret-9"),
        ..Knobs::default()
    };
    let mut file = config_file(&sb, &knobs);
    let mut sibling = file.probe_mut(PROBE).renamed("sibling");
    sibling.helpdesk_mut().webhook_secret = None;
    let text = file.with(sibling).render();
    let cfg = mailcanary::config::parse_str(&text, "two.toml").expect("two probes parse");
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(&cfg, dir.path()).await;
    let port = d.addr.port();
    let t0 = Instant::now();
    let (mine, theirs) = loop {
        let (a, b) = (
            in_flight_tokens(port, PROBE).await,
            in_flight_tokens(port, "sibling").await,
        );
        if !a.is_empty() && !b.is_empty() {
            break (a[0].clone(), b[0].clone());
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no canaries in flight"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // A forgery: our token with the first character of its MAC changed (the last one also
    // carries padding bits, and a change there may not even parse as a token).
    let at = mine.rfind('-').unwrap() + 1;
    let first = mine.as_bytes()[at];
    let forged = format!(
        "{}{}{}",
        &mine[..at],
        if first == b'a' { 'b' } else { 'a' },
        &mine[at + 1..]
    );
    let payload = json!({
        "ticket": {"subject": format!("[{mine}]"), "body": format!("{theirs} and {forged}")}
    })
    .to_string();
    let hook = format!("http://{}/webhooks/{PROBE}", d.addr);
    let (code, body) = post(&hook, Some("hook-secret-9"), &payload).await;
    assert_eq!(code, 202);
    assert_eq!(
        (&body["hinted"], &body["siblings"], &body["forged"]),
        (&json!(1), &json!(1), &json!(1)),
        "{body}"
    );
    let s = scrape(d.addr).await;
    assert_eq!(
        v(
            &s,
            "mailcanary_messages_ignored_total",
            &[("reason", "forged")]
        ),
        1.0
    );
    assert_eq!(
        v(&s, "mailcanary_webhooks_total", &[("result", "authentic")]),
        1.0
    );
    // Hinted, but the API shows no ticket: both are still waiting for their import.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(in_flight_tokens(port, PROBE).await, vec![mine.clone()]);
    let st = status(port).await.unwrap();
    for p in st["probes"].as_array().unwrap() {
        let c = &p["in_flight"][0];
        assert!(
            c["stages"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s[0] == "import" && s[1]["done_ms"].is_null()),
            "{}: import ended on a hint alone: {c}",
            p["name"]
        );
    }
    // The helpdesk catches up; a second hint now finds the ticket through the API at once.
    sb.faults().set(Stage::Import, Fault::Ok);
    let t1 = Instant::now();
    loop {
        let (_, body) = post(&hook, Some("hook-secret-9"), &payload).await;
        if in_flight_tokens(port, PROBE).await.is_empty()
            || body["hinted"] == 0 && body["siblings"] == 0
        {
            break;
        }
        assert!(t1.elapsed() < Duration::from_secs(10), "never imported");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    until(
        d.addr,
        Duration::from_secs(20),
        "both canaries completed",
        |s| {
            s.value("mailcanary_canaries_completed_total", &[("probe", PROBE)]) == Some(1.0)
                && s.value(
                    "mailcanary_canaries_completed_total",
                    &[("probe", "sibling")],
                ) == Some(1.0)
        },
    )
    .await;
    // A refused one is counted too.
    assert_eq!(post(&hook, Some("nope"), &payload).await.0, 401);
    let s = scrape(d.addr).await;
    assert_eq!(
        v(&s, "mailcanary_webhooks_total", &[("result", "refused")]),
        1.0
    );
    d.stop().await;
    sb.shutdown().await;
}
