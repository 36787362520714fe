//! Request Tracker 5's REST2 API (`/REST/2.0`, `lib/RT/REST2.pm` in bestpractical/rt).
//!
//! | call | request |
//! |---|---|
//! | find | `GET /REST/2.0/tickets?query=Subject LIKE 'TOKEN' AND Created > 'DAY BEFORE'` (TicketSQL) |
//! | reply | `POST /REST/2.0/ticket/{id}/correspond` `{"Content": …, "ContentType": "text/plain"}` → 201 |
//! | look for a reply | `GET /REST/2.0/ticket/{id}/attachments?fields=Content&orderby=id&order=ASC` |
//! | Message-ID of the mail | `GET /REST/2.0/ticket/{id}/attachments?fields=MessageId&orderby=id&order=ASC`: the first one's (stored without brackets) |
//! | cleanup | `PUT /REST/2.0/ticket/{id}` `{"Status": "resolved"}` (archive) or `"rejected"` (trash); `DELETE /REST/2.0/ticket/{id}` (delete) |
//!
//! Authentication: `Authorization: token …` (RT 5's auth tokens; the token carries its user's
//! rights).
//!
//! **Finding the ticket.** Subject and Created are database columns, so TicketSQL on them sees
//! a ticket the moment the mail gateway committed it; full-text `Content LIKE` would wait for
//! `rt-fulltext-indexer` (indexed mode) or silently find nothing (full text off, the default).
//! RT keeps the canary's Subject (its own replies prefix `[rtname #id]`), and the token sits in
//! the Subject, so matching the Subject is enough; a hit is still checked client-side. The
//! `Created` bound is a date a day early: RT reads query dates in its own timezone.
//!
//! **Replying.** `correspond`, never `comment`: a comment goes to staff only and would never
//! reach the canary mailbox. RT sends the mail inside the request, so a 201 means it was handed
//! to the MTA.
//!
//! **Cleanup.** RT's DELETE only sets the status `deleted`; the ticket stays in the database
//! until an administrator runs `rt-shredder`.
//!
//! **Cost.** RT bcrypt-checks the token on every request (about 0.35 s at RT's default cost on
//! two cores) and, with SQLite, queues requests behind the mail gateway's transaction: poll it
//! every few seconds, not every few hundred milliseconds.

use std::time::{Duration, SystemTime};

use chrono::{DateTime, NaiveDateTime, Utc};
use reqwest::{Method, header};
use serde::Deserialize;
use serde_json::json;

use super::{
    CleanupMode, HelpdeskError, TicketRef,
    http::{ApiClient, Auth, ClientParams, RetryPolicy, Safety},
};

/// How far before `since` the TicketSQL `Created` bound goes. RT reads a date in a query in
/// its own `$Timezone` (`US/Eastern` unless configured), which the prober cannot know, and
/// `YYYY-MM-DD HH:MM:SS` in UTC matched nothing on a UTC machine with RT's default timezone
/// (measured on RT 5.0.3). A bound by date one day early holds whatever the timezone (offsets
/// stay under 24 h); it only narrows the scan, the token in the Subject decides.
const CREATED_MARGIN: Duration = Duration::from_secs(24 * 3600);

/// Where and how to reach one RT.
#[derive(Clone, Debug)]
pub struct RtParams {
    /// RT's web root (`https://rt.example.com/`, or with a path prefix); REST2 is under
    /// `REST/2.0/` of it.
    pub base_url: String,
    pub token: String,
    /// Only tickets of this queue (TicketSQL `Queue = '…'`), if set.
    pub queue: Option<String>,
    pub timeout: Duration,
    pub retry: RetryPolicy,
    pub extra_roots_pem: Option<Vec<u8>>,
}

#[derive(Debug)]
pub struct Rt {
    api: ApiClient,
    queue: Option<String>,
}

#[derive(Deserialize)]
struct Page {
    #[serde(default)]
    items: Vec<Item>,
}

#[derive(Deserialize)]
struct Item {
    id: Id,
    #[serde(rename = "Subject", default)]
    subject: Option<String>,
    #[serde(rename = "Created", default)]
    created: Option<String>,
}

/// RT gives ids as strings in collections and as numbers elsewhere.
#[derive(Deserialize)]
#[serde(untagged)]
enum Id {
    Number(u64),
    Text(String),
}

impl Item {
    fn to_ref(&self) -> TicketRef {
        TicketRef {
            id: match &self.id {
                Id::Number(n) => n.to_string(),
                Id::Text(s) => s.clone(),
            },
            created_at: self.created.as_deref().and_then(parse_created),
        }
    }
}

