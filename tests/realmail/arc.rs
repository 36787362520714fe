//! ARC through a forwarder, on the real mail-auth path: the canary is signed by real opendkim
//! and checked by the real MX (`mailauth.rs`), then a mailing list (this test, sealing with
//! mail-auth's `ArcSealer` as `lists.example.test`, its key in the harness's unbound) forwards
//! it into the mailbox the probe watches. Debian packages no ARC sealer (OpenARC is not in
//! bookworm), so the list is played here; the verifying side is the prober's own
//! (`verify_dkim`, src/edges/dkim.rs), reading the message from real Dovecot.
//!
//! Two kinds of forwarding, alternating: the list adds its footer and then seals (what lists
//! do, and what ARC is for: `dkim=fail`, `arc=pass`), or seals and then something changes the
//! body on the way (`arc=fail`). The probe requires ARC (`require_verified = ["arc"]`): the
//! first kind completes, the second fails delivery with `auth_result`.

use std::{
    collections::HashSet,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::Duration,
};

use base64::Engine as _;
use mail_auth::{
    AuthenticatedMessage, AuthenticationResults, MessageAuthenticator,
    arc::ArcSealer,
    common::{crypto::Ed25519Key, headers::HeaderWriter},
    hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts},
};

use crate::{
    common::{ImapMode, ProbeSpec, Prober, SmtpMode, completed, config_file, failures, until, v},
    harness::{Servers, Setup},
};

const LIST: &str = "lists.example.test";
const FOOTER: &str = "--\r\nYou are subscribed to canaries@lists.example.test.\r\n";

fn maildir(s: &Servers, user: &str) -> PathBuf {
    s.dir.join("mail/example.test").join(user).join("Maildir")
}

/// `text` with every line ending CRLF (Dovecot stores what it was given; IMAP serves CRLF).
fn crlf(text: &str) -> String {
    text.replace("\r\n", "\n").replace('\n', "\r\n")
}

/// A resolver on the harness's unbound only, as the prober's `dns_resolver` makes it.
fn authenticator(dns: std::net::SocketAddr) -> MessageAuthenticator {
    let mut server = NameServerConfig::udp_and_tcp(dns.ip());
    for c in &mut server.connections {
        c.port = dns.port();
    }
    MessageAuthenticator::new(
        ResolverConfig::from_parts(None, vec![], vec![server]),
        ResolverOpts::default(),
    )
    .expect("resolver")
}

/// The list's copy of `raw`: sealed after its footer (`footer_first`), or sealed and then
/// changed.
async fn forward(auth: &MessageAuthenticator, key: &[u8], raw: &str, footer_first: bool) -> String {
    let mut body = crlf(raw);
    if footer_first {
        body.push_str(FOOTER);
    }
    let message = AuthenticatedMessage::parse(body.as_bytes()).expect("a message");
    let dkim = auth.verify_dkim(&message).await;
    let arc = auth.verify_arc(&message).await;
    let results = AuthenticationResults::new(LIST).with_dkim_results(&dkim, "example.test");
    let set = ArcSealer::from_key(Ed25519Key::from_pkcs8_der(key).unwrap())
        .domain(LIST)
        .selector("arc")
        .headers([
            "From",
            "To",
            "Subject",
            "Date",
            "Message-ID",
            "DKIM-Signature",
        ])
        .seal(&message, &results, &arc)
        .expect("sealed");
    let mut out = format!("{}{body}", set.to_header());
    if !footer_first {
        out.push_str(FOOTER);
    }
    out
}

