//! Configuration: TOML files (one, or a directory of them) → a validated [`Config`].
//!
//! Two forms, as in ripgrep's low-level/high-level args:
//! - [`raw`] mirrors the file with serde (unknown keys are errors, values keep their spans);
//! - `resolve` turns it into the types below, which the rest of the program trusts:
//!   durations are [`Duration`]s, choices are enums, defaults are filled in, secrets are read,
//!   and every cross-field rule holds.
//!
//! Every problem found is reported, not only the first ([`ConfigErrors`]); each names its
//! file, line, column and key (`probes/a.toml:12:8: probe[0].smtp.port: must not be 0`).
//!
//! Relative paths in a file (`state_dir`, `*_file`, `ca_file`) are relative to the directory of
//! that file, as in Prometheus: a config directory works wherever it is mounted. With
//! [`parse_str`] they are relative to the working directory.
//!
//! Architecture Invariant: this module imports nothing else of the crate. Reading a secret file
//! or checking that a `ca_file` exists is the only I/O it does, and only while loading.

mod error;
pub mod raw;
mod resolve;
mod secret;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use error::{ConfigError, ConfigErrors, Position};
pub use secret::Secret;

/// The embedded default config: one helpdesk probe against the in-process sandbox at its
/// default addresses. `mailcanary run` with no `--config` uses it.
pub const SANDBOX_TOML: &str = include_str!("../../probes/sandbox.toml");

/// Default HTTP listen address of the prober (metrics, health, dashboard).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9725";

/// The whole, validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub prober: ProberSettings,
    /// In file order, files sorted by name. Names are unique.
    pub probes: Vec<ProbeConfig>,
    /// Set by [`Config::shard`]: which share of the configured probes these are.
    pub shard: Option<ShardOf>,
}

/// Shard `k` of `n`, of a config of `configured` probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardOf {
    pub k: u32,
    pub n: u32,
    pub configured: usize,
}

/// The `[prober]` table: process-wide settings (at most one file of a directory sets it).
#[derive(Debug, Clone, PartialEq)]
pub struct ProberSettings {
    /// HTTP listen address; default [`DEFAULT_LISTEN`]. The CLI's `--listen` overrides it.
    pub listen: SocketAddr,
    /// The CLI's `--state-dir` overrides it; with neither, the CLI picks a default.
    pub state_dir: Option<PathBuf>,
    /// HMAC key for canary tokens; `None` means "generate one and keep it in the state dir".
    pub secret: Option<Secret>,
    /// Name used in Message-IDs and EHLO; `None` means the machine's hostname.
    pub hostname: Option<String>,
}

impl Default for ProberSettings {
    fn default() -> Self {
        ProberSettings {
            listen: DEFAULT_LISTEN
                .parse()
                .expect("valid default listen address"),
            state_dir: None,
            secret: None,
            hostname: None,
        }
    }
}

/// One `[[probe]]`: a canary flow sent every `interval`.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeConfig {
    /// `[a-z0-9_-]{1,64}`, unique; used as the `probe` metric label.
    pub name: String,
    pub kind: ProbeKind,
    /// Time between two canaries (>= 1 s).
    pub interval: Duration,
    /// Sends are `interval` ± `jitter / 2` apart (the first after a random `[0, jitter]`, so
    /// many probes do not start at once); `jitter < interval`.
    pub jitter: Duration,
    /// Canaries in flight at most; at the limit a new canary is skipped (and counted).
    pub max_in_flight: usize,
    /// Past this age an unfinished canary is lost; greater than every deadline.
    pub lost_after: Duration,
    /// Delete the canary's ticket and reply once it completes (master switch: when false,
    /// nothing is archived or deleted whatever `helpdesk.cleanup` says).
    pub cleanup: bool,
    /// A dead man's switch (healthchecks.io style): GET after each on-time canary, GET
    /// `…/fail` when the probe starts failing. A secret: whoever has it can ping it.
    pub heartbeat_url: Option<Secret>,
    /// Extra trusted roots (PEM) for the heartbeat endpoint, beside the built-in web PKI
    /// roots (a self-hosted Healthchecks behind a private CA).
    pub heartbeat_ca_file: Option<PathBuf>,
    pub deadlines: Deadlines,
    pub smtp: SmtpConfig,
    /// `Some` exactly when `kind` is [`ProbeKind::Helpdesk`].
    pub helpdesk: Option<HelpdeskConfig>,
    /// The watched mailboxes, at least one: `[probe.imap]` is one named
    /// [`MailboxConfig::DEFAULT_NAME`], `[[probe.mailbox]]` any number. Each canary is for one.
    pub mailboxes: Vec<MailboxConfig>,
    /// A canary found in a Junk folder counts as delivered (placement still counted).
    pub junk_is_ok: bool,
    /// `require_tls_hops`, `require_auth`, `trusted_authserv_ids`, `require_verified`.
    pub route_rules: crate::canary::hops::RouteRules,
    /// `verify_dkim = true`: `Some`, with `dns_resolver` (`None`: the system's resolver).
    pub verify_dkim: Option<Option<std::net::SocketAddr>>,
}

