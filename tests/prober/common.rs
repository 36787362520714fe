//! Shared helpers: a fast sandbox, a config pointing at it, scraping metrics.

use std::{path::Path, time::Duration};

use mailcanary::{
    config::{self, Config},
    daemon::{Daemon, Options},
    metrics::testing::{Samples, parse_exposition},
    sandbox::{DelayRange, Sandbox, SandboxConfig},
};

pub use crate::probe_config::{ConfigFile, Deadlines, Imap, Mailbox, Probe, sandbox_probe, some};

pub const PROBE: &str = "drill";

/// Knobs of the generated probe config.
#[derive(Clone)]
pub struct Knobs {
    pub interval: &'static str,
    pub import_deadline: &'static str,
    pub delivery_deadline: &'static str,
    pub end_to_end: &'static str,
    pub lost_after: &'static str,
    pub api_token: String,
    pub imap_password: String,
    pub secret: String,
    pub idle: bool,
    pub poll_interval: &'static str,
    /// `webhook_secret` of the helpdesk, if any.
    pub webhook_secret: Option<&'static str>,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            interval: "1s",
            import_deadline: "2s",
            delivery_deadline: "2s",
            end_to_end: "30s",
            lost_after: "1h",
            api_token: "sandbox".into(),
            imap_password: "sandbox".into(),
            secret: "drill-secret".into(),
            idle: true,
            poll_interval: "200ms",
            webhook_secret: None,
        }
    }
}

pub async fn sandbox() -> Sandbox {
    sandbox_with(|_| {}).await
}

pub async fn sandbox_with(f: impl FnOnce(&mut SandboxConfig)) -> Sandbox {
    let mut cfg = SandboxConfig::ephemeral();
    cfg.import_delay = DelayRange::new(Duration::from_millis(50), Duration::from_millis(150));
    cfg.outbound_delay = DelayRange::fixed(Duration::from_millis(30));
    f(&mut cfg);
    Sandbox::start(cfg).await.expect("sandbox starts")
}

/// A sandbox whose import makes 4 tickets a second (50 ms each), and the probe knobs that send
/// a canary every 500 ms with a 2 s import deadline: a stall then drains at twice the send
/// rate, slowly enough to watch (the drain and incident drills).
pub async fn slow_drain() -> (Sandbox, Knobs) {
    let sb = sandbox_with(|c| {
        c.import_rate = Some(4.0);
        c.import_delay = DelayRange::fixed(Duration::from_millis(50));
    })
    .await;
    let k = Knobs {
        interval: "500ms",
        import_deadline: "2s",
        end_to_end: "2m",
        ..Knobs::default()
    };
    (sb, k)
}

/// The drill probe of `sb`: a SupportBee helpdesk probe of the sandbox.
pub fn drill_probe(sb: &Sandbox, k: &Knobs) -> Probe {
    let mailbox = "canary@prober.test";
    let mut p = sandbox_probe(PROBE, sb.smtp_addr, sb.imap_addr, &sb.api_url(), mailbox);
    p.interval = some(k.interval);
    p.jitter = some("100ms");
    p.lost_after = some(k.lost_after);
    p.deadlines = Some(Deadlines {
        submit: some("5s"),
        import: some(k.import_deadline),
        reply: some("5s"),
        delivery: some(k.delivery_deadline),
        end_to_end: some(k.end_to_end),
        ..Deadlines::default()
    });
    let hd = p.helpdesk_mut();
    hd.token = some(&k.api_token);
    hd.poll_interval = some(k.poll_interval);
    hd.webhook_secret = k.webhook_secret.map(String::from);
    let imap = p.imap_mut();
    imap.password = some(&k.imap_password);
    imap.idle = Some(k.idle);
    imap.poll_interval = some("1s");
    p
}

/// The drill config of `sb`: `[prober]` and the drill probe, to change before rendering.
pub fn config_file(sb: &Sandbox, k: &Knobs) -> ConfigFile {
    ConfigFile::new(&k.secret, "prober.test").with(drill_probe(sb, k))
}

/// The drill config of `sb`, as TOML text.
pub fn config_text(sb: &Sandbox, k: &Knobs) -> String {
    config_file(sb, k).render()
}

/// The drill config with `n` probes named `p0000`, `p0001`, … instead of the one drill probe.
pub fn fleet_text(sb: &Sandbox, k: &Knobs, n: usize) -> String {
    let drill = drill_probe(sb, k);
    let mut file = ConfigFile::new(&k.secret, "prober.test");
    file.probes = (0..n).map(|i| drill.renamed(&format!("p{i:04}"))).collect();
    file.render()
}

