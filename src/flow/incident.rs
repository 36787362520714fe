//! Incidents: the story of an outage, as the prober's canaries saw it, kept so the postmortem
//! need not be reconstructed by hand (the seed's "Notes on the downtime", in numbers).
//!
//! An incident of a probe **opens** at the first failing verdict: a stage past its deadline, a
//! canary that failed for good, or one lost. It records the stage and reason that opened it
//! (and every other stage and reason that failed while it was open); the window in which the
//! outage can have begun (after the last canary that went through that stage on time, before
//! the first failing canary would normally have got through); when it was detected; when the
//! first canary went through on time again (**cleared**); when the last canary held past its
//! deadline came through (**drained**), which closes it; how many canaries were held, late,
//! lost or failed; and the largest delay. Times are canary times (`crate::clock`), shown on
//! the wall clock.
//!
//! The engine keeps the open incident and the recent closed ones per probe, and writes every
//! change to the ledger (the newest [`KEEP`] per probe), so a restart resumes an open incident
//! and the history survives it.

use serde::{Deserialize, Serialize};

use crate::canary::life::{Canary, Outcome, Reason, Stage, Transition};

/// Closed incidents kept per probe (in memory and in the ledger).
pub const KEEP: usize = 100;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Incident {
    pub probe: String,
    /// Per probe, increasing.
    pub id: u64,
    /// The stage and reason that opened it.
    pub stage: Stage,
    pub reason: Reason,
    /// Every other stage and reason that failed while it was open.
    #[serde(default)]
    pub also: Vec<(Stage, Reason)>,
    /// The outage began after this (the last on-time pass of the stage before), if known.
    pub onset_after_ms: Option<u64>,
    /// ... and before this (the first failing canary's start in the stage, plus the time the
    /// stage took on time recently).
    pub onset_before_ms: u64,
    pub detected_ms: u64,
    /// The first held canary came through (late): the broken part works again (the fix).
    #[serde(default)]
    pub resumed_ms: Option<u64>,
    /// The latest a held canary came through.
    #[serde(default)]
    pub last_held_through_ms: Option<u64>,
    /// The first canary through on time after it opened.
    pub cleared_ms: Option<u64>,
    /// The last canary held past its deadline came through (or was lost): closed.
    pub drained_ms: Option<u64>,
    /// Canaries that went past a deadline while it was open.
    pub held: u32,
    /// Of those, the ones that came through late.
    pub late: u32,
    pub lost: u32,
    /// Canaries that failed for good (a rejection, an auth error).
    pub failed: u32,
    /// The longest a stage took (or has taken so far) while it was open.
    pub max_delay_ms: u64,
    /// Ids of the held canaries (bounded by the probe's max_in_flight while open).
    #[serde(default)]
    pub held_ids: Vec<String>,
}

impl Incident {
    pub fn is_open(&self) -> bool {
        self.drained_ms.is_none()
    }
}

/// Whether a transition is a failing verdict (what opens an incident).
fn failing(t: &Transition) -> Option<(Stage, Reason)> {
    match t {
        Transition::StageFailed {
            stage,
            reason: Reason::Deadline,
        } => Some((*stage, Reason::Deadline)),
        Transition::Lost { stage } => Some((*stage, Reason::Deadline)),
        _ => None,
    }
}

/// What recent finished canaries say about a stage: the last on-time completion before `at`,
/// and the 95th percentile of its on-time durations.
fn stage_history<'a>(
    recent: impl Iterator<Item = &'a Canary>,
    stage: Stage,
    at: u64,
) -> (Option<u64>, Option<u64>) {
    let mut last_ok = None;
    let mut durations = Vec::new();
    for c in recent {
        let Some(r) = c.record(stage) else { continue };
        if r.overdue || r.unknown {
            continue;
        }
        if let (Some(s), Some(d)) = (r.started_ms, r.done_ms) {
            durations.push(d.saturating_sub(s));
            if d <= at {
                last_ok = Some(last_ok.map_or(d, |l: u64| l.max(d)));
            }
        }
    }
    durations.sort_unstable();
    let p95 = (!durations.is_empty()).then(|| {
        let i = ((durations.len() as f64 * 0.95).ceil() as usize).clamp(1, durations.len());
        durations[i - 1]
    });
    (last_ok, p95)
}

