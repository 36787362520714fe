//! A self-hosted helpdesk behind a private CA (a company's own RT, Zammad or django-helpdesk
//! at `https://helpdesk.corp`): `[probe.helpdesk] ca_file` trusts it beside the web PKI roots,
//! and without it the refused certificate is blamed as `tls` on import, with rustls's words in
//! the canary's record, not as an unreachable server. The sandbox's API sits behind a real TLS
//! front (rustls, a CA and a leaf made by openssl).

use std::time::Duration;

use mailcanary::config;

use crate::{common::*, tls_front::TlsFront};

const COMPLETED: &str = "mailcanary_canaries_completed_total";

/// The drill config file with the helpdesk at `base_url`, trusting `ca_file` if given.
pub fn behind_tls_file(
    sb: &mailcanary::sandbox::Sandbox,
    base_url: &str,
    ca_file: Option<String>,
) -> crate::probe_config::ConfigFile {
    let mut file = config_file(sb, &Knobs::default());
    let hd = file.probes[0].helpdesk_mut();
    hd.base_url = base_url.into();
    hd.ca_file = ca_file;
    file
}

/// [`behind_tls_file`], parsed.
fn behind_tls(
    sb: &mailcanary::sandbox::Sandbox,
    base_url: &str,
    ca_file: Option<String>,
) -> config::Config {
    let text = behind_tls_file(sb, base_url, ca_file).render();
    config::parse_str(&text, "private-ca.toml").unwrap_or_else(|e| panic!("{e}"))
}

/// A sandbox, a test CA with a 127.0.0.1 leaf (in the returned dir), and a TLS front for the
/// sandbox's API with that leaf.
pub async fn behind_a_front() -> (mailcanary::sandbox::Sandbox, tempfile::TempDir, TlsFront) {
    let sb = sandbox().await;
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let front = TlsFront::start(
        sb.http_addr,
        &certs.path().join("server.pem"),
        &certs.path().join("server.key"),
    )
    .await;
    (sb, certs, front)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_helpdesk_behind_a_private_ca_is_probed_through_its_ca_file() {
    let (sb, certs, front) = behind_a_front().await;
    let ca = certs.path().join("ca.pem").display().to_string();
    let cfg = behind_tls(&sb, &front.url(), Some(ca));
    let state = tempfile::tempdir().unwrap();
    let d = daemon(&cfg, state.path()).await;
    let s = until(d.addr, Duration::from_secs(30), "2 canaries", |s| {
        v(s, COMPLETED, &[]) >= 2.0
    })
    .await;
    no_failures(&s);
    let (done, refused) = front.handshakes();
    assert!(done >= 1, "the API was reached over TLS");
    assert_eq!(refused, 0);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_without_its_ca_file_is_blamed_as_tls_on_import() {
    let (sb, _certs, front) = behind_a_front().await;
    let cfg = behind_tls(&sb, &front.url(), None);
    let state = tempfile::tempdir().unwrap();
    let d = daemon(&cfg, state.path()).await;
    let s = until(
        d.addr,
        Duration::from_secs(30),
        "a tls failure on import",
        |s| {
            v(
                s,
                "mailcanary_stage_failures_total",
                &[("stage", "import"), ("reason", "tls")],
            ) >= 1.0
        },
    )
    .await;
    assert_eq!(
        v(
            &s,
            "mailcanary_stage_failures_total",
            &[("stage", "import"), ("reason", "connect")]
        ),
        0.0,
        "a refused certificate is not an unreachable server"
    );
    assert_eq!(v(&s, "mailcanary_probe_success", &[]), 0.0);
    let status = status(d.addr.port()).await.expect("status").to_string();
    assert!(
        status.contains("invalid peer certificate"),
        "rustls's reason is in the canary's record: {status}"
    );
    assert!(
        front.handshakes().1 >= 1,
        "the prober refused the handshake"
    );
    d.stop().await;
}
