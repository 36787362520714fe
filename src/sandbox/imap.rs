//! The sandbox's IMAP server, on imap-next's sans-I/O state machine.
//!
//! imap-next owns the wire: greeting, framing, literals (sync and LITERAL+), the IDLE and
//! AUTHENTICATE flows; imap-codec parses commands into `imap_types`. This module owns what a
//! command *means*, in three layers:
//!
//! - [`serve`] and `connection`: accept, one task per connection, faults, IDLE wake-ups, shutdown.
//! - `Session`: RFC 3501 state (not authenticated / authenticated / selected) and one handler per
//!   command, returning responses. It does no I/O, so it cannot block the connection loop.
//! - message helpers: sequence sets, SEARCH keys, FETCH sections and ENVELOPE over raw RFC 5322
//!   bytes (mail-parser for decoding and MIME structure).
//!
//! Each selected session keeps its own sequence-number view (a list of UIDs) and syncs it with
//! the mailbox: new mail becomes `* n EXISTS` after any command and at once during IDLE; mail
//! expunged elsewhere becomes `* n EXPUNGE` only where RFC 3501 7.4.1 allows it (NOOP, CHECK,
//! EXPUNGE, IDLE), never during FETCH, STORE or SEARCH. Until then such a message is a "ghost":
//! it keeps its sequence number, FETCH skips it and SEARCH never matches it.
//!
//! Mailbox faults: `error` refuses LOGIN; `stall` holds each command (and IDLE push) until the
//! fault is cleared, then answers in order; `delay:<d>` delays each command by d; `drop` closes
//! new connections at once and existing ones at their next command.

use std::{
    borrow::Cow,
    cell::OnceCell,
    collections::{HashMap, HashSet},
    num::NonZeroU32,
    sync::Arc,
    time::Duration,
};

use imap_next::{
    imap_types::{
        IntoStatic,
        body::{BasicFields, Body, BodyStructure, SpecificFields},
        command::{Command, CommandBody},
        core::{AString, Atom, Charset, IString, Literal, NString, QuotedChar, Tag, Text, Vec1},
        datetime::DateTime,
        envelope::{Address, Envelope},
        extensions::binary::LiteralOrLiteral8,
        fetch::{MacroOrMessageDataItemNames, MessageDataItem, MessageDataItemName, Section},
        flag::{Flag, FlagFetch, FlagPerm, StoreResponse, StoreType},
        mailbox::{ListMailbox, Mailbox as ImapMailbox},
        response::{
            Capability, Code, CodeOther, CommandContinuationRequest, Data, Greeting, Response,
            Status, StatusBody, StatusKind, Tagged,
        },
        search::SearchKey,
        sequence::{SeqOrUid, Sequence, SequenceSet},
        status::{StatusDataItem, StatusDataItemName},
    },
    server::{self, Event, Options, ResponseHandle, Server},
    stream::{self, Stream},
};
use mail_parser::{MessageParser, MimeHeaders, PartType};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    time::{Instant, sleep, sleep_until, timeout},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, warn};

use super::{
    faults::{Fault, FaultBoard, Stage},
    mailbox::{FlagChange, Flags, JUNK, Mailbox, Mailboxes, MessageState},
};

/// Largest literal a client may send (APPEND, LOGIN strings). The sandbox's own mail is small;
/// 1 MiB keeps a misbehaving client from making us buffer much.
pub const MAX_LITERAL_SIZE: u32 = 1024 * 1024;

/// Largest command, literals included. imap-next requires it to exceed `MAX_LITERAL_SIZE`.
pub const MAX_COMMAND_SIZE: u32 = MAX_LITERAL_SIZE + 64 * 1024;

/// RFC 3501 5.4's inactivity autologout (at least 30 minutes). Without it, clients that vanish
/// without closing their socket would hold a task each forever. IDLE clients re-issue IDLE well
/// within this, as RFC 2177 asks.
const AUTOLOGOUT: Duration = Duration::from_secs(31 * 60);

/// How long a closing connection may take to flush its last words (BYE) to a slow client.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// Serves IMAP on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    mailboxes: Arc<Mailboxes>,
    faults: FaultBoard,
    shutdown: CancellationToken,
) {
    serve_with(listener, mailboxes, faults, shutdown, Duration::ZERO).await
}

/// [`serve`], with IDLE pushes held back by `idle_push_delay` after a change, as Dovecot does
/// (500 ms, its `NOTIFY_DELAY_MSECS`), so that the sandbox can stand in for it faithfully.
pub async fn serve_with(
    listener: TcpListener,
    mailboxes: Arc<Mailboxes>,
    faults: FaultBoard,
    shutdown: CancellationToken,
    idle_push_delay: Duration,
) {
    // A tracker rather than a JoinSet: it does not accumulate the results of finished
    // connections, so a sandbox that runs for days stays flat.
    let tracker = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, peer)) => {
                debug!(%peer, "imap: connection accepted");
                tracker.spawn(connection(
                    tcp,
                    Arc::clone(&mailboxes),
                    faults.clone(),
                    shutdown.clone(),
                    idle_push_delay,
                ));
            }
            Err(e) => {
                // Typically EMFILE: back off instead of spinning on a listener that cannot accept.
                warn!(error = %e, "imap: accept failed");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = sleep(Duration::from_millis(50)) => {}
                }
            }
        }
    }
    tracker.close();
    tracker.wait().await;
}

/// What the fault board says a command may do.
enum Gate {
    Go,
    Close,
}

/// Applies the mailbox stage's `stall`, `delay` and `drop` to one unit of work (a command or an
/// IDLE push). `error` is LOGIN's business (and ends logged-in sessions, see `connection`), so
/// it passes here.
async fn gate(faults: &FaultBoard, shutdown: &CancellationToken) -> Gate {
    let fault = match faults.get(Stage::Mailbox) {
        Fault::Stall => tokio::select! {
            _ = shutdown.cancelled() => return Gate::Close,
            fault = faults.wait_unstalled(Stage::Mailbox) => fault,
        },
        fault => fault,
    };
    match fault {
        Fault::Drop => Gate::Close,
        Fault::Delay(d) => tokio::select! {
            _ = shutdown.cancelled() => Gate::Close,
            _ = sleep(d) => Gate::Go,
        },
        // Throttle and garbage are the api's only (refused when set elsewhere).
        Fault::Ok | Fault::Error | Fault::Stall | Fault::Throttle | Fault::Garbage => Gate::Go,
    }
}

fn server_options() -> Options {
    let mut options = Options::default();
    options.max_literal_size = MAX_LITERAL_SIZE;
    options.max_command_size = MAX_COMMAND_SIZE;
    // Accept bare LF too: people poke the sandbox with netcat.
    options.crlf_relaxed = true;
    // Both texts are constant and valid; failing to set them only leaves imap-next's "...".
    let _ = options.set_literal_accept_text("ready for literal".into());
    let _ = options.set_literal_reject_text(format!(
        "literal too large (this sandbox takes up to {MAX_LITERAL_SIZE} bytes)"
    ));
    options
}

