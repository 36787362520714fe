//! The SMTP submitter: success, and each failure mapped to its reason.

use std::time::Duration;

use mailcanary::{
    canary::life::Reason,
    edges::smtp::{SmtpError, SmtpPhase, SmtpTarget, Submitter, TlsMode},
    sandbox::{Fault, Stage},
};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpListener,
};

use crate::{closed_port, mail_to, sandbox, token};

fn target(addr: std::net::SocketAddr) -> SmtpTarget {
    SmtpTarget {
        host: addr.ip().to_string(),
        port: addr.port(),
        tls: TlsMode::None,
        credentials: None,
        oauth2: None,
        extra_roots_pem: None,
        timeout: Duration::from_secs(5),
        helo_name: Some("prober.test".into()),
    }
}

fn canary() -> lettre::Message {
    mail_to("support@helpdesk.test", &token())
}

/// Submits a canary to `t`, which must fail.
async fn refused(t: SmtpTarget) -> SmtpError {
    refused_with(t, &canary()).await
}

async fn refused_with(t: SmtpTarget, message: &lettre::Message) -> SmtpError {
    Submitter::new(t)
        .unwrap()
        .submit(message)
        .await
        .expect_err("the submit should fail")
}

#[tokio::test]
async fn submit_is_accepted_with_the_servers_reply() {
    let sb = sandbox().await;
    let submitter = Submitter::new(target(sb.smtp_addr)).unwrap();
    let ok = submitter.submit(&canary()).await.expect("accepted");
    assert!(ok.response.starts_with("250"), "{ok:?}");
    // A second canary through the same submitter works too (fresh connection each time).
    submitter.submit(&canary()).await.expect("accepted again");
    sb.shutdown().await;
}

#[tokio::test]
async fn inbound_error_fault_is_tempfail() {
    let sb = sandbox().await;
    sb.faults().set(Stage::Inbound, Fault::Error);
    let err = refused(target(sb.smtp_addr)).await;
    assert_eq!(err.reason(), Reason::Tempfail, "{err}");
    assert_eq!(err.phase(), SmtpPhase::Transaction);
    assert!(err.detail().contains("451"), "{err}");
    sb.shutdown().await;
}

#[tokio::test]
async fn unknown_recipient_is_rejected() {
    let sb = sandbox().await;
    let err = refused_with(
        target(sb.smtp_addr),
        &mail_to("nobody@helpdesk.test", &token()),
    )
    .await;
    assert_eq!(err.reason(), Reason::Rejected, "{err}");
    assert!(err.detail().contains("550"), "{err}");
    sb.shutdown().await;
}

#[tokio::test]
async fn closed_port_is_connect() {
    let port = closed_port().await;
    let err = refused(target(([127, 0, 0, 1], port).into())).await;
    assert_eq!(err.reason(), Reason::Connect, "{err}");
    assert_eq!(err.phase(), SmtpPhase::Connect);
}

/// Implicit TLS against a plaintext MX: the client's handshake reads the server's `220 …`
/// greeting as a TLS record, and rustls refuses it as a corrupt message. That is a TLS failure
/// (`tls`), not `protocol`: the step that broke is the handshake, before any SMTP was spoken.
#[tokio::test]
async fn implicit_tls_against_plaintext_is_tls() {
    let sb = sandbox().await;
    let mut t = target(sb.smtp_addr);
    t.tls = TlsMode::Tls;
    let err = refused(t).await;
    assert_eq!(err.reason(), Reason::Tls, "{err}");
    assert_eq!(err.phase(), SmtpPhase::TlsHandshake);
    sb.shutdown().await;
}

/// STARTTLS is required, and the sandbox MX does not offer it: a downgrade is a TLS failure,
/// and nothing is sent in the clear.
#[tokio::test]
async fn required_starttls_not_offered_is_tls() {
    let sb = sandbox().await;
    let mut t = target(sb.smtp_addr);
    t.tls = TlsMode::StartTls;
    let err = refused(t).await;
    assert_eq!(err.reason(), Reason::Tls, "{err}");
    assert_eq!(err.phase(), SmtpPhase::StartTls);
    assert!(err.detail().contains("STARTTLS"), "{err}");
    assert!(sb.events().is_empty(), "no mail went through");
    sb.shutdown().await;
}

#[tokio::test]
async fn a_silent_server_times_out_within_the_timeout() {
    // Accepts TCP (the kernel completes the handshake from the backlog) and never speaks.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut t = target(listener.local_addr().unwrap());
    t.timeout = Duration::from_millis(400);
    let started = tokio::time::Instant::now();
    let err = refused(t).await;
    let took = started.elapsed();
    assert_eq!(err.reason(), Reason::Timeout, "{err}");
    assert_eq!(err.phase(), SmtpPhase::Greeting);
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_millis(1500),
        "took {took:?}"
    );
    drop(listener);
}

#[tokio::test]
async fn bad_extra_roots_fail_at_construction() {
    let mut t = target(([127, 0, 0, 1], 25).into());
    t.tls = TlsMode::StartTls;
    t.extra_roots_pem = Some(b"not a certificate".to_vec());
    let err = Submitter::new(t).unwrap_err();
    assert_eq!(err.reason(), Reason::Tls, "{err}");
}

/// A scripted peer offering AUTH and refusing it with a reply that echoes the password (some
/// servers echo what they got): the reason is `auth`, and the password never reaches the detail.
#[tokio::test]
async fn auth_535_is_auth_and_the_password_is_scrubbed() {
    const PASSWORD: &str = "hunter2-correct-horse";
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (rd, mut wr) = stream.into_split();
        let mut rd = BufReader::new(rd);
        wr.write_all(b"220 scripted ESMTP\r\n").await.unwrap();
        let mut line = String::new();
        while rd.read_line(&mut line).await.unwrap_or(0) > 0 {
            let reply = match line.get(..4).map(str::to_ascii_uppercase).as_deref() {
                Some("EHLO") => "250-scripted\r\n250 AUTH PLAIN LOGIN\r\n".to_string(),
                Some("AUTH") => format!("535 5.7.8 Authentication failed for {PASSWORD}\r\n"),
                Some("QUIT") => "221 bye\r\n".to_string(),
                _ => "502 5.5.2 what?\r\n".to_string(),
            };
            wr.write_all(reply.as_bytes()).await.unwrap();
            line.clear();
        }
    });
    let mut t = target(addr);
    t.credentials = Some(("canary@prober.test".into(), PASSWORD.into()));
    let err = refused(t).await;
    assert_eq!(err.reason(), Reason::Auth, "{err}");
    assert_eq!(err.phase(), SmtpPhase::Auth);
    assert!(err.detail().contains("535"), "{err}");
    assert!(!err.to_string().contains(PASSWORD), "{err}");
    assert!(!format!("{err:?}").contains(PASSWORD), "{err:?}");
}

/// Credentials for a server that offers no AUTH at all (the sandbox): `auth`, not a silent send.
#[tokio::test]
async fn credentials_without_server_auth_is_auth() {
    let sb = sandbox().await;
    let mut t = target(sb.smtp_addr);
    t.credentials = Some(("canary".into(), "pw-never-shown".into()));
    assert!(!format!("{t:?}").contains("pw-never-shown"));
    let err = refused(t).await;
    assert_eq!(err.reason(), Reason::Auth, "{err}");
    sb.shutdown().await;
}
