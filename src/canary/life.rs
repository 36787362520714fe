//! The life of one canary: stages, deadlines, on time / overdue / late / lost.
//!
//! Architecture invariant: this module is pure. It never reads a clock, touches the network or
//! the disk; every function takes the current time (`now`, wall-clock Unix milliseconds) as an
//! argument and returns what changed. The ledger persists a [`Canary`], the metrics turn the
//! returned [`Transition`]s into counters, the flow feeds it observations, and the web layer
//! reads it. None of them decide a verdict themselves.
//!
//! Wall-clock milliseconds (not `Instant`) because a canary outlives the process: a restart must
//! resume its deadlines where they were.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A stage of a canary's trip. `EndToEnd` is derived: it starts with `Submit` and ends with the
/// last stage the probe uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Submit,
    Import,
    Reply,
    Delivery,
    EndToEnd,
}

impl Stage {
    pub const ALL: [Stage; 5] = [
        Stage::Submit,
        Stage::Import,
        Stage::Reply,
        Stage::Delivery,
        Stage::EndToEnd,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Submit => "submit",
            Stage::Import => "import",
            Stage::Reply => "reply",
            Stage::Delivery => "delivery",
            Stage::EndToEnd => "end_to_end",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a stage failed. A small fixed set: these become the `reason` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// TCP connect failed or timed out.
    Connect,
    /// TLS handshake or certificate verification failed; or, on the delivery stage, a hop of
    /// the delivered mail's `Received` chain was plaintext while the probe says
    /// `require_tls_hops`.
    Tls,
    /// The server refused our credentials.
    Auth,
    /// SMTP 5xx: the mail was refused for good.
    Rejected,
    /// SMTP 4xx: try again later.
    Tempfail,
    /// The peer spoke something we could not make sense of.
    Protocol,
    /// The helpdesk API answered an error or nonsense.
    Api,
    /// An operation took longer than its timeout.
    Timeout,
    /// The stage's deadline passed (the canary stays watched; it may still arrive late).
    Deadline,
    /// The prober could not record the canary in its ledger (state dir full, read-only or
    /// gone), so it did not send it: the prober, not the mail flow, is what failed.
    Ledger,
    /// The canary was delivered, but into the mailbox's Junk folder (and the probe does not
    /// say `junk_is_ok`): mail flows, deliverability does not.
    Spam,
    /// The OAuth2 token endpoint failed, could not be reached or refused the grant, or the
    /// token file could not be read: no token to log in with (a refused token is `auth`).
    Token,
    /// The canary was delivered, but a verdict the probe requires (`require_auth`) was not
    /// `pass` in the receiving server's trusted `Authentication-Results`.
    AuthResult,
}

impl Reason {
    pub const ALL: [Reason; 13] = [
        Reason::Connect,
        Reason::Tls,
        Reason::Auth,
        Reason::Rejected,
        Reason::Tempfail,
        Reason::Protocol,
        Reason::Api,
        Reason::Timeout,
        Reason::Deadline,
        Reason::Ledger,
        Reason::Spam,
        Reason::Token,
        Reason::AuthResult,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Connect => "connect",
            Reason::Tls => "tls",
            Reason::Auth => "auth",
            Reason::Rejected => "rejected",
            Reason::Tempfail => "tempfail",
            Reason::Protocol => "protocol",
            Reason::Api => "api",
            Reason::Timeout => "timeout",
            Reason::Deadline => "deadline",
            Reason::Ledger => "ledger",
            Reason::Spam => "spam",
            Reason::Token => "token",
            Reason::AuthResult => "auth_result",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Deadlines and the lost horizon, in milliseconds, as the probe's config resolved them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub submit_ms: u64,
    pub import_ms: u64,
    pub reply_ms: u64,
    pub delivery_ms: u64,
    pub end_to_end_ms: u64,
    pub lost_after_ms: u64,
}

impl Limits {
    /// Sets one stage's deadline (a learned one).
    pub fn set_deadline(&mut self, stage: Stage, ms: u64) {
        match stage {
            Stage::Submit => self.submit_ms = ms,
            Stage::Import => self.import_ms = ms,
            Stage::Reply => self.reply_ms = ms,
            Stage::Delivery => self.delivery_ms = ms,
            Stage::EndToEnd => self.end_to_end_ms = ms,
        }
    }

