//! IMAP edge: one long-lived watcher per mailbox, reporting every new message exactly once.
//!
//! [`spawn_watcher`] connects (TCP, TLS or STARTTLS), logs in, selects the mailbox and then
//! waits for mail with IDLE (RFC 2177) or, without it, by polling. Everything new is reported as
//! [`WatchEvent::Arrived`] in UID order, followed by a [`WatchEvent::Cursor`] that the caller
//! persists so that a restarted watcher catches up on what was delivered while it was away.
//! Failures are reported as [`WatchEvent::Failed`] and the watcher reconnects by itself with
//! exponential backoff until it is shut down. [`WatchCommand::Delete`] removes one message by
//! UID, and never anything else.
//!
//! Architecture invariant: network I/O only. No metrics, ledger, config files or scheduling:
//! plain parameters in, events out. No event, error or log line ever carries the password.
//!
//! Failure reasons: `connect` (TCP refused, connection closed or lost, `BYE` greeting), `tls`
//! (handshake or certificate; STARTTLS refused though the target requires it), `auth` (LOGIN
//! refused), `protocol` (SELECT refused, no UIDVALIDITY, an answer we cannot use), `timeout`
//! (no answer within `target.timeout`).
//!
//! The hot path (IDLE push → `DONE` → `UID SEARCH` → `UID FETCH`) has no sleeps: a message is
//! reported a few round trips after the server announces it.

use std::{
    collections::BTreeSet,
    fmt, io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use async_imap::{
    Client, Session,
    error::Error as ImapError,
    extensions::idle::IdleResponse,
    imap_proto::{Response, Status},
    types::{Capabilities, Capability, Fetch, UnsolicitedResponse},
};
use futures::TryStreamExt;
use rustls_pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::mpsc,
    task::JoinHandle,
    time::{Instant, sleep, sleep_until, timeout},
};
use tokio_rustls::{TlsConnector, client::TlsStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::canary::life::Reason;

/// The longest one IDLE runs before we end it and issue a new one. RFC 2177 section 3: a server
/// may log off a client after 30 minutes of inactivity, so clients "SHOULD terminate the IDLE
/// and re-issue it at least every 29 minutes". 25 leaves room for a slow round trip.
pub const IDLE_REFRESH: Duration = Duration::from_secs(25 * 60);
/// The shortest IDLE refresh honoured (see [`ImapTarget::idle_refresh`]).
pub const IDLE_REFRESH_FLOOR: Duration = Duration::from_secs(1);

/// TCP keepalive on the IMAP connection: the first probe after this much silence, then one
/// every [`KEEPALIVE_INTERVAL`], [`KEEPALIVE_RETRIES`] unanswered ones end the connection. The
/// probes also keep NAT and firewall mappings of a quiet IDLE connection alive.
pub const KEEPALIVE_TIME: Duration = Duration::from_secs(60);
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
pub const KEEPALIVE_RETRIES: u32 = 4;

/// How many messages one `UID FETCH` asks for. Bounds the memory and the time of one command
/// when a watcher catches up on a large backlog.
pub const FETCH_BATCH: usize = 50;

/// First reconnect delay; doubled after every failed attempt up to [`BACKOFF_MAX`].
pub const BACKOFF_MIN: Duration = Duration::from_millis(250);
/// Longest reconnect delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Shortest poll interval honoured: a zero interval would hammer the server.
const POLL_FLOOR: Duration = Duration::from_millis(10);

pub use super::TlsMode;

/// A target `mailbox` of this value is the folder LIST marks `\Junk` (RFC 6154 SPECIAL-USE),
/// looked up at every connect: the name differs by provider (`Junk`, `[Gmail]/Spam`, `Junk
/// Email`) and by language. If no folder is marked, the watcher reports
/// [`WatchEvent::NoSuchFolder`] once and watches nothing.
pub const SPECIAL_USE_JUNK: &str = "\\Junk";

/// Where and how to watch one mailbox.
#[derive(Clone)]
pub struct ImapTarget {
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    pub username: String,
    /// For LOGIN; unused when `oauth2` is set.
    pub password: String,
    /// Log in with `AUTHENTICATE XOAUTH2` / `OAUTHBEARER` and a token from this source instead
    /// of LOGIN; a fresh token (if the cached one is old or was refused) on every reconnect.
    pub oauth2: Option<super::oauth2::Login>,
    /// Mailbox to SELECT, e.g. `INBOX`, or [`SPECIAL_USE_JUNK`].
    pub mailbox: String,
    /// PEM certificates trusted in addition to webpki-roots (a private CA).
    pub extra_roots_pem: Option<Vec<u8>>,
    /// Limit for the TCP connect, the TLS handshake and each command (not for IDLE itself).
    pub timeout: Duration,
    /// Use IDLE when the server offers it; poll otherwise.
    pub idle: bool,
    /// How often to look for new mail without IDLE.
    pub poll_interval: Duration,
    /// How long one IDLE may run before the watcher ends it, which proves the connection alive
    /// (DONE must be answered within `timeout`) and searches for new mail. A connection that
    /// died silently (a NAT mapping dropped, a server gone without a FIN) is otherwise noticed
    /// only at the next refresh, and the mail it missed would count against the probe. The
    /// prober sets half the shortest delivery deadline of the mailbox's probes, at most
    /// [`IDLE_REFRESH`], at least [`IDLE_REFRESH_FLOOR`].
    pub idle_refresh: Duration,
}

impl fmt::Debug for ImapTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImapTarget")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("oauth2", &self.oauth2.as_ref().map(|o| o.mechanism))
            .field("mailbox", &self.mailbox)
            .field(
                "extra_roots_pem",
                &self.extra_roots_pem.as_ref().map(Vec::len),
            )
            .field("timeout", &self.timeout)
            .field("idle", &self.idle)
            .field("poll_interval", &self.poll_interval)
            .field("idle_refresh", &self.idle_refresh)
            .finish()
    }
}

