//! mailcanary's benchmark: time to detect each sandbox fault, measurement accuracy against the
//! sandbox's ground truth, and the prober's cost per canary.
//!
//! ```sh
//! cargo bench --bench mailcanary -- --quick            # about 3 min; tests/run.sh runs it
//! cargo bench --bench mailcanary -- --full             # about 14 min; the README's table
//! cargo bench --bench mailcanary -- --quick --out DIR  # results.{md,json} in DIR
//! cargo bench --bench mailcanary -- --quick --only peer,cost  # some sections only
//! ```
//!
//! Prints a table and writes it as Markdown and JSON (default `target/bench/`). Exits non-zero,
//! saying why, when a figure cannot be measured: a number is never made up.
//!
//! Sections: `detect` (time to detect each fault, and the clean run's false alarms beside it),
//! `accuracy`, `cost`, `rate` (highest sustained rate), `metrics` (`/metrics` response time),
//! `peer` (`check_email_delivery` and mailcanary on real Postfix + Dovecot; needs root),
//! `slowdisk` (the sustained rate with every fsync of the prober delayed under strace; set
//! `MAILCANARY_BENCH_BEFORE_BIN` to a binary of another build to compare it, such as one from
//! before the ledger writer thread: `git worktree add /tmp/before bf3ab77` and build it there).

mod inproc;
mod peer;
mod procs;
mod util;

// The real-server test harness, shared with `tests/realmail` (the bench uses part of it).
#[allow(dead_code)]
#[path = "../../tests/realmail/harness.rs"]
mod harness;
#[allow(dead_code)]
#[path = "../../tests/realmail/common.rs"]
mod realmail;
// The one generator of probe configs, shared with `tests/prober` and `tests/realmail`.
#[path = "../../tests/support/probe_config.rs"]
mod probe_config;

use std::{
    fmt::Write as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use serde::Serialize;

#[derive(Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    Quick,
    Full,
}

#[derive(Serialize)]
struct Results {
    mode: Mode,
    machine: util::Machine,
    started: String,
    wall_seconds: f64,
    sections: Vec<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    time_to_detect: Option<inproc::TtdReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    false_alarms: Option<inproc::FalseAlarms>,
    #[serde(skip_serializing_if = "Option::is_none")]
    accuracy: Option<Vec<inproc::AccuracyRow>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cost: Option<Vec<procs::CostRow>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sustained_rate: Option<Vec<procs::RateStep>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics_response: Option<Vec<procs::MetricsRow>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    peer: Option<peer::PeerReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    slow_disk: Option<Vec<procs::SlowDiskRow>>,
}

const SECTIONS: [&str; 7] = [
    "detect", "accuracy", "cost", "rate", "metrics", "peer", "slowdisk",
];

fn main() {
    let mut mode = Mode::Quick;
    let mut out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let mut sections: Vec<&'static str> = SECTIONS.to_vec();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => mode = Mode::Quick,
            "--full" => mode = Mode::Full,
            "--out" => out = PathBuf::from(args.next().unwrap_or_else(|| usage())),
            "--only" => {
                let list = args.next().unwrap_or_else(|| usage());
                sections = list
                    .split(',')
                    .map(|x| {
                        SECTIONS
                            .into_iter()
                            .find(|s| *s == x.trim())
                            .unwrap_or_else(|| usage())
                    })
                    .collect();
            }
            // cargo bench passes --bench to every bench target.
            "--bench" => {}
            _ => usage(),
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let results = rt.block_on(run(mode, sections));
    let md = markdown(&results);
    println!("\n{md}");
    std::fs::create_dir_all(&out)
        .unwrap_or_else(|e| impossible!("creating {}: {e}", out.display()));
    std::fs::write(out.join("results.md"), &md).unwrap();
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&results).unwrap(),
    )
    .unwrap();
    println!(
        "wrote {} and {}",
        out.join("results.md").display(),
        out.join("results.json").display()
    );
}

fn usage() -> ! {
    eprintln!(
        "usage: cargo bench --bench mailcanary -- [--quick|--full] [--out DIR] [--only {}]",
        SECTIONS.join(",")
    );
    std::process::exit(2)
}

