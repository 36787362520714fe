//! `mailcanary once`: following one canary per probe until its fate is known, and saying it as
//! a timeline (text) or as one monitoring-plugin status line with perfdata (nagios).
//!
//! A canary's fate is known at the first failed or overdue stage (it may still arrive late,
//! but the check has failed already) or when it finished. An error the flow retries (an API
//! answering 500 once) is not a fate: the canary goes on until it succeeds or its deadline
//! passes, and an on-time canary that met such errors is a WARNING, not OK.
//!
//! Exit codes of `--format nagios` follow the monitoring-plugins guidelines: 0 OK, 1 WARNING,
//! 2 CRITICAL, 3 UNKNOWN (the check could not tell: bad config, could not start, or `--timeout`
//! came before any verdict).

use std::{collections::BTreeMap, time::Duration};

use mailcanary::{
    canary::hops::{AuthMethod, Route},
    canary::life::{Limits, Outcome, Reason, Stage, Transition},
    flow::Event,
};

/// The delivered mail's way, under its delivery line: one line per hop (first to last) and
/// one for TLS and the verdicts.
pub fn route_lines(route: &Route) -> Vec<String> {
    let mut out: Vec<String> = route
        .hops
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let delay = h
                .delay_ms
                .map_or("?".to_string(), |ms| format!("+{:.0}s", ms as f64 / 1000.0));
            let skew = if h.skew_ms > 0 {
                format!(
                    "  (clock {:.0}s behind the previous hop)",
                    h.skew_ms as f64 / 1000.0
                )
            } else {
                String::new()
            };
            format!(
                "hop {:<2} {delay:>6}  by {} with {}{}{}{skew}",
                i + 1,
                h.by.as_deref().unwrap_or("?"),
                h.protocol.as_deref().unwrap_or("?"),
                h.tls
                    .as_deref()
                    .map(|t| format!(" {t}"))
                    .unwrap_or_default(),
                if h.plaintext { "  PLAINTEXT" } else { "" },
            )
        })
        .collect();
    let verdicts: Vec<String> = AuthMethod::ALL
        .iter()
        .map(|m| format!("{}={}", m.as_str(), route.verdict(*m).as_str()))
        .collect();
    let own: Vec<String> = route
        .verified
        .iter()
        .map(|v| format!("{}={}", v.method.as_str(), v.result.as_str()))
        .collect();
    out.push(format!(
        "tls {}  auth {}{}",
        if route.all_tls() {
            "all hops"
        } else {
            "SOME PLAINTEXT"
        },
        verdicts.join(" "),
        if own.is_empty() {
            String::new()
        } else {
            format!("  verified here {}", own.join(" "))
        }
    ));
    out
}

/// The worst first: ordering is severity, so the overall status is the maximum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Ok,
    Warning,
    Unknown,
    Critical,
}

impl Status {
    fn word(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Warning => "WARNING",
            Status::Unknown => "UNKNOWN",
            Status::Critical => "CRITICAL",
        }
    }
}

/// One probe's canary, as its events told it.
pub struct Run {
    pub probe: String,
    /// The canary's id, from its first event.
    pub canary: Option<String>,
    /// The planned stages and `end_to_end`, in order.
    stages: Vec<Stage>,
    limits: Limits,
    done: BTreeMap<Stage, (u64, bool)>,
    /// Errors met and retried: `(stage, reason, detail)`.
    errors: Vec<(Stage, Reason, String)>,
    /// What decided the failure: the first overdue or failed stage.
    failed: Option<(Stage, Reason, String)>,
    outcome: Option<Outcome>,
}

impl Run {
    pub fn new(probe: &str, plan: &[Stage], limits: &Limits) -> Run {
        let mut stages = plan.to_vec();
        stages.push(Stage::EndToEnd);
        Run {
            probe: probe.to_string(),
            canary: None,
            stages,
            limits: limits.clone(),
            done: BTreeMap::new(),
            errors: Vec::new(),
            failed: None,
            outcome: None,
        }
    }

