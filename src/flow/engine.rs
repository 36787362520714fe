//! The engine: every in-flight canary of this process, and the one place where a change to a
//! canary is persisted (ledger) and counted (metrics), in that order.
//!
//! Architecture invariant: nothing else mutates a [`Canary`]. The canary runs, the mailbox
//! dispatcher and the ticker all call [`Engine::update`] (or the helpers built on it), so the
//! ledger and the metrics can never disagree about what happened.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex, MutexGuard, Weak, mpsc},
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio::sync::{Notify, broadcast, oneshot};
use tracing::{debug, error, info, warn};

use super::{
    history::{Series, StageHistory},
    incident::{self, Incident},
};
pub use crate::clock::now_ms;
use crate::{
    canary::life::{Canary, Failure, Folder, Outcome, Reason, Stage, Transition},
    clock,
    ledger::{Ledger, LedgerError, Lookup, Write},
    metrics::{Ignored, Live, Metrics, Skipped},
};

/// How many finished canaries per probe the engine keeps for the status page.
pub const RECENT_PER_PROBE: usize = 50;

/// How often the ledger writer checks, when idle, that the ledger file on disk is still the
/// one it has open (a deleted file or state dir would silently swallow every write).
const LEDGER_CHECK_EVERY: Duration = Duration::from_secs(1);
/// First and longest wait before reopening a ledger that failed. The longest is well under
/// any interval plus deadline, so a freed disk is used again within that bound.
const LEDGER_RETRY_FIRST: Duration = Duration::from_millis(250);
const LEDGER_RETRY_MAX: Duration = Duration::from_secs(5);

/// Something that happened to a canary, for `once` and anyone else listening.
#[derive(Clone, Debug)]
pub struct Event {
    pub probe: String,
    pub canary: String,
    /// The canary's mailbox (the config's name).
    pub mailbox: Option<String>,
    pub transition: Transition,
    /// The failure detail, for `StageFailed`.
    pub detail: Option<String>,
    /// The delivered mail's hops and verdicts, for the `StageDone` of the delivery stage.
    pub route: Option<crate::canary::hops::Route>,
}

/// A canary's bell (see [`Engine::bell`]): the run of that canary waits on it.
pub struct Bell {
    engine: Weak<Engine>,
    key: (String, String),
    notify: Arc<Notify>,
}

impl Bell {
    /// Resolves at the next ring (or at once if one came since the last wait).
    pub async fn rung(&self) {
        self.notify.notified().await;
    }
}

impl Drop for Bell {
    fn drop(&mut self) {
        if let Some(engine) = self.engine.upgrade() {
            let mut bells = engine.bells.lock().unwrap_or_else(|p| p.into_inner());
            if bells
                .get(&self.key)
                .is_some_and(|n| Arc::ptr_eq(n, &self.notify))
            {
                bells.remove(&self.key);
            }
        }
    }
}

#[derive(Default)]
struct ProbeState {
    stages: Vec<Stage>,
    recent: VecDeque<Canary>,
    /// The probe's mailboxes by name, in config order; the first is the one of records
    /// written before probes had several.
    mailboxes: Vec<String>,
    /// Per mailbox, creation time and outcome of its newest finished canary (by creation, not
    /// finish: a late canary of the outage must not mask the on-time canary sent after it).
    /// Per mailbox, because each send makes one canary per mailbox: the newest of the probe
    /// would hide one mailbox's failure behind another's success sent a millisecond later.
    newest_result: HashMap<String, (u64, Outcome)>,
    /// Per mailbox, creation time of its newest canary that reached delivery and whether that
    /// delivery was good (on time, not in Junk): `mailcanary_mailbox_success`.
    newest_delivery: HashMap<String, (u64, bool)>,
    /// Watched folders that are failing (login refused, unreachable), per mailbox and folder:
    /// the delivery stage cannot be observed there, so the probe fails until each recovers.
    /// One slot per folder, so one recovering never clears another's failure.
    mailbox_errors: BTreeMap<(String, Folder), Failure>,
    /// Per stage, the backlog draining after a stall (held canaries arriving late).
    drains: HashMap<Stage, Drain>,
    /// The learned (`"auto"`) deadlines in use, frozen while the probe is failing. For a
    /// probe with several mailboxes, delivery's is the largest of `learned_delivery`.
    learned: HashMap<Stage, u64>,
    /// With several mailboxes, each one's learned delivery deadline: Gmail's tail is not an
    /// own server's, and one deadline for all would detect a stall of the fast one only at
    /// the slow one's pace.
    learned_delivery: HashMap<String, u64>,
    /// The deadlines new canaries last got (fixed or learned), per stage and, for delivery,
    /// per mailbox: what the status and the dashboard show beside the durations.
    deadlines: HashMap<Stage, u64>,
    mailbox_deadlines: HashMap<String, u64>,
    /// The open incident, if the probe is in one.
    incident: Option<Incident>,
    /// Closed incidents, newest first (at most `incident::KEEP`).
    incidents: VecDeque<Incident>,
    next_incident: u64,
    /// Per stage, per minute and hour: on time, failed, durations (the dashboard's charts).
    history: HashMap<Stage, Series>,
}

/// A stage's backlog draining: held canaries arrive late, oldest first (the stages a helpdesk
/// runs are queues). How far it has got is the stage-start time of the newest held canary that
/// arrived; how fast, that time's advance per second.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Drain {
    /// (arrival, stage start) of the first late arrival of the episode, canary time.
    first: (u64, u64),
    /// The same of the latest, with the furthest stage start reached so far.
    last: (u64, u64),
}

impl Drain {
    fn new(at: u64, started: u64) -> Drain {
        Drain {
            first: (at, started),
            last: (at, started),
        }
    }

    fn arrived(&mut self, at: u64, started: u64) {
        self.last = (at.max(self.last.0), started.max(self.last.1));
    }

    /// The stage-start time the drain has reached.
    pub fn reached_ms(&self) -> u64 {
        self.last.1
    }

    /// Seconds of backlog drained per second, once two arrivals a second apart were seen.
    pub fn rate(&self) -> Option<f64> {
        let wall = self.last.0.saturating_sub(self.first.0);
        (wall >= 1_000).then(|| self.last.1.saturating_sub(self.first.1) as f64 / wall as f64)
    }
}

#[derive(Default)]
struct State {
    in_flight: HashMap<(String, String), Canary>,
    /// When each in-flight canary next needs the ticker (its next deadline or its lost
    /// horizon, `Canary::next_wakeup`), earliest first: the tick looks only at the canaries that
    /// are due. Pushed whenever a canary enters `in_flight` or changes; an entry that is stale
    /// (the canary changed or finished since) is dropped or pushed again when it comes up.
    due: BinaryHeap<Reverse<(u64, (String, String))>>,
    probes: HashMap<String, ProbeState>,
    /// The ledger cannot be written: no canary can be recorded, so none is sent, and every
    /// probe fails (reason `ledger`) and the prober is unready until a write succeeds again.
    ledger_error: Option<Failure>,
    /// Probes whose gauges the next tick sets, because something they show changed without
    /// setting them (a canary changed by the tick itself, a mailbox's watcher, a probe
    /// registered or resumed). The gauges depend on no clock (the ages are [`Live`]), so a
    /// probe nothing happened to is not visited: an idle prober's tick touches no probe.
    stale: HashSet<String>,
    /// Every probe is stale (the ledger failed or recovered: every verdict moves).
    all_stale: bool,
}

/// Work for the ledger writer thread, in the order it happened.
enum Job {
    /// An incident opened, changed or closed.
    Incident(Incident),
    /// A new canary: acknowledged once durable (or not), before its DATA may be sent.
    Begin {
        canary: Canary,
        done: oneshot::Sender<Result<(), String>>,
    },
    /// A changed canary and the transitions to count once it is written, with the history
    /// records they changed (written in the same transaction as the canary).
    Commit {
        canary: Canary,
        transitions: Vec<Transition>,
        history: Vec<Write>,
    },
    Cursor {
        mailbox_key: String,
        uidvalidity: u32,
        last_uid: u32,
    },
    /// Answered once everything queued before it was written (or failed to be).
    Flush(mpsc::Sender<()>),
}

/// The ledger writer's own state, kept between batches.
struct Writer {
    /// What is not yet durable: the newest write per canary (and per mailbox cursor).
    dirty: HashMap<String, Write>,
    /// Set while the ledger is failing: when to try reopening it, and the wait after that.
    broken: Option<(Instant, Duration)>,
    last_check: Instant,
    /// Failed attempts in the current episode, for the recovery log line.
    attempts: u32,
}

pub struct Engine {
    ledger: Ledger,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
    events: broadcast::Sender<Event>,
    /// One bell per canary whose run is waiting, `(probe, id)`: rung when that canary changes
    /// or a webhook names it, so an event wakes its own run only (not every run in flight).
    bells: Mutex<HashMap<(String, String), Arc<Notify>>>,
    /// To the ledger writer thread. Disk work never happens under `state`'s lock, so a scrape
    /// or the status page never waits on an fsync.
    writer: mpsc::Sender<Job>,
    /// Run after the ledger was reopened (the state dir may have been made again): puts back
    /// what else the state dir must hold, such as a generated key.
    on_reopen: Mutex<Option<Box<dyn Fn() + Send>>>,
}