/// One client, from accept to close.
async fn connection(
    tcp: TcpStream,
    mailboxes: Arc<Mailboxes>,
    faults: FaultBoard,
    shutdown: CancellationToken,
    idle_push_delay: Duration,
) {
    if faults.get(Stage::Mailbox) == Fault::Drop {
        debug!("imap: mailbox=drop, closing new connection");
        return;
    }
    // IDLE pushes are single small writes: don't let Nagle hold them back.
    let _ = tcp.set_nodelay(true);
    let greeting = Greeting::ok(
        Some(Code::Capability(capabilities())),
        "mailcanary sandbox IMAP ready",
    )
    .unwrap_or_else(|_| Greeting::ok(None, "ready").expect("constant greeting is valid"));
    let mut server = Server::new(server_options(), greeting.into_static());
    let mut stream = Stream::insecure(tcp);
    let mut session = Session::new(mailboxes, faults.clone());

    // The tag of the IDLE in progress, and the receiver that wakes it on mailbox changes.
    let mut idle: Option<(Tag<'static>, watch::Receiver<u64>)> = None;
    // Set once LOGOUT was answered: the connection ends when that answer is on the wire.
    let mut logout: Option<ResponseHandle> = None;
    let mut autologout = Instant::now() + AUTOLOGOUT;
    // A mailbox server that breaks (`error`) or goes away (`drop`) ends the sessions it has,
    // idle ones included, the way a restarted or failing Dovecot does: clients must log in
    // again and meet the refusal, instead of idling on unaware.
    let mut fault_rx = faults.subscribe();

    loop {
        let event = tokio::select! {
            Ok(()) = fault_rx.changed() => {
                let fault = faults.get(Stage::Mailbox);
                let logged_in = session.user_mailbox().is_some();
                if fault == Fault::Drop || (fault == Fault::Error && logged_in) {
                    say_bye(&mut stream, &mut server, "mailbox unavailable").await;
                    return;
                }
                continue;
            }
            _ = shutdown.cancelled() => {
                say_bye(&mut stream, &mut server, "sandbox shutting down").await;
                return;
            }
            _ = sleep_until(autologout) => {
                say_bye(&mut stream, &mut server, "autologout: idle for too long").await;
                return;
            }
            () = mailbox_changed(idle.as_mut().map(|(_, rx)| rx)) => {
                if !idle_push_delay.is_zero() {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = sleep(idle_push_delay) => {}
                    }
                }
                // An IDLE push is held by a stall like any response.
                if let Gate::Close = gate(&faults, &shutdown).await {
                    return;
                }
                let mut out = Vec::new();
                session.sync(&mut out, true);
                enqueue_all(&mut server, out);
                continue;
            }
            event = stream.next(&mut server) => event,
        };
        if matches!(
            event,
            Ok(Event::CommandReceived { .. }
                | Event::IdleCommandReceived { .. }
                | Event::IdleDoneReceived)
        ) {
            autologout = Instant::now() + AUTOLOGOUT;
        }

        match event {
            Ok(Event::GreetingSent { .. }) => {}
            Ok(Event::ResponseSent { handle, .. }) => {
                if logout == Some(handle) {
                    let _ = timeout(FLUSH_TIMEOUT, stream.flush()).await;
                    return;
                }
            }
            Ok(Event::CommandReceived { command }) => {
                if logout.is_some() {
                    continue;
                }
                if let Gate::Close = gate(&faults, &shutdown).await {
                    return;
                }
                let reply = session.handle(command);
                let last = enqueue_all(&mut server, reply.responses);
                if reply.logout {
                    logout = last;
                }
            }
            Ok(Event::IdleCommandReceived { tag }) => {
                if let Gate::Close = gate(&faults, &shutdown).await {
                    return;
                }
                match session.idle_receiver() {
                    Some(mut rx) => {
                        // Mark the current version seen *before* syncing, so that a delivery
                        // racing with this sync still wakes us.
                        rx.borrow_and_update();
                        let cont = CommandContinuationRequest::basic(None, "idling")
                            .unwrap_or_else(|_| {
                                CommandContinuationRequest::basic(None, "idling, send DONE")
                                    .expect("constant continuation is valid")
                            });
                        if server.idle_accept(cont).is_ok() {
                            let mut out = Vec::new();
                            session.sync(&mut out, true);
                            enqueue_all(&mut server, out);
                            idle = Some((tag, rx));
                        }
                    }
                    None => {
                        let _ = server.idle_reject(status(
                            Some(tag),
                            StatusKind::Bad,
                            None,
                            "IDLE needs a selected mailbox",
                        ));
                    }
                }
            }
            Ok(Event::IdleDoneReceived) => {
                if let Gate::Close = gate(&faults, &shutdown).await {
                    return;
                }
                if let Some((tag, _)) = idle.take() {
                    let mut out = Vec::new();
                    session.sync(&mut out, true);
                    out.push(Response::Status(status(
                        Some(tag),
                        StatusKind::Ok,
                        None,
                        "IDLE terminated",
                    )));
                    enqueue_all(&mut server, out);
                }
            }
            Ok(Event::CommandAuthenticateReceived {
                command_authenticate,
            }) => {
                if let Gate::Close = gate(&faults, &shutdown).await {
                    return;
                }
                // The sandbox speaks LOGIN only; imap-next insists we end the flow explicitly.
                let _ = server.authenticate_finish(status(
                    Some(command_authenticate.tag),
                    StatusKind::No,
                    None,
                    "AUTHENTICATE is not supported here, use LOGIN",
                ));
            }
            Ok(Event::AuthenticateDataReceived { .. }) => {
                // Unreachable as we finish every AUTHENTICATE at once; end the flow regardless.
                let _ = server.authenticate_finish(status(
                    None,
                    StatusKind::Bad,
                    None,
                    "unexpected authentication data",
                ));
            }
            Err(stream::Error::State(error)) => {
                if let Some(bad) = bad_input_response(&error) {
                    server.enqueue_status(bad);
                }
            }
            Err(stream::Error::Closed) => return,
            Err(e) => {
                debug!(error = %e, "imap: connection failed");
                return;
            }
        }
    }
}

/// Waits for a change of the selected mailbox while idling; pends forever otherwise (and if the
/// mailbox went away, which it cannot while a session holds it).
async fn mailbox_changed(rx: Option<&mut watch::Receiver<u64>>) {
    if let Some(rx) = rx
        && rx.changed().await.is_ok()
    {
        return;
    }
    std::future::pending().await
}

/// Sends `* BYE text` before the connection is closed, giving up after `FLUSH_TIMEOUT`.
async fn say_bye(stream: &mut Stream, server: &mut Server, text: &str) {
    if let Ok(bye) = Status::bye(None, text) {
        let bye = server.enqueue_status(bye.into_static());
        let _ = timeout(FLUSH_TIMEOUT, send_until(stream, server, bye)).await;
    }
}

/// Drives the stream until the response `handle` is sent, then flushes it.
async fn send_until(stream: &mut Stream, server: &mut Server, handle: ResponseHandle) {
    loop {
        match stream.next(&mut *server).await {
            Ok(Event::ResponseSent { handle: sent, .. }) if sent == handle => break,
            Ok(_) | Err(stream::Error::State(_)) => {}
            Err(_) => return,
        }
    }
    let _ = stream.flush().await;
}

/// The answer to input imap-next could not turn into a command. The connection goes on.
fn bad_input_response(error: &server::Error) -> Option<Status<'static>> {
    let discarded = match error {
        server::Error::MalformedMessage { discarded_bytes }
        | server::Error::ExpectedCrlfGotLf { discarded_bytes }
        | server::Error::CommandTooLong { discarded_bytes } => discarded_bytes.declassify(),
        // imap-next already answered `tag BAD` itself when it refused the literal.
        server::Error::LiteralTooLong { .. } => return None,
    };
    let text = match error {
        server::Error::CommandTooLong { .. } => "command too long",
        _ => "unknown command or bad syntax",
    };
    // Answer with the client's tag when the junk starts with one; the bytes are never logged, as
    // they may hold a password.
    let tag = discarded
        .split(|b| *b == b' ')
        .next()
        .and_then(|t| Tag::try_from(t).ok())
        .map(IntoStatic::into_static);
    Some(status(tag, StatusKind::Bad, None, text))
}

/// Enqueues `responses` in order; returns the handle of the last one.
fn enqueue_all(server: &mut Server, responses: Vec<Response<'static>>) -> Option<ResponseHandle> {
    let mut last = None;
    for response in responses {
        last = Some(match response {
            Response::Data(data) => server.enqueue_data(data),
            Response::Status(s) => server.enqueue_status(s),
            Response::CommandContinuationRequest(c) => server.enqueue_continuation_request(c),
        });
    }
    last
}

fn capabilities() -> Vec1<Capability<'static>> {
    Vec1::try_from(vec![
        Capability::Imap4Rev1,
        Capability::Idle,
        Capability::UidPlus,
        Capability::Unselect,
        // imap-next accepts non-synchronising literals by itself.
        Capability::LiteralPlus,
    ])
    .unwrap_or_else(|_| Vec1::from(Capability::Imap4Rev1))
}

// ------------------------------------------------------------------------------------------------
// Responses

fn text(s: impl Into<String>) -> Text<'static> {
    Text::try_from(s.into()).unwrap_or_else(|_| Text::unvalidated("-"))
}

fn status(
    tag: Option<Tag<'static>>,
    kind: StatusKind,
    code: Option<Code<'static>>,
    message: impl Into<String>,
) -> Status<'static> {
    let body = StatusBody {
        kind,
        code,
        text: text(message),
    };
    match tag {
        Some(tag) => Status::Tagged(Tagged { tag, body }),
        None => Status::Untagged(body),
    }
}