    pub fn deadline(&self, stage: Stage) -> u64 {
        match stage {
            Stage::Submit => self.submit_ms,
            Stage::Import => self.import_ms,
            Stage::Reply => self.reply_ms,
            Stage::Delivery => self.delivery_ms,
            Stage::EndToEnd => self.end_to_end_ms,
        }
    }
}

/// What happened to one stage so far.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageRecord {
    pub started_ms: Option<u64>,
    pub done_ms: Option<u64>,
    /// Set once the deadline passed; never unset (a late arrival is still a missed deadline).
    pub overdue: bool,
    /// A hard failure that ended the canary at this stage.
    pub failed: Option<Failure>,
    /// Errors met while the stage goes on (an API answering 500 while we poll for the ticket):
    /// one entry per reason, the latest detail kept. They make the probe fail, but the canary
    /// stays watched and may still complete (late or not).
    #[serde(default)]
    pub errors: Vec<Failure>,
    /// The stage ended at an unknown time (see [`Canary::skip_unknown`]).
    #[serde(default)]
    pub unknown: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub reason: Reason,
    /// Human-readable detail for the dashboard (never a secret; the edges make sure of that).
    pub detail: String,
    pub at_ms: u64,
}

/// How a canary ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Every stage done within its deadline.
    OnTime,
    /// Every stage done, at least one past its deadline.
    Late,
    /// A stage failed for good (e.g. SMTP 5xx).
    Failed,
    /// Still not done past the lost horizon.
    Lost,
}

impl Outcome {
    /// Whether this outcome makes the probe fail (`probe_success` 0).
    pub fn is_failure(self) -> bool {
        !matches!(self, Outcome::OnTime)
    }
}

/// Where in a mailbox a canary was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Folder {
    /// The folder the probe watches (`INBOX` unless configured otherwise).
    Inbox,
    /// The mailbox's Junk folder (`\Junk` by SPECIAL-USE, RFC 6154, or named in config).
    Junk,
}

impl Folder {
    pub const ALL: [Folder; 2] = [Folder::Inbox, Folder::Junk];

    pub fn as_str(self) -> &'static str {
        match self {
            Folder::Inbox => "inbox",
            Folder::Junk => "junk",
        }
    }
}

impl fmt::Display for Folder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One canary, as the ledger stores it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Canary {
    pub probe: String,
    /// The canary id inside the token.
    pub id: String,
    pub token: String,
    pub message_id: String,
    /// The stages this probe uses, in order (never `EndToEnd`).
    pub plan: Vec<Stage>,
    pub limits: Limits,
    /// When the SMTP connection was opened (end_to_end starts here).
    pub created_ms: u64,
    pub stages: Vec<(Stage, StageRecord)>,
    /// A later stage seen before an earlier one finished (an auto-reply delivered before the
    /// import poll noticed the ticket): kept and applied when the earlier stage ends.
    pub early: Vec<(Stage, u64)>,
    pub ticket_id: Option<String>,
    /// UID of the delivered message in the watched mailbox, for cleanup.
    pub delivered_uid: Option<u32>,
    /// The mailbox's UIDVALIDITY when it was delivered (absent in older records).
    #[serde(default)]
    pub delivered_uid_validity: Option<u32>,
    /// Whether the delivered message's In-Reply-To/References named the canary.
    pub threaded: Option<bool>,
    pub outcome: Option<Outcome>,
    pub finished_ms: Option<u64>,
    /// The helpdesk's acknowledgement of the new ticket (an auto-reply carrying the token but
    /// not the reply mark), if one arrived: its own signal, never the delivery. Absent in
    /// records written before it existed.
    #[serde(default)]
    pub acknowledged: Option<Acknowledged>,
    /// Whether the mail the helpdesk made the ticket from has the canary's Message-ID, where
    /// the helpdesk's API says (`None`: not asked, or not said). A `false` is a ticket made
    /// from another mail carrying the token (a copy, a forward, a re-sent canary).
    #[serde(default)]
    pub message_id_matched: Option<bool>,
    /// The config's name of the mailbox this canary is for (one canary per probe and
    /// mailbox). Absent in records written before probes had several mailboxes: those are
    /// the probe's first mailbox's.
    #[serde(default)]
    pub mailbox: Option<String>,
    /// The folder the delivered message was found in (absent before delivery, and in older
    /// records, which were all found in the inbox).
    #[serde(default)]
    pub folder: Option<Folder>,
    /// Delivered into Junk while the probe does not accept that: delivery is measured, then
    /// fails with [`Reason::Spam`] (see [`Canary::observe_delivery`]).
    #[serde(default)]
    pub spam: bool,
    /// The delivered mail's hops and authentication verdicts (absent before delivery, and in
    /// records written before they were read: a JSON field with a default, so no ledger
    /// migration is needed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<super::hops::Route>,
    /// Delivered, but the probe's requirements on the route failed (a plaintext hop with
    /// `require_tls_hops`: `tls`; a required verdict not `pass`: `auth_result`): delivery is
    /// measured, then fails with this reason and detail, as for [`Canary::spam`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_fault: Option<(Reason, String)>,
}

