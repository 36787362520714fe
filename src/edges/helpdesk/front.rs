//! Front's Core API (`https://api2.frontapp.com`; the OpenAPI spec mirrored from
//! dev.frontapp.com/reference; `HELPDESKS.md` section 4 has every fact with its source).
//!
//! | call | request |
//! |---|---|
//! | find | `GET /inboxes/{inbox_id}/conversations?limit=100`, token matched in the subject; if none, `GET /conversations/search/"TOKEN" inbox:{inbox_id}` as a hint, confirmed by the subject or the first message |
//! | reply | `POST /conversations/{id}/messages` `{"body": …, "text": …, "options": {"archive": false}}` → 202 |
//! | look for a reply | `GET /conversations/{id}/messages` (an outbound message holding the mark) |
//! | Message-ID of the mail | `GET /messages/{id}` of the first inbound message, `Accept: message/rfc822` (its EML) |
//! | cleanup | `PATCH /conversations/{id}` `{"status": "archived"}` (archive) or `"deleted"` (trash); trash, then `DELETE /conversations/{id}` (delete) |
//!
//! Authentication: `Authorization: Bearer …`, an API token whose scopes cover the inbox
//! (`conversations:read`, `messages:read`, `messages:send`, `conversations:write`, and
//! `conversations:delete` for `cleanup = "delete"`).
//!
//! **Conversations, not tickets.** [`TicketRef::id`] is the conversation id (`cnv_…`): the
//! reply, the look for it and the cleanup all need nothing else.
//!
//! **Finding the conversation.** Front's search is a separate pipeline that lags behind new
//! messages (its maintenance notices say so), so it is never the only way: the inbox's
//! conversation list, which is ordered by activity, has a new inbound conversation at its top
//! at once, and the token in the Subject is matched client-side. Only when the list shows
//! nothing is search asked (the canary might sit below 100 busier conversations, or a rule
//! may have rewritten its subject); its hits are confirmed client-side against the subject or
//! the conversation's first message, never taken on the index's word. The token is sent as a
//! quoted phrase, since search engines split on `-`.
//!
//! **Replying.** A message reply, which Front sends by email to the contact; never a comment
//! (`/comments`), which teammates alone see. Front archives the conversation when a reply is
//! sent unless told otherwise, so the reply says `options.archive: false`: archiving is the
//! cleanup's business. Front accepts the reply (202) and sends it asynchronously.
//!
//! **Webhooks.** [`verify_webhook`]: application webhooks (HMAC-SHA256 over
//! `timestamp:body`, the timestamp in milliseconds and within the replay window), rule
//! webhooks (HMAC-SHA1 over the body), both base64 in `X-Front-Signature`, and the
//! `X-Front-Challenge` handshake.
//!
//! **Rate limits.** 50 to 200 requests a minute per company, search at most 40 % of it;
//! `x-ratelimit-remaining` on every answer feeds `mailcanary_helpdesk_rate_limit_remaining`,
//! and a 429's `Retry-After` is honoured by the client.

use std::time::{Duration, SystemTime};

use reqwest::{Method, header};
use serde::Deserialize;
use serde_json::json;

use super::{
    CleanupMode, HelpdeskError, TicketRef,
    http::{ApiClient, Auth, ClientParams, Request, RetryPolicy, Safety},
    webhook::{self, Delivery, Verdict},
};

/// Conversations read per list call (Front's maximum page).
const LIST_LIMIT: &str = "100";
/// Search hits confirmed at most per call (each may cost a messages call).
const SEARCH_CONFIRM: usize = 3;
/// How far before `since` a conversation still counts (Front's clock against ours).
const CLOCK_SLACK: Duration = Duration::from_secs(300);

/// Where and how to reach one Front account.
#[derive(Clone, Debug)]
pub struct FrontParams {
    /// `https://api2.frontapp.com` (or `https://{company}.api.frontapp.com`).
    pub base_url: String,
    pub token: String,
    /// The inbox the support address delivers to (`inb_…`).
    pub inbox_id: String,
    /// The teammate the reply is sent as (`tea_…`), if the token needs one named.
    pub author_id: Option<String>,
    pub timeout: Duration,
    pub retry: RetryPolicy,
    pub extra_roots_pem: Option<Vec<u8>>,
}

#[derive(Debug)]
pub struct Front {
    api: ApiClient,
    inbox_id: String,
    author_id: Option<String>,
}

