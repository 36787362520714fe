//! The vendor-neutral HTTP part of every helpdesk adapter: one reqwest client per helpdesk
//! (connection reuse, ring TLS with extra roots), the API secret attached the way the vendor
//! wants it, retries with backoff that honour `Retry-After`, which calls are safe to retry,
//! and error details that never hold the secret.
//!
//! **Retries.** Inside one call: 429, 5xx, connect errors and timeouts are retried with
//! exponential backoff and jitter, honouring `Retry-After` up to `max_delay`. 401/403 fail at
//! once (`auth`); other 4xx are answers, not trouble: the adapter decides what they mean. A
//! call marked [`Safety::Once`] (a reply POST) that timed out, lost its connection after
//! sending, or got a 5xx other than 503 is *not* retried: it may have taken effect, and a
//! second reply would be a second delivered mail. The flow asks the vendor whether the reply
//! is there before it posts again ([`super::Vendor::reply_posted`]).
//!
//! A vendor adapter (`supportbee.rs`, ...) only builds paths, queries and bodies and reads the
//! answers; it never sees a retry loop or a raw reqwest error.

use std::{
    fmt,
    time::{Duration, SystemTime},
};

use reqwest::{Method, StatusCode, Url, header};

use super::HelpdeskError;
use crate::{
    canary::life::Reason,
    edges::{error_chain, is_tls_error, redact, rustls_client_config},
};

/// How much of an error body goes into a detail.
const BODY_SNIPPET: usize = 200;

/// Retries inside one API call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all (1 = no retry).
    pub attempts: u32,
    /// Delay before the first retry; doubled for each next one, with jitter.
    pub base_delay: Duration,
    /// Cap on any single delay, including one asked for by `Retry-After`.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 3,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
        }
    }
}

/// Where the API secret goes in every request.
#[derive(Clone)]
pub enum Auth {
    /// A query parameter (SupportBee's `auth_token`): the secret is in every URL, so details are
    /// built from method and path only.
    Query { name: String },
    /// A header, e.g. `Authorization: token …` (RT) or `Authorization: Token …`
    /// (django-helpdesk): `prefix` is put before the secret.
    Header {
        name: header::HeaderName,
        prefix: String,
    },
    /// Nothing attached by the client: the adapter sends a credential it renews itself with
    /// each call ([`Request::bearer`], an OAuth2 access token). The configured secret (the
    /// OAuth2 client secret) is still scrubbed from every detail.
    PerCall,
}

/// Whether a call may be sent again after a failure that might have happened after the server
/// acted on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Safety {
    /// Reads, and changes that end in the same state however often they run.
    Idempotent,
    /// A call that must not run twice (posting a reply): retried only when nothing was sent
    /// (connect refused) or the server turned it away (429, 503). Any other 5xx may come
    /// after the server acted on it.
    Once,
}

/// One helpdesk's HTTP endpoint.
pub struct ApiClient {
    http: reqwest::Client,
    base: Url,
    secret: String,
    auth: Auth,
    retry: RetryPolicy,
    /// Headers that say how many requests the account has left (the first present wins).
    rate_limit_headers: &'static [&'static str],
    /// The last figure one of them gave; `u64::MAX` before any.
    remaining: std::sync::atomic::AtomicU64,
    /// A vendor header read like `Retry-After` when that is absent (Help Scout's
    /// `X-RateLimit-Retry-After`); see [`ApiClient::with_retry_after_header`].
    retry_after_header: Option<&'static str>,
}

/// A request body.
pub enum Body {
    Json(serde_json::Value),
    /// `application/x-www-form-urlencoded` (an OAuth2 token request).
    Form(Vec<(&'static str, String)>),
}

/// One call with everything [`ApiClient::call`] takes, and what it does not: a form body, a
/// bearer token for this call only, and 401 handed back as an answer.
pub struct Request<'a> {
    pub method: Method,
    pub path: &'a [&'a str],
    pub query: &'a [(&'a str, &'a str)],
    pub body: Option<Body>,
    pub safety: Safety,
    /// `Authorization: Bearer …` for this call (with [`Auth::PerCall`]); scrubbed from
    /// details like the secret.
    pub bearer: Option<&'a str>,
    /// Hand a 401 back as an [`Answer`] instead of failing with `auth`: the adapter renews an
    /// expired access token and asks once more.
    pub answer_unauthorized: bool,
    /// The `Accept` header, when not JSON (Front's raw message: `message/rfc822`).
    pub accept: Option<&'static str>,
}

