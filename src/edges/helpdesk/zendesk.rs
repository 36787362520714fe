//! Zendesk Support's REST API (`/api/v2`, developer.zendesk.com/api-reference; facts and
//! sources in HELPDESKS.md section 1).
//!
//! | call | request |
//! |---|---|
//! | find | `GET /api/v2/tickets.json?sort_by=created_at&sort_order=desc&per_page=50`, newest pages scanned for the token |
//! | find, hint | `GET /api/v2/search.json?query=type:ticket "TOKEN"`, only when the scan ran out of pages before `since` |
//! | reply | `PUT /api/v2/tickets/{id}.json` `{"ticket":{"comment":{"body":…,"public":true}}}` |
//! | look for a reply | `GET /api/v2/tickets/{id}/comments.json` (a public comment holding the mark) |
//! | Message-ID of the mail | the same comments: the first one's `metadata.system.message_id` |
//! | cleanup | archive: `PUT /api/v2/tickets/{id}.json` `{"ticket":{"status":"solved"}}`; trash: `DELETE /api/v2/tickets/{id}.json` (soft delete, recoverable for about 30 days); delete: that, then `DELETE /api/v2/deleted_tickets/{id}.json` (for good) |
//!
//! Authentication: an API token with Basic auth, `{email}/token:{token}`, when
//! `[probe.helpdesk.zendesk] email` is set; otherwise the token is an OAuth access token sent
//! as `Authorization: Bearer …`. Either acts with its user's role: an agent who can see the
//! support address's tickets, and delete them if cleanup deletes.
//!
//! **Finding the ticket.** Zendesk's search index takes "up to a few minutes" to see a new
//! ticket, and the incremental export leaves out the last minute by design: both are too slow
//! for an import measured in seconds. The ticket list is database-backed and sorted by
//! `created_at` newest first (offset pagination: the community reports cursor pagination
//! ignoring the sort on some endpoints), and a ticket carries `subject` and `description` (the
//! first comment's text), so the token is matched in one call. Search is asked only when the
//! scanned pages all held tickets newer than `since` (a busy account buried the canary): a
//! hint, confirmed by the same client-side match.
//!
//! **Replying.** A public comment (`public: true`), which Zendesk's default trigger mails to
//! the requester; `public: false` would be an internal note that never reaches the canary
//! mailbox. Zendesk has no "create comment" endpoint: the comment rides on a ticket update, so
//! the PUT must not run twice ([`super::http::Safety::Once`]); `reply_posted` reads the
//! comments first.
//!
//! **Cleanup.** Never `mark_as_spam`: it suspends the requester, and the next canary from
//! that sender would be suspended too. Already gone (404) is done.
//!
//! **Rate limits.** Account-wide per minute; the figure left comes in `X-Rate-Limit-Remaining`
//! (newer: `ratelimit-remaining`), and a 429 carries `Retry-After`, which the client honours.

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use chrono::DateTime;
use reqwest::{Method, header};
use serde::Deserialize;
use serde_json::json;

use super::{
    CleanupMode, HelpdeskError, TicketRef,
    http::{ApiClient, Auth, ClientParams, RetryPolicy, Safety},
    webhook::{self, Delivery, Verdict},
};

/// Tickets per page of the scan (Zendesk allows up to 100).
const PAGE_SIZE: u32 = 50;
/// Newest pages scanned at most before search is asked.
const SCAN_PAGES: u32 = 2;
/// How far before `since` a ticket still counts (Zendesk's clock against ours).
const CLOCK_SLACK: Duration = Duration::from_secs(300);
/// Zendesk's headers for the requests left this minute, older name first.
const RATE_HEADERS: &[&str] = &["x-rate-limit-remaining", "ratelimit-remaining"];

/// Where and how to reach one Zendesk account.
#[derive(Clone, Debug)]
pub struct ZendeskParams {
    /// The account's URL, `https://{subdomain}.zendesk.com` (the API is under `api/v2/` of it;
    /// a URL that already ends in `/api/v2` is taken as it is).
    pub base_url: String,
    /// An API token (with `email`) or an OAuth access token (without).
    pub token: String,
    /// The agent whose API token it is: Basic `{email}/token:{token}`.
    pub email: Option<String>,
    pub timeout: Duration,
    pub retry: RetryPolicy,
    pub extra_roots_pem: Option<Vec<u8>>,
}

#[derive(Debug)]
pub struct Zendesk {
    api: ApiClient,
}

#[derive(Deserialize)]
struct TicketPage {
    #[serde(default)]
    tickets: Vec<Ticket>,
    #[serde(default)]
    next_page: Option<String>,
}