#[derive(Deserialize)]
struct Results<T> {
    #[serde(rename = "_results")]
    results: Vec<T>,
}

#[derive(Deserialize)]
struct Conversation {
    id: String,
    #[serde(default)]
    subject: Option<String>,
    /// Unix seconds, possibly fractional.
    #[serde(default)]
    created_at: Option<f64>,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    is_inbound: bool,
    #[serde(default)]
    created_at: Option<f64>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    text: Option<String>,
}

/// Unix seconds (fractional) as a time; `None` for nonsense.
fn epoch(secs: f64) -> Option<SystemTime> {
    (secs.is_finite() && secs >= 0.0)
        .then(|| SystemTime::UNIX_EPOCH + Duration::from_secs_f64(secs))
}

fn contains(hay: Option<&str>, token_lower: &str) -> bool {
    hay.is_some_and(|h| h.to_lowercase().contains(token_lower))
}

impl Conversation {
    fn created(&self) -> Option<SystemTime> {
        self.created_at.and_then(epoch)
    }

    /// Not known to be older than `since` (a conversation without a time is kept).
    fn recent(&self, since: SystemTime) -> bool {
        self.created().is_none_or(|c| c >= since)
    }

    fn to_ref(&self) -> TicketRef {
        TicketRef {
            id: self.id.clone(),
            created_at: self.created(),
        }
    }
}

impl Front {
    pub fn new(params: FrontParams) -> Result<Front, HelpdeskError> {
        Ok(Front {
            api: ApiClient::new(ClientParams {
                base_url: params.base_url,
                secret: params.token,
                auth: Auth::Header {
                    name: header::AUTHORIZATION,
                    prefix: "Bearer ".into(),
                },
                timeout: params.timeout,
                retry: params.retry,
                extra_roots_pem: params.extra_roots_pem,
                rate_limit_headers: &["x-ratelimit-remaining"],
            })?,
            inbox_id: params.inbox_id,
            author_id: params.author_id,
        })
    }

    async fn find(&self, token: &str, since: SystemTime) -> Result<Vec<TicketRef>, HelpdeskError> {
        let since = since.checked_sub(CLOCK_SLACK).unwrap_or(since);
        let lower = token.to_lowercase();
        let answer = self
            .api
            .call(
                Method::GET,
                &["inboxes", &self.inbox_id, "conversations"],
                &[("limit", LIST_LIMIT)],
                None,
                Safety::Idempotent,
            )
            .await?;
        let list: Results<Conversation> = self
            .api
            .json("GET /inboxes/{inbox_id}/conversations", &answer)?;
        let found: Vec<TicketRef> = list
            .results
            .iter()
            .filter(|c| c.recent(since) && contains(c.subject.as_deref(), &lower))
            .map(Conversation::to_ref)
            .collect();
        if !found.is_empty() {
            return Ok(found);
        }
        self.search_hint(token, since).await
    }

    /// Search, as a hint only: a hit counts once its subject or first message carries the
    /// token.
    async fn search_hint(
        &self,
        token: &str,
        since: SystemTime,
    ) -> Result<Vec<TicketRef>, HelpdeskError> {
        let lower = token.to_lowercase();
        let query = format!("\"{token}\" inbox:{}", self.inbox_id);
        let answer = self
            .api
            .call(
                Method::GET,
                &["conversations", "search", &query],
                &[("limit", "15")],
                None,
                Safety::Idempotent,
            )
            .await?;
        let hits: Results<Conversation> = self
            .api
            .json("GET /conversations/search/{query}", &answer)?;
        let mut found = Vec::new();
        for c in hits
            .results
            .iter()
            .filter(|c| c.recent(since))
            .take(SEARCH_CONFIRM)
        {
            let confirmed = contains(c.subject.as_deref(), &lower)
                || self.messages(&c.id).await?.iter().rev().take(1).any(|m| {
                    contains(m.body.as_deref(), &lower) || contains(m.text.as_deref(), &lower)
                });
            if confirmed {
                found.push(c.to_ref());
            }
        }
        Ok(found)
    }

