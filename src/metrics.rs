//! The Prometheus exposition of the canary's life: every metric of the README's Metrics table, in a
//! private [`Registry`] (never the process-global default one, so tests and a second prober in
//! the same process do not share counters).
//!
//! The canary's life (`crate::canary::life`) decides; this module only counts what it returns:
//! [`Metrics::apply`] maps each [`Transition`] one-to-one onto counters and the histogram. Gauges
//! that describe the present (in flight, oldest age, probe success) are set by the flow, which
//! holds the canaries.
//!
//! Architecture invariant: label values are only probe names (validated by the config), stage
//! names, reasons and the build's version and revision — never an address, a token, a ticket id
//! or an error message. Every series of a registered probe exists from [`Metrics::register_probe`]
//! on, at 0, so `rate()` and `absent()` work from the first scrape.
//!
//! | metric | labels | changed by |
//! |---|---|---|
//! | `mailcanary_canaries_sent_total` | probe | [`Metrics::sent`] |
//! | `mailcanary_canaries_completed_total` | probe | `Finished{OnTime, Late}` |
//! | `mailcanary_stage_duration_seconds` | probe, stage | `StageDone` (late ones too) |
//! | `mailcanary_stage_failures_total` | probe, stage, reason | `StageFailed` |
//! | `mailcanary_stage_late_total` | probe, stage | `StageDone{late: true}` |
//! | `mailcanary_canaries_lost_total` | probe, stage | `Lost` |
//! | `mailcanary_stage_in_flight` | probe, stage | [`Metrics::set_in_flight`] |
//! | `mailcanary_stage_oldest_in_flight_seconds` | probe, stage | [`Metrics::set_in_flight`] |
//! | `mailcanary_stage_overdue` | probe, stage | [`Metrics::set_in_flight`] |
//! | `mailcanary_stage_backlog_seconds` | probe, stage | [`Metrics::set_backlog`] |
//! | `mailcanary_stage_deadline_seconds` | probe, stage | [`Metrics::set_deadline`] |
//! | `mailcanary_delivery_deadline_seconds` | probe, mailbox | [`Metrics::set_mailbox_deadline`] |
//! | `mailcanary_stage_drain_eta_seconds` | probe, stage | [`Metrics::set_backlog`] |
//! | `mailcanary_stage_last_success_timestamp_seconds` | probe, stage | `StageDone{late: false}` |
//! | `mailcanary_probe_success` | probe | [`Metrics::set_probe_success`] |
//! | `mailcanary_messages_ignored_total` | probe, reason | [`Metrics::ignored`] |
//! | `mailcanary_build_info` | version, revision | [`Metrics::new`] |
//! | `mailcanary_config_last_reload_successful` | | [`Metrics::set_config_reload`] |
//! | `mailcanary_shard_info` | shard, shards | [`Metrics::set_shard`] |
//! | `mailcanary_probes_configured`, `mailcanary_probes_owned` | | [`Metrics::set_shard`] |
//! | `mailcanary_ledger_errors_total` | op | [`Metrics::ledger_error`] |
//! | `mailcanary_ledger_recovered_total` | | [`Metrics::ledger_recovered`] |
//! | `mailcanary_canaries_skipped_total` | probe, reason | [`Metrics::skipped`] |
//! | `mailcanary_helpdesk_duplicate_tickets_total` | probe | [`Metrics::duplicate_tickets`] |
//! | `mailcanary_heartbeat_errors_total` | probe | [`Metrics::heartbeat_error`] |
//! | `mailcanary_webhooks_total` | probe, result | [`Metrics::webhook`] |
//! | `mailcanary_import_message_id_total` | probe, result | [`Metrics::message_id`] |
//! | `mailcanary_helpdesk_rate_limit_remaining` | probe | [`Metrics::set_rate_limit_remaining`] |

use std::collections::{BTreeMap, HashMap, HashSet};

/// The `result` label of `mailcanary_webhooks_total`.
pub const WEBHOOK_RESULTS: [&str; 3] = ["authentic", "refused", "challenge"];

/// The `result` label of `mailcanary_import_message_id_total`.
pub const MESSAGE_ID_RESULTS: [&str; 3] = ["match", "mismatch", "absent"];

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use prometheus::core::Collector;
use prometheus::{
    Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::canary::hops::{AuthMethod, AuthResult, Route};
use crate::canary::life::{Folder, Outcome, Reason, Stage, Transition};

/// Buckets of `mailcanary_stage_duration_seconds`: from a fast SMTP reply to an hour-long import
/// backlog. The client library's default stops at 10 s, where email latency only begins.
pub const DURATION_BUCKETS: [f64; 15] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// Buckets of `mailcanary_hop_duration_seconds`: `Received` dates have one-second
/// resolution, and the family has a series per hop position, so few buckets.
pub const HOP_BUCKETS: [f64; 5] = [1.0, 5.0, 30.0, 120.0, 600.0];

/// The `hop` label values of `mailcanary_hop_duration_seconds`: the position from the first
/// hop, the last one for every hop from there on.
pub const HOP_LABELS: [&str; 5] = ["1", "2", "3", "4", "5+"];

/// The `result` label values of `mailcanary_delivery_tls_total`.
pub const TLS_RESULTS: [&str; 2] = ["all_hops", "some_plaintext"];

/// Why a message in the watched mailbox (or a webhook) was not counted as a canary's arrival.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ignored {
    /// It carried a canary token that failed the HMAC check.
    Forged,
    /// A valid token of a canary the ledger does not know (evicted, or another prober's).
    Unknown,
    /// A second arrival of a canary that already finished this stage.
    Duplicate,
    /// It could not be parsed as a message at all.
    Malformed,
    /// A helpdesk's acknowledgement of the new ticket: the canary's token without the reply
    /// mark. Recorded on the canary, never taken for the agent's reply.
    Acknowledgement,
}

impl Ignored {
    pub const ALL: [Ignored; 5] = [
        Ignored::Forged,
        Ignored::Unknown,
        Ignored::Duplicate,
        Ignored::Malformed,
        Ignored::Acknowledgement,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Ignored::Forged => "forged",
            Ignored::Unknown => "unknown",
            Ignored::Duplicate => "duplicate",
            Ignored::Malformed => "malformed",
            Ignored::Acknowledgement => "acknowledgement",
        }
    }
}

/// Why a canary that was due was not sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Skipped {
    /// `max_in_flight` canaries of the probe were already out (a stall fills it).
    MaxInFlight,
    /// The ledger could not record it, and a canary is never sent unrecorded.
    Ledger,
    /// The prober was shutting down.
    Shutdown,
}

impl Skipped {
    pub const ALL: [Skipped; 3] = [Skipped::MaxInFlight, Skipped::Ledger, Skipped::Shutdown];

    pub fn as_str(self) -> &'static str {
        match self {
            Skipped::MaxInFlight => "max_in_flight",
            Skipped::Ledger => "ledger",
            Skipped::Shutdown => "shutdown",
        }
    }
}