fn untagged_ok(code: Code<'static>, message: &str) -> Response<'static> {
    Response::Status(status(None, StatusKind::Ok, Some(code), message))
}

fn code_other(atom: &'static str) -> Code<'static> {
    Code::Other(CodeOther::unvalidated(atom.as_bytes()))
}

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
}

/// The responses to one command, the tagged status last.
struct Reply {
    responses: Vec<Response<'static>>,
    logout: bool,
}

// ------------------------------------------------------------------------------------------------
// Session

enum State {
    NotAuthenticated,
    Authenticated { mailbox: Arc<Mailbox> },
    Selected(Selected),
}

struct Selected {
    mailbox: Arc<Mailbox>,
    read_only: bool,
    /// This session's view: sequence number n is `uids[n - 1]`.
    uids: Vec<u32>,
    /// The messages this session reports as `\Recent`.
    recent: HashSet<u32>,
}

impl Selected {
    fn largest_uid(&self) -> u32 {
        self.uids.last().copied().unwrap_or(0)
    }

    /// (sequence number, UID) of the messages of the view that `set` names.
    fn resolve(&self, set: &SequenceSet, uid: bool) -> Vec<(u32, u32)> {
        let largest = if uid {
            self.largest_uid()
        } else {
            self.uids.len() as u32
        };
        self.uids
            .iter()
            .enumerate()
            .map(|(i, u)| (i as u32 + 1, *u))
            .filter(|(seq, u)| in_set(set, if uid { *u } else { *seq }, largest))
            .collect()
    }
}

struct Session {
    mailboxes: Arc<Mailboxes>,
    faults: FaultBoard,
    state: State,
}

const NOT_SELECTED: &str = "no mailbox selected (SELECT INBOX first)";
const NO_SUCH_MAILBOX: &str = "no such mailbox (only INBOX and Junk exist here)";

/// `\Junk` (RFC 6154), which imap-types knows only as an extension attribute.
fn special_use_junk() -> imap_next::imap_types::flag::FlagNameAttribute<'static> {
    imap_next::imap_types::core::Atom::try_from("Junk")
        .expect("a valid atom")
        .into()
}
const NOT_AUTHENTICATED: &str = "log in first";

impl Session {
    fn new(mailboxes: Arc<Mailboxes>, faults: FaultBoard) -> Self {
        Self {
            mailboxes,
            faults,
            state: State::NotAuthenticated,
        }
    }

    /// A receiver of the selected mailbox's changes, for IDLE.
    fn idle_receiver(&self) -> Option<watch::Receiver<u64>> {
        match &self.state {
            State::Selected(sel) => Some(sel.mailbox.subscribe()),
            _ => None,
        }
    }

    /// The logged-in user's INBOX (whatever folder is selected).
    fn inbox(&self) -> Option<Arc<Mailbox>> {
        self.user_mailbox()
            .map(|m| self.mailboxes.open(m.address()))
    }

    fn user_mailbox(&self) -> Option<&Arc<Mailbox>> {
        match &self.state {
            State::NotAuthenticated => None,
            State::Authenticated { mailbox } => Some(mailbox),
            State::Selected(sel) => Some(&sel.mailbox),
        }
    }

    /// Brings the view up to date: `* n EXPUNGE` for messages gone (if `expunges` is allowed
    /// now), `* n EXISTS` (and `* n RECENT`) for new ones.
    fn sync(&mut self, out: &mut Vec<Response<'static>>, expunges: bool) {
        let State::Selected(sel) = &mut self.state else {
            return;
        };
        let snap = sel.mailbox.snapshot();
        if expunges {
            // Each EXPUNGE renumbers the messages after it (RFC 3501 7.4.1), so the number to
            // report is the position among the messages kept so far, plus one.
            let mut kept = 0u32;
            sel.uids.retain(|uid| {
                if snap.get(*uid).is_some() {
                    kept += 1;
                    true
                } else {
                    out.push(Response::Data(Data::Expunge(nz(kept + 1))));
                    false
                }
            });
            let uids = &sel.uids;
            sel.recent.retain(|uid| uids.binary_search(uid).is_ok());
        }
        let known = sel.largest_uid();
        let new: Vec<u32> = snap
            .messages
            .iter()
            .map(|m| m.message.uid)
            .filter(|uid| *uid > known)
            .collect();
        if new.is_empty() {
            return;
        }
        if !sel.read_only {
            sel.recent.extend(sel.mailbox.claim_recent(&new));
        }
        sel.uids.extend(new);
        out.push(Response::Data(Data::Exists(sel.uids.len() as u32)));
        out.push(Response::Data(Data::Recent(sel.recent.len() as u32)));
    }

    fn handle(&mut self, command: Command<'static>) -> Reply {
        let tag = command.tag;
        let mut out = Vec::new();
        let mut logout = false;
        // Whether mail expunged elsewhere may be announced after this command.
        let mut expunges_allowed = false;

        let result: Outcome = match command.body {
            CommandBody::Capability => {
                out.push(Response::Data(Data::Capability(capabilities())));
                Ok((None, "CAPABILITY completed".into()))
            }
            CommandBody::Noop => {
                expunges_allowed = true;
                Ok((None, "NOOP completed".into()))
            }
            CommandBody::Check => self.selected_only().map(|()| {
                expunges_allowed = true;
                (None, "CHECK completed".into())
            }),
            CommandBody::Logout => {
                // `* BYE`, then the tagged OK (RFC 3501 6.1.3).
                if let Ok(bye) = Status::bye(None, "mailcanary sandbox logging out") {
                    out.push(Response::Status(bye));
                }
                logout = true;
                Ok((None, "LOGOUT completed".into()))
            }
            CommandBody::Login { username, password } => {
                self.login(username.as_ref(), password.declassify().as_ref())
            }
            CommandBody::Select { mailbox } => self.select(&mailbox, false, &mut out),
            CommandBody::Examine { mailbox } => self.select(&mailbox, true, &mut out),
            CommandBody::Unselect => self.close(false),
            CommandBody::Close => self.close(true),
            CommandBody::List {
                reference,
                mailbox_wildcard,
            } => self.list(&reference, &mailbox_wildcard, false, &mut out),
            CommandBody::Lsub {
                reference,
                mailbox_wildcard,
            } => self.list(&reference, &mailbox_wildcard, true, &mut out),
            CommandBody::Status {
                mailbox,
                item_names,
            } => self.status(&mailbox, &item_names, &mut out),
            CommandBody::Subscribe { mailbox } | CommandBody::Unsubscribe { mailbox } => {
                self.authenticated_only().and_then(|()| {
                    if mailbox == ImapMailbox::Inbox {
                        Ok((None, "done".into()))
                    } else {
                        Err(no("only INBOX exists here"))
                    }
                })
            }
            CommandBody::Create { .. }
            | CommandBody::Delete { .. }
            | CommandBody::Rename { .. } => self
                .authenticated_only()
                .and_then(|()| Err(no("this sandbox has only INBOX"))),
            CommandBody::Append {
                mailbox,
                flags,
                date,
                message,
            } => self.append(&mailbox, &flags, date, message),
            CommandBody::Expunge => {
                expunges_allowed = true;
                self.expunge(None)
            }
            CommandBody::ExpungeUid { sequence_set } => {
                expunges_allowed = true;
                self.expunge(Some(&sequence_set))
            }
            CommandBody::Search {
                charset,
                criteria,
                uid,
            } => self.search(charset.as_ref(), &criteria, uid, &mut out),
            CommandBody::Fetch {
                sequence_set,
                macro_or_item_names,
                uid,
            } => self.fetch(&sequence_set, macro_or_item_names, uid, &mut out),
            CommandBody::Store {
                sequence_set,
                kind,
                response,
                flags,
                uid,
            } => self.store(&sequence_set, kind, response, &flags, uid, &mut out),
            CommandBody::Copy { .. } | CommandBody::Move { .. } => self
                .selected_only()
                .and_then(|()| Err(no("this sandbox has no other mailbox to copy to"))),
            other => Err(bad(format!("{} is not supported here", other.name()))),
        };

        // Whatever the command, the client learns about new mail before its tagged answer.
        self.sync(&mut out, expunges_allowed);

        let final_status = match result {
            Ok((code, message)) => status(Some(tag), StatusKind::Ok, code, message),
            Err((kind, code, message)) => status(Some(tag), kind, code, message),
        };
        out.push(Response::Status(final_status));
        Reply {
            responses: out,
            logout,
        }
    }

    fn authenticated_only(&self) -> Result<(), Failure> {
        match self.state {
            State::NotAuthenticated => Err(bad(NOT_AUTHENTICATED)),
            _ => Ok(()),
        }
    }

    fn selected_only(&self) -> Result<(), Failure> {
        match self.state {
            State::Selected(_) => Ok(()),
            State::NotAuthenticated => Err(bad(NOT_AUTHENTICATED)),
            State::Authenticated { .. } => Err(bad(NOT_SELECTED)),
        }
    }

