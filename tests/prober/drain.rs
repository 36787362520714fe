//! The backlog drain estimate against the sandbox's ground truth: import stalls for 20 s while
//! a canary is sent every 500 ms, then drains at the sandbox's import rate (4 tickets a
//! second, twice the send rate, so the backlog shrinks by one second a second). While stalled
//! the ETA is +Inf; while draining it predicts the moment the import catches up, which the
//! sandbox's events say, closer as the drain goes on; once drained it is NaN and the backlog
//! 0.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mailcanary::{
    config,
    sandbox::{Fault, Stage},
};
use serde_json::Value;

use crate::common::*;

const ETA: &str = "mailcanary_stage_drain_eta_seconds";
const BACKLOG: &str = "mailcanary_stage_backlog_seconds";

fn wall_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn secs(v: &Value) -> Option<f64> {
    let t = chrono::DateTime::parse_from_rfc3339(v.as_str()?).ok()?;
    Some(t.timestamp_millis() as f64 / 1000.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_eta_predicts_when_the_import_catches_up() {
    let (sb, k) = slow_drain().await;
    let mut file = config_file(&sb, &k);
    file.probe_mut(PROBE).max_in_flight = Some(200);
    let text = file.render();
    let cfg = config::parse_str(&text, "drain.toml").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(&cfg, dir.path()).await;
    let import = [("stage", "import")];
    until(d.addr, Duration::from_secs(20), "canaries flowing", |s| {
        v(s, "mailcanary_canaries_completed_total", &[]) >= 2.0
    })
    .await;

    sb.faults().set(Stage::Import, Fault::Stall);
    let s = until(
        d.addr,
        Duration::from_secs(20),
        "held past the deadline",
        |s| v(s, "mailcanary_stage_overdue", &import) >= 1.0,
    )
    .await;
    assert_eq!(
        v(&s, ETA, &import),
        f64::INFINITY,
        "stalled: not catching up"
    );
    assert!(v(&s, BACKLOG, &import) >= 2.0);
    tokio::time::sleep(Duration::from_secs(18)).await;
    let cleared = wall_s();
    sb.faults().set(Stage::Import, Fault::Ok);

    // Sample the estimate while it drains: (when, predicted end).
    let mut predictions: Vec<(f64, f64)> = Vec::new();
    let drained = loop {
        let s = scrape(d.addr).await;
        let now = wall_s();
        let eta = v(&s, ETA, &import);
        if eta.is_finite() {
            if predictions.is_empty() {
                let page = get_text(&format!("http://{}/", d.addr)).await;
                assert!(
                    page.contains("draining: caught up to ") && page.contains(" left"),
                    "the dashboard says how far the drain is"
                );
            }
            predictions.push((now - cleared, now + eta));
        }
        if v(&s, "mailcanary_stage_overdue", &import) == 0.0 {
            assert!(v(&s, ETA, &import).is_nan(), "drained: not draining");
            assert_eq!(v(&s, BACKLOG, &import), 0.0);
            break now;
        }
        assert!(now - cleared < 60.0, "never drained");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };

    // Ground truth: the import caught up when the first mail received after the clear got
    // its ticket within a second of arriving. That is a little after the prober's "nothing
    // overdue" (the mails of the last deadline's worth are held but not yet overdue): wait.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let events = get_json(&format!("{}/sandbox/events", sb.api_url())).await;
    let caught_up = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| Some((secs(&e["received_at"])?, secs(&e["ticket_created_at"])?)))
        .filter(|(received, _)| *received > cleared)
        .filter(|(received, created)| created - received < 1.0)
        .map(|(_, created)| created)
        .fold(f64::INFINITY, f64::min);
    let truth = caught_up - cleared;
    eprintln!(
        "drain: caught up {truth:.1} s after the clear (prober saw it drained at {:.1} s); predictions (s into the drain, predicted end): {:?}",
        drained - cleared,
        predictions
            .iter()
            .map(|(at, end)| (format!("{at:.1}"), format!("{:.1}", end - cleared)))
            .collect::<Vec<_>>()
    );
    assert!(truth.is_finite() && truth > 10.0, "a slow drain: {truth} s");
    // The estimate converges: from 60% of the drain on, every prediction is within a quarter
    // of the drain (or 3 s) of the truth. The early ones rest on a few arrivals: on a loaded
    // 2-core machine (load average 9) they were 35-40% long at 40% of the drain, which failed a
    // bound from there on; an estimate that is off by that much of what is left is still
    // within the bound from 60% on, and one that does not converge is not.
    let settled: Vec<_> = predictions
        .iter()
        .filter(|(at, _)| *at >= truth * 0.6)
        .collect();
    assert!(
        settled.len() >= 5,
        "estimates during the drain: {predictions:?}"
    );
    let tolerance = (truth * 0.25).max(3.0);
    for (at, end) in settled {
        assert!(
            (end - cleared - truth).abs() <= tolerance,
            "{at:.1} s into the drain, predicted {:.1} s, truth {truth:.1} s",
            end - cleared
        );
    }
    d.stop().await;
}
