//! The sandbox: an in-process helpdesk with a real email pipeline, and faults.
//!
//! It is a second program inside the crate. It imports nothing of the prober, and nothing of the
//! prober imports it except the CLI's wiring of the default `run`.
//!
//! ```text
//!  SMTP (smtp.rs) --> import queue (pipeline.rs) --> tickets (helpdesk.rs) <--> HTTP API (api.rs)
//!                                                                                  | reply
//!  IMAP (imap.rs) <-- mailboxes (mailbox.rs) <-- outbound queue (pipeline.rs) <----+
//! ```
//!
//! Every step records ground truth in `events.rs`, and every stage consults the fault board
//! (`faults.rs`).

pub mod api;
pub mod events;
pub mod faults;
pub mod helpdesk;
pub mod imap;
pub mod mailbox;
pub mod pipeline;
pub mod smtp;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::sync::CancellationToken;

pub use faults::{Fault, FaultBoard, Stage};

/// Everything the sandbox can be told at start. `Default` is what the README's "The sandbox"
/// describes (SMTP 2525, IMAP 1143, HTTP 8088 on loopback).
#[derive(Clone, Debug)]
pub struct SandboxConfig {
    pub smtp_listen: SocketAddr,
    pub imap_listen: SocketAddr,
    pub http_listen: SocketAddr,
    /// Addresses the inbound MX accepts mail for (lowercased on comparison).
    pub support_addresses: Vec<String>,
    /// `auth_token` the helpdesk API demands.
    pub api_token: String,
    /// Password IMAP LOGIN takes for every mailbox.
    pub mailbox_password: String,
    /// Range the import delay of each mail is drawn from.
    pub import_delay: DelayRange,
    /// Tickets the import workers make per second at most (`None`: unbounded). A cleared
    /// backlog then drains at a finite speed, as a real worker pool's does.
    pub import_rate: Option<f64>,
    /// Range the delivery delay of each reply is drawn from.
    pub outbound_delay: DelayRange,
    /// Largest message the MX takes (552 past it).
    pub max_message_size: usize,
    /// How many messages the ground-truth event log keeps.
    pub event_capacity: usize,
    /// Name used in the SMTP greeting and in generated Message-IDs.
    pub hostname: String,
    /// How long IDLE pushes wait after a change (Dovecot: a fixed 500 ms). Default 0.
    pub idle_push_delay: Duration,
    /// Faults set at start.
    pub faults: Vec<(Stage, Fault)>,
    /// Acknowledge every new ticket by mail at once, as RT's AutoReply and django-helpdesk's
    /// "(Opened)" mail do: token in the Subject, the canary quoted, threaded to it, sent by the
    /// outbound mailer ahead of any reply. `None`: as the `api` dialect's vendor does out of
    /// the box ([`api::Dialect::acknowledges`]).
    pub auto_ack: Option<bool>,
    /// The vendor dialect in charge where dialects would claim the same paths, and whose
    /// webhooks are sent (`api::DIALECTS` names them). Default `supportbee`.
    pub api: String,
    /// How long a new ticket stays invisible to search endpoints (list endpoints see it at
    /// once), as vendors' search indexes lag behind.
    pub search_lag: Duration,
    /// Requests per minute the API answers before 429 with the vendor's rate-limit headers.
    pub rate_limit: Option<u32>,
    /// The window `rate_limit` counts in (a minute, as vendors count; tests shorten it).
    pub rate_window: Duration,
    /// Where a ticket-created webhook is POSTed, signed in the dialect's scheme, when set.
    pub webhook_url: Option<String>,
    /// The secret webhooks are signed with.
    pub webhook_secret: String,
    /// How long an OAuth2 access token lives (Help Scout's dialect; `expires_in` of its
    /// token endpoint). Default 2 h, like Help Scout's.
    pub oauth_token_lifetime: Duration,
}

impl SandboxConfig {
    /// Whether new tickets are acknowledged by mail: as set, else as the `api` vendor does.
    pub fn acknowledges(&self) -> bool {
        self.auto_ack
            .unwrap_or_else(|| api::dialect(&self.api).is_some_and(|d| d.acknowledges))
    }
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            smtp_listen: ([127, 0, 0, 1], 2525).into(),
            imap_listen: ([127, 0, 0, 1], 1143).into(),
            http_listen: ([127, 0, 0, 1], 8088).into(),
            support_addresses: vec!["support@helpdesk.test".into()],
            api_token: "sandbox".into(),
            mailbox_password: "sandbox".into(),
            import_delay: DelayRange::new(Duration::from_millis(200), Duration::from_secs(2)),
            import_rate: None,
            outbound_delay: DelayRange::new(Duration::from_millis(100), Duration::from_millis(500)),
            max_message_size: 10 * 1024 * 1024,
            event_capacity: 10_000,
            hostname: "helpdesk.test".into(),
            idle_push_delay: Duration::ZERO,
            faults: Vec::new(),
            auto_ack: None,
            api: "supportbee".into(),
            search_lag: Duration::ZERO,
            rate_limit: None,
            rate_window: Duration::from_secs(60),
            webhook_url: None,
            webhook_secret: "sandbox".into(),
            oauth_token_lifetime: Duration::from_secs(2 * 3600),
        }
    }
}