/// One watched mailbox of a probe.
#[derive(Debug, Clone, PartialEq)]
pub struct MailboxConfig {
    /// The `mailbox` metric label; never an address.
    pub name: String,
    /// The address it receives (`[[probe.mailbox]] address`): a mail loop's recipient, a
    /// helpdesk probe's requester. `None` for `[probe.imap]`, where `smtp.to` / `smtp.from`
    /// say it.
    pub address: Option<String>,
    pub imap: ImapConfig,
}

impl MailboxConfig {
    /// The name of the one mailbox of `[probe.imap]`.
    pub const DEFAULT_NAME: &'static str = "default";
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeKind {
    /// SMTP in → helpdesk ticket → agent reply → IMAP out.
    Helpdesk,
    /// SMTP in → IMAP out, no helpdesk.
    MailLoop,
}

impl ProbeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeKind::Helpdesk => "helpdesk",
            ProbeKind::MailLoop => "mail_loop",
        }
    }
}

/// The stages of a canary: the one shared type from the pure core, under the name the config
/// has always used for "which deadline".
pub use crate::canary::life::Stage as StageName;

/// Per-stage deadlines. Past its deadline a stage is overdue (a failure), not yet lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deadlines {
    pub submit: Duration,
    pub import: Duration,
    pub reply: Duration,
    pub delivery: Duration,
    /// Defaults to the sum of the deadlines of the stages the probe uses.
    pub end_to_end: Duration,
    /// Stages whose deadline is `"auto"`: learned from recent on-time durations, between
    /// `auto_min` and `auto_max` (their fixed value above is `auto_max`, the deadline until
    /// enough has been seen).
    pub auto: Vec<StageName>,
    pub auto_min: Duration,
    pub auto_max: Duration,
    /// `end_to_end` was not given: it follows the sum of the stage deadlines, learned ones too.
    pub end_to_end_is_sum: bool,
}

impl Deadlines {
    pub const DEFAULT_SUBMIT: Duration = Duration::from_secs(30);
    pub const DEFAULT_IMPORT: Duration = Duration::from_secs(60);
    pub const DEFAULT_REPLY: Duration = Duration::from_secs(30);
    pub const DEFAULT_DELIVERY: Duration = Duration::from_secs(60);
    pub const DEFAULT_AUTO_MIN: Duration = Duration::from_secs(10);
    pub const DEFAULT_AUTO_MAX: Duration = Duration::from_secs(600);

