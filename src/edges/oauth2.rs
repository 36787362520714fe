//! OAuth2 access tokens for IMAP and SMTP login (SASL XOAUTH2, or OAUTHBEARER of RFC 7628).
//!
//! A [`TokenSource`] hands out the bearer token a login sends, from one of three sources:
//! - [`Grant::File`]: a file another process keeps fresh; re-read whenever its mtime or length
//!   changes (and after the server refused the token it held);
//! - [`Grant::ClientCredentials`]: `grant_type=client_credentials` at a token endpoint
//!   (Microsoft 365 app-only access);
//! - [`Grant::RefreshToken`]: `grant_type=refresh_token` (Gmail with the operator's own OAuth
//!   client).
//!
//! A granted token is cached and renewed once a fifth of its lifetime is left (at most five
//! minutes early), and renewed at once after a server refused it, once per refusal: the caller
//! passes the refused token to [`TokenSource::refused`], and only that token is dropped.
//!
//! A token endpoint that fails, cannot be reached or refuses the grant is reason `token`; a
//! server refusing the token is `auth` (the IMAP and SMTP edges say so). No error or log line
//! carries the client secret, the refresh token or an access token: they are [`Hidden`].

use std::{
    fmt,
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use base64::Engine as _;
use reqwest::Url;
use serde::Deserialize;
use tokio::sync::Mutex;

use super::{error_chain, redact, rustls_client_config};

/// A secret value (client secret, refresh token, access token): `Debug` and `Display` print
/// `***`; [`Hidden::expose`] gives the value for the wire.
#[derive(Clone, PartialEq, Eq)]
pub struct Hidden(String);

impl Hidden {
    pub fn new(value: impl Into<String>) -> Hidden {
        Hidden(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Hidden {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Hidden {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The SASL mechanism a login uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    /// Google's and Microsoft's `XOAUTH2`.
    XOAuth2,
    /// RFC 7628 `OAUTHBEARER`.
    OAuthBearer,
}

impl Mechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::XOAuth2 => "XOAUTH2",
            Mechanism::OAuthBearer => "OAUTHBEARER",
        }
    }

    /// The client's first message (not base64-encoded yet).
    pub fn initial_response(self, user: &str, token: &Hidden) -> Vec<u8> {
        let token = token.expose();
        match self {
            Mechanism::XOAuth2 => format!("user={user}\x01auth=Bearer {token}\x01\x01"),
            Mechanism::OAuthBearer => format!("n,a={user},\x01auth=Bearer {token}\x01\x01"),
        }
        .into_bytes()
    }

    /// The client's answer to an error challenge (the server's JSON saying why it refused):
    /// empty for XOAUTH2, `%x01` for OAUTHBEARER (RFC 7628 3.2.3). The server then answers
    /// with its final failure.
    pub fn error_ack(self) -> &'static [u8] {
        match self {
            Mechanism::XOAuth2 => b"",
            Mechanism::OAuthBearer => b"\x01",
        }
    }

    /// The initial response, base64-encoded as SMTP AUTH and IMAP AUTHENTICATE send it.
    pub fn initial_response_base64(self, user: &str, token: &Hidden) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.initial_response(user, token))
    }
}

/// Where tokens come from.
#[derive(Clone, Debug)]
pub enum Grant {
    File {
        path: PathBuf,
    },
    ClientCredentials {
        token_endpoint: String,
        client_id: String,
        client_secret: Hidden,
        scope: Option<String>,
    },
    RefreshToken {
        token_endpoint: String,
        client_id: String,
        client_secret: Hidden,
        refresh_token: Hidden,
        scope: Option<String>,
    },
}

/// How one login authenticates with OAuth2: the mechanism and the (shared) token source.
#[derive(Clone, Debug)]
pub struct Login {
    pub mechanism: Mechanism,
    pub source: std::sync::Arc<TokenSource>,
}

/// The token endpoint failed, could not be reached or refused the grant; or the token file
/// could not be read. The `token` reason. `detail` holds no secret.
#[derive(Clone, Debug, thiserror::Error)]
#[error("oauth2 token: {detail}")]
pub struct TokenError {
    pub detail: String,
}

