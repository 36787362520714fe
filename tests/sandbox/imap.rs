//! The sandbox's IMAP server against real clients: async-imap, Python's imaplib and raw sockets.
//!
//! Each test starts `imap::serve` alone on 127.0.0.1:0 with its own `Mailboxes` and `FaultBoard`,
//! so these tests do not depend on the rest of the sandbox.

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use async_imap::imap_proto::{MailboxDatum, Response as ImapResponse};
use async_imap::{Session, extensions::idle::IdleResponse, types::Flag};
use futures::TryStreamExt;
use mailcanary::sandbox::{Fault, FaultBoard, Stage, imap, mailbox::Mailboxes};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{
        TcpListener, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    task::JoinHandle,
    time::timeout,
};
use tokio_util::sync::CancellationToken;

const PASSWORD: &str = "sandbox";
const USER: &str = "canary@prober.test";
/// Generous: the machine is shared with compilers. The IDLE contract has its own, tight bound.
const PATIENCE: Duration = Duration::from_secs(10);

/// One IMAP server on an ephemeral port; stopped when dropped.
struct Server {
    addr: SocketAddr,
    boxes: Arc<Mailboxes>,
    faults: FaultBoard,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Server {
    async fn start() -> Self {
        Self::start_with_idle_delay(Duration::ZERO).await
    }

    async fn start_with_idle_delay(idle_push_delay: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let boxes = Mailboxes::new(PASSWORD);
        let faults = FaultBoard::new();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(imap::serve_with(
            listener,
            Arc::clone(&boxes),
            faults.clone(),
            shutdown.clone(),
            idle_push_delay,
        ));
        Self {
            addr,
            boxes,
            faults,
            shutdown,
            task: Some(task),
        }
    }

    fn deliver(&self, subject: &str, id: &str) -> (u32, Vec<u8>) {
        let raw = message(subject, id);
        (self.boxes.deliver(USER, raw.clone()), raw)
    }

    async fn session(&self) -> Session<TcpStream> {
        let tcp = TcpStream::connect(self.addr).await.expect("connect");
        let mut client = async_imap::Client::new(tcp);
        let greeting = client.read_response().await.expect("greeting read");
        assert!(greeting.is_some(), "no greeting");
        client
            .login(USER, PASSWORD)
            .await
            .map_err(|(e, _)| e)
            .expect("login")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn message(subject: &str, id: &str) -> Vec<u8> {
    format!(
        "From: Helpdesk <support@helpdesk.test>\r\n\
         To: <{USER}>\r\n\
         Subject: {subject}\r\n\
         Date: Tue, 02 Jun 2026 10:00:00 +0000\r\n\
         Message-ID: <{id}@helpdesk.test>\r\n\
         X-Canary-Id: {id}\r\n\
         \r\n\
         Reply to canary {id}.\r\n\
         Second line with UPPER case.\r\n"
    )
    .into_bytes()
}

fn set(uids: &[u32]) -> HashSet<u32> {
    uids.iter().copied().collect()
}

#[tokio::test]
async fn async_imap_search_fetch_store_expunge() {
    let server = Server::start().await;
    let (u1, _) = server.deliver("Re: alpha ticket", "id-1");
    let (u2, raw2) = server.deliver("Re: beta ticket", "id-2");
    let (u3, _) = server.deliver("Re: gamma ticket", "id-3");
    assert_eq!((u1, u2, u3), (1, 2, 3));

    let mut s = server.session().await;
    let inbox = s.select("INBOX").await.expect("select");
    assert_eq!(inbox.exists, 3);
    assert_eq!(inbox.uid_next, Some(4));
    let validity = inbox.uid_validity.expect("UIDVALIDITY");

    assert_eq!(
        s.uid_search("SUBJECT beta").await.expect("search"),
        set(&[2])
    );
    assert_eq!(
        s.uid_search("SUBJECT BETA").await.expect("search"),
        set(&[2])
    );
    assert_eq!(
        s.uid_search("HEADER X-Canary-Id id-3")
            .await
            .expect("search"),
        set(&[3])
    );
    assert_eq!(s.uid_search("ALL").await.expect("search"), set(&[1, 2, 3]));
    assert_eq!(s.uid_search("UID 2:*").await.expect("search"), set(&[2, 3]));
    assert_eq!(
        s.uid_search("OR SUBJECT alpha BODY \"upper CASE\" NOT UID 3")
            .await
            .expect("search"),
        set(&[1, 2])
    );
    assert_eq!(
        s.uid_search("UNSEEN").await.expect("search"),
        set(&[1, 2, 3])
    );

    // BODY.PEEK[] gives back exactly the delivered bytes and leaves \Seen alone.
    let fetched: Vec<_> = s
        .uid_fetch("2", "(BODY.PEEK[] FLAGS)")
        .await
        .expect("fetch")
        .try_collect()
        .await
        .expect("fetch responses");
    assert_eq!(fetched.len(), 1);
    assert_eq!(fetched[0].uid, Some(2), "UID FETCH always includes UID");
    assert_eq!(fetched[0].body(), Some(raw2.as_slice()));
    assert!(!fetched[0].flags().any(|f| f == Flag::Seen));
    assert_eq!(s.uid_search("SEEN").await.expect("search"), set(&[]));

    // BODY[] sets \Seen.
    let _: Vec<_> = s
        .uid_fetch("1", "BODY[]")
        .await
        .expect("fetch")
        .try_collect()
        .await
        .expect("fetch responses");
    assert_eq!(s.uid_search("SEEN").await.expect("search"), set(&[1]));

    // \Deleted on 1 and 2, UID EXPUNGE 2: only 2 goes.
    let _: Vec<_> = s
        .uid_store("1:2", "+FLAGS (\\Deleted)")
        .await
        .expect("store")
        .try_collect()
        .await
        .expect("store responses");
    let expunged: Vec<u32> = s
        .uid_expunge("2")
        .await
        .expect("uid expunge")
        .try_collect()
        .await
        .expect("expunge responses");
    assert_eq!(expunged, vec![2], "sequence number of UID 2");
    assert_eq!(s.uid_search("ALL").await.expect("search"), set(&[1, 3]));
    assert_eq!(s.uid_search("DELETED").await.expect("search"), set(&[1]));

    // UIDs are never reused; UIDVALIDITY does not change.
    let (u4, _) = server.deliver("Re: delta ticket", "id-4");
    assert_eq!(u4, 4);
    s.noop().await.expect("noop");
    let inbox = s.select("INBOX").await.expect("reselect");
    assert_eq!(inbox.exists, 3);
    assert_eq!(inbox.uid_next, Some(5));
    assert_eq!(inbox.uid_validity, Some(validity));
    s.logout().await.expect("logout");
}

#[tokio::test]
async fn idle_client_gets_exists_within_100ms_of_delivery() {
    let server = Server::start().await;
    server.deliver("Re: before idle", "id-0");
    let (exists, latency) = idle_push_latency(&server).await;
    assert_eq!(exists, Some(2), "expected * 2 EXISTS");
    assert!(
        latency < Duration::from_millis(100),
        "EXISTS took {latency:?}"
    );
}

/// With Dovecot's fixed notify delay configured, the push waits for it (and still comes).
#[tokio::test]
async fn idle_push_delay_holds_exists_back_like_dovecot() {
    let server = Server::start_with_idle_delay(Duration::from_millis(300)).await;
    let (_, latency) = idle_push_latency(&server).await;
    assert!(
        latency >= Duration::from_millis(300),
        "pushed after {latency:?}"
    );
}

/// An IDLE client on INBOX; a message is delivered while it waits. Returns the `EXISTS` count
/// the push carried and how long after the delivery it came; checks the session is usable
/// after DONE.
async fn idle_push_latency(server: &Server) -> (Option<u32>, Duration) {
    let mut s = server.session().await;
    s.select("INBOX").await.expect("select");
    let mut idle = s.idle();
    idle.init().await.expect("IDLE accepted");
    let (wait, _stop) = idle.wait_with_timeout(PATIENCE);
    let deliver = async {
        // Let the client settle into waiting first.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let at = Instant::now();
        server.deliver("Re: during idle", "id-1");
        at
    };
    let (response, delivered_at) = tokio::join!(wait, deliver);
    let latency = delivered_at.elapsed();
    let response = response.expect("idle wait");
    let IdleResponse::NewData(data) = response else {
        panic!("expected new data, got {response:?}");
    };
    let exists = match data.parsed() {
        ImapResponse::MailboxData(MailboxDatum::Exists(n)) => Some(*n),
        _ => None,
    };
    let mut s = idle.done().await.expect("DONE");
    s.noop().await.expect("session usable after IDLE");
    (exists, latency)
}

#[tokio::test]
async fn idle_client_is_told_of_expunges_by_another_session() {
    let server = Server::start().await;
    server.deliver("Re: one", "id-1");
    server.deliver("Re: two", "id-2");
    let mut watcher = server.session().await;
    watcher.select("INBOX").await.expect("select");
    let mut idle = watcher.idle();
    idle.init().await.expect("IDLE accepted");

    let mut other = server.session().await;
    other.select("INBOX").await.expect("select");
    let (wait, _stop) = idle.wait_with_timeout(PATIENCE);
    let expunge = async {
        let _: Vec<_> = other
            .uid_store("1", "+FLAGS.SILENT (\\Deleted)")
            .await
            .expect("store")
            .try_collect()
            .await
            .expect("store responses");
        let _: Vec<u32> = other
            .uid_expunge("1")
            .await
            .expect("expunge")
            .try_collect()
            .await
            .expect("expunge responses");
    };
    let (response, ()) = tokio::join!(wait, expunge);
    let IdleResponse::NewData(data) = response.expect("idle wait") else {
        panic!("expected new data");
    };
    assert!(
        matches!(data.parsed(), ImapResponse::Expunge(1)),
        "expected * 1 EXPUNGE, got {:?}",
        data.parsed()
    );
}

#[tokio::test]
async fn python_imaplib_round_trip() {
    let server = Server::start().await;
    server.deliver("Re: [canary] python probe", "py-1");
    server.deliver("Re: something else", "py-2");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/sandbox/imaplib_client.py"
    );
    let port = server.addr.port().to_string();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args([script, "127.0.0.1", &port, USER, PASSWORD, "python probe"])
            .output()
    })
    .await
    .expect("join")
    .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "imaplib client failed: {stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON result");
    let caps: Vec<&str> = r["capabilities"]
        .as_array()
        .expect("capabilities")
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    for cap in ["IMAP4REV1", "IDLE", "UIDPLUS"] {
        assert!(caps.contains(&cap), "{cap} missing from {caps:?}");
    }
    assert_eq!(r["exists"], 2);
    assert_eq!(r["found_uids"], serde_json::json!([1]));
    assert_eq!(r["size_matches"], true);
    assert_eq!(r["subject_in_body"], true);
    assert_eq!(r["seen_after_peek"], false);
    assert_eq!(r["has_internaldate"], true);
    assert_eq!(r["expunged"], serde_json::json!([1]));
    assert_eq!(r["remaining_uids"], serde_json::json!([2]));
    let status = r["status"].as_str().expect("status");
    assert!(status.contains("MESSAGES 1"), "{status}");
    assert!(status.contains("UIDNEXT 3"), "{status}");
    assert!(status.contains("UNSEEN 1"), "{status}");
    assert!(
        status.contains(&format!("UIDVALIDITY {}", r["uidvalidity"])),
        "{status}"
    );
    assert_eq!(r["logout"], "BYE");
}

