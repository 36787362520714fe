//! The engine: every in-flight canary of this process, and the one place where a change to a
//! canary is persisted (ledger) and counted (metrics), in that order.
//!
//! Architecture invariant: nothing else mutates a [`Canary`]. The canary runs, the mailbox
//! dispatcher and the ticker all call [`Engine::update`] (or the helpers built on it), so the
//! ledger and the metrics can never disagree about what happened.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use tokio::sync::broadcast;
use tracing::{info, warn};

use crate::{
    canary::life::{Canary, Failure, Outcome, Reason, Stage, Transition},
    ledger::{Ledger, Lookup},
    metrics::{Ignored, Metrics},
};

/// How many finished canaries per probe the engine keeps for the status page.
pub const RECENT_PER_PROBE: usize = 50;

/// Wall-clock Unix milliseconds: the life module's clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Something that happened to a canary, for `once` and anyone else listening.
#[derive(Clone, Debug)]
pub struct Event {
    pub probe: String,
    pub canary: String,
    pub transition: Transition,
    /// The failure detail, for `StageFailed`.
    pub detail: Option<String>,
}

#[derive(Default)]
struct ProbeState {
    stages: Vec<Stage>,
    recent: VecDeque<Canary>,
    /// Creation time and outcome of the newest finished canary (by creation, not finish: a
    /// late canary of the outage must not mask the on-time canary sent after it).
    newest_result: Option<(u64, Outcome)>,
    /// The watched mailbox is failing (login refused, unreachable): the delivery stage cannot
    /// be observed, so the probe fails until it recovers.
    mailbox_error: Option<Failure>,
}

#[derive(Default)]
struct State {
    in_flight: HashMap<(String, String), Canary>,
    probes: HashMap<String, ProbeState>,
}

pub struct Engine {
    ledger: Ledger,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
    events: broadcast::Sender<Event>,
}

