//! The watched mailbox on a real Dovecot: ordinary mail and other probers' canaries in it are
//! never touched, cleanup removes exactly this prober's canaries (checked from a separate IMAP
//! session), and delivery latency measured against the moment Dovecot stored each message.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_imap::types::Fetch;
use futures::TryStreamExt;
use lettre::message::Mailbox;
use mailcanary::{
    canary::{CanaryMail, Key, Token},
    edges::smtp::{SmtpTarget, Submitter, TlsMode},
};

use crate::{
    common::{
        ImapMode, ProbeSpec, Prober, SECRET, SmtpMode, all_failures, completed, delivered_ms,
        median, until, v,
    },
    harness::{Servers, Setup, address, password},
};

/// One message as a separate IMAP session sees it.
#[derive(Debug)]
struct Held {
    uid: u32,
    flags: Vec<String>,
    raw: String,
}

/// Every message in `user`'s INBOX, read with BODY.PEEK (no \Seen) over plain 143.
async fn mailbox(s: &Servers, user: &str) -> Vec<Held> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", s.ports.imap))
        .await
        .unwrap();
    let mut client = async_imap::Client::new(tcp);
    client.read_response().await.unwrap().expect("greeting");
    let mut session = client
        .login(address(user), password(user))
        .await
        .map_err(|(e, _)| e)
        .expect("login");
    session.select("INBOX").await.unwrap();
    let uids = session.uid_search("ALL").await.unwrap();
    let mut out = Vec::new();
    if !uids.is_empty() {
        let fetched: Vec<Fetch> = session
            .uid_fetch("1:*", "(UID FLAGS BODY.PEEK[])")
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        for f in fetched {
            out.push(Held {
                uid: f.uid.unwrap(),
                // `Seen`, `Deleted`, ...: compared by name below.
                flags: f.flags().map(|fl| format!("{fl:?}")).collect(),
                raw: String::from_utf8_lossy(f.body().unwrap_or_default()).into_owned(),
            });
        }
    }
    let _ = session.logout().await;
    out.sort_by_key(|h| h.uid);
    out
}

fn submitter(s: &Servers) -> Submitter {
    Submitter::new(SmtpTarget {
        host: "127.0.0.1".into(),
        port: s.ports.smtp,
        tls: TlsMode::None,
        credentials: None,
        oauth2: None,
        extra_roots_pem: None,
        timeout: Duration::from_secs(10),
        helo_name: Some("sender.test".into()),
    })
    .unwrap()
}