/// One new message in the watched mailbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Arrival {
    pub uid: u32,
    pub uid_validity: u32,
    /// The whole message, exactly as the server holds it (`BODY.PEEK[]`: not marked `\Seen`).
    pub raw: Vec<u8>,
    /// The server's INTERNALDATE (delivery time, usually whole seconds).
    pub internal_date: Option<SystemTime>,
    /// When the watcher saw the message: the moment the `UID SEARCH` that found it answered.
    pub seen_at: SystemTime,
    /// The same moment on the monotonic clock, for durations a wall-clock step cannot bend.
    pub seen: std::time::Instant,
}

/// What a watcher reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    /// Logged in and the mailbox is selected. `idle`: the server offers IDLE and the target
    /// asked for it (otherwise the watcher polls).
    Connected { idle: bool },
    /// A new message, in UID order, once per `(uid_validity, uid)` within one watcher.
    Arrived(Arrival),
    /// Everything up to `last_uid` was reported: persist it and pass it as `start_after` to the
    /// next watcher of this mailbox.
    Cursor { uid_validity: u32, last_uid: u32 },
    /// The session failed (connect, tls, auth, protocol or timeout); one event per failed
    /// attempt. The watcher reconnects by itself.
    Failed { reason: Reason, detail: String },
    /// The deletes asked for these UIDs were carried out (or refused by the server, and
    /// dropped): nothing more will be done for them.
    Deleted { uid_validity: u32, uids: Vec<u32> },
    /// The target is [`SPECIAL_USE_JUNK`] and no folder is marked `\Junk`: nothing to watch.
    /// The watcher logs out and stays idle until shut down.
    NoSuchFolder,
}

/// What a watcher can be told to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchCommand {
    /// Remove this message. Ignored (with a warning) if `uid_validity` is not the mailbox's.
    Delete { uid_validity: u32, uid: u32 },
}

/// Starts watching `target` until `shutdown` is cancelled or `events` is closed.
///
/// `start_after` is a saved [`WatchEvent::Cursor`]: if its UIDVALIDITY still holds, everything
/// after its UID is reported (catch-up). Otherwise the watcher starts at the mailbox's UIDNEXT:
/// mail that was there before it is not ours to judge. After a reconnect the same watcher always
/// continues from the last UID it reported.
///
/// Arrivals may repeat across watchers if the consumer did not persist the last cursor before a
/// restart; consumers dedupe by `(uid_validity, uid)`.
pub fn spawn_watcher(
    target: ImapTarget,
    start_after: Option<(u32, u32)>,
    events: mpsc::Sender<WatchEvent>,
    commands: mpsc::Receiver<WatchCommand>,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    let watcher = Watcher {
        target,
        events,
        commands,
        commands_open: true,
        cursor: start_after,
        announced: start_after,
        deletes: BTreeSet::new(),
        tls: None,
    };
    tokio::spawn(async move {
        // Every await of the watcher is a safe place to stop: dropping a session just closes its
        // connection, and what was not yet reported is found again from the cursor.
        tokio::select! {
            _ = shutdown.cancelled() => {}
            () = watcher.run() => {}
        }
    })
}

/// Why a session ended.
enum Stop {
    /// Report it and reconnect.
    Failed(Failure),
    /// Nobody listens to the events any more: the watcher ends.
    ConsumerGone,
}

impl From<Failure> for Stop {
    fn from(f: Failure) -> Self {
        Stop::Failed(f)
    }
}

