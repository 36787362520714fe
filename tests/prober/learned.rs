//! Learned deadlines (`deadline = "auto"`) on the sandbox: the import deadline starts at
//! `auto_max` (30 s here), tightens to what the import really takes once enough canaries went
//! through (three times the p99, never under `auto_min`), detects a stall in a fraction of
//! the fixed figure, and stays where it was while the probe fails (an outage is never learned
//! as normal).

use std::time::{Duration, Instant};

use mailcanary::{
    config,
    sandbox::{Fault, Stage},
};

use crate::common::*;

const DEADLINE: &str = "mailcanary_stage_deadline_seconds";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auto_deadline_is_learned_detects_a_stall_sooner_and_is_frozen_while_failing() {
    let sb = sandbox().await;
    let k = Knobs {
        interval: "200ms",
        end_to_end: "2m",
        ..Knobs::default()
    };
    let mut file = config_file(&sb, &k);
    let deadlines = file.probe_mut(PROBE).deadlines_mut();
    deadlines.import = some("auto");
    deadlines.auto_min = some("1s");
    deadlines.auto_max = some("30s");
    let text = file.render();
    let cfg = config::parse_str(&text, "learned.toml").unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(&cfg, dir.path()).await;
    let import = [("stage", "import")];
    let s = scrape(d.addr).await;
    assert_eq!(v(&s, DEADLINE, &import), 30.0, "auto_max until learned");
    assert_eq!(
        v(&s, DEADLINE, &[("stage", "reply")]),
        5.0,
        "fixed stages as configured"
    );
    let s = until(d.addr, Duration::from_secs(30), "a learned deadline", |s| {
        v(s, DEADLINE, &import) < 30.0
    })
    .await;
    let learned = v(&s, DEADLINE, &import);
    eprintln!(
        "learned import deadline: {learned} s (sandbox import 50-150 ms, polled every 200 ms)"
    );
    // Three times the p99 of 50-150 ms plus the 200 ms poll is under a second: auto_min holds.
    assert!((1.0..3.0).contains(&learned), "{learned}");

    let t = Instant::now();
    sb.faults().set(Stage::Import, Fault::Stall);
    until(d.addr, Duration::from_secs(10), "the stall blamed", |s| {
        v(
            s,
            "mailcanary_stage_failures_total",
            &[("stage", "import"), ("reason", "deadline")],
        ) >= 1.0
    })
    .await;
    let detected = t.elapsed();
    eprintln!(
        "stall detected after {detected:?} with the learned deadline (30 s fixed would wait 30 s)"
    );
    assert!(detected < Duration::from_secs(5), "{detected:?}");
    // Failing: frozen, however the held canaries' durations grow.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        v(&scrape(d.addr).await, DEADLINE, &import),
        learned,
        "frozen while failing"
    );
    sb.faults().set(Stage::Import, Fault::Ok);
    let s = until(d.addr, Duration::from_secs(30), "green again", |s| {
        v(s, "mailcanary_probe_success", &[]) == 1.0
    })
    .await;
    assert!(
        v(&s, DEADLINE, &import) < 3.0,
        "the late canaries of the outage were not learned: {}",
        v(&s, DEADLINE, &import)
    );
    d.stop().await;
}
