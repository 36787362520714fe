//! Side by side with a peer on real servers: `check_email_delivery` (Debian's
//! monitoring-plugins-contrib, the long-standing Nagios mail-loop check) and `mailcanary run`,
//! one after the other on one private Postfix + Dovecot pair (the realmail test harness), each on
//! its own mailbox, both on the same path: SMTP port 25 without TLS, then IMAPS (993).
//!
//! Per round trip: CPU of every process the tool runs (the peer forks three Perl processes and
//! is timed through `/proc/self/stat`'s children times; the prober is one long-running process,
//! its CPU delta divided by the canaries it completed), wall time, the round-trip latency the tool
//! reports and the truth: when Dovecot logged the mail as stored (`saved mail to INBOX`, µs).
//! Then a held Postfix queue (`defer_transports = lmtp`): time from the hold to the tool's first
//! report of it, both tools given the same 10 s threshold, the peer run back to back (its best
//! case; under Nagios the check interval adds to it); and the prober once more with a learned
//! delivery deadline (`"auto"`, at most that threshold), learned on the loop before the hold.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use mailcanary::canary::life::{Outcome, Stage};
use serde::Serialize;

use crate::{
    harness::{self, Servers, Setup},
    procs::{Proc, STAT_CSTIME, STAT_CUTIME, stat_seconds},
    realmail::{ImapMode, SmtpMode},
    util::*,
};

pub const PEER: &str = "/usr/lib/nagios/plugins/check_email_delivery";
/// Both tools' threshold for "the mail did not arrive": the peer's delay warning and critical
/// (`-w`/`-c`), the prober's delivery deadline.
const THRESHOLD_S: u64 = 10;
/// The peer's tightest settings (its options take whole seconds; its defaults are 5 s and 5 s).
const PEER_WAIT_S: u64 = 1;
const PEER_IMAP_INTERVAL_S: u64 = 1;
/// The floor of the prober's learned (`"auto"`) delivery deadline; its ceiling is the threshold.
const AUTO_MIN_S: u64 = 1;

#[derive(Serialize)]
pub struct PeerReport {
    pub postfix: String,
    pub dovecot: String,
    pub threshold_s: u64,
    pub rows: Vec<PeerRow>,
}

#[derive(Serialize)]
pub struct PeerRow {
    pub tool: String,
    pub settings: String,
    pub round_trips: usize,
    /// CPU (user + system) of every process of the tool over the round trips, divided by them.
    pub cpu_ms_per_round_trip: f64,
    /// The peer: one run of the check. The prober: a canary's SMTP connect to seeing it in the
    /// mailbox (it does not block: the next canary goes out on schedule meanwhile).
    pub wall_ms: Summary,
    /// The round trip as the tool reports it.
    pub reported_ms: Summary,
    /// Dovecot's store time − the send start.
    pub stored_ms: Summary,
    /// reported − stored: how much of the reported latency is the tool's own.
    pub error_ms: Summary,
    /// Postfix queue held → the tool's first report of it (not measured for every setting).
    pub held_s: Option<Summary>,
    /// With a learned delivery deadline: the one in effect at each held-queue trial.
    pub learned_deadline_s: Option<Summary>,
}

pub async fn side_by_side(round_trips: usize, held_trials: usize) -> PeerReport {
    preflight();
    let servers = tokio::task::spawn_blocking(|| Servers::start(Setup::users(&["peer", "canary"])))
        .await
        .unwrap_or_else(|e| crate::impossible!("starting Postfix and Dovecot: {e}"));
    let peer = {
        let s = servers.clone();
        tokio::task::spawn_blocking(move || run_peer(&s, round_trips, held_trials))
            .await
            .unwrap_or_else(|e| crate::impossible!("peer: {e}"))
    };
    let idle = run_mailcanary(
        &servers,
        round_trips,
        held_trials,
        Watch::Idle,
        Deadline::Fixed,
    )
    .await;
    let auto = run_mailcanary(
        &servers,
        round_trips,
        held_trials,
        Watch::Idle,
        Deadline::Auto,
    )
    .await;
    let poll = run_mailcanary(&servers, round_trips, 0, Watch::Poll, Deadline::Fixed).await;
    PeerReport {
        postfix: version("/usr/sbin/postconf", &["-h", "mail_version"]),
        dovecot: version("/usr/sbin/dovecot", &["--version"]),
        threshold_s: THRESHOLD_S,
        rows: vec![peer, idle, auto, poll],
    }
}

