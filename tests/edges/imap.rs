//! The IMAP watcher against the sandbox's IMAP server: IDLE and polling, latency, catch-up from
//! a saved cursor, faults, reconnects, deletes and failure reasons.
//!
//! Most tests run the sandbox's IMAP server alone (`sandbox::imap::serve` over their own
//! `Mailboxes`) so that they can deliver a message at an exact moment and look at the mailbox
//! directly; the end-to-end latency and the LOGIN fault go through a whole `Sandbox`.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use mailcanary::{
    canary::life::Reason,
    edges::imap::{Arrival, ImapTarget, TlsMode, WatchCommand, WatchEvent, spawn_watcher},
    sandbox::{
        Fault, FaultBoard, Stage, imap,
        mailbox::{FlagChange, Flags, Mailboxes},
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpListener, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::mpsc,
    task::JoinHandle,
    time::timeout,
};
use tokio_util::sync::CancellationToken;

use crate::{API_TOKEN, closed_port, eventually, mail_to, sandbox, token};

const USER: &str = "canary@prober.test";
const PASSWORD: &str = "sandbox";
/// Generous: the machine is shared with compilers. Latency has its own, tight bounds.
const PATIENCE: Duration = Duration::from_secs(10);
/// The IDLE contract: delivered → `Arrived` well within this.
const IDLE_BOUND: Duration = Duration::from_millis(100);

/// The sandbox's IMAP server alone, on an ephemeral port; stopped when dropped.
struct Server {
    addr: SocketAddr,
    boxes: Arc<Mailboxes>,
    faults: FaultBoard,
    shutdown: CancellationToken,
}

impl Server {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let boxes = Mailboxes::new(PASSWORD);
        // The mailbox exists before the first delivery, as it would on a real server.
        boxes.open(USER);
        let faults = FaultBoard::new();
        let shutdown = CancellationToken::new();
        tokio::spawn(imap::serve(
            listener,
            Arc::clone(&boxes),
            faults.clone(),
            shutdown.clone(),
        ));
        Self {
            addr,
            boxes,
            faults,
            shutdown,
        }
    }

    /// Delivers a message whose body names `id`; returns its UID and the delivery time.
    fn deliver(&self, id: &str) -> (u32, SystemTime) {
        let uid = self.boxes.deliver(USER, message(id));
        (uid, SystemTime::now())
    }

    fn uid_validity(&self) -> u32 {
        self.boxes.open(USER).uid_validity()
    }

    /// UIDs in the mailbox with their `(\Deleted, \Seen)` flags.
    fn contents(&self) -> Vec<(u32, bool, bool)> {
        self.boxes
            .open(USER)
            .snapshot()
            .messages
            .iter()
            .map(|m| (m.message.uid, m.flags.deleted, m.flags.seen))
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn message(id: &str) -> Vec<u8> {
    format!(
        "From: Helpdesk <support@helpdesk.test>\r\n\
         To: <{USER}>\r\n\
         Subject: Re: canary {id}\r\n\
         Message-ID: <{id}@helpdesk.test>\r\n\
         \r\n\
         Reply to canary {id}.\r\n"
    )
    .into_bytes()
}

fn target(addr: SocketAddr) -> ImapTarget {
    ImapTarget {
        host: addr.ip().to_string(),
        port: addr.port(),
        tls: TlsMode::None,
        username: USER.into(),
        password: PASSWORD.into(),
        oauth2: None,
        mailbox: "INBOX".into(),
        extra_roots_pem: None,
        timeout: Duration::from_secs(5),
        idle: true,
        poll_interval: Duration::from_millis(100),
        idle_refresh: mailcanary::edges::imap::IDLE_REFRESH,
    }
}

fn polling(addr: SocketAddr) -> ImapTarget {
    ImapTarget {
        idle: false,
        ..target(addr)
    }
}

/// A running watcher and both ends of its channels.
struct Watch {
    events: mpsc::Receiver<WatchEvent>,
    commands: mpsc::Sender<WatchCommand>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Watch {
    fn start(target: ImapTarget, start_after: Option<(u32, u32)>) -> Self {
        let (ev_tx, events) = mpsc::channel(1024);
        let (commands, cmd_rx) = mpsc::channel(16);
        let shutdown = CancellationToken::new();
        let task = spawn_watcher(target, start_after, ev_tx, cmd_rx, shutdown.clone());
        Self {
            events,
            commands,
            shutdown,
            task,
        }
    }

    async fn next(&mut self, what: &str) -> WatchEvent {
        match timeout(PATIENCE, self.events.recv()).await {
            Ok(Some(ev)) => ev,
            Ok(None) => panic!("watcher ended while waiting for {what}"),
            Err(_) => panic!("no event within {PATIENCE:?} while waiting for {what}"),
        }
    }

    /// Skips events until `f` picks one.
    async fn until<T>(&mut self, what: &str, mut f: impl FnMut(&WatchEvent) -> Option<T>) -> T {
        loop {
            let ev = self.next(what).await;
            if let Some(v) = f(&ev) {
                return v;
            }
        }
    }

    /// Waits for `Connected` and returns its `idle`; a `Failed` first is a test failure.
    async fn connected(&mut self) -> bool {
        match self.next("Connected").await {
            WatchEvent::Connected { idle } => idle,
            other => panic!("expected Connected, got {other:?}"),
        }
    }

    /// The next `n` arrivals; fails on any `Failed` on the way.
    async fn arrivals(&mut self, n: usize) -> Vec<Arrival> {
        let mut out = Vec::new();
        while out.len() < n {
            match self.next("arrivals").await {
                WatchEvent::Arrived(a) => out.push(a),
                WatchEvent::Failed { reason, detail } => {
                    panic!("watcher failed ({reason}: {detail}) while waiting for arrivals")
                }
                _ => {}
            }
        }
        out
    }

    async fn cursor(&mut self) -> (u32, u32) {
        self.until("Cursor", |ev| match ev {
            WatchEvent::Cursor {
                uid_validity,
                last_uid,
            } => Some((*uid_validity, *last_uid)),
            _ => None,
        })
        .await
    }

    /// Every event that comes within `d`.
    async fn during(&mut self, d: Duration) -> Vec<WatchEvent> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + d;
        while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, self.events.recv()).await {
            out.push(ev);
        }
        out
    }

    async fn stop(self) {
        self.shutdown.cancel();
        timeout(PATIENCE, self.task)
            .await
            .expect("watcher stops at shutdown")
            .expect("watcher task does not panic");
    }
}