/// An acknowledgement that arrived in the watched mailbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Acknowledged {
    /// When it was seen, and how long after the canary was sent.
    pub at_ms: u64,
    pub after_ms: u64,
    /// Its UID in the watched mailbox, for cleanup.
    pub uid: u32,
    pub uid_validity: u32,
    /// The folder it was found in (absent in older records: the inbox).
    #[serde(default)]
    pub folder: Option<Folder>,
}

/// A change worth counting. The metrics layer maps these one-to-one onto counters, so each is
/// returned exactly once in a canary's life, even across restarts (the flags that prevent a
/// repeat are part of the persisted record).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transition {
    /// A stage finished; `late` if after its deadline. Observe `duration_ms` in the histogram.
    StageDone {
        stage: Stage,
        duration_ms: u64,
        late: bool,
    },
    /// A stage failed for good, or its deadline passed (`reason == Deadline`).
    StageFailed { stage: Stage, reason: Reason },
    /// The canary ended.
    Finished { outcome: Outcome },
    /// The canary passed the lost horizon while in `stage`.
    Lost { stage: Stage },
}

impl Canary {
    /// A new canary whose first stage (and end_to_end) starts at `now`.
    pub fn new(
        probe: &str,
        id: &str,
        token: &str,
        message_id: &str,
        plan: Vec<Stage>,
        limits: Limits,
        now: u64,
    ) -> Self {
        let mut stages: Vec<(Stage, StageRecord)> = plan
            .iter()
            .chain(std::iter::once(&Stage::EndToEnd))
            .map(|s| (*s, StageRecord::default()))
            .collect();
        if let Some((_, first)) = stages.first_mut() {
            first.started_ms = Some(now);
        }
        if let Some((_, e2e)) = stages.last_mut() {
            e2e.started_ms = Some(now);
        }
        Self {
            probe: probe.to_string(),
            id: id.to_string(),
            token: token.to_string(),
            message_id: message_id.to_string(),
            plan,
            limits,
            created_ms: now,
            stages,
            early: Vec::new(),
            ticket_id: None,
            delivered_uid: None,
            delivered_uid_validity: None,
            acknowledged: None,
            message_id_matched: None,
            mailbox: None,
            folder: None,
            spam: false,
            route: None,
            route_fault: None,
            threaded: None,
            outcome: None,
            finished_ms: None,
        }
    }

    pub fn record(&self, stage: Stage) -> Option<&StageRecord> {
        self.stages
            .iter()
            .find(|(s, _)| *s == stage)
            .map(|(_, r)| r)
    }

    fn record_mut(&mut self, stage: Stage) -> Option<&mut StageRecord> {
        self.stages
            .iter_mut()
            .find(|(s, _)| *s == stage)
            .map(|(_, r)| r)
    }

    pub fn is_finished(&self) -> bool {
        self.outcome.is_some()
    }

    /// The stage in progress: the first planned stage not yet done.
    pub fn current(&self) -> Option<Stage> {
        if self.is_finished() {
            return None;
        }
        self.plan
            .iter()
            .copied()
            .find(|s| self.record(*s).is_none_or(|r| r.done_ms.is_none()))
    }

    /// Whether any stage in progress is past its deadline.
    pub fn is_overdue(&self) -> bool {
        !self.is_finished()
            && self
                .stages
                .iter()
                .any(|(_, r)| r.overdue && r.done_ms.is_none())
    }

    /// Whether this in-flight canary makes its probe fail now: overdue, or its current stage
    /// met errors.
    pub fn is_failing(&self) -> bool {
        self.is_overdue()
            || self
                .current()
                .and_then(|s| self.record(s))
                .is_some_and(|r| !r.errors.is_empty())
    }

