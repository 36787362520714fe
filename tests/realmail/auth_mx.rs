//! The mail-auth harness (`mailauth.rs`) on its own, no product code: a mail submitted with
//! lettre to 587 is signed by opendkim, relayed to the MX listener, judged by
//! policyd-spf, opendkim and opendmarc there, and stored by Dovecot; the tests read the stored
//! mail's `Authentication-Results` and `Received` lines. The drills the product's tests run
//! on it (a rotated key, no SPF record, a plaintext hop) are shown to change what the real
//! daemons write. The last test has the prober (as it is, no mail-auth code) complete canaries
//! over this path, which the product's drills build on.

use std::time::{Duration, Instant};

use lettre::{
    AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor,
    transport::smtp::{
        authentication::Credentials,
        client::{Certificate, Tls, TlsParameters},
        extension::ClientId,
    },
};

use crate::{
    common::{ImapMode, ProbeSpec, Prober, SmtpMode, all_failures, blocking, completed, until},
    harness::{
        Servers, Setup, address,
        mailauth::{
            AUTHSERV_ID, SPF_RECORD, authentication_results, header_block, header_values, query_txt,
        },
        password,
    },
};

const SENDER: &str = "canary";
const RCPT: &str = "inbox";

fn servers(plaintext_hop: bool) -> std::sync::Arc<Servers> {
    let mut setup = Setup::users(&[SENDER, RCPT]);
    setup.mail_auth = true;
    setup.plaintext_hop = plaintext_hop;
    let started = Instant::now();
    let s = Servers::start(setup);
    eprintln!("mail-auth servers started in {:?}", started.elapsed());
    s
}

/// Submits one mail from `canary@example.test` (From and MAIL FROM) to `inbox@example.test`
/// on 587 (STARTTLS, AUTH as canary) and returns it as Dovecot stored it.
async fn send_and_read(s: &std::sync::Arc<Servers>, subject: &str) -> String {
    let id = format!("{}.{subject}@example.test", std::process::id());
    let mail = Message::builder()
        .from(address(SENDER).parse().unwrap())
        .to(address(RCPT).parse().unwrap())
        .subject(subject)
        .message_id(Some(format!("<{id}>")))
        .body(format!("mail-auth harness: {subject}\r\n"))
        .unwrap();
    let pem = std::fs::read(s.ca_file()).unwrap();
    let tls = TlsParameters::builder("localhost".into())
        .add_root_certificate(Certificate::from_pem(&pem).unwrap())
        .build_rustls()
        .unwrap();
    let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("localhost")
        .port(s.ports.submission)
        .tls(Tls::Required(tls))
        .credentials(Credentials::new(address(SENDER), password(SENDER)))
        .hello_name(ClientId::Domain("prober.test".into()))
        .timeout(Some(Duration::from_secs(30)))
        .build();
    transport.send(mail).await.expect("submission accepts");
    let s = s.clone();
    blocking(move || s.delivered(RCPT, &id, Duration::from_secs(60))).await
}