/// A line-level IMAP client over a raw socket, for what well-behaved clients never send.
struct Raw {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Self {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let (r, w) = tcp.into_split();
        let mut raw = Self {
            reader: BufReader::new(r),
            writer: w,
        };
        let greeting = raw.line().await.expect("greeting");
        assert!(greeting.starts_with("* OK"), "{greeting}");
        raw
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.expect("write");
    }

    /// The next line, or `None` at EOF or connection reset.
    async fn line(&mut self) -> Option<String> {
        self.line_within(PATIENCE)
            .await
            .expect("server answered in time")
    }

    /// `Err` if nothing came within `patience`.
    async fn line_within(&mut self, patience: Duration) -> Result<Option<String>, ()> {
        let mut buf = Vec::new();
        match timeout(patience, self.reader.read_until(b'\n', &mut buf)).await {
            Err(_) => Err(()),
            Ok(Ok(0)) | Ok(Err(_)) => Ok(None),
            Ok(Ok(_)) => Ok(Some(String::from_utf8_lossy(&buf).trim_end().to_string())),
        }
    }

    /// Sends `tag command` and returns every line up to and including the tagged one.
    async fn command(&mut self, tag: &str, command: &str) -> Vec<String> {
        self.send(format!("{tag} {command}\r\n").as_bytes()).await;
        self.until_tagged(tag).await
    }

