//! The commands. This is the only place that wires the sandbox into the prober (`run` without
//! `--config` starts one in-process).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::once;
use mailcanary::{
    config::{self, Config},
    daemon::{Daemon, Options},
    sandbox::{self, DelayRange, Fault, Sandbox, SandboxConfig, Stage},
    web::exposure::Surface,
};

/// Prints a line to stdout, ignoring a closed pipe: a daemon must not die because whoever
/// started it stopped reading its stdout (`println!` panics on EPIPE).
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

#[derive(Parser)]
#[command(
    name = "mailcanary",
    version,
    about = "Synthetic end-to-end email flow prober"
)]
struct Cli {
    /// Log format: human-readable text, or JSON lines for containers.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// The daemon. Without --config it starts the sandbox in-process and probes it.
    Run(RunArgs),
    /// Validate the config and exit (errors name file, line and key).
    Check(CheckArgs),
    /// Send one canary per probe, print each stage as it completes, exit 0 if all passed.
    Once(OnceArgs),
    /// Print the recorded incidents (the outage's story, in numbers): from a running prober
    /// over HTTP, or from a stopped one's state dir.
    Incidents(IncidentsArgs),
    /// Run only the sandbox helpdesk (SMTP in, tickets API, IMAP out) and print its addresses.
    Sandbox(Box<SandboxArgs>),
}

#[derive(Args)]
struct RunArgs {
    /// Config file or directory of *.toml files. Default: the embedded sandbox probe.
    #[arg(long)]
    config: Option<PathBuf>,
    /// HTTP listen address (default: the config's, else 127.0.0.1:9725).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// State directory for the ledger and the generated secret (default: the config's, else
    /// ./.mailcanary).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Run only the probes of shard K of N (`K/N`, stable hashing of probe names). `auto/N`
    /// takes K from the hostname's trailing `-ORDINAL`, as a StatefulSet's pods are named
    /// (`mailcanary-2` is shard 2).
    #[arg(long, value_parser = parse_shard)]
    shard: Option<(Option<u32>, u32)>,
    /// TLS and basic auth for the HTTP surface, in Prometheus's exporter-toolkit format
    /// (`tls_server_config`, `basic_auth_users`); read again on SIGHUP.
    #[arg(long = "web.config.file", value_name = "FILE")]
    web_config_file: Option<PathBuf>,
}

#[derive(Args)]
struct CheckArgs {
    /// Config file or directory of *.toml files. Default: the embedded sandbox probe.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Check everything but what belongs to the machine the config is for: secrets are not
    /// read (from `${VAR}` or `*_file`; their syntax is still checked), a `ca_file` need not
    /// exist. For linting a config in the repository or CI that holds it.
    #[arg(long)]
    syntax_only: bool,
}

#[derive(Args)]
struct OnceArgs {
    /// Config file or directory of *.toml files. Default: the embedded sandbox probe.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Only this probe (default: every probe).
    #[arg(long)]
    probe: Option<String>,
    /// Give up after this long, whatever is pending (default: the longest end-to-end
    /// deadline plus 10 s). `once` normally ends sooner: at the first failed or overdue stage,
    /// or when every stage is done.
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// `text`: the stage timeline as it happens. `nagios`: one status line with perfdata,
    /// exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (monitoring-plugins guidelines).
    #[arg(long, value_enum, default_value_t = OnceFormat::Text)]
    format: OnceFormat,
}

