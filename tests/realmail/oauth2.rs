//! OAuth2 login on both legs against real Dovecot 2.3.19 (IMAP AUTHENTICATE, and Postfix's
//! submission AUTH through Dovecot SASL), with tokens from the test's own identity provider
//! (`idp.rs`) checked by Dovecot's `oauth2` passdb: every token source and both mechanisms
//! (XOAUTH2, OAUTHBEARER), 3 s tokens renewed across many logins, revoked tokens (`auth`), a
//! token endpoint down (`token`) and back, without a restart.

use std::time::Duration;

use crate::{
    common::{
        ImapMode, OAuth2, ProbeSpec, Prober, SmtpMode, all_failures, completed, config_text,
        failures, scrape, some, until,
    },
    harness::{Servers, Setup, address},
    idp::Idp,
    tls_front::TlsFront,
};

/// Token lifetime at the IdP: short, so a run of a few seconds renews many times.
const LIFETIME: Duration = Duration::from_secs(3);

fn client_credentials(idp: &Idp, mechanism: &str, user: &str) -> OAuth2 {
    let (id, secret) = (format!("app-{user}"), format!("cs-{user}-s3cr3t"));
    idp.client(&id, &secret, &address(user));
    OAuth2 {
        mechanism: some(mechanism),
        grant: some("client_credentials"),
        token_endpoint: some(idp.token_url()),
        client_id: Some(id),
        client_secret: Some(secret),
        scope: some("https://outlook.office365.com/.default"),
        ..OAuth2::default()
    }
}

fn refresh_token(idp: &Idp, mechanism: &str, user: &str) -> OAuth2 {
    let (id, secret, rt) = (
        format!("gm-{user}"),
        format!("gcs-{user}-s3cr3t"),
        format!("1//rt-{user}-s3cr3t"),
    );
    idp.client(&id, &secret, "nobody-app-only");
    idp.refresh_token(&rt, &id, &address(user));
    OAuth2 {
        mechanism: some(mechanism),
        grant: some("refresh_token"),
        token_endpoint: some(idp.token_url()),
        client_id: Some(id),
        client_secret: Some(secret),
        refresh_token: Some(rt),
        ..OAuth2::default()
    }
}

fn token_file(dir: &std::path::Path, mechanism: &str, name: &str, token: &str) -> OAuth2 {
    let path = dir.join(name);
    std::fs::write(&path, format!("{token}\n")).unwrap();
    OAuth2 {
        mechanism: some(mechanism),
        token_file: some(path.display()),
        ..OAuth2::default()
    }
}

/// `p` with 20 s SMTP and IMAP timeouts and a 30 s submit deadline: longer than Dovecot's
/// auth failure penalty grows to while probes are refused (see below).
fn past_the_penalty(mut p: ProbeSpec) -> ProbeSpec {
    p.timeout = "20s";
    p.submit_deadline = "30s";
    p
}

fn probe(name: &str, smtp: SmtpMode, imap: ImapMode, user: &str) -> ProbeSpec {
    let mut p = ProbeSpec::new(name, smtp, imap, user);
    p.cleanup = true;
    p
}