pub fn config(sb: &Sandbox, k: &Knobs) -> Config {
    config::parse_str(&config_text(sb, k), "drill.toml").expect("drill config parses")
}

/// A daemon in this process on `state_dir`. A restart in the same process may find the
/// stopped daemon's ledger still open for a moment (a task of it still ending holds the
/// engine); a new process never does, so only "in use" is waited out, for at most 10 s.
pub async fn daemon(cfg: &Config, state_dir: &Path) -> Daemon {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let t0 = std::time::Instant::now();
    loop {
        let started = Daemon::start(
            cfg,
            Options {
                state_dir: state_dir.to_path_buf(),
                listen: ([127, 0, 0, 1], 0).into(),
                schedule: true,
            },
        )
        .await;
        match started {
            Ok(d) => return d,
            Err(e)
                if format!("{e:#}").contains("is in use")
                    && t0.elapsed() < Duration::from_secs(10) =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("daemon starts: {e:?}"),
        }
    }
}

pub fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// The real binary.
pub fn bin() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_mailcanary"))
}

/// `mailcanary once ARGS --config FILE` against the default drill probe of `sb`, on a blocking
/// thread; how long it took and what it printed.
pub async fn run_once(sb: &Sandbox, args: &[&str]) -> (Duration, std::process::Output) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("p.toml");
    std::fs::write(&cfg, config_text(sb, &Knobs::default())).unwrap();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let t = std::time::Instant::now();
        let out = bin()
            .arg("once")
            .args(&args)
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap();
        drop(dir);
        (t.elapsed(), out)
    })
    .await
    .unwrap()
}

pub async fn get_json(url: &str) -> serde_json::Value {
    http().get(url).send().await.unwrap().json().await.unwrap()
}

/// Messages in the canary mailbox of `sb` (`canary@prober.test`), over IMAP.
pub async fn inbox_count(sb: &Sandbox) -> u32 {
    inbox_count_of(sb, "canary@prober.test").await
}

/// Messages in `address`'s sandbox mailbox, over IMAP.
pub async fn inbox_count_of(sb: &Sandbox, address: &str) -> u32 {
    let mut session = imap_session(sb, address).await;
    let exists = session.select("INBOX").await.unwrap().exists;
    let _ = session.logout().await;
    exists
}

/// An IMAP session of `sb` logged in as `address`.
pub async fn imap_session(
    sb: &Sandbox,
    address: &str,
) -> async_imap::Session<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(sb.imap_addr).await.unwrap();
    let mut client = async_imap::Client::new(tcp);
    let _greeting = client.read_response().await;
    client
        .login(address, "sandbox")
        .await
        .map_err(|(e, _)| e)
        .unwrap()
}

pub async fn get_text(url: &str) -> String {
    http().get(url).send().await.unwrap().text().await.unwrap()
}

pub async fn scrape(addr: std::net::SocketAddr) -> Samples {
    parse_exposition(&get_text(&format!("http://{addr}/metrics")).await)
}

/// The value of a series of the drill probe (0 when absent).
pub fn v(s: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut all = vec![("probe", PROBE)];
    all.extend_from_slice(labels);
    s.value(name, &all).unwrap_or(0.0)
}

/// Polls the metrics every 100 ms until `cond` holds, or panics after `within` (or at once if
/// the prober does not answer).
pub async fn until(
    addr: std::net::SocketAddr,
    within: Duration,
    what: &str,
    cond: impl Fn(&Samples) -> bool,
) -> Samples {
    poll_metrics(addr, within, what, false, cond).await
}

/// A child process (the real binary), killed when dropped: a failing assertion must not leave
/// a prober running (one once ran on for an hour after an early failure).
pub struct KillOnDrop(pub std::process::Child);

