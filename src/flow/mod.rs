//! The flow: turns a resolved [`Config`] into running probes.
//!
//! - the **scheduler** (one task per probe) owns interval, jitter and the concurrency limit;
//! - a **run** (`run.rs`, one task per canary) owns submit → import → reply over the edges;
//! - a **mailbox dispatcher** (one task per watched mailbox, shared by every probe reading it)
//!   recognises arrivals and completes the delivery stage;
//! - the **ticker** moves time forward for every canary (deadlines, lost) and refreshes gauges.
//!
//! All four report to the [`Engine`], the only thing that changes a canary.

pub mod engine;
pub mod heartbeat;
pub mod history;
pub mod incident;
pub mod run;
pub mod webhook;

use std::{collections::HashMap, path::Path, sync::Arc, time::Duration};

use lettre::message::Mailbox;
use tokio::{
    sync::{mpsc, watch},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use engine::{Engine, Event, now_ms};

use crate::{
    canary::{
        Classified, Inspected, Key, classify,
        hops::{AuthMethod, AuthResult, Verdict},
        inspect,
        life::{Folder, Limits, Stage},
    },
    config::{Config, Junk, ProbeConfig, ProbeKind, ReplyMode, Tls},
    edges::{
        helpdesk::{self, CleanupMode, Helpdesk},
        imap::{self, ImapTarget, WatchCommand, WatchEvent},
        smtp::{SmtpTarget, Submitter},
    },
    metrics::{Ignored, Skipped},
};

/// A probe ready to run: its config resolved into edges and limits.
pub struct Probe {
    pub name: String,
    pub key: Key,
    pub hostname: String,
    /// The watched mailboxes, in config order; each send makes one canary for each.
    pub mailboxes: Vec<ProbeMailbox>,
    /// A canary delivered into Junk does not fail the probe (its placement is still counted).
    pub junk_is_ok: bool,
    /// What the probe requires of a delivered mail's hops and verdicts, and whose verdicts
    /// it trusts.
    pub route_rules: crate::canary::hops::RouteRules,
    /// `verify_dkim`: the probe's own DKIM/ARC check, and the slots bounding how many run at
    /// once (an arrival finding none free is `temperror`, delivered at once).
    pub verifier: Option<Arc<crate::edges::dkim::Verifier>>,
    pub verify_slots: Arc<tokio::sync::Semaphore>,
    pub plan: Vec<Stage>,
    pub limits: Limits,
    /// The stages whose deadline is learned (`"auto"`), if any.
    pub auto: Option<engine::AutoDeadlines>,
    pub interval: Duration,
    pub jitter: Duration,
    pub max_in_flight: usize,
    pub cleanup: Option<CleanupMode>,
    pub delete_delivered: bool,
    pub reply: ReplyMode,
    /// The operator's reply text, if configured (the token is appended to it).
    pub reply_body: Option<String>,
    /// Shared secret of `POST /webhooks/{probe}`; webhooks are refused without one.
    pub webhook_secret: Option<String>,
    /// How that webhook is authenticated: the vendor's signature scheme, or the bearer secret.
    pub webhook_verify: crate::edges::helpdesk::webhook::Verifier,
    pub poll_interval: Duration,
    pub submitter: Submitter,
    pub helpdesk: Option<Arc<Helpdesk>>,
    /// Clean-ups begun and not yet done (a delete the watcher has not carried out, a ticket
    /// call still running): `once` waits for them before it exits.
    cleanups: std::sync::atomic::AtomicUsize,
    /// `(watched folder, uidvalidity, uid)` of this probe's deletes the watcher has not
    /// reported done (by folder: two mailboxes made in the same second can share a
    /// UIDVALIDITY, and then their UIDs too).
    deleting: std::sync::Mutex<std::collections::HashSet<(String, u32, u32)>>,
    /// The engine's metrics, for what the clean-up finds (duplicate tickets).
    metrics: std::sync::OnceLock<Arc<crate::metrics::Metrics>>,
    /// The dead man's switch this probe pings (`heartbeat_url`), if any.
    pub heartbeat_url: Option<crate::config::Secret>,
    /// Roots trusted beside the web's for it (`heartbeat_ca_file`).
    heartbeat_roots: Option<Vec<u8>>,
}

/// One watched mailbox of a probe: where its canaries go and the watchers that see them.
pub struct ProbeMailbox {
    /// The config's name: the `mailbox` label and the canary's `mailbox`.
    pub name: String,
    /// The canary's sender and recipient for this mailbox (a mail loop sends to the mailbox's
    /// address, a helpdesk probe from it: the requester the reply goes to).
    pub from: Mailbox,
    pub to: Mailbox,
    imap: crate::config::ImapConfig,
    /// The watched inbox's key ([`crate::config::ImapConfig::watch_key`]) and the Junk
    /// folder's, if one is watched.
    pub inbox_key: String,
    pub junk_key: Option<String>,
    inbox_commands: std::sync::OnceLock<mpsc::Sender<WatchCommand>>,
    junk_commands: std::sync::OnceLock<mpsc::Sender<WatchCommand>>,
    /// True once the folder's watcher has selected it (or failed, or found no Junk folder).
    inbox_ready: std::sync::OnceLock<watch::Receiver<bool>>,
    junk_ready: std::sync::OnceLock<watch::Receiver<bool>>,
}

impl ProbeMailbox {
    fn key(&self, folder: Folder) -> Option<&str> {
        match folder {
            Folder::Inbox => Some(&self.inbox_key),
            Folder::Junk => self.junk_key.as_deref(),
        }
    }

    fn commands(&self, folder: Folder) -> &std::sync::OnceLock<mpsc::Sender<WatchCommand>> {
        match folder {
            Folder::Inbox => &self.inbox_commands,
            Folder::Junk => &self.junk_commands,
        }
    }

    fn ready(&self, folder: Folder) -> &std::sync::OnceLock<watch::Receiver<bool>> {
        match folder {
            Folder::Inbox => &self.inbox_ready,
            Folder::Junk => &self.junk_ready,
        }
    }

    /// Waits (at most the mailbox's IMAP timeout) until its watchers have selected their
    /// folders. A fresh watcher starts at the folder's UIDNEXT, so a canary delivered before
    /// that would never be seen: at start-up the first canary raced the watchers' login (and
    /// the Junk watcher's LIST), and lost when it was fast. A watcher that cannot connect is
    /// not waited for longer than its timeout: its failure is the mailbox's verdict.
    pub async fn watchers_ready(&self) {
        let wait = async {
            for folder in Folder::ALL {
                if let Some(rx) = self.ready(folder).get() {
                    let _ = rx.clone().wait_for(|ready| *ready).await;
                }
            }
        };
        let _ = tokio::time::timeout(self.imap.timeout, wait).await;
    }
}

impl Probe {
    /// The mailbox a canary is for (a record from before mailboxes: the first).
    pub fn mailbox_of(&self, c: &crate::canary::life::Canary) -> Option<&ProbeMailbox> {
        match &c.mailbox {
            Some(name) => self.mailboxes.iter().find(|m| &m.name == name),
            None => self.mailboxes.first(),
        }
    }

    /// Whether delivery is the agent reply this prober posts (so an acknowledgement must not
    /// end it), rather than the helpdesk's auto-reply or the canary itself.
    pub fn expects_posted_reply(&self) -> bool {
        self.reply == ReplyMode::Post && self.plan.contains(&Stage::Reply)
    }

    /// Clean-ups begun and not yet done.
    pub fn cleanups_pending(&self) -> usize {
        self.cleanups.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// True if `(uid_validity, uid)` in the folder `key` was a delete of this probe's, now
    /// done.
    fn forget_delete(&self, key: &str, uid_validity: u32, uid: u32) -> bool {
        self.deleting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(key.to_string(), uid_validity, uid))
    }

    fn cleanup_begun(&self) {
        self.cleanups
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    fn cleanup_done(&self) {
        let _ = self.cleanups.fetch_update(
            std::sync::atomic::Ordering::SeqCst,
            std::sync::atomic::Ordering::SeqCst,
            |n| n.checked_sub(1),
        );
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

fn read_roots(path: Option<&Path>) -> anyhow::Result<Option<Vec<u8>>> {
    match path {
        None => Ok(None),
        Some(p) => Ok(Some(std::fs::read(p).map_err(|e| {
            anyhow::anyhow!("reading CA file {}: {e}", p.display())
        })?)),
    }
}

fn tls_mode(t: Tls) -> crate::edges::TlsMode {
    use crate::edges::TlsMode;
    match t {
        Tls::None => TlsMode::None,
        Tls::StartTls => TlsMode::StartTls,
        Tls::Tls => TlsMode::Tls,
    }
}

impl Probe {
    pub fn build(cfg: &ProbeConfig, key: &Key, hostname: &str) -> anyhow::Result<Probe> {
        let d = &cfg.deadlines;
        let limits = Limits {
            submit_ms: ms(d.submit),
            import_ms: ms(d.import),
            reply_ms: ms(d.reply),
            delivery_ms: ms(d.delivery),
            end_to_end_ms: ms(d.end_to_end),
            lost_after_ms: ms(cfg.lost_after),
        };
        let plan: Vec<Stage> = cfg
            .stages()
            .into_iter()
            .filter(|s| *s != Stage::EndToEnd)
            .collect();
        // Learned deadlines are never tighter than what the probe can see: twice the helpdesk
        // poll for import, twice the IMAP poll for delivery when IDLE is off.
        let auto = (!d.auto.is_empty()).then(|| engine::AutoDeadlines {
            stages: d
                .auto
                .iter()
                .map(|s| {
                    let floor = match s {
                        Stage::Import => {
                            cfg.helpdesk.as_ref().map_or(0, |h| 2 * ms(h.poll_interval))
                        }
                        Stage::Delivery => cfg
                            .mailboxes
                            .iter()
                            .filter(|m| !m.imap.idle)
                            .map(|m| 2 * ms(m.imap.poll_interval))
                            .max()
                            .unwrap_or(0),
                        _ => 0,
                    };
                    (*s, floor)
                })
                .collect(),
            min_ms: ms(d.auto_min),
            max_ms: ms(d.auto_max),
            plan: plan.clone(),
            end_to_end_is_sum: d.end_to_end_is_sum,
        });
        let smtp = &cfg.smtp;
        let submitter = Submitter::new(SmtpTarget {
            host: smtp.host.clone(),
            port: smtp.port,
            tls: tls_mode(smtp.tls),
            credentials: smtp
                .username
                .clone()
                .zip(smtp.password.as_ref().map(|p| p.expose().to_string())),
            oauth2: match (&smtp.oauth2, &smtp.username) {
                (Some(o), Some(user)) => Some((user.clone(), oauth2_login(o, smtp.timeout)?)),
                _ => None,
            },
            extra_roots_pem: read_roots(smtp.ca_file.as_deref())?,
            timeout: smtp.timeout,
            helo_name: smtp.helo_name.clone(),
        })
        .map_err(|e| anyhow::anyhow!("probe {}: smtp: {e}", cfg.name))?;
        let (reply_body, webhook_secret) = match &cfg.helpdesk {
            Some(h) => (
                h.reply_body.clone(),
                h.webhook_secret.as_ref().map(|s| s.expose().to_string()),
            ),
            None => (None, None),
        };
        let (helpdesk, reply, poll_interval, cleanup) = match &cfg.helpdesk {
            Some(h) => (
                Some(Arc::new(
                    helpdesk::build(helpdesk::Settings {
                        base_url: h.base_url.to_string(),
                        secret: h.token.expose().to_string(),
                        timeout: h.timeout,
                        retry: helpdesk::RetryPolicy::default(),
                        extra_roots_pem: read_roots(h.ca_file.as_deref())?,
                        vendor: h.vendor.clone(),
                    })
                    .map_err(|e| anyhow::anyhow!("probe {}: helpdesk: {e}", cfg.name))?,
                )),
                h.reply,
                h.poll_interval,
                cfg.cleanup.then(|| cleanup_mode(h.cleanup)).flatten(),
            ),
            None => (None, ReplyMode::Auto, Duration::from_secs(1), None),
        };
        let parse = |what: &str, a: &str| -> anyhow::Result<Mailbox> {
            a.parse()
                .map_err(|e| anyhow::anyhow!("probe {}: {what}: {e}", cfg.name))
        };
        let mut mailboxes = Vec::new();
        for m in &cfg.mailboxes {
            // `[probe.imap]`: the SMTP envelope says it all; `[[probe.mailbox]]`: the mailbox's
            // address is a mail loop's recipient and a helpdesk probe's requester.
            let (from, to) = match (&m.address, cfg.kind) {
                (None, _) => (parse("smtp.from", &smtp.from)?, parse("smtp.to", &smtp.to)?),
                (Some(a), ProbeKind::MailLoop) => (
                    parse("smtp.from", &smtp.from)?,
                    parse("mailbox.address", a)?,
                ),
                (Some(a), ProbeKind::Helpdesk) => {
                    (parse("mailbox.address", a)?, parse("smtp.to", &smtp.to)?)
                }
            };
            let junk_key = match &m.imap.junk {
                Junk::Off => None,
                Junk::SpecialUse => Some(junk_target(&m.imap, imap::SPECIAL_USE_JUNK)),
                Junk::Named(n) => Some(junk_target(&m.imap, n)),
            }
            .map(|i| i.watch_key());
            mailboxes.push(ProbeMailbox {
                name: m.name.clone(),
                from,
                to,
                inbox_key: m.imap.watch_key(),
                junk_key,
                imap: m.imap.clone(),
                inbox_commands: std::sync::OnceLock::new(),
                junk_commands: std::sync::OnceLock::new(),
                inbox_ready: std::sync::OnceLock::new(),
                junk_ready: std::sync::OnceLock::new(),
            });
        }
        Ok(Probe {
            name: cfg.name.clone(),
            key: key.clone(),
            hostname: hostname.to_string(),
            mailboxes,
            junk_is_ok: cfg.junk_is_ok,
            route_rules: cfg.route_rules.clone(),
            verifier: match cfg.verify_dkim {
                Some(resolver) => Some(Arc::new(
                    crate::edges::dkim::Verifier::new(resolver, VERIFY_TIMEOUT)
                        .map_err(|e| anyhow::anyhow!("probe {}: verify_dkim: {e}", cfg.name))?,
                )),
                None => None,
            },
            verify_slots: Arc::new(tokio::sync::Semaphore::new(VERIFY_SLOTS)),
            plan,
            limits,
            auto,
            interval: cfg.interval,
            jitter: cfg.jitter,
            max_in_flight: cfg.max_in_flight,
            cleanup,
            delete_delivered: cfg.cleanup,
            reply,
            reply_body,
            webhook_secret,
            webhook_verify: cfg
                .helpdesk
                .as_ref()
                .map_or(crate::edges::helpdesk::webhook::bearer, |h| {
                    helpdesk::webhook_verifier(h.api)
                }),
            poll_interval,
            submitter,
            helpdesk,
            cleanups: Default::default(),
            deleting: Default::default(),
            metrics: std::sync::OnceLock::new(),
            heartbeat_url: cfg.heartbeat_url.clone(),
            heartbeat_roots: read_roots(cfg.heartbeat_ca_file.as_deref())?,
        })
    }
}

fn cleanup_mode(c: crate::config::Cleanup) -> Option<CleanupMode> {
    use crate::config::Cleanup;
    match c {
        Cleanup::Archive => Some(CleanupMode::Archive),
        Cleanup::Trash => Some(CleanupMode::Trash),
        Cleanup::Delete => Some(CleanupMode::Delete),
        Cleanup::None => None,
    }
}

/// How often a mailbox's watcher ends and re-issues IDLE: half the shortest delivery deadline
/// of the probes reading it, within IMAP's bounds.
fn idle_refresh(delivery_deadlines_ms: impl Iterator<Item = u64>) -> Duration {
    delivery_deadlines_ms
        .min()
        .map_or(imap::IDLE_REFRESH, |ms| Duration::from_millis(ms / 2))
        .clamp(imap::IDLE_REFRESH_FLOOR, imap::IDLE_REFRESH)
}

/// The settings of a mailbox's Junk folder: the inbox's, with `folder` selected.
fn junk_target(i: &crate::config::ImapConfig, folder: &str) -> crate::config::ImapConfig {
    crate::config::ImapConfig {
        mailbox: folder.to_string(),
        ..i.clone()
    }
}

/// The token source and mechanism of an `oauth2` section; the endpoint's requests are bounded
/// by the section's server timeout.
fn oauth2_login(
    o: &crate::config::OAuth2Config,
    timeout: Duration,
) -> anyhow::Result<crate::edges::oauth2::Login> {
    use crate::config::{OAuth2Mechanism, OAuth2Source};
    use crate::edges::oauth2::{Grant, Hidden, Login, Mechanism, TokenSource};
    let grant = match &o.source {
        OAuth2Source::TokenFile(path) => Grant::File { path: path.clone() },
        OAuth2Source::ClientCredentials {
            token_endpoint,
            client_id,
            client_secret,
            scope,
        } => Grant::ClientCredentials {
            token_endpoint: token_endpoint.clone(),
            client_id: client_id.clone(),
            client_secret: Hidden::new(client_secret.expose()),
            scope: scope.clone(),
        },
        OAuth2Source::RefreshToken {
            token_endpoint,
            client_id,
            client_secret,
            refresh_token,
            scope,
        } => Grant::RefreshToken {
            token_endpoint: token_endpoint.clone(),
            client_id: client_id.clone(),
            client_secret: Hidden::new(client_secret.expose()),
            refresh_token: Hidden::new(refresh_token.expose()),
            scope: scope.clone(),
        },
    };
    Ok(Login {
        mechanism: match o.mechanism {
            OAuth2Mechanism::XOAuth2 => Mechanism::XOAuth2,
            OAuth2Mechanism::OAuthBearer => Mechanism::OAuthBearer,
        },
        source: Arc::new(TokenSource::new(
            grant,
            timeout,
            read_roots(o.ca_file.as_deref())?.as_deref(),
        )?),
    })
}

fn imap_target(i: &crate::config::ImapConfig) -> anyhow::Result<ImapTarget> {
    Ok(ImapTarget {
        host: i.host.clone(),
        port: i.port,
        tls: tls_mode(i.tls),
        username: i.username.clone(),
        password: i.password.expose().to_string(),
        oauth2: i
            .oauth2
            .as_ref()
            .map(|o| oauth2_login(o, i.timeout))
            .transpose()?,
        mailbox: i.mailbox.clone(),
        extra_roots_pem: read_roots(i.ca_file.as_deref())?,
        timeout: i.timeout,
        idle: i.idle,
        poll_interval: i.poll_interval,
        idle_refresh: imap::IDLE_REFRESH,
    })
}

/// Every probe of a config, running until `shutdown`.
pub struct Prober {
    pub engine: Arc<Engine>,
    pub probes: Vec<Arc<Probe>>,
}

impl Prober {
    /// Builds every probe (fails on the first that cannot be built) and registers its metrics.
    pub fn new(config: &Config, engine: Arc<Engine>, key: Key) -> anyhow::Result<Prober> {
        let hostname = config
            .prober
            .hostname
            .clone()
            .unwrap_or_else(|| "mailcanary.invalid".to_string());
        let mut probes = Vec::new();
        for p in &config.probes {
            let probe = Probe::build(p, &key, &hostname)?;
            let names: Vec<String> = probe.mailboxes.iter().map(|m| m.name.clone()).collect();
            engine.register_probe(&probe.name, &probe.plan, &names);
            if probe.verifier.is_some() {
                engine.metrics().register_verification(&probe.name);
            }
            probes.push(Arc::new(probe));
        }
        Ok(Prober { engine, probes })
    }

    /// Starts watchers, the ticker, resumed canaries and (unless `schedule` is false) the
    /// schedulers. Returns the tasks; they end when `shutdown` is cancelled.
    pub fn start(
        &self,
        schedule: bool,
        shutdown: CancellationToken,
    ) -> anyhow::Result<JoinSet<()>> {
        let mut tasks = JoinSet::new();
        for p in &self.probes {
            let _ = p.metrics.set(self.engine.metrics().clone());
            // The deadlines new canaries get (learned ones from the history the ledger kept).
            for m in &p.mailboxes {
                self.engine
                    .limits_for(&p.name, Some(&m.name), &p.limits, p.auto.as_ref());
            }
        }
        // One heartbeat task per probe that has a dead man's switch; one client (and its
        // connection pool) per distinct `heartbeat_ca_file`, shared by the probes that name it.
        let mut heartbeat_clients: HashMap<Option<&[u8]>, reqwest::Client> = HashMap::new();
        for p in &self.probes {
            let Some(url) = p.heartbeat_url.clone() else {
                continue;
            };
            let roots = p.heartbeat_roots.as_deref();
            let http = match heartbeat_clients.get(&roots) {
                Some(c) => c.clone(),
                None => {
                    let mut tls = crate::edges::rustls_client_config(roots)
                        .map_err(|e| anyhow::anyhow!("probe {}: heartbeat: {e}", p.name))?;
                    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
                    let c = reqwest::Client::builder()
                        .tls_backend_preconfigured(tls)
                        .connect_timeout(heartbeat::PING_TIMEOUT)
                        .user_agent(concat!("mailcanary/", env!("CARGO_PKG_VERSION")))
                        .build()?;
                    heartbeat_clients.insert(roots, c.clone());
                    c
                }
            };
            tasks.spawn(heartbeat::run(
                self.engine.clone(),
                p.name.clone(),
                url,
                http,
                shutdown.clone(),
            ));
        }
        // One watcher per distinct watched folder (a mailbox's inbox, its Junk folder), shared
        // by the probes that read it; each started with that mailbox's own settings (`check`
        // refuses two probes watching one mailbox with different ones).
        let mut watched: HashMap<(String, Folder), Watched> = HashMap::new();
        for p in &self.probes {
            for m in &p.mailboxes {
                for folder in Folder::ALL {
                    let Some(key) = m.key(folder) else { continue };
                    let w = watched
                        .entry((key.to_string(), folder))
                        .or_insert_with(|| Watched {
                            imap: match folder {
                                Folder::Inbox => m.imap.clone(),
                                Folder::Junk => junk_target(&m.imap, junk_folder(&m.imap)),
                            },
                            readers: Vec::new(),
                        });
                    match w.readers.iter_mut().find(|(q, _)| Arc::ptr_eq(q, p)) {
                        Some((_, names)) => names.push(m.name.clone()),
                        None => w.readers.push((p.clone(), vec![m.name.clone()])),
                    }
                }
            }
        }
        for ((key, folder), w) in watched {
            let mut target = imap_target(&w.imap)?;
            // A connection that died silently is found at the next IDLE refresh (plus the IMAP
            // timeout, which `check` wants under half a deadline): before any canary of this
            // mailbox could go overdue because of it.
            target.idle_refresh = idle_refresh(w.readers.iter().map(|(p, _)| p.limits.delivery_ms));
            let (ev_tx, ev_rx) = mpsc::channel(256);
            let (cmd_tx, cmd_rx) = mpsc::channel(256);
            let (ready_tx, ready_rx) = watch::channel(false);
            for (p, names) in &w.readers {
                for m in p.mailboxes.iter().filter(|m| names.contains(&m.name)) {
                    let _ = m.commands(folder).set(cmd_tx.clone());
                    let _ = m.ready(folder).set(ready_rx.clone());
                }
            }
            let cursor = self.engine.ledger().cursor(&key).ok().flatten();
            let watcher = imap::spawn_watcher(target, cursor, ev_tx, cmd_rx, shutdown.clone());
            tasks.spawn(async move {
                let _ = watcher.await;
            });
            tasks.spawn(dispatch(
                self.engine.clone(),
                (key, folder),
                w.readers,
                (ev_rx, ready_tx),
                shutdown.clone(),
            ));
        }
        // Time moves for every canary, four times a second: the stall shows within 250 ms of
        // its deadline, and the oldest-in-flight gauge rises smoothly.
        // A canary given up as lost is cleaned up like any other finished one: its ticket (and
        // a duplicate the helpdesk made of it) would otherwise stay open for good.
        let engine = self.engine.clone();
        let sd = shutdown.clone();
        let probes = self.probes.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = sd.cancelled() => return,
                    _ = tick.tick() => {
                        for c in engine.tick(now_ms()) {
                            if let Some(p) = probes.iter().find(|p| p.name == c.probe) {
                                clean_up(p, &c);
                            }
                        }
                    }
                }
            }
        });
        // Canaries from before a restart.
        for c in self.engine.resume() {
            if let Some(p) = self.probes.iter().find(|p| p.name == c.probe)
                && run::resume(&self.engine, &c)
            {
                let (engine, p, sd) = (self.engine.clone(), p.clone(), shutdown.clone());
                tasks.spawn(async move {
                    tokio::select! {
                        _ = sd.cancelled() => {}
                        _ = run::drive(engine, p, c.id.clone()) => {}
                    }
                });
            }
        }
        if schedule {
            for p in &self.probes {
                tasks.spawn(scheduler(self.engine.clone(), p.clone(), shutdown.clone()));
            }
        }
        Ok(tasks)
    }
}

