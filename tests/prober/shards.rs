//! Shards: several `mailcanary run --shard K/N` processes on one config, each with its own
//! state dir, own every probe exactly once between them; a replica's restart resumes its own
//! canaries and nobody else's; `--shard auto/N` takes K from a StatefulSet pod's hostname.

use std::{
    collections::BTreeSet,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use mailcanary::{
    metrics::testing::Samples,
    sandbox::{Fault, Stage},
};

use crate::common::*;

const PROBES: usize = 9;
const SHARDS: u32 = 3;

/// The probes a prober exports `probe_success` for: the ones it runs.
fn owned(s: &Samples) -> BTreeSet<String> {
    s.family("mailcanary_probe_success")
        .into_iter()
        .filter_map(|x| x.labels.get("probe").cloned())
        .collect()
}

/// The sum of `name` over every series (every probe).
fn total(s: &Samples, name: &str) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.name == name)
        .map(|x| x.value)
        .sum()
}

/// The series of `name` with exactly `labels`.
fn gauge(s: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.value(name, labels).unwrap_or(f64::NAN)
}

/// `mailcanary run --shard SHARD` on `config`, its state in `state`, on `port`.
fn replica(config: &Path, state: &Path, port: u16, shard: &str) -> KillOnDrop {
    KillOnDrop(
        bin()
            .args(["run", "--config"])
            .arg(config)
            .arg("--state-dir")
            .arg(state)
            .args(["--listen", &format!("127.0.0.1:{port}"), "--shard", shard])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// The canaries in flight at the prober on `port` that no ticket was found for yet (held
/// by the import stall: they stay in flight until it clears), as (probe, id).
async fn in_flight(port: u16) -> BTreeSet<(String, String)> {
    let st = status(port).await.expect("the prober answers");
    st["probes"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["in_flight"].as_array().cloned().unwrap_or_default())
        .filter(|c| c["ticket_id"].is_null())
        .map(|c| {
            (
                c["probe"].as_str().unwrap().to_string(),
                c["id"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_shards_own_every_probe_once_and_a_restart_resumes_its_own_canaries_only() {
    let sb = sandbox().await;
    let k = Knobs {
        interval: "1s",
        import_deadline: "30s",
        end_to_end: "60s",
        ..Knobs::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fleet.toml");
    std::fs::write(&config, fleet_text(&sb, &k, PROBES)).unwrap();
    let ports: Vec<u16> = (0..SHARDS).map(|_| free_port()).collect();
    let state = |i: u32| dir.path().join(format!("state-{i}"));
    let mut replicas: Vec<KillOnDrop> = (0..SHARDS)
        .map(|i| {
            replica(
                &config,
                &state(i),
                ports[i as usize],
                &format!("{i}/{SHARDS}"),
            )
        })
        .collect();

    // Every probe is run by exactly one replica, and the replicas say so themselves.
    let mut seen: Vec<BTreeSet<String>> = Vec::new();
    let mut owned_total = 0.0;
    for (i, &port) in ports.iter().enumerate() {
        let addr = ([127, 0, 0, 1], port).into();
        let s = until_up(
            addr,
            Duration::from_secs(30),
            "a canary on each shard",
            |s| total(s, "mailcanary_canaries_completed_total") >= 1.0,
        )
        .await;
        assert_eq!(
            gauge(&s, "mailcanary_probes_configured", &[]),
            PROBES as f64
        );
        assert_eq!(
            gauge(
                &s,
                "mailcanary_shard_info",
                &[("shard", &i.to_string()), ("shards", "3")]
            ),
            1.0
        );
        owned_total += gauge(&s, "mailcanary_probes_owned", &[]);
        let mine = owned(&s);
        assert_eq!(mine.len() as f64, gauge(&s, "mailcanary_probes_owned", &[]));
        for other in &seen {
            assert!(mine.is_disjoint(other), "{mine:?} and {other:?} overlap");
        }
        seen.push(mine);
    }
    let union: BTreeSet<String> = seen.iter().flatten().cloned().collect();
    let all: BTreeSet<String> = (0..PROBES).map(|i| format!("p{i:04}")).collect();
    assert_eq!(union, all, "every configured probe is owned");
    assert_eq!(owned_total, PROBES as f64);

    // Canaries held in import on every shard; shard 1 is killed outright and started again.
    sb.faults().set(Stage::Import, Fault::Stall);
    let victim = 1usize;
    // Held canaries on every shard (bounded wait: canaries leave every second).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let (held, others) = loop {
        let held = in_flight(ports[victim]).await;
        let mut others = Vec::new();
        for i in [0usize, 2] {
            others.push((i, in_flight(ports[i]).await));
        }
        if held.len() >= 2 && others.iter().all(|(_, o)| !o.is_empty()) {
            break (held, others);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no held canaries on every shard: {held:?} {others:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    replicas[victim].signal("KILL");
    let _ = replicas[victim].0.wait();
    replicas[victim] = replica(
        &config,
        &state(victim as u32),
        ports[victim],
        &format!("{victim}/{SHARDS}"),
    );
    let addr = ([127, 0, 0, 1], ports[victim]).into();
    until_up(addr, Duration::from_secs(30), "the restarted shard", |_| {
        true
    })
    .await;
    let resumed = in_flight(ports[victim]).await;
    assert!(
        held.is_subset(&resumed),
        "the restarted shard resumes what it held: {held:?} vs {resumed:?}"
    );
    for (probe, _) in &resumed {
        assert!(
            seen[victim].contains(probe),
            "{probe} is not shard {victim}'s"
        );
    }
    // The other shards' canaries are theirs alone: none of them is resumed here.
    for (i, theirs) in &others {
        assert!(
            resumed.is_disjoint(theirs),
            "shard {i}'s canaries resumed here"
        );
    }
    // The held canaries come through on their own shard, none lost.
    sb.faults().set(Stage::Import, Fault::Ok);
    let s = until_up(addr, Duration::from_secs(30), "the resumed canaries", |s| {
        total(s, "mailcanary_canaries_completed_total") >= held.len() as f64
    })
    .await;
    assert_eq!(total(&s, "mailcanary_canaries_lost_total"), 0.0);
    drop(replicas);
    sb.shutdown().await;
}

/// `mailcanary run --shard auto/3` in a UTS namespace whose hostname is `host`: what it
/// says on `/metrics` (`Ok`) or on stderr when it refuses to start (`Err`).
async fn auto_shard_as(host: &str) -> Result<Samples, String> {
    let sb = sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fleet.toml");
    std::fs::write(&config, fleet_text(&sb, &Knobs::default(), PROBES)).unwrap();
    let port = free_port();
    let script = format!(
        "hostname {host} && exec {bin} run --config {config} --state-dir {state} \
         --listen 127.0.0.1:{port} --shard auto/3",
        bin = env!("CARGO_BIN_EXE_mailcanary"),
        config = config.display(),
        state = dir.path().join("state").display(),
    );
    let mut child = KillOnDrop(
        Command::new("unshare")
            .args(["--uts", "sh", "-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("unshare (util-linux)"),
    );
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .0
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return Err(format!("{status}: {err}"));
        }
        if let Ok(r) = http().get(format!("http://{addr}/metrics")).send().await {
            let s = mailcanary::metrics::testing::parse_exposition(&r.text().await.unwrap());
            sb.shutdown().await;
            return Ok(s);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "neither up nor exited"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_auto_takes_its_number_from_a_statefulset_pods_hostname() {
    let s = auto_shard_as("mailcanary-2").await.expect("it starts");
    assert_eq!(
        gauge(
            &s,
            "mailcanary_shard_info",
            &[("shard", "2"), ("shards", "3")]
        ),
        1.0
    );
    assert_eq!(
        gauge(&s, "mailcanary_probes_configured", &[]),
        PROBES as f64
    );
    let err = auto_shard_as("prober").await.expect_err("it refuses");
    assert!(err.contains("does not end in -ORDINAL"), "{err}");
    let err = auto_shard_as("mailcanary-3").await.expect_err("it refuses");
    assert!(err.contains("only 3 shards"), "{err}");
}
