//! The end-to-end proof: a real Prometheus (Debian's package) scrapes a live prober that
//! probes the in-process sandbox, with the shipped alert rules loaded. The sandbox's import
//! stalls (the seed outage); Prometheus must fire `MailcanaryStageStalled{stage="import"}`;
//! the stall clears; the alert must resolve.

use std::{
    fs,
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use mailcanary::sandbox::{Fault, Stage};
use serde_json::Value;

use crate::common::*;
use crate::{deploy_file, require_tool};

const STALLED: &str = "MailcanaryStageStalled";
const WATCHDOG: &str = "MailcanaryWatchdog";

/// The shipped rules with every `for:` shortened from minutes to as many seconds (hours to
/// minutes), so the test runs in seconds rather than minutes. Only `for:` lines change: every
/// expression, threshold and range stays byte for byte what ships.
fn rules_with_short_for(rules: &str) -> String {
    let mut changed = 0;
    let out: Vec<String> = rules
        .lines()
        .map(|line| {
            let trimmed = line.trim_start();
            let Some(value) = trimmed.strip_prefix("for:") else {
                return line.to_string();
            };
            let indent = &line[..line.len() - trimmed.len()];
            let value = value.trim();
            let short = if let Some(n) = value.strip_suffix('m') {
                format!("{n}s")
            } else if let Some(n) = value.strip_suffix('h') {
                format!("{n}m")
            } else {
                value.to_string()
            };
            changed += 1;
            format!("{indent}for: {short}")
        })
        .collect();
    assert!(changed >= 6, "only {changed} `for:` lines found");
    out.join("\n") + "\n"
}

#[test]
fn for_durations_are_shortened_and_nothing_else_changes() {
    let rules = fs::read_to_string(deploy_file("alerts.yml")).unwrap();
    let short = rules_with_short_for(&rules);
    let (a, b): (Vec<_>, Vec<_>) = (rules.lines().collect(), short.lines().collect());
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        if x != y {
            assert!(x.trim_start().starts_with("for: "), "{x:?} changed");
            assert!(y.trim_end().ends_with('s') || y.trim_end().ends_with('m'));
        }
    }
    assert!(short.contains("for: 1s") && short.contains("for: 5s"));
}