/// Applies what happened to `canary` to the probe's open incident (opening one if this is a
/// failing verdict). `recent` are the probe's recently finished canaries, `next_id` the id a
/// new incident gets. Returns true if the incident changed.
pub fn observe(
    open: &mut Option<Incident>,
    next_id: u64,
    canary: &Canary,
    transitions: &[Transition],
    recent: &std::collections::VecDeque<Canary>,
    now: u64,
) -> bool {
    let mut changed = false;
    for t in transitions {
        if let Some((stage, reason)) = failing(t) {
            match open {
                None => {
                    let started = canary
                        .record(stage)
                        .and_then(|r| r.started_ms)
                        .unwrap_or(canary.created_ms);
                    let (after, p95) = stage_history(recent.iter(), stage, started);
                    let before = started
                        .saturating_add(p95.unwrap_or(canary.limits.deadline(stage)))
                        .min(now);
                    *open = Some(Incident {
                        probe: canary.probe.clone(),
                        id: next_id,
                        stage,
                        reason,
                        also: Vec::new(),
                        onset_after_ms: after,
                        onset_before_ms: before,
                        detected_ms: now,
                        resumed_ms: None,
                        last_held_through_ms: None,
                        cleared_ms: None,
                        drained_ms: None,
                        held: 0,
                        late: 0,
                        lost: 0,
                        failed: 0,
                        max_delay_ms: 0,
                        held_ids: Vec::new(),
                    });
                    changed = true;
                }
                Some(i) => {
                    if (i.stage, i.reason) != (stage, reason) && !i.also.contains(&(stage, reason))
                    {
                        i.also.push((stage, reason));
                        changed = true;
                    }
                }
            }
            if let Some(i) = open.as_mut()
                && reason == Reason::Deadline
                && !i.held_ids.contains(&canary.id)
            {
                i.held_ids.push(canary.id.clone());
                i.held += 1;
                changed = true;
            }
        }
        let Some(i) = open.as_mut() else { continue };
        match t {
            Transition::StageDone {
                stage,
                duration_ms,
                late,
            } => {
                if *duration_ms > i.max_delay_ms && *late {
                    i.max_delay_ms = *duration_ms;
                    changed = true;
                }
                // A held canary through the stage that held it: the stage works again.
                if *late && *stage == i.stage && i.held_ids.contains(&canary.id) {
                    i.resumed_ms.get_or_insert(now);
                    i.last_held_through_ms = Some(now);
                    changed = true;
                }
            }
            Transition::Finished { outcome } => {
                match outcome {
                    Outcome::OnTime if i.cleared_ms.is_none() => i.cleared_ms = Some(now),
                    Outcome::Late if i.held_ids.contains(&canary.id) => i.late += 1,
                    Outcome::Lost => i.lost += 1,
                    Outcome::Failed => i.failed += 1,
                    _ => continue,
                }
                changed = true;
            }
            _ => {}
        }
    }
    changed
}

/// Closes the open incident once it cleared and none of its held canaries is still in
/// flight. Returns the closed incident.
pub fn close_if_drained(
    open: &mut Option<Incident>,
    still_held: impl Fn(&str) -> bool,
    now: u64,
) -> Option<Incident> {
    let i = open.as_ref()?;
    if i.cleared_ms.is_none() || i.held_ids.iter().any(|id| still_held(id)) {
        return None;
    }
    let mut done = open.take()?;
    // Drained when the last held canary came through (or now, if none did: all lost).
    done.drained_ms = Some(done.last_held_through_ms.unwrap_or(now).min(now));
    Some(done)
}

