//! Cost: the real binary as separate processes (`mailcanary sandbox`, `mailcanary run`), CPU
//! and peak RSS read from /proc, the sustained rate, `/metrics` response time.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::util::*;

/// A child process this benchmark started; killed (by its own PID) on drop.
pub struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    pub fn spawn(bin: &Path, args: &[String], log: &Path) -> Proc {
        Proc::spawn_wrapped(&[], bin, args, log)
    }

    /// [`Proc::spawn`] under `wrapper` (a command and its arguments that end where `bin`'s
    /// command line begins, such as strace's). `pid` and the CPU figures are then the
    /// wrapper's; drop kills its descendants first.
    pub fn spawn_wrapped(wrapper: &[String], bin: &Path, args: &[String], log: &Path) -> Proc {
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let mut child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::File::create(log).unwrap_or_else(|e| crate::impossible!("log: {e}")),
            ))
            .spawn()
            .unwrap_or_else(|e| {
                crate::impossible!("spawning {} {}: {e}", wrapper.join(" "), bin.display())
            });
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        Proc { child, lines }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next stdout line that starts with `prefix`.
    pub fn line(&self, prefix: &str, log: &Path) -> String {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(30) {
            match self.lines.recv_timeout(Duration::from_millis(200)) {
                Ok(l) if l.starts_with(prefix) => return l,
                Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let tail = std::fs::read_to_string(log).unwrap_or_default();
        crate::impossible!("no `{prefix}` line on stdout; its log:\n{tail}")
    }

    /// CPU seconds (user + system) so far.
    pub fn cpu_seconds(&self) -> f64 {
        stat_seconds(&self.pid().to_string(), [STAT_UTIME, STAT_STIME])
    }

    /// Peak resident set (VmHWM), MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or_else(|| crate::impossible!("no VmHWM for {}", self.pid()))
    }
}

/// Every descendant of `pid` (children first found through `/proc/PID/task/*/children`).
fn descendants(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for c in children
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok())
            {
                out.push(c);
                todo.push(c);
            }
        }
    }
    out
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A tracee outlives a killed strace (it is detached, not killed): kill it first.
        for pid in descendants(self.child.id()) {
            if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Fields of `/proc/PID/stat`, counted after the `(comm)` field's closing parenthesis.
pub const STAT_UTIME: usize = 11;
pub const STAT_STIME: usize = 12;
/// CPU of waited-for children (and theirs).
pub const STAT_CUTIME: usize = 13;
pub const STAT_CSTIME: usize = 14;

/// The sum of two clock-tick fields of `/proc/{pid}/stat` (`pid` may be `self`), in seconds.
pub fn stat_seconds(pid: &str, fields: [usize; 2]) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| crate::impossible!("/proc/{pid}/stat: {e}"));
    let rest = &stat[stat.rfind(')').map(|i| i + 2).unwrap_or(0)..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    fields.iter().map(|&i| ticks(i)).sum::<f64>() / clk_tck()
}

