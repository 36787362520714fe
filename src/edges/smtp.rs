//! Submitting a canary over SMTP: TCP connect, optional TLS, greeting and EHLO, optional
//! STARTTLS and AUTH, then one mail transaction. The `submit` stage ends with the server's
//! reply to the end of DATA.
//!
//! Built on lettre's low-level [`AsyncSmtpConnection`] rather than `AsyncSmtpTransport`:
//! - the transport always goes through lettre's connection pool (the crate enables `pool`),
//!   and a canary must measure a fresh connect: a pooled connection would hide exactly what a
//!   canary exists to catch (an MX that stopped accepting connections, an expired certificate,
//!   a greeting that takes 30 s) and make submit latency bimodal;
//! - driving the steps ourselves tells us *which* step failed, so a 535 after AUTH is `auth`,
//!   a certificate error is `tls`, and a silent server is a `timeout` "waiting for the
//!   greeting", not a guess from a reply code.
//!
//! The TCP connect and implicit-TLS handshake are done here (tokio-rustls, ring) and the stream
//! handed to lettre; STARTTLS uses lettre's own upgrade with the same trust roots.

use std::{error::Error as StdError, fmt, io, pin::Pin, sync::Arc, task, time::Duration};

use lettre::{
    Message,
    transport::smtp::{
        Error as LettreError,
        authentication::{Credentials, Mechanism},
        client::{
            AsyncSmtpConnection, AsyncTokioStream, Certificate, CertificateStore, TlsParameters,
        },
        extension::ClientId,
    },
};
use rustls_pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::{TlsConnector, client::TlsStream};

use super::{error_chain, oauth2, redact, rustls_client_config};
use crate::canary::life::Reason;

pub use super::TlsMode;

/// Where and how to submit. Plain data: the config layer resolves secrets into it.
#[derive(Clone)]
pub struct SmtpTarget {
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    /// `(user, password)` for AUTH (PLAIN, else LOGIN).
    pub credentials: Option<(String, String)>,
    /// `(user, login)` for AUTH XOAUTH2 / OAUTHBEARER with a token, instead of `credentials`.
    pub oauth2: Option<(String, oauth2::Login)>,
    /// PEM certificates trusted in addition to webpki-roots (a private CA).
    pub extra_roots_pem: Option<Vec<u8>>,
    /// Bound on one whole submission, from TCP connect to the reply to DATA.
    pub timeout: Duration,
    /// Name sent in EHLO; the machine's hostname when `None`.
    pub helo_name: Option<String>,
}

impl fmt::Debug for SmtpTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpTarget")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("user", &self.credentials.as_ref().map(|(u, _)| u))
            .field(
                "oauth2",
                &self.oauth2.as_ref().map(|(u, o)| (u, o.mechanism)),
            )
            .field("extra_roots_pem", &self.extra_roots_pem.is_some())
            .field("timeout", &self.timeout)
            .field("helo_name", &self.helo_name)
            .finish()
    }
}

/// The server accepted the message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Submitted {
    /// The server's reply to the end of DATA, code included (`250 2.0.0 Ok: queued as 4XyZ`).
    pub response: String,
}

/// The step a submission was in when it failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmtpPhase {
    Connect,
    TlsHandshake,
    /// Waiting for the greeting, or the EHLO reply.
    Greeting,
    StartTls,
    Auth,
    /// MAIL FROM, RCPT TO, DATA and the reply to the end of DATA.
    Transaction,
}

impl SmtpPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            SmtpPhase::Connect => "TCP connect",
            SmtpPhase::TlsHandshake => "TLS handshake",
            SmtpPhase::Greeting => "greeting/EHLO",
            SmtpPhase::StartTls => "STARTTLS",
            SmtpPhase::Auth => "AUTH",
            SmtpPhase::Transaction => "mail transaction (MAIL/RCPT/DATA)",
        }
    }
}

/// A failed submission: why (the `reason` label), where, and a detail free of secrets.
#[derive(Debug, Clone, thiserror::Error)]
#[error("smtp {reason} during {}: {detail}", phase.as_str())]
pub struct SmtpError {
    reason: Reason,
    phase: SmtpPhase,
    detail: String,
}