impl KillOnDrop {
    /// Sends `SIG<name>` (`kill -NAME PID`).
    pub fn signal(&self, name: &str) {
        let ok = std::process::Command::new("kill")
            .args([&format!("-{name}"), &self.0.id().to_string()])
            .status()
            .unwrap_or_else(|e| panic!("kill -{name}: {e}"))
            .success();
        assert!(ok, "kill -{name} {} failed", self.0.id());
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port that was free a moment ago, for a process that must keep its port across
/// restarts.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET /api/v1/status` of the prober on `port`, or `None` while it does not answer.
pub async fn status(port: u16) -> Option<serde_json::Value> {
    let r = http()
        .get(format!("http://127.0.0.1:{port}/api/v1/status"))
        .send()
        .await
        .ok()?;
    r.json().await.ok()
}

/// Like [`until`], for a prober that may be between processes (starting, restarting): a
/// refused connection is waited out, not a failure.
pub async fn until_up(
    addr: std::net::SocketAddr,
    within: Duration,
    what: &str,
    cond: impl Fn(&Samples) -> bool,
) -> Samples {
    poll_metrics(addr, within, what, true, cond).await
}

async fn poll_metrics(
    addr: std::net::SocketAddr,
    within: Duration,
    what: &str,
    may_be_down: bool,
    cond: impl Fn(&Samples) -> bool,
) -> Samples {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let got = match http().get(format!("http://{addr}/metrics")).send().await {
            Ok(r) => Some(parse_exposition(&r.text().await.unwrap())),
            Err(_) if may_be_down => None,
            Err(e) => panic!("GET http://{addr}/metrics while waiting for {what}: {e}"),
        };
        if let Some(s) = got.filter(|s| cond(s)) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The drill config on vendor `api`, with `tables` (its `[probe.helpdesk.<api>]` tables as
/// TOML text, or nothing).
pub fn vendor_file(sb: &Sandbox, k: &Knobs, api: &str, tables: &str) -> ConfigFile {
    let mut file = config_file(sb, k);
    let hd = file.probe_mut(PROBE).helpdesk_mut();
    hd.api = api.into();
    if !tables.is_empty() {
        hd.add_tables(tables);
    }
    file
}

/// [`vendor_file`] as TOML text.
pub fn vendor_text(sb: &Sandbox, k: &Knobs, api: &str, tables: &str) -> String {
    vendor_file(sb, k, api, tables).render()
}

/// A fast sandbox speaking `api`'s dialect first (where two claim the same paths, and whose
/// webhooks it sends), then `f`.
pub async fn vendor_sandbox(api: &str, f: impl FnOnce(&mut SandboxConfig)) -> Sandbox {
    sandbox_with(|c| {
        c.api = api.into();
        f(c)
    })
    .await
}

/// No stage failed, for any reason.
pub fn no_failures(s: &Samples) {
    let failed: Vec<_> = s
        .family("mailcanary_stage_failures_total")
        .into_iter()
        .filter(|x| x.value > 0.0)
        .collect();
    assert!(failed.is_empty(), "{failed:?}");
}

/// A prober listening on `port`, chosen before the sandbox starts so the sandbox can push
/// webhooks to it.
pub async fn daemon_on(cfg: &Config, dir: &Path, port: u16) -> Daemon {
    let _ = rustls::crypto::ring::default_provider().install_default();
    Daemon::start(
        cfg,
        Options {
            state_dir: dir.to_path_buf(),
            listen: ([127, 0, 0, 1], port).into(),
            schedule: true,
        },
    )
    .await
    .expect("daemon starts")
}

/// How many import durations the histogram holds, and their sum in seconds.
pub fn import_count_and_sum(s: &Samples) -> (f64, f64) {
    let import = [("stage", "import")];
    (
        v(s, "mailcanary_stage_duration_seconds_count", &import),
        v(s, "mailcanary_stage_duration_seconds_sum", &import),
    )
}

/// Makes the sandbox push its signed ticket-created webhooks to the drill probe of a prober
/// that will listen on `port`, signed with `secret`.
pub fn push_webhooks_to(c: &mut SandboxConfig, port: u16, secret: &str) {
    c.webhook_url = Some(format!("http://127.0.0.1:{port}/webhooks/{PROBE}"));
    c.webhook_secret = secret.into();
}

/// `openssl ARGS` in `dir`, which must succeed.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed P-256 certificate `NAME.pem` with its key `NAME.key`, valid for 2 days.
pub fn self_signed(dir: &Path, name: &str, cn: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={cn}"),
        ],
    );
}

/// A test CA (`ca.pem`), a server certificate for 127.0.0.1 (`server.pem`, `server.key`) and
/// a client certificate (`client.pem`, `client.key`), all signed by the CA.
pub fn make_certs(dir: &Path) {
    self_signed(dir, "ca", "mailcanary test CA");
    std::fs::write(
        dir.join("ext.cnf"),
        "[srv]\nsubjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n\
         [cli]\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    for (name, ext) in [("server", "srv"), ("client", "cli")] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={name}"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
                "-extensions",
                ext,
            ],
        );
    }
}
