//! Shared pieces: statistics, HTTP, scraping, generated probe configs, the machine.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use mailcanary::{
    canary::life::{Canary, Stage},
    metrics::testing::{Samples, parse_exposition},
};
use serde::{Deserialize, Serialize};

use crate::probe_config::{ConfigFile, Deadlines, Probe, dur, sandbox_probe, some};

pub const SUCCESS: &str = "mailcanary_probe_success";
pub const FAILURES: &str = "mailcanary_stage_failures_total";
pub const COMPLETED: &str = "mailcanary_canaries_completed_total";
pub const LATE: &str = "mailcanary_stage_late_total";
pub const OLDEST: &str = "mailcanary_stage_oldest_in_flight_seconds";
/// The deadline the newest canary of a probe got, per stage (a learned one for `"auto"`).
pub const DEADLINE: &str = "mailcanary_stage_deadline_seconds";

/// Fails the benchmark loudly: a figure that cannot be measured is never made up.
#[macro_export]
macro_rules! impossible {
    ($($t:tt)*) => {{
        eprintln!("\nbenchmark FAILED: {}", format!($($t)*));
        std::process::exit(1)
    }};
}

/// Median, p99 and max of a set of samples (nearest rank).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Summary {
    pub n: usize,
    pub median: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
    pub min: f64,
}

pub fn summary(values: &[f64]) -> Summary {
    if values.is_empty() {
        crate::impossible!("no samples to summarise");
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    Summary {
        n: v.len(),
        median: if v.len() % 2 == 1 {
            v[v.len() / 2]
        } else {
            (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
        },
        p95: rank(0.95),
        p99: rank(0.99),
        max: v[v.len() - 1],
        min: v[0],
    }
}

pub fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .pool_max_idle_per_host(0)
        .build()
        .expect("http client")
}

pub async fn get_text(c: &reqwest::Client, url: &str) -> String {
    match c.get(url).send().await {
        Ok(r) if r.status().is_success() => r.text().await.unwrap_or_else(|e| {
            crate::impossible!("reading {url}: {e}");
        }),
        Ok(r) => crate::impossible!("GET {url}: HTTP {}", r.status()),
        Err(e) => crate::impossible!("GET {url}: {e}"),
    }
}

pub async fn scrape(c: &reqwest::Client, addr: SocketAddr) -> Samples {
    parse_exposition(&get_text(c, &format!("http://{addr}/metrics")).await)
}

/// One series of `probe` (0 when absent).
pub fn val(s: &Samples, probe: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut all = vec![("probe", probe)];
    all.extend_from_slice(labels);
    s.value(name, &all).unwrap_or(0.0)
}

/// The sum of one family over every probe (and every other label).
pub fn total(s: &Samples, name: &str) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.name == name)
        .map(|x| x.value)
        .sum()
}