    async fn until_tagged(&mut self, tag: &str) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let line = self.line().await.unwrap_or_else(|| {
                panic!("connection closed before {tag} was answered; got {lines:?}")
            });
            let done = line.starts_with(&format!("{tag} "));
            lines.push(line);
            if done {
                return lines;
            }
        }
    }

    async fn assert_noop_ok(&mut self, tag: &str) {
        let lines = self.command(tag, "NOOP").await;
        let last = lines.last().map(String::as_str).unwrap_or_default();
        assert!(last.starts_with(&format!("{tag} OK")), "{lines:?}");
    }
}

fn tagged<'a>(lines: &'a [String], tag: &str) -> &'a str {
    lines
        .iter()
        .find(|l| l.starts_with(&format!("{tag} ")))
        .map(String::as_str)
        .unwrap_or_default()
}

#[tokio::test]
async fn bad_input_gets_bad_and_the_connection_goes_on() {
    let server = Server::start().await;
    server.deliver("Re: raw", "raw-1");
    let mut raw = Raw::connect(server.addr).await;
    let mut other = Raw::connect(server.addr).await;

    // An unknown command.
    let lines = raw.command("g1", "FROBNICATE now").await;
    assert!(tagged(&lines, "g1").starts_with("g1 BAD"), "{lines:?}");
    raw.assert_noop_ok("n1").await;

    // 8-bit junk without a usable tag.
    raw.send(b"\xff\xfe\x80 \x01junk\r\n").await;
    let line = raw.line().await.expect("answer to junk");
    assert!(line.starts_with("* BAD"), "{line}");
    raw.assert_noop_ok("n2").await;

    // Another client is served meanwhile.
    other.assert_noop_ok("o1").await;

    // A literal far above the limit is refused before the client sends it.
    raw.send(b"l1 APPEND INBOX {99999999}\r\n").await;
    let lines = raw.until_tagged("l1").await;
    assert!(tagged(&lines, "l1").starts_with("l1 BAD"), "{lines:?}");
    raw.assert_noop_ok("n3").await;

    // Selected-state commands before login, and before SELECT.
    let lines = raw.command("f1", "FETCH 1 FLAGS").await;
    assert!(tagged(&lines, "f1").starts_with("f1 BAD"), "{lines:?}");
    let lines = raw.command("p1", &format!("LOGIN {USER} wrong")).await;
    assert!(
        tagged(&lines, "p1").starts_with("p1 NO [AUTHENTICATIONFAILED]"),
        "{lines:?}"
    );
    raw.assert_noop_ok("n4").await;
    let lines = raw.command("p2", &format!("LOGIN {USER} {PASSWORD}")).await;
    assert!(tagged(&lines, "p2").starts_with("p2 OK"), "{lines:?}");
    let lines = raw.command("f2", "UID FETCH 1:* (UID)").await;
    assert!(tagged(&lines, "f2").starts_with("f2 BAD"), "{lines:?}");
    raw.assert_noop_ok("n5").await;

    // AUTHENTICATE is answered NO, and LOGIN still works after.
    let lines = raw.command("x1", "AUTHENTICATE PLAIN").await;
    assert!(tagged(&lines, "x1").starts_with("x1 NO"), "{lines:?}");
    other.assert_noop_ok("o2").await;

    let lines = raw.command("q1", "LOGOUT").await;
    assert!(lines[0].starts_with("* BYE"), "{lines:?}");
    assert!(tagged(&lines, "q1").starts_with("q1 OK"), "{lines:?}");
    assert_eq!(raw.line().await, None, "closed after LOGOUT");
}