#[derive(Deserialize)]
struct SearchPage {
    #[serde(default)]
    results: Vec<Ticket>,
}

#[derive(Deserialize)]
struct Ticket {
    id: u64,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    created_at: Option<String>,
}

impl Ticket {
    fn carries(&self, token: &str) -> bool {
        super::carries(
            token,
            [self.subject.as_deref(), self.description.as_deref()],
        )
    }

    fn created(&self) -> Option<SystemTime> {
        super::rfc3339(self.created_at.as_deref())
    }

    fn to_ref(&self) -> TicketRef {
        TicketRef {
            id: self.id.to_string(),
            created_at: self.created(),
        }
    }
}

#[derive(Deserialize)]
struct Comments {
    #[serde(default)]
    comments: Vec<Comment>,
}

#[derive(Deserialize)]
struct Comment {
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    plain_body: Option<String>,
    #[serde(default = "yes")]
    public: bool,
    #[serde(default)]
    metadata: Option<serde_json::Value>,
}

fn yes() -> bool {
    true
}

/// The `Authorization` value's scheme and credentials: Basic `{email}/token:{token}` for an API
/// token, Bearer for an OAuth access token.
fn credentials(email: Option<&str>, token: &str) -> (String, String) {
    match email {
        Some(e) => (
            "Basic ".into(),
            base64::engine::general_purpose::STANDARD.encode(format!("{e}/token:{token}")),
        ),
        None => ("Bearer ".into(), token.to_string()),
    }
}

/// `…/api/v2/` of the account URL.
fn api_base(base_url: &str) -> String {
    let trimmed = base_url.trim_end_matches('/');
    if trimmed.ends_with("/api/v2") {
        format!("{trimmed}/")
    } else {
        format!("{trimmed}/api/v2/")
    }
}

impl Zendesk {
    pub fn new(params: ZendeskParams) -> Result<Zendesk, HelpdeskError> {
        let (prefix, secret) = credentials(params.email.as_deref(), &params.token);
        Ok(Zendesk {
            api: ApiClient::new(ClientParams {
                base_url: api_base(&params.base_url),
                // The client scrubs this from every detail; the raw token never leaves here
                // except inside it.
                secret,
                auth: Auth::Header {
                    name: header::AUTHORIZATION,
                    prefix,
                },
                timeout: params.timeout,
                retry: params.retry,
                extra_roots_pem: params.extra_roots_pem,
                rate_limit_headers: RATE_HEADERS,
            })?,
        })
    }

    async fn find(&self, token: &str, since: SystemTime) -> Result<Vec<TicketRef>, HelpdeskError> {
        let since = since.checked_sub(CLOCK_SLACK).unwrap_or(since);
        let size = PAGE_SIZE.to_string();
        let mut found = Vec::new();
        let mut reached_since = false;
        for page in 1..=SCAN_PAGES {
            let page = page.to_string();
            let answer = self
                .api
                .call(
                    Method::GET,
                    &["tickets.json"],
                    &[
                        ("sort_by", "created_at"),
                        ("sort_order", "desc"),
                        ("per_page", size.as_str()),
                        ("page", page.as_str()),
                    ],
                    None,
                    Safety::Idempotent,
                )
                .await?;
            let list: TicketPage = self.api.json("GET /api/v2/tickets.json", &answer)?;
            found.extend(
                list.tickets
                    .iter()
                    .filter(|t| t.carries(token))
                    .map(Ticket::to_ref),
            );
            // Newest first: a page that ends before `since` is the last that can hold it.
            reached_since = list.next_page.is_none()
                || list
                    .tickets
                    .last()
                    .and_then(Ticket::created)
                    .is_some_and(|t| t < since);
            if reached_since {
                break;
            }
        }
        if found.is_empty() && !reached_since {
            found = self.search(token).await?;
        }
        Ok(found)
    }

    /// The search index, for a canary the scanned pages did not reach: a hint, matched
    /// client-side like the list (the index splits words on `-`, so the token is a phrase).
    async fn search(&self, token: &str) -> Result<Vec<TicketRef>, HelpdeskError> {
        let query = format!("type:ticket \"{token}\"");
        let answer = self
            .api
            .call(
                Method::GET,
                &["search.json"],
                &[
                    ("query", query.as_str()),
                    ("sort_by", "created_at"),
                    ("sort_order", "desc"),
                ],
                None,
                Safety::Idempotent,
            )
            .await?;
        let page: SearchPage = self.api.json("GET /api/v2/search.json", &answer)?;
        Ok(page
            .results
            .iter()
            .filter(|t| t.carries(token))
            .map(Ticket::to_ref)
            .collect())
    }

