//! Forged mail is counted and ignored; no secret reaches logs, metrics, status or the page.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use mailcanary::{
    canary::{Key, Token, message},
    sandbox::{Fault, Stage},
};

use crate::common::*;

/// Puts a message into canary@prober.test's sandbox mailbox the way a helpdesk would: a mail
/// from that address becomes a ticket, and a reply to it is delivered there.
async fn reply_into_canary_mailbox(sb: &mailcanary::sandbox::Sandbox, subject: &str, body: &str) {
    let m = lettre::Message::builder()
        .from("canary@prober.test".parse().unwrap())
        .to("support@helpdesk.test".parse().unwrap())
        .subject(subject)
        .body(body.to_string())
        .unwrap();
    let t = lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(sb.smtp_addr.port())
        .build();
    lettre::AsyncTransport::send(&t, m).await.unwrap();
    let url = format!(
        "{}/tickets/search?auth_token=sandbox&query=forged",
        sb.api_url()
    );
    let id = loop {
        let v: serde_json::Value = http().get(&url).send().await.unwrap().json().await.unwrap();
        if let Some(id) = v["tickets"][0]["id"].as_u64() {
            break id;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let r = http()
        .post(format!(
            "{}/tickets/{id}/replies?auth_token=sandbox",
            sb.api_url()
        ))
        .json(&serde_json::json!({"reply": {"content_attributes": {"body": body}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_canary_is_counted_and_never_taken_as_delivery() {
    let sb = sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(&config(&sb, &Knobs::default()), dir.path()).await;
    until(d.addr, Duration::from_secs(20), "a first canary", |s| {
        v(s, "mailcanary_canaries_completed_total", &[]) >= 1.0
    })
    .await;
    // A token with the right shape, made with another key: a forgery (or another prober's).
    let forged = Token::issue(
        &Key::from_secret("not ours"),
        PROBE,
        std::time::SystemTime::now(),
    );
    let subject = format!("forged {}", message::subject(PROBE, &forged));
    reply_into_canary_mailbox(&sb, &subject, &format!("forged\n{forged}\n")).await;
    let s = until(d.addr, Duration::from_secs(10), "forged counted", |s| {
        v(
            s,
            "mailcanary_messages_ignored_total",
            &[("reason", "forged")],
        ) >= 1.0
    })
    .await;
    assert_eq!(
        v(
            &s,
            "mailcanary_messages_ignored_total",
            &[("reason", "unknown")]
        ),
        0.0
    );
    d.stop().await;
    sb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_logs_metrics_status_or_page() {
    const API: &str = "api-tok-7f3a9c";
    const IMAP: &str = "imap-pw-51be0d";
    const HMAC: &str = "hmac-secret-c0ffee";
    let sb = sandbox_with(|c| {
        c.api_token = API.into();
        c.mailbox_password = IMAP.into();
    })
    .await;
    let knobs = Knobs {
        api_token: API.into(),
        imap_password: IMAP.into(),
        secret: HMAC.into(),
        ..Knobs::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("p.toml");
    std::fs::write(&cfg, config_text(&sb, &knobs)).unwrap();
    let port = free_port();
    let log = dir.path().join("stderr.log");
    let child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_mailcanary"))
            .args(["--log-format", "json", "run", "--config"])
            .arg(&cfg)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("MAILCANARY_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    until(addr, Duration::from_secs(20), "a canary", |s| {
        v(s, "mailcanary_canaries_completed_total", &[]) >= 1.0
    })
    .await;
    // Error paths log too: make the API and the mailbox fail for a while.
    sb.faults().set(Stage::Api, Fault::Error);
    sb.faults().set(Stage::Mailbox, Fault::Error);
    until(addr, Duration::from_secs(20), "failures", |s| {
        v(
            s,
            "mailcanary_stage_failures_total",
            &[("stage", "import"), ("reason", "api")],
        ) >= 1.0
            && v(
                s,
                "mailcanary_stage_failures_total",
                &[("stage", "delivery"), ("reason", "auth")],
            ) >= 1.0
    })
    .await;
    let mut seen = String::new();
    for path in ["/metrics", "/api/v1/status", "/"] {
        seen.push_str(&get_text(&format!("http://{addr}{path}")).await);
    }
    drop(child);
    seen.push_str(&std::fs::read_to_string(&log).unwrap());
    assert!(
        seen.contains("stage failed"),
        "the log should have been written"
    );
    for secret in [API, IMAP, HMAC] {
        assert!(!seen.contains(secret), "secret {secret} leaked");
    }
    sb.shutdown().await;
}
