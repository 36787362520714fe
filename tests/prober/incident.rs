//! Incidents against the sandbox's ground truth: import stalls for 8 s while a canary goes
//! every 500 ms, then drains at 4 tickets a second. The incident must say when the outage can
//! have begun (a window holding the moment the fault was set), when it was detected, cleared
//! and drained, and how many canaries were held and came through late (as the sandbox's events
//! count them); `mailcanary incidents` prints it from the running prober and, once stopped,
//! from its state dir.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mailcanary::{
    config,
    sandbox::{Fault, Stage},
};
use serde_json::Value;

use crate::common::*;

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn ms(v: &Value) -> Option<i64> {
    Some(
        chrono::DateTime::parse_from_rfc3339(v.as_str()?)
            .ok()?
            .timestamp_millis(),
    )
}

async fn incidents(addr: std::net::SocketAddr) -> (Vec<Value>, i64) {
    let j = get_json(&format!("http://{addr}/api/v1/incidents")).await;
    (
        j["incidents"].as_array().cloned().unwrap_or_default(),
        j["wall_offset_ms"].as_i64().unwrap_or_default(),
    )
}

/// The first closed incident, waiting up to 50 s for one.
async fn closed_incident(addr: std::net::SocketAddr) -> Option<Value> {
    for _ in 0..200 {
        let (all, _) = incidents(addr).await;
        if let Some(i) = all.into_iter().find(|i| !i["drained_ms"].is_null()) {
            return Some(i);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_stall_becomes_an_incident_that_matches_the_ground_truth() {
    let (sb, k) = slow_drain().await;
    let cfg = config::parse_str(&config_text(&sb, &k), "incident.toml").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(&cfg, dir.path()).await;
    until(d.addr, Duration::from_secs(20), "canaries flowing", |s| {
        v(s, "mailcanary_canaries_completed_total", &[]) >= 3.0
    })
    .await;
    assert!(
        incidents(d.addr).await.0.is_empty(),
        "no incident while healthy"
    );

    let fault_at = wall_ms();
    sb.faults().set(Stage::Import, Fault::Stall);
    tokio::time::sleep(Duration::from_secs(8)).await;
    let (open, offset) = incidents(d.addr).await;
    assert_eq!(open.len(), 1, "{open:?}");
    let i = &open[0];
    assert_eq!(
        (i["stage"].as_str(), i["reason"].as_str()),
        (Some("import"), Some("deadline"))
    );
    assert!(
        i["drained_ms"].is_null() && i["cleared_ms"].is_null(),
        "open: {i}"
    );
    let clear_at = wall_ms();
    sb.faults().set(Stage::Import, Fault::Ok);

    // Closed once cleared and drained.
    let i = closed_incident(d.addr).await.expect("the incident closed");
    let wall = |k: &str| i[k].as_i64().map(|t| t + offset);
    let (after, before) = (
        wall("onset_after_ms").unwrap(),
        wall("onset_before_ms").unwrap(),
    );
    let (detected, resumed, cleared, drained) = (
        wall("detected_ms").unwrap(),
        wall("resumed_ms").unwrap(),
        wall("cleared_ms").unwrap(),
        wall("drained_ms").unwrap(),
    );
    eprintln!(
        "incident (ms from the fault): onset window {}..{}, detected {}, resumed {} (clear at {}), drained {}, cleared {}",
        after - fault_at,
        before - fault_at,
        detected - fault_at,
        resumed - fault_at,
        clear_at - fault_at,
        drained - fault_at,
        cleared - fault_at,
    );
    // The clock conversion is good to a few ms; 50 ms of slack either way.
    assert!(
        after - 50 <= fault_at && fault_at <= before + 50,
        "the onset window holds the fault"
    );
    // Detected within the deadline (2 s) plus an interval and a tick of the fault.
    assert!(
        detected >= fault_at && detected - fault_at <= 2_000 + 500 + 500,
        "detected"
    );
    // Ground truth of the drain: the first and the last held canary's ticket.
    let events = get_json(&format!("{}/sandbox/events", sb.api_url())).await;
    let held_tickets: Vec<(i64, i64)> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| Some((ms(&e["received_at"])?, ms(&e["ticket_created_at"])?)))
        .filter(|(received, created)| created - received > 2_000)
        .collect();
    let first_through = held_tickets.iter().map(|t| t.1).min().unwrap();
    let last_through = held_tickets.iter().map(|t| t.1).max().unwrap();
    // Within one poll interval (200 ms) and a tick of the prober's seeing them.
    assert!(
        (resumed - first_through).abs() <= 500,
        "resumed {} vs ticket {}",
        resumed - fault_at,
        first_through - fault_at
    );
    assert!(
        (drained - last_through).abs() <= 500,
        "drained {} vs ticket {}",
        drained - fault_at,
        last_through - fault_at
    );
    assert!(resumed >= clear_at, "resumed after the clear");
    assert!(
        cleared >= drained,
        "the first on-time canary after the last held one (FIFO)"
    );

    // Held and late, against the sandbox's events: the canaries whose ticket came more than
    // the deadline after the mail.
    let lags: Vec<i64> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| Some(ms(&e["ticket_created_at"])? - ms(&e["received_at"])?))
        .collect();
    let truth_held = lags.iter().filter(|l| **l > 2_000).count() as i64;
    let held = i["held"].as_i64().unwrap();
    assert!(
        (held - truth_held).abs() <= 1,
        "held {held}, ground truth {truth_held}"
    );
    assert_eq!(i["late"], i["held"], "every held canary came through late");
    assert_eq!(i["lost"], 0);
    let max_lag = *lags.iter().max().unwrap();
    let max_delay = i["max_delay_ms"].as_i64().unwrap();
    assert!(
        (max_delay - max_lag).abs() <= 500,
        "max delay {max_delay}, ground truth {max_lag}"
    );

    // Listed on the dashboard, with its timeline.
    let page = get_text(&format!("http://{}/", d.addr)).await;
    assert!(
        page.contains("<tr class=\"incident\" data-state=\"closed\">")
            && page.contains("bar draining"),
        "the dashboard lists the incident"
    );
    // Printed for a postmortem, from the running prober...
    let out = bin()
        .args([
            "incidents",
            "--format",
            "markdown",
            "--url",
            &format!("http://{}", d.addr),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "### Incident 1 of probe",
        ": import (deadline)",
        "**Began**: between",
        "**Backlog drained**",
    ] {
        assert!(text.contains(want), "{want:?} in:\n{text}");
    }
    eprintln!("{text}");
    // ... and, once it is stopped, from its state dir (the history survives).
    d.stop().await;
    let out = bin()
        .args(["incidents", "--format", "json", "--state-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stored: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(stored[0]["id"], 1);
    assert_eq!(stored[0]["held"], i["held"]);
    assert_eq!(stored[0]["drained_ms"], i["drained_ms"]);
}

/// An incident open when the prober stops is resumed by the next one on the same state dir,
/// and closes there: the same incident, its held canaries counted across the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_incident_survives_a_restart_and_closes_after_it() {
    let (sb, k) = slow_drain().await;
    let cfg = config::parse_str(&config_text(&sb, &k), "incident.toml").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(&cfg, dir.path()).await;
    until(d.addr, Duration::from_secs(20), "canaries flowing", |s| {
        v(s, "mailcanary_canaries_completed_total", &[]) >= 2.0
    })
    .await;
    sb.faults().set(Stage::Import, Fault::Stall);
    let mut before = Value::Null;
    for _ in 0..100 {
        let (all, _) = incidents(d.addr).await;
        if let Some(i) = all.first().filter(|i| i["held"].as_u64() >= Some(3)) {
            before = i.clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!before.is_null(), "an open incident with held canaries");
    d.stop().await;

    let d = daemon(&cfg, dir.path()).await;
    let (all, _) = incidents(d.addr).await;
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0]["id"], before["id"]);
    assert_eq!(
        all[0]["detected_ms"], before["detected_ms"],
        "the same incident, resumed"
    );
    assert!(all[0]["drained_ms"].is_null(), "still open");
    sb.faults().set(Stage::Import, Fault::Ok);
    let i = closed_incident(d.addr)
        .await
        .expect("closed after the restart");
    assert_eq!(i["id"], before["id"]);
    assert!(i["held"].as_u64() >= before["held"].as_u64(), "{i}");
    assert_eq!(
        i["late"], i["held"],
        "the held canaries of both processes came through: {i}"
    );
    d.stop().await;
}
