//! Canaries complete through Postfix -> LMTP -> Dovecot -> IMAP IDLE, with every SMTP mode
//! (25 plain, 25 STARTTLS, 587 STARTTLS + AUTH, 465 implicit TLS + AUTH) crossed with every
//! IMAP mode (143 STARTTLS, 993 implicit TLS), TLS trusted through the probe's `ca_file`, the
//! servers named by host name and by IP address.

use std::time::Duration;

use crate::{
    common::{ImapMode, ProbeSpec, Prober, SmtpMode, all_failures, completed, until, v},
    harness::{Servers, Setup},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_smtp_mode_and_imap_mode_completes_through_postfix_and_dovecot() {
    let mut probes = Vec::new();
    for smtp in SmtpMode::ALL {
        for imap in ImapMode::ALL {
            let name = format!("{}-{}", smtp.slug(), imap.slug());
            probes.push(ProbeSpec::new(&name, smtp, imap, &name));
        }
    }
    // Servers named by IP address: TLS verifies against the certificate's IP SAN.
    for (smtp, imap) in [
        (SmtpMode::Submission587, ImapMode::StartTls143),
        (SmtpMode::Submissions465, ImapMode::Tls993),
        (SmtpMode::StartTls25, ImapMode::Tls993),
    ] {
        let name = format!("ip-{}-{}", smtp.slug(), imap.slug());
        let mut p = ProbeSpec::new(&name, smtp, imap, &name);
        p.host = "127.0.0.1";
        probes.push(p);
    }
    let users: Vec<&str> = probes.iter().map(|p| p.mailbox.as_str()).collect();
    let servers = Servers::start(Setup::users(&users));
    let prober = Prober::start(&servers, &probes, true).await;

    let names: Vec<String> = probes.iter().map(|p| p.name.clone()).collect();
    let s = until(
        prober.addr(),
        Duration::from_secs(60),
        "two completed canaries from every probe",
        |s| names.iter().all(|n| completed(s, n) >= 2.0),
    )
    .await;
    for n in &names {
        assert_eq!(all_failures(&s, n), vec![], "probe {n} met failures");
        assert_eq!(
            v(
                &s,
                n,
                "mailcanary_canaries_lost_total",
                &[("stage", "delivery")]
            ),
            0.0
        );
        assert_eq!(v(&s, n, "mailcanary_probe_success", &[]), 1.0, "{n}");
    }
    prober.stop().await;
}