fn preflight() {
    let missing: Vec<&str> = [
        PEER,
        "/usr/share/perl5/Mail/IMAPClient.pm",
        "/usr/share/perl5/IO/Socket/SSL.pm",
        "/usr/sbin/postfix",
        "/usr/sbin/dovecot",
    ]
    .into_iter()
    .filter(|p| !Path::new(p).exists())
    .collect();
    if !missing.is_empty() {
        crate::impossible!(
            "the peer comparison needs {missing:?}: run tests/run.sh, or apt-get install \
             monitoring-plugins-contrib libmail-imapclient-perl libio-socket-ssl-perl postfix \
             dovecot-imapd dovecot-lmtpd"
        );
    }
}

fn version(bin: &str, args: &[&str]) -> String {
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .next()
                .unwrap_or("?")
                .to_string()
        })
        .unwrap_or_else(|_| "?".into())
}

fn ms_since_epoch(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
        * 1000.0
}

/// CPU seconds of this process's waited-for children (and theirs).
fn children_cpu_s() -> f64 {
    stat_seconds("self", [STAT_CUTIME, STAT_CSTIME])
}

fn stored_for(servers: &Servers, user: &str) -> Vec<harness::Saved> {
    let who = harness::address(user);
    servers
        .saved()
        .into_iter()
        .filter(|s| s.user == who)
        .collect()
}

fn hold(servers: &Servers) {
    servers.postconf_reload(&["defer_transports = lmtp"]);
}

fn release(servers: &Servers) {
    servers.postconf_reload(&["defer_transports ="]);
    servers.postqueue_flush();
}

// ---- the peer ----

struct PeerRun {
    ok: bool,
    output: String,
    spawned: SystemTime,
    wall: Duration,
    cpu_s: f64,
    delay_s: Option<f64>,
}

fn peer_args(servers: &Servers) -> Vec<String> {
    let user = harness::address("peer");
    [
        "-H",
        "127.0.0.1",
        "--smtp-port",
        &servers.ports.smtp.to_string(),
        "--imap-port",
        &servers.ports.imaps.to_string(),
        "--imapssl",
        "--mailto",
        &user,
        "--mailfrom",
        "nagios@prober.test",
        "--username",
        &user,
        "--password",
        &harness::password("peer"),
        "--wait",
        &PEER_WAIT_S.to_string(),
        "--imap-check-interval",
        &PEER_IMAP_INTERVAL_S.to_string(),
        "--imap-retries",
        "20",
        "-w",
        &format!("{THRESHOLD_S},15,15"),
        "-c",
        &format!("{THRESHOLD_S},30,30"),
        "-t",
        "60",
        "--hires",
    ]
    .map(String::from)
    .to_vec()
}

fn peer_once(args: &[String], ca: &Path) -> PeerRun {
    let spawned = SystemTime::now();
    let cpu0 = children_cpu_s();
    let t0 = Instant::now();
    // IO::Socket::SSL verifies the server against OpenSSL's default store, which this points
    // at the test CA (check_email_delivery has no CA option of its own).
    let out = Command::new(PEER)
        .args(args)
        .env("SSL_CERT_FILE", ca)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| crate::impossible!("running {PEER}: {e}"));
    let wall = t0.elapsed();
    let cpu_s = children_cpu_s() - cpu0;
    let output = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // "EMAIL DELIVERY OK - 1.9 seconds, 1.8 delay | delay=1.8s;10;10;0 elapsed=1.9s"
    let delay_s = output
        .split_once("delay=")
        .and_then(|(_, r)| r.split(['s', ';']).next())
        .and_then(|d| d.parse::<f64>().ok());
    PeerRun {
        ok: out.status.code() == Some(0),
        output,
        spawned,
        wall,
        cpu_s,
        delay_s,
    }
}