/// A classified failure. `detail` never contains the password (see [`Watcher::report`]).
#[derive(Debug, thiserror::Error)]
#[error("{reason}: {detail}")]
struct Failure {
    reason: Reason,
    detail: String,
}

impl Failure {
    fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }

    /// A failure of an IMAP command. A dropped connection counts as `connect` (the network or
    /// the server went away); anything the server said that we did not want is `protocol`.
    fn imap(during: &str, e: ImapError) -> Self {
        let reason = match &e {
            ImapError::Io(_) | ImapError::ConnectionLost => Reason::Connect,
            _ => Reason::Protocol,
        };
        Self::new(reason, format!("{during}: {e}"))
    }

    fn timeout(during: &str, limit: Duration) -> Self {
        Self::new(
            Reason::Timeout,
            format!("{during}: no answer within {limit:?}"),
        )
    }
}

/// Runs one command with the target's time limit.
async fn within<T>(
    limit: Duration,
    during: &str,
    fut: impl Future<Output = Result<T, ImapError>>,
) -> Result<T, Failure> {
    match timeout(limit, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Failure::imap(during, e)),
        Err(_) => Err(Failure::timeout(during, limit)),
    }
}

/// The connection under the IMAP client: plain TCP or TLS (direct or after STARTTLS).
#[derive(Debug)]
enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// What the server offers, as far as the watcher cares.
#[derive(Clone, Copy, Debug)]
struct Offers {
    idle: bool,
    uidplus: bool,
}

impl Offers {
    fn from(caps: &Capabilities) -> Self {
        // `Capabilities::has_str` compares atoms case-sensitively; RFC 3501 atoms are not.
        let has = |name: &str| {
            caps.iter()
                .any(|c| matches!(c, Capability::Atom(a) if a.eq_ignore_ascii_case(name)))
        };
        Self {
            idle: has("IDLE"),
            uidplus: has("UIDPLUS"),
        }
    }
}

/// Reconnect delays: exponential from [`BACKOFF_MIN`] to [`BACKOFF_MAX`], each drawn from
/// `[base/2, base]` ("equal jitter") so that watchers failing together spread out.
struct Backoff {
    base: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self { base: BACKOFF_MIN }
    }

    fn reset(&mut self) {
        self.base = BACKOFF_MIN;
    }

    fn next_delay(&mut self) -> Duration {
        use rand::RngExt;
        let base = self.base;
        self.base = (base * 2).min(BACKOFF_MAX);
        let half = base / 2;
        let jitter = rand::rng().random_range(0..=half.as_micros() as u64);
        half + Duration::from_micros(jitter)
    }
}

struct Watcher {
    target: ImapTarget,
    events: mpsc::Sender<WatchEvent>,
    commands: mpsc::Receiver<WatchCommand>,
    /// False once every command sender is gone: stop listening, keep watching.
    commands_open: bool,
    /// `(uid_validity, last reported UID)`: where the next search starts. `start_after` until
    /// the first SELECT, then always the mailbox's own.
    cursor: Option<(u32, u32)>,
    /// The cursor the consumer knows (from `start_after` or the last `Cursor` event).
    announced: Option<(u32, u32)>,
    /// Deletes not yet carried out, kept across reconnects.
    deletes: BTreeSet<(u32, u32)>,
    /// Built on first use and kept: the root store does not change.
    tls: Option<TlsConnector>,
}

impl Watcher {
    async fn run(mut self) {
        let mut backoff = Backoff::new();
        loop {
            let failure = match self.session(&mut backoff).await {
                Stop::ConsumerGone => return,
                Stop::Failed(f) => f,
            };
            let delay = backoff.next_delay();
            debug!(
                host = %self.target.host,
                reason = %failure.reason,
                ?delay,
                "imap watcher: session failed, reconnecting"
            );
            if let Err(Stop::ConsumerGone) = self.report(failure).await {
                return;
            }
            sleep(delay).await;
        }
    }

    /// Sends `Failed`, with the password scrubbed from the detail should a server echo it.
    async fn report(&self, failure: Failure) -> Result<(), Stop> {
        self.emit(WatchEvent::Failed {
            reason: failure.reason,
            detail: super::redact(&failure.detail, &self.target.password),
        })
        .await
    }

    async fn emit(&self, event: WatchEvent) -> Result<(), Stop> {
        self.events
            .send(event)
            .await
            .map_err(|_| Stop::ConsumerGone)
    }

    /// One session, from connect to its failure (a session never ends otherwise).
    async fn session(&mut self, backoff: &mut Backoff) -> Stop {
        match self.session_inner(backoff).await {
            Ok(never) => match never {},
            Err(stop) => stop,
        }
    }