fn clk_tck() -> f64 {
    static T: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *T.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

pub struct Bench {
    pub bin: std::path::PathBuf,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
}

/// A sandbox process and a prober process with `probes`.
pub struct Run {
    pub sandbox: Proc,
    pub prober: Proc,
    pub addr: SocketAddr,
    pub api: String,
}

impl Bench {
    pub fn new() -> Bench {
        let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_mailcanary"));
        if !bin.exists() {
            crate::impossible!("the binary {} was not built", bin.display());
        }
        Bench {
            bin,
            dir: tempfile::tempdir().unwrap(),
            http: http(),
        }
    }

    pub fn start(&self, tag: &str, probes: &[ProbeSpec], delay: Duration) -> Run {
        self.start_with(tag, probes, delay, &Launch::default())
    }

    /// [`Bench::start`] with the prober launched as `launch` says (another binary, a slow
    /// disk); the sandbox is always this build's.
    pub fn start_with(
        &self,
        tag: &str,
        probes: &[ProbeSpec],
        delay: Duration,
        launch: &Launch,
    ) -> Run {
        let dir = self.dir.path().join(tag);
        std::fs::create_dir_all(dir.join("config")).unwrap();
        let d = humantime::format_duration(delay).to_string();
        let sb_log = dir.join("sandbox.log");
        let sandbox = Proc::spawn(
            &self.bin,
            &[
                "sandbox",
                "--smtp-listen",
                "127.0.0.1:0",
                "--imap-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
                "--import-delay",
                &d,
                "--outbound-delay",
                &d,
                "--event-capacity",
                "100000",
            ]
            .map(String::from),
            &sb_log,
        );
        let addr_of = |l: String| -> String { l.split_whitespace().nth(1).unwrap().to_string() };
        let smtp: SocketAddr = addr_of(sandbox.line("smtp ", &sb_log)).parse().unwrap();
        let imap: SocketAddr = addr_of(sandbox.line("imap ", &sb_log)).parse().unwrap();
        let api = addr_of(sandbox.line("api ", &sb_log));
        let sb = SbAddrs { smtp, imap, api };
        std::fs::write(dir.join("config/bench.toml"), config_text(&sb, probes)).unwrap();
        let log = dir.join("prober.log");
        let prober = Proc::spawn_wrapped(
            &launch.wrapper(),
            launch.bin.as_deref().unwrap_or(&self.bin),
            &[
                "run".to_string(),
                "--config".into(),
                dir.join("config").display().to_string(),
                "--state-dir".into(),
                dir.join("state").display().to_string(),
                "--listen".into(),
                "127.0.0.1:0".into(),
            ],
            &log,
        );
        let l = prober.line("mailcanary listening on http://", &log);
        let addr: SocketAddr = l["mailcanary listening on http://".len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap_or_else(|e| crate::impossible!("listen address in {l:?}: {e}"));
        Run {
            sandbox,
            prober,
            addr,
            api: sb.api,
        }
    }

    /// [`Bench::start`] with 100 ms sandbox delays, then waits until `warm` canaries have
    /// completed: the watchers connected and canaries flowing.
    pub async fn start_warm(&self, tag: &str, probes: &[ProbeSpec], warm: f64) -> Run {
        let run = self.start(tag, probes, Duration::from_millis(100));
        until(
            &self.http,
            run.addr,
            Duration::from_secs(60),
            "warm-up canaries",
            |s| total(s, COMPLETED) >= warm,
        )
        .await;
        run
    }
}

/// How the prober process of a run is started.
#[derive(Clone, Debug, Default)]
pub struct Launch {
    /// Another `mailcanary` binary (default: this build's).
    pub bin: Option<std::path::PathBuf>,
    /// Every `fdatasync` and `fsync` of the prober delayed by this long, under strace
    /// (`Some(ZERO)`: under strace, undelayed, so its overhead is in every row alike).
    pub fsync_delay: Option<Duration>,
}

impl Launch {
    fn wrapper(&self) -> Vec<String> {
        let Some(delay) = self.fsync_delay else {
            return Vec::new();
        };
        let mut w: Vec<String> = ["strace", "-f", "--seccomp-bpf", "-qq", "-o", "/dev/null"]
            .map(String::from)
            .to_vec();
        w.extend(["-e".into(), "trace=fdatasync,fsync".into()]);
        if !delay.is_zero() {
            let us = delay.as_micros();
            for call in ["fdatasync", "fsync"] {
                w.extend(["-e".into(), format!("inject={call}:delay_enter={us}")]);
            }
        }
        w.push("--".into());
        w
    }
}

/// Probes `p000`…, each with its own sender and so its own mailbox (one IMAP watcher each).
fn fleet(n: usize, interval: Duration, own_mailbox: bool) -> Vec<ProbeSpec> {
    (0..n)
        .map(|i| {
            let name = format!("p{i:04}");
            let mut p = ProbeSpec::new(&name, interval);
            p.deadline = Duration::from_secs(5);
            p.jitter = (interval / 2).min(Duration::from_secs(5));
            if own_mailbox {
                p.mailbox = format!("canary-{name}@prober.test");
            }
            p
        })
        .collect()
}

#[derive(Serialize)]
pub struct CostRow {
    pub probes: usize,
    pub interval_ms: u64,
    pub canaries: f64,
    pub seconds: f64,
    pub rate_per_s: f64,
    pub prober_cpu_s_per_1000: f64,
    pub prober_peak_rss_mib: f64,
    pub sandbox_cpu_s_per_1000: f64,
    pub failures: f64,
    pub metrics_ms: Summary,
}

/// Sum over every probe of one stage's series of `name`.
fn stage_total(s: &mailcanary::metrics::testing::Samples, name: &str, stage: &str) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.name == name && x.label("stage") == Some(stage))
        .map(|x| x.value)
        .sum()
}

/// Totals over every probe of an exposition.
fn totals(s: &mailcanary::metrics::testing::Samples) -> (f64, f64, f64) {
    (total(s, COMPLETED), total(s, FAILURES), total(s, LATE))
}

