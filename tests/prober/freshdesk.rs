//! The Freshdesk adapter through whole canary lives, against the sandbox speaking Freshdesk's
//! API v2 (`SandboxConfig.api = "freshdesk"`, so its `/api/v2/` paths are served): a search
//! index a minute behind does not delay the import (the adapter lists, it does not search);
//! under Freshdesk's rate limit canaries wait out the 429s and complete, and the gauge shows
//! Freshdesk's `X-RateLimit-Remaining`; the sandbox's own Freshdesk-automation webhook ends the
//! import stage before the next poll, and one with a wrong secret is refused and changes
//! nothing.

use std::time::{Duration, Instant};

use mailcanary::{
    config,
    daemon::Daemon,
    sandbox::{DelayRange, Sandbox, SandboxConfig},
};
use serde_json::Value;

use crate::common::*;

const COMPLETED: &str = "mailcanary_canaries_completed_total";
const RATE_LEFT: &str = "mailcanary_helpdesk_rate_limit_remaining";

/// The drill probe of `sb` on the Freshdesk adapter.
fn freshdesk_text(sb: &Sandbox, k: &Knobs) -> String {
    vendor_text(sb, k, "freshdesk", "")
}

/// A fast sandbox serving the Freshdesk dialect, then `f`.
async fn freshdesk_sandbox(f: impl FnOnce(&mut SandboxConfig)) -> Sandbox {
    vendor_sandbox("freshdesk", f).await
}