    /// The current stage met an error but goes on (it will be retried). Counted once per
    /// reason per stage; later errors of the same reason only refresh the detail.
    pub fn note_error(&mut self, reason: Reason, detail: &str, at: u64) -> Vec<Transition> {
        let Some(stage) = self.current() else {
            return Vec::new();
        };
        let Some(r) = self.record_mut(stage) else {
            return Vec::new();
        };
        let failure = Failure {
            reason,
            detail: detail.to_string(),
            at_ms: at,
        };
        match r.errors.iter_mut().find(|f| f.reason == reason) {
            Some(f) => {
                *f = failure;
                Vec::new()
            }
            None => {
                r.errors.push(failure);
                vec![Transition::StageFailed { stage, reason }]
            }
        }
    }

    /// The stage `stage` finished at `at` (an observation). Completes the canary after its last
    /// stage. Observations of a stage that is not current are kept for later (a later stage) or
    /// ignored (a stage already done, or a finished canary: the caller counts a duplicate).
    pub fn observe(&mut self, stage: Stage, at: u64) -> Vec<Transition> {
        let mut out = Vec::new();
        let Some(current) = self.current() else {
            return out;
        };
        if stage != current {
            let pos = |s: Stage| self.plan.iter().position(|p| *p == s);
            if let (Some(p), Some(c)) = (pos(stage), pos(current))
                && p > c
                && !self.early.iter().any(|(s, _)| *s == stage)
            {
                self.early.push((stage, at));
            }
            return out;
        }
        self.finish_stage(stage, at, &mut out);
        // Apply any early observation that is now current, in order.
        while let Some(next) = self.current() {
            let Some(i) = self.early.iter().position(|(s, _)| *s == next) else {
                break;
            };
            let (_, t) = self.early.remove(i);
            let t = t.max(self.record(next).and_then(|r| r.started_ms).unwrap_or(t));
            self.finish_stage(next, t, &mut out);
        }
        out
    }

    /// The delivered message was found at `at` in `folder`. Delivery is observed as any
    /// stage is (its true duration, late or not); found in Junk while `junk_fails`, the
    /// canary then ends `Failed` with [`Reason::Spam`] on the delivery stage once delivery is
    /// its current stage (at once, or when an earlier stage ends, for an early arrival).
    pub fn observe_delivery(
        &mut self,
        at: u64,
        folder: Folder,
        junk_fails: bool,
    ) -> Vec<Transition> {
        self.observe_delivery_via(at, folder, junk_fails, None, None)
    }

    /// [`Canary::observe_delivery`] with the delivered mail's route and what the probe's
    /// requirements say of it (`fault`, from [`super::hops::Route::fault`]): kept on the
    /// canary, and a fault fails the delivery stage with its reason once delivery is measured
    /// (Junk's `spam` comes first).
    pub fn observe_delivery_via(
        &mut self,
        at: u64,
        folder: Folder,
        junk_fails: bool,
        route: Option<super::hops::Route>,
        fault: Option<(Reason, String)>,
    ) -> Vec<Transition> {
        if self.folder.is_none() && !self.is_finished() {
            self.folder = Some(folder);
            self.spam = folder == Folder::Junk && junk_fails;
            self.route = route;
            self.route_fault = fault;
        }
        self.observe(Stage::Delivery, at)
    }