#[derive(Args)]
struct IncidentsArgs {
    /// Only incidents detected within this long before now (`7d`, `12h`). Default: all kept.
    #[arg(long, value_parser = humantime::parse_duration)]
    since: Option<Duration>,
    /// `text`: a line each. `markdown`: a section each, for a postmortem. `json`: as served.
    #[arg(long, value_enum, default_value_t = IncidentsFormat::Text)]
    format: IncidentsFormat,
    /// A running prober's address (`http://127.0.0.1:9725`); it holds its ledger open.
    #[arg(long, conflicts_with = "state_dir")]
    url: Option<String>,
    /// A stopped prober's state dir (default: ./.mailcanary when --url is not given).
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum IncidentsFormat {
    Text,
    Markdown,
    Json,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnceFormat {
    Text,
    Nagios,
}

/// `K/N`, or `auto/N` (K from the hostname at start: `None` here).
fn parse_shard(s: &str) -> Result<(Option<u32>, u32), String> {
    let (k, n) = s
        .split_once('/')
        .ok_or("expected K/N or auto/N, e.g. 0/3")?;
    let n: u32 = n.parse().map_err(|_| "N must be a number")?;
    if n == 0 {
        return Err("N must be at least 1".into());
    }
    if k == "auto" {
        return Ok((None, n));
    }
    let k: u32 = k.parse().map_err(|_| "K must be a number or auto")?;
    if k >= n {
        return Err("need 0 <= K < N".into());
    }
    Ok((Some(k), n))
}

/// The ordinal at the end of a StatefulSet pod's hostname (`mailcanary-2` → 2).
fn hostname_ordinal(hostname: &str) -> Option<u32> {
    let (_, ordinal) = hostname.trim().rsplit_once('-')?;
    if ordinal.is_empty() || !ordinal.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    ordinal.parse().ok()
}

/// The shard `--shard` names: `auto/N` resolved from this host's name.
fn resolve_shard(spec: (Option<u32>, u32)) -> Result<(u32, u32), String> {
    let (k, n) = spec;
    let k = match k {
        Some(k) => k,
        None => {
            // The kernel's name for this host (a pod's is its name); Linux only, as is
            // everything this runs on.
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_default();
            let k = hostname_ordinal(&host).ok_or_else(|| {
                format!(
                    "--shard auto/{n}: the hostname {host:?} does not end in -ORDINAL (a \
                     StatefulSet pod's name does); give the shard as K/{n}"
                )
            })?;
            if k >= n {
                return Err(format!(
                    "--shard auto/{n}: the hostname {host:?} is ordinal {k}, but there are only \
                     {n} shards: make N the StatefulSet's replicas"
                ));
            }
            k
        }
    };
    Ok((k, n))
}

#[derive(Args)]
struct SandboxArgs {
    /// Inbound MX (SMTP) listen address.
    #[arg(long, default_value = "127.0.0.1:2525")]
    smtp_listen: SocketAddr,
    /// IMAP listen address.
    #[arg(long, default_value = "127.0.0.1:1143")]
    imap_listen: SocketAddr,
    /// Helpdesk API listen address.
    #[arg(long, default_value = "127.0.0.1:8088")]
    http_listen: SocketAddr,
    /// Import delay per mail: `2s` or a range `200ms..2s`.
    #[arg(long, default_value = "200ms..2s")]
    import_delay: DelayRange,
    /// Tickets the import workers make per second at most, e.g. `5` (default: unbounded). A
    /// cleared stall then drains at that speed, as a real worker pool's backlog does.
    #[arg(long)]
    import_rate: Option<f64>,
    /// Delivery delay per reply: `1s` or a range `100ms..500ms`.
    #[arg(long, default_value = "100ms..500ms")]
    outbound_delay: DelayRange,
    /// A fault set at start, `STAGE=MODE` (stages inbound import api outbound mailbox; modes ok
    /// stall drop error delay:<duration>). Repeatable.
    #[arg(long = "fault", value_parser = parse_fault)]
    faults: Vec<(Stage, Fault)>,
    /// Address the MX accepts mail for. Repeatable.
    #[arg(long = "support-address", default_value = "support@helpdesk.test")]
    support_addresses: Vec<String>,
    /// The API's `auth_token`.
    #[arg(long, default_value = "sandbox")]
    api_token: String,
    /// The password IMAP LOGIN takes for every mailbox.
    #[arg(long, default_value = "sandbox")]
    mailbox_password: String,
    /// Largest message the MX takes, in bytes.
    #[arg(long, default_value_t = 10 * 1024 * 1024)]
    max_message_size: usize,
    /// How many messages the ground-truth event log keeps (oldest dropped first).
    #[arg(long, default_value_t = 10_000)]
    event_capacity: usize,
    /// Hold IDLE pushes back this long after a change, like Dovecot (`500ms`). Default: none.
    #[arg(long, value_parser = humantime::parse_duration)]
    idle_delay: Option<Duration>,
    /// Acknowledge every new ticket by mail at once (token in the Subject, the canary quoted,
    /// threaded to it), ahead of any reply: `on` (the bare flag), `off`, or by default as the
    /// `--api` vendor does out of the box (RT, django-helpdesk, Zendesk, Freshdesk, Zammad).
    #[arg(long, num_args = 0..=1, default_missing_value = "on", value_parser = parse_on_off)]
    auto_ack: Option<bool>,
    /// The vendor dialect whose webhooks are sent and which serves paths vendors share
    /// (every dialect is served; see the README's Helpdesks table).
    #[arg(long, default_value = "supportbee", value_parser = parse_dialect)]
    api: String,
    /// Hide a new ticket from search endpoints this long, as a vendor's search index lags
    /// (list endpoints see it at once), e.g. `60s`.
    #[arg(long, value_parser = humantime::parse_duration)]
    search_lag: Option<Duration>,
    /// Answer 429, with the vendor's rate-limit headers, past this many API requests a minute.
    #[arg(long)]
    rate_limit: Option<u32>,
    /// POST a ticket-created webhook here for every new ticket, signed as the `--api` vendor
    /// signs (or with `Authorization: Bearer SECRET` where it does not sign).
    #[arg(long)]
    webhook_url: Option<String>,
    /// The secret webhooks are signed with.
    #[arg(long, default_value = "sandbox")]
    webhook_secret: String,
}

fn parse_dialect(s: &str) -> Result<String, String> {
    sandbox::api::dialect(s)
        .map(|d| d.name.to_string())
        .ok_or_else(|| {
            let names: Vec<&str> = sandbox::api::DIALECTS.iter().map(|d| d.name).collect();
            format!("unknown helpdesk API {s:?}; one of {}", names.join(", "))
        })
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("{s:?}: on or off")),
    }
}