    fn selected_mut(&mut self) -> Result<&mut Selected, Failure> {
        match &mut self.state {
            State::Selected(sel) => Ok(sel),
            State::NotAuthenticated => Err(bad(NOT_AUTHENTICATED)),
            State::Authenticated { .. } => Err(bad(NOT_SELECTED)),
        }
    }

    fn login(&mut self, username: &[u8], password: &[u8]) -> Outcome {
        if !matches!(self.state, State::NotAuthenticated) {
            return Err(bad("already logged in"));
        }
        let auth_failed = || {
            (
                StatusKind::No,
                Some(code_other("AUTHENTICATIONFAILED")),
                "authentication failed".to_string(),
            )
        };
        if self.faults.get(Stage::Mailbox) == Fault::Error {
            return Err(auth_failed());
        }
        let Ok(user) = std::str::from_utf8(username) else {
            return Err(auth_failed());
        };
        if user.trim().is_empty() || !self.mailboxes.password_matches(password) {
            return Err(auth_failed());
        }
        let mailbox = self.mailboxes.open(user);
        debug!(user = mailbox.address(), "imap: logged in");
        self.state = State::Authenticated { mailbox };
        Ok((
            Some(Code::Capability(capabilities())),
            "LOGIN completed".into(),
        ))
    }

    fn select(
        &mut self,
        name: &ImapMailbox<'_>,
        read_only: bool,
        out: &mut Vec<Response<'static>>,
    ) -> Outcome {
        let inbox = self.inbox().ok_or_else(|| bad(NOT_AUTHENTICATED))?;
        // A failed SELECT leaves no mailbox selected (RFC 3501 6.3.1).
        self.state = State::Authenticated {
            mailbox: Arc::clone(&inbox),
        };
        let mailbox = match name {
            ImapMailbox::Inbox => inbox,
            ImapMailbox::Other(n) if n.as_ref() == JUNK.as_bytes() => {
                self.mailboxes.junk(inbox.address())
            }
            ImapMailbox::Other(_) => return Err(no(NO_SUCH_MAILBOX)),
        };
        let snap = mailbox.snapshot();
        let uids: Vec<u32> = snap.messages.iter().map(|m| m.message.uid).collect();
        let recent: HashSet<u32> = if read_only {
            HashSet::new()
        } else {
            mailbox.claim_recent(&uids).into_iter().collect()
        };
        let recent_count = if read_only {
            snap.unclaimed_recent
        } else {
            recent.len() as u32
        };

        out.push(Response::Data(Data::Flags(system_flags())));
        out.push(Response::Data(Data::Exists(uids.len() as u32)));
        out.push(Response::Data(Data::Recent(recent_count)));
        if let Some(pos) = snap.messages.iter().position(|m| !m.flags.seen) {
            out.push(untagged_ok(
                Code::Unseen(nz(pos as u32 + 1)),
                "first unseen message",
            ));
        }
        out.push(untagged_ok(
            Code::UidValidity(nz(snap.uid_validity)),
            "UIDs valid",
        ));
        out.push(untagged_ok(
            Code::UidNext(nz(snap.uid_next)),
            "predicted next UID",
        ));
        let permanent = if read_only {
            Vec::new()
        } else {
            let mut p: Vec<FlagPerm<'static>> =
                system_flags().into_iter().map(FlagPerm::Flag).collect();
            p.push(FlagPerm::Asterisk);
            p
        };
        out.push(untagged_ok(
            Code::PermanentFlags(permanent),
            "flags permitted",
        ));

        self.state = State::Selected(Selected {
            mailbox,
            read_only,
            uids,
            recent,
        });
        if read_only {
            Ok((Some(Code::ReadOnly), "EXAMINE completed".into()))
        } else {
            Ok((Some(Code::ReadWrite), "SELECT completed".into()))
        }
    }

    /// CLOSE (`expunge`: removes `\Deleted` messages silently) or UNSELECT.
    fn close(&mut self, expunge: bool) -> Outcome {
        let sel = self.selected_mut()?;
        if expunge && !sel.read_only {
            sel.mailbox.expunge(None);
        }
        let address = sel.mailbox.address().to_string();
        let mailbox = self.mailboxes.open(&address);
        self.state = State::Authenticated { mailbox };
        Ok((None, "mailbox closed".into()))
    }

    fn list(
        &self,
        reference: &ImapMailbox<'_>,
        pattern: &ListMailbox<'_>,
        lsub: bool,
        out: &mut Vec<Response<'static>>,
    ) -> Outcome {
        self.authenticated_only()?;
        let pattern: &[u8] = match pattern {
            ListMailbox::Token(t) => t.as_ref(),
            ListMailbox::String(s) => s.as_ref(),
        };
        let delimiter = QuotedChar::try_from('/').ok();
        if pattern.is_empty() {
            // RFC 3501 6.3.8: an empty pattern asks for the hierarchy delimiter.
            if !lsub {
                out.push(Response::Data(Data::List {
                    items: vec![imap_next::imap_types::flag::FlagNameAttribute::Noselect],
                    delimiter,
                    mailbox: ImapMailbox::try_from("")
                        .map(IntoStatic::into_static)
                        .unwrap_or(ImapMailbox::Inbox),
                }));
            }
            return Ok((None, "LIST completed".into()));
        }
        let mut full: Vec<u8> = match reference {
            ImapMailbox::Inbox => b"INBOX".to_vec(),
            ImapMailbox::Other(other) => other.as_ref().to_vec(),
        };
        full.extend_from_slice(pattern);
        // INBOX, and the Junk folder marked for RFC 6154 SPECIAL-USE.
        let junk = ImapMailbox::try_from(JUNK).map(IntoStatic::into_static);
        let folders = [
            wildcard_match(&full.to_ascii_uppercase(), b"INBOX")
                .then(|| (Vec::new(), ImapMailbox::Inbox)),
            (wildcard_match(&full, JUNK.as_bytes()))
                .then_some(junk.ok())
                .flatten()
                .map(|m| (vec![special_use_junk()], m)),
        ];
        for (items, mailbox) in folders.into_iter().flatten() {
            out.push(Response::Data(if lsub {
                Data::Lsub {
                    items,
                    delimiter,
                    mailbox,
                }
            } else {
                Data::List {
                    items,
                    delimiter,
                    mailbox,
                }
            }));
        }
        Ok((
            None,
            if lsub {
                "LSUB completed"
            } else {
                "LIST completed"
            }
            .into(),
        ))
    }

    fn status(
        &self,
        name: &ImapMailbox<'_>,
        items: &[StatusDataItemName],
        out: &mut Vec<Response<'static>>,
    ) -> Outcome {
        let mailbox = &self.inbox().ok_or_else(|| bad(NOT_AUTHENTICATED))?;
        if *name != ImapMailbox::Inbox {
            return Err(no("no such mailbox (only INBOX exists here)"));
        }
        let snap = mailbox.snapshot();
        let count =
            |f: fn(&Flags) -> bool| snap.messages.iter().filter(|m| f(&m.flags)).count() as u32;
        let values: Vec<StatusDataItem> = items
            .iter()
            .filter_map(|item| match item {
                StatusDataItemName::Messages => {
                    Some(StatusDataItem::Messages(snap.messages.len() as u32))
                }
                StatusDataItemName::Recent => Some(StatusDataItem::Recent(snap.unclaimed_recent)),
                StatusDataItemName::UidNext => Some(StatusDataItem::UidNext(nz(snap.uid_next))),
                StatusDataItemName::UidValidity => {
                    Some(StatusDataItem::UidValidity(nz(snap.uid_validity)))
                }
                StatusDataItemName::Unseen => Some(StatusDataItem::Unseen(count(|f| !f.seen))),
                StatusDataItemName::Deleted => Some(StatusDataItem::Deleted(count(|f| f.deleted))),
                _ => None,
            })
            .collect();
        out.push(Response::Data(Data::Status {
            mailbox: ImapMailbox::Inbox,
            items: Cow::Owned(values),
        }));
        Ok((None, "STATUS completed".into()))
    }

