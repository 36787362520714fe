//! SIGHUP: a broken config or a changed secret is refused (logged with its cause,
//! `mailcanary_config_last_reload_successful` 0) while the prober goes on with the old config;
//! a good config is applied by restarting in place: same PID, a new probe running, the
//! canaries that were in flight resumed from the ledger, none lost.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use mailcanary::metrics::testing::Samples;

use crate::common::*;

const RELOAD: &str = "mailcanary_config_last_reload_successful";

fn global(s: &Samples, name: &str) -> f64 {
    s.value(name, &[]).unwrap_or(f64::NAN)
}

/// Canary ids of the drill probe in the status's `list` (`in_flight` or `recent`).
fn drill_ids(status: &serde_json::Value, list: &str) -> Vec<String> {
    status["probes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["name"] == PROBE)
        .flat_map(|p| p[list].as_array().cloned().unwrap_or_default())
        .filter_map(|c| c["id"].as_str().map(String::from))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_refuses_a_bad_config_and_applies_a_good_one_in_place() {
    let sb = sandbox().await;
    let knobs = Knobs::default();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("conf");
    std::fs::create_dir_all(&conf).unwrap();
    let file = config_file(&sb, &knobs);
    let text = file.render();
    std::fs::write(conf.join("drill.toml"), &text).unwrap();
    let port = free_port();
    let log = dir.path().join("stderr.log");
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_mailcanary"))
            .args(["run", "--config"])
            .arg(&conf)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let s = until_up(addr, Duration::from_secs(20), "a first canary", |s| {
        v(s, "mailcanary_canaries_completed_total", &[]) >= 1.0
    })
    .await;
    assert_eq!(global(&s, RELOAD), 1.0);

    // 1. A broken file: refused, named with its line and key; the old config goes on.
    std::fs::write(
        conf.join("zz-broken.toml"),
        "[[probe]]\nname = \"broken\"\nkind = \"helpdesk\"\nintervall = \"1s\"\n",
    )
    .unwrap();
    child.signal("HUP");
    let s = until(addr, Duration::from_secs(10), "the reload refused", |s| {
        global(s, RELOAD) == 0.0
    })
    .await;
    let before = v(&s, "mailcanary_canaries_completed_total", &[]);
    until(addr, Duration::from_secs(20), "canaries go on", |s| {
        v(s, "mailcanary_canaries_completed_total", &[]) >= before + 2.0
    })
    .await;
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("config reload refused")
            && logged.contains("zz-broken.toml:4")
            && logged.contains("intervall"),
        "the refusal names file, line and key:\n{logged}"
    );
    assert!(child.0.try_wait().unwrap().is_none(), "still running");

    // 2. A changed secret: refused too (the canaries in flight were signed with the old one).
    std::fs::remove_file(conf.join("zz-broken.toml")).unwrap();
    std::fs::write(conf.join("drill.toml"), {
        let mut changed = file.clone();
        changed.prober_mut().secret = some("another-secret");
        changed.render()
    })
    .unwrap();
    child.signal("HUP");
    until(
        addr,
        Duration::from_secs(10),
        "the secret change refused",
        |_| {
            std::fs::read_to_string(&log)
                .unwrap()
                .contains("[prober] secret changed")
        },
    )
    .await;

    // 3. A good change, a second probe on the same mailbox: applied in place, same PID. The
    // drill canaries in flight at that moment must finish in the new process.
    let t = tokio::time::Instant::now();
    let in_flight = loop {
        let ids = drill_ids(&status(port).await.expect("status"), "in_flight");
        if !ids.is_empty() {
            break ids;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "never a canary in flight"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let second = file.probes[0].renamed("second");
    std::fs::write(conf.join("drill.toml"), file.clone().with(second).render()).unwrap();
    child.signal("HUP");
    let s = until_up(
        addr,
        Duration::from_secs(30),
        "the second probe running",
        |s| {
            s.value(
                "mailcanary_canaries_completed_total",
                &[("probe", "second")],
            )
            .unwrap_or(0.0)
                >= 1.0
        },
    )
    .await;
    assert_eq!(global(&s, RELOAD), 1.0, "a good reload is successful again");
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "the same process (PID {}) runs on",
        child.0.id()
    );
    // The drill probe's canaries, in flight at the restart or sent after it, complete; none is
    // lost or failed.
    let s = until_up(addr, Duration::from_secs(20), "drill canaries again", |s| {
        v(s, "mailcanary_canaries_completed_total", &[]) >= 2.0
    })
    .await;
    for stage in ["submit", "import", "reply", "delivery", "end_to_end"] {
        assert_eq!(
            v(&s, "mailcanary_canaries_lost_total", &[("stage", stage)]),
            0.0
        );
    }
    let t = tokio::time::Instant::now();
    loop {
        let done = status(port)
            .await
            .map(|s| drill_ids(&s, "recent"))
            .unwrap_or_default();
        let missing: Vec<&String> = in_flight.iter().filter(|i| !done.contains(i)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "canaries in flight at the reload never finished: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("restarting in place"), "{logged}");
    assert!(!logged.contains("another-secret") && !logged.contains(&knobs.secret));
    drop(child);
    sb.shutdown().await;
}