/// One watched folder and the probes (with their mailboxes' names) that read it.
struct Watched {
    imap: crate::config::ImapConfig,
    readers: Vec<(Arc<Probe>, Vec<String>)>,
}

/// The folder a Junk watcher selects: the named one, or the `\Junk` marker.
fn junk_folder(i: &crate::config::ImapConfig) -> &str {
    match &i.junk {
        Junk::Named(n) => n,
        Junk::SpecialUse | Junk::Off => imap::SPECIAL_USE_JUNK,
    }
}

/// Sends a canary every `interval` ± `jitter / 2` (the first after a random `[0, jitter]`), unless
/// `max_in_flight` are already out.
async fn scheduler(engine: Arc<Engine>, probe: Arc<Probe>, shutdown: CancellationToken) {
    use rand::RngExt;
    let jitter = |max: Duration| {
        if max.is_zero() {
            Duration::ZERO
        } else {
            Duration::from_millis(rand::rng().random_range(0..=ms(max)))
        }
    };
    // Spread the first canaries of many probes over the jitter window.
    let mut next = tokio::time::Instant::now() + jitter(probe.jitter);
    let mut runs = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                if tokio::time::Instant::now() >= next {
                    engine.skipped(&probe.name, Skipped::Shutdown);
                }
                runs.abort_all();
                return;
            }
            _ = tokio::time::sleep_until(next) => {}
            Some(_) = runs.join_next(), if !runs.is_empty() => continue,
        }
        next += probe.interval;
        next += jitter(probe.jitter);
        next -= probe.jitter / 2;
        // One canary per mailbox, each with its own limit: a mailbox whose mail is held fills
        // its own `max_in_flight`, not the others'.
        for (i, m) in probe.mailboxes.iter().enumerate() {
            let in_flight = engine.in_flight_count_for(&probe.name, &m.name);
            if in_flight >= probe.max_in_flight {
                // Counted, so a graph of sent canaries tells "stalled and skipping" from "idle".
                engine.skipped(&probe.name, Skipped::MaxInFlight);
                warn!(probe = %probe.name, mailbox = %m.name, in_flight, "at max_in_flight; skipping this canary");
                continue;
            }
            runs.spawn(run::start_canary(engine.clone(), probe.clone(), i));
        }
    }
}