async fn timed_scrape(b: &Bench, addr: SocketAddr) -> (f64, mailcanary::metrics::testing::Samples) {
    let t = Instant::now();
    let s = scrape(&b.http, addr).await;
    (t.elapsed().as_secs_f64() * 1000.0, s)
}

/// CPU and peak RSS per 1,000 canaries with `probes` probes sending 20 canaries/s in all
/// (10/s for one probe: the shortest interval is 100 ms).
pub async fn cost(b: &Bench, probes: usize, canaries: usize) -> CostRow {
    let interval = match probes {
        1 => Duration::from_millis(100),
        n => Duration::from_millis(50 * n as u64),
    };
    let run = b
        .start_warm(
            &format!("cost-{probes}"),
            &fleet(probes, interval, true),
            (probes as f64).min(20.0),
        )
        .await;
    let (_, s0) = timed_scrape(b, run.addr).await;
    let (c0, f0, _) = totals(&s0);
    let (p0, q0, t0) = (
        run.prober.cpu_seconds(),
        run.sandbox.cpu_seconds(),
        Instant::now(),
    );
    let mut scrape_ms = Vec::new();
    let limit = Duration::from_secs(30) + interval.mul_f64(canaries as f64 / probes as f64) * 3;
    let s1 = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (ms, s) = timed_scrape(b, run.addr).await;
        scrape_ms.push(ms);
        if total(&s, COMPLETED) - c0 >= canaries as f64 {
            break s;
        }
        if t0.elapsed() > limit {
            crate::impossible!(
                "cost with {probes} probes: {} of {canaries} canaries in {limit:?}",
                total(&s, COMPLETED) - c0
            );
        }
    };
    let (p1, q1, secs) = (
        run.prober.cpu_seconds(),
        run.sandbox.cpu_seconds(),
        t0.elapsed().as_secs_f64(),
    );
    let (c1, f1, _) = totals(&s1);
    let done = c1 - c0;
    let row = CostRow {
        probes,
        interval_ms: interval.as_millis() as u64,
        canaries: done,
        seconds: secs,
        rate_per_s: done / secs,
        prober_cpu_s_per_1000: (p1 - p0) / done * 1000.0,
        prober_peak_rss_mib: run.prober.peak_rss_mib(),
        sandbox_cpu_s_per_1000: (q1 - q0) / done * 1000.0,
        failures: f1 - f0,
        metrics_ms: summary(&scrape_ms),
    };
    eprintln!(
        "  cost {probes} probes: {done} canaries in {secs:.1} s, prober {:.2} CPU s / 1000, peak RSS {:.1} MiB",
        row.prober_cpu_s_per_1000, row.prober_peak_rss_mib
    );
    row
}

#[derive(Serialize)]
pub struct RateStep {
    pub probes: usize,
    pub interval_ms: u64,
    pub offered_per_s: f64,
    pub completed_per_s: f64,
    pub prober_cpu_percent: f64,
    pub sandbox_cpu_percent: f64,
    pub failures: f64,
    pub late: f64,
    pub import_lag_ms: Summary,
    pub delivery_lag_ms: Summary,
    pub holds: bool,
    pub why: String,
}

