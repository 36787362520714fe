//! One IMAP connection per watched folder of a distinct mailbox, not one per probe: several
//! probes reading one mailbox share its watchers. Counted by the kernel: the established TCP
//! connections to the sandbox's IMAP port (`/proc/net/tcp`, this process's sandbox and prober).

use std::time::{Duration, Instant};

use mailcanary::config;

use crate::common::*;

/// Established connections whose remote end is `port` on loopback (the client side).
fn clients_of(port: u16) -> usize {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap();
    text.lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3
                && f[3] == "01"
                && f[2]
                    .rsplit_once(':')
                    .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                    == Some(port)
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_probes_on_one_mailbox_hold_one_connection_per_folder() {
    let sb = sandbox().await;
    let text = fleet_text(&sb, &Knobs::default(), 5);
    let cfg = config::parse_str(&text, "fleet.toml").expect("fleet config parses");
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(&cfg, dir.path()).await;
    until(
        d.addr,
        Duration::from_secs(30),
        "a canary of every probe",
        |s| {
            (0..5).all(|i| {
                v(
                    s,
                    "mailcanary_canaries_completed_total",
                    &[("probe", &format!("p{i:04}"))],
                ) >= 1.0
            })
        },
    )
    .await;
    // The mailbox's inbox and its Junk folder: two watchers, whatever the number of probes.
    // Counted a few times over a second, as a reconnect could briefly show one more or less.
    let port = sb.imap_addr.port();
    let t0 = Instant::now();
    let mut counts = Vec::new();
    while t0.elapsed() < Duration::from_secs(1) {
        counts.push(clients_of(port));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(counts.contains(&2), "IMAP connections seen: {counts:?}");
    assert!(
        counts.iter().all(|&n| n <= 2),
        "IMAP connections seen: {counts:?}"
    );
    d.stop().await;
    sb.shutdown().await;
}