fn parse_fault(s: &str) -> Result<(Stage, Fault), String> {
    sandbox::faults::parse_assignment(s)
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // One TLS stack, ring, for lettre, reqwest and the IMAP client alike.
    let _ = rustls::crypto::ring::default_provider().install_default();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mailcanary: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Sandbox(args) => run_sandbox(*args).await,
            Command::Run(args) => run(args).await,
            Command::Check(args) => Ok(check(args)),
            Command::Once(args) => once(args).await,
            Command::Incidents(args) => incidents(args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mailcanary: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter =
        EnvFilter::try_from_env("MAILCANARY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal, never into files or container logs.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// What SIGHUP does with the config on disk.
enum Reload {
    /// Valid: restart in place with it.
    Apply,
    /// Invalid, or a change that cannot be applied: keep running the old one.
    Refused(String),
    /// There is nothing to reload.
    Nothing(String),
}

/// Reads the config again and decides whether it can replace `current`.
fn reload_verdict(path: Option<&Path>, shard: Option<(u32, u32)>, current: &Config) -> Reload {
    let Some(path) = path else {
        return Reload::Nothing(
            "no --config: the embedded sandbox probe has nothing to reload".into(),
        );
    };
    let mut new = match load_config(Some(path)) {
        Ok(c) => c,
        Err(e) => return Reload::Refused(e),
    };
    if let Some((k, n)) = shard {
        new = new.shard(k, n);
    }
    let secret = |c: &Config| c.prober.secret.as_ref().map(|s| s.expose().to_string());
    if secret(&new) != secret(current) {
        // The new process would judge the canaries in flight by a key they were not signed
        // with, and count each one as forged.
        return Reload::Refused(
            "[prober] secret changed: the canaries in flight carry tokens signed with the old \
             one; restart mailcanary to apply a new secret"
                .into(),
        );
    }
    Reload::Apply
}

/// Replaces this process with a fresh run of the same binary and arguments: same PID, same
/// environment. Returns only on failure.
fn reexec() -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| "mailcanary".into());
    // /proc/self/exe still names the running binary if a package upgrade replaced the file.
    std::process::Command::new("/proc/self/exe")
        .arg0(arg0)
        .args(args)
        .exec()
}

enum Sig {
    Stop,
    Reload,
}

/// SIGHUP and `--web.config.file`: loads it again. A file that does not load is logged (once
/// per SIGHUP, with its line and key) and the one in use stays; false then.
fn reload_web(surface: &Surface) -> bool {
    let Some(path) = surface.path() else {
        return true;
    };
    match surface.reload() {
        Ok(()) => {
            tracing::info!(file = %path.display(), "SIGHUP: web config reloaded");
            true
        }
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: web config refused; still serving with the previous one, and the config is not reloaded until it loads");
            false
        }
    }
}