    fn append(
        &self,
        name: &ImapMailbox<'_>,
        flags: &[Flag<'_>],
        date: Option<DateTime>,
        message: LiteralOrLiteral8<'_>,
    ) -> Outcome {
        let mailbox = &self.inbox().ok_or_else(|| bad(NOT_AUTHENTICATED))?;
        if *name != ImapMailbox::Inbox {
            return Err((
                StatusKind::No,
                Some(Code::TryCreate),
                "only INBOX exists here".into(),
            ));
        }
        let raw = match message {
            LiteralOrLiteral8::Literal(l) => l.into_inner().into_owned(),
            LiteralOrLiteral8::Literal8(l) => l.data.into_owned(),
        };
        let uid = mailbox.append(raw, flags_from_imap(flags), date.map(|d| *d.as_ref()));
        Ok((
            Some(Code::AppendUid {
                uid_validity: nz(mailbox.uid_validity()),
                uid: nz(uid),
            }),
            "APPEND completed".into(),
        ))
    }

    /// EXPUNGE, or UID EXPUNGE of `uids` (only those of them that are `\Deleted`). The
    /// `* n EXPUNGE` responses come from the sync that follows every command.
    fn expunge(&mut self, uids: Option<&SequenceSet>) -> Outcome {
        let sel = self.selected_mut()?;
        if sel.read_only {
            return Err(no("mailbox is read-only (EXAMINE)"));
        }
        match uids {
            None => sel.mailbox.expunge(None),
            Some(set) => {
                let only: Vec<u32> = sel.resolve(set, true).into_iter().map(|(_, u)| u).collect();
                sel.mailbox.expunge(Some(&only))
            }
        };
        Ok((None, "EXPUNGE completed".into()))
    }

    fn search(
        &mut self,
        charset: Option<&Charset<'_>>,
        criteria: &Vec1<SearchKey<'_>>,
        uid: bool,
        out: &mut Vec<Response<'static>>,
    ) -> Outcome {
        let sel = self.selected_mut()?;
        if let Some(charset) = charset {
            let c = charset.as_ref();
            if !c.eq_ignore_ascii_case("UTF-8") && !c.eq_ignore_ascii_case("US-ASCII") {
                let allowed = ["US-ASCII", "UTF-8"]
                    .into_iter()
                    .filter_map(|c| Charset::try_from(c).ok())
                    .collect();
                return Err((
                    StatusKind::No,
                    Some(Code::BadCharset { allowed }),
                    "unsupported charset".into(),
                ));
            }
        }
        let snap = sel.mailbox.snapshot();
        let ctx = SearchContext {
            largest_seq: sel.uids.len() as u32,
            largest_uid: sel.largest_uid(),
        };
        let mut hits = Vec::new();
        for (i, u) in sel.uids.iter().enumerate() {
            // Ghosts (expunged elsewhere, not yet announced) match nothing.
            let Some(state) = snap.get(*u) else { continue };
            let candidate = Candidate {
                seq: i as u32 + 1,
                state,
                recent: sel.recent.contains(u),
                parsed: OnceCell::new(),
            };
            if criteria.as_ref().iter().all(|k| ctx.matches(k, &candidate)) {
                hits.push(nz(if uid { *u } else { candidate.seq }));
            }
        }
        out.push(Response::Data(Data::Search(hits)));
        Ok((None, "SEARCH completed".into()))
    }

    fn fetch(
        &mut self,
        set: &SequenceSet,
        names: MacroOrMessageDataItemNames<'_>,
        uid: bool,
        out: &mut Vec<Response<'static>>,
    ) -> Outcome {
        let sel = self.selected_mut()?;
        let mut names: Vec<MessageDataItemName<'_>> = match names {
            MacroOrMessageDataItemNames::Macro(m) => {
                m.expand().into_iter().map(|n| n.into_static()).collect()
            }
            MacroOrMessageDataItemNames::MessageDataItemNames(names) => names,
        };
        // UID FETCH always reports the UID (RFC 3501 6.4.8).
        if uid && !names.contains(&MessageDataItemName::Uid) {
            names.insert(0, MessageDataItemName::Uid);
        }
        if let Some(unsupported) = names.iter().find(|n| {
            matches!(
                n,
                MessageDataItemName::Binary { .. } | MessageDataItemName::BinarySize { .. }
            )
        }) {
            return Err(bad(format!("{unsupported:?} is not supported here")));
        }
        let targets = sel.resolve(set, uid);
        let mut snap = sel.mailbox.snapshot();

        // Reading a body without PEEK sets \Seen (RFC 3501 6.4.5); report FLAGS for those.
        let sets_seen = !sel.read_only && names.iter().any(marks_seen);
        let mut newly_seen = HashSet::new();
        if sets_seen {
            let unseen: Vec<u32> = targets
                .iter()
                .filter(|(_, u)| snap.get(*u).is_some_and(|m| !m.flags.seen))
                .map(|(_, u)| *u)
                .collect();
            if !unseen.is_empty() {
                let seen = Flags {
                    seen: true,
                    ..Flags::default()
                };
                newly_seen.extend(
                    sel.mailbox
                        .store_flags(&unseen, FlagChange::Add, &seen)
                        .into_iter()
                        .map(|(u, _)| u),
                );
                snap = sel.mailbox.snapshot();
            }
        }

        for (seq, u) in targets {
            // Ghosts are skipped: RFC 3501 lets a server omit data of messages expunged elsewhere.
            let Some(state) = snap.get(u) else { continue };
            let message = FetchMessage {
                state,
                recent: sel.recent.contains(&u),
                parsed: OnceCell::new(),
            };
            let mut items: Vec<MessageDataItem<'static>> =
                names.iter().map(|n| message.item(n)).collect();
            if newly_seen.contains(&u) && !names.contains(&MessageDataItemName::Flags) {
                items.push(message.item(&MessageDataItemName::Flags));
            }
            if let Ok(items) = Vec1::try_from(items) {
                out.push(Response::Data(Data::Fetch {
                    seq: nz(seq),
                    items,
                }));
            }
        }
        Ok((None, "FETCH completed".into()))
    }