fn arrived_uids(events: &[WatchEvent]) -> Vec<u32> {
    events
        .iter()
        .filter_map(|ev| match ev {
            WatchEvent::Arrived(a) => Some(a.uid),
            _ => None,
        })
        .collect()
}

fn latency(seen_at: SystemTime, delivered_at: SystemTime) -> Duration {
    // `seen_at` is when the search answered, after delivery; clocks this close can tie.
    seen_at.duration_since(delivered_at).unwrap_or_default()
}

fn summary(mut xs: Vec<Duration>) -> String {
    xs.sort();
    format!(
        "n={} min={:?} median={:?} max={:?}",
        xs.len(),
        xs[0],
        xs[xs.len() / 2],
        xs[xs.len() - 1]
    )
}

#[tokio::test]
async fn idle_reports_each_delivery_within_the_bound_exactly_once() {
    let server = Server::start().await;
    let mut w = Watch::start(target(server.addr), None);
    assert!(w.connected().await, "the sandbox offers IDLE");
    let validity = server.uid_validity();
    assert_eq!(w.cursor().await, (validity, 0), "starts at UIDNEXT");

    let mut latencies = Vec::new();
    for i in 0..20 {
        // Let the watcher get back into IDLE: the contract is about a waiting watcher.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let id = format!("idle-{i}");
        let (uid, delivered) = server.deliver(&id);
        let a = w.arrivals(1).await.remove(0);
        assert_eq!((a.uid, a.uid_validity), (uid, validity));
        assert_eq!(a.raw, message(&id), "the exact bytes");
        assert!(a.internal_date.is_some());
        latencies.push(latency(a.seen_at, delivered));
    }
    eprintln!(
        "IDLE: deliver() -> Arrived.seen_at: {}",
        summary(latencies.clone())
    );
    let slow: Vec<&Duration> = latencies.iter().filter(|d| **d >= IDLE_BOUND).collect();
    assert!(slow.is_empty(), "over {IDLE_BOUND:?}: {slow:?}");

    // Nothing twice, and BODY.PEEK left every message unseen.
    let rest = w.during(Duration::from_millis(300)).await;
    assert!(arrived_uids(&rest).is_empty(), "{rest:?}");
    assert!(server.contents().iter().all(|(_, _, seen)| !seen));
    w.stop().await;
}