/// Wall-clock time (UTC) of a canary time of a prober whose wall clock is `offset` ms ahead
/// of its canary time (`/api/v1/incidents` says; 0 for a stopped prober's ledger, whose canary
/// time was the wall clock at its start).
fn clock(canary_ms: u64, offset: i64) -> String {
    let wall = canary_ms as i64 + offset;
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(wall)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_default()
}

/// A duration for people: `42 s`, `3 min 10 s`, `13 h 2 min`.
pub fn human(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{:.1} s", ms as f64 / 1000.0),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

/// The incident as Markdown, ready to paste into a postmortem.
pub fn markdown(i: &Incident, offset: i64) -> String {
    let mut out = format!(
        "### Incident {} of probe `{}`: {} ({})\n\n",
        i.id, i.probe, i.stage, i.reason
    );
    let began = match i.onset_after_ms {
        Some(a) => format!(
            "between {} and {} (last canary through {} on time; the first that was not)",
            clock(a, offset),
            clock(i.onset_before_ms, offset),
            i.stage
        ),
        None => format!("before {}", clock(i.onset_before_ms, offset)),
    };
    out.push_str(&format!("- **Began**: {began}\n"));
    out.push_str(&format!(
        "- **Detected**: {} ({} after it can have begun at the latest)\n",
        clock(i.detected_ms, offset),
        human(i.detected_ms.saturating_sub(i.onset_before_ms))
    ));
    if let Some(r) = i.resumed_ms {
        out.push_str(&format!(
            "- **{} resumed**: {} (the first held canary came through; {} after detection)\n",
            i.stage,
            clock(r, offset),
            human(r.saturating_sub(i.detected_ms))
        ));
    }
    match i.cleared_ms {
        Some(c) => out.push_str(&format!(
            "- **Cleared**: {} (first canary through on time; {} after detection)\n",
            clock(c, offset),
            human(c.saturating_sub(i.detected_ms))
        )),
        None => out.push_str("- **Cleared**: not yet\n"),
    }
    match (i.drained_ms, i.resumed_ms) {
        (Some(d), Some(r)) => out.push_str(&format!(
            "- **Backlog drained**: {} (the last held canary through; {} after the stage resumed)\n",
            clock(d, offset),
            human(d.saturating_sub(r))
        )),
        (Some(d), None) => out.push_str(&format!(
            "- **Closed**: {} (no held canary came through)\n",
            clock(d, offset)
        )),
        _ => out.push_str("- **Backlog drained**: not yet (open)\n"),
    }
    out.push_str(&format!(
        "- **Canaries**: {} held past a deadline, {} came through late, {} lost, {} failed; largest delay {}\n",
        i.held,
        i.late,
        i.lost,
        i.failed,
        human(i.max_delay_ms)
    ));
    if !i.also.is_empty() {
        let also: Vec<String> = i.also.iter().map(|(s, r)| format!("{s} ({r})")).collect();
        out.push_str(&format!(
            "- **Also failing meanwhile**: {}\n",
            also.join(", ")
        ));
    }
    out
}

/// One line per incident, for a terminal.
pub fn text_line(i: &Incident, offset: i64) -> String {
    format!(
        "{probe} #{id} {stage}/{reason} detected {det}, {state}; held {held}, late {late}, lost {lost}, failed {failed}, max delay {max}",
        probe = i.probe,
        id = i.id,
        stage = i.stage,
        reason = i.reason,
        det = clock(i.detected_ms, offset),
        state = match (i.cleared_ms, i.drained_ms) {
            (_, Some(d)) => format!("drained {}", clock(d, offset)),
            (Some(c), None) => format!("cleared {}, draining", clock(c, offset)),
            (None, None) => "open".to_string(),
        },
        held = i.held,
        late = i.late,
        lost = i.lost,
        failed = i.failed,
        max = human(i.max_delay_ms),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_a_postmortem() {
        assert_eq!(human(4_200), "4.2 s");
        assert_eq!(human(190_000), "3 min 10 s");
        assert_eq!(human(13 * 3_600_000 + 120_000), "13 h 2 min");
    }
}
