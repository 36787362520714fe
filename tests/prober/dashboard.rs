//! The dashboard in a real browser: headless Chromium (Debian's) renders `/` after a sandbox
//! fault; the DOM shows the probe, its stages, the waterfall and the failure; the history
//! charts drawn from real canaries across a restart, and from a recorded day. Screenshots are
//! kept as test artifacts in `target/artifacts/` (`dashboard.png`, `dashboard-history.png`;
//! `docs/` holds copies).

use std::{path::PathBuf, process::Command, time::Duration};

use mailcanary::sandbox::{Fault, Stage};

use crate::common::*;

fn chromium(args: &[&str], url: &str) -> std::process::Output {
    let profile = tempfile::tempdir().unwrap();
    Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .output()
        .expect("chromium runs (tests/run.sh installs Debian's chromium)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_renders_probe_stages_waterfall_and_the_failure() {
    let sb = sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(&config(&sb, &Knobs::default()), dir.path()).await;
    until(d.addr, Duration::from_secs(20), "two canaries", |s| {
        v(s, "mailcanary_canaries_completed_total", &[]) >= 2.0
    })
    .await;
    sb.faults().set(Stage::Api, Fault::Error);
    until(
        d.addr,
        Duration::from_secs(20),
        "the probe failing on import",
        |s| {
            v(
                s,
                "mailcanary_stage_failures_total",
                &[("stage", "import"), ("reason", "deadline")],
            ) >= 1.0
        },
    )
    .await;

    let url = format!("http://{}/", d.addr);
    let dom = tokio::task::spawn_blocking({
        let url = url.clone();
        move || chromium(&["--dump-dom"], &url)
    })
    .await
    .unwrap();
    assert!(
        dom.status.success(),
        "{}",
        String::from_utf8_lossy(&dom.stderr)
    );
    let html = String::from_utf8_lossy(&dom.stdout);
    assert!(
        html.contains(&format!("id=\"probe-{PROBE}\"")),
        "probe section missing"
    );
    assert!(
        html.contains("data-state=\"failing\""),
        "the probe should show failing"
    );
    assert!(
        html.contains("overdue in import"),
        "the why names the stage"
    );
    for stage in ["submit", "import", "reply", "delivery", "end_to_end"] {
        assert!(
            html.contains(&format!("data-stage=\"{stage}\"")),
            "stage row {stage}"
        );
    }
    assert!(
        html.matches("class=\"canary\"").count() >= 3,
        "waterfall rows"
    );
    assert!(html.contains("class=\"bar import late") || html.contains("bar import late"));
    assert!(html.contains("class=\"failure\""), "failure rows");
    assert!(
        html.contains("<td>api</td>"),
        "the api failure and its reason"
    );
    assert!(
        html.contains("helpdesk api"),
        "the error text from the edge"
    );
    assert!(!html.contains("sandbox</td>") || html.contains(PROBE));
    // The drill's 2 s import deadline, beside the stage's durations.
    assert!(
        html.contains("<td class=\"num\">2.00 s</td>"),
        "the import deadline in the stage table"
    );

    screenshot(&url, "dashboard.png", "1280,1100").await;
    d.stop().await;
    sb.shutdown().await;
}

async fn history(addr: std::net::SocketAddr) -> serde_json::Value {
    http()
        .get(format!("http://{addr}/api/v1/history"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The stage's history of the drill probe in an `/api/v1/history` answer.
fn stage_history<'a>(h: &'a serde_json::Value, stage: &str) -> &'a serde_json::Value {
    h["probes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == PROBE)
        .and_then(|p| {
            p["stages"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["stage"] == stage)
        })
        .unwrap_or_else(|| panic!("no history of {stage} in {h}"))
}

fn counts(h: &serde_json::Value, stage: &str) -> (u64, u64) {
    let c = &stage_history(h, stage)["counts_24h"];
    (c["ok"].as_u64().unwrap(), c["bad"].as_u64().unwrap())
}

/// A screenshot of `url` into `target/artifacts/NAME`, at `size` ("W,H").
async fn screenshot(url: &str, name: &str, size: &str) {
    let artifacts = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join(name);
    let _ = std::fs::remove_file(&shot);
    let out = tokio::task::spawn_blocking({
        let arg = format!("--screenshot={}", shot.display());
        let size = format!("--window-size={size}");
        let url = url.to_string();
        move || chromium(&[&arg, &size, "--hide-scrollbars"], &url)
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::metadata(&shot)
            .map(|m| m.len() > 10_000)
            .unwrap_or(false),
        "no screenshot"
    );
    println!("screenshot: {}", shot.display());
}

fn dump_dom(url: &str) -> String {
    let dom = chromium(&["--dump-dom"], url);
    assert!(
        dom.status.success(),
        "{}",
        String::from_utf8_lossy(&dom.stderr)
    );
    String::from_utf8_lossy(&dom.stdout).into_owned()
}

/// Real canaries, an import failure among them, then a restart: the history kept in the
/// ledger agrees with the counters, survives the restart, and Chromium draws it, a point per
/// measured bin and an availability figure per stage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_draws_the_history_and_it_survives_a_restart() {
    let sb = sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&sb, &Knobs::default());
    let d = daemon(&cfg, dir.path()).await;
    until(d.addr, Duration::from_secs(20), "three canaries", |s| {
        v(s, "mailcanary_canaries_completed_total", &[]) >= 3.0
    })
    .await;
    sb.faults().set(Stage::Api, Fault::Error);
    until(d.addr, Duration::from_secs(20), "an import failure", |s| {
        v(
            s,
            "mailcanary_stage_failures_total",
            &[("stage", "import"), ("reason", "deadline")],
        ) >= 1.0
    })
    .await;
    sb.faults().set(Stage::Api, Fault::Ok);
    until(d.addr, Duration::from_secs(30), "on time again", |s| {
        v(s, "mailcanary_probe_success", &[]) == 1.0
    })
    .await;
    // The history counts what the counters count: import failures by deadline and on-time
    // ends. Read between two identical scrapes, so nothing changed in between.
    let (before, s) = loop {
        let a = scrape(d.addr).await;
        let h = history(d.addr).await;
        let b = scrape(d.addr).await;
        if a.value(
            "mailcanary_stage_failures_total",
            &[
                ("probe", PROBE),
                ("stage", "import"),
                ("reason", "deadline"),
            ],
        ) == b.value(
            "mailcanary_stage_failures_total",
            &[
                ("probe", PROBE),
                ("stage", "import"),
                ("reason", "deadline"),
            ],
        ) && v(&a, "mailcanary_canaries_completed_total", &[])
            == v(&b, "mailcanary_canaries_completed_total", &[])
        {
            break (h, b);
        }
    };
    let (ok, bad) = counts(&before, "import");
    let import = stage_history(&before, "import")["counts_24h"].clone();
    assert!(ok >= 3, "{import}");
    assert_eq!(
        bad as f64,
        v(
            &s,
            "mailcanary_stage_failures_total",
            &[("stage", "import"), ("reason", "deadline")]
        ),
        "{import}"
    );
    let avail = stage_history(&before, "import")["availability_24h"]
        .as_f64()
        .unwrap();
    assert!(avail > 0.0 && avail < 1.0, "{avail}");
    assert!(
        !stage_history(&before, "end_to_end")["latency_24h"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    d.stop().await;

    // A new process on the same state dir: the history is back before anything new ends.
    let d = daemon(&cfg, dir.path()).await;
    let after = history(d.addr).await;
    for stage in ["submit", "import", "reply", "delivery", "end_to_end"] {
        let (ok0, bad0) = counts(&before, stage);
        let (ok1, bad1) = counts(&after, stage);
        assert!(
            ok1 >= ok0 && bad1 == bad0,
            "{stage}: {ok0}/{bad0} before the restart, {ok1}/{bad1} after"
        );
    }
    let url = format!("http://{}/", d.addr);
    let html = tokio::task::spawn_blocking(move || dump_dom(&url))
        .await
        .unwrap();
    for stage in ["submit", "import", "reply", "delivery", "end_to_end"] {
        let row = html
            .split(&format!("<tr class=\"history\" data-stage=\"{stage}\">"))
            .nth(1)
            .unwrap_or_else(|| panic!("no history row for {stage}"));
        let row = &row[..row.find("</tr>").unwrap()];
        assert!(row.contains("<svg class=\"latency\""), "{stage}: {row}");
        assert!(
            row.matches("class=\"point p50\"").count() >= 1,
            "{stage}: no point in {row}"
        );
        assert_eq!(row.matches("<rect").count(), 168, "{stage}");
        assert!(row.contains(" % of "), "{stage}: no availability in {row}");
    }
    d.stop().await;
    sb.shutdown().await;
}

/// A day of history written into a ledger the way the engine writes it (for the picture in
/// `docs/`: a day takes a day to record): a two-hour import stall eight hours ago. Chromium
/// draws a point for every 10-minute bin of the day and the stall's hours in red; the
/// screenshot is `target/artifacts/dashboard-history.png`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_draws_a_recorded_day_with_its_stall() {
    use std::collections::HashMap;

    use mailcanary::{
        canary::life::Stage as Life,
        flow::history::{Mark, Series},
        ledger::{Ledger, Write},
    };
    let dir = tempfile::tempdir().unwrap();
    let now = mailcanary::clock::wall_ms();
    let stall = (now - 9 * 3_600_000, now - 7 * 3_600_000);
    let mut records: HashMap<(Life, u64), Write> = HashMap::new();
    for stage in [
        Life::Submit,
        Life::Import,
        Life::Reply,
        Life::Delivery,
        Life::EndToEnd,
    ] {
        let mut s = Series::default();
        let base = match stage {
            Life::Submit => 40,
            Life::Import => 900,
            Life::Reply => 350,
            Life::Delivery => 600,
            _ => 1_900,
        };
        for minute in 0..24 * 60u64 {
            let t = now - (24 * 60 - minute) * 60_000 + 1;
            let wobble = (minute * 7919 % 100) * base / 200;
            let stalled = matches!(stage, Life::Import | Life::EndToEnd);
            let mut marks = Vec::new();
            if stalled && t >= stall.0 && t < stall.1 {
                marks.push(Mark::Failed);
            } else if stalled && t >= stall.1 && t - stall.1 < 3_600_000 {
                // The backlog drains for an hour after the stall: each held canary's deadline
                // passed first, then it arrives, late and long.
                marks.push(Mark::Failed);
                marks.push(Mark::Late(7_200_000 - (t - stall.1) * 2));
            } else {
                marks.push(Mark::OnTime(base + wobble));
            }
            for m in marks {
                for (stage, hour, bucket) in s.add(stage, t, m) {
                    records.insert(
                        (stage, hour),
                        Write::History {
                            probe: PROBE.to_string(),
                            stage,
                            hour,
                            bucket,
                        },
                    );
                }
            }
        }
    }
    {
        let ledger = Ledger::open(dir.path()).unwrap();
        ledger
            .write(&records.into_values().collect::<Vec<_>>())
            .unwrap();
    }
    let sb = sandbox().await;
    let d = daemon(&config(&sb, &Knobs::default()), dir.path()).await;
    let h = history(d.addr).await;
    let points = stage_history(&h, "submit")["latency_24h"]
        .as_array()
        .unwrap()
        .len();
    assert!(points >= 143, "{points} bins of 144 in a recorded day");
    let import = stage_history(&h, "import");
    let avail = import["availability_24h"].as_f64().unwrap();
    assert!(
        (0.85..0.9).contains(&avail),
        "two held hours and one of draining in 24: {avail}"
    );

    let url = format!("http://{}/", d.addr);
    let html = tokio::task::spawn_blocking({
        let url = url.clone();
        move || dump_dom(&url)
    })
    .await
    .unwrap();
    let row = html
        .split("<tr class=\"history\" data-stage=\"import\">")
        .nth(1)
        .unwrap();
    let row = &row[..row.find("</tr>").unwrap()];
    // A point per bin that measured a duration: none while held (two hours, 12 bins), so
    // the line breaks there.
    let drawn = row.matches("class=\"point p50\"").count();
    assert_eq!(drawn, import["latency_24h"].as_array().unwrap().len());
    assert!((128..=134).contains(&drawn), "{drawn} points");
    assert!(
        row.matches("<polyline class=\"p50\"").count() >= 2,
        "no gap drawn"
    );
    assert!(
        row.matches("class=\"poor\"").count() >= 3,
        "the stall's and the drain's hours in red"
    );
    assert!(row.contains(">2.0 h</text>"), "the chart's top: {row}");

    screenshot(&url, "dashboard-history.png", "1280,900").await;
    d.stop().await;
    sb.shutdown().await;
}