/// Every metric of the prober. `Send + Sync`: share it with an `Arc`.
pub struct Metrics {
    registry: Registry,
    sent: IntCounterVec,
    completed: IntCounterVec,
    duration: HistogramVec,
    failures: IntCounterVec,
    late: IntCounterVec,
    lost: IntCounterVec,
    in_flight: IntGaugeVec,
    overdue: IntGaugeVec,
    /// `stage_oldest_in_flight_seconds`, `stage_backlog_seconds` and
    /// `stage_drain_eta_seconds` per probe and stage: ages, so their values move every
    /// moment a canary waits. They are kept as what they are measured from ([`Live`]) and
    /// rendered at each scrape, outside the cached exposition: a stalled probe then changes
    /// nothing a cached render holds until one of its canaries changes.
    live: Mutex<LiveGauges>,
    deadline: GaugeVec,
    last_success: GaugeVec,
    probe_success: IntGaugeVec,
    ignored: IntCounterVec,
    skipped: IntCounterVec,
    duplicate_tickets: IntCounterVec,
    heartbeat_errors: IntCounterVec,
    webhooks: IntCounterVec,
    message_ids: IntCounterVec,
    rate_limit_remaining: GaugeVec,
    ledger_errors: IntCounterVec,
    ledger_recovered: IntCounter,
    placement: IntCounterVec,
    mailbox_duration: HistogramVec,
    mailbox_failures: IntCounterVec,
    mailbox_late: IntCounterVec,
    mailbox_overdue: IntGaugeVec,
    mailbox_deadline: GaugeVec,
    mailbox_success: IntGaugeVec,
    hop_duration: HistogramVec,
    delivery_tls: IntCounterVec,
    delivery_auth: IntCounterVec,
    delivery_verified: IntCounterVec,
    config_reload: IntGauge,
    shard_info: IntGaugeVec,
    probes_configured: IntGauge,
    probes_owned: IntGauge,
    /// Bumped after every change a scrape would show ([`Metrics::changed`]).
    changes: AtomicU64,
    /// The last exposition and the change count it was rendered at.
    cache: Mutex<Option<(u64, Bytes)>>,
    /// Stages already registered per probe: registering again (a config reload) only adds the
    /// new ones and never resets a gauge.
    registered: Mutex<HashMap<String, HashSet<Stage>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// All metric families, with `mailcanary_build_info{version, revision} 1` set, and
    /// `mailcanary_config_last_reload_successful` at 0 until [`Metrics::set_config_reload`] says
    /// otherwise (a wiring that forgets to report its first load shows up as a failed reload
    /// rather than as a silent success).
    pub fn new(version: &str, revision: &str) -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            register(&registry, IntCounterVec::new(Opts::new(name, help), labels))
        };
        let sent = counter(
            "mailcanary_canaries_sent_total",
            "Canaries whose sending was attempted (written to the ledger, SMTP begun).",
            &["probe"],
        );
        let completed = counter(
            "mailcanary_canaries_completed_total",
            "Canaries that went through every stage of their probe, on time or late.",
            &["probe"],
        );
        let failures = counter(
            "mailcanary_stage_failures_total",
            "Stage failures by reason; reason=\"deadline\" counts a stage that passed its deadline.",
            &["probe", "stage", "reason"],
        );
        let late = counter(
            "mailcanary_stage_late_total",
            "Stages that completed after their deadline (also observed in the duration histogram).",
            &["probe", "stage"],
        );
        let lost = counter(
            "mailcanary_canaries_lost_total",
            "Canaries given up past the lost horizon, by the stage they were stuck in.",
            &["probe", "stage"],
        );
        let ignored = counter(
            "mailcanary_messages_ignored_total",
            "Messages that looked like canaries but were not counted, by reason.",
            &["probe", "reason"],
        );
        let skipped = counter(
            "mailcanary_canaries_skipped_total",
            "Canaries that were due but not sent, by reason (max_in_flight, ledger, shutdown).",
            &["probe", "reason"],
        );
        let duplicate_tickets = counter(
            "mailcanary_helpdesk_duplicate_tickets_total",
            "Extra tickets the helpdesk made from one canary mail (a duplicate import), found when the canary was cleaned up.",
            &["probe"],
        );
        let heartbeat_errors = counter(
            "mailcanary_heartbeat_errors_total",
            "Pings of the probe's heartbeat_url (dead man's switch) that failed or were refused.",
            &["probe"],
        );
        let webhooks = counter(
            "mailcanary_webhooks_total",
            "Ticket-created webhooks received for the probe, by result: authentic (signed or carrying the secret as its vendor does), refused (401), challenge (a subscription handshake answered).",
            &["probe", "result"],
        );
        let message_ids = counter(
            "mailcanary_import_message_id_total",
            "Tickets whose helpdesk says which mail it made them from, by whether that mail's Message-ID is the canary's: match, mismatch (the ticket was made from another mail carrying the token), absent (the helpdesk recorded none). Only for helpdesks whose API exposes it.",
            &["probe", "result"],
        );
        let ledger_errors = counter(
            "mailcanary_ledger_errors_total",
            "Failed operations on the ledger in the state dir, by operation (open, write, read, check).",
            &["op"],
        );
        for op in crate::ledger::OPS {
            ledger_errors.with_label_values(&[op]);
        }
        let ledger_recovered = register(
            &registry,
            IntCounter::new(
                "mailcanary_ledger_recovered_total",
                "Corrupt ledger files moved aside (ledger.redb.corrupt-<unix time> in the state dir) and replaced by a fresh ledger; the canaries in flight in them were not resumed.",
            ),
        );
        // Per mailbox of a probe (the config's name, never the address): delivery judged
        // mailbox by mailbox, so "mail to one provider is late" is one query.
        let placement = counter(
            "mailcanary_delivery_placement_total",
            "Delivered canaries by the folder of the mailbox they were found in (inbox, junk).",
            &["probe", "mailbox", "folder"],
        );
        let mailbox_failures = counter(
            "mailcanary_delivery_failures_total",
            "Delivery failures by mailbox and reason (deadline, spam, and the watcher's connect, tls, auth, protocol, timeout).",
            &["probe", "mailbox", "reason"],
        );
        let mailbox_late = counter(
            "mailcanary_delivery_late_total",
            "Deliveries into the mailbox that arrived after the delivery deadline.",
            &["probe", "mailbox"],
        );
        let mailbox_duration = register(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "mailcanary_delivery_duration_seconds",
                    "Delivery stage durations by mailbox, late ones included.",
                )
                .buckets(DURATION_BUCKETS.to_vec()),
                &["probe", "mailbox"],
            ),
        );
        let mailbox_overdue = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "mailcanary_delivery_overdue",
                    "Canaries past the delivery deadline and still awaited in the mailbox.",
                ),
                &["probe", "mailbox"],
            ),
        );
        let mailbox_deadline = register(
            &registry,
            GaugeVec::new(
                Opts::new(
                    "mailcanary_delivery_deadline_seconds",
                    "The delivery deadline a new canary for the mailbox gets: fixed, or learned (\"auto\") from that mailbox's own deliveries.",
                ),
                &["probe", "mailbox"],
            ),
        );
        let mailbox_success = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "mailcanary_mailbox_success",
                    "1 unless the mailbox's watcher is failing, a canary is overdue in it, or its newest delivery was late, in Junk or lost.",
                ),
                &["probe", "mailbox"],
            ),
        );
        let hop_duration = register(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "mailcanary_hop_duration_seconds",
                    "Delay of each hop of a delivered canary's Received chain (its date minus the previous hop's, the first's minus the send time; clamped at zero), by position from the first hop.",
                )
                .buckets(HOP_BUCKETS.to_vec()),
                &["probe", "hop"],
            ),
        );
        let delivery_tls = counter(
            "mailcanary_delivery_tls_total",
            "Delivered canaries by whether every hop of their Received chain used TLS (all_hops) or one was plaintext (some_plaintext).",
            &["probe", "result"],
        );
        let delivery_auth = counter(
            "mailcanary_delivery_auth_total",
            "Delivered canaries by authentication method and verdict, from the receiving server's trusted Authentication-Results (none: not reported).",
            &["probe", "method", "result"],
        );
        let delivery_verified = counter(
            "mailcanary_delivery_verified_total",
            "Delivered canaries by the prober's own DKIM and ARC verification (verify_dkim), by verdict; series only for probes that verify.",
            &["probe", "method", "result"],
        );
        let duration = register(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "mailcanary_stage_duration_seconds",
                    "Time a canary spent in a stage, including stages completed late.",
                )
                .buckets(DURATION_BUCKETS.to_vec()),
                &["probe", "stage"],
            ),
        );
        let in_flight = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "mailcanary_stage_in_flight",
                    "Canaries currently waiting in a stage.",
                ),
                &["probe", "stage"],
            ),
        );
        let overdue = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "mailcanary_stage_overdue",
                    "Canaries past the stage's deadline and still waiting in it.",
                ),
                &["probe", "stage"],
            ),
        );
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            register(&registry, GaugeVec::new(Opts::new(name, help), labels))
        };
        let rate_limit_remaining = gauge(
            "mailcanary_helpdesk_rate_limit_remaining",
            "Requests left in the helpdesk account's rate limit, as the vendor's last answer to this probe said (NaN until one says, or where the vendor does not).",
            &["probe"],
        );
        let deadline = gauge(
            "mailcanary_stage_deadline_seconds",
            "The deadline a new canary gets in the stage: fixed, or learned (\"auto\").",
            &["probe", "stage"],
        );
        let last_success = gauge(
            "mailcanary_stage_last_success_timestamp_seconds",
            "Unix time the stage last completed within its deadline, 0 if never since start.",
            &["probe", "stage"],
        );
        let probe_success = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "mailcanary_probe_success",
                    "1 unless a canary of the probe is overdue or failing, or the newest one failed.",
                ),
                &["probe"],
            ),
        );
        let build_info = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "mailcanary_build_info",
                    "Always 1; its labels name the running build.",
                ),
                &["version", "revision"],
            ),
        );
        build_info.with_label_values(&[version, revision]).set(1);
        let config_reload = register(
            &registry,
            IntGauge::new(
                "mailcanary_config_last_reload_successful",
                "1 if the last load of the configuration succeeded, 0 if it failed.",
            ),
        );
        let shard_info = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "mailcanary_shard_info",
                    "1, labelled with the shard this prober runs (--shard K/N; 0 of 1 unsharded).",
                ),
                &["shard", "shards"],
            ),
        );
        shard_info.with_label_values(&["0", "1"]).set(1);
        let probes_configured = register(
            &registry,
            IntGauge::new(
                "mailcanary_probes_configured",
                "Probes in the configuration, before sharding: what every shard together must own.",
            ),
        );
        let probes_owned = register(
            &registry,
            IntGauge::new(
                "mailcanary_probes_owned",
                "Probes this prober runs: its shard's share of mailcanary_probes_configured.",
            ),
        );
        Metrics {
            registry,
            shard_info,
            probes_configured,
            probes_owned,
            sent,
            completed,
            duration,
            failures,
            late,
            lost,
            in_flight,
            overdue,
            live: Mutex::new(BTreeMap::new()),
            deadline,
            last_success,
            probe_success,
            ignored,
            skipped,
            duplicate_tickets,
            heartbeat_errors,
            webhooks,
            message_ids,
            rate_limit_remaining,
            ledger_errors,
            ledger_recovered,
            placement,
            mailbox_duration,
            mailbox_failures,
            mailbox_late,
            mailbox_overdue,
            mailbox_deadline,
            mailbox_success,
            hop_duration,
            delivery_tls,
            delivery_auth,
            delivery_verified,
            config_reload,
            registered: Mutex::new(HashMap::new()),
            changes: AtomicU64::new(0),
            cache: Mutex::new(None),
        }
    }

    /// Creates every series of `probe` at 0; `stages` are the probe's planned stages plus
    /// `EndToEnd`. Registering a probe again (a config reload) adds series for new stages and
    /// leaves existing ones alone.
    ///
    /// `mailcanary_probe_success` starts at 1: at start-up there is no evidence of failure yet,
    /// and a restart (a rolling update) must not page anyone. A probe that never gets a canary
    /// through is caught within one deadline anyway: the stalled canary makes the flow set it
    /// to 0, and `mailcanary_stage_oldest_in_flight_seconds` climbs from the first second. The
    /// flow resuming overdue canaries from the ledger sets it to 0 as soon as it has looked.
    pub fn register_probe(&self, probe: &str, stages: &[Stage]) {
        let mut registered = self
            .registered
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let known = match registered.get_mut(probe) {
            Some(known) => known,
            None => {
                self.sent.with_label_values(&[probe]);
                self.completed.with_label_values(&[probe]);
                self.probe_success.with_label_values(&[probe]).set(1);
                for reason in Ignored::ALL {
                    self.ignored.with_label_values(&[probe, reason.as_str()]);
                }
                for reason in Skipped::ALL {
                    self.skipped.with_label_values(&[probe, reason.as_str()]);
                }
                self.duplicate_tickets.with_label_values(&[probe]);
                self.heartbeat_errors.with_label_values(&[probe]);
                for result in WEBHOOK_RESULTS {
                    self.webhooks.with_label_values(&[probe, result]);
                }
                for result in MESSAGE_ID_RESULTS {
                    self.message_ids.with_label_values(&[probe, result]);
                }
                self.rate_limit_remaining
                    .with_label_values(&[probe])
                    .set(f64::NAN);
                // The hop histograms and the verdicts per method and result are not created
                // here: 5 hop positions of 8 series and 4 methods of 9 results were 76 of a
                // probe's 334 series, most of which a probe never uses (a route has 2 or 3
                // hops, and one verdict per method). They appear with the first delivered
                // canary that reports them; a failed requirement is alerted on through
                // `stage_failures_total{reason="tls"|"auth_result"}`, which exists from the
                // start, and the two TLS results stay here for `rate()` over them.
                for result in TLS_RESULTS {
                    self.delivery_tls.with_label_values(&[probe, result]);
                }
                registered.entry(probe.to_string()).or_default()
            }
        };
        for &stage in stages {
            if !known.insert(stage) {
                continue;
            }
            let ps = [probe, stage.as_str()];
            self.duration.with_label_values(&ps);
            for reason in Reason::ALL {
                self.failures
                    .with_label_values(&[probe, stage.as_str(), reason.as_str()]);
            }
            self.late.with_label_values(&ps);
            self.lost.with_label_values(&ps);
            self.in_flight.with_label_values(&ps).set(0);
            self.overdue.with_label_values(&ps).set(0);
            lock(&self.live)
                .entry(probe.to_string())
                .or_default()
                .push((stage, LIVE_AT_START));
            // Set by the flow before the first canary (0 only in between).
            self.deadline.with_label_values(&ps);
            self.last_success.with_label_values(&ps);
        }
        self.changed();
    }

    /// Creates every per-mailbox series of `probe` (`mailbox_success` at 1, as
    /// `probe_success`).
    pub fn register_mailboxes(&self, probe: &str, mailboxes: &[String]) {
        for m in mailboxes {
            let pm = [probe, m.as_str()];
            for folder in Folder::ALL {
                self.placement
                    .with_label_values(&[probe, m.as_str(), folder.as_str()]);
            }
            for reason in Reason::ALL {
                self.mailbox_failures
                    .with_label_values(&[probe, m.as_str(), reason.as_str()]);
            }
            self.mailbox_duration.with_label_values(&pm);
            self.mailbox_late.with_label_values(&pm);
            self.mailbox_overdue.with_label_values(&pm).set(0);
            self.mailbox_deadline.with_label_values(&pm);
            self.mailbox_success.with_label_values(&pm).set(1);
        }
        self.changed();
    }

    /// Counts the delivery transitions of a canary for `mailbox`, in `folder` (where it was
    /// found; inbox for a canary not yet found). Called beside [`Metrics::apply`].
    pub fn apply_mailbox(
        &self,
        probe: &str,
        mailbox: &str,
        folder: Folder,
        transitions: &[Transition],
    ) {
        let pm = [probe, mailbox];
        for t in transitions {
            match *t {
                Transition::StageDone {
                    stage: Stage::Delivery,
                    duration_ms,
                    late,
                } => {
                    self.mailbox_duration
                        .with_label_values(&pm)
                        .observe(duration_ms as f64 / 1000.0);
                    if late {
                        self.mailbox_late.with_label_values(&pm).inc();
                    }
                    self.placement
                        .with_label_values(&[probe, mailbox, folder.as_str()])
                        .inc();
                }
                Transition::StageFailed {
                    stage: Stage::Delivery,
                    reason,
                } => self.mailbox_failure(probe, mailbox, reason),
                _ => {}
            }
        }
        self.changed();
    }

    /// Counts a delivered canary's route: every hop's delay, whether all hops used TLS, one
    /// verdict per method. Called once per canary, with the transition that ends its delivery.
    pub fn apply_route(&self, probe: &str, route: &Route) {
        for (i, hop) in route.hops.iter().enumerate() {
            // The hop's series exists from its first canary on, observed or not (a hop
            // without a date is not observed).
            let label = HOP_LABELS[i.min(HOP_LABELS.len() - 1)];
            let series = self.hop_duration.with_label_values(&[probe, label]);
            if let Some(ms) = hop.delay_ms {
                series.observe(ms as f64 / 1000.0);
            }
        }
        let tls = if route.all_tls() { 0 } else { 1 };
        self.delivery_tls
            .with_label_values(&[probe, TLS_RESULTS[tls]])
            .inc();
        for method in AuthMethod::ALL {
            self.delivery_auth
                .with_label_values(&[probe, method.as_str(), route.verdict(method).as_str()])
                .inc();
        }
        for v in &route.verified {
            self.delivery_verified
                .with_label_values(&[probe, v.method.as_str(), v.result.as_str()])
                .inc();
        }
        self.changed();
    }

    /// Creates the series of the prober's own verification for a probe that does it
    /// (`verify_dkim`): method `dkim` and `arc`, every result, at 0.
    pub fn register_verification(&self, probe: &str) {
        for method in [AuthMethod::Dkim, AuthMethod::Arc] {
            for result in AuthResult::ALL {
                self.delivery_verified.with_label_values(&[
                    probe,
                    method.as_str(),
                    result.as_str(),
                ]);
            }
        }
        self.changed();
    }

    /// A delivery failure of one mailbox (its watcher failing, or a canary's).
    pub fn mailbox_failure(&self, probe: &str, mailbox: &str, reason: Reason) {
        self.mailbox_failures
            .with_label_values(&[probe, mailbox, reason.as_str()])
            .inc();
        self.changed();
    }

    pub fn set_mailbox(&self, probe: &str, mailbox: &str, overdue: usize, ok: bool) {
        let pm = [probe, mailbox];
        self.put_int(&self.mailbox_overdue.with_label_values(&pm), overdue as i64);
        self.put_int(&self.mailbox_success.with_label_values(&pm), i64::from(ok));
    }

    /// Counts what a canary's life returned. `now_ms` (Unix milliseconds) is when the
    /// transitions were observed; it stamps `last_success`.
    ///
    /// `last_success` moves only for a stage done within its deadline. A late completion was
    /// already counted as a failure (`reason="deadline"`), so calling it a success would make
    /// "time since last success" look healthy while every canary still misses its deadline; that
    /// the stage is moving again shows in the duration histogram and `stage_late_total`, and a
    /// stall (nothing moving at all) in `stage_oldest_in_flight_seconds`.
    ///
    /// Failed and lost canaries end without `completed_total`: they were counted by their
    /// `StageFailed` or `Lost` transition.
    pub fn apply(&self, probe: &str, transitions: &[Transition], now_ms: u64) {
        for transition in transitions {
            match *transition {
                Transition::StageDone {
                    stage,
                    duration_ms,
                    late,
                } => {
                    let ps = [probe, stage.as_str()];
                    self.duration
                        .with_label_values(&ps)
                        .observe(duration_ms as f64 / 1000.0);
                    if late {
                        self.late.with_label_values(&ps).inc();
                    } else {
                        self.last_success
                            .with_label_values(&ps)
                            .set(now_ms as f64 / 1000.0);
                    }
                }
                Transition::StageFailed { stage, reason } => {
                    self.failures
                        .with_label_values(&[probe, stage.as_str(), reason.as_str()])
                        .inc();
                }
                Transition::Lost { stage } => {
                    self.lost.with_label_values(&[probe, stage.as_str()]).inc();
                }
                Transition::Finished {
                    outcome: Outcome::OnTime | Outcome::Late,
                } => {
                    self.completed.with_label_values(&[probe]).inc();
                }
                Transition::Finished {
                    outcome: Outcome::Failed | Outcome::Lost,
                } => {}
            }
        }
        self.changed();
    }

    /// After a restart, restores `last_success` from what the ledger remembers (the recent
    /// canaries' on-time stages), so "time since last success" does not start from 1970. Never
    /// moves the timestamp back.
    pub fn restore_last_success(&self, probe: &str, stage: Stage, at_ms: u64) {
        let gauge = self
            .last_success
            .with_label_values(&[probe, stage.as_str()]);
        let at = at_ms as f64 / 1000.0;
        if at > gauge.get() {
            gauge.set(at);
        }
        self.changed();
    }

    /// A canary of `probe` is being sent.
    pub fn sent(&self, probe: &str) {
        self.sent.with_label_values(&[probe]).inc();
        self.changed();
    }

    /// A message was not counted as a canary's arrival.
    pub fn ignored(&self, probe: &str, reason: Ignored) {
        self.ignored
            .with_label_values(&[probe, reason.as_str()])
            .inc();
        self.changed();
    }

    /// A canary of `probe` that was due was not sent.
    pub fn skipped(&self, probe: &str, reason: Skipped) {
        self.skipped
            .with_label_values(&[probe, reason.as_str()])
            .inc();
        self.changed();
    }

    /// The helpdesk made `extra` tickets more than one from one canary mail of `probe`.
    pub fn duplicate_tickets(&self, probe: &str, extra: u64) {
        self.duplicate_tickets
            .with_label_values(&[probe])
            .inc_by(extra);
        self.changed();
    }

    /// A webhook for `probe` arrived: `result` is one of [`WEBHOOK_RESULTS`].
    pub fn webhook(&self, probe: &str, result: &str) {
        self.webhooks.with_label_values(&[probe, result]).inc();
        self.changed();
    }

    /// The helpdesk said which mail a ticket of `probe` was made from: `result` is one of
    /// [`MESSAGE_ID_RESULTS`].
    pub fn message_id(&self, probe: &str, result: &str) {
        self.message_ids.with_label_values(&[probe, result]).inc();
        self.changed();
    }

    /// What the helpdesk last said about the account's rate limit.
    pub fn set_rate_limit_remaining(&self, probe: &str, remaining: u64) {
        self.put(
            &self.rate_limit_remaining.with_label_values(&[probe]),
            remaining as f64,
        );
    }

    /// A heartbeat ping of `probe` failed.
    pub fn heartbeat_error(&self, probe: &str) {
        self.heartbeat_errors.with_label_values(&[probe]).inc();
        self.changed();
    }

    /// An operation on the ledger failed; `op` is one of [`crate::ledger::OPS`].
    pub fn ledger_error(&self, op: &str) {
        self.ledger_errors.with_label_values(&[op]).inc();
        self.changed();
    }

    /// `n` corrupt ledger files were moved aside and replaced by fresh ones.
    pub fn ledger_recovered(&self, n: u64) {
        if n > 0 {
            self.ledger_recovered.inc_by(n);
            self.changed();
        }
    }

    /// How many canaries wait in `stage`, how many of them are past its deadline, and since
    /// when (canary time, ms) the oldest has waited in it (`None`: none waits).
    pub fn set_in_flight(
        &self,
        probe: &str,
        stage: Stage,
        count: usize,
        overdue: usize,
        oldest_since_ms: Option<u64>,
    ) {
        let ps = [probe, stage.as_str()];
        let n = |x: usize| i64::try_from(x).unwrap_or(i64::MAX);
        self.put_int(&self.in_flight.with_label_values(&ps), n(count));
        self.put_int(&self.overdue.with_label_values(&ps), n(overdue));
        let oldest = oldest_since_ms.map_or(Live::Value(0.0), Live::age);
        self.put_live(probe, stage, LIVE_OLDEST, oldest);
    }

    /// The stage's backlog (seconds behind) and the drain ETA (NaN: not draining; +Inf: not
    /// catching up), as what they grow from.
    pub fn set_backlog(&self, probe: &str, stage: Stage, backlog: Live, eta: Live) {
        self.put_live(probe, stage, LIVE_BACKLOG, backlog);
        self.put_live(probe, stage, LIVE_DRAIN_ETA, eta);
    }

    /// Sets one live gauge of a registered probe and stage (no allocation: the ticker sets
    /// every probe's 4 times a second).
    fn put_live(&self, probe: &str, stage: Stage, which: usize, value: Live) {
        let mut live = lock(&self.live);
        if let Some(v) = live
            .get_mut(probe)
            .and_then(|stages| stages.iter_mut().find(|(s, _)| *s == stage))
        {
            v.1[which] = value;
        }
    }

    /// The deadline new canaries of `probe` get in `stage`.
    pub fn set_deadline(&self, probe: &str, stage: Stage, seconds: f64) {
        self.put(
            &self.deadline.with_label_values(&[probe, stage.as_str()]),
            seconds,
        );
    }

    /// The delivery deadline new canaries of `probe` for `mailbox` get.
    pub fn set_mailbox_deadline(&self, probe: &str, mailbox: &str, seconds: f64) {
        self.put(
            &self.mailbox_deadline.with_label_values(&[probe, mailbox]),
            seconds,
        );
    }

    pub fn set_probe_success(&self, probe: &str, ok: bool) {
        self.put_int(
            &self.probe_success.with_label_values(&[probe]),
            i64::from(ok),
        );
    }

    pub fn set_config_reload(&self, ok: bool) {
        self.config_reload.set(i64::from(ok));
        self.changed();
    }

    /// This prober runs shard `k` of `n`: `owned` of the `configured` probes.
    pub fn set_shard(&self, k: u32, n: u32, configured: usize, owned: usize) {
        self.shard_info.reset();
        self.shard_info
            .with_label_values(&[&k.to_string(), &n.to_string()])
            .set(1);
        self.probes_configured.set(configured as i64);
        self.probes_owned.set(owned as i64);
        self.changed();
    }

    /// Something a scrape shows changed: the cached exposition is stale. Called after the
    /// change, so a render that read the older count re-renders at the next scrape.
    fn changed(&self) {
        self.changes.fetch_add(1, Ordering::SeqCst);
    }

    /// Sets a gauge, counting a change only when the value moved (the ticker sets every
    /// probe's gauges 4 times a second, mostly to the value they have).
    fn put(&self, gauge: &Gauge, value: f64) {
        if gauge.get().to_bits() != value.to_bits() {
            gauge.set(value);
            self.changed();
        }
    }

    fn put_int(&self, gauge: &IntGauge, value: i64) {
        if gauge.get() != value {
            gauge.set(value);
            self.changed();
        }
    }

    /// The text exposition format (`text/plain; version=0.0.4`), for `GET /metrics`.
    pub fn render(&self) -> String {
        String::from_utf8_lossy(&self.exposition()).into_owned()
    }

    /// The exposition: the registry's part, rendered again only when something in it changed
    /// since the last render (a render of 1,000 probes costs about 0.2 s of CPU; an unchanged
    /// one is a copy of a pointer; one render at a time: scrapes arriving during one wait for
    /// it and share it), then the live gauges' part, rendered for this moment.
    pub fn exposition(&self) -> Bytes {
        let [cached, live] = self.exposition_parts();
        let mut body = Vec::with_capacity(cached.len() + live.len());
        body.extend_from_slice(&cached);
        body.extend_from_slice(&live);
        Bytes::from(body)
    }

    /// [`Metrics::exposition`] as its two parts, the cached one shared rather than copied:
    /// `GET /metrics` sends them one after the other (at 1,000 probes the cached part is
    /// about 25 MB, which a joined copy would move at every scrape).
    pub fn exposition_parts(&self) -> [Bytes; 2] {
        let cached = self.cached_exposition();
        let live = Bytes::from(self.render_live(crate::clock::now_ms()));
        [cached, live]
    }

    fn cached_exposition(&self) -> Bytes {
        let mut cache = lock(&self.cache);
        // Read before gathering: a change made during the gather bumps it past this.
        let changes = self.changes.load(Ordering::SeqCst);
        if let Some((at, body)) = &*cache
            && *at == changes
        {
            return body.clone();
        }
        let body = Bytes::from(
            TextEncoder::new()
                .encode_to_string(&self.registry.gather())
                .unwrap_or_else(|err| {
                    // Only an empty family fails to encode, and `gather` leaves those out.
                    tracing::error!(error = %err, "encoding metrics");
                    String::new()
                }),
        );
        *cache = Some((changes, body.clone()));
        body
    }

    /// The live gauges at canary time `now_ms`, in the text format, each family with its HELP
    /// and TYPE, series in probe and stage order.
    fn render_live(&self, now_ms: u64) -> String {
        use std::fmt::Write as _;
        let live = lock(&self.live);
        let mut out = String::with_capacity(live.len() * 3 * 5 * 96 + 1024);
        if live.is_empty() {
            return out;
        }
        for (which, (name, help)) in LIVE_FAMILIES.iter().enumerate() {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (probe, stages) in live.iter() {
                for (stage, values) in stages {
                    // Probe names are validated by the config: nothing to escape.
                    let _ = writeln!(
                        out,
                        "{name}{{probe=\"{probe}\",stage=\"{}\"}} {}",
                        stage.as_str(),
                        format_value(values[which].at(now_ms))
                    );
                }
            }
        }
        out
    }
}

