//! Behind a company's egress proxy: the helpdesk API (like the OAuth2 token endpoints and the
//! heartbeat, every HTTP client of the prober) goes through `HTTPS_PROXY` as curl reads it,
//! credentials in its userinfo included, and those credentials appear in no log line, metric
//! or page. A wrong password is a failing import, not a silent direct connection. The real
//! binary runs with the variables set (they would leak into every test of an in-process
//! daemon); the proxy is a real CONNECT tunnel (`tests/support/connect_proxy.rs`) to the
//! sandbox's API behind a TLS front.

use std::{process::Stdio, time::Duration};

use base64::Engine as _;

use crate::{
    common::*,
    connect_proxy::ConnectProxy,
    private_ca::{behind_a_front, behind_tls_file},
};

const USER: &str = "canary-egress";
const PASSWORD: &str = "pr0xy-s3cret-9f2c";

/// `mailcanary run` on `config` with `proxy` as HTTPS_PROXY (and no NO_PROXY), JSON logs at
/// debug into `log`.
fn spawn(
    config: &std::path::Path,
    state: &std::path::Path,
    port: u16,
    proxy: &str,
    log: &std::path::Path,
) -> KillOnDrop {
    KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_mailcanary"))
            .args(["--log-format", "json", "run", "--config"])
            .arg(config)
            .arg("--state-dir")
            .arg(state)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("MAILCANARY_LOG", "debug")
            .env("HTTPS_PROXY", proxy)
            .env_remove("https_proxy")
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .expect("spawn mailcanary run"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_helpdesk_api_goes_through_https_proxy_and_its_password_is_never_shown() {
    let (sb, dir, front) = behind_a_front().await;
    let proxy = ConnectProxy::start(Some((USER, PASSWORD))).await;
    let ca = dir.path().join("ca.pem").display().to_string();
    let file = behind_tls_file(&sb, &front.url(), Some(ca));
    let config = dir.path().join("p.toml");
    std::fs::write(&config, file.render()).unwrap();
    let target = format!("127.0.0.1:{}", front.addr.port());

    // A wrong password: the proxy answers 407, and import fails (never a direct connection).
    let (port, log) = (free_port(), dir.path().join("wrong.log"));
    let url = format!("http://{USER}:wrong-{PASSWORD}@{}", proxy.addr);
    let child = spawn(&config, &dir.path().join("state"), port, &url, &log);
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let s = until_up(
        addr,
        Duration::from_secs(30),
        "import failing through the proxy",
        |s| {
            v(
                s,
                "mailcanary_stage_failures_total",
                &[("stage", "import"), ("reason", "connect")],
            ) >= 1.0
        },
    )
    .await;
    assert_eq!(v(&s, "mailcanary_canaries_completed_total", &[]), 0.0);
    assert!(proxy.refused() >= 1);
    assert!(proxy.tunnels().is_empty());
    let mut seen = String::new();
    for path in ["/metrics", "/api/v1/status", "/"] {
        seen.push_str(&get_text(&format!("http://{addr}{path}")).await);
    }
    drop(child);
    let wrong = std::fs::read_to_string(&log).unwrap();
    assert!(
        wrong.contains("proxy authorization required"),
        "the log says why the import fails"
    );
    seen.push_str(&wrong);

    // The right one: canaries complete, every API call tunnelled to the front.
    let (port, log) = (free_port(), dir.path().join("right.log"));
    let url = format!("http://{USER}:{PASSWORD}@{}", proxy.addr);
    let child = spawn(&config, &dir.path().join("state"), port, &url, &log);
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    until_up(
        addr,
        Duration::from_secs(30),
        "2 canaries through the proxy",
        |s| v(s, "mailcanary_canaries_completed_total", &[]) >= 2.0,
    )
    .await;
    let tunnels = proxy.tunnels();
    assert!(!tunnels.is_empty());
    assert!(tunnels.iter().all(|t| *t == target), "{tunnels:?}");
    for path in ["/metrics", "/api/v1/status", "/"] {
        seen.push_str(&get_text(&format!("http://{addr}{path}")).await);
    }
    drop(child);
    seen.push_str(&std::fs::read_to_string(&log).unwrap());
    assert!(seen.contains("import"), "the logs and pages were read");
    assert!(!seen.contains(PASSWORD), "the proxy password was shown");
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    assert!(
        !seen.contains(&basic),
        "the proxy credentials were shown encoded"
    );
}
