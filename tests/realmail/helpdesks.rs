//! The prober against real helpdesks with their own email import: Request Tracker 5 (its mail
//! gateway run by Postfix, its mailer sending through Postfix into Dovecot).

use std::time::{Duration, Instant};

use mailcanary::{canary::life::Stage, config};

use crate::{
    common::*,
    harness::{Servers, Setup, address, password},
    rt::{Rt, SUPPORT},
};

const PROBE: &str = "rt";

fn rt_config(s: &Servers, rt: &Rt) -> String {
    let p = s.ports;
    format!(
        r#"
[prober]
listen = "127.0.0.1:0"
secret = "{SECRET}"
hostname = "{HOSTNAME}"

[[probe]]
name = "{PROBE}"
kind = "helpdesk"
interval = "5s"
jitter = "100ms"
max_in_flight = 50
lost_after = "1h"
cleanup = true

[probe.deadlines]
submit = "15s"
import = "15s"
reply = "30s"
delivery = "30s"
end_to_end = "2m"

[probe.smtp]
host = "127.0.0.1"
port = {smtp}
tls = "none"
from = "{mailbox}"
to = "{SUPPORT}"
timeout = "10s"
helo_name = "{HOSTNAME}"

[probe.helpdesk]
api = "rt"
base_url = "{url}"
token = "{token}"
# RT bcrypt-checks the token on every request (about 0.35 s at its default cost): gently.
poll_interval = "2s"
reply = "post"
cleanup = "archive"
timeout = "15s"

[probe.helpdesk.rt]
queue = "General"

[probe.imap]
host = "127.0.0.1"
port = {imap}
tls = "none"
username = "{mailbox}"
password = "{pw}"
idle = true
timeout = "10s"
"#,
        smtp = p.smtp,
        imap = p.imap,
        mailbox = address("canary"),
        pw = password("canary"),
        url = rt.url,
        token = rt.token,
    )
}

fn ms_of(c: &mailcanary::canary::life::Canary, stage: Stage) -> Option<i64> {
    let r = c.record(stage)?;
    Some(r.done_ms? as i64 - r.started_ms? as i64)
}