/// Per probe, in name order, its stages' live gauges in [`LIVE_FAMILIES`] order.
type LiveGauges = BTreeMap<String, Vec<(Stage, [Live; 3])>>;

/// A gauge whose value is measured from something, at the moment it is read.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Live {
    /// This value (NaN and ±Inf included).
    Value(f64),
    /// `scale` × the seconds since `since_ms` (canary time), 0 before it.
    Since { since_ms: u64, scale: f64 },
}

impl Live {
    /// The seconds since `since_ms`.
    pub fn age(since_ms: u64) -> Live {
        Live::Since {
            since_ms,
            scale: 1.0,
        }
    }

    /// The value at canary time `now_ms`.
    pub fn at(self, now_ms: u64) -> f64 {
        match self {
            Live::Value(v) => v,
            Live::Since { since_ms, scale } => {
                scale * (now_ms.saturating_sub(since_ms) as f64 / 1000.0)
            }
        }
    }
}

const LIVE_OLDEST: usize = 0;
const LIVE_BACKLOG: usize = 1;
const LIVE_DRAIN_ETA: usize = 2;
/// Before the flow says anything: nothing waits, no backlog, not draining.
const LIVE_AT_START: [Live; 3] = [Live::Value(0.0), Live::Value(0.0), Live::Value(f64::NAN)];