/// Sends one canary per probe now (the `once` command), as tasks in `tasks` that end at
/// `shutdown` (a run still polling for its ticket must not hold up the exit).
pub fn send_once(
    engine: &Arc<Engine>,
    probes: &[Arc<Probe>],
    tasks: &mut JoinSet<()>,
    shutdown: &CancellationToken,
) {
    for p in probes {
        for i in 0..p.mailboxes.len() {
            let (run, sd) = (
                run::start_canary(engine.clone(), p.clone(), i),
                shutdown.clone(),
            );
            tasks.spawn(async move {
                tokio::select! {
                    _ = sd.cancelled() => {}
                    _ = run => {}
                }
            });
        }
    }
}

/// Recognises what arrives in one watched folder and completes the delivery stage of its
/// canary. `readers`: the probes reading it, each with the names its mailbox has there.
async fn dispatch(
    engine: Arc<Engine>,
    (mailbox_key, folder): (String, Folder),
    readers: Vec<(Arc<Probe>, Vec<String>)>,
    (mut events, ready): (mpsc::Receiver<WatchEvent>, watch::Sender<bool>),
    shutdown: CancellationToken,
) {
    let probes: Vec<Arc<Probe>> = readers.iter().map(|(p, _)| p.clone()).collect();
    let names: Vec<&str> = probes.iter().map(|p| p.name.as_str()).collect();
    let status = |failure: Option<(crate::canary::life::Reason, String)>| {
        for (p, mailboxes) in &readers {
            for m in mailboxes {
                engine.mailbox_status(&p.name, m, folder, failure.clone());
            }
        }
    };
    let blame = names[0].to_string();
    loop {
        let ev = tokio::select! {
            _ = shutdown.cancelled() => return,
            ev = events.recv() => match ev { Some(e) => e, None => return },
        };
        if matches!(
            ev,
            WatchEvent::Connected { .. } | WatchEvent::Failed { .. } | WatchEvent::NoSuchFolder
        ) {
            ready.send_replace(true);
        }
        match ev {
            WatchEvent::Connected { idle } => {
                info!(mailbox = %mailbox_key, %folder, idle, "mailbox watcher connected");
                status(None);
            }
            WatchEvent::Failed { reason, detail } => {
                warn!(mailbox = %mailbox_key, %folder, %reason, %detail, "mailbox watcher failed; reconnecting");
                status(Some((reason, detail)));
            }
            WatchEvent::NoSuchFolder => {
                info!(mailbox = %mailbox_key, "no folder is marked \\Junk (RFC 6154 SPECIAL-USE); no Junk folder is watched (name one with `junk = \"…\"`)");
                status(None);
            }
            WatchEvent::Deleted { uid_validity, uids } => {
                for uid in uids {
                    for p in &probes {
                        if p.forget_delete(&mailbox_key, uid_validity, uid) {
                            p.cleanup_done();
                        }
                    }
                }
            }
            WatchEvent::Cursor {
                uid_validity,
                last_uid,
            } => {
                engine.set_cursor(&mailbox_key, uid_validity, last_uid);
            }
            WatchEvent::Arrived(a) => {
                let seen_at = crate::clock::at_ms(a.seen);
                let candidate = match inspect(&a.raw) {
                    Inspected::Ordinary => continue,
                    Inspected::Malformed(why) => {
                        warn!(mailbox = %mailbox_key, uid = a.uid, why, "malformed message ignored");
                        engine.ignored(&blame, Ignored::Malformed);
                        continue;
                    }
                    Inspected::Candidate(c) => c,
                };
                // One key per prober process: every probe carries the same one.
                let key = &probes[0].key;
                match classify(&candidate, key, &names) {
                    Classified::Forged { .. } => {
                        warn!(mailbox = %mailbox_key, uid = a.uid, "forged canary ignored");
                        // Counted against the probe it imitates, when it names one of ours.
                        let victim = candidate
                            .claimed_probes
                            .iter()
                            .find(|c| names.contains(&c.as_str()))
                            .map_or(blame.as_str(), String::as_str);
                        engine.ignored(victim, Ignored::Forged);
                    }
                    Classified::Foreign { .. } => {
                        tracing::debug!(mailbox = %mailbox_key, uid = a.uid, claimed = ?candidate.claimed_probes, "another prober's canary ignored");
                        engine.ignored(&blame, Ignored::Unknown);
                    }
                    Classified::Canary {
                        probe,
                        token,
                        marked,
                    } => {
                        let Some((p, mailboxes)) = readers.iter().find(|(p, _)| p.name == probe)
                        else {
                            continue;
                        };
                        // A probe that posts the agent reply waits for that reply: a mail with
                        // the token but not the reply mark is the helpdesk's acknowledgement.
                        if p.expects_posted_reply() && !marked {
                            let orphan = engine.acknowledged(
                                &probe,
                                token.id(),
                                seen_at,
                                (a.uid_validity, a.uid),
                                folder,
                            );
                            if orphan
                                && p.delete_delivered
                                && let Some(m) =
                                    p.mailboxes.iter().find(|m| mailboxes.contains(&m.name))
                            {
                                delete_message(p, m, folder, a.uid_validity, a.uid);
                            }
                            continue;
                        }
                        let arrival = Delivery {
                            probe,
                            id: token.id().to_string(),
                            seen_at,
                            uid: (a.uid_validity, a.uid),
                            folder,
                            candidate,
                        };
                        let Some(verifier) = &p.verifier else {
                            arrival.record(&engine, p, mailboxes, &[]);
                            continue;
                        };
                        // Off the dispatcher: DNS may be slow. The arrival time is kept, so
                        // the delivery is measured as it was seen.
                        match p.verify_slots.clone().try_acquire_owned() {
                            Ok(permit) => {
                                let (engine, p, mailboxes) =
                                    (engine.clone(), p.clone(), mailboxes.clone());
                                let (verifier, raw) = (verifier.clone(), a.raw);
                                tokio::spawn(async move {
                                    let verified = verifier.verify(&raw).await;
                                    drop(permit);
                                    arrival.record(&engine, &p, &mailboxes, &verified);
                                });
                            }
                            Err(_) => {
                                warn!(probe = %p.name, "every DKIM verification slot busy; this canary's local verdict is temperror");
                                let busy =
                                    [AuthMethod::Dkim, AuthMethod::Arc].map(|method| Verdict {
                                        method,
                                        result: AuthResult::Temperror,
                                    });
                                arrival.record(&engine, p, mailboxes, &busy);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// How long the prober's own DKIM/ARC check of one arrival may take (then `temperror`). Short:
/// the delivery is recorded after it, and a tick in between could call a canary overdue that
/// arrived just before its deadline.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(2);
/// DKIM/ARC checks in flight per probe at most.
const VERIFY_SLOTS: usize = 16;

/// A canary's delivered message, to record (now, or once its own DKIM check is done).
struct Delivery {
    probe: String,
    id: String,
    seen_at: u64,
    uid: (u32, u32),
    folder: Folder,
    candidate: crate::canary::Candidate,
}

impl Delivery {
    fn record(self, engine: &Engine, p: &Arc<Probe>, mailboxes: &[String], verified: &[Verdict]) {
        let found = engine::Found {
            mailboxes,
            folder: self.folder,
            junk_is_ok: p.junk_is_ok,
            received: &self.candidate.received,
            auth_results: &self.candidate.auth_results,
            rules: &p.route_rules,
            verified,
        };
        let done = engine.delivered(
            &self.probe,
            &self.id,
            self.seen_at,
            self.uid,
            found,
            |mid| self.candidate.threaded_to(mid),
        );
        if let Some(c) = done
            && c.is_finished()
        {
            clean_up(p, &c);
        }
    }
}

/// Removes what a finished canary left behind: the delivered message and the helpdesk's
/// acknowledgement (by UID), and the ticket. Called by whoever saw the canary finish: the
/// mailbox dispatcher when the delivery was its last stage, the run when the delivery had
/// arrived early (RT mails the reply inside the reply POST, so it can be in the mailbox before
/// the POST returns and the reply stage ends).
pub(crate) fn clean_up(p: &Arc<Probe>, c: &crate::canary::life::Canary) {
    if p.delete_delivered
        && let Some(m) = p.mailbox_of(c)
    {
        // From whichever folder it landed in.
        if let (Some(validity), Some(uid)) = (c.delivered_uid_validity, c.delivered_uid) {
            let folder = c.folder.unwrap_or(Folder::Inbox);
            delete_message(p, m, folder, validity, uid);
        }
        if let Some(ack) = &c.acknowledged {
            let folder = ack.folder.unwrap_or(Folder::Inbox);
            delete_message(p, m, folder, ack.uid_validity, ack.uid);
        }
    }
    if c.ticket_id.is_some() && p.cleanup.is_some() && p.helpdesk.is_some() {
        // Counted before the task starts, so `once` cannot see zero in between.
        p.cleanup_begun();
        let (p, c) = (p.clone(), c.clone());
        tokio::spawn(async move {
            clean_up_ticket(&p, &c).await;
            p.cleanup_done();
        });
    }
}

/// Asks the watcher of `m`'s `folder` to delete one message of this probe's; the clean-up is
/// pending until the watcher reports it done.
fn delete_message(p: &Arc<Probe>, m: &ProbeMailbox, folder: Folder, uid_validity: u32, uid: u32) {
    let (Some(tx), Some(key)) = (m.commands(folder).get(), m.key(folder)) else {
        return;
    };
    p.cleanup_begun();
    if tx
        .try_send(WatchCommand::Delete { uid_validity, uid })
        .is_ok()
    {
        p.deleting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((key.to_string(), uid_validity, uid));
    } else {
        p.cleanup_done();
    }
}

/// Archives, trashes or deletes the canary's ticket as the probe says (if it has one), and
/// every duplicate the helpdesk made of the same mail: those are looked for once, by token,
/// counted in `mailcanary_helpdesk_duplicate_tickets_total` and logged.
pub async fn clean_up_ticket(p: &Arc<Probe>, c: &crate::canary::life::Canary) {
    let (Some(mode), Some(h), Some(ticket)) = (p.cleanup, p.helpdesk.clone(), c.ticket_id.clone())
    else {
        return;
    };
    let mut tickets = vec![crate::edges::helpdesk::TicketRef {
        id: ticket,
        created_at: None,
    }];
    let since = std::time::UNIX_EPOCH + Duration::from_millis(c.created_ms.saturating_sub(60_000));
    match h.find_tickets(&c.token, since).await {
        Ok(all) => {
            let extra: Vec<_> = all.into_iter().filter(|t| t.id != tickets[0].id).collect();
            if !extra.is_empty() {
                warn!(
                    probe = %p.name,
                    canary = %c.id,
                    duplicates = extra.len(),
                    "the helpdesk made more than one ticket of one canary mail (a duplicate import); cleaning them all up"
                );
                if let Some(m) = p.metrics.get() {
                    m.duplicate_tickets(&p.name, extra.len() as u64);
                }
                tickets.extend(extra);
            }
        }
        Err(e) => {
            tracing::debug!(probe = %p.name, canary = %c.id, error = %e, "cannot look for duplicate tickets; cleaning up the canary's own")
        }
    }
    for t in &tickets {
        clean_up_one(p, c, &h, t, mode).await;
    }
}

async fn clean_up_one(
    p: &Probe,
    c: &crate::canary::life::Canary,
    h: &Helpdesk,
    t: &crate::edges::helpdesk::TicketRef,
    mode: CleanupMode,
) {
    // Cleanup is idempotent, so a failed one is tried again a little later (RT on SQLite can
    // be busy with its mail gateway; a helpdesk may answer 5xx for a minute): three tries over
    // about 15 s, then it is logged once and left.
    let mut wait = Duration::from_secs(5);
    for attempt in 1..=3 {
        match h.cleanup(t, mode).await {
            Ok(()) => return,
            Err(e) if attempt == 3 => {
                warn!(probe = %p.name, canary = %c.id, error = %e, "ticket cleanup failed; the ticket is left as it is")
            }
            Err(e) => {
                tracing::debug!(probe = %p.name, canary = %c.id, error = %e, attempt, "ticket cleanup failed; trying again");
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_refresh_is_half_the_shortest_delivery_deadline_within_imap_bounds() {
        let s = Duration::from_secs;
        // The shortest deadline of the mailbox's probes wins.
        assert_eq!(idle_refresh([60_000, 20_000, 300_000].into_iter()), s(10));
        // Never past RFC 2177's re-issue rule, never a busy loop.
        assert_eq!(
            idle_refresh([24 * 3_600_000].into_iter()),
            imap::IDLE_REFRESH
        );
        assert_eq!(idle_refresh([500].into_iter()), imap::IDLE_REFRESH_FLOOR);
        assert_eq!(idle_refresh(std::iter::empty()), imap::IDLE_REFRESH);
    }
}