    /// The conversation's messages, newest first (Front's order); the oldest sorted last.
    async fn messages(&self, id: &str) -> Result<Vec<Message>, HelpdeskError> {
        let answer = self
            .api
            .call(
                Method::GET,
                &["conversations", id, "messages"],
                &[("limit", "100")],
                None,
                Safety::Idempotent,
            )
            .await?;
        let mut list: Results<Message> =
            self.api.json("GET /conversations/{id}/messages", &answer)?;
        // Whatever order the page came in: newest first, unknown times last.
        list.results.sort_by(|a, b| {
            b.created_at
                .unwrap_or(f64::MIN)
                .total_cmp(&a.created_at.unwrap_or(f64::MIN))
        });
        Ok(list.results)
    }

    async fn reply(&self, ticket: &TicketRef, body: &str) -> Result<(), HelpdeskError> {
        let mut request = json!({
            "body": body,
            "text": body,
            // Front archives on reply by default; the cleanup decides that, not the reply.
            "options": { "archive": false },
        });
        if let Some(author) = &self.author_id {
            request["author_id"] = json!(author);
        }
        let answer = self
            .api
            .call(
                Method::POST,
                &["conversations", &ticket.id, "messages"],
                &[],
                Some(request),
                // Front sends the reply by email: never post it twice.
                Safety::Once,
            )
            .await?;
        self.api
            .success("POST /conversations/{id}/messages", &answer)
    }

    /// Whether an outbound message of the conversation holds `mark`. Front sends replies
    /// asynchronously, but a 202 reply is listed among the messages at once.
    async fn posted(&self, ticket: &TicketRef, mark: &str) -> Result<Option<bool>, HelpdeskError> {
        Ok(Some(self.messages(&ticket.id).await?.iter().any(|m| {
            !m.is_inbound
                && (m.body.as_deref().is_some_and(|b| b.contains(mark))
                    || m.text.as_deref().is_some_and(|t| t.contains(mark)))
        })))
    }

    /// The Message-ID of the conversation's first inbound message, from the message as EML
    /// (`GET /messages/{id}` with `Accept: message/rfc822`; Front has no JSON field for it).
    async fn message_id(&self, ticket: &TicketRef) -> Result<Option<String>, HelpdeskError> {
        let messages = self.messages(&ticket.id).await?;
        let Some(first) = messages
            .iter()
            .rev()
            .find(|m| m.is_inbound)
            .and_then(|m| m.id.as_deref())
        else {
            return Ok(None);
        };
        let answer = self
            .api
            .request(Request {
                method: Method::GET,
                path: &["messages", first],
                query: &[],
                body: None,
                safety: Safety::Idempotent,
                bearer: None,
                answer_unauthorized: false,
                accept: Some("message/rfc822"),
            })
            .await?;
        if answer.status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        self.api.success("GET /messages/{id}", &answer)?;
        Ok(super::header_message_id(&String::from_utf8_lossy(
            &answer.body,
        )))
    }

    async fn set_status(&self, ticket: &TicketRef, status: &str) -> Result<bool, HelpdeskError> {
        let answer = self
            .api
            .call(
                Method::PATCH,
                &["conversations", &ticket.id],
                &[],
                Some(json!({ "status": status })),
                Safety::Idempotent,
            )
            .await?;
        if answer.status == reqwest::StatusCode::NOT_FOUND {
            return Ok(false);
        }
        self.api.success("PATCH /conversations/{id}", &answer)?;
        Ok(true)
    }

    async fn clean(&self, ticket: &TicketRef, how: CleanupMode) -> Result<(), HelpdeskError> {
        match how {
            CleanupMode::None => Ok(()),
            CleanupMode::Archive => self.set_status(ticket, "archived").await.map(drop),
            // Front's `deleted` status is its trash.
            CleanupMode::Trash => self.set_status(ticket, "deleted").await.map(drop),
            // Front deletes for good only a conversation in the trash.
            CleanupMode::Delete => {
                if !self.set_status(ticket, "deleted").await? {
                    return Ok(());
                }
                let answer = self
                    .api
                    .call(
                        Method::DELETE,
                        &["conversations", &ticket.id],
                        &[],
                        None,
                        Safety::Idempotent,
                    )
                    .await?;
                self.api
                    .success_or_gone("DELETE /conversations/{id}", &answer)
            }
        }
    }
}

super::impl_vendor!(Front, posted = posted, rate = api, message_id = message_id);