/// Raises the canary rate until accuracy no longer holds (or the steps run out).
/// Holds = no failure and no late stage, ≥ 90 % of the offered rate completed, import lag
/// p99 ≤ API poll (200 ms) + 100 ms, delivery lag p99 (IDLE) ≤ 100 ms.
pub async fn sustained_rate(b: &Bench, steps: &[(usize, u64)], window: Duration) -> Vec<RateStep> {
    let mut out = Vec::new();
    for &(probes, interval_ms) in steps {
        let interval = Duration::from_millis(interval_ms);
        let mut specs = fleet(probes, interval, true);
        for p in &mut specs {
            p.deadline = Duration::from_secs(2);
            p.max_in_flight = 50;
        }
        let run = b
            .start_warm(
                &format!("rate-{probes}-{interval_ms}"),
                &specs,
                probes as f64,
            )
            .await;
        let s0 = scrape(&b.http, run.addr).await;
        let (c0, f0, l0) = totals(&s0);
        let (p0, q0, t0) = (
            run.prober.cpu_seconds(),
            run.sandbox.cpu_seconds(),
            Instant::now(),
        );
        tokio::time::sleep(window).await;
        let s1 = scrape(&b.http, run.addr).await;
        let (p1, q1, secs) = (
            run.prober.cpu_seconds(),
            run.sandbox.cpu_seconds(),
            t0.elapsed().as_secs_f64(),
        );
        let (c1, f1, l1) = totals(&s1);
        let st = status(&b.http, run.addr).await;
        let truth = ground_truth(&b.http, &run.api).await;
        let t0_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
            - (secs * 1000.0) as u64;
        let recent: Vec<_> = st
            .probes
            .into_iter()
            .flat_map(|p| p.recent)
            .filter(|c| c.created_ms >= t0_ms)
            .collect();
        let (imp, del) = lags(&recent, &truth);
        if imp.is_empty() || del.is_empty() {
            crate::impossible!(
                "rate step {probes}×{interval_ms} ms: no canary matched ground truth"
            );
        }
        let offered = probes as f64 * 1000.0 / interval_ms as f64;
        let done = (c1 - c0) / secs;
        let (si, sd) = (summary(&imp), summary(&del));
        let mut why = Vec::new();
        if f1 - f0 > 0.0 {
            why.push(format!("{} stage failures", f1 - f0));
        }
        if l1 - l0 > 0.0 {
            why.push(format!("{} late stages", l1 - l0));
        }
        if done < 0.9 * offered {
            why.push(format!("completed {done:.1}/s of {offered:.1}/s"));
        }
        if si.p99 > 300.0 {
            why.push(format!("import p99 {:.0} ms", si.p99));
        }
        if sd.p99 > 100.0 {
            why.push(format!("delivery p99 {:.0} ms", sd.p99));
        }
        let step = RateStep {
            probes,
            interval_ms,
            offered_per_s: offered,
            completed_per_s: done,
            prober_cpu_percent: (p1 - p0) / secs * 100.0,
            sandbox_cpu_percent: (q1 - q0) / secs * 100.0,
            failures: f1 - f0,
            late: l1 - l0,
            import_lag_ms: si,
            delivery_lag_ms: sd,
            holds: why.is_empty(),
            why: why.join(", "),
        };
        eprintln!(
            "  rate {offered:.0}/s offered: {done:.1}/s done, prober CPU {:.0} %, sandbox CPU {:.0} %, import p99 {:.0} ms, delivery p99 {:.0} ms, {}",
            step.prober_cpu_percent,
            step.sandbox_cpu_percent,
            si.p99,
            sd.p99,
            if step.holds {
                "holds".to_string()
            } else {
                format!("does not hold: {}", step.why)
            }
        );
        let holds = step.holds;
        out.push(step);
        drop(run);
        if !holds {
            break;
        }
    }
    out
}

#[derive(Serialize)]
pub struct MetricsRow {
    pub probes: usize,
    /// `idle` (one canary each, finished) or `stalled` (import stalled: every probe's canary
    /// in flight, going overdue while the scrapes run).
    pub state: &'static str,
    /// Deadline failures counted while the scrapes ran (the engine's overdue work).
    pub overdue_during: f64,
    pub series: usize,
    pub bytes: usize,
    pub in_flight: f64,
    pub response_ms: Summary,
    /// The prober's peak resident set (VmHWM) at the end, MiB.
    pub peak_rss_mib: f64,
    /// The prober's CPU (user + system) from start to the end of the scrapes, per canary
    /// completed or in flight, ms (start-up, one canary per probe and the scrapes themselves).
    pub cpu_ms_per_canary: f64,
}

async fn get_bytes(c: &reqwest::Client, url: &str) -> bytes::Bytes {
    match c.get(url).send().await {
        Ok(r) if r.status().is_success() => r.bytes().await.unwrap_or_else(|e| {
            crate::impossible!("reading {url}: {e}");
        }),
        Ok(r) => crate::impossible!("GET {url}: HTTP {}", r.status()),
        Err(e) => crate::impossible!("GET {url}: {e}"),
    }
}

