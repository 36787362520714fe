//! The dead man's switch: a probe's `heartbeat_url` (healthchecks.io, Cronitor, Better Stack
//! heartbeats and the like) is pinged after every canary that went through on time, and its
//! `/fail` when the probe starts failing (a stage past its deadline, a canary failed or lost).
//! An outside service then pages when the pings stop: the prober is down, or its host, or the
//! path from it, or its Prometheus and Alertmanager never see it; none of which an alert rule
//! inside that stack can report.
//!
//! Pings never hold a canary up: the engine's events are read by one task per probe, and the
//! newest wanted ping is handed to a sender through a `watch` channel, so a slow or dead
//! endpoint coalesces pings instead of queueing them. Each ping is bounded by [`PING_TIMEOUT`].
//! A failed ping is counted (`mailcanary_heartbeat_errors_total{probe}`) and logged once per
//! episode, with the URL's host only: the URL is a secret (whoever has it can ping it).

use std::{sync::Arc, time::Duration};

use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::engine::{Engine, Event};
use crate::{
    canary::life::{Outcome, Reason, Transition},
    config::Secret,
};

/// How long one ping may take, connect included.
pub const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// What to tell the endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ping {
    /// A canary went through on time.
    Success,
    /// The probe is failing.
    Fail,
}

/// What an event means for the heartbeat, if anything.
pub fn ping_for(t: &Transition) -> Option<Ping> {
    match t {
        Transition::Finished {
            outcome: Outcome::OnTime,
        } => Some(Ping::Success),
        Transition::Finished {
            outcome: Outcome::Failed | Outcome::Lost,
        }
        | Transition::Lost { .. }
        | Transition::StageFailed {
            reason: Reason::Deadline,
            ..
        } => Some(Ping::Fail),
        _ => None,
    }
}

/// The URL a ping goes to: the URL itself for a success, `…/fail` for a failure (the
/// healthchecks.io convention, kept by most heartbeat services).
pub fn ping_url(base: &reqwest::Url, ping: Ping) -> reqwest::Url {
    match ping {
        Ping::Success => base.clone(),
        Ping::Fail => {
            let mut u = base.clone();
            if let Ok(mut segments) = u.path_segments_mut() {
                segments.pop_if_empty().push("fail");
            }
            u
        }
    }
}

/// Runs the heartbeat of `probe` until `shutdown`.
pub async fn run(
    engine: Arc<Engine>,
    probe: String,
    url: Secret,
    http: reqwest::Client,
    shutdown: CancellationToken,
) {
    let Ok(base) = reqwest::Url::parse(url.expose()) else {
        return; // the config checked it
    };
    let host = base.host_str().unwrap_or_default().to_string();
    // (sequence, ping): the sender sends the newest only.
    let (tx, mut rx) = watch::channel::<Option<(u64, Ping)>>(None);
    let sender = {
        let (engine, probe, sd) = (engine.clone(), probe.clone(), shutdown.clone());
        async move {
            let mut failing_since_ok = false;
            loop {
                tokio::select! {
                    _ = sd.cancelled() => return,
                    changed = rx.changed() => if changed.is_err() { return },
                }
                let Some((_, ping)) = *rx.borrow_and_update() else {
                    continue;
                };
                let result = http
                    .get(ping_url(&base, ping))
                    .timeout(PING_TIMEOUT)
                    .send()
                    .await
                    .and_then(|r| r.error_for_status());
                match result {
                    Ok(_) => {
                        if failing_since_ok {
                            info!(probe = %probe, %host, "heartbeat pings go through again");
                        }
                        failing_since_ok = false;
                    }
                    Err(e) => {
                        engine.metrics().heartbeat_error(&probe);
                        if !failing_since_ok {
                            warn!(probe = %probe, %host, error = %crate::edges::error_chain(&e.without_url()), "heartbeat ping failed; the heartbeat service will report this prober down");
                        }
                        failing_since_ok = true;
                    }
                }
            }
        }
    };
    let watcher = async move {
        let mut events = engine.subscribe();
        let mut seq = 0u64;
        // A failure is told once, until a success clears it.
        let mut told_fail = false;
        loop {
            let ev: Event = tokio::select! {
                _ = shutdown.cancelled() => return,
                ev = events.recv() => match ev {
                    Ok(ev) => ev,
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            };
            if ev.probe != probe {
                continue;
            }
            let Some(ping) = ping_for(&ev.transition) else {
                continue;
            };
            if ping == Ping::Fail && told_fail {
                continue;
            }
            told_fail = ping == Ping::Fail;
            seq += 1;
            let _ = tx.send(Some((seq, ping)));
        }
    };
    tokio::join!(sender, watcher);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canary::life::Stage;

    #[test]
    fn on_time_canaries_ping_and_deadlines_failures_and_losses_fail() {
        let on_time = Transition::Finished {
            outcome: Outcome::OnTime,
        };
        assert_eq!(ping_for(&on_time), Some(Ping::Success));
        for t in [
            Transition::StageFailed {
                stage: Stage::Import,
                reason: Reason::Deadline,
            },
            Transition::Finished {
                outcome: Outcome::Failed,
            },
            Transition::Lost {
                stage: Stage::Delivery,
            },
        ] {
            assert_eq!(ping_for(&t), Some(Ping::Fail), "{t:?}");
        }
        // A retried API error is not an outage; a late canary is told by its deadline miss.
        for t in [
            Transition::StageFailed {
                stage: Stage::Import,
                reason: Reason::Api,
            },
            Transition::Finished {
                outcome: Outcome::Late,
            },
        ] {
            assert_eq!(ping_for(&t), None, "{t:?}");
        }
    }

    #[test]
    fn failures_go_to_the_fail_endpoint() {
        let base = reqwest::Url::parse("https://hc-ping.com/0c1e7f0a-uuid").unwrap();
        assert_eq!(
            ping_url(&base, Ping::Success).as_str(),
            "https://hc-ping.com/0c1e7f0a-uuid"
        );
        assert_eq!(
            ping_url(&base, Ping::Fail).as_str(),
            "https://hc-ping.com/0c1e7f0a-uuid/fail"
        );
        let slash = reqwest::Url::parse("http://127.0.0.1:9/ping/abc/").unwrap();
        assert_eq!(
            ping_url(&slash, Ping::Fail).as_str(),
            "http://127.0.0.1:9/ping/abc/fail"
        );
    }
}