    fn store(
        &mut self,
        set: &SequenceSet,
        kind: StoreType,
        response: StoreResponse,
        flags: &[Flag<'_>],
        uid: bool,
        out: &mut Vec<Response<'static>>,
    ) -> Outcome {
        let sel = self.selected_mut()?;
        if sel.read_only {
            return Err(no("mailbox is read-only (EXAMINE)"));
        }
        let targets = sel.resolve(set, uid);
        let uids: Vec<u32> = targets.iter().map(|(_, u)| *u).collect();
        let change = match kind {
            StoreType::Replace => FlagChange::Replace,
            StoreType::Add => FlagChange::Add,
            StoreType::Remove => FlagChange::Remove,
        };
        let updated: HashMap<u32, Flags> = sel
            .mailbox
            .store_flags(&uids, change, &flags_from_imap(flags))
            .into_iter()
            .collect();
        if response == StoreResponse::Answer {
            for (seq, u) in targets {
                let Some(flags) = updated.get(&u) else {
                    continue;
                };
                let mut items = vec![MessageDataItem::Flags(flag_fetch(
                    flags,
                    sel.recent.contains(&u),
                ))];
                if uid {
                    items.push(MessageDataItem::Uid(nz(u)));
                }
                if let Ok(items) = Vec1::try_from(items) {
                    out.push(Response::Data(Data::Fetch {
                        seq: nz(seq),
                        items,
                    }));
                }
            }
        }
        Ok((None, "STORE completed".into()))
    }
}

/// `Ok((code, text))` or `Err((NO/BAD, code, text))` for the tagged status.
type Outcome = Result<(Option<Code<'static>>, String), Failure>;
type Failure = (StatusKind, Option<Code<'static>>, String);

fn bad(message: impl Into<String>) -> Failure {
    (StatusKind::Bad, None, message.into())
}

fn no(message: impl Into<String>) -> Failure {
    (StatusKind::No, None, message.into())
}

// ------------------------------------------------------------------------------------------------
// Flags

fn system_flags() -> Vec<Flag<'static>> {
    vec![
        Flag::Answered,
        Flag::Flagged,
        Flag::Deleted,
        Flag::Seen,
        Flag::Draft,
    ]
}

fn flags_from_imap(flags: &[Flag<'_>]) -> Flags {
    let mut out = Flags::default();
    for flag in flags {
        match flag {
            Flag::Seen => out.seen = true,
            Flag::Answered => out.answered = true,
            Flag::Flagged => out.flagged = true,
            Flag::Deleted => out.deleted = true,
            Flag::Draft => out.draft = true,
            Flag::Keyword(k) => {
                out.keywords.insert(k.as_ref().to_string());
            }
            // Unknown system flags (and \Recent, which clients may not set) are ignored.
            Flag::Extension(_) => {}
        }
    }
    out
}

fn flag_fetch(flags: &Flags, recent: bool) -> Vec<FlagFetch<'static>> {
    let mut out = Vec::new();
    for (set, flag) in [
        (flags.seen, Flag::Seen),
        (flags.answered, Flag::Answered),
        (flags.flagged, Flag::Flagged),
        (flags.deleted, Flag::Deleted),
        (flags.draft, Flag::Draft),
    ] {
        if set {
            out.push(FlagFetch::Flag(flag));
        }
    }
    for keyword in &flags.keywords {
        if let Ok(atom) = Atom::try_from(keyword.clone()) {
            out.push(FlagFetch::Flag(Flag::Keyword(atom)));
        }
    }
    if recent {
        out.push(FlagFetch::Recent);
    }
    out
}

// ------------------------------------------------------------------------------------------------
// Sequence sets

/// Whether `n` is in `set`, `*` standing for `largest`. A membership test rather than
/// `SequenceSet::iter`, which would walk all of `1:4294967295`.
fn in_set(set: &SequenceSet, n: u32, largest: u32) -> bool {
    let expand = |s: &SeqOrUid| match s {
        SeqOrUid::Value(v) => v.get(),
        SeqOrUid::Asterisk => largest,
    };
    set.0.as_ref().iter().any(|seq| match seq {
        Sequence::Single(a) => expand(a) == n,
        Sequence::Range(a, b) => {
            let (a, b) = (expand(a), expand(b));
            a.min(b) <= n && n <= a.max(b)
        }
    })
}

/// RFC 3501 LIST wildcards: `*` matches anything, `%` anything but the delimiter `/`.
fn wildcard_match(pattern: &[u8], name: &[u8]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => (0..=name.len()).any(|i| wildcard_match(rest, &name[i..])),
        Some((b'%', rest)) => (0..=name.len())
            .take_while(|i| *i == 0 || name[i - 1] != b'/')
            .any(|i| wildcard_match(rest, &name[i..])),
        Some((c, rest)) => name.first() == Some(c) && wildcard_match(rest, &name[1..]),
    }
}

// ------------------------------------------------------------------------------------------------
// RFC 5322 message helpers

/// Splits a message into its header (with the empty line that ends it) and its body.
fn split_message(raw: &[u8]) -> (&[u8], &[u8]) {
    let mut i = 0;
    // Each iteration looks at the start of a line.
    while i < raw.len() {
        if raw[i..].starts_with(b"\r\n") {
            return raw.split_at(i + 2);
        }
        if raw[i] == b'\n' {
            return raw.split_at(i + 1);
        }
        match raw[i..].iter().position(|b| *b == b'\n') {
            Some(p) => i += p + 1,
            None => break,
        }
    }
    (raw, &[])
}

/// The fields of a header block: (name, the field's raw lines including their line ends).
fn header_fields(header: &[u8]) -> Vec<(&[u8], &[u8])> {
    let mut fields: Vec<(&[u8], &[u8])> = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < header.len() {
        let end = header[i..]
            .iter()
            .position(|b| *b == b'\n')
            .map_or(header.len(), |p| i + p + 1);
        let line = &header[i..end];
        let is_continuation = matches!(line.first(), Some(b' ' | b'\t'));
        let is_blank = line == b"\r\n" || line == b"\n";
        if !is_continuation && i > start {
            push_field(&mut fields, &header[start..i]);
            start = i;
        }
        if is_blank {
            start = end;
        }
        i = end;
    }
    if start < header.len() {
        push_field(&mut fields, &header[start..]);
    }
    fields
}

fn push_field<'a>(fields: &mut Vec<(&'a [u8], &'a [u8])>, raw: &'a [u8]) {
    if let Some(colon) = raw.iter().position(|b| *b == b':') {
        fields.push((trim(&raw[..colon]), raw));
    }
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s
        && first.is_ascii_whitespace()
    {
        s = rest;
    }
    while let [rest @ .., last] = s
        && last.is_ascii_whitespace()
    {
        s = rest;
    }
    s
}

/// A field's value, unfolded and trimmed.
fn field_value(raw: &[u8]) -> String {
    let value = raw
        .iter()
        .position(|b| *b == b':')
        .map_or(&raw[..0], |c| &raw[c + 1..]);
    let unfolded: Vec<u8> = value
        .iter()
        .copied()
        .filter(|b| *b != b'\r' && *b != b'\n')
        .collect();
    String::from_utf8_lossy(trim(&unfolded)).into_owned()
}

/// The header fields whose names are (`keep`) or are not (`!keep`) among `names`, followed by
/// the empty line, as BODY[HEADER.FIELDS (...)] returns them.
fn filter_header(header: &[u8], names: &[AString<'_>], keep: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, raw) in header_fields(header) {
        let listed = names.iter().any(|n| n.as_ref().eq_ignore_ascii_case(name));
        if listed == keep {
            out.extend_from_slice(raw);
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Body section `path` of `raw`: (the part's MIME header, the part's body, whether the part is
/// itself a message/rfc822). `None` if there is no such part.
fn mime_part<'a>(raw: &'a [u8], path: &[NonZeroU32]) -> Option<(&'a [u8], &'a [u8], bool)> {
    let parsed = MessageParser::default().parse(raw)?;
    let slice = |from: u32, to: u32| raw.get(from as usize..to as usize);
    let mut current = parsed.parts.first()?;
    for (depth, n) in path.iter().enumerate() {
        let n = n.get() as usize;
        match &current.body {
            PartType::Multipart(ids) => {
                current = parsed.parts.get(*ids.get(n - 1)? as usize)?;
            }
            PartType::Message(_) if depth > 0 => {
                // Into an encapsulated message: its parts are those of its own raw bytes.
                let inner = slice(current.offset_body, current.offset_end)?;
                return mime_part(inner, &path[depth..]);
            }
            // A non-multipart message has exactly one part, 1 (RFC 3501 6.4.5).
            _ if depth == 0 && n == 1 => {}
            _ => return None,
        }
    }
    let header = slice(current.offset_header, current.offset_body)?;
    let body = slice(current.offset_body, current.offset_end)?;
    Some((header, body, matches!(current.body, PartType::Message(_))))
}

/// The bytes of `BODY[section]` of `raw`; `None` for NIL.
fn section_bytes(raw: &[u8], section: Option<&Section<'_>>) -> Option<Vec<u8>> {
    let (header, body) = split_message(raw);
    // For HEADER/TEXT/HEADER.FIELDS of a part: the part must be a message/rfc822.
    let encapsulated = |part: &imap_next::imap_types::fetch::Part| {
        mime_part(raw, part.0.as_ref()).and_then(|(_, body, is_message)| is_message.then_some(body))
    };
    match section {
        None => Some(raw.to_vec()),
        Some(Section::Header(None)) => Some(header.to_vec()),
        Some(Section::Text(None)) => Some(body.to_vec()),
        Some(Section::HeaderFields(None, names)) => {
            Some(filter_header(header, names.as_ref(), true))
        }
        Some(Section::HeaderFieldsNot(None, names)) => {
            Some(filter_header(header, names.as_ref(), false))
        }
        Some(Section::Part(part)) => mime_part(raw, part.0.as_ref()).map(|(_, b, _)| b.to_vec()),
        Some(Section::Mime(part)) => mime_part(raw, part.0.as_ref()).map(|(h, _, _)| h.to_vec()),
        Some(Section::Header(Some(part))) => {
            encapsulated(part).map(|m| split_message(m).0.to_vec())
        }
        Some(Section::Text(Some(part))) => encapsulated(part).map(|m| split_message(m).1.to_vec()),
        Some(Section::HeaderFields(Some(part), names)) => {
            encapsulated(part).map(|m| filter_header(split_message(m).0, names.as_ref(), true))
        }
        Some(Section::HeaderFieldsNot(Some(part), names)) => {
            encapsulated(part).map(|m| filter_header(split_message(m).0, names.as_ref(), false))
        }
    }
}

/// Message bytes as an IMAP string. Always a literal, so the client gets exactly the stored
/// bytes; an IMAP literal cannot hold NUL (that needs BINARY), so NULs become spaces.
fn nstring_bytes(bytes: Vec<u8>) -> NString<'static> {
    let bytes = if bytes.contains(&0) {
        bytes
            .into_iter()
            .map(|b| if b == 0 { b' ' } else { b })
            .collect()
    } else {
        bytes
    };
    Literal::try_from(bytes).map_or(NString::NIL, NString::from)
}

/// A header value as an IMAP string (quoted when it can be), NIL if absent or empty.
fn nstring_text(value: Option<String>) -> NString<'static> {
    match value {
        Some(v) if !v.is_empty() => NString::try_from(v).unwrap_or(NString::NIL),
        _ => NString::NIL,
    }
}

fn marks_seen(name: &MessageDataItemName<'_>) -> bool {
    matches!(
        name,
        MessageDataItemName::BodyExt { peek: false, .. }
            | MessageDataItemName::Rfc822
            | MessageDataItemName::Rfc822Text
    )
}

/// One message being answered for in a FETCH.
struct FetchMessage<'a> {
    state: &'a MessageState,
    recent: bool,
    parsed: OnceCell<Option<mail_parser::Message<'a>>>,
}