async fn run(mode: Mode, sections: Vec<&'static str>) -> Results {
    let started = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let t0 = Instant::now();
    let full = mode == Mode::Full;
    let on = |s: &str| sections.contains(&s);
    let machine = util::machine();
    eprintln!(
        "mailcanary bench ({}) on {} cores, {:.1} GiB, {}; sections {}",
        if full { "full" } else { "quick" },
        machine.cores,
        machine.memory_gib,
        machine.cpu_model,
        sections.join(",")
    );
    let (trials, acc_canaries, cost_canaries) = if full { (10, 60, 600) } else { (2, 8, 100) };
    let (peer_round_trips, peer_held_trials) = if full { (15, 3) } else { (3, 1) };
    let clean_min = if full {
        Duration::from_secs(600)
    } else {
        Duration::ZERO
    };
    let bench = procs::Bench::new();
    // The clean run goes on beside the drills, the accuracy runs, the cost runs (each on its own
    // sandbox), the peer comparison and the `/metrics` timing, and lasts at least `clean_min`.
    // Only the sustained rate, which saturates the machine on purpose, runs alone after it.
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let clean = on("detect").then(|| {
        tokio::spawn(inproc::false_alarms(clean_min, async move {
            let _ = done_rx.await;
        }))
    });
    let time_to_detect = if on("detect") {
        eprintln!("time to detect ({trials} trials per fault)");
        Some(inproc::time_to_detect(trials).await)
    } else {
        None
    };
    let accuracy = if on("accuracy") {
        eprintln!("accuracy ({acc_canaries} canaries per setting)");
        Some(inproc::accuracy(acc_canaries).await)
    } else {
        None
    };
    let cost = if on("cost") {
        eprintln!("cost ({cost_canaries} canaries per run, scaled to 1,000)");
        let mut cost = Vec::new();
        for probes in [1, 10, 100] {
            cost.push(procs::cost(&bench, probes, cost_canaries).await);
        }
        Some(cost)
    } else {
        None
    };
    // After the cost runs: the peer's CPU is read from this process's children times, which a
    // cost run's processes would add to when they exit.
    let peer = if on("peer") {
        eprintln!(
            "side by side with check_email_delivery on Postfix + Dovecot ({peer_round_trips} round trips, {peer_held_trials} held-queue trials each)"
        );
        Some(peer::side_by_side(peer_round_trips, peer_held_trials).await)
    } else {
        None
    };
    let metrics_response = if on("metrics") {
        eprintln!("/metrics response time");
        let scrapes = if full { 100 } else { 20 };
        let mut rows = Vec::new();
        for (probes, stalled) in [(100, false), (1000, false), (1000, true)] {
            rows.push(procs::metrics_time(&bench, probes, scrapes, stalled).await);
        }
        Some(rows)
    } else {
        None
    };
    let _ = done_tx.send(());
    let false_alarms = match clean {
        Some(clean) => {
            eprintln!("clean run (false alarms)");
            let f = clean
                .await
                .unwrap_or_else(|e| impossible!("clean run: {e}"));
            eprintln!(
                "  {:.0} s: {} alarms, {} failing scrapes of {}",
                f.seconds, f.alarms, f.failing_scrapes, f.scrapes
            );
            Some(f)
        }
        None => None,
    };
    let sustained_rate = if on("rate") {
        eprintln!("sustained rate");
        let (steps, window): (&[(usize, u64)], _) = if full {
            // 10/s is in the cost table already; the steps start at 50/s so the full run (its
            // 10-minute clean run, then this) stays inside 15 minutes with a cold build.
            (
                &[(10, 200), (20, 200), (40, 200), (80, 200)],
                Duration::from_secs(10),
            )
        } else {
            (&[(10, 1000), (10, 200)], Duration::from_secs(5))
        };
        Some(procs::sustained_rate(&bench, steps, window).await)
    } else {
        None
    };
    let slow_disk = if on("slowdisk") {
        eprintln!("sustained rate with a slow disk (strace delays every fsync)");
        let mut builds = vec![("this code".to_string(), None)];
        if let Some(before) = std::env::var_os("MAILCANARY_BENCH_BEFORE_BIN") {
            let label = std::env::var("MAILCANARY_BENCH_BEFORE_LABEL")
                .unwrap_or_else(|_| "before".to_string());
            builds.push((label, Some(PathBuf::from(before))));
        }
        let (delays, window): (&[u64], _) = if full {
            (&[0, 20, 100, 500], Duration::from_secs(20))
        } else {
            (&[0, 100], Duration::from_secs(5))
        };
        Some(procs::slow_disk(&bench, &builds, delays, 10, 200, window).await)
    } else {
        None
    };
    Results {
        mode,
        machine,
        started,
        wall_seconds: t0.elapsed().as_secs_f64(),
        sections,
        time_to_detect,
        false_alarms,
        accuracy,
        cost,
        sustained_rate,
        metrics_response,
        peer,
        slow_disk,
    }
}