impl SmtpError {
    pub fn reason(&self) -> Reason {
        self.reason
    }

    pub fn phase(&self) -> SmtpPhase {
        self.phase
    }

    /// Human detail for the dashboard; never holds the password.
    pub fn detail(&self) -> &str {
        &self.detail
    }
}

/// A submitter for one target, built once per probe. Every [`submit`](Self::submit) opens a
/// fresh connection and closes it afterwards (see the module doc for why there is no pool).
pub struct Submitter {
    host: String,
    port: u16,
    timeout: Duration,
    hello: ClientId,
    credentials: Option<Credentials>,
    oauth2: Option<(String, oauth2::Login)>,
    /// Kept only to scrub it from error details.
    password: String,
    /// Implicit TLS (`TlsMode::Tls`).
    implicit_tls: Option<(TlsConnector, ServerName<'static>)>,
    /// STARTTLS, required (`TlsMode::StartTls`).
    starttls: Option<TlsParameters>,
}

impl fmt::Debug for Submitter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Submitter")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("timeout", &self.timeout)
            .field("implicit_tls", &self.implicit_tls.is_some())
            .field("starttls", &self.starttls.is_some())
            .field("auth", &self.credentials.is_some())
            .field("oauth2", &self.oauth2.as_ref().map(|(_, o)| o.mechanism))
            .finish()
    }
}

/// How long a QUIT after an accepted message may take. It runs in the background: the stage
/// ended with the reply to DATA, and a server that is slow to say goodbye is not a failure.
const QUIT_GRACE: Duration = Duration::from_secs(5);

impl Submitter {
    /// Validates the target and prepares TLS. Fails (`tls`) only on unusable extra roots or a
    /// host that cannot be a TLS server name.
    pub fn new(target: SmtpTarget) -> Result<Submitter, SmtpError> {
        let config_error = |detail: String| SmtpError {
            reason: Reason::Tls,
            phase: SmtpPhase::Connect,
            detail,
        };
        let (implicit_tls, starttls) = match target.tls {
            TlsMode::None => (None, None),
            TlsMode::Tls => {
                let config = rustls_client_config(target.extra_roots_pem.as_deref())
                    .map_err(config_error)?;
                let name = ServerName::try_from(target.host.clone()).map_err(|e| {
                    config_error(format!("{:?} is not a TLS server name: {e}", target.host))
                })?;
                (Some((TlsConnector::from(Arc::new(config)), name)), None)
            }
            TlsMode::StartTls => {
                // Same roots as the implicit-TLS path; lettre needs its own parameter type.
                let mut builder = TlsParameters::builder(target.host.clone())
                    .certificate_store(CertificateStore::WebpkiRoots);
                if let Some(pem) = &target.extra_roots_pem {
                    // Parse with our own helper first: it rejects PEM without certificates,
                    // which lettre accepts silently.
                    rustls_client_config(Some(pem)).map_err(config_error)?;
                    let cert = Certificate::from_pem(pem)
                        .map_err(|e| config_error(format!("extra root certificates: {e}")))?;
                    builder = builder.add_root_certificate(cert);
                }
                let params = builder
                    .build_rustls()
                    .map_err(|e| config_error(format!("TLS configuration: {e}")))?;
                (None, Some(params))
            }
        };
        let (credentials, password) = match target.credentials {
            Some((user, password)) => (Some(Credentials::new(user, password.clone())), password),
            None => (None, String::new()),
        };
        Ok(Submitter {
            host: target.host,
            port: target.port,
            timeout: target.timeout,
            hello: target.helo_name.map(ClientId::Domain).unwrap_or_default(),
            credentials,
            oauth2: target.oauth2,
            password,
            implicit_tls,
            starttls,
        })
    }

