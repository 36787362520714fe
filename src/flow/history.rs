//! Each probe's stages over time: per minute, how many canaries passed the stage on time, how
//! many failed it (a missed deadline or a hard failure), and the durations measured, kept in
//! the ledger so the dashboard's charts (latency over 24 h, availability over 24 h and 7 d)
//! survive a restart.
//!
//! Bounded: one record per probe, stage and wall-clock hour, holding the hour's totals and,
//! for the newest [`DETAIL_HOURS`], its minutes with up to [`SAMPLES_PER_MINUTE`] durations
//! each. Hours older than [`KEEP_HOURS`] are deleted; older than [`DETAIL_HOURS`] they keep
//! their totals only. A probe at one canary a minute costs about 170 records a stage.
//!
//! Counted from the canary's transitions, each of which happens exactly once in its life
//! (across restarts too), so a restart neither loses nor doubles a mark: a stage end on time
//! is `ok`, a stage failure (`StageFailed`, deadline included) is `bad`, and a late stage end
//! adds its duration but no second `bad` (its missed deadline was counted when it passed).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::canary::life::{Canary, Outcome, Reason, Stage, Transition};

const MINUTE_MS: u64 = 60_000;
const HOUR_MS: u64 = 3_600_000;
/// Hours that keep their minutes: the 24 h chart and the hour in progress.
pub const DETAIL_HOURS: u64 = 25;
/// Hours kept at all: 7 days and the hour in progress.
pub const KEEP_HOURS: u64 = 7 * 24 + 1;
/// Durations kept per minute; more stage ends in a minute still count in `ok`/`bad`.
pub const SAMPLES_PER_MINUTE: usize = 60;

/// One wall-clock hour of one stage, as the ledger stores it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hour {
    pub ok: u32,
    pub bad: u32,
    /// In time order; empty once the hour is older than [`DETAIL_HOURS`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub minutes: Vec<Minute>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Minute {
    /// Minute of the hour, 0 to 59.
    pub m: u8,
    pub ok: u32,
    pub bad: u32,
    /// Durations in ms of the stage ends in this minute (on time and late), the first
    /// [`SAMPLES_PER_MINUTE`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ms: Vec<u32>,
}

/// A record that changed: `None` deletes it.
pub type Change = (Stage, u64, Option<Hour>);

/// The ledger key of a stage's hour: hour index times 8 plus the stage's index, so one
/// probe's records are one key range.
pub fn key(stage: Stage, hour: u64) -> u64 {
    hour * 8 + stage_index(stage)
}

/// The inverse of [`key`]; `None` for a stage index this build does not know.
pub fn from_key(k: u64) -> Option<(Stage, u64)> {
    Stage::ALL
        .get((k % 8) as usize)
        .map(|stage| (*stage, k / 8))
}

fn stage_index(stage: Stage) -> u64 {
    Stage::ALL.iter().position(|s| *s == stage).unwrap_or(0) as u64
}

/// What one transition means for a stage's history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark {
    /// The stage ended within its deadline, after `ms`.
    OnTime(u64),
    /// The stage ended past its deadline (already counted `Failed` when it passed).
    Late(u64),
    /// The stage failed: its deadline passed, or a hard failure ended the canary in it.
    Failed,
}

/// The marks a change of `canary` (after the change) leaves in its stages' histories. An
/// error met while a stage goes on (`StageFailed` from `note_error`) is no mark: the stage
/// may still pass on time. A hard failure in a stage already past its deadline is no second
/// mark. A hard failure also fails `end_to_end`, which no deadline of its own will.
pub fn marks(canary: &Canary, transitions: &[Transition]) -> Vec<(Stage, Mark)> {
    let mut out = Vec::new();
    for t in transitions {
        match t {
            Transition::StageDone {
                stage,
                duration_ms,
                late,
            } => out.push((
                *stage,
                if *late {
                    Mark::Late(*duration_ms)
                } else {
                    Mark::OnTime(*duration_ms)
                },
            )),
            Transition::StageFailed {
                stage,
                reason: Reason::Deadline,
            } => out.push((*stage, Mark::Failed)),
            Transition::StageFailed { stage, reason } => {
                let r = canary.record(*stage);
                let hard = r
                    .and_then(|r| r.failed.as_ref())
                    .is_some_and(|f| f.reason == *reason);
                if hard && !r.is_some_and(|r| r.overdue) {
                    out.push((*stage, Mark::Failed));
                }
            }
            Transition::Finished {
                outcome: Outcome::Failed,
            } if !canary.record(Stage::EndToEnd).is_some_and(|r| r.overdue) => {
                out.push((Stage::EndToEnd, Mark::Failed));
            }
            _ => {}
        }
    }
    out
}

/// One stage's history.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Series {
    hours: BTreeMap<u64, Hour>,
}