impl fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiClient")
            .field("base", &self.base.as_str())
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

/// What a client is built from. Plain data: the config layer resolves the secret into it.
#[derive(Clone)]
pub struct ClientParams {
    pub base_url: String,
    pub secret: String,
    pub auth: Auth,
    /// Per HTTP request (connect included).
    pub timeout: Duration,
    pub retry: RetryPolicy,
    /// PEM certificates trusted in addition to webpki-roots.
    pub extra_roots_pem: Option<Vec<u8>>,
    /// The vendor's headers for the requests left in its rate limit (Zendesk
    /// `X-Rate-Limit-Remaining`, …), first present wins; empty if it sends none.
    pub rate_limit_headers: &'static [&'static str],
}

impl fmt::Debug for ClientParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientParams")
            .field("base_url", &self.base_url)
            .field("secret", &"[redacted]")
            .field("timeout", &self.timeout)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

/// A failed attempt, before deciding whether to retry.
struct Attempt {
    reason: Reason,
    detail: String,
    retry: bool,
    retry_after: Option<Duration>,
    /// Not retried only because the call must not run twice, and it may have run.
    maybe_applied: bool,
}

/// An answer the adapter reads: any status but 401/403/429/5xx.
pub struct Answer {
    pub status: StatusCode,
    pub body: Vec<u8>,
}