    async fn session_inner(
        &mut self,
        backoff: &mut Backoff,
    ) -> Result<std::convert::Infallible, Stop> {
        let (mut session, offers) = self.connect().await?;
        let limit = self.target.timeout;

        let Some(folder) = self.folder(&mut session).await? else {
            self.emit(WatchEvent::NoSuchFolder).await?;
            let _ = timeout(limit, session.logout()).await;
            return std::future::pending().await;
        };
        let mailbox = within(limit, "SELECT", session.select(&folder)).await?;
        let validity = mailbox.uid_validity.ok_or_else(|| {
            Failure::new(Reason::Protocol, "SELECT: the server sent no UIDVALIDITY")
        })?;
        let uid_next = match mailbox.uid_next {
            Some(n) => n,
            // RFC 3501 requires UIDNEXT in SELECT; if a server leaves it out, the highest UID
            // present is the next best thing.
            None => {
                let all = within(limit, "UID SEARCH ALL", session.uid_search("ALL")).await?;
                all.into_iter().max().map_or(1, |u| u.saturating_add(1))
            }
        };
        let last = match self.cursor {
            Some((v, last)) if v == validity => last,
            Some((v, _)) => {
                warn!(
                    host = %self.target.host,
                    mailbox = %self.target.mailbox,
                    old = v,
                    new = validity,
                    "imap watcher: UIDVALIDITY changed, old UIDs are void; starting at UIDNEXT"
                );
                uid_next.saturating_sub(1)
            }
            None => uid_next.saturating_sub(1),
        };
        self.cursor = Some((validity, last));

        let idle = offers.idle && self.target.idle;
        // debug, not info: the consumer logs `Connected` and `Failed` itself.
        debug!(
            host = %self.target.host,
            mailbox = %self.target.mailbox,
            uid_validity = validity,
            last_uid = last,
            idle,
            "imap watcher: connected"
        );
        self.emit(WatchEvent::Connected { idle }).await?;
        if self.announced != self.cursor {
            self.announce().await?;
        }

        // Deletes asked for while we were away, then whatever arrived meanwhile.
        self.take_commands();
        self.run_deletes(&mut session, offers).await?;
        drain(&mut session);
        self.fetch_new(&mut session).await?;
        // Only a session that got this far proves the server is back: one that fails right
        // after LOGIN keeps backing off.
        backoff.reset();

        loop {
            if idle {
                session = self.idle_wait(session).await?;
            } else {
                self.poll_wait().await;
            }
            self.take_commands();
            self.run_deletes(&mut session, offers).await?;
            drain(&mut session);
            if !idle {
                // A server may show new mail to a session only once it has announced it (the
                // sandbox does; RFC 3501 lets it): NOOP is where it does, so the search after it
                // sees the mail one poll earlier than a bare search would.
                within(self.target.timeout, "NOOP", session.noop()).await?;
            }
            self.fetch_new(&mut session).await?;
        }
    }

    /// The name of the folder to SELECT: the target's, or the one LIST marks `\Junk`.
    async fn folder(&self, s: &mut Session<Conn>) -> Result<Option<String>, Failure> {
        if self.target.mailbox != SPECIAL_USE_JUNK {
            return Ok(Some(self.target.mailbox.clone()));
        }
        let names = within(self.target.timeout, "LIST", async {
            s.list(Some(""), Some("*"))
                .await?
                .try_collect::<Vec<_>>()
                .await
        })
        .await?;
        Ok(names
            .iter()
            .find(|n| {
                n.attributes()
                    .iter()
                    .any(|a| matches!(a, async_imap::types::NameAttribute::Junk))
            })
            .map(|n| n.name().to_string()))
    }