fn markdown(r: &Results) -> String {
    let mut s = String::new();
    let m = &r.machine;
    let _ = writeln!(
        s,
        "mailcanary bench, {} mode, {} ({:.0} s wall). Machine: {} cores, {:.1} GiB RAM ({}; Linux {}), shared and noisy: one run, medians and max.\n",
        if r.mode == Mode::Full {
            "full"
        } else {
            "quick"
        },
        r.started,
        r.wall_seconds,
        m.cores,
        m.memory_gib,
        m.cpu_model,
        m.kernel
    );
    if let Some(t) = &r.time_to_detect {
        let _ = writeln!(
            s,
            "**Time to detect** (interval {} ms, every deadline {} ms but where the row says otherwise, `/metrics` scraped every {} ms; bound = interval + the row's deadline, {} ms for the fixed ones)\n",
            t.interval_ms,
            t.deadline_ms,
            t.scrape_every_ms,
            t.interval_ms + t.deadline_ms
        );
        s.push_str("| fault | detected as | deadline | trials | TTD median | TTD min–max | TTD/bound median | TTD/bound max |\n|---|---|---|---:|---:|---:|---:|---:|\n");
        for row in &t.rows {
            let _ = writeln!(
                s,
                "| `{}` | {} | {} | {} | {:.0} ms | {:.0}–{:.0} ms | {:.2} | {:.2} |",
                row.fault,
                row.detected_as,
                row.deadline,
                row.trials,
                row.ttd_ms.median,
                row.ttd_ms.min,
                row.ttd_ms.max,
                row.ratio_median,
                row.ratio_max
            );
        }
    }
    if let Some(f) = &r.false_alarms {
        let _ = writeln!(
            s,
            "\n**False alarms** over a clean run of {:.0} s ({} canaries, {} scrapes): **{}** (`probe_success` 1 → 0), {} failing scrapes, {} stage failures, {} late stages.\n",
            f.seconds,
            f.canaries_completed,
            f.scrapes,
            f.alarms,
            f.failing_scrapes,
            f.stage_failures,
            f.late
        );
    }
    if let Some(accuracy) = &r.accuracy {
        s.push_str("**Accuracy**: measured stage end − sandbox ground truth (`/sandbox/events`)\n\n| stage | how | injected delay | n | median | p99 | max |\n|---|---|---:|---:|---:|---:|---:|\n");
        for a in accuracy {
            let _ = writeln!(
                s,
                "| {} | {} | {} ms | {} | {:.0} ms | {:.0} ms | {:.0} ms |",
                a.stage,
                a.mode,
                a.injected_delay_ms,
                a.lag_ms.n,
                a.lag_ms.median,
                a.lag_ms.p99,
                a.lag_ms.max
            );
        }
        s.push('\n');
    }
    if let Some(cost) = &r.cost {
        s.push_str("**Cost** of the prober process (`mailcanary run`, against a `mailcanary sandbox` process; per 1,000 canaries, scaled from the run)\n\n| probes | interval | canaries | rate | prober CPU s / 1,000 | prober peak RSS | sandbox CPU s / 1,000 | failures | `/metrics` median (max) under load |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for c in cost {
            let _ = writeln!(
                s,
                "| {} | {} ms | {} | {:.1}/s | {:.2} | {:.1} MiB | {:.2} | {} | {:.1} ms ({:.1} ms) |",
                c.probes,
                c.interval_ms,
                c.canaries,
                c.rate_per_s,
                c.prober_cpu_s_per_1000,
                c.prober_peak_rss_mib,
                c.sandbox_cpu_s_per_1000,
                c.failures,
                c.metrics_ms.median,
                c.metrics_ms.max
            );
        }
        s.push('\n');
    }
    if let Some(rate) = &r.sustained_rate {
        s.push_str("**Sustained rate** (holds = no failure or late stage, ≥ 90 % of the offered rate completed, import lag p99 ≤ 300 ms, delivery lag p99 ≤ 100 ms)\n\n| probes × interval | offered | completed | prober CPU | sandbox CPU | import lag p50 / p99 | delivery lag p50 / p99 | holds |\n|---|---:|---:|---:|---:|---:|---:|---|\n");
        for st in rate {
            let _ = writeln!(
                s,
                "| {} × {} ms | {:.0}/s | {:.1}/s | {:.0} % | {:.0} % | {:.0} / {:.0} ms | {:.0} / {:.0} ms | {} |",
                st.probes,
                st.interval_ms,
                st.offered_per_s,
                st.completed_per_s,
                st.prober_cpu_percent,
                st.sandbox_cpu_percent,
                st.import_lag_ms.median,
                st.import_lag_ms.p99,
                st.delivery_lag_ms.median,
                st.delivery_lag_ms.p99,
                if st.holds {
                    "yes".to_string()
                } else {
                    format!("no: {}", st.why)
                }
            );
        }
        match rate.iter().rev().find(|x| x.holds) {
            Some(best) => {
                let _ = writeln!(
                    s,
                    "\nHighest tried rate at which accuracy holds: **{:.0} canaries/s**{}.",
                    best.offered_per_s,
                    if rate.iter().all(|x| x.holds) {
                        " (every step held: the ceiling is higher)"
                    } else {
                        ""
                    }
                );
            }
            None => s.push_str("\nAccuracy held at no tried rate.\n"),
        }
        s.push('\n');
    }
    if let Some(rows) = &r.slow_disk {
        s.push_str("\n**Sustained rate with a slow disk** (every `fdatasync`/`fsync` of the prober delayed under strace; 10 probes every 200 ms, each its own mailbox, 2 s deadlines)\n\n| build | fsync delay | offered | sent | completed | failures | late | in flight at the end |\n|---|---:|---:|---:|---:|---:|---:|---:|\n");
        for row in rows {
            let _ = writeln!(s, "{}", row.markdown());
        }
    }
    if let Some(metrics) = &r.metrics_response {
        s.push_str("**`/metrics` response time**, to the last byte (idle: one canary each, finished, and the exposition no longer changing; stalled: import stalled, every canary in flight and going overdue while scraped; prober peak RSS, and its CPU from start to the last scrape per canary sent)\n\n| probes | state | series | bytes | in flight | overdue meanwhile | median | p95 | max | peak RSS | CPU per canary |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for mr in metrics {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} MiB | {:.1} ms |",
                mr.probes,
                mr.state,
                mr.series,
                mr.bytes,
                mr.in_flight,
                mr.overdue_during,
                mr.response_ms.median,
                mr.response_ms.p95,
                mr.response_ms.max,
                mr.peak_rss_mib,
                mr.cpu_ms_per_canary
            );
        }
        s.push('\n');
    }
    if let Some(p) = &r.peer {
        let _ = writeln!(
            s,
            "**Side by side with a peer** on one real mail loop (Postfix {}, Dovecot {}; SMTP port 25 without TLS, then IMAPS), one tool after the other, each on its own mailbox. Truth = when Dovecot logged the mail stored. Held queue = Postfix `defer_transports = lmtp`, both tools given a {} s threshold (the learned mailcanary deadline at most that).\n",
            p.postfix, p.dovecot, p.threshold_s
        );
        s.push_str("| tool | round trips | CPU per round trip | wall per round trip median (max) | reported round trip median | stored after median | reported − stored median (max) | held queue reported after median (min–max) | settings |\n|---|---:|---:|---:|---:|---:|---:|---:|---|\n");
        for row in &p.rows {
            let _ = writeln!(
                s,
                "| {} | {} | {:.1} ms | {:.0} ms ({:.0} ms) | {:.0} ms | {:.0} ms | {:.0} ms ({:.0} ms) | {} | {} |",
                row.tool,
                row.round_trips,
                row.cpu_ms_per_round_trip,
                row.wall_ms.median,
                row.wall_ms.max,
                row.reported_ms.median,
                row.stored_ms.median,
                row.error_ms.median,
                row.error_ms.max,
                row.held_s.map_or("not measured".to_string(), |h| format!(
                    "{:.1} s ({:.1}–{:.1} s), {} trials",
                    h.median, h.min, h.max, h.n
                )),
                row.settings
            );
        }
    }
    s
}
