//! What the real servers refuse is classified on the right stage, without a crash and without
//! tripping timeouts: a CA that did not sign the server's certificate (`tls`), a wrong password
//! (`auth`, after Dovecot's 2 s failure delay), a recipient Postfix does not know (550:
//! `rejected`). A healthy probe in the same prober keeps completing throughout.

use std::time::Duration;

use crate::{
    common::{ImapMode, ProbeSpec, Prober, SmtpMode, all_failures, completed, failures, until},
    harness::{Servers, Setup},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_ca_wrong_password_and_unknown_recipient_are_classified() {
    use ImapMode::*;
    use SmtpMode::*;
    let users = [
        "healthy",
        "smtpca465",
        "smtpca587",
        "smtpca25",
        "smtppw587",
        "smtppw465",
        "rcptwatch",
        "imapca993",
        "imapca143",
        "imappw",
    ];
    let servers = Servers::start(Setup::users(&users));
    let wrong_ca = servers.wrong_ca_file();
    let mut probes = Vec::new();
    // (probe, expected stage, expected reason)
    let mut expect = Vec::new();
    let mut add = |p: ProbeSpec, stage: &'static str, reason: &'static str| {
        expect.push((p.name.clone(), stage, reason));
        probes.push(p);
    };
    let healthy = ProbeSpec::new("healthy", Plain25, Tls993, "healthy");

    let mut p = ProbeSpec::new("smtp-wrongca-465", Submissions465, Tls993, "smtpca465");
    p.smtp_ca = Some(wrong_ca.clone());
    add(p, "submit", "tls");
    let mut p = ProbeSpec::new("smtp-wrongca-587", Submission587, Tls993, "smtpca587");
    p.smtp_ca = Some(wrong_ca.clone());
    add(p, "submit", "tls");
    let mut p = ProbeSpec::new("smtp-wrongca-25", StartTls25, Tls993, "smtpca25");
    p.smtp_ca = Some(wrong_ca.clone());
    add(p, "submit", "tls");
    let mut p = ProbeSpec::new("smtp-wrongpw-587", Submission587, Tls993, "smtppw587");
    p.smtp_password = Some("not-the-password".into());
    add(p, "submit", "auth");
    let mut p = ProbeSpec::new("smtp-wrongpw-465", Submissions465, Tls993, "smtppw465");
    p.smtp_password = Some("not-the-password".into());
    add(p, "submit", "auth");
    let mut p = ProbeSpec::new("smtp-unknown-rcpt", Plain25, Tls993, "rcptwatch");
    p.rcpt = Some("nobody".into());
    add(p, "submit", "rejected");
    let mut p = ProbeSpec::new("imap-wrongca-993", Plain25, Tls993, "imapca993");
    p.imap_ca = Some(wrong_ca.clone());
    add(p, "delivery", "tls");
    let mut p = ProbeSpec::new("imap-wrongca-143", Plain25, StartTls143, "imapca143");
    p.imap_ca = Some(wrong_ca.clone());
    add(p, "delivery", "tls");
    let mut p = ProbeSpec::new("imap-wrongpw", Plain25, Tls993, "imappw");
    p.imap_password = Some("not-the-password".into());
    add(p, "delivery", "auth");
    probes.push(healthy);

    let prober = Prober::start(&servers, &probes, true).await;
    let s = until(
        prober.addr(),
        Duration::from_secs(60),
        "every failure classified and the healthy probe completing",
        |s| {
            completed(s, "healthy") >= 3.0
                && expect
                    .iter()
                    .all(|(n, stage, reason)| failures(s, n, stage, reason) >= 1.0)
        },
    )
    .await;

    assert_eq!(all_failures(&s, "healthy"), vec![]);
    for (n, stage, reason) in &expect {
        let got = all_failures(&s, n);
        // Nothing else: no `timeout` from Dovecot's 2 s auth delay (timeouts are 10 s), no
        // `protocol` or `connect` from a misread refusal. A mailbox the prober cannot read
        // leaves its canaries overdue, which is `deadline` (delivery deadline 10 s).
        for (st, r, count) in &got {
            assert!(
                (st == stage && r == reason) || r == "deadline",
                "probe {n}: unexpected failure {st}/{r} x{count}; all: {got:?}"
            );
        }
        if *stage == "submit" {
            assert_eq!(completed(&s, n), 0.0, "{n}: nothing should get through");
        }
    }
    prober.stop().await;
}