impl State {
    /// The in-flight canaries grouped by probe, in one pass: the gauges (every tick and every
    /// scrape) and the status page need them per probe, and filtering the whole map once per
    /// probe made a large fleet quadratic.
    /// Schedules `c` for the ticker at its next wakeup.
    fn watch(&mut self, c: &Canary) {
        if let Some(at) = c.next_wakeup() {
            self.due
                .push(Reverse((at, (c.probe.clone(), c.id.clone()))));
        }
    }

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
        metrics.ledger_recovered(ledger.take_recovered());
        Arc::new_cyclic(|weak: &Weak<Engine>| {
            let (writer, jobs) = mpsc::channel();
            let weak = weak.clone();
            std::thread::Builder::new()
                .name("ledger-writer".into())
                .spawn(move || write_loop(weak, jobs))
                .expect("spawning the ledger writer thread");
            Self {
                ledger,
                metrics,
                state: Mutex::new(State::default()),
                events,
                bells: Mutex::new(HashMap::new()),
                writer,
                on_reopen: Mutex::new(None),
            }
        })
    }

    /// What to run after the ledger was reopened (see the field).
    pub fn on_ledger_reopen(&self, f: impl Fn() + Send + 'static) {
        *self.on_reopen.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(f));
    }

    /// Every probe's charts as of `now_wall` (wall-clock ms), by probe name.
    pub fn history(&self, now_wall: u64) -> Vec<(String, Vec<StageHistory>)> {
        let st = lock(&self.state);
        let mut out: Vec<(String, Vec<StageHistory>)> = st
            .probes
            .iter()
            .map(|(name, ps)| {
                let empty = Series::default();
                let stages = ps
                    .stages
                    .iter()
                    .map(|s| StageHistory::of(*s, ps.history.get(s).unwrap_or(&empty), now_wall))
                    .collect();
                (name.clone(), stages)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Why the ledger cannot be written now, if it cannot (for `/readyz`).
    pub fn ledger_error(&self) -> Option<String> {
        lock(&self.state)
            .ledger_error
            .as_ref()
            .map(|f| f.detail.clone())
    }

    /// Waits (up to `within`) until everything queued so far has been written to the ledger
    /// or has failed to be. For a clean stop.
    pub fn flush(&self, within: Duration) {
        let (tx, rx) = mpsc::channel();
        if self.writer.send(Job::Flush(tx)).is_ok() {
            let _ = rx.recv_timeout(within);
        }
    }

    /// Records the IMAP cursor of a mailbox (written with the next batch).
    pub fn set_cursor(&self, mailbox_key: &str, uidvalidity: u32, last_uid: u32) {
        let _ = self.writer.send(Job::Cursor {
            mailbox_key: mailbox_key.to_string(),
            uidvalidity,
            last_uid,
        });
    }

    /// A canary of `probe` that was due was not sent.
    pub fn skipped(&self, probe: &str, why: Skipped) {
        self.metrics.skipped(probe, why);
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

    /// A webhook named canary `id` of `probe`: if it is waiting for its import, its run asks
    /// the helpdesk now instead of at the next poll (the API confirms; a webhook only hints).
    /// True if the canary is waiting for its import.
    pub fn hint(&self, probe: &str, id: &str) -> bool {
        let waiting = lock(&self.state)
            .in_flight
            .get(&(probe.to_string(), id.to_string()))
            .is_some_and(|c| c.current() == Some(Stage::Import));
        if waiting {
            self.ring(probe, id);
        }
        waiting
    }

    /// The bell of canary `id` of `probe`, rung when the canary changes or a webhook names
    /// it. A ring while nobody waits is kept (one permit), so none is missed between looks.
    /// The bell is taken down when the returned guard drops.
    pub fn bell(self: &Arc<Self>, probe: &str, id: &str) -> Bell {
        let key = (probe.to_string(), id.to_string());
        let notify = self
            .bells
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        Bell {
            engine: Arc::downgrade(self),
            key,
            notify,
        }
    }

    fn ring(&self, probe: &str, id: &str) {
        let bells = self.bells.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = bells.get(&(probe.to_string(), id.to_string())) {
            n.notify_one();
        }
    }

    /// Registers a probe (every metric series at 0) and loads its recent history.
    pub fn register_probe(&self, probe: &str, plan: &[Stage], mailboxes: &[String]) {
        let mut stages = plan.to_vec();
        stages.push(Stage::EndToEnd);
        self.metrics.register_probe(probe, &stages);
        self.metrics.register_mailboxes(probe, mailboxes);
        let default = mailboxes.first().cloned().unwrap_or_default();
        let recent: VecDeque<Canary> = self
            .ledger
            .recent(probe, RECENT_PER_PROBE)
            .unwrap_or_default()
            .into_iter()
            .map(|mut c| {
                c.mailbox.get_or_insert_with(|| default.clone());
                c
            })
            .collect();
        let mut newest_result = HashMap::new();
        let mut newest_delivery = HashMap::new();
        // Oldest first, so the newest of each mailbox is what stays.
        let mut by_age: Vec<&Canary> = recent.iter().collect();
        by_age.sort_by_key(|c| c.created_ms);
        for c in by_age {
            note_result(&mut newest_result, &mut newest_delivery, c);
        }
        // Incidents survive restarts: an open one goes on.
        let mut stored = self.ledger.incidents(probe).unwrap_or_else(|e| {
            self.metrics.ledger_error(e.op());
            warn!(%probe, error = %e, "cannot read the probe's incidents; starting without them");
            Vec::new()
        });
        let next_incident = stored.iter().map(|i| i.id).max().unwrap_or(0) + 1;
        let incident = match stored.last() {
            Some(i) if i.is_open() => stored.pop(),
            _ => None,
        };
        let incidents: VecDeque<Incident> = stored.into_iter().rev().take(incident::KEEP).collect();
        let mut history: HashMap<Stage, Series> = HashMap::new();
        match self.ledger.history(probe) {
            Ok(hours) => {
                for (stage, hour, h) in hours {
                    history.entry(stage).or_default().insert(hour, h);
                }
            }
            Err(e) => {
                self.metrics.ledger_error(e.op());
                warn!(%probe, error = %e, "cannot read the probe's history; its charts start empty");
            }
        }
        let mut st = lock(&self.state);
        st.stale.insert(probe.to_string());
        st.probes.insert(
            probe.to_string(),
            ProbeState {
                stages,
                recent,
                mailboxes: mailboxes.to_vec(),
                newest_result,
                newest_delivery,
                mailbox_errors: BTreeMap::new(),
                drains: HashMap::new(),
                learned: HashMap::new(),
                learned_delivery: HashMap::new(),
                deadlines: HashMap::new(),
                mailbox_deadlines: HashMap::new(),
                incident,
                incidents,
                next_incident,
                history,
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
        for mut c in canaries {
            let Some(ps) = st.probes.get(&c.probe) else {
                warn!(probe = %c.probe, canary = %c.id, "in-flight canary of a probe no longer configured; left in the ledger");
                continue;
            };
            // A record from before probes had several mailboxes is the first mailbox's.
            if c.mailbox.is_none() {
                c.mailbox = ps.mailboxes.first().cloned();
            }
            st.watch(&c);
            st.in_flight
                .insert((c.probe.clone(), c.id.clone()), c.clone());
            resumed.push(c);
        }
        st.all_stale = true;
        if !resumed.is_empty() {
            info!(
                count = resumed.len(),
                "resumed in-flight canaries from the ledger"
            );
        }
        resumed
    }

    /// A new canary: persisted before its DATA is sent, then counted as sent. If the ledger
    /// cannot record it, it is not sent: counted as skipped (`ledger`) and as a submit failure
    /// with reason `ledger`, and the error is returned.
    pub async fn begin(&self, canary: Canary) -> Result<(), String> {
        let (done, written) = oneshot::channel();
        let probe = canary.probe.clone();
        let sent = self.writer.send(Job::Begin {
            canary: canary.clone(),
            done,
        });
        let result = match sent {
            Ok(()) => written
                .await
                .unwrap_or_else(|_| Err("the ledger writer has stopped".into())),
            Err(_) => Err("the ledger writer has stopped".into()),
        };
        match result {
            Ok(()) => {
                self.metrics.sent(&probe);
                let mut st = lock(&self.state);
                st.watch(&canary);
                st.in_flight
                    .insert((canary.probe.clone(), canary.id.clone()), canary);
                self.refresh_probe_gauges(&st, &probe, now_ms());
                Ok(())
            }
            Err(e) => {
                self.metrics.skipped(&probe, Skipped::Ledger);
                self.metrics.apply(
                    &probe,
                    &[Transition::StageFailed {
                        stage: Stage::Submit,
                        reason: Reason::Ledger,
                    }],
                    clock::wall_ms(),
                );
                Err(e)
            }
        }
    }

    /// Number of unfinished canaries of `probe`.
    pub fn in_flight_count(&self, probe: &str) -> usize {
        lock(&self.state)
            .in_flight
            .keys()
            .filter(|(p, _)| p == probe)
            .count()
    }

    /// Number of unfinished canaries of `probe` for `mailbox`.
    pub fn in_flight_count_for(&self, probe: &str, mailbox: &str) -> usize {
        lock(&self.state)
            .in_flight
            .values()
            .filter(|c| c.probe == probe && c.mailbox.as_deref() == Some(mailbox))
            .count()
    }

    /// A copy of one in-flight canary.
    pub fn get(&self, probe: &str, id: &str) -> Option<Canary> {
        lock(&self.state)
            .in_flight
            .get(&(probe.to_string(), id.to_string()))
            .cloned()
    }

    /// A copy of a canary in flight or among the recent finished ones.
    pub fn find(&self, probe: &str, id: &str) -> Option<Canary> {
        let st = lock(&self.state);
        st.in_flight
            .get(&(probe.to_string(), id.to_string()))
            .or_else(|| st.probes.get(probe)?.recent.iter().find(|c| c.id == id))
            .cloned()
    }

    /// Applies `f` to an in-flight canary, then persists and counts what changed. Returns the
    /// canary after the change, or `None` if it is not in flight (finished, or never ours).
    /// A call that changed nothing (a webhook for a canary already imported, a repeated
    /// delivery) writes nothing.
    pub fn update(
        &self,
        probe: &str,
        id: &str,
        f: impl FnOnce(&mut Canary) -> Vec<Transition>,
    ) -> Option<Canary> {
        let mut st = lock(&self.state);
        let key = (probe.to_string(), id.to_string());
        let canary = st.in_flight.get_mut(&key)?;
        let before = canary.clone();
        let transitions = f(canary);
        if transitions.is_empty() && *canary == before {
            return Some(before);
        }
        let snapshot = canary.clone();
        self.commit(&mut st, snapshot.clone(), &transitions);
        self.refresh_probe_gauges(&st, probe, now_ms());
        Some(snapshot)
    }

    /// Hands the change to the ledger writer (which persists, then counts and publishes it)
    /// and updates the in-memory state. Called with the state locked so that two changes to
    /// the same canary reach the writer in the order they happened.
    fn commit(&self, st: &mut State, canary: Canary, transitions: &[Transition]) {
        if !st.stale.contains(&canary.probe) {
            st.stale.insert(canary.probe.clone());
        }
        let mut history = Vec::new();
        if let Some(ps) = st.probes.get_mut(&canary.probe) {
            let wall = clock::to_wall_ms(now_ms());
            for (stage, mark) in super::history::marks(&canary, transitions) {
                let changed = ps.history.entry(stage).or_default().add(stage, wall, mark);
                history.extend(
                    changed
                        .into_iter()
                        .map(|(stage, hour, bucket)| Write::History {
                            probe: canary.probe.clone(),
                            stage,
                            hour,
                            bucket,
                        }),
                );
            }
        }
        let _ = self.writer.send(Job::Commit {
            canary: canary.clone(),
            transitions: transitions.to_vec(),
            history,
        });
        if let Some(ps) = st.probes.get_mut(&canary.probe) {
            let ProbeState {
                incident: open,
                recent,
                next_incident,
                ..
            } = ps;
            let was_open = open.is_some();
            if incident::observe(open, *next_incident, &canary, transitions, recent, now_ms())
                && let Some(i) = open
            {
                if !was_open {
                    *next_incident += 1;
                    warn!(probe = %i.probe, incident = i.id, stage = %i.stage, reason = %i.reason, "incident opened");
                }
                let _ = self.writer.send(Job::Incident(i.clone()));
            }
        }
        for t in transitions {
            if let Transition::StageDone {
                stage, late: true, ..
            } = t
                && let Some(r) = canary.record(*stage)
                && let (Some(started), Some(done)) = (r.started_ms, r.done_ms)
                && let Some(ps) = st.probes.get_mut(&canary.probe)
            {
                ps.drains
                    .entry(*stage)
                    .and_modify(|d| d.arrived(done, started))
                    .or_insert_with(|| Drain::new(done, started));
            }
        }
        if canary.is_finished() {
            st.in_flight
                .remove(&(canary.probe.clone(), canary.id.clone()));
            if let Some(ps) = st.probes.get_mut(&canary.probe) {
                note_result(&mut ps.newest_result, &mut ps.newest_delivery, &canary);
                ps.recent.push_front(canary);
                ps.recent.truncate(RECENT_PER_PROBE);
            }
        } else {
            st.watch(&canary);
            st.in_flight
                .insert((canary.probe.clone(), canary.id.clone()), canary);
        }
    }

    /// Counts, logs and announces what happened to a canary, once it is in the ledger (or the
    /// ledger failed: the metrics must not lie because the disk did).
    fn publish(&self, canary: &Canary, transitions: &[Transition]) {
        self.metrics
            .apply(&canary.probe, transitions, clock::to_wall_ms(now_ms()));
        if let Some(m) = &canary.mailbox {
            let folder = canary.folder.unwrap_or(Folder::Inbox);
            self.metrics
                .apply_mailbox(&canary.probe, m, folder, transitions);
        }
        // The delivery stage ends once in a canary's life: its route is counted with it.
        if let Some(route) = &canary.route
            && transitions.iter().any(|t| {
                matches!(
                    t,
                    Transition::StageDone {
                        stage: Stage::Delivery,
                        ..
                    }
                )
            })
        {
            self.metrics.apply_route(&canary.probe, route);
        }
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
            log_transition(canary, t, detail.as_deref());
            if wakes_the_run(t) {
                self.ring(&canary.probe, &canary.id);
            }
            let _ = self.events.send(Event {
                probe: canary.probe.clone(),
                canary: canary.id.clone(),
                mailbox: canary.mailbox.clone(),
                transition: t.clone(),
                detail,
                route: match t {
                    Transition::StageDone {
                        stage: Stage::Delivery,
                        ..
                    } => canary.route.clone(),
                    _ => None,
                },
            });
        }
    }

    /// One batch of the ledger writer: everything queued, in one transaction; reopening a
    /// failed ledger when its wait is over; then acknowledging and counting.
    fn write_batch(&self, jobs: Vec<Job>, w: &mut Writer) {
        for job in &jobs {
            match job {
                Job::Begin { canary, .. } => {
                    w.dirty
                        .insert(canary_key(canary), Write::Put(canary.clone()));
                }
                Job::Commit {
                    canary, history, ..
                } => {
                    let write = if canary.is_finished() {
                        Write::Finish(canary.clone())
                    } else {
                        Write::Put(canary.clone())
                    };
                    w.dirty.insert(canary_key(canary), write);
                    for h in history {
                        if let Write::History {
                            probe, stage, hour, ..
                        } = h
                        {
                            w.dirty
                                .insert(format!("history\0{probe}\0{stage}\0{hour}"), h.clone());
                        }
                    }
                }
                Job::Cursor {
                    mailbox_key,
                    uidvalidity,
                    last_uid,
                } => {
                    w.dirty.insert(
                        format!("cursor\0{mailbox_key}"),
                        Write::Cursor {
                            mailbox_key: mailbox_key.clone(),
                            uidvalidity: *uidvalidity,
                            last_uid: *last_uid,
                        },
                    );
                }
                Job::Incident(i) => {
                    w.dirty.insert(
                        format!("incident\0{}\0{}", i.probe, i.id),
                        Write::Incident(i.clone()),
                    );
                }
                Job::Flush(_) => {}
            }
        }
        let now = Instant::now();
        if w.broken.is_none() && now.duration_since(w.last_check) >= LEDGER_CHECK_EVERY {
            w.last_check = now;
            if let Err(e) = self.ledger.check() {
                self.ledger_failed(&e, w);
            }
        }
        if let Some((retry_at, _)) = w.broken
            && now >= retry_at
        {
            // A reopen proves the file opens, not that the disk has room again: the check
            // must pass too, or a full disk would look mended at every retry.
            match self.ledger.reopen().and_then(|()| self.ledger.check()) {
                // The file may be new (deleted, or its dir removed) and writes since the error
                // are missing: write again every canary in flight, as memory has it (it is at
                // least as new as anything queued for it).
                Ok(()) => {
                    self.metrics.ledger_recovered(self.ledger.take_recovered());
                    {
                        let st = lock(&self.state);
                        for c in st.in_flight.values() {
                            w.dirty.insert(canary_key(c), Write::Put(c.clone()));
                        }
                    }
                    if let Some(f) = &*self.on_reopen.lock().unwrap_or_else(|p| p.into_inner()) {
                        f();
                    }
                }
                Err(e) => self.ledger_failed(&e, w),
            }
        }
        let written = if w.dirty.is_empty() && self.ledger.is_open() {
            Ok(())
        } else if !self.ledger.is_open() {
            // Closed by an earlier failure and not yet reopened: that failure is the answer.
            Err(self.ledger_error().unwrap_or_else(|| {
                format!("ledger {}: closed, reopening", self.ledger.path().display())
            }))
        } else {
            let writes: Vec<Write> = w.dirty.values().cloned().collect();
            match self.ledger.write(&writes) {
                Ok(()) => Ok(()),
                Err(e) => {
                    self.ledger_failed(&e, w);
                    Err(e.to_string())
                }
            }
        };
        // On an error `ledger_failed` has recorded the cause (this batch's, or the one that
        // closed the ledger); the dirty writes stay for the next try.
        if written.is_ok() {
            w.dirty.clear();
            if w.broken.take().is_some() {
                info!(
                    ledger = %self.ledger.path().display(),
                    failed_attempts = w.attempts,
                    "ledger writable again; in-flight canaries written, sending resumes"
                );
                w.attempts = 0;
                let mut st = lock(&self.state);
                st.ledger_error = None;
                st.all_stale = true;
            }
        }
        for job in jobs {
            match job {
                Job::Begin { canary, done } => {
                    if written.is_err() {
                        // Never sent, so never to be written later either.
                        w.dirty.remove(&canary_key(&canary));
                    }
                    let _ = done.send(written.clone());
                }
                Job::Commit {
                    canary,
                    transitions,
                    ..
                } => self.publish(&canary, &transitions),
                Job::Cursor { .. } | Job::Incident(_) => {}
                Job::Flush(done) => {
                    let _ = done.send(());
                }
            }
        }
    }

    /// The ledger failed: counted every time, logged once per episode, closed (redb refuses
    /// every transaction after an I/O error until reopened), retried with backoff.
    fn ledger_failed(&self, e: &LedgerError, w: &mut Writer) {
        self.metrics.ledger_error(e.op());
        w.attempts += 1;
        let wait = match w.broken {
            None => {
                error!(
                    error = %e,
                    "ledger failed: no canary can be recorded, so none is sent and every probe \
                     fails with reason ledger until it works again; in-flight canaries stay \
                     watched in memory"
                );
                LEDGER_RETRY_FIRST
            }
            Some((_, wait)) => {
                tracing::debug!(error = %e, attempts = w.attempts, "ledger still failing");
                (wait * 2).min(LEDGER_RETRY_MAX)
            }
        };
        self.ledger.close();
        w.broken = Some((Instant::now() + wait, wait));
        let mut st = lock(&self.state);
        st.ledger_error = Some(Failure {
            reason: Reason::Ledger,
            detail: e.to_string(),
            at_ms: now_ms(),
        });
        st.all_stale = true;
    }

    /// The deadlines a new canary of `probe` for `mailbox` gets: `base`, with every `"auto"`
    /// stage of `auto` learned from the recent on-time durations of that stage ([`learn`]),
    /// frozen while the probe is failing (an outage is never learned as normal), and
    /// end_to_end the sum when it follows the stages. With several mailboxes, delivery is
    /// learned from `mailbox`'s own canaries (from all of the probe's while it has too few).
    /// Exports `mailcanary_stage_deadline_seconds` and, for `mailbox`,
    /// `mailcanary_delivery_deadline_seconds`.
    pub fn limits_for(
        &self,
        probe: &str,
        mailbox: Option<&str>,
        base: &crate::canary::life::Limits,
        auto: Option<&AutoDeadlines>,
    ) -> crate::canary::life::Limits {
        let mut limits = base.clone();
        let mut st = lock(&self.state);
        let State {
            probes,
            in_flight,
            ledger_error,
            ..
        } = &mut *st;
        let Some(ps) = probes.get_mut(probe) else {
            return limits;
        };
        // Delivery is learned per mailbox only where there is more than one.
        let own = mailbox.filter(|_| ps.mailboxes.len() > 1);
        if let Some(auto) = auto {
            let mine: Vec<&Canary> = in_flight.values().filter(|c| c.probe == probe).collect();
            let frozen =
                verdict(ps, ledger_error.as_ref(), &mine).0 == "failing" || ps.incident.is_some();
            // Durations seen around an incident are not normal either: a canary held by a
            // stall that cleared just before its deadline came through "on time", slow.
            let outages: Vec<(u64, u64)> = ps
                .incidents
                .iter()
                .take(10)
                .map(|i| {
                    (
                        i.onset_after_ms.unwrap_or(i.onset_before_ms),
                        i.cleared_ms.or(i.drained_ms).unwrap_or(u64::MAX),
                    )
                })
                .collect();
            for (stage, floor) in &auto.stages {
                let (min, max) = ((*floor).max(auto.min_ms), auto.max_ms);
                let normal = |c: &&Canary| {
                    let started = c.record(*stage).and_then(|r| r.started_ms).unwrap_or(0);
                    !outages.iter().any(|(a, b)| (*a..=*b).contains(&started))
                };
                let all = || learn(ps.recent.iter().filter(normal), *stage, min, max);
                let value = match own {
                    Some(m) if *stage == Stage::Delivery => {
                        // Frozen before this mailbox learned anything: the probe's (the widest).
                        let current = ps
                            .learned_delivery
                            .get(m)
                            .or(ps.learned.get(stage))
                            .copied();
                        let value = if frozen {
                            current
                        } else {
                            let of_m = ps
                                .recent
                                .iter()
                                .filter(|c| c.mailbox.as_deref() == Some(m))
                                .filter(normal);
                            learn(of_m, *stage, min, max).or_else(all).or(current)
                        };
                        let value = value.unwrap_or(max);
                        ps.learned_delivery.insert(m.to_string(), value);
                        // The probe-wide figure (gauge, status): the largest mailbox's.
                        let widest = ps.learned_delivery.values().copied().max();
                        ps.learned.insert(*stage, widest.unwrap_or(value));
                        value
                    }
                    _ => {
                        let current = ps.learned.get(stage).copied();
                        let value = if frozen { current } else { all().or(current) };
                        let value = value.unwrap_or(max);
                        ps.learned.insert(*stage, value);
                        value
                    }
                };
                limits.set_deadline(*stage, value);
            }
            if auto.end_to_end_is_sum {
                limits.end_to_end_ms = auto.plan.iter().map(|s| limits.deadline(*s)).sum();
            }
        }
        // The probe-wide figures: with deadlines learned per mailbox, delivery's (and an
        // end_to_end that follows the stages) is the widest mailbox's, not the last one asked.
        // (`learned` holds delivery only when it is an auto stage.)
        let widest = own.and_then(|_| ps.learned.get(&Stage::Delivery).copied());
        let mut probe_wide = limits.clone();
        if let Some(w) = widest {
            probe_wide.set_deadline(Stage::Delivery, w);
            if let Some(a) = auto.filter(|a| a.end_to_end_is_sum) {
                probe_wide.end_to_end_ms = a.plan.iter().map(|s| probe_wide.deadline(*s)).sum();
            }
        }
        for stage in &ps.stages {
            let ms = probe_wide.deadline(*stage);
            self.metrics.set_deadline(probe, *stage, ms as f64 / 1000.0);
            ps.deadlines.insert(*stage, ms);
        }
        if let Some(m) = mailbox {
            ps.mailbox_deadlines
                .insert(m.to_string(), limits.deadline(Stage::Delivery));
            self.metrics.set_mailbox_deadline(
                probe,
                m,
                limits.deadline(Stage::Delivery) as f64 / 1000.0,
            );
        }
        limits
    }

    /// Every probe's incidents, the open ones first, then newest first by detection.
    pub fn incidents(&self) -> Vec<Incident> {
        let st = lock(&self.state);
        let mut all: Vec<Incident> = st
            .probes
            .values()
            .flat_map(|ps| ps.incident.iter().chain(ps.incidents.iter()).cloned())
            .collect();
        all.sort_by_key(|i| (!i.is_open(), std::cmp::Reverse(i.detected_ms)));
        all
    }

    /// Time passes for every in-flight canary: deadlines and the lost horizon. Then refreshes
    /// the gauges. Returns the canaries this tick finished (lost), for their clean-up.
    pub fn tick(&self, now: u64) -> Vec<Canary> {
        let mut st = lock(&self.state);
        // Only the canaries due by now, each once (a canary can have several entries).
        let mut keys = Vec::new();
        while st.due.peek().is_some_and(|Reverse((at, _))| *at <= now) {
            if let Some(Reverse((_, key))) = st.due.pop() {
                keys.push(key);
            }
        }
        keys.sort_unstable();
        keys.dedup();
        let mut finished = Vec::new();
        for key in keys {
            let Some(c) = st.in_flight.get_mut(&key) else {
                continue;
            };
            let transitions = c.tick(now);
            if transitions.is_empty() {
                // Not due after all (the entry was older than the canary's last change): its
                // own next wakeup, never before the next tick.
                if let Some(at) = c.next_wakeup() {
                    st.due.push(Reverse((at.max(now + 1), key)));
                }
            } else {
                let snapshot = c.clone();
                if snapshot.is_finished() {
                    finished.push(snapshot.clone());
                }
                self.commit(&mut st, snapshot, &transitions);
            }
        }
        self.end_drains_and_incidents(&mut st, now);
        // Only the probes something happened to: their gauges depend on no clock.
        let stale = std::mem::take(&mut st.stale);
        if std::mem::take(&mut st.all_stale) {
            self.refresh_gauges(&st, now);
        } else if !stale.is_empty() {
            let by_probe = st.in_flight_by_probe();
            for probe in &stale {
                if let Some(ps) = st.probes.get(probe) {
                    let mine: &[&Canary] = by_probe.get(probe.as_str()).map_or(&[], Vec::as_slice);
                    self.set_gauges(&st, probe, ps, mine, now);
                }
            }
        }
        finished
    }

    /// A drain ends when no canary in its stage is past the deadline any more, and an
    /// incident closes once cleared and drained. Nothing to do (no probe draining or in an
    /// incident, as an idle prober): no pass over the canaries in flight.
    fn end_drains_and_incidents(&self, st: &mut State, now: u64) {
        let State {
            in_flight, probes, ..
        } = st;
        if !probes
            .values()
            .any(|ps| ps.incident.is_some() || !ps.drains.is_empty())
        {
            return;
        }
        // One pass over the canaries in flight, not one per probe and stage.
        let overdue: HashSet<(&str, Stage)> = in_flight
            .values()
            .filter_map(|c| {
                let stage = c.current()?;
                c.record(stage)
                    .is_some_and(|r| r.overdue)
                    .then_some((c.probe.as_str(), stage))
            })
            .collect();
        for (name, ps) in probes.iter_mut() {
            let held = |id: &str| in_flight.contains_key(&(name.clone(), id.to_string()));
            if let Some(done) = incident::close_if_drained(&mut ps.incident, held, now) {
                info!(probe = %name, incident = done.id, "incident closed: cleared and drained");
                let _ = self.writer.send(Job::Incident(done.clone()));
                ps.incidents.push_front(done);
                ps.incidents.truncate(incident::KEEP);
            }
            ps.drains
                .retain(|stage, _| overdue.contains(&(name.as_str(), *stage)));
        }
    }

    fn refresh_gauges(&self, st: &State, now: u64) {
        let by_probe = st.in_flight_by_probe();
        for (probe, ps) in &st.probes {
            let mine: &[&Canary] = by_probe.get(probe.as_str()).map_or(&[], Vec::as_slice);
            self.set_gauges(st, probe, ps, mine, now);
        }
    }

    /// The gauges of one probe, right after one of its canaries changed: a scrape between two
    /// ticks then never shows a canary both completed and still in flight.
    fn refresh_probe_gauges(&self, st: &State, probe: &str, now: u64) {
        let Some(ps) = st.probes.get(probe) else {
            return;
        };
        let mine: Vec<&Canary> = st.in_flight.values().filter(|c| c.probe == probe).collect();
        self.set_gauges(st, probe, ps, &mine, now);
    }

    fn set_gauges(&self, st: &State, probe: &str, ps: &ProbeState, mine: &[&Canary], now: u64) {
        for stage in &ps.stages {
            let (mut count, mut overdue, mut oldest) = (0usize, 0usize, 0u64);
            for c in mine {
                if let Some(age) = age_in(c, *stage, now) {
                    count += 1;
                    oldest = oldest.max(age);
                    overdue += usize::from(c.record(*stage).is_some_and(|r| r.overdue));
                }
            }
            // The ages are handed over as the time they are measured from, so the exposition
            // shows them as of each scrape and a waiting canary changes nothing cached.
            let oldest_since = (count > 0).then(|| now.saturating_sub(oldest));
            self.metrics
                .set_in_flight(probe, *stage, count, overdue, oldest_since);
            let (backlog, eta) = backlog(overdue, oldest_since, ps.drains.get(stage));
            self.metrics.set_backlog(probe, *stage, backlog, eta);
        }
        // The same verdict the status page shows: the gauge and the page cannot disagree.
        self.metrics
            .set_probe_success(probe, verdict(ps, st.ledger_error.as_ref(), mine).0 == "ok");
        for m in &ps.mailboxes {
            let (overdue, ok) = mailbox_verdict(ps, m, mine);
            self.metrics.set_mailbox(probe, m, overdue, ok.is_none());
        }
    }

    /// A message that looked like a canary was ignored.
    pub fn ignored(&self, probe: &str, why: Ignored) {
        self.metrics.ignored(probe, why);
    }

    /// A delivered message whose token verified for `probe`: completes the delivery stage, or
    /// is counted as a duplicate (already finished) or unknown (not in our ledger).
    ///
    /// `at` is where it was found: the watcher's mailboxes (a canary for another mailbox of
    /// the probe is not this one's delivery) and folder; found in Junk, the canary fails with
    /// `spam` unless `junk_is_ok`.
    pub fn delivered(
        &self,
        probe: &str,
        id: &str,
        seen_at: u64,
        (uid_validity, uid): (u32, u32),
        at: Found<'_>,
        threaded: impl FnOnce(&str) -> bool,
    ) -> Option<Canary> {
        let updated = self.update(probe, id, |c| {
            if c.delivered_uid.is_some() || !at.is_for(c) {
                return Vec::new();
            }
            c.delivered_uid = Some(uid);
            c.delivered_uid_validity = Some(uid_validity);
            c.threaded = Some(threaded(&c.message_id));
            let mut out = Vec::new();
            // The agent's reply is in the mailbox, so it was posted: whatever the reply POST
            // said (not yet returned, as RT mails inside the request; or failed in a way that
            // may have taken effect, and was not sent again), the reply stage ends here.
            if c.current() == Some(Stage::Reply) {
                out.extend(c.observe(Stage::Reply, seen_at));
            }
            let (route, fault) =
                at.rules
                    .judge(at.received, c.created_ms, at.auth_results, at.verified);
            out.extend(c.observe_delivery_via(
                seen_at,
                at.folder,
                !at.junk_is_ok,
                Some(route),
                fault,
            ));
            out
        });
        match updated {
            Some(c) if c.delivered_uid == Some(uid) && at.is_for(&c) => Some(c),
            Some(c) if !at.is_for(&c) => {
                debug!(%probe, canary = %id, mailbox = ?c.mailbox, "a canary for another mailbox of the probe; not this mailbox's delivery");
                self.ignored(probe, Ignored::Unknown);
                None
            }
            Some(_) => {
                self.ignored(probe, Ignored::Duplicate);
                None
            }
            None => {
                let why = match self.ledger.lookup(probe, id) {
                    Ok(Lookup::Finished(_)) | Ok(Lookup::InFlight(_)) => Ignored::Duplicate,
                    Ok(Lookup::Unknown) => Ignored::Unknown,
                    Err(e) => {
                        self.metrics.ledger_error(e.op());
                        warn!(%probe, canary = %id, error = %e, "cannot look the canary up in the ledger; counted as unknown");
                        Ignored::Unknown
                    }
                };
                self.ignored(probe, why);
                None
            }
        }
    }

    /// A helpdesk's acknowledgement of the canary's ticket arrived (its token without the reply
    /// mark): recorded on the canary (the first one), counted as `acknowledgement`, never the
    /// delivery. Returns true if it should be deleted now: its canary already finished, so no
    /// later clean-up will take it.
    pub fn acknowledged(
        &self,
        probe: &str,
        id: &str,
        seen_at: u64,
        (uid_validity, uid): (u32, u32),
        folder: Folder,
    ) -> bool {
        self.ignored(probe, Ignored::Acknowledgement);
        let recorded = self.update(probe, id, |c| {
            if c.acknowledged.is_none() {
                c.acknowledged = Some(crate::canary::life::Acknowledged {
                    at_ms: seen_at,
                    after_ms: seen_at.saturating_sub(c.created_ms),
                    uid,
                    uid_validity,
                    folder: Some(folder),
                });
                info!(probe = %c.probe, canary = %c.id, after_ms = seen_at.saturating_sub(c.created_ms), "acknowledgement arrived (not the reply)");
            }
            Vec::new()
        });
        recorded.is_none()
    }

    /// A folder of one of the probe's mailboxes is failing (`Some`) or working again
    /// (`None`). Counted once per episode as a delivery failure, of the probe and of the
    /// mailbox.
    pub fn mailbox_status(
        &self,
        probe: &str,
        mailbox: &str,
        folder: Folder,
        failure: Option<(Reason, String)>,
    ) {
        let mut st = lock(&self.state);
        if st.probes.contains_key(probe) {
            st.stale.insert(probe.to_string());
        }
        let Some(ps) = st.probes.get_mut(probe) else {
            return;
        };
        let slot = (mailbox.to_string(), folder);
        match failure {
            Some((reason, detail)) => {
                let new_episode = ps
                    .mailbox_errors
                    .get(&slot)
                    .is_none_or(|f| f.reason != reason);
                ps.mailbox_errors.insert(
                    slot,
                    Failure {
                        reason,
                        detail,
                        at_ms: now_ms(),
                    },
                );
                if new_episode {
                    self.metrics.mailbox_failure(probe, mailbox, reason);
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
            None => {
                ps.mailbox_errors.remove(&slot);
            }
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
                let (state, why) = verdict(ps, st.ledger_error.as_ref(), &refs);
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
                        let overdue = in_flight
                            .iter()
                            .filter(|c| {
                                age_in(c, *s, now).is_some()
                                    && c.record(*s).is_some_and(|r| r.overdue)
                            })
                            .count();
                        let oldest_since =
                            ages.iter().copied().max().map(|a| now.saturating_sub(a));
                        let drain = ps.drains.get(s);
                        let (behind, eta) = backlog(overdue, oldest_since, drain);
                        let (behind_s, eta_s) = (behind.at(now), eta.at(now));
                        StageStatus {
                            stage: *s,
                            in_flight: ages.len(),
                            overdue,
                            backlog: (overdue > 0).then(|| BacklogView {
                                behind_ms: (behind_s * 1000.0) as u64,
                                reached_ms: drain.map(Drain::reached_ms),
                                eta_ms: eta_s.is_finite().then_some((eta_s * 1000.0) as u64),
                            }),
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
                            learned_deadline_ms: ps.learned.get(s).copied(),
                            deadline_ms: ps.deadlines.get(s).copied(),
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
                    mailbox_error: ps.mailbox_errors.values().next().cloned(),
                    mailboxes: ps
                        .mailboxes
                        .iter()
                        .map(|m| mailbox_status(ps, m, &refs, now))
                        .collect(),
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

fn canary_key(c: &Canary) -> String {
    format!("{}\0{}", c.probe, c.id)
}

/// The ledger writer thread: batches whatever is queued (group commit), and while the ledger
/// is failing wakes on its own to reopen it. Ends when the engine is gone.
fn write_loop(engine: Weak<Engine>, jobs: mpsc::Receiver<Job>) {
    let mut w = Writer {
        dirty: HashMap::new(),
        broken: None,
        last_check: Instant::now(),
        attempts: 0,
    };
    loop {
        let wait = match w.broken {
            Some((at, _)) => at.saturating_duration_since(Instant::now()),
            None => LEDGER_CHECK_EVERY.saturating_sub(w.last_check.elapsed()),
        };
        let mut batch = match jobs.recv_timeout(wait) {
            Ok(job) => vec![job],
            Err(mpsc::RecvTimeoutError::Timeout) => Vec::new(),
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        while batch.len() < 4096 {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let Some(engine) = engine.upgrade() else {
            return;
        };
        engine.write_batch(batch, &mut w);
    }
}

/// How long `c` has been in `stage` at `now`, if it is in it (`end_to_end`: since it was sent).
/// Which stages of a probe learn their deadline, and within what.
#[derive(Clone, Debug)]
pub struct AutoDeadlines {
    /// Each `"auto"` stage with its floor: never tighter than what the probe can see (twice
    /// its helpdesk poll for import, twice its IMAP poll for delivery without IDLE).
    pub stages: Vec<(Stage, u64)>,
    pub min_ms: u64,
    pub max_ms: u64,
    /// Every stage of the probe but end_to_end (for the sum and the gauges).
    pub plan: Vec<Stage>,
    pub end_to_end_is_sum: bool,
}

/// On-time durations of a stage needed before its deadline is learned; the newest this many
/// times [`LEARN_WINDOW_FACTOR`] are looked at.
pub const LEARN_MIN_SAMPLES: usize = 10;
const LEARN_WINDOW: usize = 50;
/// The learned deadline is this many times the 99th percentile of the recent on-time
/// durations: room for the tail, tight enough to detect a stall in a few typical durations.
pub const LEARN_FACTOR: u64 = 3;

/// A learned deadline: `LEARN_FACTOR` times the p99 of the newest `LEARN_WINDOW` on-time
/// durations of `stage`, clamped to `[min, max]`; `None` with fewer than
/// `LEARN_MIN_SAMPLES`.
pub fn learn<'a>(
    recent: impl Iterator<Item = &'a Canary>,
    stage: Stage,
    min: u64,
    max: u64,
) -> Option<u64> {
    let mut d: Vec<u64> = recent
        .filter_map(|c| {
            let r = c.record(stage)?;
            if r.overdue || r.unknown {
                return None;
            }
            Some(r.done_ms?.saturating_sub(r.started_ms?))
        })
        .take(LEARN_WINDOW)
        .collect();
    if d.len() < LEARN_MIN_SAMPLES {
        return None;
    }
    d.sort_unstable();
    let p99 = quantile(&d, 0.99)?;
    Some((p99.max(1) * LEARN_FACTOR).clamp(min, max.max(min)))
}

/// `(backlog seconds, drain ETA seconds)` of a stage, as what they grow from: how far behind
/// the part of the backlog not yet reached is, and when it will be reached at the current pace
/// (`+Inf`: not catching up; NaN: not draining). Nothing overdue in the stage: no backlog.
/// `oldest_since`: when the oldest canary waiting in the stage entered it.
fn backlog(overdue: usize, oldest_since: Option<u64>, drain: Option<&Drain>) -> (Live, Live) {
    if overdue == 0 {
        return (Live::Value(0.0), Live::Value(f64::NAN));
    }
    match drain {
        Some(d) => {
            let eta = match d.rate() {
                // `now - reached` shrinks by `rate - 1` a second.
                Some(rate) if rate > 1.0 => Live::Since {
                    since_ms: d.reached_ms(),
                    scale: 1.0 / (rate - 1.0),
                },
                Some(_) => Live::Value(f64::INFINITY),
                None => Live::Value(f64::NAN),
            };
            (Live::age(d.reached_ms()), eta)
        }
        // Held and nothing arriving: stalled.
        None => (
            oldest_since.map_or(Live::Value(0.0), Live::age),
            Live::Value(f64::INFINITY),
        ),
    }
}

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
fn verdict(
    ps: &ProbeState,
    ledger_error: Option<&Failure>,
    in_flight: &[&Canary],
) -> (&'static str, String) {
    if let Some(f) = ledger_error {
        return (
            "failing",
            format!(
                "ledger: no canary can be recorded, so none is sent ({})",
                f.detail
            ),
        );
    }
    if let Some(((m, folder), f)) = ps.mailbox_errors.iter().next() {
        // Which mailbox and folder, when there is more than the one inbox to say.
        let which = if ps.mailboxes.len() == 1 && *folder == Folder::Inbox {
            String::new()
        } else {
            format!(" {m} ({folder})")
        };
        return (
            "failing",
            format!("mailbox{which}: {} ({})", f.reason, f.detail),
        );
    }
    if let Some(c) = in_flight.iter().find(|c| c.is_overdue()) {
        let stage = c.current().map(|s| s.as_str()).unwrap_or("?");
        return ("failing", format!("a canary is overdue in {stage}"));
    }
    if let Some(c) = in_flight.iter().find(|c| c.is_failing()) {
        let stage = c.current().map(|s| s.as_str()).unwrap_or("?");
        return ("degraded", format!("errors in {stage}; still retrying"));
    }
    // Every mailbox's newest canary counts: mail to one that fails is not hidden by the
    // others' on-time canaries of the same send.
    let mut bad: Vec<(&String, Outcome)> = ps
        .newest_result
        .iter()
        .filter(|(_, (_, o))| *o != Outcome::OnTime)
        .map(|(m, (_, o))| (m, *o))
        .collect();
    bad.sort_by(|a, b| a.0.cmp(b.0));
    match bad.first() {
        None => ("ok", String::new()),
        Some((m, o)) if ps.mailboxes.len() > 1 => (
            "failing",
            format!(
                "the newest canary to mailbox {m} ended {}",
                outcome_word(*o)
            ),
        ),
        Some((_, o)) => (
            "failing",
            format!("the newest canary ended {}", outcome_word(*o)),
        ),
    }
}

fn outcome_word(o: Outcome) -> String {
    format!("{o:?}").to_lowercase()
}

/// Remembers a finished canary as its mailbox's newest result (and newest delivery, if it
/// reached delivery), when it is newer than what is there.
fn note_result(
    results: &mut HashMap<String, (u64, Outcome)>,
    deliveries: &mut HashMap<String, (u64, bool)>,
    c: &Canary,
) {
    let (Some(o), Some(m)) = (c.outcome, c.mailbox.as_ref()) else {
        return;
    };
    if results.get(m).is_none_or(|(t, _)| c.created_ms >= *t) {
        results.insert(m.clone(), (c.created_ms, o));
    }
    if let Some(r) = c.record(Stage::Delivery)
        && r.started_ms.is_some()
        && deliveries.get(m).is_none_or(|(t, _)| c.created_ms >= *t)
    {
        let good = r.done_ms.is_some() && !r.overdue && r.failed.is_none() && !c.spam;
        deliveries.insert(m.clone(), (c.created_ms, good));
    }
}

/// One mailbox's delivery: how many of its canaries are overdue in delivery, and why it is
/// not ok (`None` when it is).
fn mailbox_verdict(ps: &ProbeState, m: &str, in_flight: &[&Canary]) -> (usize, Option<String>) {
    let overdue = in_flight
        .iter()
        .filter(|c| {
            c.mailbox.as_deref() == Some(m)
                && c.current() == Some(Stage::Delivery)
                && c.record(Stage::Delivery).is_some_and(|r| r.overdue)
        })
        .count();
    let why = if let Some((folder, f)) = ps
        .mailbox_errors
        .iter()
        .find(|((name, _), _)| name == m)
        .map(|((_, folder), f)| (folder, f))
    {
        Some(format!("{folder}: {} ({})", f.reason, f.detail))
    } else if overdue > 0 {
        Some(format!("{overdue} canary(ies) overdue in delivery"))
    } else if ps.newest_delivery.get(m).is_some_and(|(_, good)| !good) {
        Some("the newest delivery was late, in Junk or never came".to_string())
    } else {
        None
    };
    (overdue, why)
}

fn mailbox_status(ps: &ProbeState, m: &str, in_flight: &[&Canary], now: u64) -> MailboxStatus {
    let (overdue, why) = mailbox_verdict(ps, m, in_flight);
    let mine = |c: &&&Canary| c.mailbox.as_deref() == Some(m);
    let waiting: Vec<u64> = in_flight
        .iter()
        .filter(mine)
        .filter_map(|c| age_in(c, Stage::Delivery, now))
        .collect();
    let delivered: Vec<&Canary> = ps
        .recent
        .iter()
        .filter(|c| c.mailbox.as_deref() == Some(m) && c.folder.is_some())
        .collect();
    let mut durations: Vec<u64> = delivered
        .iter()
        .filter_map(|c| stage_duration(c, Stage::Delivery))
        .collect();
    durations.sort_unstable();
    let last = delivered
        .iter()
        .filter_map(|c| Some((c.record(Stage::Delivery)?.done_ms?, c.folder?)))
        .max_by_key(|(t, _)| *t);
    MailboxStatus {
        name: m.to_string(),
        state: if why.is_none() { "ok" } else { "failing" },
        why: why.unwrap_or_default(),
        errors: ps
            .mailbox_errors
            .iter()
            .filter(|((name, _), _)| name == m)
            .map(|((_, folder), f)| (*folder, f.clone()))
            .collect(),
        in_flight: waiting.len(),
        overdue,
        oldest_in_flight_ms: waiting.iter().copied().max(),
        p50_ms: quantile(&durations, 0.50),
        learned_deadline_ms: ps.learned_delivery.get(m).copied(),
        deadline_ms: ps.mailbox_deadlines.get(m).copied(),
        last_delivered_ms: last.map(|(t, _)| t),
        last_folder: last.map(|(_, f)| f),
        inbox: delivered
            .iter()
            .filter(|c| c.folder == Some(Folder::Inbox))
            .count(),
        junk: delivered
            .iter()
            .filter(|c| c.folder == Some(Folder::Junk))
            .count(),
    }
}

/// Where a delivered message was found, for [`Engine::delivered`].
#[derive(Clone, Copy, Debug)]
pub struct Found<'a> {
    /// The mailboxes of the probe that this watcher's mailbox is.
    pub mailboxes: &'a [String],
    pub folder: Folder,
    pub junk_is_ok: bool,
    /// The delivered mail's `Received` and `Authentication-Results` headers
    /// ([`crate::canary::Candidate`]), judged by the probe's `rules`.
    pub received: &'a [crate::canary::hops::Hop],
    pub auth_results: &'a [crate::canary::hops::AuthHeader],
    pub rules: &'a crate::canary::hops::RouteRules,
    /// The prober's own DKIM/ARC verdicts (`verify_dkim`), empty when not verified.
    pub verified: &'a [crate::canary::hops::Verdict],
}

impl Found<'_> {
    fn is_for(&self, c: &Canary) -> bool {
        c.mailbox
            .as_ref()
            .is_none_or(|m| self.mailboxes.iter().any(|n| n == m))
    }
}

/// Whether `t` is news for the canary's own run, which waits for its ticket or its reply: a
/// later stage done elsewhere (the dispatcher saw the reply arrive early), or the canary ended.
/// Its own submit and a deadline miss are not (a missed deadline changes nothing it does), so
/// a run wakes for neither and keeps to its poll interval.
fn wakes_the_run(t: &Transition) -> bool {
    match t {
        Transition::StageDone { stage, .. } => *stage != Stage::Submit,
        Transition::Lost { .. } | Transition::Finished { .. } => true,
        Transition::StageFailed { .. } => false,
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
    /// Of those, past the stage's deadline.
    pub overdue: usize,
    /// While canaries are held past the deadline: how far behind, and the drain.
    pub backlog: Option<BacklogView>,
    pub oldest_in_flight_ms: Option<u64>,
    /// Over the recent finished canaries (up to [`RECENT_PER_PROBE`]), late ones included.
    pub p50_ms: Option<u64>,
    pub p95_ms: Option<u64>,
    /// When a recent canary last finished this stage on time.
    pub last_success_ms: Option<u64>,
    /// The learned deadline new canaries get, for an `"auto"` stage.
    pub learned_deadline_ms: Option<u64>,
    /// The deadline new canaries get (fixed or learned; with several mailboxes, delivery's is
    /// the largest of theirs).
    pub deadline_ms: Option<u64>,
}

/// A stage's backlog, for the status page.
#[derive(Serialize)]
pub struct BacklogView {
    /// How far behind the unreached part of the backlog is.
    pub behind_ms: u64,
    /// The stage start (canary time) of the newest held canary through, once one arrived.
    pub reached_ms: Option<u64>,
    /// Time left at the current pace; `None` while not catching up (or not yet measured).
    pub eta_ms: Option<u64>,
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

/// One mailbox of a probe, for the status page: its delivery judged on its own.
#[derive(Serialize)]
pub struct MailboxStatus {
    /// The config's name (the `mailbox` label), never the address.
    pub name: String,
    /// `ok` or `failing` (`mailcanary_mailbox_success`).
    pub state: &'static str,
    pub why: String,
    /// Its watched folders that are failing.
    pub errors: Vec<(Folder, Failure)>,
    /// Canaries awaited in it, and of those past the delivery deadline.
    pub in_flight: usize,
    pub overdue: usize,
    pub oldest_in_flight_ms: Option<u64>,
    /// Over the recent finished canaries delivered into it.
    pub p50_ms: Option<u64>,
    /// Its own learned delivery deadline, for a probe with several mailboxes and delivery
    /// `"auto"` (the probe's otherwise: `stages`).
    pub learned_deadline_ms: Option<u64>,
    /// The delivery deadline its new canaries get.
    pub deadline_ms: Option<u64>,
    pub last_delivered_ms: Option<u64>,
    pub last_folder: Option<Folder>,
    /// Recent deliveries by folder.
    pub inbox: usize,
    pub junk: usize,
}

#[derive(Serialize)]
pub struct ProbeStatus {
    pub name: String,
    /// `ok`, `degraded` or `failing`.
    pub state: &'static str,
    /// Why, in a sentence, when not ok.
    pub why: String,
    pub stages: Vec<StageStatus>,
    /// The first failing folder of its mailboxes (all of them: `mailboxes`).
    pub mailbox_error: Option<Failure>,
    pub mailboxes: Vec<MailboxStatus>,
    /// Newest first.
    pub failures: Vec<FailureView>,
    pub in_flight: Vec<Canary>,
    pub recent: Vec<Canary>,
}

#[cfg(test)]
mod learn_tests {
    use super::*;
    use crate::canary::life::Limits;

    fn canary(import_ms: u64, overdue: bool) -> Canary {
        let limits = Limits {
            submit_ms: 1_000,
            import_ms: 60_000,
            reply_ms: 1_000,
            delivery_ms: 1_000,
            end_to_end_ms: 100_000,
            lost_after_ms: 1_000_000,
        };
        let mut c = Canary::new(
            "p",
            "id",
            "tok",
            "mid",
            vec![Stage::Submit, Stage::Import],
            limits,
            0,
        );
        c.observe(Stage::Submit, 10);
        if overdue {
            c.tick(10 + 60_001);
        }
        c.observe(Stage::Import, 10 + import_ms);
        c
    }

    #[test]
    fn a_deadline_is_learned_from_enough_on_time_durations_and_clamped() {
        let few: Vec<Canary> = (0..9).map(|i| canary(100 + i, false)).collect();
        assert_eq!(
            learn(few.iter(), Stage::Import, 1_000, 30_000),
            None,
            "too few"
        );
        let many: Vec<Canary> = (0..20).map(|i| canary(1_000 + i * 10, false)).collect();
        // p99 of 1000..1190 is 1190: three times that.
        assert_eq!(
            learn(many.iter(), Stage::Import, 1_000, 30_000),
            Some(3_570)
        );
        assert_eq!(
            learn(many.iter(), Stage::Import, 5_000, 30_000),
            Some(5_000),
            "floor"
        );
        assert_eq!(
            learn(many.iter(), Stage::Import, 1_000, 2_000),
            Some(2_000),
            "ceiling"
        );
        // Late ones (an outage) never teach it.
        let mut with_outage = many.clone();
        with_outage.extend((0..30).map(|_| canary(90_000, true)));
        assert_eq!(
            learn(with_outage.iter(), Stage::Import, 1_000, 300_000),
            Some(3_570)
        );
    }
}

#[cfg(test)]
mod mailbox_tests {
    use super::*;
    use crate::canary::life::tests::limits;

    const PLAN: [Stage; 2] = [Stage::Submit, Stage::Delivery];

    fn canary(id: &str, at: u64) -> Canary {
        Canary::new("p", id, id, id, PLAN.to_vec(), limits(), at)
    }

    #[test]
    fn records_from_before_mailboxes_are_the_first_mailboxs() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        let now = now_ms();
        // Written by a prober that knew one mailbox per probe: no `mailbox`, no `folder`.
        let mut waiting = canary("waiting", now);
        waiting.observe(Stage::Submit, now + 10);
        let mut failed = canary("failed", now.saturating_sub(1_000));
        failed.fail(Reason::Tempfail, "451", now.saturating_sub(900));
        assert_eq!(
            (waiting.mailbox.as_ref(), failed.mailbox.as_ref()),
            (None, None)
        );
        ledger
            .write(&[Write::Put(waiting), Write::Finish(failed)])
            .unwrap();

        let engine = Engine::new(ledger, Arc::new(Metrics::new("t", "t")));
        let names = ["gmail".to_string(), "m365".to_string()];
        engine.register_probe("p", &PLAN, &names);
        let resumed = engine.resume();
        assert_eq!(resumed.len(), 1);
        assert_eq!(resumed[0].mailbox.as_deref(), Some("gmail"));
        let st = &engine.status(now_ms())[0];
        assert_eq!(st.state, "failing");
        assert!(st.why.contains("mailbox gmail"), "{}", st.why);
        let m365 = st.mailboxes.iter().find(|m| m.name == "m365").unwrap();
        assert_eq!(m365.state, "ok", "the old failure is not m365's");

        // Seen by m365's watcher it is not m365's delivery; by gmail's it is.
        static NO_RULES: crate::canary::hops::RouteRules = crate::canary::hops::RouteRules {
            require_tls_hops: false,
            require_auth: Vec::new(),
            trusted_authserv_ids: Vec::new(),
            require_verified: Vec::new(),
        };
        fn at(mailboxes: &[String]) -> Found<'_> {
            Found {
                mailboxes,
                folder: Folder::Inbox,
                junk_is_ok: false,
                received: &[],
                auth_results: &[],
                rules: &NO_RULES,
                verified: &[],
            }
        }
        let (gmail, m365) = (&names[..1], &names[1..]);
        assert!(
            engine
                .delivered("p", "waiting", now + 200, (1, 7), at(m365), |_| false)
                .is_none()
        );
        let done = engine
            .delivered("p", "waiting", now + 300, (1, 7), at(gmail), |_| false)
            .expect("delivered");
        assert_eq!(done.outcome, Some(Outcome::OnTime));
        assert_eq!(done.folder, Some(Folder::Inbox));
        // The newest of gmail is now on time, and nothing of m365 failed: ok.
        assert_eq!(engine.status(now_ms())[0].state, "ok");
    }
}

#[cfg(test)]
mod learn_per_mailbox_tests {
    use super::*;

    /// With several mailboxes an `"auto"` delivery deadline is each mailbox's own: one learned
    /// from all of them would follow the slowest (a fast mailbox's stall caught only at the slow
    /// one's pace).
    #[test]
    fn each_mailbox_learns_its_own_delivery_deadline() {
        use crate::canary::life::tests::limits;
        const PLAN: [Stage; 2] = [Stage::Submit, Stage::Delivery];
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        let t0 = now_ms().saturating_sub(600_000);
        let mut writes = Vec::new();
        for i in 0..20u64 {
            for (mailbox, took) in [("fast", 100 + i), ("slow", 4_000 + i)] {
                let at = t0 + i * 10_000;
                let id = format!("{mailbox}{i}");
                let mut c = Canary::new("p", &id, &id, &id, PLAN.to_vec(), limits(), at);
                c.mailbox = Some(mailbox.into());
                c.observe(Stage::Submit, at + 10);
                c.observe(Stage::Delivery, at + 10 + took);
                assert_eq!(c.outcome, Some(Outcome::OnTime));
                writes.push(Write::Finish(c));
            }
        }
        ledger.write(&writes).unwrap();
        let metrics = Arc::new(Metrics::new("t", "t"));
        let engine = Engine::new(ledger, metrics.clone());
        let names = ["fast", "slow", "new"].map(String::from);
        engine.register_probe("p", &PLAN, &names);
        let auto = AutoDeadlines {
            stages: vec![(Stage::Delivery, 0)],
            min_ms: 100,
            max_ms: 600_000,
            plan: PLAN.to_vec(),
            end_to_end_is_sum: true,
        };
        let deadline = |m: &str| {
            engine
                .limits_for("p", Some(m), &limits(), Some(&auto))
                .deadline(Stage::Delivery)
        };
        // Three times each one's p99 (fast 100..119 ms, slow 4,000..4,019 ms).
        assert_eq!(deadline("fast"), 357);
        assert_eq!(deadline("slow"), 12_057);
        // A mailbox without deliveries yet takes the probe's (all of them: the slow tail).
        assert_eq!(deadline("new"), 12_057);
        let limits_fast = engine.limits_for("p", Some("fast"), &limits(), Some(&auto));
        assert_eq!(
            limits_fast.end_to_end_ms,
            1_000 + 357,
            "the sum follows the mailbox"
        );
        let text = String::from_utf8(metrics.exposition().to_vec()).unwrap();
        for line in [
            "mailcanary_delivery_deadline_seconds{mailbox=\"fast\",probe=\"p\"} 0.357",
            "mailcanary_delivery_deadline_seconds{mailbox=\"slow\",probe=\"p\"} 12.057",
            // The probe-wide gauge says the widest.
            "mailcanary_stage_deadline_seconds{probe=\"p\",stage=\"delivery\"} 12.057",
        ] {
            assert!(text.contains(line), "{line} in:\n{text}");
        }
        let st = &engine.status(now_ms())[0];
        let fast = st.mailboxes.iter().find(|m| m.name == "fast").unwrap();
        assert_eq!(fast.learned_deadline_ms, Some(357));
        assert_eq!(fast.deadline_ms, Some(357));
        let delivery = st
            .stages
            .iter()
            .find(|s| s.stage == Stage::Delivery)
            .unwrap();
        assert_eq!(delivery.deadline_ms, Some(12_057), "the widest");
        let e2e = st
            .stages
            .iter()
            .find(|s| s.stage == Stage::EndToEnd)
            .unwrap();
        assert_eq!(
            e2e.deadline_ms,
            Some(1_000 + 12_057),
            "asked last for fast, still the widest"
        );

        // One mailbox: the probe's deadline, as before.
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        let engine = Engine::new(ledger, Arc::new(Metrics::new("t", "t")));
        engine.register_probe("p", &PLAN, &["only".to_string()]);
        let l = engine.limits_for("p", Some("only"), &limits(), Some(&auto));
        assert_eq!(
            l.deadline(Stage::Delivery),
            600_000,
            "nothing learned yet: auto_max"
        );
    }
}

#[cfg(test)]
mod bell_tests {
    use super::*;
    use crate::canary::life::tests::limits;

    const PLAN: [Stage; 2] = [Stage::Submit, Stage::Delivery];

    /// Whether `bell` stays silent for 200 ms.
    async fn unrung(bell: &Bell) -> bool {
        tokio::time::timeout(Duration::from_millis(200), bell.rung())
            .await
            .is_err()
    }

    /// A change to one canary rings that canary's bell only: with a thousand canaries in
    /// flight, one event wakes one run, not a thousand.
    #[tokio::test]
    async fn an_event_rings_its_own_canarys_bell_only() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::new(
            Ledger::open(dir.path()).unwrap(),
            Arc::new(Metrics::new("t", "t")),
        );
        engine.register_probe("p", &PLAN, &[]);
        let now = now_ms();
        for id in ["a", "b"] {
            engine
                .begin(Canary::new("p", id, id, id, PLAN.to_vec(), limits(), now))
                .await
                .unwrap();
        }
        let (a, b) = (engine.bell("p", "a"), engine.bell("p", "b"));
        // A canary's own submit is no news for its run (nor is a missed deadline).
        engine.update("p", "a", |c| c.observe(Stage::Submit, now + 5));
        engine.update("p", "b", |c| c.observe(Stage::Submit, now + 6));
        engine.flush(Duration::from_secs(10));
        assert!(unrung(&a).await, "a's own submit must not wake a's run");
        // The reply arriving (the dispatcher's change) is, and for a only.
        engine.update("p", "a", |c| c.observe(Stage::Delivery, now + 50));
        tokio::time::timeout(Duration::from_secs(10), a.rung())
            .await
            .expect("a's delivery rings a's bell");
        assert!(unrung(&b).await, "a's change must not ring b's bell");
        // A ring while the run is busy elsewhere is kept for its next wait.
        engine.update("p", "b", |c| c.observe(Stage::Delivery, now + 60));
        engine.flush(Duration::from_secs(10));
        tokio::time::timeout(Duration::from_secs(10), b.rung())
            .await
            .expect("b's change is kept until b waits");
        // Dropped bells are taken down.
        drop((a, b));
        assert!(engine.bells.lock().unwrap().is_empty());
    }
}