async fn servers(idp: &Idp, users: &[&str]) -> std::sync::Arc<Servers> {
    let mut setup = Setup::users(users);
    setup.oauth2_introspection = Some(idp.introspection_url());
    crate::common::blocking(move || Servers::start(setup)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canaries_go_through_with_oauth2_on_both_legs_for_every_source_and_mechanism() {
    let idp = Idp::start(LIFETIME).await;
    let users = ["ccx", "ccb", "rtx", "rtb", "filex"];
    let servers = servers(&idp, &users).await;
    let files = tempfile::tempdir().unwrap();
    use ImapMode::*;
    use SmtpMode::*;

    let mut probes = Vec::new();
    let mut p = probe("cc-xoauth2", Submission587, Tls993, "ccx");
    p.smtp_oauth2 = Some(client_credentials(&idp, "xoauth2", "ccx"));
    p.imap_oauth2 = p.smtp_oauth2.clone();
    probes.push(p);
    let mut p = probe("cc-oauthbearer", Submissions465, StartTls143, "ccb");
    p.smtp_oauth2 = Some(client_credentials(&idp, "oauthbearer", "ccb"));
    p.imap_oauth2 = p.smtp_oauth2.clone();
    probes.push(p);
    let mut p = probe("rt-xoauth2", Submissions465, Tls993, "rtx");
    p.smtp_oauth2 = Some(refresh_token(&idp, "xoauth2", "rtx"));
    p.imap_oauth2 = p.smtp_oauth2.clone();
    probes.push(p);
    let mut p = probe("rt-oauthbearer", Submission587, Tls993, "rtb");
    p.smtp_oauth2 = Some(refresh_token(&idp, "oauthbearer", "rtb"));
    p.imap_oauth2 = p.smtp_oauth2.clone();
    probes.push(p);
    // A token file another process keeps fresh: one long-lived token, both mechanisms.
    let long = idp.issue(&address("filex"), Duration::from_secs(3600));
    let mut p = probe("file", Submission587, Tls993, "filex");
    p.smtp_oauth2 = Some(token_file(files.path(), "xoauth2", "smtp-token", &long));
    p.imap_oauth2 = Some(token_file(files.path(), "oauthbearer", "imap-token", &long));
    probes.push(p);

    let names: Vec<String> = probes.iter().map(|p| p.name.clone()).collect();
    let prober = Prober::start(&servers, &probes, true).await;
    // 1 s interval, 3 s tokens renewed at 2.4 s: 8 canaries of each are several renewals.
    let s = until(
        prober.addr(),
        Duration::from_secs(90),
        "8 canaries of every OAuth2 probe",
        |s| names.iter().all(|n| completed(s, n) >= 8.0),
    )
    .await;
    for n in &names {
        assert_eq!(all_failures(&s, n), vec![], "{n}");
    }
    // Every endpoint probe renewed its token across the run (at least 3 grants each of 4
    // probes, SMTP and IMAP having a source each).
    assert!(idp.granted() >= 12, "only {} tokens granted", idp.granted());
    assert!(idp.introspected() > 0);
    prober.stop().await;
}

/// Regression test of a real Dovecot 2.3.19 surprise: its auth failure penalty (per client IP,
/// applied before the token is even checked) grows with every refused token, the same one sent
/// again included. Measured here with three probes failing every second from 127.0.0.1: single
/// logins took 4 s, then 9 s, and with the usual 10 s timeout the refusals turned into
/// `timeout` (and a 3 s token expired while Dovecot held it, failing a healthy probe sharing
/// the address). An earlier session reported Postfix giving up on Dovecot with `454 4.7.0 Temporary
/// authentication failure`: the prober classifies a refusal by Dovecot's error challenge
/// (`334` + JSON), so a 454 after it is still `auth` (src/edges/smtp.rs). This test gives the
/// logins 20 s, room for the largest penalty (15 s), and the healthy drill runs on a Dovecot of
/// its own (next test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dovecot_penalty_grows_yet_revoked_tokens_fail_with_auth_and_revoked_grants_with_token() {
    let idp = Idp::start(LIFETIME).await;
    let users = ["revokedfile", "imaprevoked", "grantrevoked"];
    let servers = servers(&idp, &users).await;
    let files = tempfile::tempdir().unwrap();
    use ImapMode::*;
    use SmtpMode::*;

    // Token files holding a token the IdP already revoked: submit (SMTP) and delivery (IMAP).
    let dead = idp.issue(&address("revokedfile"), Duration::from_secs(3600));
    let dead_imap = idp.issue(&address("imaprevoked"), Duration::from_secs(3600));
    let mut smtp_revoked = probe("smtp-revoked", Submissions465, Tls993, "revokedfile");
    smtp_revoked.smtp_oauth2 = Some(token_file(files.path(), "xoauth2", "dead", &dead));
    let mut imap_revoked = probe("imap-revoked", Plain25, Tls993, "imaprevoked");
    imap_revoked.imap_oauth2 = Some(token_file(
        files.path(),
        "oauthbearer",
        "dead-imap",
        &dead_imap,
    ));
    idp.revoke_tokens();
    // An app registration whose grant is revoked: the token endpoint refuses it (`token`).
    let mut grant_revoked = probe("grant-revoked", Submission587, Tls993, "grantrevoked");
    grant_revoked.smtp_oauth2 = Some(client_credentials(&idp, "xoauth2", "grantrevoked"));
    idp.revoke_grant("app-grantrevoked");

    let text = config_text(
        &servers,
        &[smtp_revoked, imap_revoked, grant_revoked].map(past_the_penalty),
    );
    let prober = Prober::start_text(&text).await;
    let s = until(
        prober.addr(),
        Duration::from_secs(90),
        "the revoked tokens failing with auth, the revoked grant with token",
        |s| {
            failures(s, "smtp-revoked", "submit", "auth") >= 2.0
                && failures(s, "imap-revoked", "delivery", "auth") >= 1.0
                && failures(s, "grant-revoked", "submit", "token") >= 2.0
        },
    )
    .await;
    assert_eq!(completed(&s, "smtp-revoked"), 0.0);
    for (stage, reason, n) in all_failures(&s, "smtp-revoked") {
        assert_eq!(
            (stage.as_str(), reason.as_str()),
            ("submit", "auth"),
            "x{n}"
        );
    }
    for (stage, reason, n) in all_failures(&s, "imap-revoked") {
        assert!(
            stage == "delivery" && (reason == "auth" || reason == "deadline"),
            "{stage}/{reason} x{n}"
        );
    }
    for (stage, reason, n) in all_failures(&s, "grant-revoked") {
        assert_eq!(
            (stage.as_str(), reason.as_str()),
            ("submit", "token"),
            "x{n}"
        );
    }
    let detail = |probe: &str| {
        prober
            .canaries(probe)
            .into_iter()
            .flat_map(|c| c.stages.into_iter().filter_map(|(_, r)| r.failed))
            .map(|f| f.detail)
            .next()
            .expect("a failed canary says why")
    };
    let refused = detail("grant-revoked");
    assert!(refused.contains("invalid_client"), "{refused}");
    let refused = detail("smtp-revoked");
    assert!(refused.contains("XOAUTH2 refused the token"), "{refused}");
    assert!(!refused.contains(&dead), "{refused}");
    prober.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_tokens_are_renewed_and_a_token_endpoint_down_fails_with_token_then_recovers() {
    // Longer than Dovecot's first failure penalties (2 s, 4 s), so a token renewed after a
    // refusal is still alive when Dovecot gets round to checking it.
    let idp = Idp::start(Duration::from_secs(10)).await;
    let servers = servers(&idp, &["drill"]).await;
    use ImapMode::*;
    use SmtpMode::*;
    let mut drill = probe("drill", Submission587, Tls993, "drill");
    drill.smtp_oauth2 = Some(client_credentials(&idp, "xoauth2", "drill"));
    drill.imap_oauth2 = drill.smtp_oauth2.clone();
    let prober = Prober::start(&servers, &[drill], true).await;
    let s = until(
        prober.addr(),
        Duration::from_secs(60),
        "the drill completing",
        |s| completed(s, "drill") >= 2.0,
    )
    .await;
    assert_eq!(all_failures(&s, "drill"), vec![]);

    // Every token revoked while it runs: the next AUTH is refused (`auth`), the prober drops
    // that token and the canary after gets a new one.
    idp.revoke_tokens();
    let before = completed(&s, "drill");
    let s = until(
        prober.addr(),
        Duration::from_secs(60),
        "the drill completing again after its tokens were revoked",
        |s| completed(s, "drill") >= before + 3.0,
    )
    .await;
    for (stage, reason, n) in all_failures(&s, "drill") {
        assert!(
            reason == "auth" && (stage == "submit" || stage == "delivery"),
            "after revocation: {stage}/{reason} x{n}"
        );
        assert!(
            n <= 2.0,
            "a refused token is renewed at once, yet {stage}/{reason} x{n}"
        );
    }

    // The token endpoint down: once the cached token is due, submissions fail with `token`.
    idp.set_down(true).await;
    let s = until(
        prober.addr(),
        Duration::from_secs(60),
        "submit failing with token while the endpoint is down",
        |s| failures(s, "drill", "submit", "token") >= 2.0,
    )
    .await;
    let down_completed = completed(&s, "drill");
    let detail = prober
        .canaries("drill")
        .into_iter()
        .flat_map(|c| c.stages.into_iter().filter_map(|(_, r)| r.failed))
        .map(|f| f.detail)
        .find(|d| d.contains("oauth2 token"))
        .expect("a failed canary says why");
    assert!(detail.contains(&idp.token_url()), "{detail}");

    // Back: canaries go through again, same prober, no restart.
    idp.set_down(false).await;
    until(
        prober.addr(),
        Duration::from_secs(60),
        "the drill completing after the endpoint came back",
        |s| completed(s, "drill") >= down_completed + 3.0,
    )
    .await;
    let s = scrape(prober.addr()).await;
    assert!(failures(&s, "drill", "submit", "token") >= 2.0);
    prober.stop().await;
}

/// No access token, client secret or refresh token in the prober's log (JSON, debug level),
/// /metrics, /api/v1/status or the dashboard page, with the error paths forced: a token the
/// server refuses (`auth`, Dovecot's error challenge echoed back), a revoked grant and a token
/// endpoint down (`token`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_client_secret_or_refresh_token_in_logs_metrics_status_or_page() {
    use std::process::{Command, Stdio};
    // Longer than Dovecot's penalty for the refused probe's failures (same client IP), so the
    // healthy probe's tokens outlive the delay.
    let idp = Idp::start(Duration::from_secs(30)).await;
    let servers = servers(&idp, &["ok", "refused", "granted"]).await;
    let files = tempfile::tempdir().unwrap();
    use ImapMode::*;
    use SmtpMode::*;
    let mut ok = probe("ok", Submission587, Tls993, "ok");
    ok.smtp_oauth2 = Some(refresh_token(&idp, "oauthbearer", "ok"));
    ok.imap_oauth2 = Some(client_credentials(&idp, "xoauth2", "ok"));
    let dead = idp.issue(&address("refused"), Duration::from_secs(3600));
    let mut refused = probe("refused", Submissions465, Tls993, "refused");
    refused.smtp_oauth2 = Some(token_file(files.path(), "xoauth2", "dead", &dead));
    refused.imap_oauth2 = refused.smtp_oauth2.clone();
    let mut granted = probe("granted", Submission587, Tls993, "granted");
    granted.smtp_oauth2 = Some(client_credentials(&idp, "xoauth2", "granted"));
    idp.revoke_tokens();
    idp.revoke_grant("app-granted");
    let text = config_text(&servers, &[ok, refused, granted].map(past_the_penalty));
    let cfg = files.path().join("p.toml");
    std::fs::write(&cfg, &text).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = files.path().join("stderr.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_mailcanary"))
        .args(["--log-format", "json", "run", "--config"])
        .arg(&cfg)
        .arg("--state-dir")
        .arg(files.path().join("state"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("MAILCANARY_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the prober never listened"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    until(
        addr,
        Duration::from_secs(60),
        "every error path taken",
        |s| {
            completed(s, "ok") >= 2.0
                && failures(s, "refused", "submit", "auth") >= 1.0
                && failures(s, "granted", "submit", "token") >= 1.0
        },
    )
    .await;
    idp.set_down(true).await;
    until(
        addr,
        Duration::from_secs(60),
        "the endpoint down seen",
        |s| failures(s, "ok", "submit", "token") >= 1.0,
    )
    .await;
    let mut seen = String::new();
    for path in ["/metrics", "/api/v1/status", "/"] {
        let url = format!("http://{addr}{path}");
        seen.push_str(&reqwest::get(&url).await.unwrap().text().await.unwrap());
    }
    child.kill().unwrap();
    child.wait().unwrap();
    seen.push_str(&std::fs::read_to_string(&log).unwrap());
    assert!(seen.contains("oauth2 token"), "the token errors were shown");
    let mut secrets = idp.issued();
    assert!(secrets.len() >= 3, "{secrets:?}");
    for user in ["ok", "granted"] {
        secrets.push(format!("cs-{user}-s3cr3t"));
    }
    secrets.push("gcs-ok-s3cr3t".into());
    secrets.push("1//rt-ok-s3cr3t".into());
    for secret in &secrets {
        assert!(!seen.contains(secret.as_str()), "secret {secret} leaked");
    }
}

/// An identity provider behind a private CA (a company's own Keycloak or AD FS): the token
/// endpoint's `ca_file` trusts it, and without one the refused certificate fails the canary
/// with `token` before any login is tried. The test's IdP sits behind a real TLS front with
/// the harness CA's `localhost`/`127.0.0.1` leaf.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_endpoint_behind_a_private_ca_is_trusted_through_its_ca_file() {
    let idp = Idp::start(Duration::from_secs(600)).await;
    let servers = servers(&idp, &["corp", "stranger"]).await;
    let tls = servers.dir.join("tls");
    let front = TlsFront::start(
        idp.token_addr(),
        &tls.join("server.pem"),
        &tls.join("server.key"),
    )
    .await;
    let https = format!("{}/token", front.url());
    use ImapMode::*;
    use SmtpMode::*;

    let mut trusted = probe("private-idp", Submission587, Tls993, "corp");
    let mut o = client_credentials(&idp, "xoauth2", "corp");
    o.token_endpoint = Some(https.clone());
    o.ca_file = Some(servers.ca_file().display().to_string());
    trusted.smtp_oauth2 = Some(o.clone());
    trusted.imap_oauth2 = Some(o);
    let mut untrusted = probe("untrusted-idp", Submission587, Tls993, "stranger");
    let mut o = client_credentials(&idp, "xoauth2", "stranger");
    o.token_endpoint = Some(https);
    untrusted.smtp_oauth2 = Some(o.clone());
    untrusted.imap_oauth2 = Some(o);

    let prober = Prober::start(&servers, &[trusted, untrusted], true).await;
    let s = until(
        prober.addr(),
        Duration::from_secs(60),
        "3 canaries through the private IdP, a token failure without its CA",
        |s| {
            completed(s, "private-idp") >= 3.0
                && failures(s, "untrusted-idp", "submit", "token") >= 1.0
        },
    )
    .await;
    assert_eq!(all_failures(&s, "private-idp"), vec![]);
    assert_eq!(completed(&s, "untrusted-idp"), 0.0);
    let (done, refused) = front.handshakes();
    assert!(
        done >= 1 && refused >= 1,
        "handshakes: {done} done, {refused} refused"
    );
    prober.stop().await;
}
