//! django-helpdesk's REST API (`/api/`, Django REST Framework; tested with django-helpdesk
//! 2.6.1 from PyPI, Django 5.2, DRF 3.18).
//!
//! | call | request |
//! |---|---|
//! | find | `GET /api/tickets/?status=1,2&page_size=N&page=last`, then earlier pages, scanned for the token |
//! | reply | `POST /api/followups/` `{"ticket": ID, "comment": …, "public": true}` → 201 |
//! | look for a reply | `GET /api/tickets/ID/` (its `followup_set`) |
//! | Message-ID of the mail | `GET /api/tickets/ID/`: the first follow-up's `message_id` |
//! | cleanup | `PATCH /api/tickets/ID/` `{"status": 4}` (closed: archive, trash); `DELETE /api/tickets/ID/` (delete) |
//!
//! Authentication: `Authorization: Token …` (DRF's token of a staff user: every viewset needs
//! `is_staff`).
//!
//! **Finding the ticket.** The API has no search and no "since" filter; the list is ordered by
//! id ascending, so the newest tickets are on the last page (DRF takes `page=last`). The scan
//! reads the open tickets' newest page and walks back until a page starts before `since` or
//! `scan_pages` pages were read. A ticket has no created time of its own: the first
//! follow-up's `date` is the import time (the set can briefly be empty right after import).
//! The token is looked for in the title (the mail's Subject) and the description (its body).
//!
//! **Replying.** A *public* follow-up, which the helpdesk mails to the submitter; a private
//! one would stay internal. django-helpdesk mails inside the request and, when that mail
//! fails, answers 500 **with the follow-up saved**: a second POST would be a second reply. So
//! the POST is never repeated blindly ([`super::http::Safety::Once`]), and [`super::Vendor::reply_posted`]
//! looks for the reply mark in the ticket's follow-ups first.
//!
//! **Duplicates.** While its outgoing mail is down, every import run imports the same mail
//! again as a new ticket. [`super::Vendor::find_tickets`] returns them all; the flow counts the extras
//! (`mailcanary_helpdesk_duplicate_tickets_total`) and cleans up every one.

use std::time::{Duration, SystemTime};

use chrono::DateTime;
use reqwest::{Method, header};
use serde::Deserialize;
use serde_json::json;

use super::{
    CleanupMode, HelpdeskError, TicketRef,
    http::{ApiClient, Auth, ClientParams, RetryPolicy, Safety},
};

/// Tickets per page of the scan.
const PAGE_SIZE: u32 = 50;
/// How far before `since` a ticket still counts (the helpdesk's clock against ours).
const CLOCK_SLACK: Duration = Duration::from_secs(300);
/// django-helpdesk's `Ticket.CLOSED_STATUS`.
const CLOSED: u8 = 4;

/// Where and how to reach one django-helpdesk.
#[derive(Clone, Debug)]
pub struct DjangoParams {
    /// The site's root (`https://help.example.com/`, or with a path prefix); the API is under
    /// `api/` of it.
    pub base_url: String,
    pub token: String,
    /// Only tickets of this queue (its numeric id), if set.
    pub queue: Option<u64>,
    /// Newest pages of open tickets to scan at most (of [`PAGE_SIZE`] each).
    pub scan_pages: u32,
    pub timeout: Duration,
    pub retry: RetryPolicy,
    pub extra_roots_pem: Option<Vec<u8>>,
}

#[derive(Debug)]
pub struct DjangoHelpdesk {
    api: ApiClient,
    queue: Option<u64>,
    scan_pages: u32,
}

#[derive(Deserialize)]
struct Page {
    results: Vec<Ticket>,
    #[serde(default)]
    previous: Option<String>,
}

#[derive(Deserialize)]
struct Ticket {
    id: u64,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    queue: Option<serde_json::Value>,
    #[serde(default)]
    followup_set: Vec<FollowUp>,
}