/// The live families, in `[Live; 3]` order: name and HELP text.
const LIVE_FAMILIES: [(&str, &str); 3] = [
    (
        "mailcanary_stage_oldest_in_flight_seconds",
        "Age in the stage of the oldest canary waiting in it, 0 when none is.",
    ),
    (
        "mailcanary_stage_backlog_seconds",
        "How far behind the stage's backlog is: now minus the stage start of the newest held canary through it (0 when nothing is overdue).",
    ),
    (
        "mailcanary_stage_drain_eta_seconds",
        "Seconds until the stage's backlog is drained at its current pace: +Inf when not catching up, NaN when not draining.",
    ),
];

/// A sample value as the text format writes it (as the prometheus crate's encoder does).
fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_string()
    } else if v == f64::INFINITY {
        "+Inf".to_string()
    } else if v == f64::NEG_INFINITY {
        "-Inf".to_string()
    } else {
        v.to_string()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Registers a collector built from constant names. Failing here is a programming error (a bad
/// or duplicate name), caught by every test that builds a [`Metrics`].
fn register<C: Collector + Clone + 'static>(
    registry: &Registry,
    collector: prometheus::Result<C>,
) -> C {
    let collector = collector.expect("metric definition is valid");
    registry
        .register(Box::new(collector.clone()))
        .expect("metric names are unique");
    collector
}

/// A tiny reader of the text exposition format, to assert on metrics by name and labels rather
/// than by searching the text (as linkerd2-proxy's tests do). Public, not `cfg(test)`, because
/// integration tests use it.
///
/// ```
/// use mailcanary::metrics::testing::parse_exposition;
/// let s = parse_exposition("# TYPE x_total counter\nx_total{stage=\"import\",probe=\"p\"} 2\n");
/// assert_eq!(s.value("x_total", &[("probe", "p"), ("stage", "import")]), Some(2.0));
/// ```
pub mod testing {
    use std::collections::BTreeMap;

    /// One sample line: its full name (with `_bucket`, `_sum` or `_count` for a histogram),
    /// labels and value.
    #[derive(Clone, Debug, PartialEq)]
    pub struct Sample {
        pub name: String,
        pub labels: BTreeMap<String, String>,
        pub value: f64,
    }

    impl Sample {
        pub fn label(&self, name: &str) -> Option<&str> {
            self.labels.get(name).map(String::as_str)
        }
    }

    /// Every sample of an exposition, and the `# TYPE` of every family.
    #[derive(Clone, Debug, Default)]
    pub struct Samples {
        pub samples: Vec<Sample>,
        /// Family name → type (`counter`, `gauge`, `histogram`, ...), in order of appearance.
        pub types: Vec<(String, String)>,
    }

    impl Samples {
        /// The value of the one sample named exactly `name` whose labels are exactly `labels`
        /// (in any order). A histogram's series are `NAME_bucket` (with `le`), `NAME_sum` and
        /// `NAME_count`.
        pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
            let want: BTreeMap<&str, &str> = labels.iter().copied().collect();
            self.samples
                .iter()
                .find(|s| {
                    s.name == name
                        && s.labels.len() == want.len()
                        && want.iter().all(|(k, v)| s.label(k) == Some(v))
                })
                .map(|s| s.value)
        }

        /// The samples of a family: those named `family`, plus `_bucket`, `_sum`, `_count` for a
        /// histogram or summary.
        pub fn family(&self, family: &str) -> Vec<&Sample> {
            self.samples
                .iter()
                .filter(|s| family_of(&s.name, &self.types) == family)
                .collect()
        }

        /// The family a sample name belongs to.
        pub fn family_of<'a>(&'a self, name: &'a str) -> &'a str {
            family_of(name, &self.types)
        }
    }

    fn family_of<'a>(name: &'a str, types: &[(String, String)]) -> &'a str {
        if types.iter().any(|(f, _)| f == name) {
            return name;
        }
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix)
                && types
                    .iter()
                    .any(|(f, t)| f == base && (t == "histogram" || t == "summary"))
            {
                return base;
            }
        }
        name
    }

    /// Parses the text exposition format.
    ///
    /// # Panics
    ///
    /// On a line it cannot read, naming it: this is for tests. See [`try_parse_exposition`].
    pub fn parse_exposition(text: &str) -> Samples {
        try_parse_exposition(text).unwrap_or_else(|err| panic!("{err}"))
    }

    /// Parses the text exposition format; an error names the line it could not read.
    pub fn try_parse_exposition(text: &str) -> Result<Samples, String> {
        let mut out = Samples::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            let bad = |why: &str| format!("exposition line {}: {why}: {line:?}", n + 1);
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix('#') {
                let mut words = rest.split_whitespace();
                if words.next() == Some("TYPE") {
                    let (Some(name), Some(kind)) = (words.next(), words.next()) else {
                        return Err(bad("TYPE needs a name and a type"));
                    };
                    out.types.push((name.to_string(), kind.to_string()));
                }
                continue;
            }
            let name_end = line
                .find(|c: char| c == '{' || c.is_whitespace())
                .ok_or_else(|| bad("no value"))?;
            let name = &line[..name_end];
            let mut rest = &line[name_end..];
            let mut labels = BTreeMap::new();
            if let Some(after) = rest.strip_prefix('{') {
                rest = parse_labels(after, &mut labels).map_err(bad)?;
            }
            let value = rest
                .split_whitespace()
                .next()
                .ok_or_else(|| bad("no value"))?;
            let value = parse_value(value).ok_or_else(|| bad("bad value"))?;
            out.samples.push(Sample {
                name: name.to_string(),
                labels,
                value,
            });
        }
        Ok(out)
    }

    /// Reads `k="v",k2="v2"}` and returns what follows the `}`.
    fn parse_labels<'a>(
        mut s: &'a str,
        labels: &mut BTreeMap<String, String>,
    ) -> Result<&'a str, &'static str> {
        loop {
            s = s.trim_start();
            if let Some(rest) = s.strip_prefix('}') {
                return Ok(rest);
            }
            let eq = s.find('=').ok_or("label without '='")?;
            let key = s[..eq].trim().to_string();
            s = s[eq + 1..]
                .trim_start()
                .strip_prefix('"')
                .ok_or("label value not quoted")?;
            let mut value = String::new();
            let mut chars = s.char_indices();
            let end = loop {
                match chars.next() {
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => return Err("unterminated escape"),
                    },
                    Some((_, c)) => value.push(c),
                    None => return Err("unterminated label value"),
                }
            };
            if labels.insert(key, value).is_some() {
                return Err("repeated label");
            }
            s = s[end + 1..].trim_start();
            s = s.strip_prefix(',').unwrap_or(s);
        }
    }

    fn parse_value(s: &str) -> Option<f64> {
        match s {
            "+Inf" => Some(f64::INFINITY),
            "-Inf" => Some(f64::NEG_INFINITY),
            "NaN" => Some(f64::NAN),
            _ => s.parse().ok(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{Samples, parse_exposition};
    use super::*;

    const PLAN: [Stage; 5] = [
        Stage::Submit,
        Stage::Import,
        Stage::Reply,
        Stage::Delivery,
        Stage::EndToEnd,
    ];

    fn metrics() -> Metrics {
        let m = Metrics::new("0.1.0", "abc1234");
        m.register_probe("helpdesk", &PLAN);
        m.register_probe("loop", &[Stage::Submit, Stage::Delivery, Stage::EndToEnd]);
        m
    }

    fn samples(m: &Metrics) -> Samples {
        parse_exposition(&m.render())
    }

    /// Families with a `stage` label, and whether they also take a `reason`.
    const STAGE_FAMILIES: [&str; 10] = [
        "mailcanary_stage_failures_total",
        "mailcanary_stage_late_total",
        "mailcanary_canaries_lost_total",
        "mailcanary_stage_in_flight",
        "mailcanary_stage_overdue",
        "mailcanary_stage_oldest_in_flight_seconds",
        "mailcanary_stage_last_success_timestamp_seconds",
        "mailcanary_stage_backlog_seconds",
        "mailcanary_stage_drain_eta_seconds",
        "mailcanary_stage_deadline_seconds",
    ];

    #[test]
    fn every_series_of_a_registered_probe_exists_at_zero() {
        let m = metrics();
        let s = samples(&m);
        for probe in ["helpdesk", "loop"] {
            let p = [("probe", probe)];
            assert_eq!(s.value("mailcanary_canaries_sent_total", &p), Some(0.0));
            assert_eq!(
                s.value("mailcanary_canaries_completed_total", &p),
                Some(0.0)
            );
            assert_eq!(s.value("mailcanary_probe_success", &p), Some(1.0));
            for reason in Ignored::ALL {
                let l = [("probe", probe), ("reason", reason.as_str())];
                assert_eq!(s.value("mailcanary_messages_ignored_total", &l), Some(0.0));
            }
        }
        for stage in PLAN {
            let ps = [("probe", "helpdesk"), ("stage", stage.as_str())];
            for family in STAGE_FAMILIES.into_iter().skip(1) {
                let v = s.value(family, &ps);
                if family == "mailcanary_stage_drain_eta_seconds" {
                    // Not draining: NaN, which no `> x` comparison in a rule matches.
                    assert!(v.is_some_and(f64::is_nan), "{family} {stage}: {v:?}");
                } else {
                    assert_eq!(v, Some(0.0), "{family} {stage}");
                }
            }
            for reason in Reason::ALL {
                let l = [
                    ("probe", "helpdesk"),
                    ("stage", stage.as_str()),
                    ("reason", reason.as_str()),
                ];
                assert_eq!(
                    s.value(STAGE_FAMILIES[0], &l),
                    Some(0.0),
                    "{stage} {reason}"
                );
            }
            let h = "mailcanary_stage_duration_seconds";
            assert_eq!(s.value(&format!("{h}_count"), &ps), Some(0.0));
            assert_eq!(s.value(&format!("{h}_sum"), &ps), Some(0.0));
            for le in ["0.05", "3600", "+Inf"] {
                let l = [("probe", "helpdesk"), ("stage", stage.as_str()), ("le", le)];
                assert_eq!(s.value(&format!("{h}_bucket"), &l), Some(0.0), "le={le}");
            }
        }
        // A mail-loop probe has no import or reply series.
        let import = [("probe", "loop"), ("stage", "import")];
        assert_eq!(s.value("mailcanary_stage_late_total", &import), None);
        assert_eq!(
            s.value(
                "mailcanary_build_info",
                &[("version", "0.1.0"), ("revision", "abc1234")]
            ),
            Some(1.0)
        );
        assert_eq!(
            s.value("mailcanary_config_last_reload_successful", &[]),
            Some(0.0)
        );

        // Every family of the README's Metrics table is there from the start, with the right
        // type, but for those that appear with the first delivered canary that reports them
        // (`hop_duration_seconds`, `delivery_auth_total`; see `apply_route`) and
        // `delivery_verified_total`, which only verifying probes have.
        let mut types = s.types.clone();
        types.sort();
        let want = [
            ("mailcanary_build_info", "gauge"),
            ("mailcanary_canaries_completed_total", "counter"),
            ("mailcanary_canaries_lost_total", "counter"),
            ("mailcanary_canaries_sent_total", "counter"),
            ("mailcanary_canaries_skipped_total", "counter"),
            ("mailcanary_config_last_reload_successful", "gauge"),
            ("mailcanary_delivery_tls_total", "counter"),
            ("mailcanary_heartbeat_errors_total", "counter"),
            ("mailcanary_helpdesk_duplicate_tickets_total", "counter"),
            ("mailcanary_helpdesk_rate_limit_remaining", "gauge"),
            ("mailcanary_import_message_id_total", "counter"),
            ("mailcanary_ledger_errors_total", "counter"),
            ("mailcanary_ledger_recovered_total", "counter"),
            ("mailcanary_messages_ignored_total", "counter"),
            ("mailcanary_probe_success", "gauge"),
            ("mailcanary_probes_configured", "gauge"),
            ("mailcanary_probes_owned", "gauge"),
            ("mailcanary_shard_info", "gauge"),
            ("mailcanary_stage_backlog_seconds", "gauge"),
            ("mailcanary_stage_deadline_seconds", "gauge"),
            ("mailcanary_stage_drain_eta_seconds", "gauge"),
            ("mailcanary_stage_duration_seconds", "histogram"),
            ("mailcanary_stage_failures_total", "counter"),
            ("mailcanary_stage_in_flight", "gauge"),
            ("mailcanary_stage_last_success_timestamp_seconds", "gauge"),
            ("mailcanary_stage_late_total", "counter"),
            ("mailcanary_stage_oldest_in_flight_seconds", "gauge"),
            ("mailcanary_stage_overdue", "gauge"),
            ("mailcanary_webhooks_total", "counter"),
        ];
        let want: Vec<_> = want
            .iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect();
        assert_eq!(types, want);
        // The ledger's errors exist per operation from the start.
        for op in crate::ledger::OPS {
            assert_eq!(
                s.value("mailcanary_ledger_errors_total", &[("op", op)]),
                Some(0.0)
            );
        }
        // Every sample of every family but the global ones belongs to a registered probe.
        for sample in &s.samples {
            let family = s.family_of(&sample.name);
            if family != "mailcanary_build_info"
                && family != "mailcanary_config_last_reload_successful"
                && family != "mailcanary_ledger_errors_total"
                && family != "mailcanary_ledger_recovered_total"
                && family != "mailcanary_shard_info"
                && family != "mailcanary_probes_configured"
                && family != "mailcanary_probes_owned"
            {
                assert!(sample.label("probe").is_some(), "{sample:?}");
            }
        }
    }

    #[test]
    fn label_values_are_only_names_never_data() {
        let m = metrics();
        let import = Stage::Import;
        m.sent("helpdesk");
        m.apply(
            "helpdesk",
            &[
                Transition::StageFailed {
                    stage: import,
                    reason: Reason::Api,
                },
                Transition::StageDone {
                    stage: import,
                    duration_ms: 1_500,
                    late: false,
                },
            ],
            1_700_000_000_000,
        );
        m.ignored("loop", Ignored::Forged);
        let s = samples(&m);
        let stages: Vec<&str> = Stage::ALL.iter().map(|s| s.as_str()).collect();
        let reasons: Vec<&str> = Reason::ALL
            .iter()
            .map(|r| r.as_str())
            .chain(Ignored::ALL.iter().map(|r| r.as_str()))
            .chain(Skipped::ALL.iter().map(|r| r.as_str()))
            .collect();
        let buckets: Vec<String> = DURATION_BUCKETS
            .iter()
            .chain(&HOP_BUCKETS)
            .map(|b| b.to_string())
            .chain(["+Inf".to_string()])
            .collect();
        for sample in &s.samples {
            for (k, v) in &sample.labels {
                let ok = match k.as_str() {
                    "probe" => v == "helpdesk" || v == "loop",
                    "stage" => stages.contains(&v.as_str()),
                    "reason" => reasons.contains(&v.as_str()),
                    "version" => v == "0.1.0",
                    "revision" => v == "abc1234",
                    "le" => buckets.contains(v),
                    "op" => crate::ledger::OPS.contains(&v.as_str()),
                    "shard" => v == "0",
                    "shards" => v == "1",
                    "result" => {
                        WEBHOOK_RESULTS.contains(&v.as_str())
                            || MESSAGE_ID_RESULTS.contains(&v.as_str())
                            || TLS_RESULTS.contains(&v.as_str())
                            || AuthResult::ALL.iter().any(|r| r.as_str() == v)
                    }
                    "hop" => HOP_LABELS.contains(&v.as_str()),
                    "method" => AuthMethod::ALL.iter().any(|m| m.as_str() == v),
                    _ => false,
                };
                assert!(ok, "label {k}={v:?} in {sample:?}");
            }
        }
    }

    #[test]
    fn a_late_import_counts_late_and_observes_its_true_duration() {
        let m = metrics();
        let now_ms = 1_700_000_000_000;
        m.apply(
            "helpdesk",
            &[Transition::StageDone {
                stage: Stage::Import,
                duration_ms: 400_000,
                late: true,
            }],
            now_ms,
        );
        let s = samples(&m);
        let ps = [("probe", "helpdesk"), ("stage", "import")];
        assert_eq!(s.value("mailcanary_stage_late_total", &ps), Some(1.0));
        assert_eq!(
            s.value("mailcanary_stage_duration_seconds_count", &ps),
            Some(1.0)
        );
        assert_eq!(
            s.value("mailcanary_stage_duration_seconds_sum", &ps),
            Some(400.0)
        );
        let bucket = |le| {
            s.value(
                "mailcanary_stage_duration_seconds_bucket",
                &[("le", le), ("stage", "import"), ("probe", "helpdesk")],
            )
        };
        assert_eq!(bucket("300"), Some(0.0));
        assert_eq!(bucket("600"), Some(1.0));
        assert_eq!(
            s.value("mailcanary_stage_last_success_timestamp_seconds", &ps),
            Some(0.0),
            "late is not a success"
        );
        let other = [("probe", "helpdesk"), ("stage", "delivery")];
        assert_eq!(s.value("mailcanary_stage_late_total", &other), Some(0.0));
    }

    #[test]
    fn a_route_counts_its_hops_tls_and_verdicts() {
        use crate::canary::hops::{Hop, Verdict};
        let m = metrics();
        let hop = |ms: Option<u64>, plaintext| Hop {
            delay_ms: ms,
            plaintext,
            ..Hop::default()
        };
        let route = Route {
            hops: vec![
                hop(Some(500), false),
                hop(None, false),
                hop(Some(2_000), true),
                hop(Some(0), false),
                hop(Some(40_000), false),
                hop(Some(1), false),
            ],
            auth: vec![
                Verdict {
                    method: AuthMethod::Dkim,
                    result: AuthResult::Pass,
                },
                Verdict {
                    method: AuthMethod::Spf,
                    result: AuthResult::Softfail,
                },
            ],
            untrusted_auth: 0,
            verified: Vec::new(),
        };
        m.apply_route("loop", &route);
        let s = samples(&m);
        let count = |hop: &str| {
            s.value(
                "mailcanary_hop_duration_seconds_count",
                &[("probe", "loop"), ("hop", hop)],
            )
        };
        assert_eq!(count("1"), Some(1.0));
        assert_eq!(count("2"), Some(0.0), "no date, no observation");
        assert_eq!(count("3"), Some(1.0));
        assert_eq!(count("5+"), Some(2.0), "hops 5 and 6");
        assert_eq!(
            s.value(
                "mailcanary_hop_duration_seconds_sum",
                &[("probe", "loop"), ("hop", "5+")]
            ),
            Some(40.001)
        );
        let tls = |r: &str| {
            s.value(
                "mailcanary_delivery_tls_total",
                &[("probe", "loop"), ("result", r)],
            )
        };
        assert_eq!(
            (tls("all_hops"), tls("some_plaintext")),
            (Some(0.0), Some(1.0))
        );
        let auth = |method: &str, result: &str| {
            s.value(
                "mailcanary_delivery_auth_total",
                &[("probe", "loop"), ("method", method), ("result", result)],
            )
        };
        assert_eq!(auth("dkim", "pass"), Some(1.0));
        assert_eq!(auth("spf", "softfail"), Some(1.0));
        assert_eq!(auth("dmarc", "none"), Some(1.0));
        assert_eq!(auth("arc", "none"), Some(1.0));
        // Only the verdicts seen have series: a probe's 36 possible ones are not created.
        assert_eq!(auth("dkim", "fail"), None);
        assert_eq!(auth("dmarc", "policy"), None);
        assert_eq!(count("4"), Some(1.0), "hop 4 seen, at 0 s");
        // The prober's own verification: series only for a probe that verifies.
        assert_eq!(
            s.value(
                "mailcanary_delivery_verified_total",
                &[("probe", "loop"), ("method", "dkim"), ("result", "pass")]
            ),
            None
        );
        m.register_verification("loop");
        let mut route = route.clone();
        route.verified = vec![Verdict {
            method: AuthMethod::Dkim,
            result: AuthResult::Temperror,
        }];
        m.apply_route("loop", &route);
        let s = samples(&m);
        let verified = |method: &str, result: &str| {
            s.value(
                "mailcanary_delivery_verified_total",
                &[("probe", "loop"), ("method", method), ("result", result)],
            )
        };
        assert_eq!(verified("dkim", "temperror"), Some(1.0));
        assert_eq!(verified("arc", "pass"), Some(0.0));
    }

    #[test]
    fn a_canary_life_maps_onto_counters() {
        let m = metrics();
        let now_ms = 1_700_000_000_250;
        let done = |stage, late| Transition::StageDone {
            stage,
            duration_ms: 100,
            late,
        };
        m.sent("loop");
        m.apply(
            "loop",
            &[
                done(Stage::Submit, false),
                done(Stage::Delivery, false),
                done(Stage::EndToEnd, false),
                Transition::Finished {
                    outcome: Outcome::OnTime,
                },
            ],
            now_ms,
        );
        m.apply(
            "loop",
            &[
                Transition::StageFailed {
                    stage: Stage::Delivery,
                    reason: Reason::Deadline,
                },
                Transition::Lost {
                    stage: Stage::Delivery,
                },
                Transition::Finished {
                    outcome: Outcome::Lost,
                },
            ],
            now_ms,
        );
        m.apply(
            "loop",
            &[
                Transition::StageFailed {
                    stage: Stage::Submit,
                    reason: Reason::Rejected,
                },
                Transition::Finished {
                    outcome: Outcome::Failed,
                },
            ],
            now_ms,
        );
        m.ignored("loop", Ignored::Duplicate);
        // Waiting since 42.5 s ago: the scrape shows the age as of itself.
        let since = crate::clock::now_ms() - 42_500;
        m.set_in_flight("loop", Stage::Delivery, 3, 1, Some(since));
        m.set_probe_success("loop", false);
        m.set_config_reload(true);
        m.restore_last_success("loop", Stage::Submit, 1_000);

        let s = samples(&m);
        let p = [("probe", "loop")];
        let ps = |stage| [("probe", "loop"), ("stage", stage)];
        let psr = |stage, reason| [("probe", "loop"), ("stage", stage), ("reason", reason)];
        assert_eq!(s.value("mailcanary_canaries_sent_total", &p), Some(1.0));
        assert_eq!(
            s.value("mailcanary_canaries_completed_total", &p),
            Some(1.0)
        );
        assert_eq!(
            s.value(
                "mailcanary_stage_last_success_timestamp_seconds",
                &ps("submit")
            ),
            Some(1_700_000_000.25),
            "restoring never moves it back"
        );
        assert_eq!(
            s.value(
                "mailcanary_stage_failures_total",
                &psr("delivery", "deadline")
            ),
            Some(1.0)
        );
        assert_eq!(
            s.value(
                "mailcanary_stage_failures_total",
                &psr("submit", "rejected")
            ),
            Some(1.0)
        );
        assert_eq!(
            s.value("mailcanary_canaries_lost_total", &ps("delivery")),
            Some(1.0)
        );
        assert_eq!(
            s.value(
                "mailcanary_messages_ignored_total",
                &[("probe", "loop"), ("reason", "duplicate")]
            ),
            Some(1.0)
        );
        assert_eq!(
            s.value("mailcanary_stage_in_flight", &ps("delivery")),
            Some(3.0)
        );
        let oldest = s
            .value("mailcanary_stage_oldest_in_flight_seconds", &ps("delivery"))
            .expect("oldest in flight");
        assert!((42.5..100.0).contains(&oldest), "{oldest}");
        assert_eq!(
            s.value("mailcanary_stage_overdue", &ps("delivery")),
            Some(1.0)
        );
        assert_eq!(s.value("mailcanary_probe_success", &p), Some(0.0));
        assert_eq!(
            s.value("mailcanary_config_last_reload_successful", &[]),
            Some(1.0)
        );
    }

    #[test]
    fn registering_again_adds_stages_and_resets_nothing() {
        let m = metrics();
        m.set_probe_success("loop", false);
        m.sent("loop");
        m.register_probe("loop", &[Stage::Submit, Stage::Import, Stage::EndToEnd]);
        let s = samples(&m);
        assert_eq!(
            s.value("mailcanary_probe_success", &[("probe", "loop")]),
            Some(0.0)
        );
        assert_eq!(
            s.value("mailcanary_canaries_sent_total", &[("probe", "loop")]),
            Some(1.0)
        );
        let import = [("probe", "loop"), ("stage", "import")];
        assert_eq!(s.value("mailcanary_stage_late_total", &import), Some(0.0));
    }

    #[test]
    fn the_matcher_reads_escapes_suffixes_and_any_label_order() {
        let s = parse_exposition(concat!(
            "# HELP h_seconds x\n",
            "# TYPE h_seconds histogram\n",
            "h_seconds_bucket{b=\"2\",a=\"1\",le=\"+Inf\"} 3\n",
            "h_seconds_sum{a=\"1\",b=\"2\"} 1.5\n",
            "h_seconds_count{a=\"1\",b=\"2\"} 3\n",
            "# TYPE c_count counter\n",
            "c_count{v=\"q\\\"u\\\\o\\nte, }\"} 7 1700000000000\n",
        ));
        assert_eq!(
            s.value(
                "h_seconds_bucket",
                &[("le", "+Inf"), ("a", "1"), ("b", "2")]
            ),
            Some(3.0)
        );
        assert_eq!(
            s.value("h_seconds_sum", &[("b", "2"), ("a", "1")]),
            Some(1.5)
        );
        assert_eq!(s.value("h_seconds", &[("a", "1"), ("b", "2")]), None);
        assert_eq!(
            s.value("h_seconds_sum", &[("a", "1")]),
            None,
            "labels match exactly"
        );
        assert_eq!(s.family("h_seconds").len(), 3);
        assert_eq!(
            s.family_of("c_count"),
            "c_count",
            "a counter named _count is its own"
        );
        assert_eq!(s.value("c_count", &[("v", "q\"u\\o\nte, }")]), Some(7.0));
        assert!(super::testing::try_parse_exposition("x{a=\"1} 2\n").is_err());
    }

    #[test]
    fn a_change_shows_at_the_next_render_and_an_unchanged_one_is_served_cached() {
        let m = metrics();
        let first = m.cached_exposition();
        let again = m.cached_exposition();
        assert_eq!(
            first.as_ptr(),
            again.as_ptr(),
            "unchanged: the cached render"
        );
        // Setting a gauge to the value it has is no change.
        m.set_probe_success("loop", true);
        assert_eq!(m.cached_exposition().as_ptr(), first.as_ptr());
        m.sent("loop");
        let s = parse_exposition(&m.render());
        assert_eq!(
            s.value("mailcanary_canaries_sent_total", &[("probe", "loop")]),
            Some(1.0)
        );
        m.set_in_flight("loop", Stage::Delivery, 2, 0, Some(crate::clock::now_ms()));
        let s = parse_exposition(&m.render());
        assert_eq!(
            s.value(
                "mailcanary_stage_in_flight",
                &[("probe", "loop"), ("stage", "delivery")]
            ),
            Some(2.0)
        );
    }

    /// A canary waiting in a stall: its age, the backlog and the drain ETA move at every
    /// scrape while nothing cached is rendered again (with 1,000 probes stalled, every scrape
    /// used to render the whole exposition because every age had moved since the last tick).
    #[test]
    fn a_waiting_canary_ages_at_every_scrape_without_a_render() {
        let m = metrics();
        let t0 = 1_000_000;
        m.set_in_flight("helpdesk", Stage::Import, 1, 1, Some(t0));
        m.set_backlog(
            "helpdesk",
            Stage::Import,
            Live::age(t0),
            Live::Since {
                since_ms: t0,
                scale: 0.5,
            },
        );
        let cached = m.cached_exposition();
        let at = |now: u64| parse_exposition(&m.render_live(now));
        let ps = [("probe", "helpdesk"), ("stage", "import")];
        for (now, age) in [(t0 + 1_500, 1.5), (t0 + 90_000, 90.0)] {
            let s = at(now);
            assert_eq!(
                s.value("mailcanary_stage_oldest_in_flight_seconds", &ps),
                Some(age)
            );
            assert_eq!(s.value("mailcanary_stage_backlog_seconds", &ps), Some(age));
            assert_eq!(
                s.value("mailcanary_stage_drain_eta_seconds", &ps),
                Some(age / 2.0)
            );
            // The other stages: nothing waits, no backlog, not draining.
            let pd = [("probe", "helpdesk"), ("stage", "delivery")];
            assert_eq!(
                s.value("mailcanary_stage_oldest_in_flight_seconds", &pd),
                Some(0.0)
            );
            assert!(
                s.value("mailcanary_stage_drain_eta_seconds", &pd)
                    .is_some_and(f64::is_nan)
            );
        }
        assert_eq!(
            m.cached_exposition().as_ptr(),
            cached.as_ptr(),
            "ages are not renders"
        );
        // Each family once, with its HELP and TYPE, in the whole exposition.
        let text = m.render();
        for (name, _) in LIVE_FAMILIES {
            assert_eq!(text.matches(&format!("# TYPE {name} gauge\n")).count(), 1);
        }
        m.set_backlog(
            "helpdesk",
            Stage::Import,
            Live::Value(0.0),
            Live::Value(f64::INFINITY),
        );
        assert_eq!(
            at(t0 + 5_000).value("mailcanary_stage_drain_eta_seconds", &ps),
            Some(f64::INFINITY)
        );
    }

    #[test]
    fn the_exposition_passes_promtool() {
        let m = metrics();
        m.apply(
            "helpdesk",
            &[Transition::StageDone {
                stage: Stage::Submit,
                duration_ms: 120,
                late: false,
            }],
            1_700_000_000_000,
        );
        let text = m.render();
        let child = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn();
        // tests/run.sh installs promtool (Debian's prometheus): a test that passed without it
        // would have checked nothing.
        let mut child = child.unwrap_or_else(|err| {
            panic!("starting promtool (tests/run.sh installs Debian's prometheus): {err}")
        });
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(text.as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
            "promtool check metrics: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
