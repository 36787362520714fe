//! Probes of the real servers as TOML, an in-process daemon, scraping metrics.

use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use mailcanary::{
    canary::life::{Canary, Stage},
    config,
    daemon::{Daemon, Options},
    metrics::testing::{Samples, parse_exposition},
};

pub use crate::probe_config::{ConfigFile, Deadlines, Imap, OAuth2, Probe, Smtp, some};

use crate::harness::{Servers, address, password};

pub const SECRET: &str = "realmail-secret";
pub const HOSTNAME: &str = "prober.test";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmtpMode {
    /// Port 25, no TLS, no AUTH (the MX path).
    Plain25,
    /// Port 25, STARTTLS required, no AUTH.
    StartTls25,
    /// Port 587, STARTTLS + AUTH.
    Submission587,
    /// Port 465, implicit TLS + AUTH.
    Submissions465,
}

impl SmtpMode {
    pub const ALL: [SmtpMode; 4] = [
        SmtpMode::Plain25,
        SmtpMode::StartTls25,
        SmtpMode::Submission587,
        SmtpMode::Submissions465,
    ];

    pub fn slug(self) -> &'static str {
        match self {
            SmtpMode::Plain25 => "smtp25",
            SmtpMode::StartTls25 => "smtp25tls",
            SmtpMode::Submission587 => "sub587",
            SmtpMode::Submissions465 => "subs465",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImapMode {
    /// Port 143 with STARTTLS.
    StartTls143,
    /// Port 993, implicit TLS.
    Tls993,
}

impl ImapMode {
    pub const ALL: [ImapMode; 2] = [ImapMode::StartTls143, ImapMode::Tls993];

    pub fn slug(self) -> &'static str {
        match self {
            ImapMode::StartTls143 => "imap143",
            ImapMode::Tls993 => "imaps993",
        }
    }
}

/// One mail-loop probe of the real servers.
#[derive(Clone, Debug)]
pub struct ProbeSpec {
    pub name: String,
    /// Host name for both servers: `localhost` (the certificate's DNS SAN) or `127.0.0.1`
    /// (its IP SAN).
    pub host: &'static str,
    pub smtp: SmtpMode,
    pub imap: ImapMode,
    /// Local part of the watched mailbox (also the AUTH user on 587/465).
    pub mailbox: String,
    /// Local part the canary is sent to (default: the mailbox).
    pub rcpt: Option<String>,
    pub smtp_password: Option<String>,
    pub imap_password: Option<String>,
    /// `[probe.smtp.oauth2]` (AUTH with a token instead of the password; 587/465).
    pub smtp_oauth2: Option<OAuth2>,
    /// `[probe.imap.oauth2]` (AUTHENTICATE with a token instead of LOGIN).
    pub imap_oauth2: Option<OAuth2>,
    pub smtp_ca: Option<PathBuf>,
    pub imap_ca: Option<PathBuf>,
    pub interval: &'static str,
    pub submit_deadline: &'static str,
    pub delivery_deadline: &'static str,
    /// The SMTP and the IMAP `timeout`.
    pub timeout: &'static str,
    pub idle: bool,
    pub poll_interval: &'static str,
    pub cleanup: bool,
}

impl ProbeSpec {
    pub fn new(name: &str, smtp: SmtpMode, imap: ImapMode, mailbox: &str) -> ProbeSpec {
        ProbeSpec {
            name: name.to_string(),
            host: "localhost",
            smtp,
            imap,
            mailbox: mailbox.to_string(),
            rcpt: None,
            smtp_password: None,
            imap_password: None,
            smtp_oauth2: None,
            imap_oauth2: None,
            smtp_ca: None,
            imap_ca: None,
            interval: "1s",
            submit_deadline: "15s",
            delivery_deadline: "10s",
            timeout: "10s",
            idle: true,
            poll_interval: "200ms",
            cleanup: true,
        }
    }