/// SIGTERM and Ctrl-C stop the daemon, SIGHUP reloads its config. Registered once at start:
/// SIGHUP's default action would otherwise end the process.
struct Signals {
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            hup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
        })
    }

    async fn next(&mut self) -> Sig {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => Sig::Stop,
            _ = self.term.recv() => Sig::Stop,
            _ = self.hup.recv() => Sig::Reload,
        }
    }
}

/// Resolves when SIGINT (Ctrl-C) or SIGTERM arrives.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

async fn run_sandbox(args: SandboxArgs) -> anyhow::Result<ExitCode> {
    let config = SandboxConfig {
        smtp_listen: args.smtp_listen,
        imap_listen: args.imap_listen,
        http_listen: args.http_listen,
        support_addresses: args.support_addresses,
        api_token: args.api_token,
        mailbox_password: args.mailbox_password,
        import_delay: args.import_delay,
        import_rate: args.import_rate,
        outbound_delay: args.outbound_delay,
        max_message_size: args.max_message_size,
        event_capacity: args.event_capacity,
        idle_push_delay: args.idle_delay.unwrap_or_default(),
        faults: args.faults,
        auto_ack: args.auto_ack,
        api: args.api,
        search_lag: args.search_lag.unwrap_or_default(),
        rate_limit: args.rate_limit,
        webhook_url: args.webhook_url,
        webhook_secret: args.webhook_secret,
        ..SandboxConfig::default()
    };
    let sb = Sandbox::start(config.clone())
        .await
        .context("starting the sandbox")?;
    // Plain stdout, one `key value` per line, so scripts and humans can both read it.
    say!("smtp {}", sb.smtp_addr);
    say!("imap {}", sb.imap_addr);
    say!("api {}", sb.api_url());
    say!("support {}", config.support_addresses.join(","));
    say!(
        "faults {}",
        sb.faults()
            .all()
            .iter()
            .map(|(s, f)| format!("{s}={f}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    say!(
        "dialect {} auto-ack {}",
        config.api,
        if config.acknowledges() { "on" } else { "off" }
    );
    tracing::info!(smtp = %sb.smtp_addr, imap = %sb.imap_addr, api = %sb.http_addr, "sandbox ready");
    shutdown_signal().await;
    tracing::info!("shutting down");
    sb.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

/// Loads `path`, or the embedded sandbox probe when there is none.
fn load_config(path: Option<&Path>) -> Result<Config, String> {
    match path {
        Some(p) => config::load(p).map_err(|e| e.to_string()),
        None => config::parse_str(config::SANDBOX_TOML, "probes/sandbox.toml (embedded)")
            .map_err(|e| e.to_string()),
    }
}

fn check(args: CheckArgs) -> ExitCode {
    let loaded = match (&args.config, args.syntax_only) {
        (Some(p), true) => config::load_syntax_only(p).map_err(|e| e.to_string()),
        _ => load_config(args.config.as_deref()),
    };
    match loaded {
        Ok(c) => {
            say!("ok: {} probe(s)", c.probes.len());
            for w in c.warnings() {
                eprintln!("warning: {w}");
            }
            for p in &c.probes {
                let stages: Vec<&str> = p.stages().iter().map(|s| s.as_str()).collect();
                say!(
                    "  {} ({}): {}",
                    p.name,
                    p.kind.as_str(),
                    stages.join(" -> ")
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let mut config = match load_config(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(2));
        }
    };
    let shard = match args.shard.map(resolve_shard).transpose() {
        Ok(shard) => shard,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(2));
        }
    };
    if let Some((k, n)) = shard {
        config = config.shard(k, n);
        tracing::info!(
            shard = k,
            shards = n,
            owned = config.probes.len(),
            configured = config.shard.map_or(0, |s| s.configured),
            "running one shard of the probes"
        );
    }
    for w in config.warnings() {
        tracing::warn!("config: {w}");
    }
    let surface = match Surface::new(args.web_config_file.clone()) {
        Ok(s) => std::sync::Arc::new(s),
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(2));
        }
    };
    // No config: the sandbox this probe talks to runs in-process, at its default addresses
    // (README, "The sandbox").
    let sandbox = match args.config {
        Some(_) => None,
        None => {
            let sb = Sandbox::start(SandboxConfig::default())
                .await
                .context("starting the embedded sandbox (are ports 2525, 1143, 8088 free?)")?;
            tracing::info!(smtp = %sb.smtp_addr, imap = %sb.imap_addr, api = %sb.http_addr, "embedded sandbox started");
            Some(sb)
        }
    };
    let state_dir = args
        .state_dir
        .or_else(|| config.prober.state_dir.clone())
        .unwrap_or_else(|| PathBuf::from(".mailcanary"));
    let listen = args.listen.unwrap_or(config.prober.listen);
    let tls = surface.current().tls.is_some();
    let daemon = Daemon::start_with(
        &config,
        Options {
            state_dir: state_dir.clone(),
            listen,
            schedule: true,
        },
        surface.clone(),
    )
    .await?;
    say!(
        "mailcanary listening on {}://{} ({} probe(s))",
        if tls { "https" } else { "http" },
        daemon.addr,
        daemon.prober.probes.len()
    );
    tracing::info!(listen = %daemon.addr, probes = daemon.prober.probes.len(), state_dir = %state_dir.display(), "mailcanary running");

    let mut signals = Signals::new()?;
    loop {
        match signals.next().await {
            Sig::Stop => break,
            Sig::Reload => match reload_verdict(args.config.as_deref(), shard, &config) {
                // A restart reads the web config again at start: one that does not load
                // would stop the prober there, so the config waits for a good one.
                _ if !reload_web(&surface) => {
                    daemon.engine.metrics().set_config_reload(false);
                }
                Reload::Apply => {
                    // The restart path is the one kill -9 is drilled against: every change is in
                    // the ledger, and the new process resumes the canaries in flight.
                    tracing::info!(
                        "SIGHUP: the new config is valid; restarting in place to apply it (same PID, in-flight canaries resume from the ledger, counters start again)"
                    );
                    daemon.stop().await;
                    let err = reexec();
                    tracing::error!(error = %err, "cannot re-execute mailcanary to apply the new config; exiting so the supervisor restarts it");
                    return Ok(ExitCode::from(1));
                }
                Reload::Refused(why) => {
                    daemon.engine.metrics().set_config_reload(false);
                    tracing::error!(error = %why, "SIGHUP: config reload refused; still running the previous config");
                }
                Reload::Nothing(why) => tracing::warn!("SIGHUP: {why}"),
            },
        }
    }
    tracing::info!("shutting down: no new canaries; in-flight ones stay in the ledger");
    daemon.stop().await;
    if let Some(sb) = sandbox {
        let _ = tokio::time::timeout(Duration::from_millis(500), sb.shutdown()).await;
    }
    Ok(ExitCode::SUCCESS)
}

/// `mailcanary incidents`: from `/api/v1/incidents` of a running prober, or the ledger of a
/// stopped one (the daemon holds its ledger exclusively while it runs).
async fn incidents(args: IncidentsArgs) -> anyhow::Result<ExitCode> {
    use mailcanary::flow::incident::{self, Incident};
    let (list, now, offset): (Vec<Incident>, u64, i64) = match &args.url {
        Some(url) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let url = format!("{}/api/v1/incidents", url.trim_end_matches('/'));
            let answer: serde_json::Value = reqwest::Client::new()
                .get(&url)
                .timeout(Duration::from_secs(10))
                .send()
                .await
                .and_then(|r| r.error_for_status())
                .map_err(|e| anyhow::anyhow!("{url}: {e}"))?
                .json()
                .await
                .map_err(|e| anyhow::anyhow!("{url}: not an incidents answer: {e}"))?;
            let list = serde_json::from_value(answer["incidents"].clone())
                .map_err(|e| anyhow::anyhow!("{url}: not an incidents answer: {e}"))?;
            (
                list,
                answer["now_ms"].as_u64().unwrap_or_default(),
                answer["wall_offset_ms"].as_i64().unwrap_or_default(),
            )
        }
        None => {
            let dir = args
                .state_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(".mailcanary"));
            let ledger = mailcanary::ledger::Ledger::open(&dir).map_err(|e| {
                anyhow::anyhow!(
                    "{e}\n(a running prober holds its ledger: ask it with --url http://ADDRESS)"
                )
            })?;
            let mut list = Vec::new();
            for probe in ledger.incident_probes()? {
                list.extend(ledger.incidents(&probe)?);
            }
            list.sort_by_key(|i| (!i.is_open(), std::cmp::Reverse(i.detected_ms)));
            (list, mailcanary::clock::wall_ms(), 0)
        }
    };
    let list: Vec<Incident> = list
        .into_iter()
        .filter(|i| {
            args.since
                .is_none_or(|s| i.detected_ms + s.as_millis() as u64 >= now)
        })
        .collect();
    match args.format {
        IncidentsFormat::Json => println!("{}", serde_json::to_string_pretty(&list)?),
        IncidentsFormat::Markdown => {
            println!("## Incidents recorded by mailcanary\n");
            if list.is_empty() {
                println!("None.");
            }
            for i in &list {
                println!("{}", incident::markdown(i, offset));
            }
        }
        IncidentsFormat::Text => {
            if list.is_empty() {
                println!("no incidents");
            }
            for i in &list {
                println!("{}", incident::text_line(i, offset));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn once(args: OnceArgs) -> anyhow::Result<ExitCode> {
    let nagios = args.format == OnceFormat::Nagios;
    // A plugin that cannot run reports UNKNOWN on stdout, where the monitoring system reads.
    let unknown = |why: &str| {
        if nagios {
            say!("MAILCANARY UNKNOWN - {}", why.lines().next().unwrap_or(why));
            eprintln!("{why}");
            ExitCode::from(3)
        } else {
            eprintln!("{why}");
            ExitCode::from(2)
        }
    };
    let mut config = match load_config(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => return Ok(unknown(&e)),
    };
    if let Some(name) = &args.probe {
        config.probes.retain(|p| &p.name == name);
        if config.probes.is_empty() {
            return Ok(unknown(&format!("no probe named {name:?} in the config")));
        }
    }
    let timeout = args.timeout.unwrap_or_else(|| {
        config
            .probes
            .iter()
            .map(|p| p.deadlines.end_to_end)
            .max()
            .unwrap_or(Duration::from_secs(60))
            + Duration::from_secs(10)
    });
    // A throwaway state dir: `once` must not disturb a daemon's ledger, nor inherit it. Without
    // a configured secret the key is generated there, so only this run's canaries verify.
    let state_dir = std::env::temp_dir().join(format!("mailcanary-once-{}", std::process::id()));
    let started = Daemon::start(
        &config,
        Options {
            state_dir: state_dir.clone(),
            listen: ([127, 0, 0, 1], 0).into(),
            schedule: false,
        },
    )
    .await;
    let mut daemon = match started {
        Ok(d) => d,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&state_dir);
            return Ok(unknown(&format!("{e:#}")));
        }
    };
    let mut events = daemon.engine.subscribe();
    // One run per canary: per probe and mailbox (named `probe/mailbox` when it has several).
    let mut keys: Vec<(usize, String)> = Vec::new();
    let mut runs: Vec<once::Run> = Vec::new();
    for (i, p) in daemon.prober.probes.iter().enumerate() {
        for m in &p.mailboxes {
            let label = if p.mailboxes.len() > 1 {
                format!("{}/{}", p.name, m.name)
            } else {
                p.name.clone()
            };
            keys.push((i, m.name.clone()));
            runs.push(once::Run::new(&label, &p.plan, &p.limits));
        }
    }
    daemon.send_once();
    let give_up = tokio::time::sleep(timeout);
    tokio::pin!(give_up);
    let mut timed_out = false;
    while runs.iter().any(|r| r.fate().is_none()) {
        let ev = tokio::select! {
            _ = &mut give_up => { timed_out = true; break; }
            ev = events.recv() => match ev {
                Ok(e) => e,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => break,
            },
        };
        let probes = &daemon.prober.probes;
        let Some(at) = keys.iter().position(|(i, m)| {
            probes[*i].name == ev.probe && ev.mailbox.as_ref().is_none_or(|e| e == m)
        }) else {
            continue;
        };
        let run = &mut runs[at];
        // Applied in both formats; printed as a timeline only in text.
        if let Some(line) = run.apply(&ev)
            && !nagios
        {
            say!("{line}");
        }
    }
    // Clean up what was sent: the finished canaries' clean-up is under way (message by UID,
    // ticket by the API); a canary that failed still has its ticket, if one was found.
    let engine = daemon.engine.clone();
    let cleanup = async {
        for ((i, _), r) in keys.iter().zip(&runs) {
            let p = &daemon.prober.probes[*i];
            if let Some(c) = r.canary.as_deref().and_then(|id| engine.find(&p.name, id))
                && !c.is_finished()
            {
                mailcanary::flow::clean_up_ticket(p, &c).await;
            }
        }
        while daemon
            .prober
            .probes
            .iter()
            .any(|p| p.cleanups_pending() > 0)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(10), cleanup)
        .await
        .is_err()
    {
        tracing::warn!(
            "once: clean-up did not finish within 10 s; something of this canary may be left behind"
        );
    }
    let verdict = once::verdict(&runs, timed_out, timeout);
    if nagios {
        say!("{}", verdict.nagios_line(&runs));
    } else {
        if timed_out {
            say!(
                "gave up waiting after {}",
                humantime::format_duration(timeout)
            );
        }
        for r in &runs {
            say!("{:<12} {:<11} {}", r.probe, "finished", r.summary());
        }
    }
    daemon.stop().await;
    let _ = std::fs::remove_dir_all(&state_dir);
    Ok(ExitCode::from(if nagios {
        verdict.nagios_code()
    } else {
        u8::from(verdict.status != once::Status::Ok && verdict.status != once::Status::Warning)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_k_of_n_or_auto_of_n() {
        assert_eq!(parse_shard("2/3"), Ok((Some(2), 3)));
        assert_eq!(parse_shard("auto/3"), Ok((None, 3)));
        assert!(parse_shard("3/3").is_err());
        assert!(parse_shard("auto/0").is_err());
        assert!(parse_shard("x/3").is_err());
        assert!(parse_shard("3").is_err());
    }

    #[test]
    fn a_statefulset_pods_hostname_gives_its_ordinal() {
        assert_eq!(hostname_ordinal("mailcanary-2"), Some(2));
        assert_eq!(hostname_ordinal("mc-probe-10\n"), Some(10));
        assert_eq!(hostname_ordinal("mailcanary"), None);
        assert_eq!(hostname_ordinal("mailcanary-"), None);
        assert_eq!(hostname_ordinal("mailcanary-7f9c6d-x2kq"), None);
    }
}
