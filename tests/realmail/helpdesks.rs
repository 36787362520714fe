//! The prober against real helpdesks with their own email import: Request Tracker 5 (its mail
//! gateway run by Postfix, its mailer sending through Postfix into Dovecot) and django-helpdesk
//! (its `get_email` job reading a Dovecot mailbox, its mail sent through Postfix).
//!
//! Each helpdesk gets a full canary life and the seed's outage (only the import background job
//! breaks while the web app and API answer 200); the shared steps are [`canary_life`],
//! [`import_blamed`] and [`backlog_drained`].

use std::time::{Duration, Instant};

use mailcanary::{
    canary::life::{Canary, Stage},
    config,
    daemon::Daemon,
    metrics::testing::Samples,
};

use crate::{
    common::*,
    django::{Django, SUPPORT_USER},
    harness::{Servers, Setup, address, password},
    probe_config::Helpdesk,
    process::get_json_authorized,
    rt::{Rt, SUPPORT},
};

const PROBE: &str = "rt";

/// A config with one helpdesk probe `name` mailing `to`, its `[probe.deadlines]` and
/// `[probe.helpdesk]` tables given, reading the canary mailbox of `s` over IMAP with IDLE.
fn helpdesk_config(
    s: &Servers,
    name: &str,
    to: &str,
    lost_after: &str,
    deadlines: Deadlines,
    helpdesk: Helpdesk,
) -> ConfigFile {
    let p = s.ports;
    let mailbox = address("canary");
    let smtp = Smtp {
        host: "127.0.0.1".into(),
        port: Some(p.smtp),
        tls: some("none"),
        from: Some(mailbox.clone()),
        to: some(to),
        timeout: some("10s"),
        helo_name: some(HOSTNAME),
        ..Smtp::default()
    };
    prober_file().with(Probe {
        interval: some("5s"),
        jitter: some("100ms"),
        max_in_flight: Some(50),
        lost_after: some(lost_after),
        cleanup: Some(true),
        deadlines: Some(deadlines),
        helpdesk: Some(helpdesk),
        imap: Some(Imap {
            host: "127.0.0.1".into(),
            port: Some(p.imap),
            tls: some("none"),
            username: mailbox,
            password: Some(password("canary")),
            idle: Some(true),
            timeout: some("10s"),
            ..Imap::default()
        }),
        ..Probe::new(name, "helpdesk", smtp)
    })
}

/// `[probe.helpdesk]` of a real helpdesk: `api` at `url` with `token`, polled every `poll`;
/// the reply posted, the canary's ticket archived, 15 s per request.
fn real_helpdesk(api: &str, url: &str, token: &str, poll: &str) -> Helpdesk {
    Helpdesk {
        api: api.into(),
        base_url: url.into(),
        token: some(token),
        poll_interval: some(poll),
        reply: some("post"),
        cleanup: some("archive"),
        timeout: some("15s"),
        ..Helpdesk::default()
    }
}

fn rt_config(s: &Servers, rt: &Rt) -> String {
    // RT bcrypt-checks the token on every request (about 0.35 s at its default cost): gently.
    let mut helpdesk = real_helpdesk("rt", &rt.url, &rt.token, "2s");
    helpdesk.set_vendor("rt", "queue", "General");
    let deadlines = Deadlines {
        submit: some("15s"),
        import: some("15s"),
        reply: some("30s"),
        delivery: some("30s"),
        end_to_end: some("2m"),
        ..Deadlines::default()
    };
    helpdesk_config(s, PROBE, SUPPORT, "1h", deadlines, helpdesk).render()
}

fn ms_of(c: &Canary, stage: Stage) -> Option<i64> {
    let r = c.record(stage)?;
    Some(r.done_ms? as i64 - r.started_ms? as i64)
}

/// A daemon on `text`, scheduling canaries, its state in a fresh directory (kept alive by the
/// returned guard).
async fn daemon(text: &str, file: &str) -> (Daemon, tempfile::TempDir) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("mailcanary=warn")
        .with_test_writer()
        .try_init();
    let cfg = config::parse_str(text, file).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let _ = rustls::crypto::ring::default_provider().install_default();
    let state = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        &cfg,
        mailcanary::daemon::Options {
            state_dir: state.path().to_path_buf(),
            listen: ([127, 0, 0, 1], 0).into(),
            schedule: true,
        },
    )
    .await
    .expect("daemon starts");
    (d, state)
}

