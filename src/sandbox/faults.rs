//! Faults: per pipeline stage, how the sandbox misbehaves right now.
//!
//! The board is a `watch` channel so that work held by a `stall` wakes up the moment the fault is
//! cleared, in the order it was queued (each queue has one consumer that re-checks the board).

use std::{collections::BTreeMap, fmt, str::FromStr, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// A stage of the sandbox's pipeline that can be faulted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// The inbound MX (SMTP server).
    Inbound,
    /// The import workers that turn mail into tickets.
    Import,
    /// The helpdesk HTTP API (and `/health`).
    Api,
    /// The outbound mailer that delivers replies.
    Outbound,
    /// The IMAP server over the mailboxes.
    Mailbox,
}

impl Stage {
    pub const ALL: [Stage; 5] = [
        Stage::Inbound,
        Stage::Import,
        Stage::Api,
        Stage::Outbound,
        Stage::Mailbox,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Inbound => "inbound",
            Stage::Import => "import",
            Stage::Api => "api",
            Stage::Outbound => "outbound",
            Stage::Mailbox => "mailbox",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl FromStr for Stage {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Stage::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                format!("unknown stage {s:?} (expected inbound, import, api, outbound or mailbox)")
            })
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a stage misbehaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Fault {
    /// Works normally.
    #[default]
    Ok,
    /// Work queues up and is released, in order, when the fault is cleared.
    Stall,
    /// Work is accepted and lost (the ground-truth events say where).
    Drop,
    /// Every unit of work takes this much longer.
    Delay(Duration),
    /// SMTP 451, HTTP 500, a failing-and-retried job, a refused LOGIN: whatever fits the stage.
    Error,
    /// `api` only: 429 Too Many Requests with `Retry-After: 1`.
    Throttle,
    /// `api` only: 200 with an HTML page instead of JSON.
    Garbage,
}

impl FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "ok" => Ok(Fault::Ok),
            "stall" => Ok(Fault::Stall),
            "drop" => Ok(Fault::Drop),
            "error" => Ok(Fault::Error),
            "throttle" => Ok(Fault::Throttle),
            "garbage" => Ok(Fault::Garbage),
            other => match other.strip_prefix("delay:") {
                Some(d) => humantime::parse_duration(d.trim())
                    .map(Fault::Delay)
                    .map_err(|e| format!("bad delay {d:?}: {e}")),
                None => Err(format!(
                    "unknown fault {other:?} (expected ok, stall, drop, error, throttle, garbage or delay:<duration>)"
                )),
            },
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Ok => f.write_str("ok"),
            Fault::Stall => f.write_str("stall"),
            Fault::Drop => f.write_str("drop"),
            Fault::Error => f.write_str("error"),
            Fault::Throttle => f.write_str("throttle"),
            Fault::Garbage => f.write_str("garbage"),
            Fault::Delay(d) => write!(f, "delay:{}", humantime::format_duration(*d)),
        }
    }
}

impl Serialize for Fault {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Fault {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Fault {
    /// Whether this fault means something for `stage` (`throttle` and `garbage` are answers of
    /// an HTTP API only).
    pub fn check_stage(self, stage: Stage) -> Result<(), String> {
        match self {
            Fault::Throttle | Fault::Garbage if stage != Stage::Api => Err(format!(
                "fault {self} is for the api stage only, not {stage}"
            )),
            _ => Ok(()),
        }
    }
}

/// Parses `STAGE=MODE`, the form of `--fault`.
pub fn parse_assignment(s: &str) -> Result<(Stage, Fault), String> {
    let (stage, mode) = s
        .split_once('=')
        .ok_or_else(|| format!("expected STAGE=MODE, got {s:?}"))?;
    let (stage, fault): (Stage, Fault) = (stage.trim().parse()?, mode.parse()?);
    fault.check_stage(stage)?;
    Ok((stage, fault))
}

/// The live fault settings, shared by every part of the sandbox.
#[derive(Clone)]
pub struct FaultBoard {
    tx: Arc<watch::Sender<[Fault; 5]>>,
}

impl Default for FaultBoard {
    fn default() -> Self {
        Self::new()
    }
}

impl FaultBoard {
    pub fn new() -> Self {
        let (tx, _) = watch::channel([Fault::Ok; 5]);
        Self { tx: Arc::new(tx) }
    }

    pub fn get(&self, stage: Stage) -> Fault {
        self.tx.borrow()[stage.index()]
    }

    pub fn set(&self, stage: Stage, fault: Fault) {
        self.tx.send_modify(|f| f[stage.index()] = fault);
    }

    /// Every stage and its fault, for `GET /sandbox/faults`.
    pub fn all(&self) -> BTreeMap<Stage, Fault> {
        let f = *self.tx.borrow();
        Stage::ALL.into_iter().map(|s| (s, f[s.index()])).collect()
    }

    /// A receiver that wakes on every change of any stage.
    pub fn subscribe(&self) -> watch::Receiver<[Fault; 5]> {
        self.tx.subscribe()
    }

    /// Waits while `stage` is stalled, then returns its (non-stall) fault.
    pub async fn wait_unstalled(&self, stage: Stage) -> Fault {
        let mut rx = self.tx.subscribe();
        loop {
            let f = rx.borrow_and_update()[stage.index()];
            if f != Fault::Stall {
                return f;
            }
            // The sender lives as long as `self`, so this cannot fail while we hold the board.
            if rx.changed().await.is_err() {
                return Fault::Ok;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_every_mode() {
        for s in ["ok", "stall", "drop", "error", "delay:2s", "delay:150ms"] {
            let f: Fault = s.parse().unwrap();
            assert_eq!(f.to_string(), s);
        }
        assert!("delay:soon".parse::<Fault>().is_err());
        assert!("explode".parse::<Fault>().is_err());
        assert_eq!(
            parse_assignment("import=stall").unwrap(),
            (Stage::Import, Fault::Stall)
        );
        assert!(parse_assignment("imports=stall").is_err());
        assert!(parse_assignment("import").is_err());
    }

    #[tokio::test]
    async fn stall_releases_when_cleared() {
        let board = FaultBoard::new();
        board.set(Stage::Import, Fault::Stall);
        let b2 = board.clone();
        let waiter = tokio::spawn(async move { b2.wait_unstalled(Stage::Import).await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        board.set(Stage::Import, Fault::Delay(Duration::from_millis(5)));
        assert_eq!(
            waiter.await.unwrap(),
            Fault::Delay(Duration::from_millis(5))
        );
    }
}