/// A full canary life on real RT 5, then the seed's outage on it: only the import background
/// job breaks (Postfix holds the mail for RT's gateway) while RT's web app and API answer 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_tracker_canary_life_then_the_seed_outage() {
    // The prober's warnings (a failed cleanup, a retried call) in the test's output.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("mailcanary=warn")
        .with_test_writer()
        .try_init();
    let servers = blocking(|| Servers::start(Setup::users(&["canary"]))).await;
    let t = Instant::now();
    let rt = {
        let s = servers.clone();
        blocking(move || Rt::start(&s)).await
    };
    eprintln!("RT set up and serving in {:?}", t.elapsed());
    let text = rt_config(&servers, &rt);
    let cfg = config::parse_str(&text, "rt.toml").unwrap_or_else(|e| panic!("{e}\n{text}"));
    let _ = rustls::crypto::ring::default_provider().install_default();
    let state = tempfile::tempdir().unwrap();
    let d = mailcanary::daemon::Daemon::start(
        &cfg,
        mailcanary::daemon::Options {
            state_dir: state.path().to_path_buf(),
            listen: ([127, 0, 0, 1], 0).into(),
            schedule: true,
        },
    )
    .await
    .expect("daemon starts");

    // A whole life: submit -> RT's gateway makes the ticket -> correspond -> RT mails it.
    let s = until(
        d.addr,
        Duration::from_secs(120),
        "3 canaries through RT",
        |s| completed(s, PROBE) >= 3.0,
    )
    .await;
    let ignored = |r: &str| {
        v(
            &s,
            PROBE,
            "mailcanary_messages_ignored_total",
            &[("reason", r)],
        )
    };
    assert!(
        ignored("acknowledgement") >= 3.0,
        "RT's AutoReply is recorded, not taken for the reply: {}",
        ignored("acknowledgement")
    );
    assert_eq!(ignored("duplicate"), 0.0);
    assert_eq!(all_failures(&s, PROBE), vec![], "no failure on the way");
    let done: Vec<_> = d
        .engine
        .status(mailcanary::flow::now_ms())
        .into_iter()
        .flat_map(|p| p.recent)
        .filter(|c| c.outcome.is_some())
        .collect();
    let mut import: Vec<i64> = done
        .iter()
        .filter_map(|c| ms_of(c, Stage::Import))
        .collect();
    let mut delivery: Vec<i64> = done
        .iter()
        .filter_map(|c| ms_of(c, Stage::Delivery))
        .collect();
    let mut ack: Vec<i64> = done
        .iter()
        .filter_map(|c| c.acknowledged.as_ref().map(|a| a.after_ms as i64))
        .collect();
    eprintln!(
        "RT: import ms {import:?} (median {:?}), delivery ms {delivery:?} (median {:?}), \
         acknowledgement after ms {ack:?} (median {:?})",
        median(&mut import.clone()),
        median(&mut delivery.clone()),
        median(&mut ack.clone())
    );
    assert!(median(&mut import).is_some() && median(&mut delivery).is_some());
    assert!(median(&mut ack).is_some());
    // Cleaned up: the canaries' tickets resolved through REST2.
    let http = reqwest::Client::new();
    // The oldest finished canary: its cleanup has had the longest.
    let ticket = done
        .last()
        .and_then(|c| c.ticket_id.clone())
        .expect("ticket handle");
    let status = {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let j: serde_json::Value = http
                .get(format!("{}/REST/2.0/ticket/{ticket}", rt.url))
                .header("Authorization", format!("token {}", rt.token))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let st = j["Status"].as_str().unwrap_or_default().to_string();
            if st == "resolved" || Instant::now() > deadline {
                break format!("{st} ({j})");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    assert!(
        status.starts_with("resolved"),
        "ticket {ticket} cleaned up: {status}"
    );

    // The seed: the import job stops (Postfix holds RT's mail), the web app stays up.
    servers.postconf_reload(&["defer_transports = rt"]);
    let broke = Instant::now();
    let web = http.get(format!("{}/", rt.url)).send().await.unwrap();
    assert!(
        web.status().is_success(),
        "RT's web app answers: {}",
        web.status()
    );
    // Bound: interval (5 s) + import deadline (15 s), and slack for one RT poll.
    let s = until(d.addr, Duration::from_secs(30), "import blamed", |s| {
        failures(s, PROBE, "import", "deadline") >= 1.0
            && v(s, PROBE, "mailcanary_probe_success", &[]) == 0.0
    })
    .await;
    let detected = broke.elapsed();
    eprintln!("RT seed drill: import blamed {detected:?} after the gateway stopped");
    for stage in ["submit", "reply", "delivery"] {
        assert_eq!(
            failures(&s, PROBE, stage, "deadline"),
            0.0,
            "{stage} blamed"
        );
    }
    let web = http.get(format!("{}/", rt.url)).send().await.unwrap();
    assert!(web.status().is_success());
    // Back: every held canary is imported, late, with its true duration; none lost.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let s = scrape(d.addr).await;
    let held = servers.queued();
    assert!(held >= 1, "mail was held for RT");
    servers.postconf_reload(&["defer_transports ="]);
    servers.postqueue_flush();
    let back = Instant::now();
    // Held past the import deadline: late, with its true duration. Held for less: on time.
    // Every held canary completes.
    let overdue = failures(&s, PROBE, "import", "deadline");
    let before = completed(&s, PROBE);
    let s = until(
        d.addr,
        Duration::from_secs(120),
        "the backlog imported",
        |s| {
            v(
                s,
                PROBE,
                "mailcanary_stage_late_total",
                &[("stage", "import")],
            ) >= overdue
                && completed(s, PROBE) >= before + held as f64
                && v(s, PROBE, "mailcanary_probe_success", &[]) == 1.0
        },
    )
    .await;
    let hist_sum = v(
        &s,
        PROBE,
        "mailcanary_stage_duration_seconds_sum",
        &[("stage", "import")],
    );
    assert!(
        hist_sum >= overdue * 15.0,
        "the late imports were observed with their true durations: sum {hist_sum} s"
    );
    eprintln!(
        "RT seed drill: {held} held canaries imported ({overdue} of them late), probe green {:?} after the gateway came back",
        back.elapsed()
    );
    assert_eq!(
        v(
            &s,
            PROBE,
            "mailcanary_canaries_lost_total",
            &[("stage", "import")]
        ),
        0.0
    );
    d.stop().await;
    drop(rt);
}