    /// This probe as a `[[probe]]` of the config builder.
    pub fn probe(&self, s: &Servers) -> Probe {
        let p = s.ports;
        let ca = s.ca_file().display().to_string();
        let mailbox = address(&self.mailbox);
        let rcpt = address(self.rcpt.as_deref().unwrap_or(&self.mailbox));
        let (port, tls, auth) = match self.smtp {
            SmtpMode::Plain25 => (p.smtp, "none", false),
            SmtpMode::StartTls25 => (p.smtp, "starttls", false),
            SmtpMode::Submission587 => (p.submission, "starttls", true),
            SmtpMode::Submissions465 => (p.submissions, "tls", true),
        };
        let smtp_password = (auth && self.smtp_oauth2.is_none()).then(|| {
            self.smtp_password
                .clone()
                .unwrap_or_else(|| password(&self.mailbox))
        });
        let (imap_port, imap_tls) = match self.imap {
            ImapMode::StartTls143 => (p.imap, "starttls"),
            ImapMode::Tls993 => (p.imaps, "tls"),
        };
        let smtp = Smtp {
            host: self.host.into(),
            port: Some(port),
            tls: some(tls),
            username: auth.then(|| mailbox.clone()),
            password: smtp_password,
            ca_file: Some(
                self.smtp_ca
                    .as_ref()
                    .map_or(ca.clone(), |c| c.display().to_string()),
            ),
            // On the MX path the canary comes from outside, as a customer's mail would.
            from: Some(if auth {
                mailbox.clone()
            } else {
                "canary@prober.test".into()
            }),
            to: Some(rcpt),
            timeout: some(self.timeout),
            helo_name: some(HOSTNAME),
            oauth2: self.smtp_oauth2.clone().filter(|_| auth),
            ..Smtp::default()
        };
        Probe {
            interval: some(self.interval),
            jitter: some("100ms"),
            max_in_flight: Some(50),
            lost_after: some("1h"),
            cleanup: Some(self.cleanup),
            deadlines: Some(Deadlines {
                submit: some(self.submit_deadline),
                delivery: some(self.delivery_deadline),
                end_to_end: some("1m"),
                ..Deadlines::default()
            }),
            imap: Some(Imap {
                host: self.host.into(),
                port: Some(imap_port),
                tls: some(imap_tls),
                username: mailbox,
                password: match &self.imap_oauth2 {
                    Some(_) => None,
                    None => Some(
                        self.imap_password
                            .clone()
                            .unwrap_or_else(|| password(&self.mailbox)),
                    ),
                },
                ca_file: Some(
                    self.imap_ca
                        .as_ref()
                        .map_or(ca, |c| c.display().to_string()),
                ),
                idle: Some(self.idle),
                poll_interval: some(self.poll_interval),
                timeout: some(self.timeout),
                oauth2: self.imap_oauth2.clone(),
                ..Imap::default()
            }),
            ..Probe::new(&self.name, "mail_loop", smtp)
        }
    }
}

/// `[prober]` as every real-server test has it, and no probe yet.
pub fn prober_file() -> ConfigFile {
    ConfigFile::new(SECRET, HOSTNAME)
}

/// The config of `probes`, to change before rendering.
pub fn config_file(s: &Servers, probes: &[ProbeSpec]) -> ConfigFile {
    let mut file = prober_file();
    file.probes = probes.iter().map(|p| p.probe(s)).collect();
    file
}

pub fn config_text(s: &Servers, probes: &[ProbeSpec]) -> String {
    config_file(s, probes).render()
}

/// A running prober of `probes` with its own state dir.
pub struct Prober {
    pub daemon: Daemon,
    _state: tempfile::TempDir,
}

impl Prober {
    pub async fn start(s: &Servers, probes: &[ProbeSpec], schedule: bool) -> Prober {
        Self::start_with(&config_text(s, probes), schedule).await
    }

    /// A scheduling prober of the config `text`.
    pub async fn start_text(text: &str) -> Prober {
        Self::start_with(text, true).await
    }