/// Writes `text` into `dir`'s `new/` as Dovecot's own deliveries are (owner included).
fn deliver(dir: &Path, name: &str, text: &str) {
    let owner = std::fs::metadata(dir).unwrap();
    let tmp = dir.join("tmp").join(name);
    std::fs::write(&tmp, text).unwrap();
    std::os::unix::fs::chown(&tmp, Some(owner.uid()), Some(owner.gid())).unwrap();
    std::fs::rename(&tmp, dir.join("new").join(name)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_that_seals_after_its_footer_is_arc_pass_and_one_changed_after_is_arc_fail() {
    let mut setup = Setup::users(&["listin", "member"]);
    setup.mail_auth = true;
    let servers = crate::common::blocking(move || Servers::start(setup)).await;
    let dns = servers.mail_auth().resolver();
    let key = Ed25519Key::generate_pkcs8().unwrap();
    let public = Ed25519Key::from_pkcs8_der(&key).unwrap().public_key();
    servers.mail_auth().set_txt(
        &format!("arc._domainkey.{LIST}"),
        &format!(
            "v=DKIM1; k=ed25519; p={}",
            base64::engine::general_purpose::STANDARD.encode(public)
        ),
    );

    // The probe sends to the list's address and watches the member's mailbox.
    let mut spec = ProbeSpec::new("list", SmtpMode::Submission587, ImapMode::Tls993, "member");
    spec.rcpt = Some("listin".into());
    spec.interval = "2s";
    spec.delivery_deadline = "30s";
    let mut file = config_file(&servers, &[spec]);
    let p = file.probe_mut("list");
    p.verify_dkim = Some(true);
    p.dns_resolver = Some(dns.to_string());
    // The author's DKIM cannot survive a list; the list's ARC seal is what is required.
    p.require_verified = vec!["arc".into()];
    let prober = Prober::start_text(&file.render()).await;

    // The list: every canary that reaches its address goes to the member, alternately
    // footer-then-seal and seal-then-changed.
    let (inbox, member) = (maildir(&servers, "listin"), maildir(&servers, "member"));
    let list = tokio::spawn(async move {
        let auth = authenticator(dns);
        let mut seen = HashSet::new();
        let mut n = 0u32;
        loop {
            for sub in ["new", "cur"] {
                let Ok(entries) = std::fs::read_dir(inbox.join(sub)) else {
                    continue;
                };
                for e in entries.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let Ok(raw) = std::fs::read_to_string(e.path()) else {
                        continue;
                    };
                    if !raw.contains("X-Mailcanary-Token") || !seen.insert(name.clone()) {
                        continue;
                    }
                    let copy = forward(&auth, &key, &raw, n.is_multiple_of(2)).await;
                    // A name of its own: Dovecot's carries the size (`S=`) of its content.
                    deliver(&member, &format!("{n}.list.example"), &copy);
                    n += 1;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });

    let verified = |s: &mailcanary::metrics::testing::Samples, method: &str, result: &str| {
        v(
            s,
            "list",
            "mailcanary_delivery_verified_total",
            &[("method", method), ("result", result)],
        )
    };
    let s = until(
        prober.addr(),
        Duration::from_secs(90),
        "canaries forwarded both ways",
        |s| verified(s, "arc", "pass") >= 2.0 && verified(s, "arc", "fail") >= 2.0,
    )
    .await;
    list.abort();
    // The footer broke the author's DKIM signature every time; ARC vouches for it when the
    // seal came after the footer.
    assert!(verified(&s, "dkim", "fail") >= 4.0);
    assert_eq!(verified(&s, "dkim", "pass"), 0.0);
    assert_eq!(verified(&s, "arc", "temperror"), 0.0);
    assert_eq!(verified(&s, "arc", "none"), 0.0);
    // ARC is required: the sealed-after-footer canaries complete, the changed ones fail.
    assert!(completed(&s, "list") >= 2.0);
    assert!(failures(&s, "list", "delivery", "auth_result") >= 2.0);
    let url = format!("http://{}/api/v1/status", prober.addr());
    let status = reqwest::get(&url).await.unwrap().text().await.unwrap();
    assert!(
        status.contains("required verification (the prober's own) not passed: arc=fail"),
        "{status}"
    );
    prober.stop().await;
}
