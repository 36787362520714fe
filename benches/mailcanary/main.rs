//! mailcanary's benchmark: time to detect each sandbox fault, measurement accuracy against the
//! sandbox's ground truth, and the prober's cost per canary.
//!
//! ```sh
//! cargo bench --bench mailcanary -- --quick            # about 2 min; tests/run.sh runs it
//! cargo bench --bench mailcanary -- --full             # about 14 min; the README's table
//! cargo bench --bench mailcanary -- --quick --out DIR  # results.{md,json} in DIR
//! ```
//!
//! Prints a table and writes it as Markdown and JSON (default `target/bench/`). Exits non-zero,
//! saying why, when a figure cannot be measured: a number is never made up.

mod inproc;
mod procs;
mod util;

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
    time_to_detect: inproc::TtdReport,
    false_alarms: inproc::FalseAlarms,
    accuracy: Vec<inproc::AccuracyRow>,
    cost: Vec<procs::CostRow>,
    sustained_rate: Vec<procs::RateStep>,
    metrics_response: Vec<procs::MetricsRow>,
    peer: &'static str,
}

fn main() {
    let mut mode = Mode::Quick;
    let mut out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => mode = Mode::Quick,
            "--full" => mode = Mode::Full,
            "--out" => out = PathBuf::from(args.next().unwrap_or_else(|| usage())),
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
    let results = rt.block_on(run(mode));
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
    eprintln!("usage: cargo bench --bench mailcanary -- [--quick|--full] [--out DIR]");
    std::process::exit(2)
}

async fn run(mode: Mode) -> Results {
    let started = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let t0 = Instant::now();
    let full = mode == Mode::Full;
    let machine = util::machine();
    eprintln!(
        "mailcanary bench ({}) on {} cores, {:.1} GiB, {}",
        if full { "full" } else { "quick" },
        machine.cores,
        machine.memory_gib,
        machine.cpu_model
    );
    let (trials, acc_canaries, cost_canaries) = if full { (10, 60, 1000) } else { (2, 8, 100) };
    let clean_min = if full {
        Duration::from_secs(600)
    } else {
        Duration::ZERO
    };
    let bench = procs::Bench::new();
    // The clean run goes on beside the drills, the accuracy runs and the cost runs (each on its
    // own sandbox), and at least `clean_min`.
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let clean = tokio::spawn(inproc::false_alarms(clean_min, async move {
        let _ = done_rx.await;
    }));
    eprintln!("time to detect ({trials} trials per fault)");
    let ttd = inproc::time_to_detect(trials).await;
    eprintln!("accuracy ({acc_canaries} canaries per setting)");
    let accuracy = inproc::accuracy(acc_canaries).await;
    eprintln!("cost ({cost_canaries} canaries per run, scaled to 1,000)");
    let mut cost = Vec::new();
    for probes in [1, 10, 100] {
        cost.push(procs::cost(&bench, probes, cost_canaries).await);
    }
    let _ = done_tx.send(());
    eprintln!("clean run (false alarms)");
    let false_alarms = clean
        .await
        .unwrap_or_else(|e| impossible!("clean run: {e}"));
    eprintln!(
        "  {:.0} s: {} alarms, {} failing scrapes of {}",
        false_alarms.seconds,
        false_alarms.alarms,
        false_alarms.failing_scrapes,
        false_alarms.scrapes
    );
    eprintln!("sustained rate");
    let (steps, window): (&[(usize, u64)], _) = if full {
        (
            &[(10, 1000), (10, 200), (20, 200), (40, 200), (80, 200)],
            Duration::from_secs(20),
        )
    } else {
        (&[(10, 1000), (10, 200)], Duration::from_secs(5))
    };
    let sustained_rate = procs::sustained_rate(&bench, steps, window).await;
    eprintln!("/metrics response time");
    let scrapes = if full { 100 } else { 20 };
    let mut metrics_response = Vec::new();
    for probes in [100, 1000] {
        metrics_response.push(procs::metrics_time(&bench, probes, scrapes).await);
    }
    Results {
        mode,
        machine,
        started,
        wall_seconds: t0.elapsed().as_secs_f64(),
        time_to_detect: ttd,
        false_alarms,
        accuracy,
        cost,
        sustained_rate,
        metrics_response,
        peer: "not measured: check_email_delivery vs mailcanary on real Postfix + Dovecot is not in this harness yet",
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
    let t = &r.time_to_detect;
    let _ = writeln!(
        s,
        "**Time to detect** (interval {} ms, every deadline {} ms, `/metrics` scraped every {} ms; bound = interval + deadline = {} ms)\n",
        t.interval_ms,
        t.deadline_ms,
        t.scrape_every_ms,
        t.interval_ms + t.deadline_ms
    );
    s.push_str("| fault | detected as | trials | TTD median | TTD max | TTD/bound median | TTD/bound max |\n|---|---|---:|---:|---:|---:|---:|\n");
    for row in &t.rows {
        let _ = writeln!(
            s,
            "| `{}` | {} | {} | {:.0} ms | {:.0} ms | {:.2} | {:.2} |",
            row.fault,
            row.detected_as,
            row.trials,
            row.ttd_ms.median,
            row.ttd_ms.max,
            row.ratio_median,
            row.ratio_max
        );
    }
    let f = &r.false_alarms;
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
    s.push_str("**Accuracy**: measured stage end − sandbox ground truth (`/sandbox/events`)\n\n| stage | how | injected delay | n | median | p99 | max |\n|---|---|---:|---:|---:|---:|---:|\n");
    for a in &r.accuracy {
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
    s.push_str("\n**Cost** of the prober process (`mailcanary run`, against a `mailcanary sandbox` process; per 1,000 canaries, scaled from the run)\n\n| probes | interval | canaries | rate | prober CPU s / 1,000 | prober peak RSS | sandbox CPU s / 1,000 | failures | `/metrics` median (max) under load |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for c in &r.cost {
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
    s.push_str("\n**Sustained rate** (holds = no failure or late stage, ≥ 90 % of the offered rate completed, import lag p99 ≤ 300 ms, delivery lag p99 ≤ 100 ms)\n\n| probes × interval | offered | completed | prober CPU | sandbox CPU | import lag p50 / p99 | delivery lag p50 / p99 | holds |\n|---|---:|---:|---:|---:|---:|---:|---|\n");
    for st in &r.sustained_rate {
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
    match r.sustained_rate.iter().rev().find(|x| x.holds) {
        Some(best) => {
            let _ = writeln!(
                s,
                "\nHighest tried rate at which accuracy holds: **{:.0} canaries/s**{}.",
                best.offered_per_s,
                if r.sustained_rate.iter().all(|x| x.holds) {
                    " (every step held: the ceiling is higher)"
                } else {
                    ""
                }
            );
        }
        None => s.push_str("\nAccuracy held at no tried rate.\n"),
    }
    s.push_str("\n**`/metrics` response time** (probes configured, idle after one canary each)\n\n| probes | series | bytes | in flight | median | max |\n|---:|---:|---:|---:|---:|---:|\n");
    for mr in &r.metrics_response {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.1} ms | {:.1} ms |",
            mr.probes, mr.series, mr.bytes, mr.in_flight, mr.response_ms.median, mr.response_ms.max
        );
    }
    let _ = writeln!(s, "\n**Peer** (`check_email_delivery`): {}.", r.peer);
    s
}