/// One point of the latency chart.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Point {
    /// Wall-clock ms at the start of the bin.
    pub start_ms: u64,
    pub n: usize,
    pub p50_ms: u64,
    pub p95_ms: u64,
}

/// Stage ends on time and stage failures in a window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub ok: u64,
    pub bad: u64,
}

impl Counts {
    /// The share on time, `None` with nothing in the window.
    pub fn availability(&self) -> Option<f64> {
        let n = self.ok + self.bad;
        (n > 0).then(|| self.ok as f64 / n as f64)
    }
}

impl Series {
    pub fn insert(&mut self, hour: u64, h: Hour) {
        self.hours.insert(hour, h);
    }

    /// Counts one mark at wall time `wall_ms`; returns the records that changed (the hour
    /// it went into, and any hour pruned or stripped of its minutes).
    pub fn add(&mut self, stage: Stage, wall_ms: u64, mark: Mark) -> Vec<Change> {
        let ms = |d: u64| Some(d.min(u32::MAX as u64) as u32);
        let (ok, bad, sample) = match mark {
            Mark::OnTime(d) => (true, false, ms(d)),
            Mark::Late(d) => (false, false, ms(d)),
            Mark::Failed => (false, true, None),
        };
        let hour = wall_ms / HOUR_MS;
        let m = ((wall_ms % HOUR_MS) / MINUTE_MS) as u8;
        let h = self.hours.entry(hour).or_default();
        // Minutes arrive in time order but for a wall clock stepped back: keep them sorted.
        let i = h.minutes.partition_point(|x| x.m < m);
        if h.minutes.get(i).is_none_or(|x| x.m != m) {
            h.minutes.insert(
                i,
                Minute {
                    m,
                    ..Minute::default()
                },
            );
        }
        let minute = &mut h.minutes[i];
        if ok {
            h.ok += 1;
            minute.ok += 1;
        }
        if bad {
            h.bad += 1;
            minute.bad += 1;
        }
        if let Some(ms) = sample
            && minute.ms.len() < SAMPLES_PER_MINUTE
        {
            minute.ms.push(ms);
        }
        let mut changed = vec![(stage, hour, Some(h.clone()))];
        changed.extend(self.prune(stage, hour));
        changed
    }

    /// Deletes the hours past [`KEEP_HOURS`] and strips the minutes of those past
    /// [`DETAIL_HOURS`], as of the hour `now_hour`.
    fn prune(&mut self, stage: Stage, now_hour: u64) -> Vec<Change> {
        let mut out = Vec::new();
        while let Some((&h, _)) = self.hours.first_key_value() {
            if h + KEEP_HOURS > now_hour {
                break;
            }
            self.hours.pop_first();
            out.push((stage, h, None));
        }
        let detail_from = (now_hour + 1).saturating_sub(DETAIL_HOURS);
        for (h, b) in self.hours.range_mut(..detail_from) {
            if !b.minutes.is_empty() {
                b.minutes.clear();
                out.push((stage, *h, Some(b.clone())));
            }
        }
        out
    }

    /// The minutes in `[from, to)` (wall ms), with their start times.
    fn minutes(&self, from: u64, to: u64) -> impl Iterator<Item = (u64, &Minute)> {
        self.hours
            .range(from / HOUR_MS..=to / HOUR_MS)
            .flat_map(|(h, b)| {
                b.minutes
                    .iter()
                    .map(move |m| (h * HOUR_MS + m.m as u64 * MINUTE_MS, m))
            })
            .filter(move |(t, _)| *t >= from && *t < to)
    }

    /// p50 and p95 of the durations in each `bin_ms` bin of `[from, to)` that has any.
    pub fn latency(&self, from: u64, to: u64, bin_ms: u64) -> Vec<Point> {
        let bin_ms = bin_ms.max(MINUTE_MS);
        let mut bins: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
        for (t, m) in self.minutes(from, to) {
            if !m.ms.is_empty() {
                let start = from + (t - from) / bin_ms * bin_ms;
                bins.entry(start).or_default().extend(&m.ms);
            }
        }
        bins.into_iter()
            .map(|(start_ms, mut v)| {
                v.sort_unstable();
                Point {
                    start_ms,
                    n: v.len(),
                    p50_ms: nearest_rank(&v, 0.50),
                    p95_ms: nearest_rank(&v, 0.95),
                }
            })
            .collect()
    }

