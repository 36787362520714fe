//! The helpdesk's inbound MX: SMTP on tokio over mailin's sans-I/O state machine.
//!
//! mailin's `Handler` is synchronous and owned by the session, so the handler only collects the
//! transaction into shared state; the connection driver applies the inbound fault (which may
//! wait: `stall`, `delay:`) after DATA ends and before the final reply is written.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use mailin::{Action, Handler, Response, SessionBuilder, response};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{
    faults::{Fault, Stage},
    helpdesk::{Hub, ParsedMail},
};

/// Longest command line taken (RFC 5321 says 512; be generous, as real MXs are).
const MAX_COMMAND_LINE: usize = 4096;
/// Longest line inside DATA before the message counts as oversized (RFC 5321: 1000).
const MAX_DATA_LINE: usize = 64 * 1024;
/// An idle client is dropped after this long, like Postfix's `smtpd_timeout`.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

pub async fn serve(listener: TcpListener, hub: Arc<Hub>, shutdown: CancellationToken) {
    // The sandbox MX speaks plain SMTP only; TLS and AUTH are exercised against Postfix.
    let builder = SessionBuilder::new(hub.config.hostname.clone());
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "smtp accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let hub = hub.clone();
        let builder = builder.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                r = connection(stream, peer, hub, builder) => {
                    if let Err(e) = r {
                        debug!(%peer, error = %e, "smtp connection ended");
                    }
                }
            }
        });
    }
}

/// One mail transaction as the handler sees it.
#[derive(Default)]
struct Txn {
    from: String,
    data: Vec<u8>,
    size: usize,
    oversized: bool,
    /// Set by `data_end`: the driver takes it and decides the final reply.
    complete: Option<Completed>,
}

struct Completed {
    from: String,
    data: Vec<u8>,
    oversized: bool,
}

struct MxHandler {
    hub: Arc<Hub>,
    txn: Arc<Mutex<Txn>>,
}

impl MxHandler {
    fn txn(&self) -> std::sync::MutexGuard<'_, Txn> {
        self.txn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Handler for MxHandler {
    fn mail(&mut self, _ip: IpAddr, _domain: &str, from: &str) -> Response {
        let mut t = self.txn();
        *t = Txn {
            from: from.to_string(),
            ..Txn::default()
        };
        response::OK
    }

    fn rcpt(&mut self, to: &str) -> Response {
        if self.hub.is_support_address(to) {
            response::OK
        } else {
            response::NO_MAILBOX
        }
    }

    fn data_start(
        &mut self,
        _domain: &str,
        _from: &str,
        _is8bit: bool,
        _to: &[String],
    ) -> Response {
        let mut t = self.txn();
        t.data.clear();
        t.size = 0;
        t.oversized = false;
        response::OK
    }

    fn data(&mut self, buf: &[u8]) -> std::io::Result<()> {
        let max = self.hub.config.max_message_size;
        let mut t = self.txn();
        t.size += buf.len();
        if t.size > max {
            // Keep reading to the end of DATA (the client is still sending), but stop storing.
            t.oversized = true;
            t.data = Vec::new();
        } else {
            t.data.extend_from_slice(buf);
        }
        Ok(())
    }

    fn data_end(&mut self) -> Response {
        let mut t = self.txn();
        let done = Completed {
            from: std::mem::take(&mut t.from),
            data: std::mem::take(&mut t.data),
            oversized: t.oversized,
        };
        t.complete = Some(done);
        // Placeholder: the driver replaces it with the real verdict after applying faults.
        response::OK
    }
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("idle timeout")]
    Timeout,
}

/// Outcome of reading one line.
enum Line {
    Complete,
    /// The line was longer than allowed; its bytes were discarded up to the newline.
    TooLong,
    Eof,
}

/// Reads one line (through `\n`) into `buf`, discarding past `max` bytes.
async fn read_line(
    r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<Line, ConnError> {
    buf.clear();
    let mut too_long = false;
    loop {
        let chunk = tokio::time::timeout(IDLE_TIMEOUT, r.fill_buf())
            .await
            .map_err(|_| ConnError::Timeout)??;
        if chunk.is_empty() {
            return Ok(Line::Eof);
        }
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        if buf.len() + take <= max {
            buf.extend_from_slice(&chunk[..take]);
        } else {
            too_long = true;
        }
        r.consume(take);
        if done {
            return Ok(if too_long {
                Line::TooLong
            } else {
                Line::Complete
            });
        }
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    hub: Arc<Hub>,
    builder: SessionBuilder,
) -> Result<(), ConnError> {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let txn = Arc::new(Mutex::new(Txn::default()));
    let handler = MxHandler {
        hub: hub.clone(),
        txn: txn.clone(),
    };
    let mut session = builder.build(peer.ip(), handler);
    wr.write_all(&session.greeting().buffer()?).await?;

    let mut in_data = false;
    let mut line = Vec::with_capacity(1024);
    loop {
        let max = if in_data {
            MAX_DATA_LINE
        } else {
            MAX_COMMAND_LINE
        };
        match read_line(&mut rd, &mut line, max).await? {
            Line::Eof => return Ok(()),
            Line::TooLong if in_data => {
                // Not the terminator, whatever it held: the message is oversized.
                let mut t = txn.lock().unwrap_or_else(|p| p.into_inner());
                t.oversized = true;
                t.data = Vec::new();
                continue;
            }
            Line::TooLong => {
                wr.write_all(b"500 5.5.2 Line too long\r\n").await?;
                continue;
            }
            Line::Complete => {}
        }
        // mailin expects CRLF; accept a bare LF from sloppy clients as real MXs do.
        if !line.ends_with(b"\r\n") {
            line.pop();
            line.extend_from_slice(b"\r\n");
        }
        let mut res = session.process(&line);
        let completed = txn
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .complete
            .take();
        if let Some(done) = completed {
            res = finish_message(&hub, done).await;
        }
        match res.action {
            Action::NoReply => continue,
            Action::Close => {
                wr.write_all(&res.buffer()?).await?;
                let _ = wr.shutdown().await;
                return Ok(());
            }
            Action::Reply | Action::UpgradeTls => {
                in_data = res.code == 354;
                wr.write_all(&res.buffer()?).await?;
            }
        }
    }
}

/// Decides the reply to the end of DATA: size limit, then the inbound fault.
async fn finish_message(hub: &Hub, done: Completed) -> Response {
    if done.oversized {
        return Response::custom(552, "5.3.4 Message size exceeds fixed limit".into());
    }
    let fault = match hub.faults.get(Stage::Inbound) {
        // A stalled MX holds the client at the end of DATA, as an overloaded queue manager
        // does; when the fault clears, the message is taken as if nothing happened.
        Fault::Stall => hub.faults.wait_unstalled(Stage::Inbound).await,
        f => f,
    };
    match fault {
        Fault::Error => {
            return Response::custom(451, "4.3.0 Temporary failure, try again later".into());
        }
        Fault::Delay(d) => tokio::time::sleep(d).await,
        _ => {}
    }
    let parsed = ParsedMail::parse(&done.data, &done.from, &hub.config.hostname);
    let seq = hub.receive(parsed, fault != Fault::Drop);
    Response::custom(250, format!("2.0.0 Ok: queued as S{seq}"))
}
