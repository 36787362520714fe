//! SupportBee's REST API (<https://developers.supportbee.com>), and the sandbox that mimics it.
//!
//! | call | request |
//! |---|---|
//! | find | `GET /tickets/search?query=TOKEN`, then `GET /tickets?since=…&archived=any` pages |
//! | reply | `POST /tickets/{id}/replies` `{"reply":{"content_attributes":{"body":…}}}` |
//! | archive / trash | `POST /tickets/{id}/archive`, `POST /tickets/{id}/trash` |
//! | delete | trash, then `DELETE /tickets/{id}` (only a trashed ticket can be deleted) |
//!
//! Every request carries `auth_token` as a query parameter (SupportBee's only scheme), so the
//! token is in every URL: error details are built from method and path only, reqwest errors are
//! stripped of their URL (`without_url`), and whatever is left is scrubbed of the token.
//!
//! **Finding a ticket.** Search first, and check that a hit's subject or body really holds the
//! token (search is full-text and may match loosely). If search has no verified hit, or the
//! deployment has no search endpoint (404), scan the ticket list created since the canary was
//! sent, newest first, a few pages at most. The scan costs a second request per poll while the
//! ticket is not there yet, and buys two things: search indexes lag behind ticket creation
//! (minutes, on some helpdesks), and the import stage must measure when an agent could see the
//! ticket, not when the search index caught up. `list_fallback = false` turns it off.
//!
//! **Retries.** Inside one call: 429, 5xx, connect errors and timeouts are retried with
//! exponential backoff and jitter, honouring `Retry-After` up to `max_delay`. 401/403 fail at
//! once (`auth`); other 4xx are answers, not trouble. A reply POST that timed out is *not*
//! retried: the reply may have been created, and a second one would be a second delivered mail.

use std::{
    fmt,
    time::{Duration, SystemTime},
};

use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::{Method, StatusCode, Url, header};
use serde::Deserialize;
use serde_json::json;

use super::{CleanupMode, HelpdeskError, TicketRef};
use crate::{
    canary::life::Reason,
    edges::{error_chain, redact, rustls_client_config},
};

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

/// Where and how to reach one SupportBee account. Plain data: the config layer resolves the
/// token into it.
#[derive(Clone)]
pub struct SupportBeeParams {
    /// `https://COMPANY.supportbee.com`, or the sandbox's `http://127.0.0.1:8088`.
    pub base_url: String,
    pub auth_token: String,
    /// Per HTTP request (connect included).
    pub timeout: Duration,
    pub retry: RetryPolicy,
    /// Scan the ticket list when search finds nothing (see the module doc).
    pub list_fallback: bool,
    /// PEM certificates trusted in addition to webpki-roots.
    pub extra_roots_pem: Option<Vec<u8>>,
}

impl SupportBeeParams {
    /// Defaults for everything but the address and the token.
    pub fn new(base_url: impl Into<String>, auth_token: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            auth_token: auth_token.into(),
            timeout: Duration::from_secs(10),
            retry: RetryPolicy::default(),
            list_fallback: true,
            extra_roots_pem: None,
        }
    }
}

impl fmt::Debug for SupportBeeParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SupportBeeParams")
            .field("base_url", &self.base_url)
            .field("auth_token", &"[redacted]")
            .field("timeout", &self.timeout)
            .field("retry", &self.retry)
            .field("list_fallback", &self.list_fallback)
            .finish()
    }
}

/// Tickets created this long before `since` are still considered: the helpdesk's clock and
/// ours disagree a little, and the token check makes a wide window harmless.
const CLOCK_SLACK: Duration = Duration::from_secs(300);
/// Pages of 100 tickets the list fallback reads at most per call.
const MAX_SCAN_PAGES: u32 = 5;
/// How much of an error body goes into a detail.
const BODY_SNIPPET: usize = 200;

/// A SupportBee client: one HTTP client (connection reuse) per helpdesk.
pub struct SupportBee {
    http: reqwest::Client,
    base: Url,
    token: String,
    retry: RetryPolicy,
    list_fallback: bool,
}

impl fmt::Debug for SupportBee {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SupportBee")
            .field("base", &self.base.as_str())
            .field("retry", &self.retry)
            .field("list_fallback", &self.list_fallback)
            .finish()
    }
}

/// A failed attempt, before deciding whether to retry.
struct Attempt {
    reason: Reason,
    detail: String,
    retry: bool,
    retry_after: Option<Duration>,
}

/// The JSON of a ticket list or search page; only what we read. Wrong shapes fail decoding,
/// and serde's message says what was wrong.
#[derive(Deserialize)]
struct TicketPage {
    tickets: Vec<RawTicket>,
    #[serde(default)]
    total_pages: Option<u32>,
}