#[derive(Deserialize)]
struct FollowUp {
    #[serde(default)]
    date: Option<String>,
    #[serde(default)]
    comment: Option<String>,
    /// The mail's Message-ID (django-helpdesk's `FollowUp.message_id`, set by `get_email`).
    #[serde(default)]
    message_id: Option<String>,
}

impl Ticket {
    fn carries(&self, token: &str) -> bool {
        let token = token.to_lowercase();
        [&self.title, &self.description].iter().any(|s| {
            s.as_deref()
                .is_some_and(|s| s.to_lowercase().contains(&token))
        })
    }

    /// The first follow-up's date: when the import made the ticket.
    fn created(&self) -> Option<SystemTime> {
        let date = self.followup_set.first()?.date.as_deref()?;
        DateTime::parse_from_rfc3339(date)
            .ok()
            .map(SystemTime::from)
    }

    /// The queue's id, whether the API gives it as a number or as an object with an id.
    fn queue_id(&self) -> Option<u64> {
        match self.queue.as_ref()? {
            serde_json::Value::Number(n) => n.as_u64(),
            serde_json::Value::Object(o) => o.get("id")?.as_u64(),
            _ => None,
        }
    }

    fn to_ref(&self) -> TicketRef {
        TicketRef {
            id: self.id.to_string(),
            created_at: self.created(),
        }
    }
}

/// The `page` of a DRF `previous` link (absent on the first page, where DRF drops it).
fn page_of(link: &str) -> String {
    reqwest::Url::parse(link)
        .ok()
        .and_then(|u| {
            u.query_pairs()
                .find(|(k, _)| k == "page")
                .map(|(_, v)| v.into_owned())
        })
        .unwrap_or_else(|| "1".to_string())
}

impl DjangoHelpdesk {
    pub fn new(params: DjangoParams) -> Result<DjangoHelpdesk, HelpdeskError> {
        let mut base = params.base_url;
        if !base.ends_with('/') {
            base.push('/');
        }
        base.push_str("api/");
        Ok(DjangoHelpdesk {
            api: ApiClient::new(ClientParams {
                base_url: base,
                secret: params.token,
                auth: Auth::Header {
                    name: header::AUTHORIZATION,
                    prefix: "Token ".into(),
                },
                timeout: params.timeout,
                retry: params.retry,
                extra_roots_pem: params.extra_roots_pem,
                rate_limit_headers: &[],
            })?,
            queue: params.queue,
            scan_pages: params.scan_pages.max(1),
        })
    }

    async fn find(&self, token: &str, since: SystemTime) -> Result<Vec<TicketRef>, HelpdeskError> {
        let since = since.checked_sub(CLOCK_SLACK).unwrap_or(since);
        let size = PAGE_SIZE.to_string();
        let mut page = "last".to_string();
        let mut found = Vec::new();
        for _ in 0..self.scan_pages {
            let answer = self
                .api
                .call(
                    Method::GET,
                    // DRF's router wants the trailing slash.
                    &["tickets", ""],
                    &[
                        ("status", "1,2"),
                        ("page_size", size.as_str()),
                        ("page", page.as_str()),
                    ],
                    None,
                    Safety::Idempotent,
                )
                .await?;
            let list: Page = self.api.json("GET /api/tickets/", &answer)?;
            found.extend(
                list.results
                    .iter()
                    .filter(|t| t.carries(token))
                    .filter(|t| self.queue.is_none() || t.queue_id() == self.queue)
                    .map(Ticket::to_ref),
            );
            // Ordered by id, so by import time: a page that starts before `since` is the last
            // one that can hold the canary's ticket.
            let older = list
                .results
                .first()
                .and_then(Ticket::created)
                .is_some_and(|t| t < since);
            match list.previous {
                Some(link) if !older => page = page_of(&link),
                _ => break,
            }
        }
        Ok(found)
    }