/// The `Authentication-Results` values with our authserv-id, and the result of `method`
/// in them (`dkim=pass` → `pass`), one per method found.
fn verdicts(raw: &str, method: &str) -> Vec<String> {
    authentication_results(raw)
        .iter()
        .filter(|ar| ar.split(';').next().map(str::trim) == Some(AUTHSERV_ID))
        .flat_map(|ar| {
            ar.split(';')
                .skip(1)
                .filter_map(|r| {
                    let r = r.trim();
                    let (m, rest) = r.split_once('=')?;
                    (m.trim() == method)
                        .then(|| rest.split_whitespace().next().unwrap_or("").to_string())
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

fn assert_verdicts(raw: &str, dkim: &str, spf: &str, dmarc: &str) {
    for ar in authentication_results(raw) {
        println!("Authentication-Results: {ar}");
    }
    for (method, want) in [("dkim", dkim), ("spf", spf), ("dmarc", dmarc)] {
        assert_eq!(
            verdicts(raw, method),
            vec![want.to_string()],
            "{method} in\n{}",
            header_block(raw)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_mail_passes_dkim_spf_and_dmarc_and_every_hop_is_tls() {
    let s = servers(false);
    // The DNS server answers any program (the prober's resolver will be pointed at it).
    let resolver = s.mail_auth().resolver();
    assert_eq!(resolver.port(), 53);
    assert_eq!(query_txt(resolver, "example.test"), vec![SPF_RECORD]);
    let key = query_txt(resolver, "mc._domainkey.example.test");
    assert!(
        key.len() == 1 && key[0].starts_with("v=DKIM1; k=rsa; p=MII"),
        "{key:?}"
    );
    let raw = send_and_read(&s, "pass").await;
    println!(
        "--- delivered header block ---\n{}\n--- end ---",
        header_block(&raw)
    );
    assert_verdicts(&raw, "pass", "pass", "pass");
    let sig = header_values(&raw, "DKIM-Signature");
    assert_eq!(sig.len(), 1, "one signature");
    assert!(
        sig[0].contains("d=example.test") && sig[0].contains("s=mc"),
        "{sig:?}"
    );
    // Newest first: Dovecot's LMTP, the MX, the submission server.
    let received = header_values(&raw, "Received");
    assert_eq!(received.len(), 3, "{received:#?}");
    assert!(received[0].contains("with LMTPS"), "{}", received[0]);
    assert!(
        received[1].contains("by mx.example.test") && received[1].contains("with ESMTPS"),
        "{}",
        received[1]
    );
    assert!(
        received[2].contains("by out.example.test") && received[2].contains("with ESMTPSA"),
        "{}",
        received[2]
    );
    for r in &received[1..] {
        assert!(r.contains("using TLSv1.3"), "{r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_dkim_key_fails_dkim_while_aligned_spf_keeps_dmarc() {
    let s = servers(false);
    s.mail_auth().rotate_dkim_key();
    let raw = send_and_read(&s, "rotated").await;
    // DMARC passes on either aligned identifier: SPF of example.test still does.
    assert_verdicts(&raw, "fail", "pass", "pass");
    s.mail_auth().restore_dkim_key();
    let raw = send_and_read(&s, "restored").await;
    assert_verdicts(&raw, "pass", "pass", "pass");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_spf_record_is_spf_none_and_with_a_rotated_key_dmarc_fails() {
    let s = servers(false);
    s.mail_auth().remove_spf();
    assert_eq!(
        query_txt(s.mail_auth().resolver(), "example.test"),
        Vec::<String>::new()
    );
    let raw = send_and_read(&s, "nospf").await;
    assert_verdicts(&raw, "pass", "none", "pass");
    s.mail_auth().rotate_dkim_key();
    let raw = send_and_read(&s, "nospf-rotated").await;
    assert_verdicts(&raw, "fail", "none", "fail");
    s.mail_auth().set_txt("example.test", "v=spf1 -all");
    let raw = send_and_read(&s, "spf-fail").await;
    assert_verdicts(&raw, "fail", "fail", "fail");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_hop_shows_as_esmtp_without_tls_in_the_received_chain() {
    let s = servers(true);
    let raw = send_and_read(&s, "plain").await;
    let received = header_values(&raw, "Received");
    for r in &received {
        println!("Received: {r}");
    }
    assert_eq!(received.len(), 3, "{received:#?}");
    assert!(
        received[1].contains("by mx.example.test")
            && received[1].contains("with ESMTP ")
            && !received[1].contains("using TLS"),
        "{}",
        received[1]
    );
    assert_verdicts(&raw, "pass", "pass", "pass");
    // And back, at run time.
    s.set_plaintext_hop(false);
    let raw = send_and_read(&s, "tls-again").await;
    let received = header_values(&raw, "Received");
    assert!(received[1].contains("with ESMTPS"), "{}", received[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prober_completes_canaries_through_the_signing_relay_and_the_checking_mx() {
    let s = servers(false);
    // Submission with AUTH as canary@example.test, From that address, to itself.
    let mut probe = ProbeSpec::new("authmx", SmtpMode::Submission587, ImapMode::Tls993, SENDER);
    probe.cleanup = false;
    let prober = Prober::start(&s, &[probe], true).await;
    let samples = until(
        prober.addr(),
        Duration::from_secs(60),
        "a completed canary",
        |x| completed(x, "authmx") >= 1.0,
    )
    .await;
    assert_eq!(all_failures(&samples, "authmx"), vec![]);
    prober.stop().await;
    let id = s.saved()[0].message_id.clone();
    let s2 = s.clone();
    let raw = blocking(move || s2.delivered(SENDER, &id, Duration::from_secs(10))).await;
    assert!(
        !header_values(&raw, "X-Mailcanary-Token").is_empty(),
        "{}",
        header_block(&raw)
    );
    assert_verdicts(&raw, "pass", "pass", "pass");
}