    /// TCP, TLS as the target says, greeting, LOGIN and the server's capabilities.
    async fn connect(&mut self) -> Result<(Session<Conn>, Offers), Failure> {
        let limit = self.target.timeout;
        let (host, port) = (self.target.host.clone(), self.target.port);
        let tcp = match timeout(limit, TcpStream::connect((host.as_str(), port))).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                return Err(Failure::new(
                    Reason::Connect,
                    format!("connect to {host}:{port}: {e}"),
                ));
            }
            Err(_) => {
                return Err(Failure::timeout(
                    &format!("connect to {host}:{port}"),
                    limit,
                ));
            }
        };
        // IDLE pushes and our short commands are single small writes: no Nagle delay.
        let _ = tcp.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE_TIME)
            .with_interval(KEEPALIVE_INTERVAL)
            .with_retries(KEEPALIVE_RETRIES);
        if let Err(e) = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive) {
            debug!(host = %host, error = %e, "imap watcher: no TCP keepalive on this socket");
        }

        let client = match self.target.tls {
            TlsMode::None => {
                let mut c = Client::new(Conn::Plain(tcp));
                greeting(&mut c, limit).await?;
                c
            }
            TlsMode::Tls => {
                let tls = self.handshake(tcp).await?;
                let mut c = Client::new(Conn::Tls(Box::new(tls)));
                greeting(&mut c, limit).await?;
                c
            }
            TlsMode::StartTls => {
                let mut c = Client::new(Conn::Plain(tcp));
                greeting(&mut c, limit).await?;
                match timeout(limit, c.run_command_and_check_ok("STARTTLS", None)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e @ (ImapError::Bad(_) | ImapError::No(_)))) => {
                        return Err(Failure::new(
                            Reason::Tls,
                            format!("STARTTLS refused (the target requires it): {e}"),
                        ));
                    }
                    Ok(Err(e)) => return Err(Failure::imap("STARTTLS", e)),
                    Err(_) => return Err(Failure::timeout("STARTTLS", limit)),
                }
                // Anything the server sent after its OK is discarded with the plaintext
                // buffer, as RFC 3501 6.2.1 requires.
                let Conn::Plain(tcp) = c.into_inner() else {
                    unreachable!("the STARTTLS client was built over plain TCP")
                };
                // No greeting after STARTTLS: the session goes on where it was.
                Client::new(Conn::Tls(Box::new(self.handshake(tcp).await?)))
            }
        };

        let t = &self.target;
        let (mut session, caps) = match &t.oauth2 {
            None => login(client, t, limit).await?,
            Some(o) => (authenticate(client, t, o, limit).await?, None),
        };
        let caps = match caps {
            Some(c) => c,
            None => within(limit, "CAPABILITY", session.capabilities()).await?,
        };
        Ok((session, Offers::from(&caps)))
    }

    async fn handshake(&mut self, tcp: TcpStream) -> Result<TlsStream<TcpStream>, Failure> {
        let connector = match &self.tls {
            Some(c) => c.clone(),
            None => {
                let c = tls_connector(self.target.extra_roots_pem.as_deref())?;
                self.tls = Some(c.clone());
                c
            }
        };
        let host = self.target.host.clone();
        let name = ServerName::try_from(host.clone())
            .map_err(|e| Failure::new(Reason::Tls, format!("server name {host:?}: {e}")))?;
        match timeout(self.target.timeout, connector.connect(name, tcp)).await {
            Ok(Ok(tls)) => Ok(tls),
            Ok(Err(e)) => Err(Failure::new(
                Reason::Tls,
                format!("TLS handshake with {host}: {e}"),
            )),
            Err(_) => Err(Failure::timeout("TLS handshake", self.target.timeout)),
        }
    }

    /// Moves every queued command into the watcher's own lists, without waiting.
    fn take_commands(&mut self) {
        while self.commands_open {
            match self.commands.try_recv() {
                Ok(c) => self.accept(c),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => self.commands_open = false,
            }
        }
    }

    fn accept(&mut self, command: WatchCommand) {
        match command {
            WatchCommand::Delete { uid_validity, uid } => {
                self.deletes.insert((uid_validity, uid));
            }
        }
    }

    /// Waits for the next command (forever once no sender is left).
    async fn next_command(&mut self) {
        if !self.commands_open {
            return std::future::pending().await;
        }
        match self.commands.recv().await {
            Some(c) => self.accept(c),
            None => {
                self.commands_open = false;
                std::future::pending::<()>().await
            }
        }
    }

    /// IDLE until the server reports a change, a command arrives or the target's
    /// `idle_refresh` passes.
    async fn idle_wait(&mut self, session: Session<Conn>) -> Result<Session<Conn>, Stop> {
        let limit = self.target.timeout;
        let unsolicited = session.unsolicited_responses.clone();
        let mut handle = session.idle();
        within(limit, "IDLE", handle.init()).await?;
        // The server may have announced mail during our last FETCH or right before its "+":
        // async-imap files those under unsolicited responses. A search since the last drain may
        // have missed them, so look before sleeping, or we would sleep on news until the refresh.
        // A full channel may have dropped some: assume news.
        let mut news = unsolicited.is_full();
        while let Ok(r) = unsolicited.try_recv() {
            news |= announces_mail(&r);
        }
        if !news {
            let refresh = self
                .target
                .idle_refresh
                .clamp(IDLE_REFRESH_FLOOR, IDLE_REFRESH);
            let until = Instant::now() + refresh;
            let (wait, _interrupt) = handle.wait_with_timeout(refresh);
            tokio::select! {
                r = wait => match r {
                    Ok(IdleResponse::NewData(_) | IdleResponse::Timeout) => {}
                    // We never interrupt it: it means the server closed the connection.
                    Ok(IdleResponse::ManualInterrupt) => {
                        return Err(Failure::imap("IDLE", ImapError::ConnectionLost).into());
                    }
                    Err(e) => return Err(Failure::imap("IDLE", e).into()),
                },
                () = self.next_command() => {}
                () = sleep_until(until) => {}
            }
        }
        Ok(within(limit, "DONE", handle.done()).await?)
    }

    /// Sleeps one poll interval, or less if a command arrives.
    async fn poll_wait(&mut self) {
        let interval = self.target.poll_interval.max(POLL_FLOOR);
        tokio::select! {
            () = sleep(interval) => {}
            () = self.next_command() => {}
        }
    }

    /// Reports every message after the cursor, in UID order, in batches, each batch followed
    /// by a `Cursor`.
    async fn fetch_new(&mut self, s: &mut Session<Conn>) -> Result<(), Stop> {
        let limit = self.target.timeout;
        let Some((validity, last)) = self.cursor else {
            unreachable!("the cursor is set at SELECT, before any fetch")
        };
        if last == u32::MAX {
            return Ok(());
        }
        // `n:*` always includes the highest UID, even when it is below n: filter.
        let query = format!("UID {}:*", last + 1);
        let found = within(limit, "UID SEARCH", s.uid_search(&query)).await?;
        let (seen_at, seen) = (SystemTime::now(), std::time::Instant::now());
        let mut uids: Vec<u32> = found.into_iter().filter(|u| *u > last).collect();
        if uids.is_empty() {
            return Ok(());
        }
        uids.sort_unstable();

        for batch in uids.chunks(FETCH_BATCH) {
            let set = uid_set(batch);
            let fetched: Vec<Fetch> = within(limit, "UID FETCH", async {
                s.uid_fetch(&set, "(UID INTERNALDATE BODY.PEEK[])")
                    .await?
                    .try_collect()
                    .await
            })
            .await?;
            let mut arrivals: Vec<Arrival> = fetched
                .iter()
                .filter_map(|f| {
                    // Unsolicited FETCHes (flag changes by other sessions) share the stream.
                    let uid = f.uid.filter(|u| batch.binary_search(u).is_ok())?;
                    Some(Arrival {
                        uid,
                        uid_validity: validity,
                        raw: f.body()?.to_vec(),
                        internal_date: f.internal_date().map(SystemTime::from),
                        seen_at,
                        seen,
                    })
                })
                .collect();
            arrivals.sort_by_key(|a| a.uid);
            arrivals.dedup_by_key(|a| a.uid);

            if arrivals.len() < batch.len() {
                // async-imap ends a FETCH stream at the tagged reply without looking at it, so
                // a NO looks like an empty answer. Messages expunged since the search are fine
                // to skip; any that still exist must not be skipped past.
                let missing: Vec<u32> = batch
                    .iter()
                    .copied()
                    .filter(|u| arrivals.binary_search_by_key(u, |a| a.uid).is_err())
                    .collect();
                let query = format!("UID {}", uid_set(&missing));
                let still = within(limit, "UID SEARCH", s.uid_search(&query)).await?;
                if let Some(uid) = missing.iter().find(|u| still.contains(u)) {
                    return Err(Failure::new(
                        Reason::Protocol,
                        format!("UID FETCH: the server did not return UID {uid}"),
                    )
                    .into());
                }
                debug!(
                    ?missing,
                    "imap watcher: messages expunged before they were fetched"
                );
            }

            for a in arrivals {
                self.emit(WatchEvent::Arrived(a)).await?;
            }
            let done = *batch.last().expect("chunks are never empty");
            self.cursor = Some((validity, done));
            self.announce().await?;
        }
        Ok(())
    }

    async fn announce(&mut self) -> Result<(), Stop> {
        let Some((uid_validity, last_uid)) = self.cursor else {
            return Ok(());
        };
        self.emit(WatchEvent::Cursor {
            uid_validity,
            last_uid,
        })
        .await?;
        self.announced = self.cursor;
        Ok(())
    }

    /// Carries out the queued deletes of the current UIDVALIDITY: flag exactly those UIDs
    /// `\Deleted`, then expunge exactly those (UIDPLUS), or plain EXPUNGE when nothing else in
    /// the mailbox is `\Deleted`. A delete the server refuses is logged and dropped (cleanup must
    /// never stop the watching); one cut short by the connection is retried after reconnecting.
    async fn run_deletes(&mut self, s: &mut Session<Conn>, offers: Offers) -> Result<(), Stop> {
        if self.deletes.is_empty() {
            return Ok(());
        }
        let Some((validity, _)) = self.cursor else {
            return Ok(());
        };
        let mut uids = Vec::new();
        for &(v, uid) in &self.deletes {
            if v == validity {
                uids.push(uid);
            } else {
                warn!(
                    uid,
                    uid_validity = v,
                    mailbox_uid_validity = validity,
                    "imap watcher: delete ignored, its UIDVALIDITY is not the mailbox's"
                );
            }
        }
        match self.delete(s, &uids, offers).await {
            Ok(()) => {}
            Err(f) if f.reason == Reason::Protocol => {
                warn!(?uids, error = %f, "imap watcher: the server refused a delete; dropped");
            }
            Err(f) => return Err(f.into()),
        }
        self.deletes.clear();
        self.emit(WatchEvent::Deleted {
            uid_validity: validity,
            uids,
        })
        .await
    }

    async fn delete(
        &mut self,
        s: &mut Session<Conn>,
        uids: &[u32],
        offers: Offers,
    ) -> Result<(), Failure> {
        if uids.is_empty() {
            return Ok(());
        }
        let limit = self.target.timeout;
        let set = uid_set(uids);
        within(limit, "UID STORE", async {
            s.uid_store(&set, "+FLAGS.SILENT (\\Deleted)")
                .await?
                .try_collect::<Vec<_>>()
                .await
        })
        .await?;
        if offers.uidplus {
            within(limit, "UID EXPUNGE", async {
                s.uid_expunge(&set).await?.try_collect::<Vec<_>>().await
            })
            .await?;
        } else {
            let deleted = within(limit, "UID SEARCH DELETED", s.uid_search("DELETED")).await?;
            let others = deleted.iter().filter(|u| !uids.contains(u)).count();
            if others > 0 {
                warn!(
                    ?uids,
                    others,
                    "imap watcher: no UIDPLUS and other messages are \\Deleted too; \
                     left ours flagged rather than expunge someone else's mail"
                );
                return Ok(());
            }
            within(limit, "EXPUNGE", async {
                s.expunge().await?.try_collect::<Vec<_>>().await
            })
            .await?;
        }
        // async-imap does not look at the tagged reply of STORE and EXPUNGE: check the result.
        let left = within(limit, "UID SEARCH", s.uid_search(format!("UID {set}"))).await?;
        let left: Vec<u32> = uids.iter().copied().filter(|u| left.contains(u)).collect();
        if left.is_empty() {
            debug!(?uids, "imap watcher: deleted");
        } else {
            warn!(
                ?left,
                "imap watcher: the server did not remove these messages"
            );
        }
        Ok(())
    }
}