    /// Submits one message over a fresh connection; returns once the server answered the end
    /// of DATA. The whole exchange is bounded by the target's `timeout`.
    pub async fn submit(&self, message: &Message) -> Result<Submitted, SmtpError> {
        let mut phase = SmtpPhase::Connect;
        let outcome = tokio::time::timeout(self.timeout, self.exchange(message, &mut phase)).await;
        match outcome {
            Ok(Ok((submitted, mut conn))) => {
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(QUIT_GRACE, conn.quit()).await;
                });
                Ok(submitted)
            }
            Ok(Err(e)) => Err(e),
            Err(_elapsed) => {
                let within = humantime::format_duration(self.timeout);
                Err(if phase == SmtpPhase::Connect {
                    self.error(
                        Reason::Connect,
                        phase,
                        format!("{} did not complete within {within}", self.addr()),
                    )
                } else {
                    self.error(
                        Reason::Timeout,
                        phase,
                        format!("{} gave no reply within {within}", self.addr()),
                    )
                })
            }
        }
    }

    async fn exchange(
        &self,
        message: &Message,
        phase: &mut SmtpPhase,
    ) -> Result<(Submitted, AsyncSmtpConnection), SmtpError> {
        *phase = SmtpPhase::Connect;
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| self.error(Reason::Connect, *phase, format!("{}: {e}", self.addr())))?;
        let stream: Box<dyn AsyncTokioStream> = match &self.implicit_tls {
            None => Box::new(tcp),
            Some((connector, name)) => {
                *phase = SmtpPhase::TlsHandshake;
                let tls = connector.connect(name.clone(), tcp).await.map_err(|e| {
                    let text = match find_rustls_error(Some(&e)) {
                        Some(r) => r.to_string(),
                        None => e.to_string(),
                    };
                    self.error(Reason::Tls, *phase, format!("{}: {text}", self.addr()))
                })?;
                Box::new(ImplicitTls(tls))
            }
        };

        *phase = SmtpPhase::Greeting;
        let mut conn = AsyncSmtpConnection::connect_with_transport(stream, &self.hello)
            .await
            .map_err(|e| self.classify(*phase, &e))?;

        if let Some(params) = &self.starttls {
            *phase = SmtpPhase::StartTls;
            if !conn.can_starttls() {
                return Err(self.error(
                    Reason::Tls,
                    *phase,
                    format!(
                        "{} does not offer STARTTLS, which this target requires",
                        self.addr()
                    ),
                ));
            }
            conn.starttls(params.clone(), &self.hello)
                .await
                .map_err(|e| self.classify(*phase, &e))?;
        }

        if let Some(credentials) = &self.credentials {
            *phase = SmtpPhase::Auth;
            conn.auth(&[Mechanism::Plain, Mechanism::Login], credentials)
                .await
                .map_err(|e| self.classify(*phase, &e))?;
        }

        if let Some((user, login)) = &self.oauth2 {
            *phase = SmtpPhase::Auth;
            self.auth_oauth2(&mut conn, user, login).await?;
        }

        *phase = SmtpPhase::Transaction;
        let response = conn
            .send(message.envelope(), &message.formatted())
            .await
            .map_err(|e| self.classify(*phase, &e))?;
        let text: Vec<&str> = response.message().collect();
        let submitted = Submitted {
            response: redact(
                &format!("{} {}", response.code(), text.join(" ")),
                &self.password,
            ),
        };
        Ok((submitted, conn))
    }

    /// AUTH XOAUTH2 / OAUTHBEARER with the initial response, driven line by line rather than
    /// with lettre's `auth`: a server refusing the token answers with an error challenge,
    /// `334 <base64 JSON>` (Dovecot's, relayed by Postfix), which the client must acknowledge
    /// (an empty line for XOAUTH2, `%x01` for OAUTHBEARER) to get the final 5xx; lettre's
    /// XOAUTH2 cannot answer it. A refusal is `auth` whatever the final code (Dovecot's growing
    /// failure penalty can turn it into a `454`); a 4xx without a challenge is `tempfail`; a
    /// token endpoint that fails is `token`.
    async fn auth_oauth2(
        &self,
        conn: &mut AsyncSmtpConnection,
        user: &str,
        login: &oauth2::Login,
    ) -> Result<(), SmtpError> {
        let phase = SmtpPhase::Auth;
        let token = login
            .source
            .token()
            .await
            .map_err(|e| self.error(Reason::Token, phase, e.to_string()))?;
        let mechanism = login.mechanism;
        let scrub = |e: SmtpError| SmtpError {
            detail: redact(&e.detail, token.expose()),
            ..e
        };
        let first = conn
            .command(Line(format!(
                "AUTH {} {}",
                mechanism.as_str(),
                mechanism.initial_response_base64(user, &token)
            )))
            .await;
        let challenge = match first {
            Ok(r) if r.has_code(334) => r.message().collect::<Vec<_>>().join(" "),
            Ok(_) => return Ok(()),
            Err(e) => {
                let e = scrub(self.classify(phase, &e));
                if e.reason == Reason::Auth {
                    login.source.refused(&token).await;
                }
                return Err(e);
            }
        };
        login.source.refused(&token).await;
        let ack = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            mechanism.error_ack(),
        );
        let why = describe_challenge(&challenge);
        let detail = match conn.command(Line(ack)).await {
            Ok(r) => format!(
                "{} refused the token ({why}), then answered {} to the acknowledgement",
                mechanism.as_str(),
                r.code()
            ),
            Err(e) => format!(
                "{} refused the token ({why}): {}",
                mechanism.as_str(),
                error_chain(&e)
            ),
        };
        Err(scrub(self.error(Reason::Auth, phase, detail)))
    }

    fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    fn error(&self, reason: Reason, phase: SmtpPhase, detail: String) -> SmtpError {
        SmtpError {
            reason,
            phase,
            detail: redact(&detail, &self.password),
        }
    }

    /// Maps a lettre error met in `phase` to a reason.
    fn classify(&self, phase: SmtpPhase, e: &LettreError) -> SmtpError {
        let code = e.status().map(u16::from);
        let reason = if find_rustls_error(Some(e)).is_some() {
            Reason::Tls
        } else if e.is_timeout() {
            Reason::Timeout
        } else {
            match phase {
                // Whatever breaks while securing the channel, the channel is not secure.
                SmtpPhase::TlsHandshake | SmtpPhase::StartTls => Reason::Tls,
                // 4xx during AUTH is the server's trouble (454: auth backend down), not ours.
                SmtpPhase::Auth if e.is_transient() => Reason::Tempfail,
                // 535 and friends, or no mechanism we both speak.
                SmtpPhase::Auth => Reason::Auth,
                // 530: authentication required (we sent none, or it did not take).
                _ if code == Some(530) => Reason::Auth,
                _ if e.is_permanent() => Reason::Rejected,
                _ if e.is_transient() => Reason::Tempfail,
                SmtpPhase::Connect => Reason::Connect,
                _ => Reason::Protocol,
            }
        };
        self.error(reason, phase, error_chain(e))
    }
}