/// A Front webhook's authentication (`HELPDESKS.md` 4.6):
///
/// - a validation request (`X-Front-Challenge`) is answered with its challenge, unless it
///   carries a signature that does not verify;
/// - with `X-Front-Request-Timestamp`: an application webhook, `X-Front-Signature` =
///   base64(HMAC-SHA256(secret, timestamp ":" body)), the timestamp in milliseconds and within
///   [`webhook::REPLAY_WINDOW`] of our clock;
/// - without it: a rule webhook, `X-Front-Signature` = base64(HMAC-SHA1(secret, body)). It
///   signs no time, so it cannot be refused as a replay: it only hints, and the API confirms.
pub fn verify_webhook(secret: &str, d: &Delivery<'_>) -> Verdict {
    let signature = d.header("x-front-signature");
    let signed = match (signature, d.header("x-front-request-timestamp")) {
        (None, _) => None,
        (Some(_), Some(ts)) => Some(app_signature(secret, ts, d)),
        (Some(_), None) => Some(Ok(webhook::b64(&webhook::hmac_sha1(
            secret.as_bytes(),
            &[d.body],
        )))),
    };
    if let Some(challenge) = d.header("x-front-challenge") {
        // Front's docs do not say whether the handshake is signed: an unsigned one is
        // answered (an echo acts on nothing), a badly signed one is not.
        return match signed {
            None => Verdict::Challenge(challenge.to_string()),
            Some(Ok(expected)) => match webhook::signature_matches(signature, &expected) {
                Verdict::Authentic => Verdict::Challenge(challenge.to_string()),
                refused => refused,
            },
            Some(Err(refused)) => refused,
        };
    }
    match signed {
        None => Verdict::Refused("missing webhook signature"),
        Some(Ok(expected)) => webhook::signature_matches(signature, &expected),
        Some(Err(refused)) => refused,
    }
}

