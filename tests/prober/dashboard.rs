//! The dashboard in a real browser: headless Chromium (Debian's) renders `/` after a sandbox
//! fault; the DOM shows the probe, its stages, the waterfall and the failure. A screenshot is
//! kept as a test artifact in `target/artifacts/dashboard.png`.

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

    let artifacts = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let out = tokio::task::spawn_blocking({
        let arg = format!("--screenshot={}", shot.display());
        move || {
            chromium(
                &[&arg, "--window-size=1280,1100", "--hide-scrollbars"],
                &url,
            )
        }
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
            .unwrap_or(false)
    );
    println!("screenshot: {}", shot.display());
    d.stop().await;
    sb.shutdown().await;
}
