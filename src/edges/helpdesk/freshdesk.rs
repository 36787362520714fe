//! Freshdesk's API v2 (`/api/v2`, developers.freshdesk.com/api/; `/work/shared/HELPDESKS.md`
//! section 2 holds the facts and their sources).
//!
//! | call | request |
//! |---|---|
//! | find | `GET /api/v2/tickets?order_by=created_at&order_type=desc&updated_since=…&include=description&per_page=30` (then `page=2`, …), token in subject or description |
//! | reply | `POST /api/v2/tickets/{id}/reply` `{"body": "<div>…</div>"}` → 201, emailed to the requester |
//! | look for a reply | `GET /api/v2/tickets/{id}/conversations` |
//! | cleanup | `PUT /api/v2/tickets/{id}` `{"status": 5}` (closed: archive); `DELETE /api/v2/tickets/{id}` (to the trash: trash, delete) |
//!
//! Authentication: HTTP basic with the agent's API key as the user name and `X` as the
//! password. The key acts as its agent: it sees the tickets of the agent's groups.
//!
//! **Finding the ticket.** Freshdesk's search (`/search/tickets`) cannot match a subject or
//! a body at all (only agent, group, status, tag, dates and custom fields), and its index
//! takes "a few minutes" to see a change, so it is not used: it can neither find the token
//! nor find it soon. The ticket list is database-backed and sees a ticket at once; newest
//! first, narrowed to tickets updated since the canary was sent (a new ticket's `updated_at`
//! is its `created_at`), and matched client-side on the subject and `description_text`.
//! `include=description` costs two more API credits a call, but accounts made after
//! 2018-11-30 list no description without it. Deleted and spam tickets are left out of the list
//! by Freshdesk, and skipped here if shown anyway.
//!
//! **Replying.** `/reply`, never `/notes`: a note is private by default, and even a public
//! note need not be emailed to the requester. The body is HTML: the text is escaped and its
//! line breaks become `<br>`. Freshdesk exposes no Message-ID, so a reply is recognised on the
//! ticket by its mark in `body_text`.
//!
//! **Cleanup.** "archive" closes the ticket (status 5, Closed: a resolved one reopens when the
//! requester writes again); "trash" and "delete" both `DELETE` it, which moves it to
//! Freshdesk's trash: the API has no permanent deletion (the web UI empties the trash). A
//! ticket already gone answers 404, and updating a deleted ticket 405: both are done. Never
//! spam: that would flag the canary's sender.

use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use reqwest::{Method, StatusCode, header};
use serde::Deserialize;
use serde_json::json;

use super::{
    CleanupMode, HelpdeskError, TicketRef,
    http::{Answer, ApiClient, Auth, ClientParams, RetryPolicy, Safety},
};

/// Tickets per page of the list (Freshdesk's default; at most 100).
const PER_PAGE: usize = 30;
/// Pages read at most per find: a busier helpdesk should narrow `since`, not page on.
const MAX_PAGES: u32 = 4;
/// How far before `since` a ticket still counts (Freshdesk's clock against ours).
const CLOCK_SLACK: Duration = Duration::from_secs(300);
/// Freshdesk's ticket status Closed.
const CLOSED: u8 = 5;
/// Freshdesk's rate-limit header for the credits left this minute.
const RATE_REMAINING: &[&str] = &["x-ratelimit-remaining"];

/// Where and how to reach one Freshdesk account.
#[derive(Clone, Debug)]
pub struct FreshdeskParams {
    /// The account's root (`https://acme.freshdesk.com/`); the API is under `api/v2/` of it
    /// (a base URL that already ends in `/api/v2` is taken as it is).
    pub base_url: String,
    /// The agent's API key (Profile settings > Your API Key).
    pub api_key: String,
    pub timeout: Duration,
    pub retry: RetryPolicy,
    pub extra_roots_pem: Option<Vec<u8>>,
}

#[derive(Debug)]
pub struct Freshdesk {
    api: ApiClient,
}

