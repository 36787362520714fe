//! Time to detect, false alarms and accuracy: the sandbox and the prober in this process, as
//! the tests drive them (`tests/prober/common.rs`).

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use mailcanary::{
    canary::life::Canary,
    config,
    daemon::{Daemon, Options},
    sandbox::{DelayRange, Fault, Sandbox, SandboxConfig, Stage},
};
use serde::Serialize;

use crate::util::*;

const PROBE: &str = "bench";

pub struct Pair {
    pub sb: Sandbox,
    pub d: Daemon,
    pub http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Pair {
    pub async fn start(sbc: SandboxConfig, spec: ProbeSpec) -> Pair {
        let sb = Sandbox::start(sbc)
            .await
            .unwrap_or_else(|e| crate::impossible!("sandbox: {e}"));
        let addrs = SbAddrs {
            smtp: sb.smtp_addr,
            imap: sb.imap_addr,
            api: sb.api_url(),
        };
        let text = config_text(&addrs, &[spec]);
        let cfg = config::parse_str(&text, "bench.toml")
            .unwrap_or_else(|e| crate::impossible!("bench config: {e}"));
        let dir = tempfile::tempdir().unwrap();
        let d = Daemon::start(
            &cfg,
            Options {
                state_dir: dir.path().to_path_buf(),
                listen: ([127, 0, 0, 1], 0).into(),
                schedule: true,
            },
        )
        .await
        .unwrap_or_else(|e| crate::impossible!("daemon: {e:#}"));
        Pair {
            sb,
            d,
            http: http(),
            _dir: dir,
        }
    }

    pub async fn stop(self) {
        self.d.stop().await;
        self.sb.shutdown().await;
    }
}

fn sandbox_config(import: Duration, outbound: Duration) -> SandboxConfig {
    let mut c = SandboxConfig::ephemeral();
    c.import_delay = DelayRange::fixed(import);
    c.outbound_delay = DelayRange::fixed(outbound);
    c
}

/// One fault drill: the fault, and what "detected" means for it.
struct Drill {
    stage: Stage,
    fault: Fault,
    /// The prober stage that must show it.
    blame: &'static str,
    /// The reason its failure counter is expected under.
    reason: &'static str,
}

const DRILLS: [Drill; 6] = [
    Drill {
        stage: Stage::Import,
        fault: Fault::Stall,
        blame: "import",
        reason: "deadline",
    },
    Drill {
        stage: Stage::Import,
        fault: Fault::Error,
        blame: "import",
        reason: "deadline",
    },
    Drill {
        stage: Stage::Outbound,
        fault: Fault::Stall,
        blame: "delivery",
        reason: "deadline",
    },
    Drill {
        stage: Stage::Inbound,
        fault: Fault::Error,
        blame: "submit",
        reason: "tempfail",
    },
    Drill {
        stage: Stage::Api,
        fault: Fault::Error,
        blame: "import",
        reason: "api",
    },
    Drill {
        stage: Stage::Mailbox,
        fault: Fault::Error,
        blame: "delivery",
        reason: "auth",
    },
];

#[derive(Serialize)]
pub struct TtdRow {
    pub fault: String,
    pub detected_as: String,
    /// The blamed stage's deadline: fixed, or `"auto"` and what was learned.
    pub deadline: String,
    pub trials: usize,
    pub ttd_ms: Summary,
    /// The blamed stage's deadline in effect at each trial (`mailcanary_stage_deadline_seconds`).
    pub deadline_ms: Summary,
    /// TTD / (interval + the blamed stage's deadline), per trial.
    pub ratio_median: f64,
    pub ratio_max: f64,
    /// interval + the deadline, at the median deadline.
    pub bound_ms: f64,
}

#[derive(Serialize)]
pub struct TtdReport {
    pub interval_ms: u64,
    pub deadline_ms: u64,
    pub scrape_every_ms: u64,
    pub rows: Vec<TtdRow>,
}

/// Bounds of the learned import deadline in the `deadline = "auto"` row: `auto_min` well under
/// the fixed 2 s, so what the sandbox's fast import teaches shows.
const AUTO_MIN: Duration = Duration::from_secs(1);
const AUTO_MAX: Duration = Duration::from_secs(30);

/// Time to detect each fault, `trials` times, on one sandbox and one prober (reset between);
/// then the import stall again, as often, on a second pair whose import deadline is `"auto"`,
/// once it is learned.
pub async fn time_to_detect(trials: usize) -> TtdReport {
    let interval = Duration::from_secs(1);
    let deadline = Duration::from_secs(2);
    let mut spec = ProbeSpec::new(PROBE, interval);
    spec.deadline = deadline;
    let sandbox = || sandbox_config(Duration::from_millis(100), Duration::from_millis(50));
    let p = Pair::start(sandbox(), spec.clone()).await;
    // Started now, on its own sandbox, so it learns while the fixed drills run.
    spec.auto_import = Some((AUTO_MIN, AUTO_MAX));
    let auto = Pair::start(sandbox(), spec).await;
    let mut rows = Vec::new();
    for drill in &DRILLS {
        rows.push(drill_trials(&p, drill, interval, trials).await);
    }
    p.stop().await;

    let learned = until_learned(
        &auto.http,
        auto.d.addr,
        PROBE,
        "import",
        AUTO_MAX,
        Duration::from_secs(60),
    )
    .await;
    eprintln!("  learned import deadline: {:.0} ms", learned * 1000.0);
    // The import stall again, measured the same way, now against the learned deadline.
    let mut row = drill_trials(&auto, &DRILLS[0], interval, trials).await;
    let floor = row.deadline_ms.max <= AUTO_MIN.as_secs_f64() * 1000.0;
    row.deadline = format!(
        "`auto` (auto_min {} s, auto_max {} s): learned {}{}",
        AUTO_MIN.as_secs(),
        AUTO_MAX.as_secs(),
        row.deadline,
        if floor {
            " = auto_min (3 × p99 was not above it)"
        } else {
            ""
        }
    );
    rows.push(row);
    auto.stop().await;
    TtdReport {
        interval_ms: interval.as_millis() as u64,
        deadline_ms: deadline.as_millis() as u64,
        scrape_every_ms: 100,
        rows,
    }
}

/// `trials` of one drill on `p`: the fault set at a random phase against the send schedule,
/// detected when `probe_success` is 0 and the blamed stage shows it (a new failure of the
/// expected reason, or a canary in it past its deadline), then cleared and recovered from.
async fn drill_trials(p: &Pair, drill: &Drill, interval: Duration, trials: usize) -> TtdRow {
    until(
        &p.http,
        p.d.addr,
        Duration::from_secs(30),
        "a first on-time canary",
        |s| val(s, PROBE, COMPLETED, &[]) >= 1.0 && val(s, PROBE, SUCCESS, &[]) == 1.0,
    )
    .await;
    let fault = format!("{}={}", drill.stage, drill.fault);
    let blamed = [("stage", drill.blame), ("reason", drill.reason)];
    let (mut ttd, mut deadlines, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for trial in 0..trials {
        // A random phase against the send schedule, so trials do not all land alike.
        let phase = (trial as u64 * 379) % 1000;
        tokio::time::sleep(Duration::from_millis(phase)).await;
        let base = scrape(&p.http, p.d.addr).await;
        let base_fail = val(&base, PROBE, FAILURES, &blamed);
        // The deadline the newest canary got: the one the fault runs into.
        let deadline = val(&base, PROBE, DEADLINE, &[("stage", drill.blame)]);
        if deadline <= 0.0 {
            crate::impossible!("no {DEADLINE} for {} before {fault}", drill.blame);
        }
        p.sb.faults().set(drill.stage, drill.fault);
        let t0 = Instant::now();
        loop {
            let s = scrape(&p.http, p.d.addr).await;
            let failed = val(&s, PROBE, FAILURES, &blamed) > base_fail;
            let overdue = val(&s, PROBE, OLDEST, &[("stage", drill.blame)]) > deadline;
            if val(&s, PROBE, SUCCESS, &[]) == 0.0 && (failed || overdue) {
                let ms = t0.elapsed().as_secs_f64() * 1000.0;
                ttd.push(ms);
                deadlines.push(deadline * 1000.0);
                ratios.push(ms / (interval.as_secs_f64() + deadline) / 1000.0);
                break;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                crate::impossible!(
                    "{fault} not detected as {}/{} within 30 s (trial {trial})",
                    drill.blame,
                    drill.reason
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        p.sb.faults().set(drill.stage, Fault::Ok);
        until(
            &p.http,
            p.d.addr,
            Duration::from_secs(60),
            "recovery (probe_success 1)",
            |s| val(s, PROBE, SUCCESS, &[]) == 1.0,
        )
        .await;
    }
    let (sum, dl, ratio) = (summary(&ttd), summary(&deadlines), summary(&ratios));
    eprintln!(
        "  ttd {fault} (deadline {:.0} ms): median {:.0} ms, max {:.0} ms",
        dl.median, sum.median, sum.max
    );
    TtdRow {
        fault,
        detected_as: format!("{}/{}", drill.blame, drill.reason),
        deadline: if dl.min == dl.max {
            format!("{:.0} ms", dl.median)
        } else {
            format!("{:.0}–{:.0} ms", dl.min, dl.max)
        },
        trials,
        ttd_ms: sum,
        deadline_ms: dl,
        ratio_median: ratio.median,
        ratio_max: ratio.max,
        bound_ms: interval.as_secs_f64() * 1000.0 + dl.median,
    }
}

#[derive(Serialize)]
pub struct FalseAlarms {
    pub seconds: f64,
    pub scrapes: u64,
    pub canaries_completed: f64,
    /// Scrapes where probe_success was 0.
    pub failing_scrapes: u64,
    /// 1 → 0 transitions of probe_success.
    pub alarms: u64,
    pub stage_failures: f64,
    pub late: f64,
}

/// A clean run (no fault) of at least `min`, and on until `done` resolves: every scrape
/// (100 ms) where probe_success is 0 is a false alarm.
pub async fn false_alarms(
    min: Duration,
    done: impl std::future::Future<Output = ()>,
) -> FalseAlarms {
    let interval = Duration::from_secs(1);
    let p = Pair::start(
        sandbox_config(Duration::from_millis(100), Duration::from_millis(50)),
        ProbeSpec::new(PROBE, interval),
    )
    .await;
    until(
        &p.http,
        p.d.addr,
        Duration::from_secs(30),
        "a first on-time canary",
        |s| val(s, PROBE, COMPLETED, &[]) >= 1.0,
    )
    .await;
    let first = scrape(&p.http, p.d.addr).await;
    let t0 = Instant::now();
    let (mut scrapes, mut failing, mut alarms, mut prev) = (0u64, 0u64, 0u64, 1.0);
    let mut done = std::pin::pin!(done);
    let mut finished = false;
    let last = loop {
        let s = scrape(&p.http, p.d.addr).await;
        scrapes += 1;
        let ok = val(&s, PROBE, SUCCESS, &[]);
        if ok == 0.0 {
            failing += 1;
            if prev == 1.0 {
                alarms += 1;
            }
        }
        prev = ok;
        if finished && t0.elapsed() >= min {
            break s;
        }
        tokio::select! {
            _ = &mut done, if !finished => finished = true,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    };
    let sum_stages = |s: &mailcanary::metrics::testing::Samples, name: &str| {
        ["submit", "import", "reply", "delivery", "end_to_end"]
            .iter()
            .map(|st| {
                s.samples
                    .iter()
                    .filter(|x| x.name == name && x.label("stage") == Some(st))
                    .map(|x| x.value)
                    .sum::<f64>()
            })
            .sum::<f64>()
    };
    let r = FalseAlarms {
        seconds: t0.elapsed().as_secs_f64(),
        scrapes,
        canaries_completed: val(&last, PROBE, COMPLETED, &[]) - val(&first, PROBE, COMPLETED, &[]),
        failing_scrapes: failing,
        alarms,
        stage_failures: sum_stages(&last, FAILURES) - sum_stages(&first, FAILURES),
        late: sum_stages(&last, LATE) - sum_stages(&first, LATE),
    };
    p.stop().await;
    r
}

#[derive(Serialize)]
pub struct AccuracyRow {
    pub stage: String,
    pub mode: String,
    pub injected_delay_ms: u64,
    pub lag_ms: Summary,
}

/// Measured stage end minus the sandbox's ground truth, at several injected delays, for import
/// (helpdesk API polling) and delivery (IMAP IDLE, and IMAP polling).
pub async fn accuracy(canaries: usize) -> Vec<AccuracyRow> {
    let mut rows = Vec::new();
    let helpdesk_poll = Duration::from_millis(200);
    let imap_poll = Duration::from_millis(250);
    for idle in [true, false] {
        for delay_ms in [100u64, 1000] {
            let delay = Duration::from_millis(delay_ms);
            let mut spec = ProbeSpec::new(PROBE, Duration::from_millis(300));
            spec.deadline = Duration::from_secs(5);
            spec.idle = idle;
            spec.helpdesk_poll = helpdesk_poll;
            spec.imap_poll = imap_poll;
            let p = Pair::start(sandbox_config(delay, delay), spec).await;
            // Collect finished canaries by id (status keeps the newest 50 per probe).
            let mut seen: HashMap<String, Canary> = HashMap::new();
            let t0 = Instant::now();
            while seen.len() < canaries {
                if t0.elapsed() > Duration::from_secs(30 + canaries as u64) {
                    crate::impossible!(
                        "accuracy (delay {delay_ms} ms, idle {idle}): only {} canaries finished",
                        seen.len()
                    );
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                for c in status(&p.http, p.d.addr).await.probes.remove(0).recent {
                    if c.outcome == Some(mailcanary::canary::life::Outcome::OnTime) {
                        seen.insert(c.id.clone(), c);
                    }
                }
            }
            let truth = ground_truth(&p.http, &p.sb.api_url()).await;
            let all: Vec<Canary> = seen.into_values().collect();
            let (import, delivery) = lags(&all, &truth);
            if import.len() < canaries || delivery.len() < canaries {
                crate::impossible!(
                    "accuracy: matched {} import / {} delivery of {canaries} canaries to ground truth",
                    import.len(),
                    delivery.len()
                );
            }
            let mode = if idle {
                "IMAP IDLE".to_string()
            } else {
                format!("IMAP poll {} ms", imap_poll.as_millis())
            };
            if idle {
                // Import is measured the same way in both runs: report it once per delay.
                rows.push(AccuracyRow {
                    stage: "import".into(),
                    mode: format!("API poll {} ms", helpdesk_poll.as_millis()),
                    injected_delay_ms: delay_ms,
                    lag_ms: summary(&import),
                });
            }
            let d = summary(&delivery);
            eprintln!(
                "  accuracy delay {delay_ms} ms, {mode}: import median {:.0} ms, delivery median {:.0} p99 {:.0} ms",
                summary(&import).median,
                d.median,
                d.p99
            );
            rows.push(AccuracyRow {
                stage: "delivery".into(),
                mode,
                injected_delay_ms: delay_ms,
                lag_ms: d,
            });
            if let Some(neg) = import.iter().chain(&delivery).find(|l| **l < 0.0) {
                crate::impossible!("a stage measured as ending {neg} ms before it happened");
            }
            p.stop().await;
        }
    }
    rows.sort_by(|a, b| {
        (a.stage.as_str(), a.injected_delay_ms, a.mode.as_str()).cmp(&(
            b.stage.as_str(),
            b.injected_delay_ms,
            b.mode.as_str(),
        ))
    });
    rows
}