#[tokio::test]
async fn sandbox_reply_arrives_within_100ms_of_its_delivered_at() {
    let sb = sandbox().await;
    let mut w = Watch::start(target(sb.imap_addr), None);
    assert!(w.connected().await);
    let smtp = lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::builder_dangerous(
        sb.smtp_addr.ip().to_string(),
    )
    .port(sb.smtp_addr.port())
    .build();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();

    let mut latencies = Vec::new();
    for _ in 0..5 {
        let tok = token();
        lettre::AsyncTransport::send(&smtp, mail_to("support@helpdesk.test", &tok))
            .await
            .expect("the sandbox MX accepts the canary");
        let url = format!(
            "{}/tickets/search?auth_token={API_TOKEN}&query={tok}",
            sb.api_url()
        );
        let ticket = eventually(PATIENCE, "the ticket", || async {
            let body: serde_json::Value = http.get(&url).send().await.ok()?.json().await.ok()?;
            body["tickets"].as_array()?.first()?["id"].as_u64()
        })
        .await;
        let r = http
            .post(format!(
                "{}/tickets/{ticket}/replies?auth_token={API_TOKEN}",
                sb.api_url()
            ))
            .json(&serde_json::json!({"reply": {"content_attributes": {"body": "on it"}}}))
            .send()
            .await
            .expect("reply posted");
        assert_eq!(r.status(), 201);

        let a = w.arrivals(1).await.remove(0);
        assert!(
            String::from_utf8_lossy(&a.raw).contains(&tok),
            "the reply to this canary"
        );
        let delivered_at = eventually(PATIENCE, "delivered_at", || async {
            sb.events()
                .into_iter()
                .find(|e| e.message_id == format!("{tok}@prober.test"))?
                .delivered_at
        })
        .await;
        latencies.push(latency(a.seen_at, delivered_at.0.into()));
    }
    eprintln!(
        "IDLE: sandbox delivered_at -> Arrived.seen_at: {}",
        summary(latencies.clone())
    );
    assert!(
        latencies.iter().all(|d| *d < IDLE_BOUND),
        "over {IDLE_BOUND:?}: {latencies:?}"
    );
    w.stop().await;
    sb.shutdown().await;
}

#[tokio::test]
async fn polling_mode_delivers_too() {
    let server = Server::start().await;
    let mut w = Watch::start(polling(server.addr), None);
    assert!(!w.connected().await, "idle=false polls");
    w.cursor().await;

    let mut latencies = Vec::new();
    for i in 0..3 {
        let (uid, delivered) = server.deliver(&format!("poll-{i}"));
        let a = w.arrivals(1).await.remove(0);
        assert_eq!(a.uid, uid);
        latencies.push(latency(a.seen_at, delivered));
    }
    eprintln!(
        "polling every 100 ms: deliver() -> Arrived.seen_at: {}",
        summary(latencies.clone())
    );
    // One poll interval plus scheduling slack.
    assert!(
        latencies.iter().all(|d| *d < Duration::from_secs(1)),
        "{latencies:?}"
    );
    w.stop().await;
}

#[tokio::test]
async fn fresh_watcher_ignores_mail_that_was_there_before_it() {
    let server = Server::start().await;
    server.deliver("old-1");
    server.deliver("old-2");
    let mut w = Watch::start(target(server.addr), None);
    w.connected().await;
    assert_eq!(w.cursor().await, (server.uid_validity(), 2));
    let (uid, _) = server.deliver("new");
    let got = w.arrivals(1).await;
    assert_eq!(got[0].uid, uid);
    assert_eq!(uid, 3);
    w.stop().await;
}

#[tokio::test]
async fn restart_with_saved_cursor_catches_up_exactly_what_was_missed() {
    let server = Server::start().await;
    let mut w = Watch::start(target(server.addr), None);
    w.connected().await;
    server.deliver("before");
    w.arrivals(1).await;
    let saved = w.cursor().await;
    w.stop().await;

    let missed: Vec<u32> = (0..3)
        .map(|i| server.deliver(&format!("missed-{i}")).0)
        .collect();

    let mut w = Watch::start(target(server.addr), Some(saved));
    w.connected().await;
    let got = w.arrivals(3).await;
    assert_eq!(got.iter().map(|a| a.uid).collect::<Vec<_>>(), missed);
    let last = *missed.last().unwrap();
    assert_eq!(w.cursor().await, (saved.0, last));
    let rest = w.during(Duration::from_millis(300)).await;
    assert!(arrived_uids(&rest).is_empty(), "exactly those 3: {rest:?}");

    // A cursor from another UIDVALIDITY means nothing here: start at UIDNEXT.
    w.stop().await;
    let mut w = Watch::start(target(server.addr), Some((saved.0.wrapping_add(1), 0)));
    w.connected().await;
    assert_eq!(w.cursor().await, (saved.0, last));
    let rest = w.during(Duration::from_millis(300)).await;
    assert!(arrived_uids(&rest).is_empty(), "{rest:?}");
    w.stop().await;
}