impl SandboxConfig {
    /// The defaults, with every listener on an ephemeral loopback port (for tests).
    pub fn ephemeral() -> Self {
        let any: SocketAddr = ([127, 0, 0, 1], 0).into();
        Self {
            smtp_listen: any,
            imap_listen: any,
            http_listen: any,
            ..Self::default()
        }
    }
}

/// A uniform range of durations, `min..=max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DelayRange {
    pub min: Duration,
    pub max: Duration,
}

impl DelayRange {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min: min.min(max),
            max: max.max(min),
        }
    }

    pub fn fixed(d: Duration) -> Self {
        Self::new(d, d)
    }

    /// Draws one delay.
    pub fn sample(&self) -> Duration {
        use rand::RngExt;
        if self.max <= self.min {
            return self.min;
        }
        let span = (self.max - self.min).as_micros() as u64;
        self.min + Duration::from_micros(rand::rng().random_range(0..=span))
    }
}

impl std::str::FromStr for DelayRange {
    type Err = String;
    /// `2s` (fixed) or `200ms..2s`.
    fn from_str(s: &str) -> Result<Self, String> {
        let parse = |d: &str| {
            humantime::parse_duration(d.trim()).map_err(|e| format!("bad duration {d:?}: {e}"))
        };
        match s.split_once("..") {
            Some((a, b)) => Ok(Self::new(parse(a)?, parse(b)?)),
            None => Ok(Self::fixed(parse(s)?)),
        }
    }
}

/// A running sandbox. Dropping it does not stop it: call [`Sandbox::shutdown`].
pub struct Sandbox {
    pub smtp_addr: SocketAddr,
    pub imap_addr: SocketAddr,
    pub http_addr: SocketAddr,
    faults: FaultBoard,
    hub: Arc<helpdesk::Hub>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl Sandbox {
    /// Binds every listener and starts serving. Fails only if a listener cannot be bound.
    pub async fn start(config: SandboxConfig) -> std::io::Result<Sandbox> {
        let smtp = TcpListener::bind(config.smtp_listen).await?;
        let imap = TcpListener::bind(config.imap_listen).await?;
        let http = TcpListener::bind(config.http_listen).await?;
        let (smtp_addr, imap_addr, http_addr) =
            (smtp.local_addr()?, imap.local_addr()?, http.local_addr()?);

        let faults = FaultBoard::new();
        for (stage, fault) in &config.faults {
            faults.set(*stage, *fault);
        }
        let shutdown = CancellationToken::new();
        let mailboxes = mailbox::Mailboxes::new(config.mailbox_password.clone());
        let mut tasks = JoinSet::new();
        let (hub, queues) = helpdesk::Hub::new(config.clone(), faults.clone(), mailboxes.clone());

        tasks.spawn(pipeline::run_import(
            hub.clone(),
            queues.import,
            shutdown.clone(),
        ));
        tasks.spawn(pipeline::run_outbound(
            hub.clone(),
            queues.outbound,
            shutdown.clone(),
        ));
        tasks.spawn(smtp::serve(smtp, hub.clone(), shutdown.clone()));
        tasks.spawn(imap::serve_with(
            imap,
            mailboxes,
            faults.clone(),
            shutdown.clone(),
            config.idle_push_delay,
        ));
        tasks.spawn(api::serve(http, hub.clone(), shutdown.clone()));

        Ok(Sandbox {
            smtp_addr,
            imap_addr,
            http_addr,
            faults,
            hub,
            shutdown,
            tasks,
        })
    }

    /// The live fault board (the same one `PUT /sandbox/faults` changes).
    pub fn faults(&self) -> &FaultBoard {
        &self.faults
    }

    /// The mailboxes (every address a reply goes to has one), for drills that hold one
    /// address's mail while the others' flows ([`mailbox::Mailboxes::hold`]).
    pub fn mailboxes(&self) -> &Arc<mailbox::Mailboxes> {
        &self.hub.mailboxes
    }

    /// The ground-truth events, as `GET /sandbox/events` serves them.
    pub fn events(&self) -> Vec<events::MessageEvents> {
        self.hub.events_snapshot()
    }

    /// The helpdesk's base URL, e.g. `http://127.0.0.1:8088`.
    pub fn api_url(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    /// Stops every listener and worker and waits for them.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}