    async fn reply(&self, ticket: &TicketRef, body: &str) -> Result<(), HelpdeskError> {
        let file = format!("{}.json", self.numeric(ticket)?);
        let answer = self
            .api
            .call(
                Method::PUT,
                &["tickets", &file],
                &[],
                Some(json!({ "ticket": { "comment": { "body": body, "public": true } } })),
                // The comment rides on the update: a second PUT is a second mail.
                Safety::Once,
            )
            .await?;
        self.api
            .success(&format!("PUT /api/v2/tickets/{file}"), &answer)
    }

    /// The ticket's comments, oldest first (the first is the mail the ticket was made from).
    async fn comments(&self, ticket: &TicketRef) -> Result<Comments, HelpdeskError> {
        let id = self.numeric(ticket)?.to_string();
        let answer = self
            .api
            .call(
                Method::GET,
                &["tickets", &id, "comments.json"],
                &[("per_page", "100")],
                None,
                Safety::Idempotent,
            )
            .await?;
        self.api
            .json(&format!("GET /api/v2/tickets/{id}/comments.json"), &answer)
    }

    /// The first comment's `metadata.system.message_id` (present for email-made comments;
    /// HELPDESKS.md marks its presence per account unverified: absent is counted as such).
    async fn message_id(&self, ticket: &TicketRef) -> Result<Option<String>, HelpdeskError> {
        let list = self.comments(ticket).await?;
        Ok(list.comments.first().and_then(|c| {
            c.metadata
                .as_ref()?
                .pointer("/system/message_id")?
                .as_str()
                .map(str::to_string)
        }))
    }

    async fn posted(&self, ticket: &TicketRef, mark: &str) -> Result<Option<bool>, HelpdeskError> {
        let list = self.comments(ticket).await?;
        Ok(Some(list.comments.iter().any(|c| {
            c.public
                && [&c.body, &c.plain_body]
                    .iter()
                    .any(|b| b.as_deref().is_some_and(|b| b.contains(mark)))
        })))
    }

    async fn clean(&self, ticket: &TicketRef, how: CleanupMode) -> Result<(), HelpdeskError> {
        let file = format!("{}.json", self.numeric(ticket)?);
        match how {
            CleanupMode::None => Ok(()),
            CleanupMode::Archive => {
                let answer = self
                    .api
                    .call(
                        Method::PUT,
                        &["tickets", &file],
                        &[],
                        Some(json!({ "ticket": { "status": "solved" } })),
                        Safety::Idempotent,
                    )
                    .await?;
                self.api
                    .success_or_gone(&format!("PUT /api/v2/tickets/{file}"), &answer)
            }
            CleanupMode::Trash => self.soft_delete(&file).await,
            CleanupMode::Delete => {
                self.soft_delete(&file).await?;
                let answer = self
                    .api
                    .call(
                        Method::DELETE,
                        &["deleted_tickets", &file],
                        &[],
                        None,
                        Safety::Idempotent,
                    )
                    .await?;
                self.api
                    .success_or_gone(&format!("DELETE /api/v2/deleted_tickets/{file}"), &answer)
            }
        }
    }

    /// `DELETE /api/v2/tickets/{id}.json`: to Zendesk's deleted tickets (404 once there).
    async fn soft_delete(&self, file: &str) -> Result<(), HelpdeskError> {
        let answer = self
            .api
            .call(
                Method::DELETE,
                &["tickets", file],
                &[],
                None,
                Safety::Idempotent,
            )
            .await?;
        self.api
            .success_or_gone(&format!("DELETE /api/v2/tickets/{file}"), &answer)
    }

    fn numeric(&self, ticket: &TicketRef) -> Result<u64, HelpdeskError> {
        ticket.id.parse().map_err(|_| {
            self.api.content_error(
                "PUT /api/v2/tickets",
                &format!("ticket handle {:?} is not a Zendesk ticket id", ticket.id),
            )
        })
    }
}

super::impl_vendor!(
    Zendesk,
    posted = posted,
    rate = api,
    message_id = message_id
);

