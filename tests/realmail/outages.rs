//! Outages of the real servers: Postfix holding mail (delivery overdue, then late, none lost),
//! Dovecot restarted under the prober's IDLE (reconnect and UID catch-up), and Dovecot without
//! IDLE in its capabilities (the polling fallback).

use std::{collections::HashSet, sync::Arc, time::Duration};

use crate::{
    common::{
        ImapMode, ProbeSpec, Prober, SmtpMode, all_failures, blocking, completed, delivered_ms,
        failures, now_ms, until, v,
    },
    harness::{Servers, Setup, address},
};

fn delivery(s: &mailcanary::metrics::testing::Samples, probe: &str, name: &str) -> f64 {
    v(s, probe, name, &[("stage", "delivery")])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postfix_holding_mail_makes_delivery_overdue_and_release_turns_it_late() {
    const P: &str = "held";
    let servers = Servers::start(Setup::users(&["held"]));
    let mut spec = ProbeSpec::new(P, SmtpMode::Plain25, ImapMode::Tls993, "held");
    spec.delivery_deadline = "3s";
    let prober = Prober::start(&servers, &[spec], true).await;
    let addr = prober.addr();
    until(addr, Duration::from_secs(20), "a first canary", |s| {
        completed(s, P) >= 1.0
    })
    .await;

    // Postfix keeps accepting mail but delivers none: LMTP is a deferred transport.
    let sv = servers.clone();
    blocking(move || sv.postconf_reload(&["defer_transports = lmtp"])).await;
    let s = until(
        addr,
        Duration::from_secs(30),
        "three canaries overdue in delivery",
        |s| failures(s, P, "delivery", "deadline") >= 3.0,
    )
    .await;
    assert_eq!(v(&s, P, "mailcanary_probe_success", &[]), 0.0);
    assert!(
        delivery(&s, P, "mailcanary_stage_oldest_in_flight_seconds") > 3.0,
        "the stall shows as a climbing oldest-in-flight age"
    );
    let sv = servers.clone();
    let queued = blocking(move || sv.queued()).await;
    assert!(queued >= 3, "Postfix holds the canaries ({queued} queued)");

    // Release: no more deferral, and flush the queue.
    let sv = servers.clone();
    blocking(move || {
        sv.postconf_reload(&["defer_transports ="]);
        sv.postqueue_flush();
    })
    .await;
    let overdue = failures(&s, P, "delivery", "deadline");
    let s = until(
        addr,
        Duration::from_secs(30),
        "every overdue canary delivered late",
        |s| delivery(s, P, "mailcanary_stage_late_total") >= overdue,
    )
    .await;
    assert_eq!(delivery(&s, P, "mailcanary_canaries_lost_total"), 0.0);
    let got = all_failures(&s, P);
    assert!(
        got.iter().all(|(_, r, _)| r == "deadline"),
        "only deadlines: {got:?}"
    );
    // Canaries sent after the release are on time again.
    until(addr, Duration::from_secs(30), "probe success again", |s| {
        v(s, P, "mailcanary_probe_success", &[]) == 1.0
    })
    .await;
    prober.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dovecot_restart_under_idle_reconnects_and_catches_up_by_uid() {
    const P: &str = "restart";
    let servers = Servers::start(Setup::users(&["restart"]));
    let mut spec = ProbeSpec::new(P, SmtpMode::Plain25, ImapMode::Tls993, "restart");
    spec.interval = "500ms";
    spec.delivery_deadline = "30s";
    let prober = Prober::start(&servers, &[spec], true).await;
    let addr = prober.addr();
    until(
        addr,
        Duration::from_secs(20),
        "two canaries via IDLE",
        |s| completed(s, P) >= 2.0,
    )
    .await;
    let before: HashSet<String> = servers.saved().into_iter().map(|x| x.message_id).collect();

    // Restart Dovecot without its IMAP listeners: LMTP delivers, the prober cannot look.
    let sv = servers.clone();
    blocking(move || {
        sv.stop_dovecot();
        sv.start_dovecot(false);
    })
    .await;
    let sv = servers.clone();
    let while_down: Vec<String> = blocking(move || wait_saved(&sv, &before, 3)).await;
    // Then Dovecot as it was.
    let sv = servers.clone();
    let back_at = blocking(move || {
        sv.stop_dovecot();
        let t = now_ms();
        sv.start_dovecot(true);
        t
    })
    .await;

    until(
        addr,
        Duration::from_secs(60),
        "the canaries delivered while IMAP was down",
        |_| {
            let seen: Vec<_> = prober
                .canaries(P)
                .into_iter()
                .filter(|c| while_down.contains(&c.message_id))
                .filter_map(|c| delivered_ms(&c))
                .collect();
            seen.len() == while_down.len()
        },
    )
    .await;
    for c in prober.canaries(P) {
        if while_down.contains(&c.message_id) {
            let at = delivered_ms(&c).unwrap();
            assert!(at >= back_at, "{} seen before Dovecot was back", c.id);
        }
    }
    let s = until(addr, Duration::from_secs(20), "success again", |s| {
        v(s, P, "mailcanary_probe_success", &[]) == 1.0
    })
    .await;
    assert!(
        failures(&s, P, "delivery", "connect") >= 1.0,
        "the outage was seen: {:?}",
        all_failures(&s, P)
    );
    assert_eq!(failures(&s, P, "delivery", "deadline"), 0.0);
    assert_eq!(delivery(&s, P, "mailcanary_canaries_lost_total"), 0.0);
    prober.stop().await;
}

/// Waits until Dovecot logged `n` new saves (not in `before`); their Message-IDs.
fn wait_saved(s: &Arc<Servers>, before: &HashSet<String>, n: usize) -> Vec<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let new: Vec<String> = s
            .saved()
            .into_iter()
            .filter(|x| x.user == address("restart") && !before.contains(&x.message_id))
            .map(|x| x.message_id)
            .collect();
        if new.len() >= n {
            return new;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "LMTP delivered only {} canaries while IMAP was down",
            new.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dovecot_without_idle_capability_is_polled() {
    const P: &str = "noidle";
    let mut setup = Setup::users(&["noidle"]);
    setup.idle = false;
    let servers = Servers::start(setup);
    // The probe asks for IDLE; the server does not offer it.
    let mut spec = ProbeSpec::new(P, SmtpMode::Plain25, ImapMode::Tls993, "noidle");
    spec.poll_interval = "100ms";
    let prober = Prober::start(&servers, &[spec], true).await;
    let s = until(
        prober.addr(),
        Duration::from_secs(30),
        "three canaries",
        |s| completed(s, P) >= 3.0,
    )
    .await;
    assert_eq!(all_failures(&s, P), vec![]);

    // Polling, not IDLE: Dovecot delays every IDLE push by 500 ms, a 100 ms poll sees mail
    // well before that.
    let saved = servers.saved();
    let mut lags: Vec<i64> = prober
        .canaries(P)
        .iter()
        .filter_map(|c| {
            let stored = saved.iter().find(|x| x.message_id == c.message_id)?;
            let stored_ms = stored
                .at
                .duration_since(std::time::UNIX_EPOCH)
                .ok()?
                .as_millis();
            Some(delivered_ms(c)? as i64 - stored_ms as i64)
        })
        .collect();
    let median = crate::common::median(&mut lags).expect("lags measured");
    assert!(
        median < 450,
        "median lag {median} ms looks like IDLE, not polling: {lags:?}"
    );
    prober.stop().await;
}