/// Waits for `n` canaries through the helpdesk, with its acknowledgement recorded as such and
/// no failure on the way; prints the measured latencies; returns the finished canaries,
/// newest first.
async fn canary_life(d: &Daemon, probe: &str, n: f64, within: Duration) -> Vec<Canary> {
    let s = until(d.addr, within, "canaries through the helpdesk", |s| {
        completed(s, probe) >= n
    })
    .await;
    let ignored = |r: &str| {
        v(
            &s,
            probe,
            "mailcanary_messages_ignored_total",
            &[("reason", r)],
        )
    };
    assert!(
        ignored("acknowledgement") >= n,
        "the helpdesk's acknowledgement is recorded, not taken for the reply: {}",
        ignored("acknowledgement")
    );
    assert_eq!(ignored("duplicate"), 0.0);
    assert_eq!(all_failures(&s, probe), vec![], "no failure on the way");
    let done: Vec<Canary> = d
        .engine
        .status(mailcanary::flow::now_ms())
        .into_iter()
        .flat_map(|p| p.recent)
        .filter(|c| c.outcome.is_some())
        .collect();
    let of = |stage| -> Vec<i64> { done.iter().filter_map(|c| ms_of(c, stage)).collect() };
    let (mut import, mut delivery) = (of(Stage::Import), of(Stage::Delivery));
    let mut ack: Vec<i64> = done
        .iter()
        .filter_map(|c| c.acknowledged.as_ref().map(|a| a.after_ms as i64))
        .collect();
    eprintln!(
        "{probe}: import ms {import:?} (median {:?}), delivery ms {delivery:?} (median {:?}), \
         acknowledgement after ms {ack:?} (median {:?})",
        median(&mut import.clone()),
        median(&mut delivery.clone()),
        median(&mut ack.clone())
    );
    assert!(median(&mut import).is_some() && median(&mut delivery).is_some());
    assert!(median(&mut ack).is_some());
    // The helpdesk says the reply is on the ticket (what the prober asks before it would post
    // again), and that a reply never posted is not.
    let p = d.prober.probes.iter().find(|p| p.name == probe).unwrap();
    let hd = p.helpdesk.as_ref().unwrap();
    let c = done.first().unwrap();
    let ticket = mailcanary::edges::helpdesk::TicketRef {
        id: c.ticket_id.clone().unwrap(),
        created_at: None,
    };
    let mark = p
        .key
        .reply_mark(&mailcanary::canary::Token::parse(&c.token).unwrap());
    let looked = hd.reply_posted(&ticket, &mark).await.unwrap();
    if looked.is_some() {
        assert_eq!(
            looked,
            Some(true),
            "{probe}: the posted reply is found by its mark"
        );
        assert_eq!(
            hd.reply_posted(&ticket, "mcreply-neverposted0000")
                .await
                .unwrap(),
            Some(false),
            "{probe}: a reply never posted is not found"
        );
    }
    // Which mail the helpdesk made each ticket from, where its API says: the canary's.
    if hd.says_message_id() {
        let mid = |s: &Samples, r: &str| {
            v(
                s,
                probe,
                "mailcanary_import_message_id_total",
                &[("result", r)],
            )
        };
        let s = until(
            d.addr,
            Duration::from_secs(30),
            "Message-IDs compared",
            |s| mid(s, "match") >= n,
        )
        .await;
        eprintln!(
            "{probe}: the helpdesk's Message-ID of the ticket's mail: {} match, {} mismatch, {} absent",
            mid(&s, "match"),
            mid(&s, "mismatch"),
            mid(&s, "absent")
        );
        assert_eq!(mid(&s, "mismatch") + mid(&s, "absent"), 0.0, "{probe}");
    }
    done
}

