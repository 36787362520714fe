//! Restart drill: `kill -9` the prober with canaries in flight, start it again on the same
//! state dir: every canary sent before the kill completes (on time or late), none lost, none
//! counted twice.

use std::{
    collections::HashSet,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use mailcanary::sandbox::DelayRange;
use serde_json::Value;

use crate::common::*;

fn spawn(config: &std::path::Path, state: &std::path::Path, port: u16) -> KillOnDrop {
    KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_mailcanary"))
            .args(["run", "--config"])
            .arg(config)
            .arg("--state-dir")
            .arg(state)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mailcanary run"),
    )
}

fn ids(v: &Value, list: &str) -> Vec<(String, Value)> {
    v["probes"][0][list]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| (c["id"].as_str().unwrap().to_string(), c.clone()))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_restart_loses_and_double_counts_nothing() {
    // Imports take 1.5–2.5 s, so at any moment a few canaries are in flight.
    let sb = sandbox_with(|c| {
        c.import_delay = DelayRange::new(Duration::from_millis(1500), Duration::from_millis(2500))
    })
    .await;
    let knobs = Knobs {
        interval: "400ms",
        import_deadline: "10s",
        delivery_deadline: "10s",
        ..Knobs::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("drill.toml");
    std::fs::write(&cfg_path, config_text(&sb, &knobs)).unwrap();
    let state = dir.path().join("state");
    let port = free_port();

    let mut first = spawn(&cfg_path, &state, port);
    let t0 = Instant::now();
    let before = loop {
        if let Some(s) = status(port).await
            && ids(&s, "in_flight").len() >= 3
            && t0.elapsed() > Duration::from_secs(3)
        {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no canaries in flight"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = first.0.kill(); // SIGKILL: no goodbye, no flush beyond what was already written
    let _ = first.0.wait();
    let killed_at = mailcanary::flow::now_ms();
    drop(first);

    // Every canary the sandbox received before the kill (ground truth), by Message-ID.
    let received: HashSet<String> = sb.events().into_iter().map(|e| e.message_id).collect();
    let in_flight_before: Vec<String> = ids(&before, "in_flight")
        .into_iter()
        .map(|(i, _)| i)
        .collect();
    assert!(!in_flight_before.is_empty());

    let _second = spawn(&cfg_path, &state, port);
    // Wait until every canary in flight at the kill has finished in the new process.
    let t1 = Instant::now();
    let after = loop {
        if let Some(s) = status(port).await {
            let done: HashSet<String> = ids(&s, "recent").into_iter().map(|(i, _)| i).collect();
            if in_flight_before.iter().all(|i| done.contains(i)) {
                break s;
            }
        }
        assert!(
            t1.elapsed() < Duration::from_secs(40),
            "resumed canaries never finished"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let recent = ids(&after, "recent");
    for id in &in_flight_before {
        let (_, c) = recent.iter().find(|(i, _)| i == id).unwrap();
        let outcome = c["outcome"].as_str().unwrap();
        assert!(
            outcome == "on_time" || outcome == "late",
            "canary {id} resumed after kill -9 ended {outcome}: {c}"
        );
    }
    // Every canary the sandbox took before the kill is known to the new process (finished or
    // in flight) — none forgotten.
    let known: HashSet<String> = recent
        .iter()
        .chain(ids(&after, "in_flight").iter())
        .map(|(_, c)| c["message_id"].as_str().unwrap().to_string())
        .collect();
    for mid in &received {
        assert!(
            known.contains(mid),
            "canary {mid} forgotten across the restart"
        );
    }
    // None counted twice: the new process's completed counter equals the canaries it finished.
    // It keeps sending meanwhile, so compare only a scrape taken between two identical status
    // reads (nothing finished in between). The status shows a canary finished as soon as it
    // ends, the counter after its ledger write a moment later, so a scrape may lag the status
    // by one for a moment: retry until they agree. A canary counted twice would keep the
    // counter above the status for good, and time out.
    let finished_here = |st: &Value| -> usize {
        ids(st, "recent")
            .iter()
            .filter(|(_, c)| {
                c["finished_ms"].as_u64().is_some_and(|f| f >= killed_at)
                    && matches!(c["outcome"].as_str(), Some("on_time") | Some("late"))
            })
            .count()
    };
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let t2 = Instant::now();
    let s = loop {
        let a = finished_here(&status(port).await.unwrap());
        let s = scrape(addr).await;
        let b = finished_here(&status(port).await.unwrap());
        let counted = v(&s, "mailcanary_canaries_completed_total", &[]);
        if a == b && counted == a as f64 {
            break s;
        }
        assert!(
            t2.elapsed() < Duration::from_secs(20),
            "completed counter {counted} never agreed with the {a}..{b} canaries the status \
             shows finished since the restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for stage in ["submit", "import", "reply", "delivery", "end_to_end"] {
        assert_eq!(
            v(&s, "mailcanary_canaries_lost_total", &[("stage", stage)]),
            0.0
        );
    }
    sb.shutdown().await;
}