#[tokio::test]
async fn burst_arrives_in_uid_order_exactly_once_across_fetch_batches() {
    let server = Server::start().await;
    let mut w = Watch::start(target(server.addr), None);
    w.connected().await;
    let n = 120;
    let mut sent = Vec::new();
    for i in 0..n {
        sent.push(server.deliver(&format!("burst-{i}")).0);
        if i % 7 == 0 {
            tokio::task::yield_now().await;
        }
    }
    let got: Vec<u32> = w.arrivals(n).await.iter().map(|a| a.uid).collect();
    assert_eq!(got, sent);
    let rest = w.during(Duration::from_millis(300)).await;
    assert!(arrived_uids(&rest).is_empty(), "{rest:?}");
    w.stop().await;
}

#[tokio::test]
async fn mailbox_error_fault_is_auth_then_connects_once_cleared() {
    let sb = sandbox().await;
    sb.faults().set(Stage::Mailbox, Fault::Error);
    let mut w = Watch::start(target(sb.imap_addr), None);
    match w.next("Failed").await {
        WatchEvent::Failed { reason, detail } => {
            assert_eq!(reason, Reason::Auth, "{detail}");
            assert!(!detail.contains(PASSWORD), "{detail}");
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    sb.faults().set(Stage::Mailbox, Fault::Ok);
    w.until("Connected after clearing", |ev| match ev {
        WatchEvent::Connected { idle } => Some(*idle),
        WatchEvent::Failed { reason, .. } => {
            assert_eq!(*reason, Reason::Auth);
            None
        }
        _ => None,
    })
    .await;
    w.stop().await;
    sb.shutdown().await;
}

#[tokio::test]
async fn mailbox_drop_reconnects_and_still_delivers_everything_once() {
    let server = Server::start().await;
    let mut w = Watch::start(target(server.addr), None);
    w.connected().await;
    let (first, _) = server.deliver("first");
    assert_eq!(w.arrivals(1).await[0].uid, first);

    server.faults.set(Stage::Mailbox, Fault::Drop);
    // The IDLE push of this delivery is where the server hangs up.
    let (a, _) = server.deliver("during-drop-a");
    let reason = w
        .until("Failed", |ev| match ev {
            WatchEvent::Failed { reason, .. } => Some(*reason),
            _ => None,
        })
        .await;
    assert_eq!(reason, Reason::Connect);
    let (b, _) = server.deliver("during-drop-b");
    server.faults.set(Stage::Mailbox, Fault::Ok);

    w.until("Connected again", |ev| {
        matches!(ev, WatchEvent::Connected { .. }).then_some(())
    })
    .await;
    let got: Vec<u32> = w.arrivals(2).await.iter().map(|a| a.uid).collect();
    assert_eq!(got, vec![a, b]);
    let rest = w.during(Duration::from_millis(300)).await;
    assert!(arrived_uids(&rest).is_empty(), "{rest:?}");
    w.stop().await;
}

#[tokio::test]
async fn delete_removes_exactly_the_asked_uid_and_wakes_idle() {
    let server = Server::start().await;
    let mut w = Watch::start(target(server.addr), None);
    w.connected().await;
    let uids: Vec<u32> = (0..4)
        .map(|i| server.deliver(&format!("del-{i}")).0)
        .collect();
    w.arrivals(4).await;
    let validity = server.uid_validity();
    // Someone else's mail marked \Deleted: not ours to expunge.
    server.boxes.open(USER).store_flags(
        &[uids[0]],
        FlagChange::Add,
        &Flags {
            deleted: true,
            ..Flags::default()
        },
    );

    // A stale UIDVALIDITY is ignored; the right one removes exactly uid 2.
    let asked = tokio::time::Instant::now();
    for cmd in [
        WatchCommand::Delete {
            uid_validity: validity.wrapping_add(1),
            uid: uids[3],
        },
        WatchCommand::Delete {
            uid_validity: validity,
            uid: uids[1],
        },
    ] {
        w.commands.send(cmd).await.unwrap();
    }
    eventually(PATIENCE, "uid 2 expunged", || async {
        (!server.contents().iter().any(|(u, _, _)| *u == uids[1])).then_some(())
    })
    .await;
    let took = asked.elapsed();
    eprintln!("delete while in IDLE: command -> expunged in {took:?}");
    assert!(
        took < Duration::from_secs(1),
        "the command woke the IDLE: {took:?}"
    );
    assert_eq!(
        server.contents(),
        vec![
            (uids[0], true, false),
            (uids[2], false, false),
            (uids[3], false, false)
        ],
        "only the asked UID went; the other \\Deleted message stays"
    );

    // The watcher goes on reporting new mail after a delete.
    let (next, _) = server.deliver("after-delete");
    assert_eq!(w.arrivals(1).await[0].uid, next);
    w.stop().await;
}

#[tokio::test]
async fn delete_in_polling_mode_and_via_a_second_session() {
    let server = Server::start().await;
    let mut w = Watch::start(polling(server.addr), None);
    w.connected().await;
    let (u1, _) = server.deliver("p-1");
    let (u2, _) = server.deliver("p-2");
    w.arrivals(2).await;
    w.commands
        .send(WatchCommand::Delete {
            uid_validity: server.uid_validity(),
            uid: u1,
        })
        .await
        .unwrap();

    // Check with an independent IMAP session, as an operator would.
    let remaining = eventually(PATIENCE, "u1 gone over IMAP", || async {
        let tcp = tokio::net::TcpStream::connect(server.addr).await.ok()?;
        let mut client = async_imap::Client::new(tcp);
        client.read_response().await.ok()??;
        let mut s = client.login(USER, PASSWORD).await.ok()?;
        s.select("INBOX").await.ok()?;
        let all = s.uid_search("ALL").await.ok()?;
        let _ = s.logout().await;
        (!all.contains(&u1)).then_some(all)
    })
    .await;
    assert_eq!(remaining.into_iter().collect::<Vec<_>>(), vec![u2]);
    w.stop().await;
}

#[tokio::test]
async fn wrong_password_is_auth_and_never_echoed() {
    let server = Server::start().await;
    let secret = "wr0ng-pa55-7c1d";
    let mut w = Watch::start(
        ImapTarget {
            password: secret.into(),
            oauth2: None,
            ..target(server.addr)
        },
        None,
    );
    for _ in 0..2 {
        match w.next("Failed").await {
            WatchEvent::Failed { reason, detail } => {
                assert_eq!(reason, Reason::Auth, "{detail}");
                assert!(!detail.contains(secret), "{detail}");
                assert!(detail.contains("LOGIN"), "{detail}");
            }
            other => panic!("expected Failed, got {other:?}"),
        }
    }
    w.stop().await;
}

#[tokio::test]
async fn closed_port_is_connect() {
    let port = closed_port().await;
    let mut w = Watch::start(target(([127, 0, 0, 1], port).into()), None);
    match w.next("Failed").await {
        WatchEvent::Failed { reason, detail } => assert_eq!(reason, Reason::Connect, "{detail}"),
        other => panic!("expected Failed, got {other:?}"),
    }
    w.stop().await;
}

#[tokio::test]
async fn tls_to_a_plaintext_server_and_missing_starttls_are_tls() {
    let server = Server::start().await;
    for mode in [TlsMode::Tls, TlsMode::StartTls] {
        let mut w = Watch::start(
            ImapTarget {
                host: "localhost".into(),
                tls: mode,
                ..target(server.addr)
            },
            None,
        );
        match w.next("Failed").await {
            WatchEvent::Failed { reason, detail } => {
                assert_eq!(reason, Reason::Tls, "{mode:?}: {detail}")
            }
            other => panic!("expected Failed, got {other:?}"),
        }
        w.stop().await;
    }
}

#[tokio::test]
async fn silent_server_is_timeout() {
    // Accepts and says nothing: no greeting ever comes.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let mut w = Watch::start(
        ImapTarget {
            timeout: Duration::from_millis(300),
            ..target(addr)
        },
        None,
    );
    match w.next("Failed").await {
        WatchEvent::Failed { reason, detail } => assert_eq!(reason, Reason::Timeout, "{detail}"),
        other => panic!("expected Failed, got {other:?}"),
    }
    w.stop().await;
}

/// A TCP relay in front of a server that can "cut" the connections it carries the way a NAT
/// that dropped its mapping does: no FIN, no RST, bytes in either direction just vanish.
/// Connections accepted after a cut are relayed again.
struct Relay {
    addr: SocketAddr,
    generation: Arc<AtomicU64>,
    /// The last bytes the server sent through the relay.
    last_from_server: Arc<std::sync::Mutex<Vec<u8>>>,
    shutdown: CancellationToken,
}

impl Relay {
    async fn start(to: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let relay = Relay {
            addr: listener.local_addr().unwrap(),
            generation: Arc::new(AtomicU64::new(0)),
            last_from_server: Arc::new(std::sync::Mutex::new(Vec::new())),
            shutdown: CancellationToken::new(),
        };
        let (generation, last, stop) = (
            relay.generation.clone(),
            relay.last_from_server.clone(),
            relay.shutdown.clone(),
        );
        tokio::spawn(async move {
            loop {
                let client = tokio::select! {
                    r = listener.accept() => match r { Ok((c, _)) => c, Err(_) => return },
                    () = stop.cancelled() => return,
                };
                let Ok(server) = TcpStream::connect(to).await else {
                    continue;
                };
                let born = generation.load(Ordering::SeqCst);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let pump = |from, to, seen: Option<Arc<std::sync::Mutex<Vec<u8>>>>| {
                    pump(from, to, seen, born, generation.clone(), stop.clone())
                };
                tokio::spawn(pump(cr, sw, None));
                tokio::spawn(pump(sr, cw, Some(last.clone())));
            }
        });
        relay
    }

    fn cut(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Waits until the server's last words were IDLE's continuation (`+ idling`).
    async fn until_idling(&self) {
        eventually(PATIENCE, "the watcher in IDLE", || async {
            self.last_from_server
                .lock()
                .unwrap()
                .starts_with(b"+")
                .then_some(())
        })
        .await;
    }
}

/// Copies `from` to `to` until either end closes; once the relay's generation moves past
/// `born`, reads on and drops everything (dead air).
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    seen: Option<Arc<std::sync::Mutex<Vec<u8>>>>,
    born: u64,
    generation: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
            () = stop.cancelled() => return,
        };
        if let Some(seen) = &seen {
            *seen.lock().unwrap() = buf[..n].to_vec();
        }
        if generation.load(Ordering::SeqCst) == born && to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[tokio::test]
async fn a_connection_that_dies_silently_is_found_at_the_idle_refresh_and_caught_up() {
    let server = Server::start().await;
    let relay = Relay::start(server.addr).await;
    let mut t = target(relay.addr);
    t.idle_refresh = Duration::from_millis(500);
    t.timeout = Duration::from_secs(1);
    let mut w = Watch::start(t, None);
    assert!(w.connected().await, "IDLE through the relay");
    let (first, _) = server.deliver("before-the-cut");
    assert_eq!(w.arrivals(1).await[0].uid, first);

    // The connection dies without a word while the watcher sits in IDLE; the push for this mail
    // goes nowhere.
    relay.until_idling().await;
    relay.cut();
    let (missed, _) = server.deliver("while-dead");
    // The refresh's DONE goes unanswered: a timeout, then a new connection, then catch-up by
    // UID. Without a refresh shorter than IDLE_REFRESH this would wait 25 minutes.
    let reason = w
        .until("the dead connection noticed", |ev| match ev {
            WatchEvent::Failed { reason, .. } => Some(*reason),
            WatchEvent::Arrived(a) => panic!("arrival {} through a dead connection", a.uid),
            _ => None,
        })
        .await;
    assert_eq!(reason, Reason::Timeout);
    w.until("Connected again", |ev| {
        matches!(ev, WatchEvent::Connected { .. }).then_some(())
    })
    .await;
    let got: Vec<u32> = w.arrivals(1).await.iter().map(|a| a.uid).collect();
    assert_eq!(got, vec![missed], "the mail missed while dead, once");
    let rest = w.during(Duration::from_millis(1200)).await;
    assert!(arrived_uids(&rest).is_empty(), "{rest:?}");
    assert!(
        !rest.iter().any(|e| matches!(e, WatchEvent::Failed { .. })),
        "a live connection survives its refreshes: {rest:?}"
    );
    w.stop().await;
}