    /// On time and failed in `[from, to)`: by the minute where the hours still have their
    /// minutes, else whole hours (an hour counts when it starts in the window).
    pub fn counts(&self, from: u64, to: u64) -> Counts {
        let mut c = Counts::default();
        for (h, b) in self
            .hours
            .range(from / HOUR_MS..=to.saturating_sub(1) / HOUR_MS)
        {
            let start = h * HOUR_MS;
            let cut = start < from || start + HOUR_MS > to;
            if cut && !b.minutes.is_empty() {
                for m in &b.minutes {
                    let t = start + m.m as u64 * MINUTE_MS;
                    if t >= from && t < to {
                        c.ok += m.ok as u64;
                        c.bad += m.bad as u64;
                    }
                }
            } else if start >= from {
                c.ok += b.ok as u64;
                c.bad += b.bad as u64;
            }
        }
        c
    }

    /// Per wall-clock hour of the `hours` ending with the one holding `now`: the counts.
    pub fn hourly(&self, now: u64, hours: u64) -> Vec<(u64, Counts)> {
        let last = now / HOUR_MS;
        (last + 1 - hours.min(last + 1)..=last)
            .map(|h| {
                let c = self.hours.get(&h).map_or(Counts::default(), |b| Counts {
                    ok: b.ok as u64,
                    bad: b.bad as u64,
                });
                (h * HOUR_MS, c)
            })
            .collect()
    }
}

fn nearest_rank(sorted: &[u32], q: f64) -> u64 {
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as u64
}

/// A probe's charts as served at `/api/v1/history` and drawn on the dashboard.
#[derive(Clone, Debug, Serialize)]
pub struct StageHistory {
    pub stage: Stage,
    /// The last 24 h in 10-minute bins (only bins with a measurement).
    pub latency_24h: Vec<Point>,
    pub counts_24h: Counts,
    pub counts_7d: Counts,
    pub availability_24h: Option<f64>,
    pub availability_7d: Option<f64>,
    /// The last 7 days by the hour, oldest first (168 entries).
    pub hourly_7d: Vec<(u64, Counts)>,
}

/// The width of a latency chart's bin.
pub const BIN_MS: u64 = 10 * MINUTE_MS;
const DAY_MS: u64 = 24 * HOUR_MS;