/// Scrapes every 100 ms until `cond` holds; fails the run after `within`.
pub async fn until(
    c: &reqwest::Client,
    addr: SocketAddr,
    within: Duration,
    what: &str,
    cond: impl Fn(&Samples) -> bool,
) -> Samples {
    let t0 = Instant::now();
    loop {
        let s = scrape(c, addr).await;
        if cond(&s) {
            return s;
        }
        if t0.elapsed() > within {
            crate::impossible!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (at most `within`) until the `"auto"` deadline of `probe`'s `stage` is learned: below
/// `auto_max`, which it is until enough canaries went through on time. Returns it, in seconds.
pub async fn until_learned(
    c: &reqwest::Client,
    addr: SocketAddr,
    probe: &str,
    stage: &str,
    auto_max: Duration,
    within: Duration,
) -> f64 {
    let learned = |s: &Samples| {
        // Absent (0) until the probe's first canary got its deadlines.
        let d = val(s, probe, DEADLINE, &[("stage", stage)]);
        (d > 0.0 && d < auto_max.as_secs_f64()).then_some(d)
    };
    let what = format!("the learned {stage} deadline of {probe} (below auto_max {auto_max:?})");
    learned(&until(c, addr, within, &what, |s| learned(s).is_some()).await).unwrap_or_default()
}

/// Where a sandbox listens.
#[derive(Clone, Debug)]
pub struct SbAddrs {
    pub smtp: SocketAddr,
    pub imap: SocketAddr,
    pub api: String,
}

/// One generated helpdesk probe.
#[derive(Clone, Debug)]
pub struct ProbeSpec {
    pub name: String,
    pub interval: Duration,
    pub jitter: Duration,
    pub deadline: Duration,
    pub end_to_end: Duration,
    pub max_in_flight: usize,
    /// The canary's sender, and so the mailbox the reply lands in.
    pub mailbox: String,
    pub helpdesk_poll: Duration,
    pub idle: bool,
    pub imap_poll: Duration,
    /// `Some((auto_min, auto_max))`: the import deadline is `"auto"` (learned) within them.
    pub auto_import: Option<(Duration, Duration)>,
}

impl ProbeSpec {
    pub fn new(name: &str, interval: Duration) -> Self {
        ProbeSpec {
            name: name.into(),
            interval,
            jitter: (interval / 10).min(Duration::from_millis(100)),
            deadline: Duration::from_secs(2),
            end_to_end: Duration::from_secs(30),
            max_in_flight: 50,
            mailbox: "canary@prober.test".into(),
            helpdesk_poll: Duration::from_millis(200),
            idle: true,
            imap_poll: Duration::from_millis(250),
            auto_import: None,
        }
    }
}

/// A whole config: `[prober]` and every probe.
pub fn config_text(sb: &SbAddrs, probes: &[ProbeSpec]) -> String {
    let mut file = ConfigFile::new("bench-secret", "prober.test");
    file.probes = probes.iter().map(|p| p.probe(sb)).collect();
    file.render()
}

impl ProbeSpec {
    /// This probe of the sandbox `sb` as a `[[probe]]` of the config builder.
    fn probe(&self, sb: &SbAddrs) -> Probe {
        let dl = Some(dur(self.deadline));
        let (import, auto_min, auto_max) = match self.auto_import {
            Some((min, max)) => (some("auto"), Some(dur(min)), Some(dur(max))),
            None => (dl.clone(), None, None),
        };
        let mut p = sandbox_probe(&self.name, sb.smtp, sb.imap, &sb.api, &self.mailbox);
        p.interval = Some(dur(self.interval));
        p.jitter = Some(dur(self.jitter));
        p.max_in_flight = Some(u32::try_from(self.max_in_flight).unwrap());
        p.deadlines = Some(Deadlines {
            submit: dl.clone(),
            import,
            reply: dl.clone(),
            delivery: dl,
            end_to_end: Some(dur(self.end_to_end)),
            auto_min,
            auto_max,
        });
        p.helpdesk_mut().poll_interval = Some(dur(self.helpdesk_poll));
        let imap = p.imap_mut();
        imap.idle = Some(self.idle);
        imap.poll_interval = Some(dur(self.imap_poll));
        p
    }
}

/// `GET /api/v1/status`, only what the benchmark reads.
#[derive(Deserialize)]
pub struct Status {
    pub probes: Vec<ProbeStatus>,
}

#[derive(Deserialize)]
pub struct ProbeStatus {
    pub recent: Vec<Canary>,
}

pub async fn status(c: &reqwest::Client, addr: SocketAddr) -> Status {
    let text = get_text(c, &format!("http://{addr}/api/v1/status")).await;
    serde_json::from_str(&text).unwrap_or_else(|e| impossible!("status JSON: {e}"))
}

/// Ground truth per sandbox message: (message_id, ticket_created_ms, delivered_ms).
pub async fn ground_truth(
    c: &reqwest::Client,
    api: &str,
) -> std::collections::HashMap<String, (Option<i64>, Option<i64>)> {
    let text = get_text(c, &format!("{api}/sandbox/events")).await;
    let v: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| impossible!("events JSON: {e}"));
    let ms = |t: &serde_json::Value| {
        t.as_str()
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
            .map(|t| t.timestamp_millis())
    };
    v["events"]
        .as_array()
        .unwrap_or_else(|| impossible!("no events array"))
        .iter()
        .filter_map(|e| {
            Some((
                e["message_id"].as_str()?.to_string(),
                (ms(&e["ticket_created_at"]), ms(&e["delivered_at"])),
            ))
        })
        .collect()
}

/// Measured stage end minus ground truth, in ms, for every on-time canary found in both:
/// (import lags, delivery lags).
pub fn lags(
    canaries: &[Canary],
    truth: &std::collections::HashMap<String, (Option<i64>, Option<i64>)>,
) -> (Vec<f64>, Vec<f64>) {
    let (mut import, mut delivery) = (Vec::new(), Vec::new());
    for c in canaries {
        let Some((created, delivered)) = truth.get(&c.message_id) else {
            continue;
        };
        let done = |s: Stage| c.record(s).and_then(|r| r.done_ms).map(|m| m as i64);
        if let (Some(m), Some(t)) = (done(Stage::Import), created) {
            import.push((m - t) as f64);
        }
        if let (Some(m), Some(t)) = (done(Stage::Delivery), delivered) {
            delivery.push((m - t) as f64);
        }
    }
    (import, delivery)
}

/// Cores and memory, from /proc.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub memory_gib: f64,
    pub cpu_model: String,
    pub kernel: String,
}

pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let mem_kb: f64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    Machine {
        cores,
        memory_gib: mem_kb / 1024.0 / 1024.0,
        cpu_model,
        kernel,
    }
}