    async fn reply(&self, ticket: &TicketRef, body: &str) -> Result<(), HelpdeskError> {
        let id = self.numeric(ticket)?;
        let answer = self
            .api
            .call(
                Method::POST,
                &["followups", ""],
                &[],
                // No `title`: one here renames the ticket.
                Some(json!({ "ticket": id, "comment": body, "public": true })),
                Safety::Once,
            )
            .await?;
        self.api.success("POST /api/followups/", &answer)
    }

    async fn ticket(&self, ticket: &TicketRef) -> Result<Ticket, HelpdeskError> {
        let answer = self
            .api
            .call(
                Method::GET,
                &["tickets", &ticket.id, ""],
                &[],
                None,
                Safety::Idempotent,
            )
            .await?;
        self.api
            .json(&format!("GET /api/tickets/{}/", ticket.id), &answer)
    }

    async fn posted(&self, ticket: &TicketRef, mark: &str) -> Result<Option<bool>, HelpdeskError> {
        let t = self.ticket(ticket).await?;
        Ok(Some(t.followup_set.iter().any(|f| {
            f.comment.as_deref().is_some_and(|c| c.contains(mark))
        })))
    }

    /// The first follow-up's `message_id`: the mail `get_email` made the ticket from.
    async fn message_id(&self, ticket: &TicketRef) -> Result<Option<String>, HelpdeskError> {
        let t = self.ticket(ticket).await?;
        Ok(t.followup_set
            .into_iter()
            .next()
            .and_then(|f| f.message_id)
            .filter(|m| !m.trim().is_empty()))
    }

    async fn clean(&self, ticket: &TicketRef, how: CleanupMode) -> Result<(), HelpdeskError> {
        let (method, body) = match how {
            CleanupMode::None => return Ok(()),
            // django-helpdesk has no archive or trash: both close the ticket.
            CleanupMode::Archive | CleanupMode::Trash => {
                (Method::PATCH, Some(json!({ "status": CLOSED })))
            }
            CleanupMode::Delete => (Method::DELETE, None),
        };
        let answer = self
            .api
            .call(
                method.clone(),
                &["tickets", &ticket.id, ""],
                &[],
                body,
                Safety::Idempotent,
            )
            .await?;
        self.api
            .success_or_gone(&format!("{method} /api/tickets/{}/", ticket.id), &answer)
    }

    fn numeric(&self, ticket: &TicketRef) -> Result<u64, HelpdeskError> {
        ticket.id.parse().map_err(|_| {
            self.api.content_error(
                "POST /api/followups/",
                &format!("ticket handle {:?} is not a django-helpdesk id", ticket.id),
            )
        })
    }
}

super::impl_vendor!(DjangoHelpdesk, posted = posted, message_id = message_id);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_carries_its_token_in_title_or_description_and_dates_from_its_first_followup() {
        let t: Ticket = serde_json::from_value(json!({
            "id": 7,
            "title": "Canary MC-abc",
            "description": "body",
            "queue": 1,
            "followup_set": [
                {"date": "2026-12-02T01:00:00.123456Z", "comment": "body"},
                {"date": "2026-12-02T01:05:00Z", "comment": "reply mcreply-x"}
            ]
        }))
        .unwrap();
        assert!(t.carries("mc-ABC"));
        assert!(!t.carries("mc-abd"));
        assert_eq!(t.queue_id(), Some(1));
        let created = t.created().unwrap();
        assert_eq!(
            created,
            SystemTime::from(DateTime::parse_from_rfc3339("2026-12-02T01:00:00.123456Z").unwrap())
        );
        // Right after import the follow-up may not be there yet.
        let bare: Ticket =
            serde_json::from_value(json!({"id": 8, "description": "mc-abc"})).unwrap();
        assert!(bare.carries("mc-abc") && bare.created().is_none());
        assert_eq!(bare.to_ref().id, "8");
    }

    #[test]
    fn previous_links_give_their_page() {
        assert_eq!(
            page_of("http://h/api/tickets/?page=3&page_size=50&status=1%2C2"),
            "3"
        );
        // DRF drops `page` from the link to the first page.
        assert_eq!(page_of("http://h/api/tickets/?page_size=50"), "1");
    }
}
