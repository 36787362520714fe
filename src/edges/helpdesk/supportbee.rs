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
//! **Retries** are [`ApiClient`]'s: the reply POST is the one call made [`Safety::Once`].

use std::{
    fmt,
    time::{Duration, SystemTime},
};

use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::json;

use super::{
    CleanupMode, HelpdeskError, TicketRef,
    http::{Answer, ApiClient, Auth, ClientParams, RetryPolicy, Safety},
};

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

/// A SupportBee client.
#[derive(Debug)]
pub struct SupportBee {
    api: ApiClient,
    list_fallback: bool,
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
        Ok(SupportBee {
            api: ApiClient::new(ClientParams {
                base_url: params.base_url,
                secret: params.auth_token,
                // SupportBee's only scheme: the token is in every URL.
                auth: Auth::Query {
                    name: "auth_token".into(),
                },
                timeout: params.timeout,
                retry: params.retry,
                extra_roots_pem: params.extra_roots_pem,
                rate_limit_headers: &[],
            })?,
            list_fallback: params.list_fallback,
        })
    }

    async fn find(&self, token: &str, since: SystemTime) -> Result<Vec<TicketRef>, HelpdeskError> {
        const SEARCH: &str = "GET /tickets/search";
        let answer = self
            .get(
                &["tickets", "search"],
                &[("query", token), ("per_page", "100")],
            )
            .await?;
        let search_available = answer.status != StatusCode::NOT_FOUND;
        if search_available {
            let page: TicketPage = self.api.json(SEARCH, &answer)?;
            let found = carrying(page.tickets.iter(), token);
            if !found.is_empty() {
                return Ok(found);
            }
        }
        if !self.list_fallback {
            if !search_available {
                return Err(self.api.answer_error(SEARCH, &answer));
            }
            return Ok(Vec::new());
        }
        self.scan_list(token, since).await
    }

    async fn get(&self, path: &[&str], query: &[(&str, &str)]) -> Result<Answer, HelpdeskError> {
        self.api
            .call(Method::GET, path, query, None, Safety::Idempotent)
            .await
    }

    /// The list fallback: tickets created since `since` (less the clock slack), newest first.
    async fn scan_list(
        &self,
        token: &str,
        since: SystemTime,
    ) -> Result<Vec<TicketRef>, HelpdeskError> {
        let since = DateTime::<Utc>::from(since.checked_sub(CLOCK_SLACK).unwrap_or(since))
            .to_rfc3339_opts(SecondsFormat::Millis, true);
        let mut found = Vec::new();
        for page_no in 1..=MAX_SCAN_PAGES {
            let page_text = page_no.to_string();
            let answer = self
                .get(
                    &["tickets"],
                    &[
                        ("since", since.as_str()),
                        ("archived", "any"),
                        ("per_page", "100"),
                        ("page", page_text.as_str()),
                    ],
                )
                .await?;
            let page: TicketPage = self.api.json("GET /tickets", &answer)?;
            let last = page.tickets.is_empty() || page.total_pages.is_none_or(|n| page_no >= n);
            found.extend(carrying(page.tickets.iter(), token));
            if last {
                break;
            }
        }
        Ok(found)
    }

    async fn reply(&self, ticket: &TicketRef, body: &str) -> Result<(), HelpdeskError> {
        let payload = json!({ "reply": { "content_attributes": { "body": body } } });
        let answer = self
            .api
            .call(
                Method::POST,
                &["tickets", &ticket.id, "replies"],
                &[],
                Some(payload),
                // A reply that may have been created must not be posted again.
                Safety::Once,
            )
            .await?;
        self.api
            .success(&format!("POST /tickets/{}/replies", ticket.id), &answer)
    }

    /// `GET /tickets/{id}/replies`: whether one of the ticket's replies holds `mark`.
    async fn posted(&self, ticket: &TicketRef, mark: &str) -> Result<Option<bool>, HelpdeskError> {
        #[derive(Deserialize)]
        struct Replies {
            replies: Vec<RawTicket>,
        }
        let what = format!("GET /tickets/{}/replies", ticket.id);
        let answer = self.get(&["tickets", &ticket.id, "replies"], &[]).await?;
        let list: Replies = self.api.json(&what, &answer)?;
        Ok(Some(list.replies.iter().any(|r| r.carries(mark))))
    }

    async fn clean(&self, ticket: &TicketRef, how: CleanupMode) -> Result<(), HelpdeskError> {
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
        let answer = self
            .api
            .call(method.clone(), &path, &[], None, Safety::Idempotent)
            .await?;
        self.api
            .success_or_gone(&format!("{method} /{}", path.join("/")), &answer)
    }
}

super::impl_vendor!(SupportBee, posted = posted);

/// The tickets that carry the token.
fn carrying<'a>(tickets: impl Iterator<Item = &'a RawTicket>, token: &str) -> Vec<TicketRef> {
    tickets
        .filter(|t| t.carries(token))
        .map(RawTicket::to_ref)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