    async fn start_with(text: &str, schedule: bool) -> Prober {
        let cfg = config::parse_str(text, "realmail.toml")
            .unwrap_or_else(|e| panic!("realmail config does not parse: {e}\n{text}"));
        let _ = rustls::crypto::ring::default_provider().install_default();
        let state = tempfile::tempdir().unwrap();
        let daemon = Daemon::start(
            &cfg,
            Options {
                state_dir: state.path().to_path_buf(),
                listen: ([127, 0, 0, 1], 0).into(),
                schedule,
            },
        )
        .await
        .expect("daemon starts");
        Prober {
            daemon,
            _state: state,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.daemon.addr
    }

    /// Recent finished and in-flight canaries of `probe`.
    pub fn canaries(&self, probe: &str) -> Vec<Canary> {
        let now = now_ms();
        self.daemon
            .engine
            .status(now)
            .into_iter()
            .filter(|p| p.name == probe)
            .flat_map(|p| p.recent.into_iter().chain(p.in_flight))
            .collect()
    }

    pub async fn stop(self) {
        self.daemon.stop().await;
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// When the delivery stage of `c` finished (the prober saw the message), Unix ms.
pub fn delivered_ms(c: &Canary) -> Option<u64> {
    c.record(Stage::Delivery)?.done_ms
}

pub async fn scrape(addr: SocketAddr) -> Samples {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let text = reqwest::Client::new()
        .get(format!("http://{addr}/metrics"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    parse_exposition(&text)
}

/// A series of `probe` (0 when absent).
pub fn v(s: &Samples, probe: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut all = vec![("probe", probe)];
    all.extend_from_slice(labels);
    s.value(name, &all).unwrap_or(0.0)
}

pub fn completed(s: &Samples, probe: &str) -> f64 {
    v(s, probe, "mailcanary_canaries_completed_total", &[])
}

pub fn failures(s: &Samples, probe: &str, stage: &str, reason: &str) -> f64 {
    v(
        s,
        probe,
        "mailcanary_stage_failures_total",
        &[("stage", stage), ("reason", reason)],
    )
}

/// Every failure of `probe`, as `(stage, reason, count)` with count > 0.
pub fn all_failures(s: &Samples, probe: &str) -> Vec<(String, String, f64)> {
    s.family("mailcanary_stage_failures_total")
        .into_iter()
        .filter(|x| x.label("probe") == Some(probe) && x.value > 0.0)
        .map(|x| {
            (
                x.label("stage").unwrap_or("").to_string(),
                x.label("reason").unwrap_or("").to_string(),
                x.value,
            )
        })
        .collect()
}

/// Polls the metrics every 100 ms until `cond` holds, or panics after `within`.
pub async fn until(
    addr: SocketAddr,
    within: Duration,
    what: &str,
    cond: impl Fn(&Samples) -> bool,
) -> Samples {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let s = scrape(addr).await;
        if cond(&s) {
            return s;
        }
        if tokio::time::Instant::now() > deadline {
            let mut failing = String::new();
            for sample in s.family("mailcanary_stage_failures_total") {
                if sample.value > 0.0 {
                    failing.push_str(&format!("  {sample:?}\n"));
                }
            }
            // The newest failures' own words (the server's answer, the edge's detail): what a
            // flaky run needs to be understood afterwards.
            let status = reqwest::get(format!("http://{addr}/api/v1/status"))
                .await
                .ok()
                .map(|r| r.json::<serde_json::Value>());
            let mut details = String::new();
            if let Some(json) = status
                && let Ok(v) = json.await
            {
                for p in v["probes"].as_array().into_iter().flatten() {
                    for f in p["failures"].as_array().into_iter().flatten().take(3) {
                        details.push_str(&format!(
                            "  {} {} {}: {}\n",
                            p["name"], f["stage"], f["reason"], f["detail"]
                        ));
                    }
                }
            }
            panic!(
                "timed out after {within:?} waiting for {what}; failures:\n{failing}newest:\n{details}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs blocking harness work (process control) off the runtime's threads.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// Median of `values` (sorted in place); `None` when empty.
pub fn median(values: &mut [i64]) -> Option<i64> {
    values.sort_unstable();
    (!values.is_empty()).then(|| values[values.len() / 2])
}