/// The seed, once the import job is broken: `import` is blamed and the probe fails within
/// `within`, no other stage is blamed. Returns how long detection took.
async fn import_blamed(d: &Daemon, probe: &str, broke: Instant, within: Duration) -> Duration {
    let s = until(d.addr, within, "import blamed", |s| {
        failures(s, probe, "import", "deadline") >= 1.0
            && v(s, probe, "mailcanary_probe_success", &[]) == 0.0
    })
    .await;
    let detected = broke.elapsed();
    eprintln!("{probe} seed drill: import blamed {detected:?} after the import job stopped");
    for stage in ["submit", "reply", "delivery"] {
        assert_eq!(
            failures(&s, probe, stage, "deadline"),
            0.0,
            "{stage} blamed"
        );
    }
    detected
}

/// The canaries waiting in import just before the import job comes back.
fn held(s: &Samples, probe: &str) -> f64 {
    v(
        s,
        probe,
        "mailcanary_stage_in_flight",
        &[("stage", "import")],
    )
}

/// After the import job is back (`before` scraped just before): every held canary is
/// imported, those held past the deadline counted late with their true durations; none lost;
/// the probe green again.
async fn backlog_drained(d: &Daemon, probe: &str, before: &Samples, import_deadline_s: f64) {
    let back = Instant::now();
    let held = held(before, probe);
    assert!(held >= 1.0, "canaries were held in import");
    let overdue = failures(before, probe, "import", "deadline");
    let done_before = completed(before, probe);
    let s = until(
        d.addr,
        Duration::from_secs(120),
        "the backlog imported",
        |s| {
            v(
                s,
                probe,
                "mailcanary_stage_late_total",
                &[("stage", "import")],
            ) >= overdue
                && completed(s, probe) >= done_before + held
                && v(s, probe, "mailcanary_probe_success", &[]) == 1.0
        },
    )
    .await;
    let sum = v(
        &s,
        probe,
        "mailcanary_stage_duration_seconds_sum",
        &[("stage", "import")],
    );
    assert!(
        sum >= overdue * import_deadline_s,
        "the late imports were observed with their true durations: sum {sum} s"
    );
    eprintln!(
        "{probe} seed drill: {held} held canaries imported ({overdue} of them late), probe green {:?} after the import job came back",
        back.elapsed()
    );
    assert_eq!(
        v(
            &s,
            probe,
            "mailcanary_canaries_lost_total",
            &[("stage", "import")]
        ),
        0.0
    );
}

/// A full canary life on real RT 5, then the seed's outage on it: only the import background
/// job breaks (Postfix holds the mail for RT's gateway) while RT's web app and API answer 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_tracker_canary_life_then_the_seed_outage() {
    let servers = blocking(|| Servers::start(Setup::users(&["canary"]))).await;
    let t = Instant::now();
    let rt = {
        let s = servers.clone();
        blocking(move || Rt::start(&s)).await
    };
    eprintln!("RT set up and serving in {:?}", t.elapsed());
    let (d, _state) = daemon(&rt_config(&servers, &rt), "rt.toml").await;

    // A whole life: submit -> RT's gateway makes the ticket -> correspond -> RT mails it.
    let done = canary_life(&d, PROBE, 3.0, Duration::from_secs(120)).await;
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
            let j = get_json_authorized(
                &http,
                &format!("{}/REST/2.0/ticket/{ticket}", rt.url),
                &format!("token {}", rt.token),
            )
            .await;
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
    import_blamed(&d, PROBE, broke, Duration::from_secs(30)).await;
    let web = http.get(format!("{}/", rt.url)).send().await.unwrap();
    assert!(web.status().is_success());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = scrape(d.addr).await;
    assert!(servers.queued() >= 1, "mail was held for RT");
    servers.postconf_reload(&["defer_transports ="]);
    servers.postqueue_flush();
    backlog_drained(&d, PROBE, &before, 15.0).await;
    d.stop().await;
    drop(rt);
}

const DJANGO: &str = "django";

fn django_config(s: &Servers, dh: &Django, lost_after: &str, end_to_end: &str) -> String {
    django_file(s, dh, lost_after, end_to_end).render()
}

