//! Several recipient mailboxes and Junk placement on real Dovecot: a Sieve script
//! (`sieve_before`, Debian's `dovecot-sieve`) files mail to one mailbox into its `Junk` folder,
//! which the namespace marks `\Junk` (RFC 6154), as providers' spam filters do.

use std::{path::PathBuf, time::Duration};

use crate::{
    common::{
        ConfigFile, Deadlines, HOSTNAME, Imap, Probe, Prober, Smtp, blocking, prober_file, scrape,
        some, until, v,
    },
    harness::{Servers, Setup, address, password},
    probe_config::Mailbox,
};

/// The mailboxes of the probe: its name, and the local part of its address.
const MAILBOXES: [(&str, &str); 3] = [("gmail", "gbox"), ("m365", "mbox"), ("own", "junky")];

/// Mail to `junky@` goes to its Junk folder, everything else to the inbox.
const SIEVE: &str = "require [\"fileinto\"];\n\
    if address :localpart \"to\" \"junky\" { fileinto \"Junk\"; stop; }\n";

fn servers() -> std::sync::Arc<Servers> {
    let mut setup = Setup::users(&MAILBOXES.map(|(_, user)| user));
    setup.sieve = Some(SIEVE.to_string());
    Servers::start(setup)
}

/// A mail loop over the MX (port 25) to the three mailboxes, one canary each (the interval
/// is longer than the test), each watched over IMAP with STARTTLS.
fn config(s: &Servers, probe: &str, junk_is_ok: bool, cleanup: bool) -> String {
    config_file(s, probe, junk_is_ok, cleanup).render()
}

/// [`config`] to change before rendering.
fn config_file(s: &Servers, probe: &str, junk_is_ok: bool, cleanup: bool) -> ConfigFile {
    let p = s.ports;
    let ca = s.ca_file().display().to_string();
    let smtp = Smtp {
        host: "localhost".into(),
        port: Some(p.smtp),
        tls: some("none"),
        from: some("canary@prober.test"),
        timeout: some("10s"),
        helo_name: some(HOSTNAME),
        ..Smtp::default()
    };
    let mailboxes = MAILBOXES
        .iter()
        .map(|(name, user)| Mailbox {
            name: name.to_string(),
            address: address(user),
            imap: Imap {
                host: "localhost".into(),
                port: Some(p.imap),
                tls: some("starttls"),
                username: address(user),
                password: Some(password(user)),
                ca_file: Some(ca.clone()),
                timeout: some("10s"),
                ..Imap::default()
            },
        })
        .collect();
    prober_file().with(Probe {
        interval: some("1h"),
        jitter: some("100ms"),
        lost_after: some("2h"),
        junk_is_ok: Some(junk_is_ok),
        cleanup: Some(cleanup),
        deadlines: Some(Deadlines {
            submit: some("15s"),
            delivery: some("20s"),
            end_to_end: some("1m"),
            ..Deadlines::default()
        }),
        mailboxes,
        ..Probe::new(probe, "mail_loop", smtp)
    })
}

/// Messages in one folder of `user`'s Maildir (`None`: the inbox).
fn maildir_count(s: &Servers, user: &str, folder: Option<&str>) -> usize {
    let mut dir: PathBuf = s.dir.join("mail/example.test").join(user).join("Maildir");
    if let Some(f) = folder {
        dir = dir.join(format!(".{f}"));
    }
    ["new", "cur"]
        .iter()
        .map(|sub| {
            std::fs::read_dir(dir.join(sub))
                .unwrap_or_else(|e| panic!("{}: {e}", dir.join(sub).display()))
                .count()
        })
        .sum()
}

fn placed(s: &mailcanary::metrics::testing::Samples, probe: &str, m: &str, folder: &str) -> f64 {
    v(
        s,
        probe,
        "mailcanary_delivery_placement_total",
        &[("mailbox", m), ("folder", folder)],
    )
}

async fn each_placed_once(p: &Prober, probe: &str) -> mailcanary::metrics::testing::Samples {
    until(
        p.addr(),
        Duration::from_secs(60),
        "one canary placed in each mailbox",
        |s| {
            placed(s, probe, "gmail", "inbox") == 1.0
                && placed(s, probe, "m365", "inbox") == 1.0
                && placed(s, probe, "own", "junk") == 1.0
        },
    )
    .await
}