/// A Prometheus server on a free loopback port, killed (and its temp dir removed) on drop.
/// A watchdog shell also kills it within a second should this test process die without
/// dropping it (nextest's timeout, a signal): no Prometheus outlives the test.
struct Prometheus {
    child: Child,
    watchdog: Option<Child>,
    url: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(w) = &mut self.watchdog {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

impl Prometheus {
    /// Scrapes `target` every second as job `mailcanary`, evaluating `rules` every second.
    async fn start(target: SocketAddr, rules: &str) -> Prometheus {
        Self::start_with(target, rules, "", |_| {}).await
    }

    /// As [`Prometheus::start`], with `job_extra` (indented YAML) added to the scrape job and
    /// `prepare` given the config directory first (for the files `job_extra` names).
    async fn start_with(
        target: SocketAddr,
        rules: &str,
        job_extra: &str,
        prepare: impl FnOnce(&std::path::Path),
    ) -> Prometheus {
        require_tool("prometheus");
        let dir = tempfile::tempdir().unwrap();
        prepare(dir.path());
        fs::write(dir.path().join("alerts.yml"), rules).unwrap();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - alerts.yml\n\
             scrape_configs:\n  - job_name: mailcanary\n{job_extra}    static_configs:\n      \
             - targets: ['{target}']\n"
        );
        let config_path = dir.path().join("prometheus.yml");
        fs::write(&config_path, config).unwrap();
        let log = dir.path().join("prometheus.log");
        // A free port: bind port 0, read it, release it. Another process could take it in
        // between; Prometheus then exits at once and the readiness wait below says so.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log_file = fs::File::create(&log).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("starting prometheus");
        let watchdog = Command::new("sh")
            .args([
                "-c",
                "while kill -0 \"$1\" 2>/dev/null; do sleep 1; done; kill \"$2\" 2>/dev/null",
                "prometheus-watchdog",
                &std::process::id().to_string(),
                &child.id().to_string(),
            ])
            // Not the test's pipes: the watchdog may outlive the test by a second.
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok();
        let mut p = Prometheus {
            child,
            watchdog,
            url: format!("http://127.0.0.1:{port}"),
            log,
            _dir: dir,
        };
        let t0 = Instant::now();
        loop {
            if let Some(status) = p.child.try_wait().unwrap() {
                panic!("prometheus exited ({status}):\n{}", p.log_tail());
            }
            if let Ok(r) = http().get(format!("{}/-/ready", p.url)).send().await
                && r.status().is_success()
            {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "prometheus not ready after 30 s:\n{}",
                p.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!("prometheus ready at {} after {:?}", p.url, t0.elapsed());
        p
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    async fn get(&self, path_and_query: &str) -> Value {
        let url = format!("{}{path_and_query}", self.url);
        let body: Value = http()
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"))
            .json()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: not JSON: {e}"));
        assert_eq!(body["status"], "success", "GET {url}: {body}");
        body["data"].clone()
    }

    /// The active (pending or firing) alerts.
    async fn alerts(&self) -> Vec<Value> {
        self.get("/api/v1/alerts").await["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// An instant query's samples as (labels, value).
    async fn query(&self, promql: &str) -> Vec<(Value, f64)> {
        let data = self
            .get(&format!("/api/v1/query?query={}", url_encode(promql)))
            .await;
        data["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|r| {
                let v = r["value"][1].as_str().unwrap_or("NaN").parse().unwrap();
                (r["metric"].clone(), v)
            })
            .collect()
    }
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn describe(alerts: &[Value]) -> String {
    alerts
        .iter()
        .map(|a| {
            format!(
                "{} {} {}",
                a["labels"]["alertname"].as_str().unwrap_or("?"),
                a["state"].as_str().unwrap_or("?"),
                a["labels"]
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Polls `cond` over the active alerts every 250 ms; the alerts that satisfied it, or a
/// panic after `within` showing the alerts and Prometheus's log.
async fn until_alerts(
    p: &Prometheus,
    within: Duration,
    what: &str,
    cond: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let t0 = Instant::now();
    loop {
        let alerts = p.alerts().await;
        if cond(&alerts) {
            return alerts;
        }
        assert!(
            t0.elapsed() < within,
            "timed out after {within:?} waiting for {what}; active alerts:\n{}\nprometheus log:\n{}",
            describe(&alerts),
            p.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_fires_and_resolves_the_import_stall_alert() {
    let sb = sandbox().await;
    let knobs = Knobs {
        import_deadline: "3s",
        ..Knobs::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(&config(&sb, &knobs), dir.path()).await;
    until(d.addr, Duration::from_secs(20), "a first canary", |s| {
        v(s, "mailcanary_canaries_completed_total", &[]) >= 1.0
    })
    .await;

    let rules = rules_with_short_for(&fs::read_to_string(deploy_file("alerts.yml")).unwrap());
    let p = Prometheus::start(d.addr, &rules).await;

    // Healthy: Prometheus has scraped the prober (the first scrape takes a few seconds even
    // at a 1 s interval) and sees the probe succeeding.
    let t0 = Instant::now();
    loop {
        let up = p.query(r#"up{job="mailcanary"}"#).await;
        let ok = p.query(r#"mailcanary_probe_success{probe="drill"}"#).await;
        if up.first().is_some_and(|(_, v)| *v == 1.0) && ok.first().is_some_and(|(_, v)| *v == 1.0)
        {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no healthy scrape after 60 s: up={up:?} success={ok:?}\n{}",
            p.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!("first healthy scrape after {:?}", t0.elapsed());
    // With the probe healthy and every `for:` cut to seconds, nothing fires: not the stall
    // alert, and not the start-up zeros (last success 0 = never, counters at 0). Absent can
    // have been pending before the first scrape: wait for it to go.
    // The watchdog is the exception: it fires always, on this real Prometheus too.
    let quiet = |a: &Value| a["state"] != "firing" || a["labels"]["alertname"] == WATCHDOG;
    until_alerts(
        &p,
        Duration::from_secs(30),
        "no alert but the watchdog firing",
        |a| {
            a.iter().all(quiet)
                && a.iter()
                    .any(|a| a["labels"]["alertname"] == WATCHDOG && a["state"] == "firing")
        },
    )
    .await;
    let hold = Instant::now();
    while hold.elapsed() < Duration::from_secs(5) {
        let alerts = p.alerts().await;
        assert!(
            alerts
                .iter()
                .all(|a| quiet(a) && a["labels"]["alertname"] != STALLED),
            "an alert with the probe healthy:\n{}",
            describe(&alerts)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The seed outage: the helpdesk's background jobs stall, its web app stays up.
    sb.faults().set(Stage::Import, Fault::Stall);
    let fault_at = Instant::now();
    let import = |a: &Value| {
        a["labels"]["alertname"] == STALLED
            && a["labels"]["stage"] == "import"
            && a["labels"]["probe"] == PROBE
    };
    let mut pending_after = None;
    let firing = loop {
        let alerts = p.alerts().await;
        if pending_after.is_none() && alerts.iter().any(import) {
            pending_after = Some(fault_at.elapsed());
        }
        if alerts.iter().any(|a| import(a) && a["state"] == "firing") {
            break alerts;
        }
        assert!(
            fault_at.elapsed() < Duration::from_secs(90),
            "no import stall alert 90 s after import=stall; active alerts:\n{}\nprometheus log:\n{}",
            describe(&alerts),
            p.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let fired_after = fault_at.elapsed();
    let alert = firing
        .iter()
        .find(|a| import(a) && a["state"] == "firing")
        .unwrap();
    println!(
        "FAULT -> FIRING: {STALLED}{{stage=\"import\"}} firing {fired_after:?} after import=stall \
         (import deadline 3 s, scrape and evaluation every 1 s, `for:` 1 s instead of 1 m; \
         pending after {pending_after:?}, activeAt {})",
        alert["activeAt"]
    );
    println!("summary: {}", alert["annotations"]["summary"]);
    println!("description: {}", alert["annotations"]["description"]);
    println!("all active alerts:\n{}", describe(&firing));
    assert_eq!(alert["labels"]["severity"], "page");
    let summary = alert["annotations"]["summary"].as_str().unwrap();
    assert!(
        summary.contains("stage import stalled") && summary.contains(PROBE),
        "{summary}"
    );
    // Only the stalled stage is blamed.
    for a in &firing {
        if a["labels"]["alertname"] == STALLED {
            assert_eq!(a["labels"]["stage"], "import", "{}", describe(&firing));
        }
    }
    // Within the contract: the probe's deadline plus a few scrape/evaluation rounds.
    assert!(
        fired_after < Duration::from_secs(30),
        "fired only after {fired_after:?}"
    );

    // The stall clears; the backlog drains (late), an on-time canary follows: resolved.
    sb.faults().set(Stage::Import, Fault::Ok);
    let cleared_at = Instant::now();
    until_alerts(
        &p,
        Duration::from_secs(90),
        "the stall alert to resolve",
        |alerts| !alerts.iter().any(|a| a["labels"]["alertname"] == STALLED),
    )
    .await;
    println!(
        "CLEARED -> RESOLVED: {STALLED} gone from /api/v1/alerts {:?} after import=ok",
        cleared_at.elapsed()
    );

    drop(p);
    d.stop().await;
    sb.shutdown().await;
}

/// Prometheus scraping the prober over TLS with basic auth, as the exporter-toolkit web config
/// sets it up (`--web.config.file`): `scheme: https`, the CA, a user and password; it reads a
/// mailcanary series, and a scrape without the password is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_over_tls_with_basic_auth() {
    use std::sync::Arc;
    let sb = sandbox().await;
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let web = certs.path().join("web.yml");
    fs::write(
        &web,
        format!(
            "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n\
             basic_auth_users:\n  prometheus: {}\n",
            bcrypt::hash("scrape-pass", 4).unwrap()
        ),
    )
    .unwrap();
    let surface = Arc::new(mailcanary::web::exposure::Surface::new(Some(web)).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let d = mailcanary::daemon::Daemon::start_with(
        &config(&sb, &Knobs::default()),
        mailcanary::daemon::Options {
            state_dir: dir.path().to_path_buf(),
            listen: ([127, 0, 0, 1], 0).into(),
            schedule: true,
        },
        surface,
    )
    .await
    .unwrap();
    let ca = certs.path().join("ca.pem");
    let job = "    scheme: https\n    tls_config:\n      ca_file: ca.pem\n    \
               basic_auth:\n      username: prometheus\n      password: scrape-pass\n";
    let p = Prometheus::start_with(d.addr, "groups: []\n", job, |dir| {
        fs::copy(&ca, dir.join("ca.pem")).unwrap();
    })
    .await;
    let t0 = Instant::now();
    loop {
        let up = p.query(r#"up{job="mailcanary"}"#).await;
        let info = p.query("mailcanary_build_info").await;
        if up.first().is_some_and(|(_, v)| *v == 1.0)
            && info.first().is_some_and(|(_, v)| *v == 1.0)
        {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no scrape over TLS with basic auth after 60 s: up={up:?} build_info={info:?}\n{}",
            p.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    drop(p);
    // The same without the password: Prometheus sees 401, the target is down.
    let job = "    scheme: https\n    tls_config:\n      ca_file: ca.pem\n";
    let p = Prometheus::start_with(d.addr, "groups: []\n", job, |dir| {
        fs::copy(&ca, dir.join("ca.pem")).unwrap();
    })
    .await;
    let t0 = Instant::now();
    loop {
        let up = p.query(r#"up{job="mailcanary"}"#).await;
        if up.first().is_some_and(|(_, v)| *v == 0.0) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "a scrape without the password was not down after 60 s: up={up:?}\n{}",
            p.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    drop(p);
    d.stop().await;
    sb.shutdown().await;
}
