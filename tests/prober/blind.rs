//! Never silently blind: every way the prober itself can stop sending, recording or watching
//! canaries makes the probe fail (with its own reason) or the prober unready within one interval
//! plus one deadline, and it recovers by itself when the condition clears. One drill per case
//! (ARCHITECTURE.md names them).
//!
//! The disk drills need root (they mount a tmpfs or a loop-mounted ext4 image); `tests/run.sh`
//! runs as root on CI. They fail, loudly, where they cannot mount: a drill that skips itself is
//! a drill nobody runs.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use crate::common::*;

const SUCCESS: &str = "mailcanary_probe_success";
const FAILURES: &str = "mailcanary_stage_failures_total";
const COMPLETED: &str = "mailcanary_canaries_completed_total";
const SKIPPED: &str = "mailcanary_canaries_skipped_total";
const LEDGER_ERRORS: &str = "mailcanary_ledger_errors_total";
const IN_FLIGHT: &str = "mailcanary_stage_in_flight";

/// The principle's bound for the drill probe: interval (1 s) plus its shortest deadline (2 s).
const BOUND: Duration = Duration::from_secs(3);
/// What the assertions allow on top: one scrape poll, and a shared, noisy machine.
const SLACK: Duration = Duration::from_secs(2);
/// Recovery: the ledger's longest reopen wait (5 s) plus a canary's round trip, generously.
const RECOVERY: Duration = Duration::from_secs(30);

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A file system mounted for one drill, unmounted (lazily: the prober may still hold a file)
/// when dropped.
struct Mount {
    dir: tempfile::TempDir,
}

