//! A canary's way through real Postfix and Dovecot (issue 16): the `Received` chain of the
//! delivered mail read into hops, shown in /metrics, the status JSON and `once`; a canary
//! submitted on port 25 without TLS crosses a plaintext hop, which fails delivery with `tls`
//! when the probe says `require_tls_hops`.

use std::{path::Path, time::Duration};

use crate::{
    common::{
        ImapMode, ProbeSpec, Prober, SmtpMode, completed, config_file, config_text, failures,
        until, v,
    },
    harness::{Servers, Setup},
};

/// Every file under `dir` (Maildir messages), depth first.
fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            files(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// The header block's `Received` fields, verbatim.
fn received_chain(raw: &str) -> String {
    let head = raw.split("\r\n\r\n").next().unwrap_or(raw);
    let head = head.split("\n\n").next().unwrap_or(head);
    let mut out = String::new();
    let mut inside = false;
    for line in head.lines() {
        if line.starts_with(' ') || line.starts_with('\t') {
            if inside {
                out.push_str(line);
                out.push('\n');
            }
            continue;
        }
        inside = line.to_ascii_lowercase().starts_with("received:");
        if inside {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hops_of_a_canary_through_postfix_and_dovecot_are_in_metrics_status_and_once() {
    let mut tls = ProbeSpec::new("tls", SmtpMode::Submission587, ImapMode::Tls993, "tlsbox");
    tls.cleanup = false;
    tls.interval = "2s";
    let mut plain = ProbeSpec::new("plain", SmtpMode::Plain25, ImapMode::Tls993, "plainbox");
    plain.interval = "2s";
    let servers = Servers::start(Setup::users(&["tlsbox", "plainbox"]));
    // Postfix names the TLS version and cipher in its Received header only when asked
    // (without it, ESMTPSA alone says TLS: see hops::tests).
    servers.postconf_reload(&["smtpd_tls_received_header=yes"]);
    // The tls probe verifies DKIM itself, against a resolver that never answers: this
    // harness signs nothing, so its verdict is none without a query, and the delivery goes
    // through the spawned check.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut file = config_file(&servers, &[tls.clone(), plain.clone()]);
    file.probe_mut("plain").require_tls_hops = Some(true);
    let t = file.probe_mut("tls");
    t.verify_dkim = Some(true);
    t.dns_resolver = Some(silent.local_addr().unwrap().to_string());
    let text = file.render();
    let prober = Prober::start_text(&text).await;
    let s = until(
        prober.addr(),
        Duration::from_secs(60),
        "a canary through on TLS, and a plaintext one failed with tls",
        |s| completed(s, "tls") >= 1.0 && failures(s, "plain", "delivery", "tls") >= 1.0,
    )
    .await;

    // The delivered message, as Dovecot stored it.
    let mut stored = Vec::new();
    files(&servers.dir.join("mail"), &mut stored);
    let raw = stored
        .iter()
        .filter(|p| p.to_string_lossy().contains("tlsbox"))
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .find(|t| t.contains("X-Mailcanary-Token"))
        .expect("the tls probe's canary is in its Maildir");
    let chain = received_chain(&raw);
    println!("Received chain of a canary through Postfix and Dovecot:\n{chain}");

    // /metrics: two hops (Postfix's submission, Dovecot's LMTP), all TLS.
    let hop = |probe: &str, hop: &str| {
        v(
            &s,
            probe,
            "mailcanary_hop_duration_seconds_count",
            &[("hop", hop)],
        )
    };
    assert!(hop("tls", "1") >= 1.0);
    assert!(hop("tls", "2") >= 1.0);
    assert_eq!(hop("tls", "3"), 0.0, "{chain}");
    let tls_total =
        |probe: &str, r: &str| v(&s, probe, "mailcanary_delivery_tls_total", &[("result", r)]);
    assert!(tls_total("tls", "all_hops") >= 1.0);
    assert_eq!(tls_total("tls", "some_plaintext"), 0.0);
    assert!(tls_total("plain", "some_plaintext") >= 1.0);
    assert_eq!(tls_total("plain", "all_hops"), 0.0);
    // No Authentication-Results from this harness: every verdict none.
    assert!(
        v(
            &s,
            "tls",
            "mailcanary_delivery_auth_total",
            &[("method", "dkim"), ("result", "none")]
        ) >= 1.0
    );
    assert_eq!(v(&s, "plain", "mailcanary_probe_success", &[]), 0.0);
    let verified = |probe: &str, method: &str, result: &str| {
        v(
            &s,
            probe,
            "mailcanary_delivery_verified_total",
            &[("method", method), ("result", result)],
        )
    };
    assert!(verified("tls", "dkim", "none") >= 1.0);
    assert!(verified("tls", "arc", "none") >= 1.0);
    assert_eq!(verified("tls", "dkim", "temperror"), 0.0);

    // The status JSON carries each delivered canary's route.
    let url = format!("http://{}/api/v1/status", prober.addr());
    let status: serde_json::Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
    let text = status.to_string();
    let probes = status
        .as_array()
        .or_else(|| status["probes"].as_array())
        .expect("a list of probes");
    let route_of = |name: &str| {
        probes
            .iter()
            .find(|p| p["name"] == name)
            .and_then(|p| p["recent"].as_array())
            .and_then(|r| r.iter().find(|c| c["route"].is_object()))
            .map(|c| c["route"].clone())
            .unwrap_or_else(|| panic!("no route for {name} in {text}"))
    };
    let r = route_of("tls");
    let hops = r["hops"].as_array().unwrap();
    assert_eq!(hops.len(), 2, "{r}");
    assert_eq!(hops[0]["protocol"], "ESMTPSA", "{r}");
    assert!(
        hops[0]["tls"]
            .as_str()
            .is_some_and(|t| t.starts_with("TLS")),
        "{r}"
    );
    assert_eq!(hops[1]["protocol"], "LMTP", "{r}");
    assert!(hops.iter().all(|h| h["plaintext"] == false), "{r}");
    assert_eq!(r["verified"][0]["method"], "dkim", "{r}");
    assert_eq!(r["verified"][0]["result"], "none", "{r}");
    let r = route_of("plain");
    assert_eq!(r["hops"][0]["protocol"], "ESMTP", "{r}");
    assert_eq!(r["hops"][0]["plaintext"], true, "{r}");
    let plain_failed = probes
        .iter()
        .find(|p| p["name"] == "plain")
        .unwrap()
        .to_string();
    assert!(plain_failed.contains("was not TLS"), "{plain_failed}");
    prober.stop().await;

    // `once` prints the hops under the delivery line.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("once.toml");
    let mut once = tls.clone();
    once.name = "once".into();
    std::fs::write(&cfg, config_text(&servers, &[once])).unwrap();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_mailcanary"))
            .args(["once", "--config"])
            .arg(&cfg)
            .current_dir(dir.path())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("once:\n{stdout}");
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("hop 1") && stdout.contains("with ESMTPSA TLSv1."),
        "{stdout}"
    );
    assert!(
        stdout.contains("hop 2") && stdout.contains("with LMTP"),
        "{stdout}"
    );
    assert!(stdout.contains("tls all hops  auth dkim=none"), "{stdout}");
}