/// Reads the greeting: `* OK` or `* PREAUTH` go on, `* BYE` is a refused connection.
/// LOGIN with the password.
async fn login(
    client: Client<Conn>,
    t: &ImapTarget,
    limit: Duration,
) -> Result<(Session<Conn>, Option<Capabilities>), Failure> {
    match timeout(
        limit,
        client.login_with_capabilities(&t.username, &t.password),
    )
    .await
    {
        Ok(Ok(ok)) => Ok(ok),
        Ok(Err((e, _))) => {
            let reason = match e {
                ImapError::Io(_) | ImapError::ConnectionLost => Reason::Connect,
                // NO is a refusal; BAD to LOGIN means plaintext login is disabled or the
                // credentials cannot be sent: either way the operator fixes credentials/TLS.
                _ => Reason::Auth,
            };
            Err(Failure::new(
                reason,
                format!("LOGIN as {:?}: {e}", t.username),
            ))
        }
        Err(_) => Err(Failure::timeout("LOGIN", limit)),
    }
}

/// `AUTHENTICATE XOAUTH2|OAUTHBEARER` with a token from the target's source. A token endpoint
/// that fails is `token`; a refused token is `auth`, and the source drops that token so the
/// next reconnect asks for a new one.
async fn authenticate(
    client: Client<Conn>,
    t: &ImapTarget,
    o: &super::oauth2::Login,
    limit: Duration,
) -> Result<Session<Conn>, Failure> {
    let token = o
        .source
        .token()
        .await
        .map_err(|e| Failure::new(Reason::Token, e.to_string()))?;
    let auth = OAuth2Authenticator {
        first: Some(o.mechanism.initial_response(&t.username, &token)),
        ack: o.mechanism.error_ack(),
    };
    let mechanism = o.mechanism.as_str();
    let outcome = timeout(limit, client.authenticate(mechanism, auth)).await;
    let refused = |e: ImapError| {
        let reason = match e {
            ImapError::Io(_) | ImapError::ConnectionLost => Reason::Connect,
            _ => Reason::Auth,
        };
        let detail = super::redact(
            &format!("AUTHENTICATE {mechanism} as {:?}: {e}", t.username),
            token.expose(),
        );
        (reason, detail)
    };
    match outcome {
        Ok(Ok(session)) => Ok(session),
        Ok(Err((e, _))) => {
            let (reason, detail) = refused(e);
            if reason == Reason::Auth {
                o.source.refused(&token).await;
            }
            Err(Failure::new(reason, detail))
        }
        Err(_) => Err(Failure::timeout("AUTHENTICATE", limit)),
    }
}