/// `GET /api/v2/…` of the sandbox with the API key, as JSON.
async fn api_get(sb: &Sandbox, path_and_query: &str) -> Value {
    http()
        .get(format!("{}/api/v2/{path_and_query}", sb.api_url()))
        .basic_auth("sandbox", Some("X"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freshdesk_import_is_not_delayed_by_a_search_index_a_minute_behind() {
    let sb = freshdesk_sandbox(|c| c.search_lag = Duration::from_secs(60)).await;
    // Tickets kept, so the sandbox can be asked afterwards what search and list see.
    let mut file = vendor_file(&sb, &Knobs::default(), "freshdesk", "");
    file.probe_mut(PROBE).helpdesk_mut().cleanup = some("none");
    let text = file.render();
    let cfg = config::parse_str(&text, "freshdesk.toml").unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(&cfg, dir.path()).await;
    let s = until(d.addr, Duration::from_secs(30), "3 canaries", |s| {
        v(s, COMPLETED, &[]) >= 3.0
    })
    .await;
    no_failures(&s);
    let (count, sum) = import_count_and_sum(&s);
    assert!(count >= 3.0);
    assert!(
        sum / count < 2.0,
        "import measured at {:.2} s on average, not the search's 60 s",
        sum / count
    );
    // The lag was real: search still sees none of the tickets the list shows.
    let listed = api_get(&sb, "tickets?order_by=created_at&order_type=desc").await;
    assert!(listed.as_array().unwrap().len() >= 3, "{listed}");
    let found = api_get(&sb, "search/tickets?query=%22status:2%20OR%20status:5%22").await;
    assert_eq!(found["total"], 0, "search is a minute behind: {found}");
    d.stop().await;
    sb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freshdesk_canaries_wait_out_429s_and_the_gauge_shows_freshdesks_remaining() {
    const LIMIT: u32 = 4;
    // Freshdesk counts a minute; a 5 s window here, so that each window's few requests move
    // the canaries on instead of the polling of the others eating them (in a one-minute
    // window under a loaded suite two canaries did not always get through in 100 s).
    let sb = freshdesk_sandbox(|c| {
        c.rate_limit = Some(LIMIT);
        c.rate_window = Duration::from_secs(5);
    })
    .await;
    // Deadlines that outlast many windows: the canaries held by the 429s are on time, and
    // completing is the proof.
    let k = Knobs {
        interval: "5s",
        import_deadline: "3m",
        delivery_deadline: "3m",
        end_to_end: "10m",
        ..Knobs::default()
    };
    // At most two canaries at a time, so a few windows' 4 requests are enough for them.
    let mut file = vendor_file(&sb, &k, "freshdesk", "");
    let probe = file.probe_mut(PROBE);
    probe.deadlines_mut().reply = some("3m");
    probe.max_in_flight = Some(2);
    let text = file.render();
    let cfg = config::parse_str(&text, "freshdesk.toml").unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(&cfg, dir.path()).await;
    // Within seconds the window's 4 requests are spent: Freshdesk's remaining figure reads 0,
    // and the calls past it are answered 429 with Retry-After, which the client waits out
    // (inside the call, or at the canary's next poll).
    let t0 = Instant::now();
    let before = loop {
        let s = scrape(d.addr).await;
        if s.value(RATE_LEFT, &[("probe", PROBE)]) == Some(0.0) {
            break v(&s, COMPLETED, &[]);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "the limit never reached"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The next windows let them through: canaries complete after the 429s.
    let s = until(
        d.addr,
        Duration::from_secs(100),
        "canaries completed past the 429s",
        |s| v(s, COMPLETED, &[]) >= before + 2.0,
    )
    .await;
    let left = s
        .value(RATE_LEFT, &[("probe", PROBE)])
        .expect("the gauge is set");
    assert!(
        (0.0..f64::from(LIMIT)).contains(&left),
        "the gauge is Freshdesk's X-RateLimit-Remaining of a limit of {LIMIT}: {left}"
    );
    assert_eq!(
        v(
            &s,
            "mailcanary_stage_failures_total",
            &[("stage", "import"), ("reason", "deadline")]
        ),
        0.0
    );
    d.stop().await;
    sb.shutdown().await;
}

/// A prober on `port` whose drill probe polls Freshdesk once a minute and takes webhooks
/// with `hook-secret-9`.
async fn slow_poller(sb: &Sandbox, port: u16, dir: &std::path::Path) -> Daemon {
    let k = Knobs {
        interval: "1h",
        poll_interval: "60s",
        import_deadline: "2m",
        webhook_secret: Some("hook-secret-9"),
        ..Knobs::default()
    };
    let cfg = config::parse_str(&freshdesk_text(sb, &k), "freshdesk.toml")
        .unwrap_or_else(|e| panic!("{e}"));
    daemon_on(&cfg, dir, port).await
}

/// The sandbox for the webhook drills: Freshdesk's dialect, webhooks to the prober that will
/// listen on `port`, signed with `secret`, and an import slow enough (1 s) that the prober's
/// first look, right after sending, finds nothing.
async fn hooking_sandbox(port: u16, secret: &str) -> Sandbox {
    freshdesk_sandbox(|c| {
        push_webhooks_to(c, port, secret);
        c.import_delay = DelayRange::fixed(Duration::from_secs(1));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freshdesks_webhook_from_the_sandbox_ends_the_import_before_the_next_poll() {
    let port = free_port();
    let sb = hooking_sandbox(port, "hook-secret-9").await;
    let dir = tempfile::tempdir().unwrap();
    let d = slow_poller(&sb, port, dir.path()).await;
    let s = until(
        d.addr,
        Duration::from_secs(15),
        "the canary completed",
        |s| v(s, COMPLETED, &[]) >= 1.0,
    )
    .await;
    assert_eq!(
        v(&s, "mailcanary_webhooks_total", &[("result", "authentic")]),
        1.0
    );
    let import = v(
        &s,
        "mailcanary_stage_duration_seconds_sum",
        &[("stage", "import")],
    );
    assert!(
        import < 10.0,
        "import took {import} s: the 60 s poll ended it"
    );
    no_failures(&s);
    d.stop().await;
    sb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freshdesks_webhook_with_a_wrong_secret_is_refused_and_changes_nothing() {
    let port = free_port();
    let sb = hooking_sandbox(port, "not-the-secret").await;
    let dir = tempfile::tempdir().unwrap();
    let d = slow_poller(&sb, port, dir.path()).await;
    let s = until(
        d.addr,
        Duration::from_secs(15),
        "the refused webhook",
        |s| v(s, "mailcanary_webhooks_total", &[("result", "refused")]) >= 1.0,
    )
    .await;
    assert_eq!(
        v(&s, "mailcanary_webhooks_total", &[("result", "authentic")]),
        0.0
    );
    // The ticket is there, but nothing told the prober: the canary waits for its next poll.
    let listed = api_get(&sb, "tickets").await;
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = scrape(d.addr).await;
    assert_eq!(v(&s, COMPLETED, &[]), 0.0);
    assert_eq!(
        v(
            &s,
            "mailcanary_stage_duration_seconds_count",
            &[("stage", "import")]
        ),
        0.0,
        "import not ended by a refused webhook"
    );
    // The same body the sandbox sent, with the wrong secret, is answered 401.
    let ticket: Value = listed[0].clone();
    let body = serde_json::json!({ "freshdesk_webhook": {
        "ticket_id": ticket["id"],
        "ticket_subject": ticket["subject"],
    }})
    .to_string();
    let r = http()
        .post(format!("http://{}/webhooks/{PROBE}", d.addr))
        .header("authorization", "Bearer not-the-secret")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    d.stop().await;
    sb.shutdown().await;
}