/// Renewal ahead of expiry: a fifth of the lifetime, at most this.
const RENEW_EARLY_MAX: Duration = Duration::from_secs(300);
/// Assumed lifetime when the endpoint does not say (`expires_in` is only RECOMMENDED).
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);

struct Cached {
    token: Hidden,
    /// For endpoint grants: when to ask again.
    renew_at: Option<Instant>,
    /// For the token file: the (mtime, len) the token was read at.
    stamp: Option<(SystemTime, u64)>,
}

/// Hands out a valid access token; one per configured `oauth2` section, shared by every
/// connection made with it.
pub struct TokenSource {
    grant: Grant,
    http: reqwest::Client,
    cache: Mutex<Option<Cached>>,
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSource")
            .field("grant", &self.grant)
            .finish()
    }
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

#[derive(Deserialize)]
struct ErrorAnswer {
    error: String,
}

impl TokenSource {
    /// `extra_roots_pem`: certificates trusted beside webpki-roots for the token endpoint.
    pub fn new(
        grant: Grant,
        timeout: Duration,
        extra_roots_pem: Option<&[u8]>,
    ) -> Result<TokenSource, TokenError> {
        let tls = rustls_client_config(extra_roots_pem).map_err(|detail| TokenError { detail })?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("mailcanary/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| TokenError {
                detail: format!("HTTP client: {}", error_chain(&e.without_url())),
            })?;
        Ok(TokenSource {
            grant,
            http,
            cache: Mutex::new(None),
        })
    }

    /// A token to log in with: the cached one while it is fresh, else a new one.
    pub async fn token(&self) -> Result<Hidden, TokenError> {
        let mut cache = self.cache.lock().await;
        if let Grant::File { path } = &self.grant {
            let meta = std::fs::metadata(path).map_err(|e| TokenError {
                detail: format!("token file {}: {e}", path.display()),
            })?;
            let stamp = (
                meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                meta.len(),
            );
            if let Some(c) = cache.as_ref()
                && c.stamp == Some(stamp)
            {
                return Ok(c.token.clone());
            }
            let text = std::fs::read_to_string(path).map_err(|e| TokenError {
                detail: format!("token file {}: {e}", path.display()),
            })?;
            let token = text.trim();
            if token.is_empty() {
                return Err(TokenError {
                    detail: format!("token file {} is empty", path.display()),
                });
            }
            let token = Hidden::new(token);
            *cache = Some(Cached {
                token: token.clone(),
                renew_at: None,
                stamp: Some(stamp),
            });
            return Ok(token);
        }
        if let Some(c) = cache.as_ref()
            && c.renew_at.is_some_and(|at| Instant::now() < at)
        {
            return Ok(c.token.clone());
        }
        let asked = Instant::now();
        let (token, lifetime) = self.ask().await?;
        let early = (lifetime / 5).min(RENEW_EARLY_MAX);
        *cache = Some(Cached {
            token: token.clone(),
            renew_at: Some(asked + lifetime - early),
            stamp: None,
        });
        Ok(token)
    }

    /// The server refused `token`: forget it (only if it is still the cached one), so the next
    /// [`token`](Self::token) asks anew (or re-reads the file).
    pub async fn refused(&self, token: &Hidden) {
        let mut cache = self.cache.lock().await;
        if cache.as_ref().is_some_and(|c| &c.token == token) {
            *cache = None;
        }
    }

    async fn ask(&self) -> Result<(Hidden, Duration), TokenError> {
        let (endpoint, mut fields, secrets): (&str, Vec<(&str, &str)>, Vec<&str>) =
            match &self.grant {
                Grant::File { .. } => unreachable!("a token file has no endpoint"),
                Grant::ClientCredentials {
                    token_endpoint,
                    client_id,
                    client_secret,
                    scope,
                } => {
                    let mut f = vec![
                        ("grant_type", "client_credentials"),
                        ("client_id", client_id.as_str()),
                        ("client_secret", client_secret.expose()),
                    ];
                    if let Some(s) = scope {
                        f.push(("scope", s.as_str()));
                    }
                    (token_endpoint, f, vec![client_secret.expose()])
                }
                Grant::RefreshToken {
                    token_endpoint,
                    client_id,
                    client_secret,
                    refresh_token,
                    scope,
                } => {
                    let mut f = vec![
                        ("grant_type", "refresh_token"),
                        ("client_id", client_id.as_str()),
                        ("client_secret", client_secret.expose()),
                        ("refresh_token", refresh_token.expose()),
                    ];
                    if let Some(s) = scope {
                        f.push(("scope", s.as_str()));
                    }
                    (
                        token_endpoint,
                        f,
                        vec![client_secret.expose(), refresh_token.expose()],
                    )
                }
            };
        let scrub = |text: &str| secrets.iter().fold(text.to_string(), |t, s| redact(&t, s));
        let mut form = Url::parse("http://form.invalid/").expect("a valid URL");
        form.query_pairs_mut().extend_pairs(fields.drain(..));
        let body = form.query().unwrap_or_default().to_string();
        let url = Url::parse(endpoint).map_err(|e| TokenError {
            detail: format!("token endpoint {endpoint:?}: {e}"),
        })?;
        let answer = self
            .http
            .post(url)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("accept", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| TokenError {
                detail: scrub(&format!(
                    "POST {endpoint}: {}",
                    error_chain(&e.without_url())
                )),
            })?;
        let status = answer.status();
        let bytes = answer.bytes().await.map_err(|e| TokenError {
            detail: scrub(&format!(
                "POST {endpoint}: reading the answer: {}",
                error_chain(&e.without_url())
            )),
        })?;
        if !status.is_success() {
            // RFC 6749 5.2: `{"error": "invalid_grant", ...}`. Only the error code is quoted:
            // a description is free text an endpoint could fill with anything.
            let code = serde_json::from_slice::<ErrorAnswer>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| "no OAuth2 error code".into());
            let code: String = code
                .chars()
                .filter(|c| c.is_ascii_graphic())
                .take(64)
                .collect();
            return Err(TokenError {
                detail: scrub(&format!("POST {endpoint}: HTTP {status}: {code}")),
            });
        }
        // Not serde's message: it may quote a value, and this answer holds the token.
        let granted: TokenAnswer = serde_json::from_slice(&bytes).map_err(|_| TokenError {
            detail: format!("POST {endpoint}: unexpected answer: no access_token in JSON"),
        })?;
        if granted.access_token.is_empty() {
            return Err(TokenError {
                detail: format!("POST {endpoint}: empty access_token"),
            });
        }
        let lifetime = granted
            .expires_in
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_LIFETIME);
        tracing::debug!(
            endpoint,
            expires_in_s = lifetime.as_secs(),
            "oauth2 access token granted"
        );
        Ok((Hidden::new(granted.access_token), lifetime))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_responses_follow_the_mechanisms() {
        let t = Hidden::new("tok");
        assert_eq!(
            Mechanism::XOAuth2.initial_response("u@x", &t),
            b"user=u@x\x01auth=Bearer tok\x01\x01"
        );
        assert_eq!(
            Mechanism::OAuthBearer.initial_response("u@x", &t),
            b"n,a=u@x,\x01auth=Bearer tok\x01\x01"
        );
        assert_eq!(format!("{t:?} {t}"), "*** ***");
    }

    #[tokio::test]
    async fn token_file_is_reread_when_it_changes() {
        let dir = std::env::temp_dir().join(format!("mc-oauth2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "first\n").unwrap();
        let src = TokenSource::new(
            Grant::File { path: path.clone() },
            Duration::from_secs(5),
            None,
        )
        .unwrap();
        assert_eq!(src.token().await.unwrap().expose(), "first");
        std::fs::write(&path, "second-token\n").unwrap();
        assert_eq!(src.token().await.unwrap().expose(), "second-token");
        std::fs::remove_file(&path).unwrap();
        let e = src.token().await.unwrap_err();
        assert!(e.detail.contains("token file"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
