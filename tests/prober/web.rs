//! `--web.config.file` (exporter-toolkit format): TLS, mTLS and basic auth checked with curl,
//! the reload on SIGHUP with the real binary, and a slow client dropped.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mailcanary::daemon::{Daemon, Options};
use mailcanary::web::exposure::Surface;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

/// curl's HTTP status for `url` (0 when no HTTP answer came: refused handshake, closed).
fn curl(dir: &Path, url: &str, extra: &[&str]) -> u16 {
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "20",
        ])
        .args(["--cacert", "ca.pem"])
        .args(extra)
        .arg(url)
        .current_dir(dir)
        .output()
        .expect("curl runs");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

fn curl_body(dir: &Path, url: &str, extra: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "20", "--cacert", "ca.pem"])
        .args(extra)
        .arg(url)
        .current_dir(dir)
        .output()
        .expect("curl runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn web_config(users: &[(&str, &str)], tls_extra: &str) -> String {
    let mut s = format!(
        "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n{tls_extra}basic_auth_users:\n"
    );
    for (user, password) in users {
        let hash = bcrypt::hash(password, 4).unwrap();
        s.push_str(&format!("  {user}: {hash}\n"));
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_basic_auth_and_client_certificates_guard_the_web_surface() {
    let sb = sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_certs(d);
    let web = d.join("web.yml");
    std::fs::write(&web, web_config(&[("alice", "s3cret")], "")).unwrap();
    let surface = Arc::new(Surface::new(Some(web.clone())).expect("web config loads"));
    let _ = rustls::crypto::ring::default_provider().install_default();
    let daemon = Daemon::start_with(
        &config(&sb, &Knobs::default()),
        Options {
            state_dir: d.join("state"),
            listen: ([127, 0, 0, 1], 0).into(),
            schedule: true,
        },
        surface.clone(),
    )
    .await
    .expect("daemon starts");
    let base = format!("https://127.0.0.1:{}", daemon.addr.port());
    let metrics = format!("{base}/metrics");
    assert_eq!(curl(d, &metrics, &[]), 401, "no credentials");
    assert_eq!(
        curl(d, &metrics, &["-u", "alice:wrong"]),
        401,
        "wrong password"
    );
    assert_eq!(
        curl(d, &metrics, &["-u", "mallory:s3cret"]),
        401,
        "unknown user"
    );
    assert_eq!(curl(d, &metrics, &["-u", "alice:s3cret"]), 200);
    // Again: the cached verification answers the same.
    let body = curl_body(d, &metrics, &["-u", "alice:s3cret"]);
    assert!(body.contains("mailcanary_build_info"), "{body:.200}");
    assert_eq!(
        curl(d, &format!("{base}/"), &[]),
        401,
        "the dashboard is guarded"
    );
    assert_eq!(curl(d, &format!("{base}/api/v1/status"), &[]), 401);
    // The kubelet's probes need no password (TLS still applies).
    assert_eq!(curl(d, &format!("{base}/healthz"), &[]), 200);
    // Plain HTTP on the TLS port gets no answer.
    let plain = format!("http://127.0.0.1:{}/healthz", daemon.addr.port());
    assert_ne!(curl(d, &plain, &[]), 200);

    // Client certificates required: refused without one, served with one.
    std::fs::write(
        &web,
        web_config(
            &[("alice", "s3cret")],
            "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.pem\n",
        ),
    )
    .unwrap();
    surface.reload().expect("the mTLS config loads");
    assert_eq!(
        curl(d, &metrics, &["-u", "alice:s3cret"]),
        0,
        "no client cert"
    );
    let with_cert = ["--cert", "client.pem", "--key", "client.key"];
    assert_eq!(
        curl(
            d,
            &metrics,
            &[&with_cert[..], &["-u", "alice:s3cret"]].concat()
        ),
        200
    );
    // A certificate the CA did not sign is refused like none.
    self_signed(d, "self", "self");
    assert_eq!(
        curl(
            d,
            &metrics,
            &[
                "--cert",
                "self.pem",
                "--key",
                "self.key",
                "-u",
                "alice:s3cret"
            ]
        ),
        0,
        "a client certificate the CA did not sign"
    );

    // A broken file is refused with its line and key, and the one in use stays.
    std::fs::write(
        &web,
        "tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n  client_auth_type: Sometimes\n",
    )
    .unwrap();
    let err = surface
        .reload()
        .expect_err("a bad client_auth_type is refused");
    let msg = err.to_string();
    assert!(
        msg.contains("web.yml:4:") && msg.contains("tls_server_config.client_auth_type"),
        "{msg}"
    );
    assert_eq!(
        curl(
            d,
            &metrics,
            &[&with_cert[..], &["-u", "alice:s3cret"]].concat()
        ),
        200
    );
    daemon.stop().await;
    sb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_web_config_and_keeps_it_when_the_new_one_is_bad() {
    let sb = sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_certs(d);
    let conf = d.join("drill.toml");
    std::fs::write(&conf, config_text(&sb, &Knobs::default())).unwrap();
    let web = d.join("web.yml");
    std::fs::write(&web, web_config(&[("alice", "one")], "")).unwrap();
    let port = free_port();
    let log = d.join("stderr.log");
    let child = KillOnDrop(
        bin()
            .args(["run", "--config"])
            .arg(&conf)
            .arg("--state-dir")
            .arg(d.join("state"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--web.config.file")
            .arg(&web)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let metrics = format!("https://127.0.0.1:{port}/metrics");
    let wait = |what: &str, cond: &dyn Fn() -> bool| {
        let t0 = Instant::now();
        while !cond() {
            assert!(t0.elapsed() < Duration::from_secs(30), "waiting for {what}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait("alice let in", &|| {
        curl(d, &metrics, &["-u", "alice:one"]) == 200
    });

    std::fs::write(&web, web_config(&[("bob", "two")], "")).unwrap();
    child.signal("HUP");
    wait("bob let in after SIGHUP", &|| {
        curl(d, &metrics, &["-u", "bob:two"]) == 200
    });
    assert_eq!(curl(d, &metrics, &["-u", "alice:one"]), 401);

    std::fs::write(&web, "basic_auth_users:\n  bob: not-a-hash\n").unwrap();
    child.signal("HUP");
    wait("the refusal logged", &|| {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("basic_auth_users.bob")
    });
    assert_eq!(
        curl(d, &metrics, &["-u", "bob:two"]),
        200,
        "the old config stays"
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("web.yml:2:"), "{logged}");
    drop(child);
    sb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_dropped_after_the_header_timeout() {
    let sb = sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let daemon = daemon(&config(&sb, &Knobs::default()), dir.path()).await;
    let mut held = Vec::new();
    // One sends half a request and stops; one sends nothing at all; one sends a whole
    // request, keeps the connection alive and then sends nothing more.
    for first in [
        &b"GET /metrics HTTP/1.1\r\nHost: x\r\n"[..],
        b"",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let mut s = tokio::net::TcpStream::connect(daemon.addr).await.unwrap();
        s.write_all(first).await.unwrap();
        held.push(s);
    }
    let t0 = Instant::now();
    for mut s in held {
        let mut buf = [0u8; 512];
        // Closed: EOF (or a 408 and then EOF), never a connection kept open past the bound.
        let closed = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "a slow client still held its connection after 60 s"
        );
    }
    // The header timeout is 10 s: not dropped at once either.
    assert!(t0.elapsed() >= Duration::from_secs(5), "{:?}", t0.elapsed());
    daemon.stop().await;
    sb.shutdown().await;
}