/// Every canary message is gone from the Maildirs (cleanup by UID, in whichever folder).
async fn cleaned_up(s: &std::sync::Arc<Servers>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left: Vec<(String, usize)> = MAILBOXES
            .iter()
            .flat_map(|(_, u)| {
                [
                    (format!("{u} inbox"), maildir_count(s, u, None)),
                    (format!("{u} Junk"), maildir_count(s, u, Some("Junk"))),
                ]
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        if left.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "canaries left in the Maildirs: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_sieve_files_into_junk_fails_the_probe_with_spam_and_is_cleaned_up_from_junk() {
    let s = blocking(servers).await;
    let probe = "placement";
    let text = config(&s, probe, false, true);
    let p = Prober::start_text(&text).await;
    let m = each_placed_once(&p, probe).await;
    // Three mailboxes, each judged on its own: two in the inbox, one in Junk.
    assert_eq!(placed(&m, probe, "gmail", "junk"), 0.0);
    assert_eq!(placed(&m, probe, "own", "inbox"), 0.0);
    let m = until(p.addr(), Duration::from_secs(10), "spam counted", |m| {
        v(
            m,
            probe,
            "mailcanary_stage_failures_total",
            &[("stage", "delivery"), ("reason", "spam")],
        ) == 1.0
    })
    .await;
    let mb = |name: &str, mailbox: &str| v(&m, probe, name, &[("mailbox", mailbox)]);
    assert_eq!(
        v(
            &m,
            probe,
            "mailcanary_delivery_failures_total",
            &[("mailbox", "own"), ("reason", "spam")]
        ),
        1.0
    );
    assert_eq!(mb("mailcanary_mailbox_success", "own"), 0.0);
    assert_eq!(mb("mailcanary_mailbox_success", "gmail"), 1.0);
    assert_eq!(mb("mailcanary_mailbox_success", "m365"), 1.0);
    assert_eq!(v(&m, probe, "mailcanary_probe_success", &[]), 0.0);
    // Delivered and measured: the junked canary's delivery is in the per-mailbox histogram.
    assert_eq!(
        v(
            &m,
            probe,
            "mailcanary_delivery_duration_seconds_count",
            &[("mailbox", "own")]
        ),
        1.0
    );
    assert_eq!(
        v(&m, probe, "mailcanary_canaries_completed_total", &[]),
        2.0
    );
    let junked: Vec<_> = p
        .canaries(probe)
        .into_iter()
        .filter(|c| c.mailbox.as_deref() == Some("own"))
        .collect();
    assert_eq!(junked.len(), 1);
    assert_eq!(
        junked[0].folder,
        Some(mailcanary::canary::life::Folder::Junk)
    );
    cleaned_up(&s).await;
    dovecot_gives_mailboxes_made_in_one_second_one_uidvalidity(&p, probe).await;
    // Later scrapes keep the verdict: nothing else arrived.
    let m = scrape(p.addr()).await;
    assert_eq!(placed(&m, probe, "own", "junk"), 1.0);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_is_ok_keeps_a_junked_canary_green_and_still_counts_it_as_junk() {
    let s = blocking(servers).await;
    let probe = "junkok";
    // Without cleanup, to see that the canaries are where the metrics say (and so that the
    // other test's empty Maildirs mean cleaned up, not never there).
    let p = Prober::start_text(&config(&s, probe, true, false)).await;
    each_placed_once(&p, probe).await;
    let m = until(p.addr(), Duration::from_secs(10), "three completed", |m| {
        v(m, probe, "mailcanary_canaries_completed_total", &[]) == 3.0
    })
    .await;
    assert_eq!(
        v(
            &m,
            probe,
            "mailcanary_stage_failures_total",
            &[("stage", "delivery"), ("reason", "spam")]
        ),
        0.0
    );
    assert_eq!(v(&m, probe, "mailcanary_probe_success", &[]), 1.0);
    assert_eq!(
        v(
            &m,
            probe,
            "mailcanary_mailbox_success",
            &[("mailbox", "own")]
        ),
        1.0
    );
    for (_, user) in MAILBOXES {
        let (inbox, junk) = (
            maildir_count(&s, user, None),
            maildir_count(&s, user, Some("Junk")),
        );
        let want = if user == "junky" { (0, 1) } else { (1, 0) };
        assert_eq!((inbox, junk), want, "{user}: (inbox, Junk)");
    }
    p.stop().await;
}

/// What Dovecot did: its Maildir UIDVALIDITY is the second a folder was made, so the three
/// mailboxes (and `junky`'s Junk folder) made by the first deliveries share one, and each
/// first message is UID 1: `(uidvalidity, uid)` names a message only within one folder. Keyed
/// so, the clean-ups in flight mixed up the mailboxes (one done delete was taken for the
/// other's, which then stayed pending for good, and `once` waited out its timeout); they are
/// keyed by the watched folder too. Called once the Maildirs are empty.
async fn dovecot_gives_mailboxes_made_in_one_second_one_uidvalidity(p: &Prober, probe: &str) {
    let seen: std::collections::HashSet<(Option<u32>, Option<u32>)> = p
        .canaries(probe)
        .iter()
        .map(|c| (c.delivered_uid_validity, c.delivered_uid))
        .collect();
    eprintln!("(uidvalidity, uid) of the three delivered canaries: {seen:?}");
    let probe = p
        .daemon
        .prober
        .probes
        .iter()
        .find(|x| x.name == probe)
        .expect("the probe");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while probe.cleanups_pending() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} clean-ups still pending although the Maildirs are empty",
            probe.cleanups_pending()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postfix_holding_one_recipients_mail_makes_only_that_mailbox_late() {
    let s = blocking(servers).await;
    let probe = "onelate";
    // A canary a second to each mailbox, a 3 s delivery deadline; no Junk rule for them here
    // (`junky` is not among the held).
    let mut file = config_file(&s, probe, false, true);
    let p = file.probe_mut(probe);
    p.interval = some("1s");
    p.deadlines_mut().delivery = some("3s");
    let text = file.render();
    let p = Prober::start_text(&text).await;
    until(p.addr(), Duration::from_secs(30), "a delivery each", |m| {
        placed(m, probe, "gmail", "inbox") >= 1.0
            && placed(m, probe, "m365", "inbox") >= 1.0
            && placed(m, probe, "own", "junk") >= 1.0
    })
    .await;

    // Postfix keeps accepting mail for m365 but delivers none of it (its own LMTP transport,
    // deferred); mail to the others goes on.
    let transport = s.dir.join("postfix/transport");
    std::fs::write(
        &transport,
        format!(
            "{} slowlmtp:unix:{}\n",
            address("mbox"),
            s.dir.join("dovecot/run/lmtp").display()
        ),
    )
    .unwrap();
    let sv = s.clone();
    blocking(move || {
        sv.postconf_reload(&[
            &format!("transport_maps = texthash:{}", transport.display()),
            "defer_transports = slowlmtp",
        ])
    })
    .await;
    let before = scrape(p.addr()).await;
    let m = until(
        p.addr(),
        Duration::from_secs(30),
        "m365 overdue while gmail delivers",
        |m| {
            v(
                m,
                probe,
                "mailcanary_delivery_overdue",
                &[("mailbox", "m365")],
            ) >= 2.0
                && placed(m, probe, "gmail", "inbox")
                    >= placed(&before, probe, "gmail", "inbox") + 3.0
        },
    )
    .await;
    let mb = |m: &mailcanary::metrics::testing::Samples, name: &str, mailbox: &str| {
        v(m, probe, name, &[("mailbox", mailbox)])
    };
    assert_eq!(mb(&m, "mailcanary_mailbox_success", "m365"), 0.0);
    assert_eq!(mb(&m, "mailcanary_mailbox_success", "gmail"), 1.0);
    assert_eq!(mb(&m, "mailcanary_delivery_overdue", "gmail"), 0.0);
    let sv = s.clone();
    assert!(
        blocking(move || sv.queued()).await >= 2,
        "Postfix holds m365's canaries"
    );

    // Released: m365's held canaries arrive late, counted against m365 only.
    let sv = s.clone();
    blocking(move || {
        sv.postconf_reload(&["defer_transports ="]);
        sv.postqueue_flush();
    })
    .await;
    let m = until(p.addr(), Duration::from_secs(30), "m365 late", |m| {
        mb(m, "mailcanary_delivery_late_total", "m365") >= 2.0
            && mb(m, "mailcanary_delivery_overdue", "m365") == 0.0
    })
    .await;
    for other in ["gmail", "own"] {
        assert_eq!(
            mb(&m, "mailcanary_delivery_late_total", other),
            0.0,
            "{other}"
        );
        assert_eq!(
            v(
                &m,
                probe,
                "mailcanary_delivery_failures_total",
                &[("mailbox", other), ("reason", "deadline")]
            ),
            0.0,
            "{other}"
        );
    }
    p.stop().await;
}
