//! The issue-16 drills on the real mail-auth path (`mailauth.rs`: Postfix signing with
//! opendkim, the MX checking with policyd-spf, opendkim and opendmarc, unbound serving the
//! records): the verdicts pass; a rotated DKIM key fails dkim and the probe that requires it
//! fails with `auth_result` (the prober's own check, against the same DNS, says fail too);
//! the SPF record removed is `spf=none`, failing the probe that requires spf; a plaintext hop
//! fails the probe with `require_tls_hops` with `tls`.

use std::time::Duration;

use mailcanary::metrics::testing::Samples;

use crate::{
    common::{ImapMode, ProbeSpec, Prober, SmtpMode, completed, config_file, failures, until, v},
    harness::mailauth::AUTHSERV_ID,
    harness::{Servers, Setup},
};

fn auth(s: &Samples, probe: &str, method: &str, result: &str) -> f64 {
    v(
        s,
        probe,
        "mailcanary_delivery_auth_total",
        &[("method", method), ("result", result)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drills_rotated_key_removed_spf_and_plaintext_hop_fail_with_the_right_reason() {
    let mut setup = Setup::users(&["authbox", "hopbox"]);
    setup.mail_auth = true;
    let servers = Servers::start(setup);
    let dns = servers.mail_auth().resolver();
    let mut a = ProbeSpec::new("auth", SmtpMode::Submission587, ImapMode::Tls993, "authbox");
    a.interval = "2s";
    let mut h = ProbeSpec::new("hops", SmtpMode::Submission587, ImapMode::Tls993, "hopbox");
    h.interval = "2s";
    let mut file = config_file(&servers, &[a, h]);
    let strict = file.probe_mut("auth");
    strict.require_auth = ["dkim", "spf", "dmarc"].map(String::from).to_vec();
    strict.trusted_authserv_ids = vec![AUTHSERV_ID.to_string()];
    strict.verify_dkim = Some(true);
    strict.dns_resolver = Some(dns.to_string());
    let hops = file.probe_mut("hops");
    hops.require_tls_hops = Some(true);
    hops.trusted_authserv_ids = vec![AUTHSERV_ID.to_string()];
    let text = file.render();
    let prober = Prober::start_text(&text).await;
    let addr = prober.addr();

    // 1. Everything passes.
    let s = until(
        addr,
        Duration::from_secs(90),
        "canaries through with every verdict pass",
        |s| completed(s, "auth") >= 1.0 && completed(s, "hops") >= 1.0,
    )
    .await;
    for m in ["dkim", "spf", "dmarc"] {
        assert!(auth(&s, "auth", m, "pass") >= 1.0, "{m}");
        assert_eq!(auth(&s, "auth", m, "fail"), 0.0, "{m}");
    }
    assert!(
        v(
            &s,
            "auth",
            "mailcanary_delivery_verified_total",
            &[("method", "dkim"), ("result", "pass")]
        ) >= 1.0,
        "the prober's own DKIM check passes"
    );
    assert_eq!(failures(&s, "auth", "delivery", "auth_result"), 0.0);
    assert!(
        v(
            &s,
            "hops",
            "mailcanary_delivery_tls_total",
            &[("result", "all_hops")]
        ) >= 1.0
    );
    assert!(
        v(
            &s,
            "hops",
            "mailcanary_hop_duration_seconds_count",
            &[("hop", "3")]
        ) >= 1.0,
        "three hops"
    );

    // 2. The DKIM key rotated in DNS: dkim=fail, the probe fails with auth_result.
    servers.mail_auth().rotate_dkim_key();
    let s = until(
        addr,
        Duration::from_secs(90),
        "dkim fail and auth_result",
        |s| {
            auth(s, "auth", "dkim", "fail") >= 1.0
                && failures(s, "auth", "delivery", "auth_result") >= 1.0
        },
    )
    .await;
    assert!(
        v(
            &s,
            "auth",
            "mailcanary_delivery_verified_total",
            &[("method", "dkim"), ("result", "fail")]
        ) >= 1.0,
        "the prober's own check sees the rotated key too"
    );
    assert_eq!(v(&s, "auth", "mailcanary_probe_success", &[]), 0.0);
    assert_eq!(
        failures(&s, "hops", "delivery", "auth_result"),
        0.0,
        "hops requires no verdict"
    );
    servers.mail_auth().restore_dkim_key();

    // 3. The SPF record removed: spf=none, still failing with auth_result.
    let before = failures(&s, "auth", "delivery", "auth_result");
    servers.mail_auth().remove_spf();
    let s = until(
        addr,
        Duration::from_secs(90),
        "spf none and another auth_result",
        |s| {
            auth(s, "auth", "spf", "none") >= 1.0
                && failures(s, "auth", "delivery", "auth_result") > before
        },
    )
    .await;
    assert_eq!(auth(&s, "auth", "spf", "fail"), 0.0);

    // 4. A plaintext hop between the relay and the MX: the tls probe fails with tls.
    servers.set_plaintext_hop(true);
    let s = until(
        addr,
        Duration::from_secs(90),
        "a plaintext hop failing with tls",
        |s| failures(s, "hops", "delivery", "tls") >= 1.0,
    )
    .await;
    assert!(
        v(
            &s,
            "hops",
            "mailcanary_delivery_tls_total",
            &[("result", "some_plaintext")]
        ) >= 1.0
    );
    let url = format!("http://{addr}/api/v1/status");
    let status = reqwest::get(&url).await.unwrap().text().await.unwrap();
    assert!(status.contains("was not TLS"), "the detail names the hop");
    assert!(
        status.contains("required authentication not passed"),
        "{status}"
    );
    prober.stop().await;
}