    /// Known once a stage failed or went overdue, or the canary finished.
    pub fn fate(&self) -> Option<Status> {
        if self.failed.is_some() {
            return Some(Status::Critical);
        }
        match self.outcome? {
            Outcome::OnTime if self.errors.is_empty() => Some(Status::Ok),
            Outcome::OnTime => Some(Status::Warning),
            Outcome::Late | Outcome::Failed | Outcome::Lost => Some(Status::Critical),
        }
    }

    /// Takes in one event of this probe; returns the timeline line to print, if any.
    pub fn apply(&mut self, ev: &Event) -> Option<String> {
        match &self.canary {
            None => self.canary = Some(ev.canary.clone()),
            Some(id) if *id != ev.canary => return None,
            Some(_) => {}
        }
        let detail = ev.detail.clone().unwrap_or_default();
        let line = |stage: &str, what: String| format!("{:<12} {:<11} {what}", self.probe, stage);
        match ev.transition {
            Transition::StageDone {
                stage,
                duration_ms,
                late,
            } => {
                self.done.insert(stage, (duration_ms, late));
                let mut text = line(
                    stage.as_str(),
                    format!(
                        "ok   {:>9.3}s{}",
                        duration_ms as f64 / 1000.0,
                        if late { "  (late)" } else { "" }
                    ),
                );
                if let Some(route) = &ev.route {
                    for l in route_lines(route) {
                        text.push('\n');
                        text.push_str(&line("", l));
                    }
                }
                Some(text)
            }
            Transition::StageFailed { stage, reason } => {
                let detail = if reason == Reason::Deadline {
                    format!(
                        "not done within its {} deadline",
                        humantime::format_duration(Duration::from_millis(
                            self.limits.deadline(stage)
                        ))
                    )
                } else {
                    detail
                };
                let text = format!(
                    "FAIL {reason}{}",
                    if detail.is_empty() {
                        String::new()
                    } else {
                        format!(": {detail}")
                    }
                );
                if reason == Reason::Deadline {
                    self.failed.get_or_insert((stage, reason, detail));
                } else {
                    // A hard failure is followed by `Finished { Failed }`, which promotes it.
                    self.errors.push((stage, reason, detail));
                }
                Some(line(stage.as_str(), text))
            }
            Transition::Lost { stage } => {
                self.failed
                    .get_or_insert((stage, Reason::Deadline, "lost".into()));
                Some(line(stage.as_str(), "LOST".into()))
            }
            Transition::Finished { outcome } => {
                self.outcome = Some(outcome);
                if outcome == Outcome::Failed
                    && self.failed.is_none()
                    && let Some(last) = self.errors.pop()
                {
                    self.failed = Some(last);
                }
                None
            }
        }
    }

    /// One phrase for this probe's result.
    pub fn summary(&self) -> String {
        if let Some((stage, reason, detail)) = &self.failed {
            return match reason {
                Reason::Deadline => format!("{stage} overdue ({detail})"),
                _ => format!("{stage} failed: {reason} ({detail})"),
            };
        }
        match self.outcome {
            Some(Outcome::OnTime) => {
                let total = self.done.get(&Stage::EndToEnd).map_or(0, |d| d.0);
                let retried = if self.errors.is_empty() {
                    String::new()
                } else {
                    let (stage, reason, _) = &self.errors[0];
                    format!(
                        " after {} retried error(s) ({stage}: {reason})",
                        self.errors.len()
                    )
                };
                format!(
                    "{} stages on time in {:.3}s{retried}",
                    self.stages.len(),
                    total as f64 / 1000.0
                )
            }
            Some(o) => format!("{o:?}").to_lowercase(),
            None => {
                let pending: Vec<&str> = self
                    .stages
                    .iter()
                    .filter(|s| !self.done.contains_key(s) && **s != Stage::EndToEnd)
                    .map(|s| s.as_str())
                    .collect();
                format!("no verdict yet ({} pending)", pending.join(", "))
            }
        }
    }