impl StageHistory {
    pub fn of(stage: Stage, s: &Series, now_wall: u64) -> StageHistory {
        let to = now_wall + 1;
        let counts_24h = s.counts(to.saturating_sub(DAY_MS), to);
        let counts_7d = s.counts(to.saturating_sub(7 * DAY_MS), to);
        StageHistory {
            stage,
            latency_24h: s.latency(to.saturating_sub(DAY_MS), to, BIN_MS),
            counts_24h,
            counts_7d,
            availability_24h: counts_24h.availability(),
            availability_7d: counts_7d.availability(),
            hourly_7d: s.hourly(now_wall, 7 * 24),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(ms: u64, late: bool) -> Mark {
        if late {
            Mark::Late(ms)
        } else {
            Mark::OnTime(ms)
        }
    }

    fn failed() -> Mark {
        Mark::Failed
    }

    const T0: u64 = 1_780_000_000_000 / HOUR_MS * HOUR_MS;

    #[test]
    fn keys_round_trip_and_keep_a_probe_in_one_range() {
        for s in Stage::ALL {
            assert_eq!(from_key(key(s, 493_000)), Some((s, 493_000)));
        }
        assert!(key(Stage::EndToEnd, 10) < key(Stage::Submit, 11));
    }

    #[test]
    fn a_late_end_adds_its_duration_but_no_second_failure() {
        let mut s = Series::default();
        s.add(Stage::Import, T0, done(100, false));
        s.add(Stage::Import, T0 + 1_000, failed());
        s.add(Stage::Import, T0 + 2_000, done(90_000, true));
        let c = s.counts(T0, T0 + HOUR_MS);
        assert_eq!((c.ok, c.bad), (1, 1));
        assert_eq!(c.availability(), Some(0.5));
        let p = s.latency(T0, T0 + HOUR_MS, BIN_MS);
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].n, p[0].p50_ms, p[0].p95_ms), (2, 100, 90_000));
    }

    #[test]
    fn bins_hold_their_minutes_and_quantiles_are_nearest_rank() {
        let mut s = Series::default();
        for i in 0..20u64 {
            // One a minute for 20 minutes: two 10-minute bins.
            s.add(Stage::Import, T0 + i * MINUTE_MS, done(100 + i, false));
        }
        let p = s.latency(T0, T0 + HOUR_MS, BIN_MS);
        assert_eq!(p.len(), 2);
        assert_eq!(
            (p[0].start_ms, p[0].n, p[0].p50_ms, p[0].p95_ms),
            (T0, 10, 104, 109)
        );
        assert_eq!(p[1].start_ms, T0 + BIN_MS);
        // Samples beyond the cap still count.
        for _ in 0..(SAMPLES_PER_MINUTE + 5) {
            s.add(Stage::Import, T0 + 30 * MINUTE_MS, done(5, false));
        }
        assert_eq!(
            s.counts(T0, T0 + HOUR_MS).ok,
            20 + SAMPLES_PER_MINUTE as u64 + 5
        );
        let p = s.latency(T0 + 30 * MINUTE_MS, T0 + 31 * MINUTE_MS, BIN_MS);
        assert_eq!(p[0].n, SAMPLES_PER_MINUTE);
    }

    #[test]
    fn old_hours_lose_their_minutes_then_go() {
        let mut s = Series::default();
        s.add(Stage::Import, T0, done(100, false));
        s.add(Stage::Import, T0, failed());
        // 25 hours on: the first hour keeps its totals, not its minutes.
        let changed = s.add(Stage::Import, T0 + DETAIL_HOURS * HOUR_MS, done(1, false));
        assert!(changed.contains(&(
            Stage::Import,
            T0 / HOUR_MS,
            Some(Hour {
                ok: 1,
                bad: 1,
                minutes: vec![]
            })
        )));
        assert_eq!(s.latency(T0, T0 + HOUR_MS, BIN_MS), vec![]);
        let week = s.counts(T0, T0 + 30 * HOUR_MS);
        assert_eq!((week.ok, week.bad), (2, 1));
        // A week and an hour on: gone, and said so.
        let changed = s.add(Stage::Import, T0 + KEEP_HOURS * HOUR_MS, done(1, false));
        assert!(changed.contains(&(Stage::Import, T0 / HOUR_MS, None)));
        assert_eq!(s.counts(T0, T0 + HOUR_MS), Counts::default());
    }

    #[test]
    fn windows_count_minutes_inside_and_whole_hours_that_start_inside() {
        let mut s = Series::default();
        for i in 0..120u64 {
            s.add(Stage::Import, T0 + i * MINUTE_MS, done(1, false));
        }
        // Half of the first hour, by the minute.
        assert_eq!(s.counts(T0 + 30 * MINUTE_MS, T0 + 60 * MINUTE_MS).ok, 30);
        assert_eq!(s.counts(T0 + 30 * MINUTE_MS, T0 + 90 * MINUTE_MS).ok, 60);
        let hourly = s.hourly(T0 + 90 * MINUTE_MS, 3);
        assert_eq!(hourly.len(), 3);
        assert_eq!(hourly[1], (T0, Counts { ok: 60, bad: 0 }));
        assert_eq!(hourly[2].1.ok, 60);
        assert_eq!(hourly[0].1, Counts::default());
    }

    #[test]
    fn errors_while_retrying_are_no_mark_and_a_failure_is_one_per_stage() {
        use crate::canary::life::Limits;
        let limits = Limits {
            submit_ms: 1_000,
            import_ms: 5_000,
            reply_ms: 1_000,
            delivery_ms: 1_000,
            end_to_end_ms: 60_000,
            lost_after_ms: 600_000,
        };
        let plan = vec![Stage::Submit, Stage::Import];
        let mut c = Canary::new("p", "id", "tok", "mid", plan.clone(), limits.clone(), 0);
        let t = c.observe(Stage::Submit, 10);
        assert_eq!(marks(&c, &t), vec![(Stage::Submit, Mark::OnTime(10))]);
        // An API error while the import is polled for: counted by the metrics, no mark.
        let t = c.note_error(Reason::Api, "500", 100);
        assert_eq!(t.len(), 1);
        assert_eq!(marks(&c, &t), vec![]);
        // The deadline passes: one failure; then it arrives, late.
        let t = c.tick(6_000);
        assert_eq!(marks(&c, &t), vec![(Stage::Import, Mark::Failed)]);
        let t = c.observe(Stage::Import, 7_010);
        // end_to_end keeps its own deadline (60 s here), as its failure counter does.
        assert_eq!(
            marks(&c, &t),
            vec![
                (Stage::Import, Mark::Late(7_000)),
                (Stage::EndToEnd, Mark::OnTime(7_010))
            ]
        );
        // A hard failure fails its stage and end_to_end, once each.
        let mut c = Canary::new("p", "id2", "tok", "mid", plan, limits, 0);
        let t = c.fail(Reason::Rejected, "550", 5);
        assert_eq!(
            marks(&c, &t),
            vec![
                (Stage::Submit, Mark::Failed),
                (Stage::EndToEnd, Mark::Failed)
            ]
        );
    }

    #[test]
    fn stored_hours_decode_and_unknown_fields_are_tolerated() {
        let h: Hour = serde_json::from_str(
            r#"{"ok":3,"bad":1,"minutes":[{"m":5,"ok":3,"bad":1,"ms":[1,2,3]}],"later":true}"#,
        )
        .unwrap();
        assert_eq!(h.minutes[0].ms, vec![1, 2, 3]);
        let old: Hour = serde_json::from_str(r#"{"ok":3,"bad":1}"#).unwrap();
        assert!(old.minutes.is_empty());
    }
}