/// The probe of `dh` through its own adapter.
fn django_file(s: &Servers, dh: &Django, lost_after: &str, end_to_end: &str) -> ConfigFile {
    let mut file = django_probe(s, dh, lost_after, end_to_end, "django-helpdesk", "");
    file.probe_mut(DJANGO).helpdesk_mut().set_vendor(
        "django-helpdesk",
        "queue",
        i64::try_from(dh.queue).unwrap(),
    );
    file
}

/// A probe of `dh` through adapter `api`, its vendor tables given (as TOML text, or nothing).
fn django_probe(
    s: &Servers,
    dh: &Django,
    lost_after: &str,
    end_to_end: &str,
    api: &str,
    tables: &str,
) -> ConfigFile {
    let mut helpdesk = real_helpdesk(api, &dh.url, &dh.token, "1s");
    if !tables.is_empty() {
        helpdesk.add_tables(tables);
    }
    let deadlines = Deadlines {
        submit: some("15s"),
        import: some("15s"),
        reply: some("15s"),
        delivery: some("20s"),
        end_to_end: some(end_to_end),
        ..Deadlines::default()
    };
    helpdesk_config(
        s,
        DJANGO,
        &address(SUPPORT_USER),
        lost_after,
        deadlines,
        helpdesk,
    )
}

async fn start_django() -> (std::sync::Arc<Servers>, Django) {
    let servers = blocking(|| Servers::start(Setup::users(&["canary", SUPPORT_USER]))).await;
    let t = Instant::now();
    let dh = {
        let s = servers.clone();
        blocking(move || Django::start(&s)).await
    };
    eprintln!("django-helpdesk set up and serving in {:?}", t.elapsed());
    (servers, dh)
}

/// A full canary life on real django-helpdesk, then the seed's outage on it: its `get_email`
/// job stops while its web app and API answer 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn django_helpdesk_canary_life_then_the_seed_outage() {
    let (servers, mut dh) = start_django().await;
    let (d, _state) = daemon(&django_config(&servers, &dh, "1h", "1m"), "django.toml").await;
    let done = canary_life(&d, DJANGO, 3.0, Duration::from_secs(120)).await;
    // Cleaned up: the oldest finished canary's ticket is closed (status 4).
    let http = reqwest::Client::new();
    oldest_ticket_closed(&dh, &http, &done).await;

    // The seed: the import job stops; the web app and the API go on answering.
    blocking_mut(&mut dh, Django::stop_import).await;
    let broke = Instant::now();
    let api = dh.tickets(&http).await;
    assert!(!api.is_empty(), "the API answers while the import is down");
    // Bound: interval (5 s) + import deadline (15 s), and slack for a poll.
    import_blamed(&d, DJANGO, broke, Duration::from_secs(25)).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = scrape(d.addr).await;
    blocking_mut(&mut dh, Django::start_import).await;
    backlog_drained(&d, DJANGO, &before, 15.0).await;
    d.stop().await;
    drop(dh);
}

