//! `POST /webhooks/{probe}`: a pushed ticket ends the import stage at once; only with the
//! probe's secret.

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
    assert_eq!(post(&hook, Some("hook-secret-9"), "{nope").await.0, 400);
    let other = format!("http://{}/webhooks/nosuchprobe", d.addr);
    assert_eq!(post(&other, Some("hook-secret-9"), &payload).await.0, 404);

    let (status, body) = post(&hook, Some("hook-secret-9"), &payload).await;
    assert_eq!(status, 202);
    assert_eq!(body["imported"], 1, "{body}");
    // The secret may also come in the URL, for helpdesks that only let you set one.
    let (status, body) = post(&format!("{hook}?secret=hook-secret-9"), None, &payload).await;
    assert_eq!(status, 202);
    assert_eq!(body["imported"], 0, "already imported: nothing to do");

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