/// Sends the initial response at the first continuation, and the mechanism's
/// acknowledgement to any later one (the server's error challenge).
struct OAuth2Authenticator {
    first: Option<Vec<u8>>,
    ack: &'static [u8],
}

impl async_imap::Authenticator for OAuth2Authenticator {
    type Response = Vec<u8>;

    fn process(&mut self, _challenge: &[u8]) -> Vec<u8> {
        self.first.take().unwrap_or_else(|| self.ack.to_vec())
    }
}

async fn greeting(client: &mut Client<Conn>, limit: Duration) -> Result<(), Failure> {
    let response = match timeout(limit, client.read_response()).await {
        Ok(Ok(Some(r))) => r,
        Ok(Ok(None)) => {
            return Err(Failure::new(
                Reason::Connect,
                "connection closed before the greeting",
            ));
        }
        Ok(Err(e)) => return Err(Failure::imap("greeting", ImapError::Io(e))),
        Err(_) => return Err(Failure::timeout("greeting", limit)),
    };
    match response.parsed() {
        Response::Data {
            status: Status::Ok | Status::PreAuth,
            ..
        } => Ok(()),
        Response::Data {
            status: Status::Bye,
            outcome,
        } => Err(Failure::new(
            Reason::Connect,
            format!(
                "the server refused the connection: {}",
                outcome.information.as_deref().unwrap_or("BYE")
            ),
        )),
        other => Err(Failure::new(
            Reason::Protocol,
            format!("unexpected greeting: {other:?}"),
        )),
    }
}

