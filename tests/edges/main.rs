//! Integration tests of the edges: the real SMTP submitter and SupportBee client against the
//! in-process sandbox, and against tiny servers started by the test (a silent TCP listener, a
//! scripted SMTP peer, axum apps that misbehave on purpose).

mod conformance;
mod imap;
#[path = "../support/probe_config.rs"]
mod probe_config;
mod smtp;
mod supportbee;

use std::{net::SocketAddr, time::Duration};

use lettre::{Message, message::header};
use mailcanary::sandbox::{DelayRange, Sandbox, SandboxConfig};

/// The API token every sandbox here demands: distinctive, so a leak into an error detail is
/// caught by a plain substring check.
pub const API_TOKEN: &str = "s3cret-api-token-4f1b";

/// A sandbox on ephemeral ports with short delays and a distinctive API token.
pub async fn sandbox() -> Sandbox {
    sandbox_speaking(None).await
}

/// [`sandbox`], with `api` (a dialect's name) in charge where dialects claim the same paths
/// (Freshdesk's and Zendesk's `/api/v2/`); `None` keeps the default.
pub async fn sandbox_speaking(api: Option<&str>) -> Sandbox {
    let mut cfg = SandboxConfig::ephemeral();
    if let Some(api) = api {
        cfg.api = api.into();
    }
    cfg.api_token = API_TOKEN.into();
    cfg.import_delay = DelayRange::new(Duration::from_millis(10), Duration::from_millis(50));
    cfg.outbound_delay = DelayRange::fixed(Duration::from_millis(10));
    Sandbox::start(cfg).await.expect("sandbox starts")
}

/// A fresh canary-like token (lowercase letters, digits and `-`).
pub fn token() -> String {
    format!("mc-{}", uuid::Uuid::new_v4().simple())
}

pub fn mail_to(to: &str, token: &str) -> Message {
    Message::builder()
        .from("canary@prober.test".parse().unwrap())
        .to(to.parse().unwrap())
        .subject(format!("mailcanary {token}"))
        .message_id(Some(format!("<{token}@prober.test>")))
        .header(header::ContentType::TEXT_PLAIN)
        .body(format!("Canary {token}. Please ignore.\r\n"))
        .unwrap()
}

/// Serves `app` on an ephemeral loopback port for the rest of the test.
pub async fn serve(app: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

/// A loopback port nobody listens on (bound, then released).
pub async fn closed_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

/// Polls `cond` every 20 ms until it returns `Some`, or panics after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = cond().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends a canary to the sandbox MX with the real submitter; returns its token.
pub async fn send_canary(sb: &Sandbox) -> String {
    use mailcanary::edges::smtp::{SmtpTarget, Submitter, TlsMode};
    let tok = token();
    let submitter = Submitter::new(SmtpTarget {
        host: sb.smtp_addr.ip().to_string(),
        port: sb.smtp_addr.port(),
        tls: TlsMode::None,
        credentials: None,
        oauth2: None,
        extra_roots_pem: None,
        timeout: Duration::from_secs(5),
        helo_name: Some("prober.test".into()),
    })
    .unwrap();
    submitter
        .submit(&mail_to("support@helpdesk.test", &tok))
        .await
        .expect("sandbox accepts the canary");
    tok
}