fn run_peer(servers: &Arc<Servers>, round_trips: usize, held_trials: usize) -> PeerRow {
    let args = peer_args(servers);
    let ca = servers.ca_file();
    // Warm-up (Perl modules into the page cache), not counted.
    let w = peer_once(&args, &ca);
    if !w.ok {
        crate::impossible!(
            "check_email_delivery failed on a healthy mail loop: {}",
            w.output
        );
    }
    let (mut cpu, mut wall, mut reported, mut stored, mut error) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..round_trips {
        let before = stored_for(servers, "peer").len();
        let r = peer_once(&args, &ca);
        if !r.ok {
            crate::impossible!("check_email_delivery round trip {i} not OK: {}", r.output);
        }
        let delay_s = r
            .delay_s
            .unwrap_or_else(|| crate::impossible!("no delay= in {:?}", r.output));
        let now = stored_for(servers, "peer");
        if now.len() != before + 1 {
            crate::impossible!(
                "round trip {i}: Dovecot stored {} mails for the peer, expected 1",
                now.len() - before
            );
        }
        // Its send start is taken as the process spawn: the truth then includes Perl's start-up,
        // which favours the peer.
        let truth = ms_since_epoch(now[before].at) - ms_since_epoch(r.spawned);
        cpu.push(r.cpu_s * 1000.0);
        wall.push(r.wall.as_secs_f64() * 1000.0);
        reported.push(delay_s * 1000.0);
        stored.push(truth);
        error.push(delay_s * 1000.0 - truth);
    }
    eprintln!(
        "  check_email_delivery: {round_trips} round trips, {:.0} ms CPU each, median {:.0} ms wall, reports {:.0} ms, stored after {:.0} ms",
        cpu.iter().sum::<f64>() / cpu.len() as f64,
        summary(&wall).median,
        summary(&reported).median,
        summary(&stored).median
    );

    let mut held = Vec::new();
    for trial in 0..held_trials {
        // Healthy first: the mail sent while held has been released and one run is OK.
        let t = Instant::now();
        while !peer_once(&args, &ca).ok {
            if t.elapsed() > Duration::from_secs(120) {
                crate::impossible!("peer held trial {trial}: never OK again after the release");
            }
        }
        hold(servers);
        let t0 = Instant::now();
        let report = loop {
            let r = peer_once(&args, &ca);
            if !r.ok {
                break r;
            }
            if t0.elapsed() > Duration::from_secs(120) {
                crate::impossible!("peer held trial {trial}: still OK 120 s after the hold");
            }
        };
        let s = t0.elapsed().as_secs_f64();
        eprintln!(
            "  check_email_delivery held queue trial {trial}: {s:.1} s: {}",
            report.output
        );
        held.push(s);
        release(servers);
    }
    PeerRow {
        tool: format!("check_email_delivery {}", version(PEER, &["--version"])),
        settings: format!(
            "one run after another; --wait {PEER_WAIT_S} --imap-check-interval {PEER_IMAP_INTERVAL_S} (whole seconds; defaults 5 and 5), -w/-c {THRESHOLD_S} s; IMAPS verified against the test CA"
        ),
        round_trips,
        cpu_ms_per_round_trip: cpu.iter().sum::<f64>() / cpu.len() as f64,
        wall_ms: summary(&wall),
        reported_ms: summary(&reported),
        stored_ms: summary(&stored),
        error_ms: summary(&error),
        held_s: Some(summary(&held)),
        learned_deadline_s: None,
    }
}

// ---- mailcanary ----

/// How the prober watches the mailbox.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Watch {
    /// IMAP IDLE (its default): Dovecot pushes new mail 0.5 s after it arrives.
    Idle,
    /// No IDLE, a UID poll every 100 ms.
    Poll,
}