impl ApiClient {
    /// Builds the HTTP client. Fails (`api`) only on a bad base URL or unusable extra roots.
    pub fn new(params: ClientParams) -> Result<ApiClient, HelpdeskError> {
        let config_error = |detail: String| HelpdeskError {
            reason: Reason::Api,
            detail,
            attempts: 0,
            maybe_applied: false,
        };
        let base = Url::parse(&params.base_url)
            .map_err(|e| config_error(format!("base URL {:?}: {e}", params.base_url)))?;
        if base.cannot_be_a_base() || !matches!(base.scheme(), "http" | "https") {
            return Err(config_error(format!(
                "base URL {:?} must be http(s)://host[:port][/path]",
                params.base_url
            )));
        }
        let mut tls =
            rustls_client_config(params.extra_roots_pem.as_deref()).map_err(config_error)?;
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(params.timeout)
            .connect_timeout(params.timeout)
            .user_agent(concat!("mailcanary/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| config_error(format!("HTTP client: {}", error_chain(&e.without_url()))))?;
        Ok(ApiClient {
            http,
            base,
            secret: params.secret,
            auth: params.auth,
            retry: RetryPolicy {
                attempts: params.retry.attempts.max(1),
                ..params.retry
            },
            rate_limit_headers: params.rate_limit_headers,
            remaining: std::sync::atomic::AtomicU64::new(u64::MAX),
            retry_after_header: None,
        })
    }

    /// Also honour `name` as a `Retry-After` (in seconds or as a date) when an answer carries
    /// no `Retry-After` of its own.
    pub fn with_retry_after_header(mut self, name: &'static str) -> ApiClient {
        self.retry_after_header = Some(name);
        self
    }

    /// Requests left in the vendor's rate limit, as its last answer said (if it says).
    pub fn rate_limit_remaining(&self) -> Option<u64> {
        let v = self.remaining.load(std::sync::atomic::Ordering::Relaxed);
        (v != u64::MAX).then_some(v)
    }

    /// An `api` error for an answer the adapter did not want (a 4xx that is not retried, a
    /// 2xx it cannot use), with the start of the body, scrubbed of the secret.
    pub fn answer_error(&self, what: &str, answer: &Answer) -> HelpdeskError {
        HelpdeskError {
            reason: Reason::Api,
            detail: self.scrub(&format!(
                "{what}: {}{}",
                answer.status,
                snippet(&answer.body)
            )),
            attempts: 1,
            maybe_applied: false,
        }
    }

    /// `Ok` for a 2xx answer, else an `api` error with its status and body.
    pub fn success(&self, what: &str, answer: &Answer) -> Result<(), HelpdeskError> {
        if answer.status.is_success() {
            Ok(())
        } else {
            Err(self.answer_error(what, answer))
        }
    }

    /// Like [`ApiClient::success`], but 404 is done too: what a clean-up wanted gone is gone.
    pub fn success_or_gone(&self, what: &str, answer: &Answer) -> Result<(), HelpdeskError> {
        if answer.status == StatusCode::NOT_FOUND {
            return Ok(());
        }
        self.success(what, answer)
    }

    /// An `api` error about an answer's content ("unexpected JSON: …").
    pub fn content_error(&self, what: &str, problem: &str) -> HelpdeskError {
        HelpdeskError {
            reason: Reason::Api,
            detail: self.scrub(&format!("{what}: {problem}")),
            attempts: 1,
            maybe_applied: false,
        }
    }

    /// Decodes a 2xx answer as JSON of type `T`; anything else is an `api` error whose detail
    /// says what was wrong (serde's message for a wrong shape, the status and body otherwise).
    pub fn json<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
        answer: &Answer,
    ) -> Result<T, HelpdeskError> {
        if !answer.status.is_success() {
            return Err(self.answer_error(what, answer));
        }
        serde_json::from_slice(&answer.body)
            .map_err(|e| self.content_error(what, &format!("unexpected JSON: {e}")))
    }

    fn scrub(&self, text: &str) -> String {
        redact(text, &self.secret)
    }

    /// One API call with retries. Returns any answer that is not retried and not an auth
    /// failure (2xx, and 4xx other than 401/403/429: the caller decides what they mean);
    /// errors are `auth`, or `api`/`connect`/`timeout` once retries run out.
    pub async fn call(
        &self,
        method: Method,
        path: &[&str],
        query: &[(&str, &str)],
        json: Option<serde_json::Value>,
        safety: Safety,
    ) -> Result<Answer, HelpdeskError> {
        self.request(Request {
            method,
            path,
            query,
            body: json.map(Body::Json),
            safety,
            bearer: None,
            answer_unauthorized: false,
            accept: None,
        })
        .await
    }

    /// [`ApiClient::call`] with the extras of [`Request`].
    pub async fn request(&self, req: Request<'_>) -> Result<Answer, HelpdeskError> {
        let Request {
            method,
            path,
            query,
            body,
            safety,
            bearer,
            answer_unauthorized,
            accept,
        } = req;
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("checked in new: the base URL can be a base")
            .pop_if_empty()
            .extend(path);
        let what = format!("{method} {}", url.path());
        // reqwest's `query` sits behind a feature this crate does not enable; build it here.
        {
            let mut pairs = url.query_pairs_mut();
            pairs.extend_pairs(query);
            if let Auth::Query { name } = &self.auth {
                pairs.append_pair(name, &self.secret);
            }
        }
        if url.query() == Some("") {
            url.set_query(None);
        }
        // reqwest's `form` is behind a feature too: encode it the way a query is encoded.
        let form = match &body {
            Some(Body::Form(fields)) => {
                let mut u = Url::parse("http://form.invalid/").expect("a valid URL");
                u.query_pairs_mut()
                    .extend_pairs(fields.iter().map(|(k, v)| (*k, v.as_str())));
                Some(u.query().unwrap_or_default().to_string())
            }
            _ => None,
        };
        let scrub = |text: &str| match bearer {
            Some(b) => redact(&self.scrub(text), b),
            None => self.scrub(text),
        };
        let idempotent = safety == Safety::Idempotent;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut request = self
                .http
                .request(method.clone(), url.clone())
                .header(header::ACCEPT, accept.unwrap_or("application/json"));
            if let Auth::Header { name, prefix } = &self.auth {
                request = request.header(name.clone(), format!("{prefix}{}", self.secret));
            }
            if let Some(b) = bearer {
                request = request.header(header::AUTHORIZATION, format!("Bearer {b}"));
            }
            match (&body, &form) {
                (Some(Body::Json(v)), _) => request = request.json(v),
                (_, Some(f)) => {
                    request = request
                        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                        .body(f.clone());
                }
                _ => {}
            }
            let failure = match self
                .attempt(request, &what, idempotent, answer_unauthorized)
                .await
            {
                Ok(answer) => return Ok(answer),
                Err(f) => f,
            };
            if !failure.retry || attempt >= self.retry.attempts {
                return Err(HelpdeskError {
                    reason: failure.reason,
                    detail: scrub(&failure.detail),
                    attempts: attempt,
                    maybe_applied: failure.maybe_applied,
                });
            }
            let delay = match failure.retry_after {
                Some(d) => d.min(self.retry.max_delay),
                None => backoff(&self.retry, attempt),
            };
            tracing::debug!(
                call = %what,
                attempt,
                reason = %failure.reason,
                delay_ms = delay.as_millis() as u64,
                "helpdesk call failed; retrying"
            );
            tokio::time::sleep(delay).await;
        }
    }