impl Mount {
    fn tmpfs(size: &str) -> Mount {
        let dir = tempfile::tempdir().unwrap();
        let opts = format!("size={size}");
        run(
            "mount",
            &["-t", "tmpfs", "-o", &opts, "tmpfs", path_str(dir.path())],
        );
        Mount { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .args(["-l", path_str(self.dir.path())])
            .status();
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn ledger_errors(s: &mailcanary::metrics::testing::Samples, op: &str) -> f64 {
    s.value(LEDGER_ERRORS, &[("op", op)]).unwrap_or(0.0)
}

async fn readyz(addr: std::net::SocketAddr) -> (u16, String) {
    let r = http()
        .get(format!("http://{addr}/readyz"))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Writes zeros into `dir/filler` until the file system is full.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 4096];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
    path
}

/// Waits for the probe to fail because of the ledger: probe_success 0, the error counted,
/// a canary skipped and counted as a submit failure with reason `ledger`, `/readyz` 503.
///
/// The bound runs from the first ledger error `op` counts.
async fn assert_blind_shows(addr: std::net::SocketAddr, op: &str, since: Instant) {
    until(
        addr,
        Duration::from_secs(60),
        "a first failed ledger write",
        |s| ledger_errors(s, op) >= 1.0,
    )
    .await;
    eprintln!("first ledger error after {:?}", since.elapsed());
    let since = Instant::now();
    until(addr, BOUND + SLACK, "the ledger failure to show", |s| {
        v(s, SUCCESS, &[]) == 0.0
            && ledger_errors(s, op) >= 1.0
            && v(s, SKIPPED, &[("reason", "ledger")]) >= 1.0
            && v(s, FAILURES, &[("stage", "submit"), ("reason", "ledger")]) >= 1.0
    })
    .await;
    eprintln!("ledger failure shown after {:?}", since.elapsed());
    let (code, body) = readyz(addr).await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("ledger"), "{body}");
    let st = status(addr.port()).await.unwrap();
    let why = st["probes"][0]["why"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(why.starts_with("ledger:"), "{why}");
}

/// Waits for the recovery: ready again, probe green, canaries completing again.
async fn assert_recovers(addr: std::net::SocketAddr, since: Instant) {
    let before = v(&scrape(addr).await, COMPLETED, &[]);
    until(
        addr,
        RECOVERY,
        "recovery after the ledger works again",
        |s| v(s, SUCCESS, &[]) == 1.0 && v(s, COMPLETED, &[]) >= before + 2.0,
    )
    .await;
    eprintln!(
        "recovered {:?} after the condition cleared",
        since.elapsed()
    );
    let (code, body) = readyz(addr).await;
    assert_eq!(code, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_dir_full_then_freed() {
    let mnt = Mount::tmpfs("256k");
    let state = mnt.path().join("state");
    let sb = sandbox().await;
    let d = daemon(&config(&sb, &Knobs::default()), &state).await;
    until(d.addr, Duration::from_secs(20), "a first canary", |s| {
        v(s, COMPLETED, &[]) >= 1.0
    })
    .await;

    let filler = fill(mnt.path());
    // The periodic check finds the disk full (a write may still fit in the file's pages).
    assert_blind_shows(d.addr, "check", Instant::now()).await;
    let why = status(d.addr.port()).await.unwrap()["probes"][0]["why"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(why.contains("bytes free"), "{why}");
    // Blind stays blind, and says so, for as long as the disk is full: no flapping back to
    // green while redb still finds a free page for the odd write (it did, before the check
    // looked at free space).
    let steady = Instant::now();
    while steady.elapsed() < Duration::from_secs(3) {
        assert_eq!(v(&scrape(d.addr).await, SUCCESS, &[]), 0.0);
        assert_eq!(readyz(d.addr).await.0, 503);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    std::fs::remove_file(&filler).unwrap();
    assert_recovers(d.addr, Instant::now()).await;
    d.stop().await;
    sb.shutdown().await;
}

/// A disk error makes ext4 remount itself read-only (`errors=remount-ro`), the way a real
/// volume fails: writes on the files already open then fail with EROFS. The operator's fix,
/// unmount, fsck and mount again, is what the prober must recover from by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_dir_read_only_then_repaired() {
    let work = tempfile::tempdir().unwrap();
    let image = work.path().join("state.ext4");
    let mnt = work.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    run("truncate", &["-s", "16M", path_str(&image)]);
    run("mkfs.ext4", &["-q", "-F", path_str(&image)]);
    let mount = || {
        run(
            "mount",
            &[
                "-o",
                "loop,errors=remount-ro",
                path_str(&image),
                path_str(&mnt),
            ],
        )
    };
    mount();
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount")
                .args(["-l", self.0.to_str().unwrap()])
                .status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let state = mnt.join("state");
    let sb = sandbox().await;
    let d = daemon(&config(&sb, &Knobs::default()), &state).await;
    until(d.addr, Duration::from_secs(20), "a first canary", |s| {
        v(s, COMPLETED, &[]) >= 1.0
    })
    .await;

    // The loop device's ext4 sysfs entry: writing there raises a file system error.
    let dev = std::fs::read_to_string("/proc/mounts")
        .unwrap()
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(path_str(&mnt)))
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .expect("the image is mounted");
    let name = dev.trim_start_matches("/dev/");
    std::fs::write(format!("/sys/fs/ext4/{name}/trigger_fs_error"), "drill\n").unwrap();
    assert_blind_shows(d.addr, "write", Instant::now()).await;

    // Repaired: unmounted (lazily, the prober still holds the old file), checked, mounted again.
    run("umount", &["-l", path_str(&mnt)]);
    let _ = Command::new("e2fsck")
        .args(["-f", "-y", path_str(&image)])
        .output();
    mount();
    assert_recovers(d.addr, Instant::now()).await;
    d.stop().await;
    sb.shutdown().await;
}

/// The ledger file, then the whole state dir, removed under the running prober: writes to the
/// unlinked file would succeed and be gone at the next start. The file is made again and every
/// canary in flight written into it, so a restart still resumes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_file_deleted_under_the_running_prober() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let file = state.join(mailcanary::ledger::FILE_NAME);
    let key_file = state.join(mailcanary::canary::token::SECRET_FILE);
    let sb = sandbox().await;
    // No configured secret: the key is generated into the state dir, and must survive it.
    let mut config = config_file(&sb, &Knobs::default());
    config.prober_mut().secret = None;
    let text = config.render();
    let d = daemon(
        &mailcanary::config::parse_str(&text, "drill.toml").unwrap(),
        &state,
    )
    .await;
    let key = std::fs::read_to_string(&key_file).unwrap();
    until(d.addr, Duration::from_secs(20), "a first canary", |s| {
        v(s, COMPLETED, &[]) >= 1.0
    })
    .await;
    // Hold canaries in flight: they are what must not be forgotten.
    sb.faults().set(
        mailcanary::sandbox::Stage::Import,
        mailcanary::sandbox::Fault::Stall,
    );
    until(
        d.addr,
        Duration::from_secs(10),
        "canaries held in import",
        |s| {
            v(s, IN_FLIGHT, &[("stage", "import")]) >= 1.0
                && v(s, "mailcanary_canaries_sent_total", &[]) >= 2.0
        },
    )
    .await;

    for what in ["the ledger file", "the state dir"] {
        let before = ledger_errors(&scrape(d.addr).await, "check");
        let t = Instant::now();
        if what == "the ledger file" {
            std::fs::remove_file(&file).unwrap();
        } else {
            std::fs::remove_dir_all(&state).unwrap();
        }
        until(d.addr, BOUND + SLACK, &format!("{what} found gone"), |s| {
            ledger_errors(s, "check") > before
        })
        .await;
        eprintln!("{what} removed: found after {:?}", t.elapsed());
        let deadline = Instant::now() + BOUND + SLACK;
        while !file.exists() {
            assert!(
                Instant::now() < deadline,
                "{what}: the ledger was not made again"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The file comes back first, then the in-flight canaries are written to it, then the
        // prober is ready again: wait for the last, within the same bound.
        loop {
            let (code, body) = readyz(d.addr).await;
            if code == 200 {
                break;
            }
            assert!(Instant::now() < deadline, "{what}: not ready again: {body}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            std::fs::read_to_string(&key_file).ok().as_deref(),
            Some(key.as_str()),
            "{what}: the generated key is in the state dir again"
        );
    }
    let held = d
        .engine
        .status(mailcanary::flow::now_ms())
        .into_iter()
        .flat_map(|p| p.in_flight)
        .map(|c| c.id)
        .collect::<Vec<_>>();
    assert!(
        !held.is_empty(),
        "{:#}",
        status(d.addr.port()).await.unwrap()
    );
    d.stop().await;
    // What a restart would resume: every canary that was in flight is in the new file.
    // The stopped daemon's last tasks let go of the file within moments.
    let t = Instant::now();
    let ledger = loop {
        match mailcanary::ledger::Ledger::open(&state) {
            Ok(l) => break l,
            Err(e) if t.elapsed() < Duration::from_secs(10) => {
                eprintln!("reopening the ledger: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    let resumed: Vec<String> = ledger
        .in_flight()
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    for id in &held {
        assert!(
            resumed.contains(id),
            "{id} not in the new ledger: {resumed:?}"
        );
    }
    sb.shutdown().await;
}

/// The IMAP watcher cannot log in (a wrong password from the first second): delivery cannot be
/// observed, so the probe fails with delivery/auth, not green until a deadline, and never
/// blames another stage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_login_refused_from_the_start_fails_the_probe_at_once() {
    let sb = sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let k = Knobs {
        imap_password: "wrong".into(),
        ..Knobs::default()
    };
    let t = Instant::now();
    let d = daemon(&config(&sb, &k), dir.path()).await;
    // A failed LOGIN answers at once here; Dovecot's 2 s failure delay is within the slack.
    let s = until(d.addr, BOUND + SLACK, "delivery/auth failure", |s| {
        v(s, SUCCESS, &[]) == 0.0
            && v(s, FAILURES, &[("stage", "delivery"), ("reason", "auth")]) >= 1.0
    })
    .await;
    eprintln!("login refusal shown after {:?}", t.elapsed());
    assert_eq!(
        v(&s, FAILURES, &[("stage", "import"), ("reason", "deadline")]),
        0.0
    );
    let st = status(d.addr.port()).await.unwrap();
    let why = st["probes"][0]["why"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(why.starts_with("mailbox: auth"), "{why}");
    d.stop().await;
    sb.shutdown().await;
}

/// A stall fills `max_in_flight`: the skipped canaries are a line on a graph, not only a log
/// line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canaries_skipped_at_max_in_flight_are_counted() {
    let sb = sandbox().await;
    sb.faults().set(
        mailcanary::sandbox::Stage::Import,
        mailcanary::sandbox::Fault::Stall,
    );
    let dir = tempfile::tempdir().unwrap();
    let mut file = config_file(&sb, &Knobs::default());
    file.probe_mut(PROBE).max_in_flight = Some(2);
    let text = file.render();
    let cfg = mailcanary::config::parse_str(&text, "skip.toml").unwrap();
    let d = daemon(&cfg, dir.path()).await;
    let s = until(d.addr, Duration::from_secs(15), "skips counted", |s| {
        v(s, SKIPPED, &[("reason", "max_in_flight")]) >= 2.0
    })
    .await;
    assert_eq!(v(&s, "mailcanary_canaries_sent_total", &[]), 2.0);
    assert_eq!(v(&s, SKIPPED, &[("reason", "ledger")]), 0.0);
    d.stop().await;
    sb.shutdown().await;
}

/// `mailcanary once --format nagios` against every sandbox fault: it ends as soon as the
/// canary's fate is known (not at the end-to-end deadline or the timeout), exits 2 (CRITICAL),
/// and its one line names the stage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_ends_at_the_first_failure_under_each_sandbox_fault() {
    use mailcanary::sandbox::{Fault, Stage};
    let cases: [(Stage, Fault, &str); 8] = [
        (Stage::Inbound, Fault::Error, "submit failed: tempfail"),
        (Stage::Inbound, Fault::Drop, "import overdue"),
        (Stage::Import, Fault::Stall, "import overdue"),
        (Stage::Import, Fault::Error, "import overdue"),
        (Stage::Api, Fault::Error, "import overdue"),
        (Stage::Outbound, Fault::Stall, "delivery overdue"),
        (Stage::Outbound, Fault::Drop, "delivery overdue"),
        (Stage::Mailbox, Fault::Error, "delivery overdue"),
    ];
    let mut sandboxes = Vec::new();
    for (stage, fault, _) in &cases {
        let sb = sandbox().await;
        sb.faults().set(*stage, *fault);
        sandboxes.push(sb);
    }
    // All at once: each run ends at its first failure, a few seconds in.
    let outs = futures::future::join_all(
        sandboxes
            .iter()
            .map(|sb| run_once(sb, &["--format", "nagios"])),
    )
    .await;
    let runs = cases
        .iter()
        .zip(outs)
        .map(|((stage, fault, want), (took, out))| (format!("{stage}={fault}"), *want, took, out));
    for (fault, want, took, out) in runs {
        let stdout = String::from_utf8_lossy(&out.stdout);
        eprintln!("{fault}: {took:?}: {stdout}");
        assert_eq!(out.status.code(), Some(2), "{fault}: {stdout}");
        assert!(
            stdout.starts_with(&format!("MAILCANARY CRITICAL - {PROBE}: {want}")),
            "{fault}: {stdout}"
        );
        assert_eq!(stdout.lines().count(), 1, "one status line: {stdout}");
        assert!(
            stdout.contains(&format!("'{PROBE}_submit'=")),
            "perfdata: {stdout}"
        );
        // The end-to-end deadline is 30 s and the default timeout 40 s: ending well before
        // either is the point.
        assert!(took < Duration::from_secs(20), "{fault}: took {took:?}");
    }
    for sb in sandboxes {
        sb.shutdown().await;
    }
}

/// `--timeout` before any verdict: UNKNOWN (3), the monitoring-plugins answer for "could not
/// tell", in about the time asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_timeout_before_a_verdict_is_unknown() {
    let sb = sandbox().await;
    sb.faults().set(
        mailcanary::sandbox::Stage::Import,
        mailcanary::sandbox::Fault::Stall,
    );
    let (took, out) = run_once(&sb, &["--format", "nagios", "--timeout", "1s"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{stdout}");
    assert!(
        stdout.starts_with("MAILCANARY UNKNOWN - drill: no verdict yet (import, reply, delivery pending); gave up after 1s (--timeout)"),
        "{stdout}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    // A config that does not load is UNKNOWN too, on stdout where Nagios reads.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[[probe]]\nname = 1\n").unwrap();
    let out = bin()
        .args(["once", "--format", "nagios", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("MAILCANARY UNKNOWN - "));
    sb.shutdown().await;
}

/// A passing `once` leaves nothing behind: its ticket trashed, its reply deleted from the
/// mailbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_cleans_up_what_it_sent() {
    let sb = sandbox().await;
    let (_, out) = run_once(&sb, &["--format", "nagios"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.starts_with("MAILCANARY OK - drill: 5 stages on time in "),
        "{stdout}"
    );
    // The ticket: not in the open list any more.
    let open = get_json(&format!("{}/tickets?auth_token=sandbox", sb.api_url())).await;
    assert_eq!(open["tickets"].as_array().map(Vec::len), Some(0), "{open}");
    // The reply: gone from the mailbox.
    assert_eq!(inbox_count(&sb).await, 0, "the delivered reply was deleted");
    sb.shutdown().await;
}

/// The wall clock steps an hour forward, then two hours back (NTP corrections), under the real
/// binary with libfaketime: no false alarm, no negative or absurd duration, and the
/// `*_timestamp_seconds` gauges follow the wall clock, as Prometheus compares them with its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wall_clock_steps_cause_no_false_alarm() {
    const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
    assert!(
        Path::new(LIBFAKETIME).exists(),
        "{LIBFAKETIME} is installed by tests/run.sh (Debian's libfaketime)"
    );
    // Every import takes 1.2 s and a canary leaves every second: whenever the clock steps,
    // canaries are in flight, their stage begun before the step and ending after it.
    let sb = sandbox_with(|c| {
        c.import_delay = mailcanary::sandbox::DelayRange::fixed(Duration::from_millis(1200));
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("p.toml");
    std::fs::write(&cfg, config_text(&sb, &Knobs::default())).unwrap();
    let offset = dir.path().join("faketime");
    std::fs::write(&offset, "+0\n").unwrap();
    let port = free_port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let _prober = KillOnDrop(
        bin()
            .args(["run", "--config"])
            .arg(&cfg)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(["--listen", &addr.to_string()])
            .env("LD_PRELOAD", LIBFAKETIME)
            .env("FAKETIME_TIMESTAMP_FILE", &offset)
            .env("FAKETIME_NO_CACHE", "1")
            // Only the wall clock steps; the monotonic clock never does.
            .env("DONT_FAKE_MONOTONIC", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    until_up(
        addr,
        Duration::from_secs(20),
        "canaries before the steps",
        |s| v(s, COMPLETED, &[]) >= 2.0,
    )
    .await;
    let real_now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    for (step, shift_s) in [("+1h", 3600.0), ("-1h", -3600.0), ("+0", 0.0)] {
        let s = scrape(addr).await;
        assert!(
            v(&s, IN_FLIGHT, &[("stage", "import")]) >= 1.0,
            "a canary is in import when the clock steps"
        );
        std::fs::write(&offset, format!("{step}\n")).unwrap();
        let start = v(&scrape(addr).await, COMPLETED, &[]);
        let t = Instant::now();
        // Several canaries across the step, every scrape green.
        while t.elapsed() < Duration::from_secs(5) {
            let s = scrape(addr).await;
            assert_eq!(
                v(&s, SUCCESS, &[]),
                1.0,
                "a false alarm after the {step} step"
            );
            for stage in ["submit", "import", "reply", "delivery", "end_to_end"] {
                assert_eq!(
                    v(&s, FAILURES, &[("stage", stage), ("reason", "deadline")]),
                    0.0,
                    "{stage} overdue after the {step} step"
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let s = until(
            addr,
            Duration::from_secs(10),
            "canaries after the step",
            |s| v(s, COMPLETED, &[]) >= start + 2.0,
        )
        .await;
        // The newest success is stamped on the stepped wall clock.
        let stamped = v(
            &s,
            "mailcanary_stage_last_success_timestamp_seconds",
            &[("stage", "end_to_end")],
        );
        let skew = stamped - real_now();
        assert!(
            (skew - shift_s).abs() < 10.0,
            "after {step}: last success stamped {skew:.1} s from the real clock"
        );
    }
    // No duration is negative or absurd: every observation of every stage is under 30 s.
    let s = scrape(addr).await;
    for stage in ["submit", "import", "reply", "delivery", "end_to_end"] {
        let count = v(
            &s,
            "mailcanary_stage_duration_seconds_count",
            &[("stage", stage)],
        );
        let under_30s = v(
            &s,
            "mailcanary_stage_duration_seconds_bucket",
            &[("stage", stage), ("le", "30")],
        );
        assert!(count >= 6.0, "{stage}: {count}");
        assert_eq!(under_30s, count, "{stage}: a duration over 30 s");
        let sum = v(
            &s,
            "mailcanary_stage_duration_seconds_sum",
            &[("stage", stage)],
        );
        assert!(
            sum >= 0.0 && sum / count < 10.0,
            "{stage}: mean {}",
            sum / count
        );
    }
    sb.shutdown().await;
}

/// 1,000 probes, every canary in flight (import stalled) and going overdue at about the same
/// moment, while `/metrics`, `/api/v1/status` and the dashboard are fetched: each of them
/// answers throughout, and every probe turns red. A scrape used to run the engine's tick
/// itself, committing the overdue transitions to disk under the engine's lock: a median of
/// 26.7 s on a busy machine. How fast it answers is the benchmark's `/metrics` figure (release
/// build, quiet machine), not this test's: here a debug build shares two cores with the rest
/// of the suite, so the bound is a generous 30 s and the slowest answer is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_probes_in_flight_while_scraped() {
    const N: usize = 1000;
    let sb = sandbox().await;
    sb.faults().set(
        mailcanary::sandbox::Stage::Import,
        mailcanary::sandbox::Fault::Stall,
    );
    let k = Knobs {
        interval: "1h",
        import_deadline: "6s",
        poll_interval: "2s",
        ..Knobs::default()
    };
    let cfg = mailcanary::config::parse_str(&fleet_text(&sb, &k, N), "fleet.toml").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(&cfg, dir.path()).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let t0 = Instant::now();
    let (mut slowest, mut red, mut in_flight, mut sent) = (Duration::ZERO, 0usize, 0.0f64, 0.0);
    let mut path_slowest = "";
    while t0.elapsed() < Duration::from_secs(60) && red < N {
        for path in ["/metrics", "/api/v1/status", "/"] {
            let t = Instant::now();
            let r = client
                .get(format!("http://{}{path}", d.addr))
                .send()
                .await
                .unwrap_or_else(|e| panic!("{path} after {:?}: {e}", t0.elapsed()));
            assert!(r.status().is_success(), "{path}: {}", r.status());
            let body = r.text().await.unwrap();
            if t.elapsed() > slowest {
                (slowest, path_slowest) = (t.elapsed(), path);
            }
            if path == "/metrics" {
                let s = mailcanary::metrics::testing::parse_exposition(&body);
                let of = |name: &str, stage: Option<&str>| {
                    s.samples
                        .iter()
                        .filter(|x| {
                            x.name == name && stage.is_none_or(|st| x.label("stage") == Some(st))
                        })
                        .map(|x| x.value)
                        .collect::<Vec<_>>()
                };
                red = of(SUCCESS, None).iter().filter(|v| **v == 0.0).count();
                in_flight = in_flight.max(of(IN_FLIGHT, Some("end_to_end")).iter().sum());
                sent = of("mailcanary_canaries_sent_total", None).iter().sum();
            }
        }
    }
    eprintln!(
        "{N} probes: {in_flight} in flight at most, {red} red after {:?}; slowest answer {slowest:?} ({path_slowest})",
        t0.elapsed()
    );
    // Every probe sent its canary; on a loaded machine some of the 1,000 simultaneous SMTP
    // submissions time out instead of waiting in import, which fails their probe too.
    assert_eq!(sent, N as f64, "every probe sent its canary");
    assert!(in_flight >= 1.0, "{in_flight} in flight at most");
    assert_eq!(red, N, "every probe failing once its canary is overdue");
    d.stop().await;
    sb.shutdown().await;
}