/// A canary as another prober would send it: its own probe name and secret.
fn foreign_canary(probe: &str, secret: &str, to: &str) -> (lettre::Message, String) {
    let now = SystemTime::now();
    let token = Token::issue(&Key::from_secret(secret), probe, now);
    let mail = CanaryMail {
        probe: probe.into(),
        token: token.clone(),
        from: "canary@other-prober.test".parse::<Mailbox>().unwrap(),
        to: to.parse::<Mailbox>().unwrap(),
        sent_at: now,
        hostname: "other-prober.test".into(),
    };
    (mail.build(), token.as_str().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_mail_is_untouched_and_cleanup_removes_exactly_our_canaries() {
    const P: &str = "shared";
    let servers = Servers::start(Setup::users(&["shared"]));
    let spec = ProbeSpec::new(P, SmtpMode::Plain25, ImapMode::Tls993, "shared");
    let mut prober = Prober::start(&servers, &[spec], false).await;
    let addr = prober.addr();
    // The watcher starts at UIDNEXT: wait until it is in, so the foreign mail is judged.
    let login = format!("user=<{}>", address("shared"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(servers.dir.join("dovecot.log"))
        .unwrap_or_default()
        .contains(&login)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the prober never logged in"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let to = address("shared");
    let ordinary = lettre::Message::builder()
        .from("alice@customer.test".parse::<Mailbox>().unwrap())
        .to(to.parse::<Mailbox>().unwrap())
        .subject("Quarterly report")
        .body("Hello, the report is attached. Nothing to do with canaries.\n".to_string())
        .unwrap();
    // Another prober (its own secret), a sibling with our secret but a probe name this prober
    // does not run, and a forgery of our own probe name.
    let (other, other_token) = foreign_canary("other-prober", "other-secret", &to);
    let (sibling, sibling_token) = foreign_canary("sibling", SECRET, &to);
    let (forged, forged_token) = foreign_canary(P, "not-our-secret", &to);
    let smtp = submitter(&servers);
    let foreign = [
        ("ordinary", ordinary, "Quarterly report".to_string()),
        ("other", other, other_token),
        ("sibling", sibling, sibling_token),
        ("forged", forged, forged_token),
    ];
    // Interleaved with our canaries, so the watcher meets foreign mail between its own.
    for (i, (what, msg, _)) in foreign.iter().enumerate() {
        smtp.submit(msg)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        if i % 2 == 1 {
            prober.daemon.send_once();
        }
    }
    prober.daemon.send_once();
    let s = until(addr, Duration::from_secs(30), "three canaries", |s| {
        completed(s, P) >= 3.0
    })
    .await;
    assert_eq!(all_failures(&s, P), vec![]);

    // Cleanup is asynchronous: wait until our canaries are gone.
    let ours: Vec<String> = prober.canaries(P).into_iter().map(|c| c.token).collect();
    assert_eq!(ours.len(), 3);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let left = loop {
        let held = mailbox(&servers, "shared").await;
        if !held
            .iter()
            .any(|h| ours.iter().any(|t| h.raw.contains(t.as_str())))
        {
            break held;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "our canaries were not cleaned up: {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        left.len(),
        foreign.len(),
        "exactly the foreign mail is left: {left:?}"
    );
    for (what, _, marker) in &foreign {
        let h = left
            .iter()
            .find(|h| h.raw.contains(marker.as_str()))
            .unwrap_or_else(|| panic!("{what} was removed"));
        assert!(
            !h.flags.iter().any(|f| f == "Deleted" || f == "Seen"),
            "{what} was touched: flags {:?}",
            h.flags
        );
    }
    let s = crate::common::scrape(addr).await;
    let ignored = |r: &str| v(&s, P, "mailcanary_messages_ignored_total", &[("reason", r)]);
    // Only the imitation of our own probe is a forgery; the other prober's and the sibling's
    // canaries are someone else's (regression: all three were counted as forged).
    assert_eq!(
        ignored("forged"),
        1.0,
        "the forgery of our probe is counted, once"
    );
    assert_eq!(
        ignored("unknown"),
        2.0,
        "the other prober's and the sibling's canaries"
    );
    eprintln!(
        "ignored: forged={} unknown={} duplicate={} malformed={}",
        ignored("forged"),
        ignored("unknown"),
        ignored("duplicate"),
        ignored("malformed")
    );
    prober.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_latency_against_dovecot_store_time_idle_and_polling() {
    const N: usize = 10;
    let servers = Servers::start(Setup::users(&["latidle", "latpoll"]));
    let idle = ProbeSpec::new("lat-idle", SmtpMode::Plain25, ImapMode::Tls993, "latidle");
    let mut poll = ProbeSpec::new("lat-poll", SmtpMode::Plain25, ImapMode::Tls993, "latpoll");
    poll.idle = false;
    poll.poll_interval = "100ms";
    let mut prober = Prober::start(&servers, &[idle, poll], false).await;
    let addr = prober.addr();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..N {
        prober.daemon.send_once();
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let s = until(addr, Duration::from_secs(30), "every canary", |s| {
        completed(s, "lat-idle") >= N as f64 && completed(s, "lat-poll") >= N as f64
    })
    .await;
    assert_eq!(all_failures(&s, "lat-idle"), vec![]);
    assert_eq!(all_failures(&s, "lat-poll"), vec![]);

    let saved = servers.saved();
    let mut report = String::new();
    let mut medians = Vec::new();
    for probe in ["lat-idle", "lat-poll"] {
        let mut lags: Vec<i64> = prober
            .canaries(probe)
            .iter()
            .map(|c| {
                let stored = saved
                    .iter()
                    .find(|x| x.message_id == c.message_id)
                    .unwrap_or_else(|| panic!("Dovecot never logged {}", c.message_id));
                let stored_ms = stored.at.duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
                delivered_ms(c).expect("delivered") as i64 - stored_ms
            })
            .collect();
        assert_eq!(lags.len(), N);
        // Same clock: the prober cannot see a message before Dovecot stored it.
        assert!(
            lags.iter().all(|l| *l >= -2),
            "{probe}: negative lag {lags:?}"
        );
        let m = median(&mut lags).unwrap();
        report.push_str(&format!(
            "{probe}: median {m} ms, min {} ms, max {} ms over {N} canaries; all {lags:?}\n",
            lags[0],
            lags[N - 1]
        ));
        medians.push(m);
    }
    eprintln!(
        "delivery lag after Dovecot stored the message (prober saw it - Dovecot log):\n{report}"
    );
    assert!(
        medians[1] < medians[0],
        "polling every 100 ms beats Dovecot's 500 ms-delayed IDLE push: {report}"
    );
    prober.stop().await;
}