    async fn attempt(
        &self,
        request: reqwest::RequestBuilder,
        what: &str,
        idempotent: bool,
        answer_unauthorized: bool,
    ) -> Result<Answer, Attempt> {
        let transport = |e: reqwest::Error| {
            let (reason, retry, maybe_applied) = if e.is_timeout() {
                (Reason::Timeout, idempotent, !idempotent)
            } else if is_tls_error(&e) {
                // The handshake refused the server (a certificate the probe does not trust:
                // a private CA needs `ca_file`): nothing was sent, and trying again meets the
                // same certificate.
                (Reason::Tls, false, false)
            } else if e.is_connect() {
                // Nothing was sent: always safe to retry.
                (Reason::Connect, true, false)
            } else {
                (Reason::Connect, idempotent, !idempotent)
            };
            Attempt {
                reason,
                detail: format!("{what}: {}", error_chain(&e.without_url())),
                retry,
                retry_after: None,
                maybe_applied,
            }
        };
        let response = request.send().await.map_err(transport)?;
        let status = response.status();
        let retry_after = std::iter::once(header::RETRY_AFTER.as_str())
            .chain(self.retry_after_header)
            .find_map(|h| response.headers().get(h))
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        if let Some(left) = self.rate_limit_headers.iter().find_map(|h| {
            response
                .headers()
                .get(*h)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
        }) {
            self.remaining
                .store(left.min(u64::MAX - 1), std::sync::atomic::Ordering::Relaxed);
        }
        let body = response.bytes().await.map_err(transport)?.to_vec();
        if status == StatusCode::UNAUTHORIZED && answer_unauthorized {
            return Ok(Answer { status, body });
        }
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(Attempt {
                reason: Reason::Auth,
                detail: format!("{what}: {status}{}", snippet(&body)),
                retry: false,
                retry_after: None,
                maybe_applied: false,
            });
        }
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            // 429 and 503 say the request was turned away; any other 5xx may come after the
            // server acted (django-helpdesk saves the reply, then fails to mail it: 500), so a
            // call that must not run twice is not sent again blindly: the flow looks first.
            let refused = status == StatusCode::TOO_MANY_REQUESTS
                || status == StatusCode::SERVICE_UNAVAILABLE;
            return Err(Attempt {
                reason: Reason::Api,
                detail: format!("{what}: {status}{}", snippet(&body)),
                retry: idempotent || refused,
                retry_after,
                maybe_applied: !idempotent && !refused,
            });
        }
        Ok(Answer { status, body })
    }
}

/// Full-jitter-ish exponential backoff: `base * 2^(attempt-1)`, capped, then a uniform draw from
/// its upper half (never zero, so a hammered server still gets a pause).
fn backoff(policy: &RetryPolicy, attempt: u32) -> Duration {
    use rand::RngExt;
    let exp = policy
        .base_delay
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(policy.max_delay);
    let half = exp / 2;
    let jitter_us = rand::rng().random_range(0..=half.as_micros() as u64);
    half + Duration::from_micros(jitter_us)
}

/// `Retry-After: 3` or `Retry-After: Wed, 21 Oct 2026 07:28:00 GMT`.
fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// `": <start of the body>"`, for details; empty for an empty body.
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return String::new();
    }
    let mut cut: String = text.chars().take(BODY_SNIPPET).collect();
    if cut.len() < text.len() {
        cut.push('…');
    }
    format!(": {cut}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn backoff_grows_and_stays_capped() {
        let p = RetryPolicy {
            attempts: 5,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(1),
        };
        for _ in 0..50 {
            let first = backoff(&p, 1);
            assert!(first >= Duration::from_millis(100) && first <= Duration::from_millis(200));
            let third = backoff(&p, 3);
            assert!(third >= Duration::from_millis(400) && third <= Duration::from_millis(800));
            assert!(backoff(&p, 30) <= Duration::from_secs(1));
        }
    }
}