/// `2026-12-01T20:22:13Z` (REST2's form) or `2026-12-01 20:22:13` (UTC; RT's database form,
/// also read by the generic adapter).
pub(super) fn parse_created(s: &str) -> Option<SystemTime> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(SystemTime::from)
        .or_else(|| {
            NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S")
                .ok()
                .map(|t| SystemTime::from(t.and_utc()))
        })
}

/// The `Created >` bound of the query: the UTC date a day before `since` (see
/// [`CREATED_MARGIN`]).
fn created_bound(since: SystemTime) -> String {
    DateTime::<Utc>::from(since.checked_sub(CREATED_MARGIN).unwrap_or(since))
        .format("%Y-%m-%d")
        .to_string()
}

/// Standard base64 (RFC 4648, with padding; line breaks allowed, as Perl's MIME::Base64 writes
/// them), as text; `None` if it is not base64 or not UTF-8.
fn decode_base64(s: &str) -> Option<String> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for b in s.bytes().filter(|b| !b.is_ascii_whitespace()) {
        if b == b'=' {
            break;
        }
        let v = ALPHABET.iter().position(|&a| a == b)? as u32;
        bits = (bits << 6) | v;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
            bits &= (1 << n) - 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A TicketSQL string literal: RT takes `'…'` with `\'` and `\\` escaped. Tokens are letters,
/// digits and `-` only, but a queue name is the operator's.
fn sql_quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

impl Rt {
    pub fn new(params: RtParams) -> Result<Rt, HelpdeskError> {
        let mut base = params.base_url;
        if !base.ends_with('/') {
            base.push('/');
        }
        base.push_str("REST/2.0/");
        Ok(Rt {
            api: ApiClient::new(ClientParams {
                base_url: base,
                secret: params.token,
                auth: Auth::Header {
                    name: header::AUTHORIZATION,
                    prefix: "token ".into(),
                },
                timeout: params.timeout,
                retry: params.retry,
                extra_roots_pem: params.extra_roots_pem,
                rate_limit_headers: &[],
            })?,
            queue: params.queue,
        })
    }

    async fn find(&self, token: &str, since: SystemTime) -> Result<Vec<TicketRef>, HelpdeskError> {
        let mut query = format!(
            "Subject LIKE {} AND Created > {}",
            sql_quote(token),
            sql_quote(&created_bound(since))
        );
        if let Some(q) = &self.queue {
            query.push_str(&format!(" AND Queue = {}", sql_quote(q)));
        }
        let answer = self
            .api
            .call(
                Method::GET,
                &["tickets"],
                &[
                    ("query", query.as_str()),
                    ("fields", "Subject,Created,Status"),
                    ("orderby", "Created"),
                    ("order", "ASC"),
                    ("per_page", "20"),
                ],
                None,
                Safety::Idempotent,
            )
            .await?;
        let page: Page = self.api.json("GET /REST/2.0/tickets", &answer)?;
        let token = token.to_lowercase();
        Ok(page
            .items
            .iter()
            .filter(|i| {
                i.subject
                    .as_deref()
                    .is_some_and(|s| s.to_lowercase().contains(&token))
            })
            .map(Item::to_ref)
            .collect())
    }

    async fn reply(&self, ticket: &TicketRef, body: &str) -> Result<(), HelpdeskError> {
        let answer = self
            .api
            .call(
                Method::POST,
                &["ticket", &ticket.id, "correspond"],
                &[],
                Some(json!({ "Content": body, "ContentType": "text/plain" })),
                // RT mails the correspondence inside the request: never post it twice.
                Safety::Once,
            )
            .await?;
        self.api.success(
            &format!("POST /REST/2.0/ticket/{}/correspond", ticket.id),
            &answer,
        )
    }

    /// `GET /REST/2.0/ticket/{id}/attachments` with `fields`, oldest first (the first is the
    /// mail the gateway made the ticket from).
    async fn attachments<T: serde::de::DeserializeOwned>(
        &self,
        ticket: &TicketRef,
        fields: &str,
    ) -> Result<Vec<T>, HelpdeskError> {
        #[derive(Deserialize)]
        #[serde(bound = "T: serde::de::DeserializeOwned")]
        struct Attachments<T> {
            #[serde(default = "Vec::new")]
            items: Vec<T>,
        }
        let what = format!("GET /REST/2.0/ticket/{}/attachments", ticket.id);
        let answer = self
            .api
            .call(
                Method::GET,
                &["ticket", &ticket.id, "attachments"],
                &[
                    ("fields", fields),
                    ("orderby", "id"),
                    ("order", "ASC"),
                    ("per_page", "100"),
                ],
                None,
                Safety::Idempotent,
            )
            .await?;
        let list: Attachments<T> = self.api.json(&what, &answer)?;
        Ok(list.items)
    }

    /// Whether one of the ticket's attachments (every correspondence is one) holds `mark`. RT
    /// gives `Content` base64 encoded; plain text is taken too.
    async fn posted(&self, ticket: &TicketRef, mark: &str) -> Result<Option<bool>, HelpdeskError> {
        #[derive(Deserialize)]
        struct Attachment {
            #[serde(rename = "Content", default)]
            content: Option<String>,
        }
        let list: Vec<Attachment> = self.attachments(ticket, "Content").await?;
        Ok(Some(list.iter().any(|a| {
            a.content.as_deref().is_some_and(|c| {
                c.contains(mark) || decode_base64(c).is_some_and(|d| d.contains(mark))
            })
        })))
    }

    /// The `MessageId` column of the first attachment that has one: the mail the gateway made
    /// the ticket from (RT stores it without its angle brackets).
    async fn message_id(&self, ticket: &TicketRef) -> Result<Option<String>, HelpdeskError> {
        #[derive(Deserialize)]
        struct Attachment {
            #[serde(rename = "MessageId", default)]
            message_id: Option<String>,
        }
        let list: Vec<Attachment> = self.attachments(ticket, "MessageId").await?;
        Ok(list
            .into_iter()
            .filter_map(|a| a.message_id)
            .find(|m| !m.trim().is_empty()))
    }

    async fn clean(&self, ticket: &TicketRef, how: CleanupMode) -> Result<(), HelpdeskError> {
        let (method, body) = match how {
            CleanupMode::None => return Ok(()),
            CleanupMode::Archive => (Method::PUT, Some(json!({ "Status": "resolved" }))),
            CleanupMode::Trash => (Method::PUT, Some(json!({ "Status": "rejected" }))),
            // Sets the status `deleted`; only rt-shredder removes a ticket.
            CleanupMode::Delete => (Method::DELETE, None),
        };
        let answer = self
            .api
            .call(
                method.clone(),
                &["ticket", &ticket.id],
                &[],
                body,
                Safety::Idempotent,
            )
            .await?;
        self.api
            .success_or_gone(&format!("{method} /REST/2.0/ticket/{}", ticket.id), &answer)
    }
}

super::impl_vendor!(Rt, posted = posted, message_id = message_id);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_content_decodes_with_line_breaks() {
        assert_eq!(
            decode_base64("aGVsbG8gbWNy\nZXBseS14\n").as_deref(),
            Some("hello mcreply-x")
        );
        assert_eq!(decode_base64("aGk=").as_deref(), Some("hi"));
        assert_eq!(decode_base64("not base64!"), None);
    }

    #[test]
    fn ticketsql_literals_are_quoted_and_escaped() {
        assert_eq!(sql_quote("mc-abc-1"), "'mc-abc-1'");
        assert_eq!(sql_quote("it's"), r"'it\'s'");
        assert_eq!(sql_quote(r"a\b"), r"'a\\b'");
    }

    /// RT read `Created >= '2026-12-01 20:00:00'` in its default `US/Eastern` and found
    /// nothing created at 22:55 UTC: the bound is a whole day early, by date only.
    #[test]
    fn rt_ticketsql_dates_are_read_in_rts_timezone() {
        let since = SystemTime::from(DateTime::parse_from_rfc3339("2026-12-01T00:30:00Z").unwrap());
        assert_eq!(created_bound(since), "2026-11-30");
    }

    #[test]
    fn created_times_in_both_of_rts_forms() {
        let a = parse_created("2026-12-01T20:22:13Z").unwrap();
        let b = parse_created("2026-12-01 20:22:13").unwrap();
        assert_eq!(a, b);
        assert!(parse_created("yesterday").is_none());
    }

    #[test]
    fn ids_come_as_strings_or_numbers() {
        let page: Page = serde_json::from_value(json!({
            "count": 2,
            "items": [
                {"type": "ticket", "id": "7", "Subject": "x", "Created": "2026-12-01T20:22:13Z"},
                {"type": "ticket", "id": 8}
            ]
        }))
        .unwrap();
        assert_eq!(page.items[0].to_ref().id, "7");
        assert_eq!(page.items[1].to_ref().id, "8");
    }
}