/// Zendesk's webhook signature: `X-Zendesk-Webhook-Signature` is base64(HMAC-SHA256(signing
/// secret, `X-Zendesk-Webhook-Signature-Timestamp` value followed directly by the raw body)).
/// Zendesk documents no replay window; a signed timestamp further than
/// [`webhook::REPLAY_WINDOW`] from our clock is refused as a replay.
pub fn verify_webhook(secret: &str, d: &Delivery<'_>) -> Verdict {
    let Some(stamp) = d.header("x-zendesk-webhook-signature-timestamp") else {
        return Verdict::Refused("missing webhook signature timestamp");
    };
    let expected = webhook::b64(&webhook::hmac_sha256(
        secret.as_bytes(),
        &[stamp.as_bytes(), d.body],
    ));
    match webhook::signature_matches(d.header("x-zendesk-webhook-signature"), &expected) {
        Verdict::Authentic => {}
        refused => return refused,
    }
    match DateTime::parse_from_rfc3339(stamp.trim()) {
        Ok(at) if webhook::fresh(SystemTime::from(at), d.now) => Verdict::Authentic,
        Ok(_) => Verdict::Refused("webhook timestamp outside the replay window"),
        Err(_) => Verdict::Refused("webhook timestamp is not ISO 8601"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_tokens_go_as_basic_email_slash_token_and_oauth_as_bearer() {
        let (p, s) = credentials(Some("agent@example.com"), "abc123");
        assert_eq!(p, "Basic ");
        // base64("agent@example.com/token:abc123")
        assert_eq!(s, "YWdlbnRAZXhhbXBsZS5jb20vdG9rZW46YWJjMTIz");
        assert_eq!(
            credentials(None, "oauth-tok"),
            ("Bearer ".to_string(), "oauth-tok".to_string())
        );
    }

    #[test]
    fn the_api_is_under_api_v2_of_the_account_url() {
        assert_eq!(
            api_base("https://acme.zendesk.com"),
            "https://acme.zendesk.com/api/v2/"
        );
        assert_eq!(
            api_base("https://acme.zendesk.com/api/v2/"),
            "https://acme.zendesk.com/api/v2/"
        );
    }

    #[test]
    fn a_ticket_carries_its_token_in_subject_or_description() {
        let t: Ticket = serde_json::from_value(json!({
            "id": 35436,
            "subject": "mailcanary MC-abc",
            "description": "body",
            "created_at": "2009-07-20T22:55:29Z",
            "via": {"channel": "email"}
        }))
        .unwrap();
        assert!(t.carries("mc-abc") && !t.carries("mc-abd"));
        let r = t.to_ref();
        assert_eq!(r.id, "35436");
        assert_eq!(
            r.created_at,
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_248_130_529))
        );
    }

    fn delivery<'a>(
        headers: &'a axum::http::HeaderMap,
        body: &'a [u8],
        now: SystemTime,
    ) -> Delivery<'a> {
        Delivery {
            headers,
            query_secret: None,
            body,
            now,
        }
    }

    /// The vector was computed outside this crate from the documented algorithm (Python:
    /// `base64.b64encode(hmac.new(secret, timestamp + body, hashlib.sha256).digest())`).
    #[test]
    fn webhook_signatures_follow_zendesks_documented_scheme() {
        let secret = "dGhpc19zZWNyZXRfaXNfZm9yX3Rlc3Rpbmdfb25seQ==";
        let stamp = "2021-03-25T05:09:27Z";
        let body = br#"{"type":"zen:event-type:ticket.created","detail":{"id":"1"}}"#;
        let signature = "59iIk3Z7H2woMHXazkN0ESvjfocBZQjZGNs48j4RIgU=";
        let at = SystemTime::from(DateTime::parse_from_rfc3339(stamp).unwrap());
        let mut h = axum::http::HeaderMap::new();
        h.insert(
            "x-zendesk-webhook-signature-timestamp",
            stamp.parse().unwrap(),
        );
        assert_eq!(
            verify_webhook(secret, &delivery(&h, body, at)),
            Verdict::Refused("missing webhook signature")
        );
        h.insert("x-zendesk-webhook-signature", signature.parse().unwrap());
        assert_eq!(
            verify_webhook(secret, &delivery(&h, body, at + Duration::from_secs(60))),
            Verdict::Authentic
        );
        // Tampered body, wrong secret.
        assert_eq!(
            verify_webhook(secret, &delivery(&h, b"{}", at)),
            Verdict::Refused("bad webhook signature")
        );
        assert_eq!(
            verify_webhook("other", &delivery(&h, body, at)),
            Verdict::Refused("bad webhook signature")
        );
        // Replayed: authentic, but signed too long ago.
        assert_eq!(
            verify_webhook(secret, &delivery(&h, body, at + Duration::from_secs(600))),
            Verdict::Refused("webhook timestamp outside the replay window")
        );
        // No timestamp at all.
        h.remove("x-zendesk-webhook-signature-timestamp");
        assert_eq!(
            verify_webhook(secret, &delivery(&h, body, at)),
            Verdict::Refused("missing webhook signature timestamp")
        );
    }
}