/// The oldest finished canary's ticket (its cleanup has had the longest), once closed
/// (status 4); panics if it is not within 30 s.
async fn oldest_ticket_closed(
    dh: &Django,
    http: &reqwest::Client,
    done: &[Canary],
) -> serde_json::Value {
    let ticket = done
        .last()
        .and_then(|c| c.ticket_id.clone())
        .expect("ticket handle");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let t = dh.ticket(http, &ticket).await;
        if t["status"] == 4 {
            return t;
        }
        assert!(Instant::now() < deadline, "ticket {ticket} closed: {t}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Runs a blocking harness step that needs the helpdesk mutably.
async fn blocking_mut(dh: &mut Django, f: fn(&mut Django)) {
    tokio::task::block_in_place(|| f(dh));
}

/// django-helpdesk with its outgoing mail down: `POST /api/followups/` answers 500 although
/// the follow-up was saved, and every import run imports the same mail again as a new ticket.
/// The prober must not post the reply twice (it looks first), and must count the duplicate
/// tickets and clean all of them up when the canary is given up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn django_helpdesk_answers_500_yet_saves_the_reply_and_reimports_while_its_mail_is_down() {
    let (servers, mut dh) = start_django().await;
    blocking_mut(&mut dh, |d| d.break_outgoing()).await;
    // One canary (the interval is long), given up 45 s after it was sent.
    let mut file = django_file(&servers, &dh, "45s", "40s");
    file.probe_mut(DJANGO).interval = some("1h");
    let text = file.render();
    let (d, _state) = daemon(&text, "django.toml").await;
    let http = reqwest::Client::new();
    // The reply stage ends although the POST failed: the reply was found on the ticket.
    let deadline = Instant::now() + Duration::from_secs(60);
    let c = loop {
        let c = d
            .engine
            .status(mailcanary::flow::now_ms())
            .into_iter()
            .flat_map(|p| p.in_flight.into_iter().chain(p.recent))
            .next();
        if let Some(c) = &c
            && c.record(Stage::Reply).and_then(|r| r.done_ms).is_some()
        {
            break c.clone();
        }
        assert!(Instant::now() < deadline, "the reply stage ended: {c:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let ticket = c.ticket_id.clone().expect("imported");
    let t = dh.ticket(&http, &ticket).await;
    let replies = t["followup_set"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| {
            f["comment"]
                .as_str()
                .is_some_and(|s| s.contains("mcreply-"))
        })
        .count();
    assert_eq!(replies, 1, "the reply was posted once: {t}");
    // Meanwhile each import run made another ticket of the same mail.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n = dh
            .tickets(&http)
            .await
            .iter()
            .filter(|t| t["title"].as_str().is_some_and(|s| s.contains(&c.token)))
            .count();
        if n >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a duplicate import ({n} tickets)"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The import job stops, so no further duplicate appears; given up (no reply can arrive),
    // the canary is lost, and its clean-up counts the duplicates and closes every ticket.
    blocking_mut(&mut dh, Django::stop_import).await;
    let s = until(d.addr, Duration::from_secs(90), "duplicates counted", |s| {
        v(
            s,
            DJANGO,
            "mailcanary_canaries_lost_total",
            &[("stage", "delivery")],
        ) >= 1.0
            && v(
                s,
                DJANGO,
                "mailcanary_helpdesk_duplicate_tickets_total",
                &[],
            ) >= 1.0
    })
    .await;
    eprintln!(
        "django drill: {} duplicate tickets counted",
        v(
            &s,
            DJANGO,
            "mailcanary_helpdesk_duplicate_tickets_total",
            &[]
        )
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let open: Vec<_> = dh
            .tickets(&http)
            .await
            .into_iter()
            .filter(|t| t["title"].as_str().is_some_and(|s| s.contains(&c.token)))
            .filter(|t| t["status"] != 4)
            .map(|t| t["id"].clone())
            .collect();
        if open.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "every ticket of the canary closed; open: {open:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    d.stop().await;
}

/// The `[probe.helpdesk.http]` tables of `probes/generic-http.example.toml`: the shipped
/// example is what runs here.
fn generic_example_tables() -> String {
    let text = include_str!("../../probes/generic-http.example.toml");
    let start = text
        .find("\n[probe.helpdesk.http]\n")
        .expect("the example describes an API");
    let end = text
        .find("\n[probe.imap]\n")
        .expect("the example has a mailbox");
    text[start..end].to_string()
}

/// The generic adapter probes real django-helpdesk from config alone: the shipped
/// `generic-http.example.toml` description, no django-helpdesk code involved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn django_helpdesk_probed_by_the_generic_http_adapter_from_the_shipped_example() {
    let (servers, dh) = start_django().await;
    let text = django_probe(&servers, &dh, "1h", "1m", "http", &generic_example_tables()).render();
    let (d, _state) = daemon(&text, "generic-django.toml").await;
    let done = canary_life(&d, DJANGO, 2.0, Duration::from_secs(90)).await;
    let http = reqwest::Client::new();
    let t = oldest_ticket_closed(&dh, &http, &done).await;
    let replies = t["followup_set"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| {
            f["public"] == true
                && f["comment"]
                    .as_str()
                    .is_some_and(|s| s.contains("mcreply-"))
        })
        .count();
    assert_eq!(
        replies, 1,
        "one public reply through the reply template: {t}"
    );
    d.stop().await;
    drop(dh);
}