/// The prober's delivery deadline.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Deadline {
    /// The threshold, as the peer's.
    Fixed,
    /// `"auto"`: learned on the loop, between `AUTO_MIN_S` and the threshold.
    Auto,
}

async fn run_mailcanary(
    servers: &Arc<Servers>,
    round_trips: usize,
    held_trials: usize,
    watch: Watch,
    deadline: Deadline,
) -> PeerRow {
    let probe = match (watch, deadline) {
        (Watch::Idle, Deadline::Fixed) => "loop-idle",
        (Watch::Idle, Deadline::Auto) => "loop-auto",
        (Watch::Poll, _) => "loop-poll",
    };
    let mut spec =
        crate::realmail::ProbeSpec::new(probe, SmtpMode::Plain25, ImapMode::Tls993, "canary");
    spec.interval = "1s";
    spec.delivery_deadline = match deadline {
        Deadline::Fixed => "10s",
        Deadline::Auto => "auto",
    };
    spec.idle = watch == Watch::Idle;
    spec.poll_interval = "100ms";
    let mut file = crate::realmail::config_file(servers, &[spec]);
    if deadline == Deadline::Auto {
        let deadlines = file.probes[0].deadlines_mut();
        deadlines.auto_min = Some(format!("{AUTO_MIN_S}s"));
        deadlines.auto_max = Some(format!("{THRESHOLD_S}s"));
    }
    let text = file.render();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("config")).unwrap();
    std::fs::write(dir.path().join("config/loop.toml"), text).unwrap();
    let log: PathBuf = dir.path().join("prober.log");
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_mailcanary"));
    let prober = Proc::spawn(
        &bin,
        &[
            "run".to_string(),
            "--config".into(),
            dir.path().join("config").display().to_string(),
            "--state-dir".into(),
            dir.path().join("state").display().to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
        ],
        &log,
    );
    let l = prober.line("mailcanary listening on http://", &log);
    let addr: std::net::SocketAddr = l["mailcanary listening on http://".len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|e| crate::impossible!("listen address in {l:?}: {e}"));
    let http = http();
    let completed = |s: &mailcanary::metrics::testing::Samples| val(s, probe, COMPLETED, &[]);

    // Warm-up: the IMAP watcher connected and one canary through.
    let s = until(
        &http,
        addr,
        Duration::from_secs(30),
        "a first canary",
        |s| completed(s) >= 1.0,
    )
    .await;
    let c0 = completed(&s);
    let cpu0 = prober.cpu_seconds();
    let since_ms = ms_since_epoch(SystemTime::now()) as u64;
    let s = until(
        &http,
        addr,
        Duration::from_secs(30 + 3 * round_trips as u64),
        "the round trips",
        |s| completed(s) >= c0 + round_trips as f64,
    )
    .await;
    let cpu_s = prober.cpu_seconds() - cpu0;
    let done = completed(&s) - c0;
    let failures = total(&s, FAILURES);
    if failures > 0.0 {
        crate::impossible!("mailcanary counted {failures} failures on a healthy mail loop");
    }
    let saved = stored_for(servers, "canary");
    let mut canaries: Vec<_> = status(&http, addr)
        .await
        .probes
        .into_iter()
        .flat_map(|p| p.recent)
        .filter(|c| c.created_ms >= since_ms && c.outcome == Some(Outcome::OnTime))
        .collect();
    canaries.sort_by_key(|c| c.created_ms);
    let (mut wall, mut stored, mut error) = (Vec::new(), Vec::new(), Vec::new());
    for c in &canaries {
        let seen = c.record(Stage::Delivery).and_then(|r| r.done_ms);
        let st = saved.iter().find(|x| x.message_id == c.message_id);
        let (Some(seen), Some(st)) = (seen, st) else {
            continue;
        };
        let at = ms_since_epoch(st.at);
        wall.push((seen - c.created_ms) as f64);
        stored.push(at - c.created_ms as f64);
        error.push(seen as f64 - at);
    }
    if wall.len() < round_trips.min(canaries.len()).max(1) {
        crate::impossible!(
            "mailcanary: {} of {} canaries matched Dovecot's log",
            wall.len(),
            canaries.len()
        );
    }
    let cpu_per = cpu_s * 1000.0 / done;
    eprintln!(
        "  mailcanary ({probe}): {done} round trips, {cpu_per:.1} ms CPU each, round trip median {:.0} ms, stored after {:.0} ms",
        summary(&wall).median,
        summary(&stored).median
    );

    if deadline == Deadline::Auto {
        let learned = until_learned(
            &http,
            addr,
            probe,
            "delivery",
            Duration::from_secs(THRESHOLD_S),
            Duration::from_secs(60),
        )
        .await;
        eprintln!("  mailcanary ({probe}): learned delivery deadline {learned:.2} s");
    }

    let (mut held, mut deadlines) = (Vec::new(), Vec::new());
    let deadline_failures = |s: &mailcanary::metrics::testing::Samples| {
        val(
            s,
            probe,
            FAILURES,
            &[("stage", "delivery"), ("reason", "deadline")],
        )
    };
    for trial in 0..held_trials {
        let s = until(
            &http,
            addr,
            Duration::from_secs(120),
            "probe success after the release",
            |s| val(s, probe, SUCCESS, &[]) == 1.0,
        )
        .await;
        let f0 = deadline_failures(&s);
        // The delivery deadline the newest canary got, and so those sent into the hold.
        let d = val(&s, probe, DEADLINE, &[("stage", "delivery")]);
        if deadline == Deadline::Auto && !(d > 0.0 && d < THRESHOLD_S as f64) {
            crate::impossible!("{probe} held trial {trial}: delivery deadline {d} s, not learned");
        }
        deadlines.push(d);
        let sv = servers.clone();
        tokio::task::spawn_blocking(move || hold(&sv))
            .await
            .unwrap();
        let t0 = Instant::now();
        until(
            &http,
            addr,
            Duration::from_secs(120),
            "the held queue reported",
            |s| val(s, probe, SUCCESS, &[]) == 0.0 && deadline_failures(s) > f0,
        )
        .await;
        let secs = t0.elapsed().as_secs_f64();
        eprintln!(
            "  mailcanary ({probe}) held queue trial {trial}: {secs:.1} s (delivery deadline {d:.2} s)"
        );
        held.push(secs);
        let sv = servers.clone();
        tokio::task::spawn_blocking(move || release(&sv))
            .await
            .unwrap();
    }
    drop(prober);
    let learned =
        (deadline == Deadline::Auto && !deadlines.is_empty()).then(|| summary(&deadlines));
    PeerRow {
        tool: format!("mailcanary {}", env!("CARGO_PKG_VERSION")),
        settings: format!(
            "`mailcanary run`, interval 1 s, {}, delivery deadline {}; IMAPS verified against the test CA",
            match watch {
                Watch::Idle => "IMAP IDLE (its default)",
                Watch::Poll => "IMAP polled every 100 ms",
            },
            match (deadline, learned) {
                (Deadline::Fixed, _) => format!("{THRESHOLD_S} s"),
                (Deadline::Auto, l) => format!(
                    "`auto` (auto_min {AUTO_MIN_S} s, auto_max {THRESHOLD_S} s){}",
                    match l {
                        Some(l) if l.min == l.max => format!(": learned {:.2} s", l.median),
                        Some(l) => format!(": learned {:.2}–{:.2} s", l.min, l.max),
                        None => String::new(),
                    }
                ),
            }
        ),
        round_trips: done as usize,
        cpu_ms_per_round_trip: cpu_per,
        wall_ms: summary(&wall),
        reported_ms: summary(&wall),
        stored_ms: summary(&stored),
        error_ms: summary(&error),
        held_s: (!held.is_empty()).then(|| summary(&held)),
        learned_deadline_s: learned,
    }
}