#[tokio::test]
async fn expunges_elsewhere_wait_for_noop_and_never_interrupt_fetch() {
    let server = Server::start().await;
    server.deliver("Re: one", "id-1");
    server.deliver("Re: two", "id-2");
    let mut a = Raw::connect(server.addr).await;
    let mut b = Raw::connect(server.addr).await;
    for (c, t) in [(&mut a, "a"), (&mut b, "b")] {
        c.command(&format!("{t}1"), &format!("LOGIN {USER} {PASSWORD}"))
            .await;
        let lines = c.command(&format!("{t}2"), "SELECT INBOX").await;
        assert!(lines.contains(&"* 2 EXISTS".to_string()), "{lines:?}");
    }

    let lines = b
        .command("b3", "UID STORE 1 +FLAGS.SILENT (\\Deleted)")
        .await;
    assert_eq!(lines.len(), 1, ".SILENT answers no FETCH: {lines:?}");
    let lines = b.command("b4", "EXPUNGE").await;
    assert_eq!(lines[0], "* 1 EXPUNGE");

    // A's view still has the message at 1: FETCH skips it and says nothing of the expunge.
    let lines = a.command("a3", "FETCH 1:* (UID)").await;
    assert!(!lines.iter().any(|l| l.contains("EXPUNGE")), "{lines:?}");
    assert!(
        lines.contains(&"* 2 FETCH (UID 2)".to_string()),
        "{lines:?}"
    );
    let lines = a.command("a4", "SEARCH ALL").await;
    assert!(lines.contains(&"* SEARCH 2".to_string()), "{lines:?}");
    // NOOP may tell.
    let lines = a.command("a5", "NOOP").await;
    assert_eq!(lines[0], "* 1 EXPUNGE");

    // New mail shows as EXISTS after any command, even FETCH.
    server.deliver("Re: three", "id-3");
    let lines = a.command("a6", "UID FETCH 2 (FLAGS)").await;
    assert!(lines.contains(&"* 2 EXISTS".to_string()), "{lines:?}");
    let lines = a.command("a7", "STATUS INBOX (MESSAGES UIDNEXT)").await;
    assert!(
        lines.contains(&"* STATUS INBOX (MESSAGES 2 UIDNEXT 4)".to_string()),
        "{lines:?}"
    );
}