/// One command line as lettre's `command` writes it.
struct Line(String);

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}\r\n", self.0)
    }
}

/// The `status` of an RFC 7628 error challenge (base64 JSON), or a note that it had none.
fn describe_challenge(challenge: &str) -> String {
    let json = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, challenge.trim())
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    match json
        .as_ref()
        .and_then(|j| j.get("status"))
        .and_then(|s| s.as_str())
    {
        Some(status) => format!(
            "status {:?}",
            status
                .chars()
                .filter(|c| c.is_ascii_graphic())
                .take(32)
                .collect::<String>()
        ),
        None => "error challenge".into(),
    }
}

/// Finds a rustls error in a chain. tokio-rustls wraps it in an `io::Error`, whose `source()`
/// skips the wrapped error itself, so look inside with `get_ref` too.
fn find_rustls_error<'a>(
    mut err: Option<&'a (dyn StdError + 'static)>,
) -> Option<&'a rustls::Error> {
    while let Some(e) = err {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(inner) = e.downcast_ref::<io::Error>().and_then(|io| io.get_ref())
            && let Some(r) = inner.downcast_ref::<rustls::Error>()
        {
            return Some(r);
        }
        err = e.source();
    }
    None
}

/// An implicit-TLS stream as lettre's transport trait wants it.
#[derive(Debug)]
struct ImplicitTls(TlsStream<TcpStream>);

impl AsyncTokioStream for ImplicitTls {
    fn peer_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.0.get_ref().0.peer_addr()
    }
}

impl AsyncRead for ImplicitTls {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> task::Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for ImplicitTls {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
        buf: &[u8],
    ) -> task::Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
    ) -> task::Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut task::Context<'_>,
    ) -> task::Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