/// The application scheme's expected signature, or why the timestamp is refused.
fn app_signature(secret: &str, ts: &str, d: &Delivery<'_>) -> Result<String, Verdict> {
    let ms: u64 = ts
        .trim()
        .parse()
        .map_err(|_| Verdict::Refused("webhook timestamp is not a number"))?;
    let at = SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
    if !webhook::fresh(at, d.now) {
        return Err(Verdict::Refused(
            "webhook timestamp outside the replay window",
        ));
    }
    Ok(webhook::b64(&webhook::hmac_sha256(
        secret.as_bytes(),
        &[ts.trim().as_bytes(), b":", d.body],
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderMap;

    const SECRET: &str = "front-app-secret";
    const BODY: &[u8] = br#"{"type":"inbound_received","payload":{"id":"evt_1"}}"#;

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn verify(headers: &[(&str, &str)], body: &[u8]) -> Verdict {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        verify_webhook(
            SECRET,
            &Delivery {
                headers: &h,
                query_secret: None,
                body,
                now: now(),
            },
        )
    }

    /// The application scheme computed independently: HMAC-SHA256 keyed with the secret over
    /// `"{ms}:{body}"`, base64.
    fn app_sig(ms: u64, body: &[u8]) -> String {
        use base64::Engine as _;
        use hmac::{Hmac, KeyInit, Mac};
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(format!("{ms}:").as_bytes());
        mac.update(body);
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    }

    #[test]
    fn application_webhooks_sign_timestamp_colon_body_with_sha256() {
        let ms = 1_800_000_000_000u64 - 30_000;
        let ts = ms.to_string();
        let sig = app_sig(ms, BODY);
        // The same, computed outside Rust (Python's hmac and base64).
        assert_eq!(sig, "pnm8liQPp8nHt1Rhoi0y0rJ9bb282DC5unrwZ2KDpxU=");
        let headers = [
            ("x-front-signature", sig.as_str()),
            ("x-front-request-timestamp", ts.as_str()),
        ];
        assert_eq!(verify(&headers, BODY), Verdict::Authentic);
        // One byte of the body changed.
        let mut tampered = BODY.to_vec();
        tampered[3] ^= 1;
        assert_eq!(
            verify(&headers, &tampered),
            Verdict::Refused("bad webhook signature")
        );
        // The timestamp changed (within the window): the signature covers it.
        let other = (ms + 1).to_string();
        assert_eq!(
            verify(
                &[
                    ("x-front-signature", sig.as_str()),
                    ("x-front-request-timestamp", other.as_str())
                ],
                BODY
            ),
            Verdict::Refused("bad webhook signature")
        );
        // Seconds instead of milliseconds is 1970: outside the window.
        let secs = (ms / 1000).to_string();
        let sig_secs = app_sig(ms / 1000, BODY);
        assert_eq!(
            verify(
                &[
                    ("x-front-signature", sig_secs.as_str()),
                    ("x-front-request-timestamp", secs.as_str())
                ],
                BODY
            ),
            Verdict::Refused("webhook timestamp outside the replay window")
        );
    }

    #[test]
    fn an_application_webhook_signed_outside_the_replay_window_is_a_replay() {
        for ms in [1_800_000_000_000u64 - 301_000, 1_800_000_000_000 + 301_000] {
            let ts = ms.to_string();
            let sig = app_sig(ms, BODY);
            assert_eq!(
                verify(
                    &[
                        ("x-front-signature", sig.as_str()),
                        ("x-front-request-timestamp", ts.as_str())
                    ],
                    BODY
                ),
                Verdict::Refused("webhook timestamp outside the replay window"),
                "{ms}"
            );
        }
        assert_eq!(
            verify(
                &[
                    ("x-front-signature", "x"),
                    ("x-front-request-timestamp", "yesterday")
                ],
                BODY
            ),
            Verdict::Refused("webhook timestamp is not a number")
        );
    }

    #[test]
    fn rule_webhooks_sign_the_body_with_sha1() {
        use base64::Engine as _;
        use hmac::{Hmac, KeyInit, Mac};
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(BODY);
        let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        // The same, computed outside Rust (Python's hmac and base64).
        assert_eq!(sig, "XUcfXgsfSSPgGjKDDaCvY+2mx4A=");
        assert_eq!(
            verify(&[("x-front-signature", sig.as_str())], BODY),
            Verdict::Authentic
        );
        assert_eq!(
            verify(&[("x-front-signature", sig.as_str())], b"{}"),
            Verdict::Refused("bad webhook signature")
        );
        // The SHA-256 app signature is not a rule signature.
        let app = app_sig(1_800_000_000_000, BODY);
        assert_eq!(
            verify(&[("x-front-signature", app.as_str())], BODY),
            Verdict::Refused("bad webhook signature")
        );
        assert_eq!(
            verify(&[], BODY),
            Verdict::Refused("missing webhook signature")
        );
        // A bearer secret is not Front's scheme.
        assert_eq!(
            verify(&[("authorization", "Bearer front-app-secret")], BODY),
            Verdict::Refused("missing webhook signature")
        );
    }

    #[test]
    fn the_challenge_is_echoed_unless_badly_signed() {
        assert_eq!(
            verify(&[("x-front-challenge", "abc123")], b""),
            Verdict::Challenge("abc123".into())
        );
        let ms = 1_800_000_000_000u64;
        let ts = ms.to_string();
        let sig = app_sig(ms, b"");
        assert_eq!(
            verify(
                &[
                    ("x-front-challenge", "abc123"),
                    ("x-front-signature", sig.as_str()),
                    ("x-front-request-timestamp", ts.as_str())
                ],
                b""
            ),
            Verdict::Challenge("abc123".into())
        );
        assert_eq!(
            verify(
                &[
                    ("x-front-challenge", "abc123"),
                    ("x-front-signature", "bm9wZQ=="),
                    ("x-front-request-timestamp", ts.as_str())
                ],
                b""
            ),
            Verdict::Refused("bad webhook signature")
        );
    }

    #[test]
    fn conversations_parse_with_fractional_epoch_times() {
        let list: Results<Conversation> = serde_json::from_value(json!({
            "_pagination": {"next": null},
            "_links": {"self": "https://api2.frontapp.com/inboxes/inb_1/conversations"},
            "_results": [
                {"id": "cnv_1", "subject": "mailcanary MC-abc", "status": "unassigned", "created_at": 1800000000.123},
                {"id": "cnv_2"}
            ]
        }))
        .unwrap();
        let c = &list.results[0];
        assert!(contains(c.subject.as_deref(), "mc-abc"));
        assert_eq!(
            c.created(),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs_f64(1_800_000_000.123))
        );
        assert!(c.recent(now() - Duration::from_secs(1)));
        assert!(!c.recent(now() + Duration::from_secs(1)));
        assert!(list.results[1].recent(now()), "no time: kept");
        assert_eq!(list.results[1].to_ref().id, "cnv_2");
    }
}