    fn finish_stage(&mut self, stage: Stage, at: u64, out: &mut Vec<Transition>) {
        let deadline = self.limits.deadline(stage);
        let Some(rec) = self.record_mut(stage) else {
            return;
        };
        let started = rec.started_ms.unwrap_or(at);
        let duration_ms = at.saturating_sub(started);
        let late = rec.overdue || duration_ms > deadline;
        // Past its deadline but no tick saw it yet: the deadline miss is still a failure, and
        // it is counted exactly once, here, like `tick` would have.
        let missed_unseen = late && !rec.overdue;
        rec.overdue |= late;
        rec.done_ms = Some(at);
        if missed_unseen {
            out.push(Transition::StageFailed {
                stage,
                reason: Reason::Deadline,
            });
        }
        // Errors met along the way do not make a completed stage a failure: the stage worked in
        // the end. They were counted when they happened.
        out.push(Transition::StageDone {
            stage,
            duration_ms,
            late,
        });
        match self.current() {
            Some(next) => {
                if let Some(r) = self.record_mut(next) {
                    r.started_ms.get_or_insert(at);
                }
            }
            None => {
                // The last stage: end_to_end ends with it.
                let e2e_deadline = self.limits.end_to_end_ms;
                let created = self.created_ms;
                let any_late = self
                    .stages
                    .iter()
                    .any(|(s, r)| *s != Stage::EndToEnd && r.overdue)
                    || out
                        .iter()
                        .any(|t| matches!(t, Transition::StageDone { late: true, .. }));
                let mut e2e_late = false;
                if let Some(e2e) = self.record_mut(Stage::EndToEnd) {
                    let d = at.saturating_sub(created);
                    e2e_late = e2e.overdue || d > e2e_deadline;
                    if e2e_late && !e2e.overdue {
                        out.push(Transition::StageFailed {
                            stage: Stage::EndToEnd,
                            reason: Reason::Deadline,
                        });
                    }
                    e2e.overdue |= e2e_late;
                    e2e.done_ms = Some(at);
                    out.push(Transition::StageDone {
                        stage: Stage::EndToEnd,
                        duration_ms: d,
                        late: e2e_late,
                    });
                }
                let unfit = if self.spam {
                    Some((Reason::Spam, "delivered into the Junk folder".to_string()))
                } else {
                    self.route_fault.clone()
                };
                let outcome = if let Some((reason, detail)) = unfit
                    && stage == Stage::Delivery
                {
                    // Delivered, and measured, but not where a user would see it, or not the
                    // way the probe requires.
                    if let Some(r) = self.record_mut(Stage::Delivery) {
                        r.failed = Some(Failure {
                            reason,
                            detail,
                            at_ms: at,
                        });
                    }
                    out.push(Transition::StageFailed {
                        stage: Stage::Delivery,
                        reason,
                    });
                    Outcome::Failed
                } else if any_late || e2e_late {
                    Outcome::Late
                } else {
                    Outcome::OnTime
                };
                self.outcome = Some(outcome);
                self.finished_ms = Some(at);
                out.push(Transition::Finished { outcome });
            }
        }
    }

    /// Moves past the current stage without a measurement: its end is unknown (the process
    /// died between sending DATA and reading the answer). Nothing is observed or counted for
    /// it; the next stage starts at the unknown stage's start, so its duration is an upper
    /// bound. If the mail was never accepted, the next stage's deadline says so.
    pub fn skip_unknown(&mut self) -> Vec<Transition> {
        let Some(stage) = self.current() else {
            return Vec::new();
        };
        let Some(r) = self.record_mut(stage) else {
            return Vec::new();
        };
        let start = r.started_ms.unwrap_or(0);
        r.done_ms = Some(start);
        r.unknown = true;
        if let Some(next) = self.current()
            && let Some(n) = self.record_mut(next)
        {
            n.started_ms.get_or_insert(start);
        }
        Vec::new()
    }

    /// The current stage failed for good (the canary cannot go on).
    pub fn fail(&mut self, reason: Reason, detail: &str, at: u64) -> Vec<Transition> {
        let Some(stage) = self.current() else {
            return Vec::new();
        };
        if let Some(r) = self.record_mut(stage) {
            r.failed = Some(Failure {
                reason,
                detail: detail.to_string(),
                at_ms: at,
            });
        }
        self.outcome = Some(Outcome::Failed);
        self.finished_ms = Some(at);
        vec![
            Transition::StageFailed { stage, reason },
            Transition::Finished {
                outcome: Outcome::Failed,
            },
        ]
    }

    /// Time passes: deadlines and the lost horizon. Returns each overdue stage once, and `Lost`
    /// once past the horizon (which finishes the canary).
    pub fn tick(&mut self, now: u64) -> Vec<Transition> {
        let mut out = Vec::new();
        let Some(current) = self.current() else {
            return out;
        };
        for stage in [current, Stage::EndToEnd] {
            let deadline = self.limits.deadline(stage);
            if let Some(r) = self.record_mut(stage)
                && let Some(start) = r.started_ms
                && !r.overdue
                && r.done_ms.is_none()
                && now.saturating_sub(start) > deadline
            {
                r.overdue = true;
                out.push(Transition::StageFailed {
                    stage,
                    reason: Reason::Deadline,
                });
            }
        }
        if now.saturating_sub(self.created_ms) > self.limits.lost_after_ms {
            self.outcome = Some(Outcome::Lost);
            self.finished_ms = Some(now);
            out.push(Transition::Lost { stage: current });
            out.push(Transition::Finished {
                outcome: Outcome::Lost,
            });
        }
        out
    }

    /// How long the current stage has been in flight at `now`.
    pub fn in_flight_for(&self, now: u64) -> Option<(Stage, u64)> {
        let stage = self.current()?;
        let start = self.record(stage)?.started_ms?;
        Some((stage, now.saturating_sub(start)))
    }