    pub fn get(&self, stage: StageName) -> Duration {
        match stage {
            StageName::Submit => self.submit,
            StageName::Import => self.import,
            StageName::Reply => self.reply,
            StageName::Delivery => self.delivery,
            StageName::EndToEnd => self.end_to_end,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
pub enum Tls {
    /// Plain TCP (loopback, test setups).
    #[serde(rename = "none")]
    None,
    /// Plain connect, then STARTTLS (required: no fallback to plain text).
    #[serde(rename = "starttls")]
    StartTls,
    /// TLS from the first byte (SMTPS 465, IMAPS 993).
    #[serde(rename = "tls")]
    Tls,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SmtpConfig {
    pub host: String,
    /// Default by `tls`: none 25, starttls 587, tls 465.
    pub port: u16,
    pub tls: Tls,
    /// With a username, a password is required.
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// Extra trusted roots (PEM) on top of the built-in web PKI roots.
    pub ca_file: Option<PathBuf>,
    /// Envelope and header From of the canary.
    pub from: String,
    /// Envelope and header To: the helpdesk's support address, or the looped mailbox.
    pub to: String,
    pub timeout: Duration,
    pub helo_name: Option<String>,
    /// AUTH with an OAuth2 token instead of `password` (`username` required).
    pub oauth2: Option<OAuth2Config>,
}

/// `[probe.smtp.oauth2]` / `[probe.imap.oauth2]`: which SASL mechanism, and where the bearer
/// token comes from.
#[derive(Debug, Clone, PartialEq)]
pub struct OAuth2Config {
    pub mechanism: OAuth2Mechanism,
    pub source: OAuth2Source,
    /// Extra trusted roots (PEM) for the token endpoint, beside the built-in web PKI roots
    /// (an identity provider behind a private CA). Always `None` with a token file.
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum OAuth2Mechanism {
    #[serde(rename = "xoauth2")]
    XOAuth2,
    /// RFC 7628.
    #[serde(rename = "oauthbearer")]
    OAuthBearer,
}

#[derive(Debug, Clone, PartialEq)]
pub enum OAuth2Source {
    /// A token another process keeps fresh in this file.
    TokenFile(PathBuf),
    /// `grant_type=client_credentials` (Microsoft 365 app-only).
    ClientCredentials {
        token_endpoint: String,
        client_id: String,
        client_secret: Secret,
        scope: Option<String>,
    },
    /// `grant_type=refresh_token` (Gmail with your own OAuth client).
    RefreshToken {
        token_endpoint: String,
        client_id: String,
        client_secret: Secret,
        refresh_token: Secret,
        scope: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HelpdeskApi {
    #[serde(rename = "supportbee")]
    SupportBee,
    /// Request Tracker 5, REST2.
    #[serde(rename = "rt")]
    Rt,
    /// django-helpdesk 2.x, its DRF API.
    #[serde(rename = "django-helpdesk")]
    DjangoHelpdesk,
    /// Zendesk Support, its REST API v2.
    #[serde(rename = "zendesk")]
    Zendesk,
    /// Front (frontapp.com), its Core API.
    #[serde(rename = "front")]
    Front,
    /// Any helpdesk with an HTTP API, described in `[probe.helpdesk.http]`.
    #[serde(rename = "http")]
    Http,
    /// Zammad, its REST API (`/api/v1`).
    #[serde(rename = "zammad")]
    Zammad,
    /// Help Scout's Mailbox API 2.0 (OAuth2 client credentials).
    #[serde(rename = "helpscout")]
    HelpScout,
    /// Freshdesk, its API v2.
    #[serde(rename = "freshdesk")]
    Freshdesk,
}

impl HelpdeskApi {
    /// Every adapter the config knows.
    pub const ALL: [HelpdeskApi; 9] = [
        HelpdeskApi::SupportBee,
        HelpdeskApi::Rt,
        HelpdeskApi::DjangoHelpdesk,
        HelpdeskApi::Zendesk,
        HelpdeskApi::Front,
        HelpdeskApi::Http,
        HelpdeskApi::Zammad,
        HelpdeskApi::HelpScout,
        HelpdeskApi::Freshdesk,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HelpdeskApi::SupportBee => "supportbee",
            HelpdeskApi::Rt => "rt",
            HelpdeskApi::DjangoHelpdesk => "django-helpdesk",
            HelpdeskApi::Zendesk => "zendesk",
            HelpdeskApi::Front => "front",
            HelpdeskApi::Http => "http",
            HelpdeskApi::Zammad => "zammad",
            HelpdeskApi::HelpScout => "helpscout",
            HelpdeskApi::Freshdesk => "freshdesk",
        }
    }
}

/// How the reply stage happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyMode {
    /// The prober posts an agent reply through the API (the reply stage is timed).
    Post,
    /// The helpdesk auto-replies by itself (no reply stage; delivery starts at import).
    Auto,
}

/// What happens to a finished canary's ticket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cleanup {
    Archive,
    Trash,
    Delete,
    None,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HelpdeskConfig {
    pub api: HelpdeskApi,
    /// An `http` or `https` URL with a host.
    pub base_url: reqwest::Url,
    pub token: Secret,
    /// Shared secret that authenticates `POST /webhooks/{probe}`; `None` refuses webhooks for
    /// this probe (import is then observed by polling only).
    pub webhook_secret: Option<Secret>,
    pub poll_interval: Duration,
    pub reply: ReplyMode,
    /// Text of the agent reply; `None` lets the prober choose it.
    pub reply_body: Option<String>,
    pub cleanup: Cleanup,
    pub timeout: Duration,
    /// Extra trusted roots (PEM) for the API, beside the built-in web PKI roots (a self-hosted
    /// helpdesk behind a private CA).
    pub ca_file: Option<PathBuf>,
    /// What `[probe.helpdesk.<api>]` said (defaults when it is absent).
    pub vendor: VendorConfig,
}

/// Settings of one vendor only, from `[probe.helpdesk.<api>]`: the adapters' own type, so a
/// vendor's settings are declared once, beside its adapter.
pub use crate::edges::helpdesk::VendorSettings as VendorConfig;

#[derive(Debug, Clone, PartialEq)]
pub struct ImapConfig {
    pub host: String,
    /// Default by `tls`: none/starttls 143, tls 993.
    pub port: u16,
    pub tls: Tls,
    pub username: String,
    /// Empty when `oauth2` is set.
    pub password: Secret,
    /// AUTHENTICATE with an OAuth2 token instead of LOGIN with `password`.
    pub oauth2: Option<OAuth2Config>,
    pub mailbox: String,
    pub ca_file: Option<PathBuf>,
    /// Use IDLE when offered; false forces polling.
    pub idle: bool,
    /// Polling interval (when IDLE is off or not offered).
    pub poll_interval: Duration,
    pub timeout: Duration,
    /// The Junk folder watched beside `mailbox`.
    pub junk: Junk,
}

impl ImapConfig {
    /// Which mailbox these settings watch: one watcher (one connection) per key, shared by
    /// every probe that reads it; also the key of its saved IMAP cursor.
    pub fn watch_key(&self) -> String {
        format!(
            "{}@{}:{}/{}",
            self.username, self.host, self.port, self.mailbox
        )
    }
}

/// Which folder of a mailbox is its Junk folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Junk {
    /// The one LIST marks `\Junk` (RFC 6154); none watched if no folder is marked.
    SpecialUse,
    /// This folder (it must exist).
    Named(String),
    /// None is watched.
    Off,
}

impl ProbeConfig {
    /// The stages this probe goes through, in order, ending with `EndToEnd`.
    pub fn stages(&self) -> Vec<StageName> {
        stages_for(self.kind, self.helpdesk.as_ref().map(|h| h.reply))
    }
}

/// Stages for a kind (and, for helpdesk probes, a reply mode); shared with the resolver,
/// which needs them before a [`ProbeConfig`] exists.
fn stages_for(kind: ProbeKind, reply: Option<ReplyMode>) -> Vec<StageName> {
    use StageName::*;
    match (kind, reply) {
        (ProbeKind::MailLoop, _) => vec![Submit, Delivery, EndToEnd],
        (ProbeKind::Helpdesk, Some(ReplyMode::Auto)) => vec![Submit, Import, Delivery, EndToEnd],
        (ProbeKind::Helpdesk, _) => vec![Submit, Import, Reply, Delivery, EndToEnd],
    }
}

impl Config {
    pub fn probe(&self, name: &str) -> Option<&ProbeConfig> {
        self.probes.iter().find(|p| p.name == name)
    }

    /// Settings that load but would make the prober blame a stage for its own blindness. Each
    /// names the probe, the keys and what to change. `check` prints them; `run` logs them once.
    pub fn warnings(&self) -> Vec<String> {
        let hd = |d: Duration| humantime::format_duration(d).to_string();
        let mut out = Vec::new();
        for p in &self.probes {
            let d = &p.deadlines;
            for m in &p.mailboxes {
                let i = &m.imap;
                // `imap` for the one mailbox of `[probe.imap]`, the mailbox's name otherwise.
                let at = match &m.address {
                    None => "imap".to_string(),
                    Some(_) => format!("mailbox {:?}: imap", m.name),
                };
                // The watcher ends IDLE every half deadline; a dead connection then costs one
                // `timeout` more before the reconnect and catch-up.
                if i.timeout * 2 > d.delivery {
                    out.push(format!(
                        "probe {:?}: {at}.timeout ({}) is more than half of deadlines.delivery \
                         ({}): a mailbox connection that dies silently is noticed only after \
                         canaries went overdue; keep {at}.timeout under {}",
                        p.name,
                        hd(i.timeout),
                        hd(d.delivery),
                        hd(d.delivery / 2)
                    ));
                }
                if !i.idle && i.poll_interval >= d.delivery {
                    out.push(format!(
                        "probe {:?}: {at}.poll_interval ({}) is not shorter than \
                         deadlines.delivery ({}) and idle is off: canaries go overdue before a \
                         poll can see them",
                        p.name,
                        hd(i.poll_interval),
                        hd(d.delivery)
                    ));
                }
            }
            if let Some(h) = &p.helpdesk
                && h.webhook_secret.is_none()
                && h.poll_interval >= d.import
            {
                out.push(format!(
                    "probe {:?}: helpdesk.poll_interval ({}) is not shorter than \
                     deadlines.import ({}) and no webhook is set: canaries go overdue before a \
                     poll can see their ticket",
                    p.name,
                    hd(h.poll_interval),
                    hd(d.import)
                ));
            }
        }
        out
    }

    /// The probes of shard `k` of `n` (`--shard K/N`): those whose [`shard_index`] is `k`.
    /// Every probe is in exactly one shard, and stays there while `n` does not change.
    ///
    /// # Panics
    /// If `n == 0` or `k >= n` (the CLI validates `K/N` first).
    pub fn shard(&self, k: u32, n: u32) -> Config {
        assert!(n > 0 && k < n, "invalid shard {k}/{n}");
        Config {
            prober: self.prober.clone(),
            probes: self
                .probes
                .iter()
                .filter(|p| shard_index(&p.name, n) == k)
                .cloned()
                .collect(),
            shard: Some(ShardOf {
                k,
                n,
                configured: self.probes.len(),
            }),
        }
    }
}

/// The shard (`0..n`) a probe name belongs to: 64-bit FNV-1a of the name, modulo `n`.
/// FNV-1a, not `std`'s hasher, because it must never change between builds or replicas.
pub fn shard_index(name: &str, n: u32) -> u32 {
    assert!(n > 0, "shard count must be positive");
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in name.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % u64::from(n)) as u32
}

/// Loads a config file, or every `*.toml` file of a directory (sorted by name, not recursive;
/// other files and dot-files are ignored). Reports every error found.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    resolve::load(path, &|name| std::env::var(name).ok())
}

/// Like [`load`], but checks only what the files themselves say: secrets are not read from
/// the environment or their files (a `${VAR}` must still be well formed) and a `ca_file` need
/// not exist. For a config written for another machine, linted where it is kept.
pub fn load_syntax_only(path: &Path) -> Result<Config, ConfigErrors> {
    resolve::load_with(path, &|name| std::env::var(name).ok(), true)
}

/// Parses one config text; `origin` names it in errors. Relative paths are relative to the
/// working directory.
pub fn parse_str(text: &str, origin: &str) -> Result<Config, ConfigErrors> {
    resolve::resolve_files(&[resolve::FileText::new(origin, text, None)], &|name| {
        std::env::var(name).ok()
    })
}

/// The embedded sandbox config ([`SANDBOX_TOML`]), resolved.
pub fn sandbox_default() -> Config {
    parse_str(SANDBOX_TOML, "probes/sandbox.toml")
        .unwrap_or_else(|e| panic!("embedded probes/sandbox.toml is invalid:\n{e}"))
}
