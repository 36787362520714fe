//! Zammad's REST API (`/api/v1`, docs.zammad.org/en/latest/api/; HELPDESKS.md section 5).
//!
//! | call | request |
//! |---|---|
//! | find | `POST /api/v1/tickets/search?expand=true` `{"condition": {"ticket.title": {"operator": "contains", "value": TOKEN}}, "sort_by": "created_at", "order_by": "desc", …}` (database, no index) |
//! | find, hint | `GET /api/v1/tickets/search?query="TOKEN"&sort_by=created_at&order_by=desc&expand=true` (Elasticsearch; only when the above found nothing) |
//! | first article | `GET /api/v1/ticket_articles/by_ticket/{id}` of each ticket found (whom to answer) |
//! | reply | `POST /api/v1/ticket_articles` `{"ticket_id": ID, "type": "email", "internal": false, "sender": "Agent", "to": REQUESTER, …}` → 201 |
//! | look for a reply | `GET /api/v1/ticket_articles/by_ticket/{id}` |
//! | Message-ID of the mail | the same articles: the first one's `message_id` |
//! | cleanup | `PUT /api/v1/tickets/{id}` `{"state": "closed"}` (archive, trash); `DELETE /api/v1/tickets/{id}` (delete, needs `admin`) |
//!
//! Authentication: `Authorization: Token token=…` (a personal access token; `ticket.agent` on
//! the canary's group, plus `admin` only for `cleanup = "delete"`).
//!
//! **Finding the ticket.** Zammad's search goes to Elasticsearch only when a `query` is given;
//! a search by `condition` alone runs SQL against the database, "since it is more up to date"
//! (`app/models/concerns/can_search.rb`), and the index itself is filled by background jobs
//! that fall behind when the worker stalls. So the condition search is what decides: the title
//! (the mail's Subject) contains the token, newest first, confirmed here case-insensitively;
//! each ticket's articles are then read once, for the first one (the mail: whom to answer).
//! The plain list `GET /api/v1/tickets` was rejected: it is ordered by id ascending
//! (`tickets_controller.rb#index`), so the newest tickets are on its last page, whose number it
//! does not say. The query search is asked only when the database found nothing (a title an
//! agent or a trigger rewrote), as a hint: each ticket it names is accepted only if its title
//! or its first article (the inbound mail: subject or body) carries the token, and its
//! failure is no failure of the find.
//!
//! **Replying.** An article of `type: "email"`, `internal: false`, to the requester (the first
//! article's `reply_to` or `from`, under its subject and `in_reply_to` its `message_id`,
//! remembered from the find so that the POST is the reply's only request; read again after a
//! restart): Zammad sends it as mail, from a background job. Zammad's docs warn that
//! `internal` only hides an article in the UI: an *email* article is sent even when internal,
//! so a note would be `type: "note"`, never an internal email. The POST is never repeated
//! blindly ([`Safety::Once`]): [`super::Vendor::reply_posted`] lists the articles first.
//!
//! **Cleanup.** Zammad has no archive and no trash: both close the ticket (`state: closed`),
//! never mark it as spam. `DELETE` is permanent. 404 is gone, which is done.
//!
//! **Rate limits.** None documented for the API (HELPDESKS.md 5.5), so no header is read;
//! 429 with `Retry-After`, should a proxy send it, is handled by [`ApiClient`] like any other.

use std::time::{Duration, SystemTime};

use chrono::DateTime;
use reqwest::{Method, header};
use serde::Deserialize;
use serde_json::json;

use super::{
    CleanupMode, HelpdeskError, TicketRef,
    http::{ApiClient, Auth, ClientParams, RetryPolicy, Safety},
    webhook,
};

/// Tickets asked for per search (a canary's token is in one, or a few duplicates).
const LIMIT: &str = "20";
/// How far before `since` a ticket still counts (Zammad's clock against ours).
const CLOCK_SLACK: Duration = Duration::from_secs(300);

/// Where and how to reach one Zammad.
#[derive(Clone, Debug)]
pub struct ZammadParams {
    /// Zammad's root (`https://zammad.example.com/`, or with a path prefix); the API is under
    /// `api/v1/` of it.
    pub base_url: String,
    pub token: String,
    pub timeout: Duration,
    pub retry: RetryPolicy,
    pub extra_roots_pem: Option<Vec<u8>>,
}

#[derive(Debug)]
pub struct Zammad {
    api: ApiClient,
    /// Whom to answer on each ticket found, by ticket id: learnt from its first article.
    recipients: std::sync::Mutex<std::collections::HashMap<u64, Recipient>>,
}

/// Tickets whose recipient is remembered at most (past it, forgotten and read again).
const MAX_REMEMBERED: usize = 1000;