impl State {
    /// The in-flight canaries grouped by probe, in one pass: the gauges (every tick and every
    /// scrape) and the status page need them per probe, and filtering the whole map once per
    /// probe made a large fleet quadratic.
    fn in_flight_by_probe(&self) -> HashMap<&str, Vec<&Canary>> {
        let mut by_probe: HashMap<&str, Vec<&Canary>> = HashMap::with_capacity(self.probes.len());
        for c in self.in_flight.values() {
            by_probe.entry(c.probe.as_str()).or_default().push(c);
        }
        by_probe
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Engine {
    pub fn new(ledger: Ledger, metrics: Arc<Metrics>) -> Arc<Self> {
        let (events, _) = broadcast::channel(1024);
        Arc::new(Self {
            ledger,
            metrics,
            state: Mutex::new(State::default()),
            events,
        })
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Registers a probe (every metric series at 0) and loads its recent history.
    pub fn register_probe(&self, probe: &str, plan: &[Stage]) {
        let mut stages = plan.to_vec();
        stages.push(Stage::EndToEnd);
        self.metrics.register_probe(probe, &stages);
        let recent: VecDeque<Canary> = self
            .ledger
            .recent(probe, RECENT_PER_PROBE)
            .unwrap_or_default()
            .into();
        let newest_result = recent
            .iter()
            .filter_map(|c| c.outcome.map(|o| (c.created_ms, o)))
            .max_by_key(|(t, _)| *t);
        lock(&self.state).probes.insert(
            probe.to_string(),
            ProbeState {
                stages,
                recent,
                newest_result,
                mailbox_error: None,
            },
        );
    }

    /// Takes the in-flight canaries of the ledger back into memory (after a restart) and
    /// returns them, for the flow to resume watching.
    pub fn resume(&self) -> Vec<Canary> {
        let canaries = match self.ledger.in_flight() {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "cannot read in-flight canaries from the ledger");
                return Vec::new();
            }
        };
        let mut st = lock(&self.state);
        let mut resumed = Vec::new();
        for c in canaries {
            if !st.probes.contains_key(&c.probe) {
                warn!(probe = %c.probe, canary = %c.id, "in-flight canary of a probe no longer configured; left in the ledger");
                continue;
            }
            st.in_flight
                .insert((c.probe.clone(), c.id.clone()), c.clone());
            resumed.push(c);
        }
        if !resumed.is_empty() {
            info!(
                count = resumed.len(),
                "resumed in-flight canaries from the ledger"
            );
        }
        resumed
    }

    /// A new canary: persisted before its DATA is sent, then counted as sent.
    pub fn begin(&self, canary: Canary) -> Result<(), crate::ledger::LedgerError> {
        self.ledger.put(&canary)?;
        self.metrics.sent(&canary.probe);
        lock(&self.state)
            .in_flight
            .insert((canary.probe.clone(), canary.id.clone()), canary);
        Ok(())
    }

    /// Number of unfinished canaries of `probe`.
    pub fn in_flight_count(&self, probe: &str) -> usize {
        lock(&self.state)
            .in_flight
            .keys()
            .filter(|(p, _)| p == probe)
            .count()
    }

    /// A copy of one in-flight canary.
    pub fn get(&self, probe: &str, id: &str) -> Option<Canary> {
        lock(&self.state)
            .in_flight
            .get(&(probe.to_string(), id.to_string()))
            .cloned()
    }

    /// Applies `f` to an in-flight canary, then persists and counts what changed. Returns the
    /// canary after the change, or `None` if it is not in flight (finished, or never ours).
    pub fn update(
        &self,
        probe: &str,
        id: &str,
        f: impl FnOnce(&mut Canary) -> Vec<Transition>,
    ) -> Option<Canary> {
        let mut st = lock(&self.state);
        let key = (probe.to_string(), id.to_string());
        let canary = st.in_flight.get_mut(&key)?;
        let transitions = f(canary);
        let snapshot = canary.clone();
        self.commit(&mut st, snapshot.clone(), &transitions);
        Some(snapshot)
    }

    /// Persist, count, publish. Called with the state locked so that two changes to the same
    /// canary reach the ledger in the order they happened.
    fn commit(&self, st: &mut State, canary: Canary, transitions: &[Transition]) {
        let now = now_ms();
        let persisted = if canary.is_finished() {
            self.ledger.finish(&canary)
        } else {
            self.ledger.put(&canary)
        };
        if let Err(e) = persisted {
            // Counting goes on: the metrics must not lie because the disk did. The next
            // change to this canary retries the write.
            warn!(probe = %canary.probe, canary = %canary.id, error = %e, "ledger write failed");
        }
        self.metrics.apply(&canary.probe, transitions, now);
        for t in transitions {
            let detail = match t {
                Transition::StageFailed { stage, reason } => canary.record(*stage).and_then(|r| {
                    r.failed
                        .as_ref()
                        .filter(|f| f.reason == *reason)
                        .or_else(|| r.errors.iter().find(|f| f.reason == *reason))
                        .map(|f| f.detail.clone())
                }),
                _ => None,
            };
            log_transition(&canary, t, detail.as_deref());
            let _ = self.events.send(Event {
                probe: canary.probe.clone(),
                canary: canary.id.clone(),
                transition: t.clone(),
                detail,
            });
        }
        if canary.is_finished() {
            st.in_flight
                .remove(&(canary.probe.clone(), canary.id.clone()));
            if let Some(ps) = st.probes.get_mut(&canary.probe) {
                if let Some(o) = canary.outcome
                    && ps.newest_result.is_none_or(|(t, _)| canary.created_ms >= t)
                {
                    ps.newest_result = Some((canary.created_ms, o));
                }
                ps.recent.push_front(canary);
                ps.recent.truncate(RECENT_PER_PROBE);
            }
        } else {
            st.in_flight
                .insert((canary.probe.clone(), canary.id.clone()), canary);
        }
    }

    /// Time passes for every in-flight canary: deadlines and the lost horizon. Then refreshes
    /// the gauges.
    pub fn tick(&self, now: u64) {
        let mut st = lock(&self.state);
        let keys: Vec<(String, String)> = st.in_flight.keys().cloned().collect();
        for key in keys {
            let Some(c) = st.in_flight.get_mut(&key) else {
                continue;
            };
            let transitions = c.tick(now);
            if !transitions.is_empty() {
                let snapshot = c.clone();
                self.commit(&mut st, snapshot, &transitions);
            }
        }
        self.refresh_gauges(&st, now);
    }

    fn refresh_gauges(&self, st: &State, now: u64) {
        let by_probe = st.in_flight_by_probe();
        for (probe, ps) in &st.probes {
            let mine: &[&Canary] = by_probe.get(probe.as_str()).map_or(&[], Vec::as_slice);
            for stage in &ps.stages {
                let ages = mine.iter().filter_map(|c| age_in(c, *stage, now));
                let (count, oldest) = ages.fold((0usize, 0u64), |(n, o), a| (n + 1, o.max(a)));
                self.metrics
                    .set_in_flight(probe, *stage, count, oldest as f64 / 1000.0);
            }
            // The same verdict the status page shows: the gauge and the page cannot disagree.
            self.metrics
                .set_probe_success(probe, verdict(ps, mine).0 == "ok");
        }
    }

    /// A message that looked like a canary was ignored.
    pub fn ignored(&self, probe: &str, why: Ignored) {
        self.metrics.ignored(probe, why);
    }

    /// A delivered message whose token verified for `probe`: completes the delivery stage, or
    /// is counted as a duplicate (already finished) or unknown (not in our ledger).
    pub fn delivered(
        &self,
        probe: &str,
        id: &str,
        seen_at: u64,
        uid: u32,
        threaded: impl FnOnce(&str) -> bool,
    ) -> Option<Canary> {
        let updated = self.update(probe, id, |c| {
            if c.delivered_uid.is_some() {
                return Vec::new();
            }
            c.delivered_uid = Some(uid);
            c.threaded = Some(threaded(&c.message_id));
            c.observe(Stage::Delivery, seen_at)
        });
        match updated {
            Some(c) if c.delivered_uid == Some(uid) => Some(c),
            Some(_) => {
                self.ignored(probe, Ignored::Duplicate);
                None
            }
            None => {
                let why = match self.ledger.lookup(probe, id) {
                    Ok(Lookup::Finished(_)) | Ok(Lookup::InFlight(_)) => Ignored::Duplicate,
                    _ => Ignored::Unknown,
                };
                self.ignored(probe, why);
                None
            }
        }
    }

    /// The mailbox the probe reads is failing (`Some`) or working again (`None`). Counted once
    /// per episode as a delivery failure.
    pub fn mailbox_status(&self, probe: &str, failure: Option<(Reason, String)>) {
        let mut st = lock(&self.state);
        let Some(ps) = st.probes.get_mut(probe) else {
            return;
        };
        match failure {
            Some((reason, detail)) => {
                let new_episode = ps.mailbox_error.as_ref().is_none_or(|f| f.reason != reason);
                ps.mailbox_error = Some(Failure {
                    reason,
                    detail,
                    at_ms: now_ms(),
                });
                if new_episode {
                    self.metrics.apply(
                        probe,
                        &[Transition::StageFailed {
                            stage: Stage::Delivery,
                            reason,
                        }],
                        now_ms(),
                    );
                }
            }
            None => ps.mailbox_error = None,
        }
    }

    /// Everything the status page shows, as of `now`.
    pub fn status(&self, now: u64) -> Vec<ProbeStatus> {
        let st = lock(&self.state);
        let by_probe = st.in_flight_by_probe();
        let mut out: Vec<ProbeStatus> = st
            .probes
            .iter()
            .map(|(name, ps)| {
                let mut in_flight: Vec<Canary> = by_probe
                    .get(name.as_str())
                    .map_or(&[][..], Vec::as_slice)
                    .iter()
                    .map(|c| (*c).clone())
                    .collect();
                in_flight.sort_by_key(|c| std::cmp::Reverse(c.created_ms));
                let refs: Vec<&Canary> = in_flight.iter().collect();
                let (state, why) = verdict(ps, &refs);
                let stages = ps
                    .stages
                    .iter()
                    .map(|s| {
                        let ages: Vec<u64> = in_flight
                            .iter()
                            .filter_map(|c| age_in(c, *s, now))
                            .collect();
                        let mut durations: Vec<u64> = ps
                            .recent
                            .iter()
                            .filter_map(|c| stage_duration(c, *s))
                            .collect();
                        durations.sort_unstable();
                        StageStatus {
                            stage: *s,
                            in_flight: ages.len(),
                            oldest_in_flight_ms: ages.iter().copied().max(),
                            p50_ms: quantile(&durations, 0.50),
                            p95_ms: quantile(&durations, 0.95),
                            last_success_ms: ps
                                .recent
                                .iter()
                                .filter_map(|c| {
                                    let r = c.record(*s)?;
                                    (!r.overdue && !r.unknown).then_some(r.done_ms?)
                                })
                                .max(),
                        }
                    })
                    .collect();
                let failures = ps
                    .recent
                    .iter()
                    .chain(in_flight.iter())
                    .flat_map(|c| {
                        c.stages.iter().flat_map(move |(stage, r)| {
                            let deadline = r.overdue.then(|| FailureView {
                                canary: c.id.clone(),
                                stage: *stage,
                                reason: crate::canary::life::Reason::Deadline,
                                detail: format!(
                                    "not done within its {} s deadline",
                                    c.limits.deadline(*stage) / 1000
                                ),
                                at_ms: r.started_ms.unwrap_or(c.created_ms)
                                    + c.limits.deadline(*stage),
                            });
                            r.failed
                                .iter()
                                .chain(r.errors.iter())
                                .map(move |f| FailureView {
                                    canary: c.id.clone(),
                                    stage: *stage,
                                    reason: f.reason,
                                    detail: f.detail.clone(),
                                    at_ms: f.at_ms,
                                })
                                .chain(deadline)
                        })
                    })
                    .collect::<Vec<_>>();
                let mut failures = failures;
                failures.sort_by_key(|f| std::cmp::Reverse(f.at_ms));
                failures.truncate(RECENT_FAILURES);
                ProbeStatus {
                    name: name.clone(),
                    state,
                    why,
                    stages,
                    mailbox_error: ps.mailbox_error.clone(),
                    failures,
                    in_flight,
                    recent: ps.recent.iter().cloned().collect(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

/// How long `c` has been in `stage` at `now`, if it is in it (`end_to_end`: since it was sent).
fn age_in(c: &Canary, stage: Stage, now: u64) -> Option<u64> {
    if stage == Stage::EndToEnd {
        (!c.is_finished()).then(|| now.saturating_sub(c.created_ms))
    } else {
        c.in_flight_for(now)
            .filter(|(s, _)| *s == stage)
            .map(|(_, a)| a)
    }
}

/// A probe's state (`ok`, `degraded`, `failing`) and why. `probe_success` is 1 only for `ok`.
fn verdict(ps: &ProbeState, in_flight: &[&Canary]) -> (&'static str, String) {
    if let Some(f) = &ps.mailbox_error {
        return ("failing", format!("mailbox: {} ({})", f.reason, f.detail));
    }
    if let Some(c) = in_flight.iter().find(|c| c.is_overdue()) {
        let stage = c.current().map(|s| s.as_str()).unwrap_or("?");
        return ("failing", format!("a canary is overdue in {stage}"));
    }
    if let Some(c) = in_flight.iter().find(|c| c.is_failing()) {
        let stage = c.current().map(|s| s.as_str()).unwrap_or("?");
        return ("degraded", format!("errors in {stage}; still retrying"));
    }
    match ps.newest_result {
        Some((_, Outcome::OnTime)) | None => ("ok", String::new()),
        Some((_, o)) => (
            "failing",
            format!("the newest canary ended {o:?}").to_lowercase(),
        ),
    }
}

fn log_transition(c: &Canary, t: &Transition, detail: Option<&str>) {
    match t {
        Transition::StageDone {
            stage,
            duration_ms,
            late,
        } => info!(probe = %c.probe, canary = %c.id, %stage, duration_ms, late, "stage done"),
        Transition::StageFailed { stage, reason } => {
            warn!(probe = %c.probe, canary = %c.id, %stage, %reason, detail = detail.unwrap_or(""), "stage failed")
        }
        Transition::Lost { stage } => {
            warn!(probe = %c.probe, canary = %c.id, %stage, "canary lost")
        }
        Transition::Finished { outcome } => {
            info!(probe = %c.probe, canary = %c.id, outcome = ?outcome, "canary finished")
        }
    }
}

/// How many failures the status keeps per probe.
pub const RECENT_FAILURES: usize = 20;

/// How long `stage` took for a finished canary (`None` if it did not finish it, or its end is
/// unknown).
fn stage_duration(c: &Canary, stage: Stage) -> Option<u64> {
    let r = c.record(stage)?;
    if r.unknown {
        return None;
    }
    Some(r.done_ms?.saturating_sub(r.started_ms?))
}

/// Nearest-rank quantile of sorted values.
fn quantile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

#[derive(Serialize)]
pub struct StageStatus {
    pub stage: Stage,
    pub in_flight: usize,
    pub oldest_in_flight_ms: Option<u64>,
    /// Over the recent finished canaries (up to [`RECENT_PER_PROBE`]), late ones included.
    pub p50_ms: Option<u64>,
    pub p95_ms: Option<u64>,
    /// When a recent canary last finished this stage on time.
    pub last_success_ms: Option<u64>,
}

/// One failure, for the status page: a hard failure, an error met while retrying, or a
/// missed deadline.
#[derive(Serialize)]
pub struct FailureView {
    pub canary: String,
    pub stage: Stage,
    pub reason: crate::canary::life::Reason,
    pub detail: String,
    pub at_ms: u64,
}

#[derive(Serialize)]
pub struct ProbeStatus {
    pub name: String,
    /// `ok`, `degraded` or `failing`.
    pub state: &'static str,
    /// Why, in a sentence, when not ok.
    pub why: String,
    pub stages: Vec<StageStatus>,
    pub mailbox_error: Option<Failure>,
    /// Newest first.
    pub failures: Vec<FailureView>,
    pub in_flight: Vec<Canary>,
    pub recent: Vec<Canary>,
}