impl<'a> FetchMessage<'a> {
    fn raw(&self) -> &'a [u8] {
        &self.state.message.raw
    }

    fn item(&self, name: &MessageDataItemName<'_>) -> MessageDataItem<'static> {
        let raw = self.raw();
        match name {
            MessageDataItemName::Uid => MessageDataItem::Uid(nz(self.state.message.uid)),
            MessageDataItemName::Flags => {
                MessageDataItem::Flags(flag_fetch(&self.state.flags, self.recent))
            }
            MessageDataItemName::InternalDate => {
                let date = self.state.message.internal_date;
                MessageDataItem::InternalDate(DateTime::try_from(date).unwrap_or_else(|_| {
                    // Only an offset with seconds could fail; UTC never does.
                    DateTime::unvalidated(date.with_timezone(&chrono::Utc).fixed_offset())
                }))
            }
            MessageDataItemName::Rfc822Size => {
                MessageDataItem::Rfc822Size(u32::try_from(raw.len()).unwrap_or(u32::MAX))
            }
            MessageDataItemName::Rfc822 => MessageDataItem::Rfc822(nstring_bytes(raw.to_vec())),
            MessageDataItemName::Rfc822Header => {
                MessageDataItem::Rfc822Header(nstring_bytes(split_message(raw).0.to_vec()))
            }
            MessageDataItemName::Rfc822Text => {
                MessageDataItem::Rfc822Text(nstring_bytes(split_message(raw).1.to_vec()))
            }
            MessageDataItemName::BodyExt {
                section, partial, ..
            } => {
                let data = section_bytes(raw, section.as_ref()).map(|mut bytes| {
                    if let Some((origin, len)) = partial {
                        let start = (*origin as usize).min(bytes.len());
                        let end = start.saturating_add(len.get() as usize).min(bytes.len());
                        bytes = bytes[start..end].to_vec();
                    }
                    bytes
                });
                MessageDataItem::BodyExt {
                    section: section.clone().map(IntoStatic::into_static),
                    origin: partial.map(|(origin, _)| origin),
                    data: data.map_or(NString::NIL, nstring_bytes),
                }
            }
            MessageDataItemName::Envelope => MessageDataItem::Envelope(self.envelope()),
            // Binary items are refused before we get here; BODY and BODYSTRUCTURE are answered
            // with a plain-text structure, which is what the sandbox's own mail is.
            _ => MessageDataItem::BodyStructure(self.body_structure()),
        }
    }

    fn envelope(&self) -> Envelope<'static> {
        let (header, _) = split_message(self.raw());
        let fields = header_fields(header);
        let raw_value = |name: &str| {
            fields
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
                .map(|(_, raw)| field_value(raw))
        };
        let parsed = self
            .parsed
            .get_or_init(|| MessageParser::default().parse(self.raw()))
            .as_ref();
        let addresses = |a: Option<&mail_parser::Address<'_>>| -> Vec<Address<'static>> {
            let addrs: Vec<&mail_parser::Addr<'_>> = match a {
                Some(mail_parser::Address::List(list)) => list.iter().collect(),
                Some(mail_parser::Address::Group(groups)) => {
                    groups.iter().flat_map(|g| g.addresses.iter()).collect()
                }
                None => Vec::new(),
            };
            addrs
                .into_iter()
                .filter_map(|addr| {
                    let email = addr.address.as_deref()?;
                    let (mailbox, host) = email.rsplit_once('@').unwrap_or((email, ""));
                    Some(Address {
                        name: nstring_text(addr.name.as_deref().map(str::to_string)),
                        adl: NString::NIL,
                        mailbox: nstring_text(Some(mailbox.to_string())),
                        host: nstring_text(Some(host.to_string())),
                    })
                })
                .collect()
        };
        let from = addresses(parsed.and_then(|m| m.from()));
        let sender = addresses(parsed.and_then(|m| m.sender()));
        let reply_to = addresses(parsed.and_then(|m| m.reply_to()));
        Envelope {
            date: nstring_text(raw_value("Date")),
            subject: nstring_text(raw_value("Subject")),
            // RFC 3501 7.4.2: absent Sender and Reply-To default to From.
            sender: if sender.is_empty() {
                from.clone()
            } else {
                sender
            },
            reply_to: if reply_to.is_empty() {
                from.clone()
            } else {
                reply_to
            },
            from,
            to: addresses(parsed.and_then(|m| m.to())),
            cc: addresses(parsed.and_then(|m| m.cc())),
            bcc: addresses(parsed.and_then(|m| m.bcc())),
            in_reply_to: nstring_text(raw_value("In-Reply-To")),
            message_id: nstring_text(raw_value("Message-ID")),
        }
    }

    /// BODYSTRUCTURE (and BODY) from the MIME tree, without extension data.
    fn body_structure(&self) -> BodyStructure<'static> {
        let raw = self.raw();
        let parsed = self
            .parsed
            .get_or_init(|| MessageParser::default().parse(raw))
            .as_ref();
        match parsed.and_then(|m| m.parts.first().map(|root| (m, root))) {
            Some((message, root)) => structure(message, root, raw, 0),
            None => plain_structure(split_message(raw).1),
        }
    }
}

fn istring(s: &str) -> IString<'static> {
    IString::try_from(s.to_string())
        .unwrap_or_else(|_| IString::from(Literal::unvalidated(b"X".as_slice())))
}

/// The structure of `part`; nesting is capped because the tree comes from untrusted mail.
fn structure(
    message: &mail_parser::Message<'_>,
    part: &mail_parser::MessagePart<'_>,
    raw: &[u8],
    depth: usize,
) -> BodyStructure<'static> {
    let ctype = part.content_type();
    let subtype = |default: &str| {
        istring(
            &ctype
                .and_then(|c| c.subtype())
                .unwrap_or(default)
                .to_ascii_uppercase(),
        )
    };
    if let PartType::Multipart(ids) = &part.body
        && depth < 16
    {
        let bodies: Vec<BodyStructure<'static>> = ids
            .iter()
            .filter_map(|id| message.parts.get(*id as usize))
            .map(|p| structure(message, p, raw, depth + 1))
            .collect();
        if let Ok(bodies) = Vec1::try_from(bodies) {
            return BodyStructure::Multi {
                bodies,
                subtype: subtype("MIXED"),
                extension_data: None,
            };
        }
    }
    let body = raw
        .get(part.offset_body as usize..part.offset_end as usize)
        .unwrap_or_default();
    let lines = body.iter().filter(|b| **b == b'\n').count() as u32;
    let main_type = ctype.map_or("text", |c| c.ctype());
    let specific = if main_type.eq_ignore_ascii_case("text") {
        SpecificFields::Text {
            subtype: subtype("PLAIN"),
            number_of_lines: lines,
        }
    } else {
        SpecificFields::Basic {
            r#type: istring(&main_type.to_ascii_uppercase()),
            subtype: subtype("OCTET-STREAM"),
        }
    };
    let parameter_list = ctype
        .and_then(|c| c.attributes())
        .unwrap_or_default()
        .iter()
        .map(|a| (istring(&a.name.to_ascii_uppercase()), istring(&a.value)))
        .collect();
    BodyStructure::Single {
        body: Body {
            basic: BasicFields {
                parameter_list,
                id: NString::NIL,
                description: NString::NIL,
                content_transfer_encoding: istring(
                    &part
                        .content_transfer_encoding()
                        .unwrap_or("7bit")
                        .to_ascii_uppercase(),
                ),
                size: u32::try_from(body.len()).unwrap_or(u32::MAX),
            },
            specific,
        },
        extension_data: None,
    }
}

/// The structure of a message mail-parser could not parse: one text/plain body.
fn plain_structure(body: &[u8]) -> BodyStructure<'static> {
    BodyStructure::Single {
        body: Body {
            basic: BasicFields {
                parameter_list: Vec::new(),
                id: NString::NIL,
                description: NString::NIL,
                content_transfer_encoding: istring("7BIT"),
                size: u32::try_from(body.len()).unwrap_or(u32::MAX),
            },
            specific: SpecificFields::Text {
                subtype: istring("PLAIN"),
                number_of_lines: body.iter().filter(|b| **b == b'\n').count() as u32,
            },
        },
        extension_data: None,
    }
}

// ------------------------------------------------------------------------------------------------
// SEARCH

struct SearchContext {
    largest_seq: u32,
    largest_uid: u32,
}

/// One message being matched against SEARCH keys; parsed only if a key needs its content.
struct Candidate<'a> {
    seq: u32,
    state: &'a MessageState,
    recent: bool,
    parsed: OnceCell<Analysed>,
}