    /// When the next deadline (or the lost horizon) of this canary falls, for the flow's timer.
    pub fn next_wakeup(&self) -> Option<u64> {
        let stage = self.current()?;
        let mut t = self.created_ms + self.limits.lost_after_ms + 1;
        for s in [stage, Stage::EndToEnd] {
            if let Some(r) = self.record(s)
                && let Some(start) = r.started_ms
                && !r.overdue
            {
                t = t.min(start + self.limits.deadline(s) + 1);
            }
        }
        Some(t)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deadlines for tests here and in the ledger's.
    pub(crate) fn limits() -> Limits {
        Limits {
            submit_ms: 1_000,
            import_ms: 5_000,
            reply_ms: 1_000,
            delivery_ms: 5_000,
            end_to_end_ms: 20_000,
            lost_after_ms: 60_000,
        }
    }

    fn helpdesk(now: u64) -> Canary {
        Canary::new(
            "p",
            "id",
            "tok",
            "mid",
            vec![Stage::Submit, Stage::Import, Stage::Reply, Stage::Delivery],
            limits(),
            now,
        )
    }

    fn with_plan(plan: &[Stage], now: u64) -> Canary {
        Canary::new("p", "id", "tok", "mid", plan.to_vec(), limits(), now)
    }

    fn mail_loop(now: u64) -> Canary {
        with_plan(&[Stage::Submit, Stage::Delivery], now)
    }

    /// A helpdesk probe awaiting the auto-reply: no reply stage.
    fn auto_reply(now: u64) -> Canary {
        with_plan(&[Stage::Submit, Stage::Import, Stage::Delivery], now)
    }

    fn done(stage: Stage, duration_ms: u64, late: bool) -> Transition {
        Transition::StageDone {
            stage,
            duration_ms,
            late,
        }
    }

    #[test]
    fn on_time_through_every_stage() {
        let mut c = helpdesk(0);
        assert_eq!(c.current(), Some(Stage::Submit));
        assert_eq!(
            c.observe(Stage::Submit, 100),
            vec![done(Stage::Submit, 100, false)]
        );
        assert_eq!(c.current(), Some(Stage::Import));
        assert!(c.tick(2_000).is_empty());
        assert_eq!(
            c.observe(Stage::Import, 2_100),
            vec![done(Stage::Import, 2_000, false)]
        );
        assert_eq!(
            c.observe(Stage::Reply, 2_300),
            vec![done(Stage::Reply, 200, false)]
        );
        let t = c.observe(Stage::Delivery, 3_300);
        assert_eq!(
            t,
            vec![
                done(Stage::Delivery, 1_000, false),
                done(Stage::EndToEnd, 3_300, false),
                Transition::Finished {
                    outcome: Outcome::OnTime
                }
            ]
        );
        assert!(c.is_finished());
        assert!(
            c.observe(Stage::Delivery, 4_000).is_empty(),
            "a duplicate changes nothing"
        );
    }

    #[test]
    fn overdue_once_then_late_with_true_duration() {
        let mut c = helpdesk(0);
        c.observe(Stage::Submit, 100);
        assert!(
            c.tick(5_100).is_empty(),
            "exactly at the deadline is not overdue"
        );
        assert_eq!(
            c.tick(5_101),
            vec![Transition::StageFailed {
                stage: Stage::Import,
                reason: Reason::Deadline
            }]
        );
        assert!(c.is_overdue());
        assert!(c.tick(6_000).is_empty(), "counted once");
        assert_eq!(c.in_flight_for(9_100), Some((Stage::Import, 9_000)));
        let t = c.observe(Stage::Import, 12_100);
        assert_eq!(t, vec![done(Stage::Import, 12_000, true)]);
        assert!(!c.is_overdue(), "the next stage is in flight and on time");
        c.observe(Stage::Reply, 12_200);
        let t = c.observe(Stage::Delivery, 12_300);
        assert!(t.contains(&Transition::Finished {
            outcome: Outcome::Late
        }));
    }

    #[test]
    fn a_late_stage_no_tick_saw_still_counts_its_deadline_once() {
        let mut c = helpdesk(0);
        c.observe(Stage::Submit, 100);
        let t = c.observe(Stage::Import, 9_100);
        assert_eq!(
            t,
            vec![
                Transition::StageFailed {
                    stage: Stage::Import,
                    reason: Reason::Deadline
                },
                done(Stage::Import, 9_000, true)
            ]
        );
    }

    #[test]
    fn end_to_end_deadline_counts_once() {
        let mut c = helpdesk(0);
        c.observe(Stage::Submit, 100);
        c.observe(Stage::Import, 4_000);
        c.observe(Stage::Reply, 4_500);
        let t = c.tick(20_001);
        assert!(t.contains(&Transition::StageFailed {
            stage: Stage::Delivery,
            reason: Reason::Deadline
        }));
        assert!(t.contains(&Transition::StageFailed {
            stage: Stage::EndToEnd,
            reason: Reason::Deadline
        }));
        assert!(c.tick(20_002).is_empty());
    }

    #[test]
    fn lost_past_the_horizon_and_never_after() {
        let mut c = helpdesk(0);
        c.observe(Stage::Submit, 100);
        let t = c.tick(60_001);
        assert!(t.contains(&Transition::Lost {
            stage: Stage::Import
        }));
        assert!(t.contains(&Transition::Finished {
            outcome: Outcome::Lost
        }));
        assert!(c.tick(70_000).is_empty());
        assert!(
            c.observe(Stage::Import, 70_000).is_empty(),
            "too late to count"
        );
    }

    #[test]
    fn hard_failure_ends_the_canary_at_its_stage() {
        let mut c = helpdesk(0);
        let t = c.fail(Reason::Tempfail, "451 try later", 50);
        assert_eq!(
            t[0],
            Transition::StageFailed {
                stage: Stage::Submit,
                reason: Reason::Tempfail
            }
        );
        assert_eq!(c.outcome, Some(Outcome::Failed));
        assert!(c.tick(100_000).is_empty());
    }

    #[test]
    fn an_early_delivery_is_applied_when_import_ends() {
        let mut c = auto_reply(0);
        c.observe(Stage::Submit, 100);
        assert!(c.observe(Stage::Delivery, 900).is_empty());
        let t = c.observe(Stage::Import, 1_000);
        assert_eq!(t[0], done(Stage::Import, 900, false));
        // Delivery "started" when import ended, after the mail arrived: zero, not negative.
        assert_eq!(t[1], done(Stage::Delivery, 0, false));
        assert!(c.is_finished());
    }

    #[test]
    fn errors_count_once_per_reason_and_the_canary_goes_on() {
        let mut c = helpdesk(0);
        c.observe(Stage::Submit, 100);
        assert!(!c.is_failing());
        assert_eq!(
            c.note_error(Reason::Api, "500", 200),
            vec![Transition::StageFailed {
                stage: Stage::Import,
                reason: Reason::Api
            }]
        );
        assert!(c.note_error(Reason::Api, "500 again", 300).is_empty());
        assert_eq!(c.note_error(Reason::Timeout, "slow", 400).len(), 1);
        assert!(c.is_failing());
        assert_eq!(
            c.observe(Stage::Import, 1_000),
            vec![done(Stage::Import, 900, false)]
        );
        assert!(!c.is_failing(), "the next stage is clean");
    }

    #[test]
    fn an_unknown_submit_is_skipped_without_a_measurement() {
        let mut c = helpdesk(1_000);
        assert!(c.skip_unknown().is_empty());
        assert_eq!(c.current(), Some(Stage::Import));
        assert_eq!(
            c.observe(Stage::Import, 3_000),
            vec![done(Stage::Import, 2_000, false)]
        );
    }

    #[test]
    fn found_in_junk_is_delivered_and_measured_then_fails_with_spam() {
        let mut c = mail_loop(0);
        c.observe(Stage::Submit, 100);
        let t = c.observe_delivery(600, Folder::Junk, true);
        assert_eq!(
            t,
            vec![
                done(Stage::Delivery, 500, false),
                done(Stage::EndToEnd, 600, false),
                Transition::StageFailed {
                    stage: Stage::Delivery,
                    reason: Reason::Spam
                },
                Transition::Finished {
                    outcome: Outcome::Failed
                }
            ]
        );
        assert_eq!(c.folder, Some(Folder::Junk));
        assert_eq!(
            c.record(Stage::Delivery)
                .and_then(|r| r.failed.as_ref())
                .map(|f| f.reason),
            Some(Reason::Spam)
        );
    }

    #[test]
    fn a_route_fault_is_delivered_and_measured_then_fails_with_its_reason() {
        use crate::canary::hops::{Hop, Route};
        let route = Route {
            hops: vec![Hop {
                protocol: Some("ESMTP".into()),
                plaintext: true,
                ..Hop::default()
            }],
            ..Route::default()
        };
        for (reason, detail) in [
            (Reason::Tls, "hop 1 (by ?, with ESMTP) was not TLS"),
            (
                Reason::AuthResult,
                "required authentication not passed: dkim=fail",
            ),
        ] {
            let mut c = mail_loop(0);
            c.observe(Stage::Submit, 100);
            let t = c.observe_delivery_via(
                600,
                Folder::Inbox,
                true,
                Some(route.clone()),
                Some((reason, detail.to_string())),
            );
            assert_eq!(
                t,
                vec![
                    done(Stage::Delivery, 500, false),
                    done(Stage::EndToEnd, 600, false),
                    Transition::StageFailed {
                        stage: Stage::Delivery,
                        reason
                    },
                    Transition::Finished {
                        outcome: Outcome::Failed
                    }
                ]
            );
            let failed = c.record(Stage::Delivery).and_then(|r| r.failed.clone());
            assert_eq!(
                failed.map(|f| (f.reason, f.detail)),
                Some((reason, detail.into()))
            );
            assert_eq!(c.route.as_ref(), Some(&route));
            // Kept across the ledger's JSON, and an older record without it still reads.
            let back: Canary = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
            assert_eq!(back, c);
        }
        // Junk comes first: the reason is spam.
        let mut c = mail_loop(0);
        c.observe(Stage::Submit, 100);
        let t = c.observe_delivery_via(
            600,
            Folder::Junk,
            true,
            None,
            Some((Reason::Tls, "x".into())),
        );
        assert!(t.contains(&Transition::StageFailed {
            stage: Stage::Delivery,
            reason: Reason::Spam
        }));
        // A route without a fault is on time, and a second arrival changes nothing.
        let mut c = mail_loop(0);
        c.observe(Stage::Submit, 100);
        let t = c.observe_delivery_via(600, Folder::Inbox, true, Some(route.clone()), None);
        assert_eq!(
            t.last(),
            Some(&Transition::Finished {
                outcome: Outcome::OnTime
            })
        );
        assert!(
            c.observe_delivery_via(
                700,
                Folder::Inbox,
                true,
                None,
                Some((Reason::Tls, "x".into()))
            )
            .is_empty()
        );
        assert_eq!(
            (c.route.as_ref(), c.route_fault.as_ref()),
            (Some(&route), None)
        );
    }

    #[test]
    fn a_record_written_before_routes_reads_without_one() {
        let mut v = serde_json::to_value(mail_loop(0)).unwrap();
        let o = v.as_object_mut().unwrap();
        assert!(!o.contains_key("route"), "absent when none");
        o.remove("route_fault");
        let c: Canary = serde_json::from_value(v).unwrap();
        assert_eq!((c.route, c.route_fault), (None, None));
    }

    #[test]
    fn junk_is_ok_keeps_a_junk_delivery_on_time() {
        let mut c = mail_loop(0);
        c.observe(Stage::Submit, 100);
        let t = c.observe_delivery(600, Folder::Junk, false);
        assert_eq!(
            t.last(),
            Some(&Transition::Finished {
                outcome: Outcome::OnTime
            })
        );
        assert_eq!((c.folder, c.spam), (Some(Folder::Junk), false));
    }

    #[test]
    fn an_early_junk_delivery_fails_with_spam_when_import_ends() {
        let mut c = auto_reply(0);
        c.observe(Stage::Submit, 100);
        assert!(c.observe_delivery(900, Folder::Junk, true).is_empty());
        let t = c.observe(Stage::Import, 1_000);
        assert!(t.contains(&Transition::StageFailed {
            stage: Stage::Delivery,
            reason: Reason::Spam
        }));
        assert_eq!(c.outcome, Some(Outcome::Failed));
    }

    #[test]
    fn a_record_from_before_mailboxes_and_folders_still_loads() {
        let mut json: serde_json::Value = serde_json::to_value(helpdesk(0)).unwrap();
        for k in ["mailbox", "folder", "spam"] {
            json.as_object_mut().unwrap().remove(k);
        }
        let back: Canary = serde_json::from_value(json).unwrap();
        assert_eq!((back.mailbox, back.folder, back.spam), (None, None, false));
    }

    #[test]
    fn survives_a_serde_round_trip_mid_flight() {
        let mut c = helpdesk(0);
        c.observe(Stage::Submit, 100);
        c.tick(5_200);
        let json = serde_json::to_string(&c).unwrap();
        let mut back: Canary = serde_json::from_str(&json).unwrap();
        assert_eq!(back, c);
        assert!(
            back.tick(6_000).is_empty(),
            "an overdue counted before a restart is not recounted"
        );
        assert_eq!(back.next_wakeup(), Some(20_001));
    }
}