/// Empties the unsolicited-responses channel: what it holds is older than the search to come.
fn drain(s: &mut Session<Conn>) {
    while s.unsolicited_responses.try_recv().is_ok() {}
}

fn announces_mail(r: &UnsolicitedResponse) -> bool {
    matches!(
        r,
        UnsolicitedResponse::Exists(_) | UnsolicitedResponse::Recent(_)
    )
}

/// An IMAP UID set naming exactly `uids` (sorted, distinct): consecutive runs become `a:b`,
/// which, unlike `a:*`, covers no UID outside the run.
fn uid_set(uids: &[u32]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < uids.len() {
        let start = uids[i];
        let mut end = start;
        while i + 1 < uids.len() && uids[i + 1] == end.wrapping_add(1) {
            i += 1;
            end = uids[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}:{end}"));
        }
        i += 1;
    }
    out
}

/// rustls over ring with webpki-roots plus the target's extra roots.
fn tls_connector(extra_roots_pem: Option<&[u8]>) -> Result<TlsConnector, Failure> {
    let config =
        super::rustls_client_config(extra_roots_pem).map_err(|e| Failure::new(Reason::Tls, e))?;
    Ok(TlsConnector::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_sets_name_exactly_the_given_uids() {
        assert_eq!(uid_set(&[7]), "7");
        assert_eq!(uid_set(&[1, 2, 3, 5, 9, 10]), "1:3,5,9:10");
        assert_eq!(uid_set(&[3, 5]), "3,5");
        assert_eq!(uid_set(&[u32::MAX - 1, u32::MAX]), "4294967294:4294967295");
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let mut b = Backoff::new();
        let first = b.next_delay();
        assert!(first >= BACKOFF_MIN / 2 && first <= BACKOFF_MIN);
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(d <= BACKOFF_MAX);
        }
        let capped = b.next_delay();
        assert!(capped >= BACKOFF_MAX / 2);
        b.reset();
        assert!(b.next_delay() <= BACKOFF_MIN);
    }

    #[test]
    fn debug_never_shows_the_password() {
        let t = ImapTarget {
            host: "imap.example.test".into(),
            port: 993,
            tls: TlsMode::Tls,
            username: "u".into(),
            password: "hunter2".into(),
            oauth2: None,
            mailbox: "INBOX".into(),
            extra_roots_pem: None,
            timeout: Duration::from_secs(5),
            idle: true,
            poll_interval: Duration::from_secs(5),
            idle_refresh: IDLE_REFRESH,
        };
        assert!(!format!("{t:?}").contains("hunter2"));
    }
}