/// What SEARCH needs of a message's content, lowercased for case-insensitive matching.
struct Analysed {
    /// (lowercased name, lowercased unfolded raw value)
    fields: Vec<(String, String)>,
    /// Decoded (RFC 2047) subject.
    subject: String,
    /// Decoded text parts, or the raw body if there are none.
    body: String,
    /// The Date field's date, for SENTBEFORE and friends.
    sent: Option<chrono::NaiveDate>,
}

impl Candidate<'_> {
    fn analysed(&self) -> &Analysed {
        self.parsed.get_or_init(|| {
            let raw = &self.state.message.raw;
            let (header, body) = split_message(raw);
            let fields = header_fields(header)
                .into_iter()
                .map(|(name, raw)| {
                    (
                        String::from_utf8_lossy(name).to_lowercase(),
                        field_value(raw).to_lowercase(),
                    )
                })
                .collect();
            let parsed = MessageParser::default().parse(raw);
            let subject = parsed
                .as_ref()
                .and_then(|m| m.subject())
                .unwrap_or_default()
                .to_lowercase();
            let text: Vec<String> = parsed
                .as_ref()
                .map(|m| {
                    (0..m.text_body_count())
                        .filter_map(|i| m.body_text(i).map(Cow::into_owned))
                        .collect()
                })
                .unwrap_or_default();
            let body = if text.is_empty() {
                String::from_utf8_lossy(body).to_lowercase()
            } else {
                text.join("\n").to_lowercase()
            };
            let sent = parsed.as_ref().and_then(|m| m.date()).and_then(|d| {
                chrono::NaiveDate::from_ymd_opt(d.year.into(), d.month.into(), d.day.into())
            });
            Analysed {
                fields,
                subject,
                body,
                sent,
            }
        })
    }

    fn header_contains(&self, name: &[u8], needle: &str) -> bool {
        let name = String::from_utf8_lossy(name).to_lowercase();
        self.analysed()
            .fields
            .iter()
            .any(|(n, v)| *n == name && v.contains(needle))
    }
}

fn needle(s: &AString<'_>) -> String {
    String::from_utf8_lossy(s.as_ref()).to_lowercase()
}

impl SearchContext {
    fn matches(&self, key: &SearchKey<'_>, c: &Candidate<'_>) -> bool {
        let flags = &c.state.flags;
        let internal = c.state.message.internal_date.date_naive();
        match key {
            SearchKey::All => true,
            SearchKey::And(keys) => keys.as_ref().iter().all(|k| self.matches(k, c)),
            SearchKey::Or(a, b) => self.matches(a, c) || self.matches(b, c),
            SearchKey::Not(k) => !self.matches(k, c),
            SearchKey::SequenceSet(set) => in_set(set, c.seq, self.largest_seq),
            SearchKey::Uid(set) => in_set(set, c.state.message.uid, self.largest_uid),
            SearchKey::Answered => flags.answered,
            SearchKey::Unanswered => !flags.answered,
            SearchKey::Deleted => flags.deleted,
            SearchKey::Undeleted => !flags.deleted,
            SearchKey::Draft => flags.draft,
            SearchKey::Undraft => !flags.draft,
            SearchKey::Flagged => flags.flagged,
            SearchKey::Unflagged => !flags.flagged,
            SearchKey::Seen => flags.seen,
            SearchKey::Unseen => !flags.seen,
            SearchKey::Recent => c.recent,
            SearchKey::Old => !c.recent,
            SearchKey::New => c.recent && !flags.seen,
            SearchKey::Keyword(k) => flags
                .keywords
                .iter()
                .any(|x| x.eq_ignore_ascii_case(k.as_ref())),
            SearchKey::Unkeyword(k) => !flags
                .keywords
                .iter()
                .any(|x| x.eq_ignore_ascii_case(k.as_ref())),
            SearchKey::Before(d) => internal < *d.as_ref(),
            SearchKey::On(d) => internal == *d.as_ref(),
            SearchKey::Since(d) => internal >= *d.as_ref(),
            SearchKey::SentBefore(d) => c.analysed().sent.is_some_and(|s| s < *d.as_ref()),
            SearchKey::SentOn(d) => c.analysed().sent.is_some_and(|s| s == *d.as_ref()),
            SearchKey::SentSince(d) => c.analysed().sent.is_some_and(|s| s >= *d.as_ref()),
            SearchKey::Larger(n) => c.state.message.raw.len() > *n as usize,
            SearchKey::Smaller(n) => c.state.message.raw.len() < *n as usize,
            SearchKey::Header(name, value) => c.header_contains(name.as_ref(), &needle(value)),
            SearchKey::From(s) => c.header_contains(b"from", &needle(s)),
            SearchKey::To(s) => c.header_contains(b"to", &needle(s)),
            SearchKey::Cc(s) => c.header_contains(b"cc", &needle(s)),
            SearchKey::Bcc(s) => c.header_contains(b"bcc", &needle(s)),
            SearchKey::Subject(s) => {
                let n = needle(s);
                // The decoded subject, or the raw one for clients searching encoded words.
                c.analysed().subject.contains(&n) || c.header_contains(b"subject", &n)
            }
            SearchKey::Body(s) => c.analysed().body.contains(&needle(s)),
            SearchKey::Text(s) => {
                let n = needle(s);
                let a = c.analysed();
                a.body.contains(&n) || a.fields.iter().any(|(_, v)| v.contains(&n))
            }
            // Extensions we do not advertise (e.g. WITHIN, MODSEQ) match nothing.
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_header_and_body() {
        let raw = b"Subject: hi\r\n there\r\nFrom: a@b\r\n\r\nbody\r\n";
        let (h, b) = split_message(raw);
        assert_eq!(h, b"Subject: hi\r\n there\r\nFrom: a@b\r\n\r\n");
        assert_eq!(b, b"body\r\n");
        let fields = header_fields(h);
        assert_eq!(fields.len(), 2);
        assert_eq!(fields[0].0, b"Subject");
        assert_eq!(field_value(fields[0].1), "hi there");
        assert_eq!(split_message(b"no body"), (&b"no body"[..], &b""[..]));
    }

    #[test]
    fn header_fields_section_keeps_raw_lines() {
        let raw = b"A: 1\r\nB: 2\r\n 3\r\nC: 4\r\n\r\nbody";
        let names = [AString::try_from("b").expect("valid astring")];
        assert_eq!(
            filter_header(split_message(raw).0, &names, true),
            b"B: 2\r\n 3\r\n\r\n"
        );
        assert_eq!(
            filter_header(split_message(raw).0, &names, false),
            b"A: 1\r\nC: 4\r\n\r\n"
        );
    }

    #[test]
    fn sequence_sets_are_tested_not_walked() {
        let set = SequenceSet::try_from("2:4,9,20:*").expect("valid set");
        assert!(in_set(&set, 3, 25));
        assert!(!in_set(&set, 5, 25));
        assert!(in_set(&set, 9, 25));
        assert!(in_set(&set, 25, 25));
        let huge = SequenceSet::try_from("1:4294967295").expect("valid set");
        assert!(in_set(&huge, 4_000_000_000, 7));
        // `5:*` with a largest of 3 is 3:5.
        let star = SequenceSet::try_from("5:*").expect("valid set");
        assert!(in_set(&star, 3, 3));
    }

    #[test]
    fn list_wildcards() {
        assert!(wildcard_match(b"*", b"INBOX"));
        assert!(wildcard_match(b"%", b"INBOX"));
        assert!(wildcard_match(b"INB*", b"INBOX"));
        assert!(wildcard_match(b"INBOX", b"INBOX"));
        assert!(!wildcard_match(b"INBOX/*", b"INBOX"));
        assert!(!wildcard_match(b"%/x", b"INBOX"));
    }

    #[test]
    fn multipart_sections() {
        let raw = b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n\
--XX\r\nContent-Type: text/plain\r\n\r\nfirst\r\n\
--XX\r\nContent-Type: text/plain\r\n\r\nsecond\r\n--XX--\r\n";
        let one = [nz(1)];
        let (_, body, _) = mime_part(raw, &one).expect("part 1");
        assert!(body.starts_with(b"first"));
        let two = [nz(2)];
        let (header, body, _) = mime_part(raw, &two).expect("part 2");
        assert!(header.starts_with(b"Content-Type: text/plain"));
        assert!(body.starts_with(b"second"));
        assert!(mime_part(raw, &[nz(3)]).is_none());
        let single = b"Subject: x\r\n\r\nonly\r\n";
        assert_eq!(mime_part(single, &one).map(|p| p.1), Some(&b"only\r\n"[..]));
    }
}