    /// `'probe_stage'=1.234s;;DEADLINE;0` per stage; `U` for a stage not done.
    fn perfdata(&self) -> String {
        self.stages
            .iter()
            .map(|s| {
                let value = self.done.get(s).map_or("U".to_string(), |(ms, _)| {
                    format!("{:.3}s", *ms as f64 / 1000.0)
                });
                format!(
                    "'{}_{}'={value};;{:.3};0",
                    self.probe,
                    s.as_str(),
                    self.limits.deadline(*s) as f64 / 1000.0
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// The overall result of a `once` run.
pub struct Verdict {
    pub status: Status,
    timed_out: Option<Duration>,
}

pub fn verdict(runs: &[Run], timed_out: bool, timeout: Duration) -> Verdict {
    let status = runs
        .iter()
        .map(|r| r.fate().unwrap_or(Status::Unknown))
        .max()
        .unwrap_or(Status::Unknown);
    Verdict {
        status,
        timed_out: timed_out.then_some(timeout),
    }
}

impl Verdict {
    pub fn nagios_code(&self) -> u8 {
        match self.status {
            Status::Ok => 0,
            Status::Warning => 1,
            Status::Critical => 2,
            Status::Unknown => 3,
        }
    }

    /// `MAILCANARY STATUS - probe: summary; probe: summary | perfdata`
    pub fn nagios_line(&self, runs: &[Run]) -> String {
        let mut text: Vec<String> = runs
            .iter()
            .map(|r| format!("{}: {}", r.probe, r.summary()))
            .collect();
        if let Some(t) = self.timed_out {
            text.push(format!(
                "gave up after {} (--timeout)",
                humantime::format_duration(t)
            ));
        }
        let perf: Vec<String> = runs.iter().map(Run::perfdata).collect();
        format!(
            "MAILCANARY {} - {} | {}",
            self.status.word(),
            text.join("; ").replace('|', "/"),
            perf.join(" ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            submit_ms: 5_000,
            import_ms: 2_000,
            reply_ms: 5_000,
            delivery_ms: 2_000,
            end_to_end_ms: 30_000,
            lost_after_ms: 3_600_000,
        }
    }

    fn ev(t: Transition, detail: Option<&str>) -> Event {
        Event {
            probe: "p".into(),
            canary: "c1".into(),
            mailbox: None,
            transition: t,
            detail: detail.map(str::to_string),
            route: None,
        }
    }

    fn done(stage: Stage, ms: u64) -> Event {
        ev(
            Transition::StageDone {
                stage,
                duration_ms: ms,
                late: false,
            },
            None,
        )
    }

    fn run() -> Run {
        Run::new("p", &[Stage::Submit, Stage::Delivery], &limits())
    }

    #[test]
    fn the_delivery_line_is_followed_by_its_hops_tls_and_verdicts() {
        use mailcanary::canary::hops::{AuthResult, Hop, Verdict};
        let mut r = run();
        r.apply(&done(Stage::Submit, 12));
        let mut delivered = done(Stage::Delivery, 2_340);
        delivered.route = Some(Route {
            hops: vec![
                Hop {
                    by: Some("mx.example.test".into()),
                    protocol: Some("ESMTPSA".into()),
                    tls: Some("TLSv1.3".into()),
                    delay_ms: Some(1_000),
                    ..Hop::default()
                },
                Hop {
                    by: Some("relay.example.test".into()),
                    protocol: Some("ESMTP".into()),
                    delay_ms: Some(0),
                    skew_ms: 3_000,
                    plaintext: true,
                    ..Hop::default()
                },
                Hop::default(),
            ],
            auth: vec![Verdict {
                method: AuthMethod::Dkim,
                result: AuthResult::Fail,
            }],
            untrusted_auth: 0,
            verified: Vec::new(),
        });
        let text = r.apply(&delivered).unwrap();
        let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
        assert_eq!(
            lines,
            [
                "p            delivery    ok       2.340s",
                "p                        hop 1     +1s  by mx.example.test with ESMTPSA TLSv1.3",
                "p                        hop 2     +0s  by relay.example.test with ESMTP  PLAINTEXT  (clock 3s behind the previous hop)",
                "p                        hop 3       ?  by ? with ?",
                "p                        tls SOME PLAINTEXT  auth dkim=fail spf=none dmarc=none arc=none",
            ]
        );
    }

    #[test]
    fn on_time_is_ok_with_perfdata_per_stage() {
        let mut r = run();
        assert_eq!(r.fate(), None);
        r.apply(&done(Stage::Submit, 12));
        r.apply(&done(Stage::Delivery, 340));
        r.apply(&done(Stage::EndToEnd, 352));
        assert_eq!(r.fate(), None, "not before Finished");
        r.apply(&ev(
            Transition::Finished {
                outcome: Outcome::OnTime,
            },
            None,
        ));
        let runs = [r];
        let v = verdict(&runs, false, Duration::from_secs(9));
        assert_eq!(v.nagios_code(), 0);
        assert_eq!(
            v.nagios_line(&runs),
            "MAILCANARY OK - p: 3 stages on time in 0.352s | 'p_submit'=0.012s;;5.000;0 \
             'p_delivery'=0.340s;;2.000;0 'p_end_to_end'=0.352s;;30.000;0"
        );
    }

    #[test]
    fn overdue_is_critical_at_once_and_a_retried_error_is_not() {
        let mut r = run();
        r.apply(&done(Stage::Submit, 12));
        r.apply(&ev(
            Transition::StageFailed {
                stage: Stage::Delivery,
                reason: Reason::Auth,
            },
            Some("LOGIN refused"),
        ));
        assert_eq!(r.fate(), None, "a retried error decides nothing");
        r.apply(&ev(
            Transition::StageFailed {
                stage: Stage::Delivery,
                reason: Reason::Deadline,
            },
            None,
        ));
        assert_eq!(r.fate(), Some(Status::Critical), "overdue: known now");
        let runs = [r];
        let line = verdict(&runs, false, Duration::from_secs(9)).nagios_line(&runs);
        assert!(
            line.starts_with(
                "MAILCANARY CRITICAL - p: delivery overdue (not done within its 2s deadline) |"
            ),
            "{line}"
        );
        assert!(line.contains("'p_delivery'=U;;2.000;0"), "{line}");
    }

    #[test]
    fn a_hard_failure_names_its_reason_and_retried_errors_warn() {
        let mut r = run();
        r.apply(&ev(
            Transition::StageFailed {
                stage: Stage::Submit,
                reason: Reason::Rejected,
            },
            Some("550 no such user"),
        ));
        r.apply(&ev(
            Transition::Finished {
                outcome: Outcome::Failed,
            },
            None,
        ));
        assert_eq!(r.fate(), Some(Status::Critical));
        assert_eq!(r.summary(), "submit failed: rejected (550 no such user)");

        let mut w = run();
        w.apply(&ev(
            Transition::StageFailed {
                stage: Stage::Delivery,
                reason: Reason::Connect,
            },
            Some("refused"),
        ));
        w.apply(&ev(
            Transition::Finished {
                outcome: Outcome::OnTime,
            },
            None,
        ));
        assert_eq!(w.fate(), Some(Status::Warning));
    }

    #[test]
    fn no_verdict_by_the_timeout_is_unknown_and_critical_wins_overall() {
        let pending = run();
        let runs = [pending];
        let v = verdict(&runs, true, Duration::from_secs(3));
        assert_eq!(v.nagios_code(), 3);
        assert!(
            v.nagios_line(&runs)
                .contains("p: no verdict yet (submit, delivery pending); gave up after 3s"),
            "{}",
            v.nagios_line(&runs)
        );
        let mut bad = run();
        bad.apply(&ev(
            Transition::StageFailed {
                stage: Stage::Submit,
                reason: Reason::Deadline,
            },
            None,
        ));
        let runs = [run(), bad];
        assert_eq!(
            verdict(&runs, true, Duration::from_secs(3)).nagios_code(),
            2
        );
    }
}