#[derive(Deserialize)]
struct RawTicket {
    id: RawId,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    created_at: Option<String>,
    #[serde(default)]
    content: Option<RawContent>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawId {
    Number(u64),
    Text(String),
}

#[derive(Deserialize, Default)]
struct RawContent {
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    html: Option<String>,
}

impl RawTicket {
    fn carries(&self, token: &str) -> bool {
        let token = token.to_lowercase();
        let has = |s: &Option<String>| {
            s.as_deref()
                .is_some_and(|s| s.to_lowercase().contains(&token))
        };
        has(&self.subject)
            || self
                .content
                .as_ref()
                .is_some_and(|c| has(&c.body) || has(&c.text) || has(&c.html))
    }

    fn created(&self) -> Option<SystemTime> {
        let s = self.created_at.as_deref()?;
        DateTime::parse_from_rfc3339(s).ok().map(SystemTime::from)
    }

    fn to_ref(&self) -> TicketRef {
        TicketRef {
            id: match &self.id {
                RawId::Number(n) => n.to_string(),
                RawId::Text(s) => s.clone(),
            },
            created_at: self.created(),
        }
    }
}

impl SupportBee {
    /// Builds the HTTP client. Fails (`api`) only on a bad base URL or unusable extra roots.
    pub fn new(params: SupportBeeParams) -> Result<SupportBee, HelpdeskError> {
        let config_error = |detail: String| HelpdeskError {
            reason: Reason::Api,
            detail,
            attempts: 0,
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
        Ok(SupportBee {
            http,
            base,
            token: params.auth_token,
            retry: RetryPolicy {
                attempts: params.retry.attempts.max(1),
                ..params.retry
            },
            list_fallback: params.list_fallback,
        })
    }

    pub async fn find_ticket(
        &self,
        token: &str,
        since: SystemTime,
    ) -> Result<Option<TicketRef>, HelpdeskError> {
        let (status, body) = self
            .call(
                Method::GET,
                &["tickets", "search"],
                &[("query", token), ("per_page", "100")],
                None,
            )
            .await?;
        let search_available = status != StatusCode::NOT_FOUND;
        if search_available {
            let page = self.expect_page(status, &body, "GET /tickets/search")?;
            if let Some(found) = earliest(page.tickets.iter().filter(|t| t.carries(token))) {
                return Ok(Some(found));
            }
        }
        if !self.list_fallback {
            if !search_available {
                return Err(self.answer_error("GET /tickets/search", status, &body, 1));
            }
            return Ok(None);
        }
        self.scan_list(token, since).await
    }

    /// The list fallback: tickets created since `since` (less the clock slack), newest first.
    async fn scan_list(
        &self,
        token: &str,
        since: SystemTime,
    ) -> Result<Option<TicketRef>, HelpdeskError> {
        let since = DateTime::<Utc>::from(since.checked_sub(CLOCK_SLACK).unwrap_or(since))
            .to_rfc3339_opts(SecondsFormat::Millis, true);
        let mut found = Vec::new();
        for page_no in 1..=MAX_SCAN_PAGES {
            let page_text = page_no.to_string();
            let (status, body) = self
                .call(
                    Method::GET,
                    &["tickets"],
                    &[
                        ("since", since.as_str()),
                        ("archived", "any"),
                        ("per_page", "100"),
                        ("page", page_text.as_str()),
                    ],
                    None,
                )
                .await?;
            let page = self.expect_page(status, &body, "GET /tickets")?;
            let last = page.tickets.is_empty() || page.total_pages.is_none_or(|n| page_no >= n);
            found.extend(page.tickets.into_iter().filter(|t| t.carries(token)));
            if last {
                break;
            }
        }
        Ok(earliest(found.iter()))
    }

    pub async fn post_reply(&self, ticket: &TicketRef, body: &str) -> Result<(), HelpdeskError> {
        let what = "POST /tickets/{id}/replies";
        let payload = json!({ "reply": { "content_attributes": { "body": body } } });
        let (status, answer) = self
            .call(
                Method::POST,
                &["tickets", &ticket.id, "replies"],
                &[],
                Some(payload),
            )
            .await?;
        if status.is_success() {
            Ok(())
        } else {
            Err(self.answer_error(&what.replace("{id}", &ticket.id), status, &answer, 1))
        }
    }

    pub async fn cleanup(&self, ticket: &TicketRef, how: CleanupMode) -> Result<(), HelpdeskError> {
        match how {
            CleanupMode::None => Ok(()),
            CleanupMode::Archive => self.change(Method::POST, ticket, Some("archive")).await,
            CleanupMode::Trash => self.change(Method::POST, ticket, Some("trash")).await,
            CleanupMode::Delete => {
                self.change(Method::POST, ticket, Some("trash")).await?;
                self.change(Method::DELETE, ticket, None).await
            }
        }
    }

    /// One state change (`POST /tickets/{id}/ACTION` or `DELETE /tickets/{id}`). 404 counts as
    /// done: the ticket is already gone.
    async fn change(
        &self,
        method: Method,
        ticket: &TicketRef,
        action: Option<&str>,
    ) -> Result<(), HelpdeskError> {
        let mut path = vec!["tickets", ticket.id.as_str()];
        path.extend(action);
        let (status, body) = self.call(method.clone(), &path, &[], None).await?;
        if status.is_success() || status == StatusCode::NOT_FOUND {
            Ok(())
        } else {
            Err(self.answer_error(&format!("{method} /{}", path.join("/")), status, &body, 1))
        }
    }

    /// Decodes a ticket page from a 2xx answer; anything else is an `api` error.
    fn expect_page(
        &self,
        status: StatusCode,
        body: &[u8],
        what: &str,
    ) -> Result<TicketPage, HelpdeskError> {
        if !status.is_success() {
            return Err(self.answer_error(what, status, body, 1));
        }
        serde_json::from_slice(body).map_err(|e| HelpdeskError {
            reason: Reason::Api,
            detail: redact(&format!("{what}: unexpected JSON: {e}"), &self.token),
            attempts: 1,
        })
    }

    /// An `api` error for an answer we did not want (a 4xx that is not retried).
    fn answer_error(
        &self,
        what: &str,
        status: StatusCode,
        body: &[u8],
        attempts: u32,
    ) -> HelpdeskError {
        HelpdeskError {
            reason: Reason::Api,
            detail: redact(&format!("{what}: {status}{}", snippet(body)), &self.token),
            attempts,
        }
    }

    /// One API call with retries. Returns the status and body of any answer that is not
    /// retried and not an auth failure (2xx, and 4xx other than 401/403/429: the caller decides
    /// what they mean); errors are `auth`, or `api`/`connect`/`timeout` once retries run out.
    async fn call(
        &self,
        method: Method,
        path: &[&str],
        query: &[(&str, &str)],
        json: Option<serde_json::Value>,
    ) -> Result<(StatusCode, Vec<u8>), HelpdeskError> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("checked in new: the base URL can be a base")
            .pop_if_empty()
            .extend(path);
        let what = format!("{method} {}", url.path());
        // reqwest's `query` sits behind a feature this crate does not enable; build it here.
        let mut full_url = url;
        full_url
            .query_pairs_mut()
            .extend_pairs(query)
            .append_pair("auth_token", &self.token);
        // A POST that timed out may have taken effect; see the module doc.
        let idempotent = method != Method::POST || path.last() != Some(&"replies");
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut request = self
                .http
                .request(method.clone(), full_url.clone())
                .header(header::ACCEPT, "application/json");
            if let Some(body) = &json {
                request = request.json(body);
            }
            let failure = match self.attempt(request, &what, idempotent).await {
                Ok(answer) => return Ok(answer),
                Err(f) => f,
            };
            if !failure.retry || attempt >= self.retry.attempts {
                return Err(HelpdeskError {
                    reason: failure.reason,
                    detail: redact(&failure.detail, &self.token),
                    attempts: attempt,
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
    ) -> Result<(StatusCode, Vec<u8>), Attempt> {
        let transport = |e: reqwest::Error| {
            let (reason, retry) = if e.is_timeout() {
                (Reason::Timeout, idempotent)
            } else if e.is_connect() {
                // Nothing was sent: always safe to retry.
                (Reason::Connect, true)
            } else {
                (Reason::Connect, idempotent)
            };
            Attempt {
                reason,
                detail: format!("{what}: {}", error_chain(&e.without_url())),
                retry,
                retry_after: None,
            }
        };
        let response = request.send().await.map_err(transport)?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let body = response.bytes().await.map_err(transport)?.to_vec();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(Attempt {
                reason: Reason::Auth,
                detail: format!("{what}: {status}{}", snippet(&body)),
                retry: false,
                retry_after: None,
            });
        }
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            return Err(Attempt {
                reason: Reason::Api,
                detail: format!("{what}: {status}{}", snippet(&body)),
                retry: true,
                retry_after,
            });
        }
        Ok((status, body))
    }
}

/// The earliest-created of the matching tickets (the canary's own, if a helpdesk split or
/// duplicated it); ties and unknown times go to the first listed.
fn earliest<'a>(tickets: impl Iterator<Item = &'a RawTicket>) -> Option<TicketRef> {
    tickets
        .map(RawTicket::to_ref)
        .min_by_key(|t| (t.created_at.is_none(), t.created_at))
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

    #[test]
    fn a_ticket_carries_its_token_in_subject_or_body() {
        let t: RawTicket = serde_json::from_value(json!({
            "id": 7, "subject": "Re: hello", "content": {"text": "x mc-abc-1 y"}
        }))
        .unwrap();
        assert!(t.carries("mc-abc-1"));
        assert!(!t.carries("mc-abc-2"));
        assert_eq!(t.to_ref().id, "7");
    }
}