#[derive(Deserialize)]
struct Ticket {
    id: u64,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    description_text: Option<String>,
    #[serde(default)]
    created_at: Option<String>,
    #[serde(default)]
    spam: bool,
    #[serde(default)]
    deleted: bool,
}

impl Ticket {
    fn carries(&self, token: &str) -> bool {
        super::carries(
            token,
            [self.subject.as_deref(), self.description_text.as_deref()],
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
struct Conversation {
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    body_text: Option<String>,
    #[serde(default)]
    private: bool,
    #[serde(default)]
    incoming: bool,
}

/// The reply text as the HTML body Freshdesk wants: escaped, line breaks as `<br>`.
fn html_body(text: &str) -> String {
    let escaped = text
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;");
    let lines: Vec<&str> = escaped.trim_end_matches('\n').split('\n').collect();
    format!(
        "<div>{}</div>",
        lines
            .iter()
            .map(|l| l.trim_end_matches('\r'))
            .collect::<Vec<_>>()
            .join("<br>")
    )
}

/// `YYYY-MM-DDTHH:MM:SSZ`, Freshdesk's timestamp form.
fn timestamp(t: SystemTime) -> String {
    DateTime::<Utc>::from(t)
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// HTTP basic credentials: the API key as the user, `X` as the password.
fn basic(api_key: &str) -> String {
    super::webhook::b64(format!("{api_key}:X").as_bytes())
}

impl Freshdesk {
    pub fn new(params: FreshdeskParams) -> Result<Freshdesk, HelpdeskError> {
        let mut base = params.base_url;
        if !base.ends_with('/') {
            base.push('/');
        }
        if !base.ends_with("/api/v2/") {
            base.push_str("api/v2/");
        }
        Ok(Freshdesk {
            api: ApiClient::new(ClientParams {
                base_url: base,
                // What goes on the wire, so it is also what details are scrubbed of; the key
                // itself is never sent or logged in any other form.
                secret: basic(&params.api_key),
                auth: Auth::Header {
                    name: header::AUTHORIZATION,
                    prefix: "Basic ".into(),
                },
                timeout: params.timeout,
                retry: params.retry,
                extra_roots_pem: params.extra_roots_pem,
                rate_limit_headers: RATE_REMAINING,
            })?,
        })
    }

    async fn find(&self, token: &str, since: SystemTime) -> Result<Vec<TicketRef>, HelpdeskError> {
        let since = since.checked_sub(CLOCK_SLACK).unwrap_or(since);
        let updated_since = timestamp(since);
        let per_page = PER_PAGE.to_string();
        let mut found = Vec::new();
        for page in 1..=MAX_PAGES {
            let page = page.to_string();
            let answer = self
                .api
                .call(
                    Method::GET,
                    &["tickets"],
                    &[
                        ("order_by", "created_at"),
                        ("order_type", "desc"),
                        ("updated_since", updated_since.as_str()),
                        ("include", "description"),
                        ("per_page", per_page.as_str()),
                        ("page", page.as_str()),
                    ],
                    None,
                    Safety::Idempotent,
                )
                .await?;
            let list: Vec<Ticket> = self.api.json("GET /api/v2/tickets", &answer)?;
            found.extend(
                list.iter()
                    .filter(|t| !t.spam && !t.deleted && t.carries(token))
                    .map(Ticket::to_ref),
            );
            // Newest first: a short page is the last, and a page that reaches back before
            // `since` holds everything that can be the canary's.
            let older = list
                .last()
                .and_then(Ticket::created)
                .is_some_and(|t| t < since);
            if list.len() < PER_PAGE || older {
                break;
            }
        }
        Ok(found)
    }

    fn numeric(&self, ticket: &TicketRef) -> Result<u64, HelpdeskError> {
        ticket.id.parse().map_err(|_| {
            self.api.content_error(
                "ticket id",
                &format!("{:?} is not a Freshdesk ticket id", ticket.id),
            )
        })
    }

    async fn reply(&self, ticket: &TicketRef, body: &str) -> Result<(), HelpdeskError> {
        let id = self.numeric(ticket)?.to_string();
        let answer = self
            .api
            .call(
                Method::POST,
                &["tickets", &id, "reply"],
                &[],
                Some(json!({ "body": html_body(body) })),
                // Freshdesk mails the reply: never post it twice blindly.
                Safety::Once,
            )
            .await?;
        self.api
            .success(&format!("POST /api/v2/tickets/{id}/reply"), &answer)
    }

    /// Whether one of the ticket's outgoing public conversations holds `mark`.
    async fn posted(&self, ticket: &TicketRef, mark: &str) -> Result<Option<bool>, HelpdeskError> {
        let id = self.numeric(ticket)?.to_string();
        let answer = self
            .api
            .call(
                Method::GET,
                &["tickets", &id, "conversations"],
                &[("per_page", "100")],
                None,
                Safety::Idempotent,
            )
            .await?;
        let list: Vec<Conversation> = self
            .api
            .json(&format!("GET /api/v2/tickets/{id}/conversations"), &answer)?;
        Ok(Some(list.iter().any(|c| {
            !c.private
                && !c.incoming
                && [&c.body_text, &c.body]
                    .iter()
                    .any(|b| b.as_deref().is_some_and(|b| b.contains(mark)))
        })))
    }

    async fn clean(&self, ticket: &TicketRef, how: CleanupMode) -> Result<(), HelpdeskError> {
        let id = self.numeric(ticket)?.to_string();
        let (method, body) = match how {
            CleanupMode::None => return Ok(()),
            CleanupMode::Archive => (Method::PUT, Some(json!({ "status": CLOSED }))),
            // To the trash: the API deletes no ticket for good.
            CleanupMode::Trash | CleanupMode::Delete => (Method::DELETE, None),
        };
        let answer = self
            .api
            .call(
                method.clone(),
                &["tickets", &id],
                &[],
                body,
                Safety::Idempotent,
            )
            .await?;
        self.gone_is_done(&format!("{method} /api/v2/tickets/{id}"), &answer)
    }

    /// 2xx, 404 (no such ticket) and 405 (Freshdesk's answer to changing a deleted or spam
    /// ticket) all leave nothing to clean.
    fn gone_is_done(&self, what: &str, answer: &Answer) -> Result<(), HelpdeskError> {
        if answer.status == StatusCode::METHOD_NOT_ALLOWED {
            return Ok(());
        }
        self.api.success_or_gone(what, answer)
    }
}

super::impl_vendor!(Freshdesk, posted = posted, rate = api);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth_is_the_key_and_x() {
        // base64("abc:X")
        assert_eq!(basic("abc"), "YWJjOlg=");
    }

    #[test]
    fn reply_text_becomes_escaped_html() {
        assert_eq!(
            html_body("Hello <you> & co\r\nmcreply-1\n"),
            "<div>Hello &lt;you&gt; &amp; co<br>mcreply-1</div>"
        );
    }

    #[test]
    fn tickets_match_on_subject_or_description() {
        let t: Vec<Ticket> = serde_json::from_value(json!([
            {"id": 1, "subject": "mailcanary MC-abc", "created_at": "2026-12-01T20:22:13Z"},
            {"id": 2, "subject": "x", "description_text": "canary mc-abc here"},
            {"id": 3, "subject": "other", "spam": false, "deleted": false}
        ]))
        .unwrap();
        assert!(t[0].carries("mc-abc") && t[1].carries("mc-abc") && !t[2].carries("mc-abc"));
        assert!(t[0].created().is_some() && t[1].created().is_none());
        assert_eq!(t[1].to_ref().id, "2");
    }

    #[test]
    fn base_url_gets_api_v2_once() {
        for base in ["http://127.0.0.1:1", "http://127.0.0.1:1/api/v2"] {
            let f = Freshdesk::new(FreshdeskParams {
                base_url: base.into(),
                api_key: "k".into(),
                timeout: Duration::from_secs(1),
                retry: RetryPolicy::default(),
                extra_roots_pem: None,
            })
            .unwrap();
            assert!(format!("{f:?}").contains("127.0.0.1:1/api/v2/\""), "{f:?}");
        }
    }
}