/// Where a reply to a ticket goes: the mail that made it.
#[derive(Clone, Debug)]
struct Recipient {
    /// Its `Reply-To`, else its `From`.
    address: String,
    subject: String,
    message_id: Option<String>,
}

impl Recipient {
    /// From the first customer article (the inbound mail), else the first article.
    fn of(articles: &[Article]) -> Option<Recipient> {
        let first = articles
            .iter()
            .find(|a| a.sender.as_deref() == Some("Customer"))
            .or(articles.first())?;
        let address = first
            .reply_to
            .as_deref()
            .filter(|s| !s.trim().is_empty())
            .or(first.from.as_deref())
            .filter(|s| !s.trim().is_empty())?;
        Some(Recipient {
            address: address.to_string(),
            subject: first.subject.clone().unwrap_or_default(),
            message_id: first.message_id.clone().filter(|m| !m.is_empty()),
        })
    }
}

/// A ticket as `expand=true` gives it (association names instead of ids).
#[derive(Deserialize)]
struct Ticket {
    id: u64,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    created_at: Option<String>,
}

#[derive(Deserialize)]
struct Article {
    #[serde(default)]
    sender: Option<String>,
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    reply_to: Option<String>,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    message_id: Option<String>,
}

fn carries(text: Option<&str>, token: &str) -> bool {
    text.is_some_and(|t| t.to_lowercase().contains(&token.to_lowercase()))
}

/// `2021-11-08T14:17:41.913Z`.
fn parse_time(s: &str) -> Option<SystemTime> {
    DateTime::parse_from_rfc3339(s).ok().map(SystemTime::from)
}

impl Ticket {
    fn to_ref(&self) -> TicketRef {
        TicketRef {
            id: self.id.to_string(),
            created_at: self.created_at.as_deref().and_then(parse_time),
        }
    }

    /// Made at or after `since` (less the slack), or of unknown age.
    fn recent(&self, since: SystemTime) -> bool {
        let since = since.checked_sub(CLOCK_SLACK).unwrap_or(since);
        self.to_ref().created_at.is_none_or(|c| c >= since)
    }
}

/// Ticket ids are numbers in Zammad; a handle that is not one was not made here.
fn ticket_id(api: &ApiClient, ticket: &TicketRef) -> Result<u64, HelpdeskError> {
    ticket.id.parse().map_err(|_| {
        api.content_error(
            "Zammad ticket handle",
            &format!("{:?} is not a ticket id", ticket.id),
        )
    })
}

impl Zammad {
    pub fn new(params: ZammadParams) -> Result<Zammad, HelpdeskError> {
        let mut base = params.base_url;
        if !base.ends_with('/') {
            base.push('/');
        }
        base.push_str("api/v1/");
        Ok(Zammad {
            api: ApiClient::new(ClientParams {
                base_url: base,
                secret: params.token,
                auth: Auth::Header {
                    name: header::AUTHORIZATION,
                    prefix: "Token token=".into(),
                },
                timeout: params.timeout,
                retry: params.retry,
                extra_roots_pem: params.extra_roots_pem,
                // Zammad documents no rate-limit headers (HELPDESKS.md 5.5).
                rate_limit_headers: &[],
            })?,
            recipients: Default::default(),
        })
    }

