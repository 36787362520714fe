//! The dead man's switch: a probe's `heartbeat_url` is pinged after each on-time canary and at
//! `/fail` once when the probe starts failing, against a local HTTP server standing in for
//! healthchecks.io; a dead endpoint is counted and never holds a canary up; the URL (a secret)
//! shows nowhere.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use mailcanary::{
    config,
    sandbox::{Fault, Stage},
};

use crate::common::*;

const COMPLETED: &str = "mailcanary_canaries_completed_total";
const SECRET_PATH: &str = "ping/0c1e7f0a-heartbeat-secret";

/// A heartbeat endpoint that records the paths it was asked for.
async fn endpoint() -> (String, Arc<Mutex<Vec<String>>>) {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let app = {
        let seen = seen.clone();
        axum::Router::new().fallback(move |uri: axum::http::Uri| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(uri.path().to_string());
                "OK"
            }
        })
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/{SECRET_PATH}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, seen)
}

/// The drill config of `sb` pinging `url` after each on-time canary.
fn with_heartbeat(sb: &mailcanary::sandbox::Sandbox, url: &str) -> String {
    let mut file = config_file(sb, &Knobs::default());
    file.probe_mut(PROBE).heartbeat_url = some(url);
    file.render()
}

async fn wait_for(seen: &Arc<Mutex<Vec<String>>>, what: &str, cond: impl Fn(&[String]) -> bool) {
    for _ in 0..300 {
        if cond(&seen.lock().unwrap()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: pings {:?}", seen.lock().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_pings_on_time_canaries_and_fails_once_when_the_probe_fails() {
    let sb = sandbox().await;
    let (url, seen) = endpoint().await;
    let text = with_heartbeat(&sb, &url);
    let cfg = config::parse_str(&text, "hb.toml").unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(&cfg, dir.path()).await;
    let ok = format!("/{SECRET_PATH}");
    let fail = format!("/{SECRET_PATH}/fail");
    wait_for(&seen, "two success pings", |p| {
        p.iter().filter(|x| **x == ok).count() >= 2
    })
    .await;
    assert!(!seen.lock().unwrap().contains(&fail), "no failure yet");

    // The import stalls: one /fail, however many canaries pass their deadline meanwhile.
    sb.faults().set(Stage::Import, Fault::Stall);
    wait_for(&seen, "a fail ping", |p| p.contains(&fail)).await;
    until(
        d.addr,
        Duration::from_secs(20),
        "more deadlines missed",
        |s| {
            v(
                s,
                "mailcanary_stage_failures_total",
                &[("stage", "import"), ("reason", "deadline")],
            ) >= 3.0
        },
    )
    .await;
    let fails = seen.lock().unwrap().iter().filter(|x| **x == fail).count();
    assert_eq!(
        fails,
        1,
        "a failure is told once: {:?}",
        seen.lock().unwrap()
    );

    // Back: success pings resume.
    let before = seen.lock().unwrap().len();
    sb.faults().set(Stage::Import, Fault::Ok);
    wait_for(&seen, "success pings after the stall", |p| {
        p[before..].contains(&ok)
    })
    .await;

    // The URL is a secret: not in the metrics, the status or the dashboard.
    for path in ["/metrics", "/api/v1/status", "/"] {
        let body = get_text(&format!("http://{}{path}", d.addr)).await;
        assert!(
            !body.contains("heartbeat-secret"),
            "{path} shows the heartbeat URL"
        );
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_heartbeat_endpoint_is_counted_and_holds_no_canary_up() {
    let sb = sandbox().await;
    let url = format!("http://127.0.0.1:{}/{SECRET_PATH}", free_port());
    let text = with_heartbeat(&sb, &url);
    let cfg = config::parse_str(&text, "hb.toml").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(&cfg, dir.path()).await;
    let s = until(
        d.addr,
        Duration::from_secs(30),
        "pings fail, canaries go on",
        |s| v(s, "mailcanary_heartbeat_errors_total", &[]) >= 2.0 && v(s, COMPLETED, &[]) >= 3.0,
    )
    .await;
    assert_eq!(
        v(&s, "mailcanary_probe_success", &[]),
        1.0,
        "the probe itself is fine"
    );
    d.stop().await;
}

#[test]
fn a_heartbeat_url_must_be_http_and_is_never_quoted_in_the_error() {
    let base = "[[probe]]\nname = \"p\"\nkind = \"mail_loop\"\nheartbeat_url = \"URL\"\n\n[probe.smtp]\nhost = \"h\"\nfrom = \"a@b.test\"\nto = \"c@d.test\"\n\n[probe.imap]\nhost = \"h\"\nusername = \"u\"\npassword = \"p\"\n";
    let e = config::parse_str(
        &base.replace("URL", "ftp://hc-ping.com/s3cret-uuid"),
        "p.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("probe[0].heartbeat_url"), "{e}");
    assert!(!e.contains("s3cret-uuid"), "the URL is a secret: {e}");
    assert!(
        config::parse_str(
            &base.replace("URL", "https://hc-ping.com/s3cret-uuid"),
            "p.toml"
        )
        .is_ok()
    );
}

/// A self-hosted Healthchecks behind a private CA: `heartbeat_ca_file` trusts it, and the
/// pings go over TLS (through a real TLS front) with no error counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_endpoint_behind_a_private_ca_is_pinged_through_its_ca_file() {
    let sb = sandbox().await;
    let (url, seen) = endpoint().await;
    let upstream: std::net::SocketAddr = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let front = crate::tls_front::TlsFront::start(
        upstream,
        &certs.path().join("server.pem"),
        &certs.path().join("server.key"),
    )
    .await;
    let mut file = config_file(&sb, &Knobs::default());
    let p = file.probe_mut(PROBE);
    p.heartbeat_url = Some(format!("{}/{SECRET_PATH}", front.url()));
    p.heartbeat_ca_file = Some(certs.path().join("ca.pem").display().to_string());
    let cfg = config::parse_str(&file.render(), "hb.toml").unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(&cfg, dir.path()).await;
    let ok = format!("/{SECRET_PATH}");
    wait_for(&seen, "two success pings over TLS", |p| {
        p.iter().filter(|x| **x == ok).count() >= 2
    })
    .await;
    assert!(front.handshakes().0 >= 1);
    let s = scrape(d.addr).await;
    assert_eq!(v(&s, "mailcanary_heartbeat_errors_total", &[]), 0.0);
    d.stop().await;
}