/// `/metrics` response time with `probes` configured (one shared mailbox, interval 1 h: each
/// probe sends one canary at start, then nothing). `stalled`: the sandbox's import is stalled
/// first, so every canary stays in flight, polled for, and goes overdue during the scrapes.
pub async fn metrics_time(b: &Bench, probes: usize, scrapes: usize, stalled: bool) -> MetricsRow {
    let mut specs = fleet(probes, Duration::from_secs(3600), false);
    for p in &mut specs {
        p.jitter = Duration::from_secs(5);
        if stalled {
            // Overdue 8 to 13 s after start: in the middle of the scrapes below.
            p.deadline = Duration::from_secs(8);
            p.helpdesk_poll = Duration::from_secs(1);
        }
    }
    let tag = if stalled { "stalled" } else { "idle" };
    let run = b.start(
        &format!("metrics-{probes}-{tag}"),
        &specs,
        Duration::from_millis(100),
    );
    let t0 = Instant::now();
    if stalled {
        let put = b
            .http
            .put(format!("{}/sandbox/faults", run.api))
            .json(&serde_json::json!({"import": "stall"}))
            .send()
            .await;
        if !put.is_ok_and(|r| r.status().is_success()) {
            crate::impossible!("cannot stall the sandbox's import");
        }
        // Every probe's canary sent and waiting for its ticket.
        loop {
            let s = scrape(&b.http, run.addr).await;
            if stage_total(&s, "mailcanary_stage_in_flight", "import") >= probes as f64
                || t0.elapsed() > Duration::from_secs(60)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    } else {
        // Let the start-up canaries finish (or give up waiting after 90 s: time it anyway).
        loop {
            let s = scrape(&b.http, run.addr).await;
            if total(&s, COMPLETED) >= probes as f64 || t0.elapsed() > Duration::from_secs(90) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // Idle means nothing changes any more: the replies' clean-up (tickets trashed, mail
        // deleted) goes on for a while after the last completion. Two answers alike a second
        // apart (or 60 s gone: time it anyway).
        let url = format!("http://{}/metrics", run.addr);
        let mut last = get_bytes(&b.http, &url).await;
        let t_idle = Instant::now();
        while t_idle.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = get_bytes(&b.http, &url).await;
            if now == last {
                break;
            }
            last = now;
        }
    }
    let overdue_before = stage_total(&scrape(&b.http, run.addr).await, FAILURES, "import");
    let mut ms = Vec::new();
    let (mut series, mut bytes, mut in_flight) = (0, 0, 0.0);
    for _ in 0..scrapes {
        // The time to the last byte, as a scraper's HTTP client reads it; decoding and
        // parsing the text are the scraper's work, after the clock.
        let t = Instant::now();
        let body = get_bytes(&b.http, &format!("http://{}/metrics", run.addr)).await;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
        bytes = body.len();
        let text = String::from_utf8_lossy(&body);
        let s = mailcanary::metrics::testing::parse_exposition(&text);
        series = s.samples.len();
        in_flight = s
            .samples
            .iter()
            .filter(|x| {
                x.name == "mailcanary_stage_in_flight" && x.label("stage") == Some("end_to_end")
            })
            .map(|x| x.value)
            .sum();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let end = scrape(&b.http, run.addr).await;
    let overdue_during = stage_total(&end, FAILURES, "import") - overdue_before;
    let canaries = total(&end, "mailcanary_canaries_sent_total").max(1.0);
    let r = MetricsRow {
        peak_rss_mib: run.prober.peak_rss_mib(),
        cpu_ms_per_canary: run.prober.cpu_seconds() * 1000.0 / canaries,
        probes,
        state: tag,
        overdue_during,
        series,
        bytes,
        in_flight,
        response_ms: summary(&ms),
    };
    eprintln!(
        "  /metrics with {probes} probes ({tag}): median {:.1} ms, p95 {:.1} ms, max {:.1} ms ({} series, {} bytes, {} in flight, {} went overdue meanwhile; peak RSS {:.1} MiB, CPU {:.1} ms per canary)",
        r.response_ms.median,
        r.response_ms.p95,
        r.response_ms.max,
        series,
        bytes,
        in_flight,
        overdue_during,
        r.peak_rss_mib,
        r.cpu_ms_per_canary
    );
    r
}

#[derive(Serialize)]
pub struct SlowDiskRow {
    /// `this code`, or the build before the ledger writer thread.
    pub build: String,
    pub fsync_delay_ms: u64,
    pub offered_per_s: f64,
    pub sent_per_s: f64,
    pub completed_per_s: f64,
    pub failures: f64,
    pub late: f64,
    /// The prober's canaries in flight at the end of the window (a backlog that grows means
    /// the disk, not the mail flow, is the bottleneck).
    pub in_flight_end: f64,
}

impl SlowDiskRow {
    fn unscrapable(build: &str, delay_ms: u64, probes: usize, interval_ms: u64) -> SlowDiskRow {
        SlowDiskRow {
            build: build.to_string(),
            fsync_delay_ms: delay_ms,
            offered_per_s: probes as f64 * 1000.0 / interval_ms as f64,
            sent_per_s: f64::NAN,
            completed_per_s: f64::NAN,
            failures: f64::NAN,
            late: f64::NAN,
            in_flight_end: f64::NAN,
        }
    }

    /// The row of the README's table (and the progress line); NaN where `/metrics` did not
    /// answer within 20 s.
    pub fn markdown(&self) -> String {
        if self.sent_per_s.is_nan() {
            return format!(
                "| {} | {} ms | {:.0}/s | `/metrics` did not answer within 20 s | | | | |",
                self.build, self.fsync_delay_ms, self.offered_per_s
            );
        }
        format!(
            "| {} | {} ms | {:.0}/s | {:.1}/s | {:.1}/s | {} | {} | {} |",
            self.build,
            self.fsync_delay_ms,
            self.offered_per_s,
            self.sent_per_s,
            self.completed_per_s,
            self.failures,
            self.late,
            self.in_flight_end
        )
    }
}

async fn try_scrape(
    c: &reqwest::Client,
    addr: SocketAddr,
) -> Option<mailcanary::metrics::testing::Samples> {
    let r = c.get(format!("http://{addr}/metrics")).send().await.ok()?;
    let text = r.error_for_status().ok()?.text().await.ok()?;
    Some(mailcanary::metrics::testing::parse_exposition(&text))
}

/// The sustained rate with a slow disk: `probes` probes every `interval_ms` (each its own
/// mailbox), the prober under strace with every `fdatasync`/`fsync` delayed by each of
/// `delays_ms`, for `builds` (a label and the prober binary: `None` is this build). The first
/// canaries are given up to 60 s to come through (none may: the row then shows it).
pub async fn slow_disk(
    b: &Bench,
    builds: &[(String, Option<std::path::PathBuf>)],
    delays_ms: &[u64],
    probes: usize,
    interval_ms: u64,
    window: Duration,
) -> Vec<SlowDiskRow> {
    let mut out = Vec::new();
    for (label, bin) in builds {
        for &delay_ms in delays_ms {
            let mut specs = fleet(probes, Duration::from_millis(interval_ms), true);
            for p in &mut specs {
                p.deadline = Duration::from_secs(2);
                p.max_in_flight = 50;
            }
            let launch = Launch {
                bin: bin.clone(),
                fsync_delay: Some(Duration::from_millis(delay_ms)),
            };
            let tag = format!(
                "slowdisk-{}-{delay_ms}",
                if bin.is_some() { "before" } else { "this" }
            );
            let run = b.start_with(&tag, &specs, Duration::from_millis(100), &launch);
            let t_warm = Instant::now();
            while t_warm.elapsed() < Duration::from_secs(60)
                && try_scrape(&b.http, run.addr)
                    .await
                    .is_none_or(|s| total(&s, COMPLETED) < probes as f64)
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            // A build whose scrape waits on the disk may not answer within the client's 20 s:
            // that is its row (a scraper sees the prober down), not a failed benchmark.
            let Some(s0) = try_scrape(&b.http, run.addr).await else {
                let row = SlowDiskRow::unscrapable(label, delay_ms, probes, interval_ms);
                eprintln!("  {}", row.markdown());
                out.push(row);
                continue;
            };
            let (c0, f0, l0) = totals(&s0);
            let sent0 = total(&s0, "mailcanary_canaries_sent_total");
            let t0 = Instant::now();
            tokio::time::sleep(window).await;
            let Some(s1) = try_scrape(&b.http, run.addr).await else {
                let row = SlowDiskRow::unscrapable(label, delay_ms, probes, interval_ms);
                eprintln!("  {}", row.markdown());
                out.push(row);
                continue;
            };
            let secs = t0.elapsed().as_secs_f64();
            let (c1, f1, l1) = totals(&s1);
            let sent1 = total(&s1, "mailcanary_canaries_sent_total");
            let row = SlowDiskRow {
                build: label.clone(),
                fsync_delay_ms: delay_ms,
                offered_per_s: probes as f64 * 1000.0 / interval_ms as f64,
                sent_per_s: (sent1 - sent0) / secs,
                completed_per_s: (c1 - c0) / secs,
                failures: f1 - f0,
                late: l1 - l0,
                in_flight_end: stage_total(&s1, "mailcanary_stage_in_flight", "end_to_end"),
            };
            eprintln!("  {}", row.markdown());
            out.push(row);
            drop(run);
        }
    }
    out
}