    fn remembered(&self, id: u64) -> Option<Recipient> {
        self.recipients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    async fn find(&self, token: &str, since: SystemTime) -> Result<Vec<TicketRef>, HelpdeskError> {
        // The database, through a condition without a query: sees a ticket once the mail
        // channel committed it.
        let answer = self
            .api
            .call(
                Method::POST,
                &["tickets", "search"],
                &[("expand", "true")],
                Some(json!({
                    "condition": {
                        "ticket.title": { "operator": "contains", "value": token },
                    },
                    "sort_by": "created_at",
                    "order_by": "desc",
                    "limit": LIMIT,
                    "expand": true,
                })),
                // A read, whatever its method.
                Safety::Idempotent,
            )
            .await?;
        let tickets: Vec<Ticket> = self.api.json("POST /api/v1/tickets/search", &answer)?;
        let mut found = Vec::new();
        for t in tickets
            .iter()
            .filter(|t| carries(t.title.as_deref(), token) && t.recent(since))
        {
            // The first article is the mail: whom to answer, under which subject.
            self.articles(t.id).await?;
            found.push(t.to_ref());
        }
        if !found.is_empty() {
            return Ok(found);
        }
        match self.hinted(token, since).await {
            Ok(found) => Ok(found),
            Err(e) => {
                tracing::debug!(error = %e, "Zammad query search failed; it only hints");
                Ok(Vec::new())
            }
        }
    }

    /// The index's answer, each ticket confirmed by its title or its first article.
    async fn hinted(
        &self,
        token: &str,
        since: SystemTime,
    ) -> Result<Vec<TicketRef>, HelpdeskError> {
        // A quoted phrase: Elasticsearch splits the token at its `-`.
        let query = format!("\"{token}\"");
        let answer = self
            .api
            .call(
                Method::GET,
                &["tickets", "search"],
                &[
                    ("query", query.as_str()),
                    ("sort_by", "created_at"),
                    ("order_by", "desc"),
                    ("limit", LIMIT),
                    ("expand", "true"),
                ],
                None,
                Safety::Idempotent,
            )
            .await?;
        let tickets: Vec<Ticket> = self.api.json("GET /api/v1/tickets/search", &answer)?;
        let mut found = Vec::new();
        for t in tickets.iter().filter(|t| t.recent(since)) {
            let confirmed = carries(t.title.as_deref(), token)
                || self.articles(t.id).await?.first().is_some_and(|a| {
                    carries(a.subject.as_deref(), token) || carries(a.body.as_deref(), token)
                });
            if confirmed {
                found.push(t.to_ref());
            }
        }
        Ok(found)
    }

    /// The ticket's articles, oldest first (the first is the mail that made it); remembers
    /// whom a reply goes to.
    async fn articles(&self, id: u64) -> Result<Vec<Article>, HelpdeskError> {
        let list = self.fetch_articles(id).await?;
        if let Some(to) = Recipient::of(&list) {
            let mut known = self.recipients.lock().unwrap_or_else(|p| p.into_inner());
            if known.len() >= MAX_REMEMBERED {
                known.clear();
            }
            known.insert(id, to);
        }
        Ok(list)
    }

    async fn fetch_articles(&self, id: u64) -> Result<Vec<Article>, HelpdeskError> {
        let id = id.to_string();
        let answer = self
            .api
            .call(
                Method::GET,
                &["ticket_articles", "by_ticket", &id],
                &[],
                None,
                Safety::Idempotent,
            )
            .await?;
        self.api.json(
            &format!("GET /api/v1/ticket_articles/by_ticket/{id}"),
            &answer,
        )
    }

    async fn reply(&self, ticket: &TicketRef, body: &str) -> Result<(), HelpdeskError> {
        let id = ticket_id(&self.api, ticket)?;
        // Whom to answer: remembered from the find (or the look for an earlier reply), so the
        // POST is the reply's only request; else (after a restart) read from the articles.
        let known = self.remembered(id);
        let to = match known {
            Some(to) => to,
            None => Recipient::of(&self.articles(id).await?).ok_or_else(|| {
                self.api.content_error(
                    &format!("GET /api/v1/ticket_articles/by_ticket/{id}"),
                    "the ticket has no customer article with a sender to answer",
                )
            })?,
        };
        let mut article = json!({
            "ticket_id": id,
            "to": to.address,
            "subject": to.subject,
            "body": body,
            "content_type": "text/plain",
            // An email article, public: Zammad mails it to `to`. (An internal email article
            // would be mailed too: internal only hides it in the UI.)
            "type": "email",
            "internal": false,
            "sender": "Agent",
        });
        if let Some(m) = &to.message_id {
            article["in_reply_to"] = json!(m);
        }
        let answer = self
            .api
            .call(
                Method::POST,
                &["ticket_articles"],
                &[],
                Some(article),
                // Zammad queues the mail once the article is saved: never post it twice.
                Safety::Once,
            )
            .await?;
        self.api.success("POST /api/v1/ticket_articles", &answer)
    }

    /// Whether one of the ticket's articles holds `mark`.
    async fn posted(&self, ticket: &TicketRef, mark: &str) -> Result<Option<bool>, HelpdeskError> {
        let id = ticket_id(&self.api, ticket)?;
        Ok(Some(self.articles(id).await?.iter().any(|a| {
            a.sender.as_deref() != Some("Customer")
                && a.body.as_deref().is_some_and(|b| b.contains(mark))
        })))
    }

    /// The first article's `message_id`: the mail Zammad's channel made the ticket from.
    async fn message_id(&self, ticket: &TicketRef) -> Result<Option<String>, HelpdeskError> {
        let id = ticket_id(&self.api, ticket)?;
        Ok(self
            .articles(id)
            .await?
            .into_iter()
            .next()
            .and_then(|a| a.message_id)
            .filter(|m| !m.trim().is_empty()))
    }

    async fn clean(&self, ticket: &TicketRef, how: CleanupMode) -> Result<(), HelpdeskError> {
        let id = ticket_id(&self.api, ticket)?.to_string();
        let (method, body) = match how {
            CleanupMode::None => return Ok(()),
            // No archive, no trash in Zammad: closed is both (never spam).
            CleanupMode::Archive | CleanupMode::Trash => {
                (Method::PUT, Some(json!({ "state": "closed" })))
            }
            // Permanent; needs the `admin` permission.
            CleanupMode::Delete => (Method::DELETE, None),
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
        self.api
            .success_or_gone(&format!("{method} /api/v1/tickets/{id}"), &answer)?;
        if let Ok(n) = id.parse() {
            self.recipients
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&n);
        }
        Ok(())
    }
}

super::impl_vendor!(Zammad, posted = posted, message_id = message_id);

/// A Zammad trigger webhook: `X-Hub-Signature: sha1=<hex HMAC-SHA1(signature token, raw
/// body)>` (Zammad's `lib/user_agent.rb`; HELPDESKS.md 5.6). Zammad signs no timestamp, so no
/// replay window can be enforced: a captured delivery stays valid. That is acceptable only
/// because a webhook merely hints (the import ends when the API shows the ticket), so a replay
/// can at most make a run ask the API early. `X-Zammad-Delivery` is unique per delivery, but it
/// is not signed either.
pub fn verify_webhook(secret: &str, d: &webhook::Delivery<'_>) -> webhook::Verdict {
    let Some(given) = d.header("x-hub-signature") else {
        return webhook::Verdict::Refused("missing webhook signature");
    };
    let Some(hex) = given.trim().strip_prefix("sha1=") else {
        return webhook::Verdict::Refused("webhook signature is not sha1=<hex>");
    };
    let expected = webhook::hex(&webhook::hmac_sha1(secret.as_bytes(), &[d.body]));
    // Hex digits in either case: compared lowercased, in constant time.
    webhook::signature_matches(Some(&hex.to_ascii_lowercase()), &expected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use webhook::{Delivery, Verdict};

    fn verdict(sig: Option<&str>, body: &[u8]) -> Verdict {
        let mut h = axum::http::HeaderMap::new();
        if let Some(s) = sig {
            h.insert("x-hub-signature", s.parse().unwrap());
        }
        verify_webhook(
            "zammad-signature-token",
            &Delivery {
                headers: &h,
                query_secret: None,
                body,
                now: SystemTime::now(),
            },
        )
    }

    /// The vector: HMAC-SHA1 with key "zammad-signature-token" over the body below, computed
    /// apart from this crate (`printf '%s' BODY | openssl dgst -sha1 -hmac zammad-signature-token`,
    /// and Python's `hmac`), as Zammad's `lib/user_agent.rb` signs.
    #[test]
    fn zammad_signatures_are_hex_hmac_sha1_of_the_raw_body() {
        let body = br#"{"ticket":{"id":1,"title":"mailcanary mc-x"},"article":{"id":1}}"#;
        let good = format!(
            "sha1={}",
            webhook::hex(&webhook::hmac_sha1(b"zammad-signature-token", &[body]))
        );
        assert_eq!(good, ZAMMAD_VECTOR);
        assert_eq!(verdict(Some(ZAMMAD_VECTOR), body), Verdict::Authentic);
        assert_eq!(
            verdict(
                Some(&ZAMMAD_VECTOR.to_ascii_uppercase().replace("SHA1=", "sha1=")),
                body
            ),
            Verdict::Authentic
        );
        let mut tampered = body.to_vec();
        tampered[10] = b'2';
        assert_eq!(
            verdict(Some(ZAMMAD_VECTOR), &tampered),
            Verdict::Refused("bad webhook signature")
        );
        assert_eq!(
            verdict(None, body),
            Verdict::Refused("missing webhook signature")
        );
        assert_eq!(
            verdict(Some(&ZAMMAD_VECTOR[5..]), body),
            Verdict::Refused("webhook signature is not sha1=<hex>")
        );
    }

    const ZAMMAD_VECTOR: &str = "sha1=dc812ae2b4147e4e88a3401cf8d2b9dce3439f4a";

    #[test]
    fn expanded_tickets_and_articles_parse() {
        let t: Vec<Ticket> = serde_json::from_value(json!([{
            "id": 7, "number": "31007", "title": "mailcanary mc-x", "state": "new",
            "group": "Users", "customer": "canary@prober.test",
            "created_at": "2021-11-08T14:17:41.913Z"
        }]))
        .unwrap();
        assert_eq!(t[0].to_ref().id, "7");
        assert_eq!(
            t[0].to_ref().created_at,
            Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_636_381_061_913))
        );
        assert!(carries(t[0].title.as_deref(), "MC-X"));
    }
}