#[tokio::test]
async fn mailbox_faults_error_stall_delay_drop() {
    let server = Server::start().await;
    let mut raw = Raw::connect(server.addr).await;

    // error: LOGIN refused, the connection stays usable.
    server.faults.set(Stage::Mailbox, Fault::Error);
    let lines = raw.command("e1", &format!("LOGIN {USER} {PASSWORD}")).await;
    assert!(
        tagged(&lines, "e1").starts_with("e1 NO [AUTHENTICATIONFAILED]"),
        "{lines:?}"
    );
    server.faults.set(Stage::Mailbox, Fault::Ok);
    let lines = raw.command("e2", &format!("LOGIN {USER} {PASSWORD}")).await;
    assert!(tagged(&lines, "e2").starts_with("e2 OK"), "{lines:?}");

    // stall: answers are held until the fault is cleared, then come in order.
    server.faults.set(Stage::Mailbox, Fault::Stall);
    raw.send(b"s1 NOOP\r\ns2 NOOP\r\n").await;
    assert!(
        raw.line_within(Duration::from_millis(300)).await.is_err(),
        "answered during stall"
    );
    server.faults.set(Stage::Mailbox, Fault::Ok);
    let first = raw.line().await.expect("s1 answer");
    let second = raw.line().await.expect("s2 answer");
    assert!(first.starts_with("s1 OK") && second.starts_with("s2 OK"));

    // delay: each answer takes at least the delay.
    server
        .faults
        .set(Stage::Mailbox, Fault::Delay(Duration::from_millis(200)));
    let started = Instant::now();
    raw.assert_noop_ok("d1").await;
    assert!(started.elapsed() >= Duration::from_millis(200));
    server.faults.set(Stage::Mailbox, Fault::Ok);

    // drop: new connections are closed at once, existing ones told BYE and closed.
    server.faults.set(Stage::Mailbox, Fault::Drop);
    let tcp = TcpStream::connect(server.addr).await.expect("connect");
    let mut fresh = BufReader::new(tcp);
    let mut buf = Vec::new();
    let n = timeout(PATIENCE, fresh.read_until(b'\n', &mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "got {:?}", String::from_utf8_lossy(&buf));
    // The existing session is told and closed without waiting for a command.
    let bye = raw.line().await.expect("BYE");
    assert!(bye.starts_with("* BYE"), "{bye}");
    assert_eq!(raw.line().await, None);

    // error ends logged-in sessions too (they must log in again and meet the refusal), but
    // leaves a not-yet-authenticated connection alone.
    server.faults.set(Stage::Mailbox, Fault::Ok);
    let mut logged_in = Raw::connect(server.addr).await;
    let lines = logged_in
        .command("l1", &format!("LOGIN {USER} {PASSWORD}"))
        .await;
    assert!(tagged(&lines, "l1").starts_with("l1 OK"), "{lines:?}");
    let mut anonymous = Raw::connect(server.addr).await;
    server.faults.set(Stage::Mailbox, Fault::Error);
    let bye = logged_in.line().await.expect("BYE");
    assert!(bye.starts_with("* BYE"), "{bye}");
    anonymous.assert_noop_ok("a1").await;

    server.faults.set(Stage::Mailbox, Fault::Ok);
    Raw::connect(server.addr).await.assert_noop_ok("ok1").await;
}

#[tokio::test]
async fn shutdown_says_bye_and_serve_returns() {
    let mut server = Server::start().await;
    let mut raw = Raw::connect(server.addr).await;
    raw.assert_noop_ok("n1").await;
    server.shutdown.cancel();
    let line = raw.line().await.expect("BYE");
    assert!(line.starts_with("* BYE"), "{line}");
    assert_eq!(raw.line().await, None);
    let task = server.task.take().expect("task");
    timeout(PATIENCE, task)
        .await
        .expect("serve returned")
        .expect("serve did not panic");
}
