//! Shared helpers: start a fast sandbox, send mail, talk to the API.

use std::time::Duration;

use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor, message::header};
use mailcanary::sandbox::{DelayRange, Sandbox, SandboxConfig};
use serde_json::Value;

pub const TOKEN: &str = "sandbox";

/// A sandbox on ephemeral ports with short, fixed-range delays.
pub async fn start() -> Sandbox {
    start_with(|_| {}).await
}

pub async fn start_with(f: impl FnOnce(&mut SandboxConfig)) -> Sandbox {
    let mut cfg = SandboxConfig::ephemeral();
    cfg.import_delay = DelayRange::new(Duration::from_millis(20), Duration::from_millis(80));
    cfg.outbound_delay = DelayRange::fixed(Duration::from_millis(20));
    f(&mut cfg);
    Sandbox::start(cfg).await.expect("sandbox starts")
}

pub fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

pub fn smtp(sb: &Sandbox) -> AsyncSmtpTransport<Tokio1Executor> {
    AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(sb.smtp_addr.ip().to_string())
        .port(sb.smtp_addr.port())
        .timeout(Some(Duration::from_secs(10)))
        .build()
}

pub fn mail(from: &str, subject: &str, body: &str) -> Message {
    Message::builder()
        .from(from.parse().unwrap())
        .to("support@helpdesk.test".parse().unwrap())
        .subject(subject)
        .message_id(Some(format!("<{}@test.example>", uuid::Uuid::new_v4())))
        .header(header::ContentType::TEXT_PLAIN)
        .body(body.to_string())
        .unwrap()
}

/// Sends one mail to the support address; the SMTP error is returned as text.
pub async fn send(sb: &Sandbox, from: &str, subject: &str, body: &str) -> Result<(), String> {
    smtp(sb)
        .send(mail(from, subject, body))
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

pub async fn get_json(url: &str) -> (u16, Value) {
    let r = http().get(url).send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// `GET /tickets/search?query=` with the token; returns the tickets array.
pub async fn search(sb: &Sandbox, query: &str) -> Vec<Value> {
    let url = format!(
        "{}/tickets/search?auth_token={TOKEN}&per_page=100&query={query}",
        sb.api_url()
    );
    let (status, body) = get_json(&url).await;
    assert_eq!(status, 200, "search answered {status}: {body}");
    body["tickets"].as_array().cloned().unwrap_or_default()
}

/// Polls `cond` every 10 ms until it returns `Some`, or panics after `within`.
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
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub async fn set_fault(sb: &Sandbox, json: &str) -> reqwest::Response {
    http()
        .put(format!("{}/sandbox/faults", sb.api_url()))
        .header("content-type", "application/json")
        .body(json.to_string())
        .send()
        .await
        .expect("PUT /sandbox/faults")
}

pub fn token() -> String {
    format!("tok{}", uuid::Uuid::new_v4().simple())
}
