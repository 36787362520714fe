//! Helpdesk APIs: find the ticket a canary became, post the agent reply, clean up.
//!
//! # Adding a vendor
//!
//! One file here, implementing [`Vendor`] with the vendor's paths, bodies and answers (the HTTP
//! plumbing, retries, backoff, `Retry-After` and redaction are [`http::ApiClient`]'s), and one
//! arm in [`build`], the only place that matches on the configured `api`. The flow holds a
//! [`Helpdesk`] and never knows which vendor is behind it.
//!
//! A trait object with boxed futures was chosen over an enum with a match arm per vendor per
//! method: a vendor is then one file and one registry line, and the cost (one allocation per
//! API call) is nothing next to the HTTP round trip it wraps.
//!
//! **Ticket handles.** [`TicketRef::id`] is opaque to everything but its vendor: a bare id for
//! SupportBee, and whatever a vendor needs to reply later (for example `conversation/thread`)
//! for others. The ledger stores it as a string, so records written before this shape (bare
//! SupportBee ids) still load and still work.

pub mod django_helpdesk;
pub mod freshdesk;
pub mod front;
pub mod generic;
pub mod helpscout;
pub mod http;
pub mod rt;
pub mod supportbee;
pub mod webhook;
pub mod zammad;
pub mod zendesk;

use std::time::SystemTime;
use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use crate::canary::life::Reason;

pub use http::RetryPolicy;
pub use supportbee::{SupportBee, SupportBeeParams};

/// A ticket found for a canary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TicketRef {
    /// The helpdesk's id, as text (numeric for SupportBee).
    pub id: String,
    /// When the helpdesk says the ticket was created (its clock, not ours), if it says.
    pub created_at: Option<SystemTime>,
}

/// What to do with a canary's ticket once the canary is done with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CleanupMode {
    /// Archive (closes it; kept for audit).
    Archive,
    /// Move to the trash.
    Trash,
    /// Delete for good (SupportBee deletes only trashed tickets: trash, then delete).
    Delete,
    /// Leave it as it is.
    None,
}

impl CleanupMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CleanupMode::Archive => "archive",
            CleanupMode::Trash => "trash",
            CleanupMode::Delete => "delete",
            CleanupMode::None => "none",
        }
    }
}

/// A failed helpdesk call, after its retries.
#[derive(Debug, Clone, thiserror::Error)]
#[error("helpdesk {reason} after {attempts} attempt(s): {detail}")]
pub struct HelpdeskError {
    pub(crate) reason: Reason,
    pub(crate) detail: String,
    pub(crate) attempts: u32,
    /// A call that must not run twice failed in a way that may have come after the server
    /// acted on it (a timeout, a connection lost after sending, a 5xx other than 503).
    pub(crate) maybe_applied: bool,
}

impl HelpdeskError {
    /// `api` (an HTTP error or nonsense JSON), `auth` (401/403), `connect` or `timeout`.
    pub fn reason(&self) -> Reason {
        self.reason
    }

    /// Method, path (never the query string), status and what was wrong. Never holds the
    /// API token.
    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// HTTP attempts made by the failing call (retries included).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Whether the failed call (a reply POST) may have taken effect anyway: then it must not be
    /// sent again unless the vendor can say it did not ([`Vendor::reply_posted`]).
    pub fn maybe_applied(&self) -> bool {
        self.maybe_applied
    }
}

/// A future an adapter returns.
pub type CallFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, HelpdeskError>> + Send + 'a>>;

/// One vendor's API. Implementations only speak their vendor's dialect over an
/// [`http::ApiClient`]; retries and error shapes are shared.
pub trait Vendor: Send + Sync + std::fmt::Debug {
    /// Every ticket whose subject or body carries `token`, created at or after `since`
    /// (allowing for clock skew), in any order. Empty means "not yet": keep polling. More than
    /// one is a duplicate import (django-helpdesk re-imports a mail on every run while its
    /// outgoing mail is down): the flow takes the earliest and cleans up all of them.
    fn find_tickets<'a>(
        &'a self,
        token: &'a str,
        since: SystemTime,
    ) -> CallFuture<'a, Vec<TicketRef>>;

    /// Posts a public agent reply with `body` to the ticket (one the helpdesk mails to the
    /// requester, never an internal note). Must not post twice for one call.
    fn post_reply<'a>(&'a self, ticket: &'a TicketRef, body: &'a str) -> CallFuture<'a, ()>;

    /// Whether a reply containing `mark` is on the ticket already: asked before a reply is
    /// posted again after a failed attempt, because a helpdesk may fail the request and keep
    /// the reply (django-helpdesk answers 500 when its outgoing mail is down, with the reply
    /// saved). `None`: this vendor cannot tell, and the reply is posted again.
    fn reply_posted<'a>(
        &'a self,
        ticket: &'a TicketRef,
        mark: &'a str,
    ) -> CallFuture<'a, Option<bool>> {
        let _ = (ticket, mark);
        Box::pin(async { Ok(None) })
    }

    /// Cleans the ticket up. A ticket that is already gone counts as cleaned: cleanup may run
    /// again after a restart.
    fn cleanup<'a>(&'a self, ticket: &'a TicketRef, how: CleanupMode) -> CallFuture<'a, ()>;

    /// Requests left in the account's rate limit, as the vendor's last answer said; `None`
    /// where it does not say.
    fn rate_limit_remaining(&self) -> Option<u64> {
        None
    }

    /// Whether this vendor's API exposes the Message-ID of the mail a ticket was made from
    /// (then [`Vendor::inbound_message_id`] asks it).
    fn says_message_id(&self) -> bool {
        false
    }

    /// The Message-ID of the mail the ticket was made from, as the helpdesk recorded it;
    /// `None` where it does not say (for this ticket, or at all).
    fn inbound_message_id<'a>(&'a self, ticket: &'a TicketRef) -> CallFuture<'a, Option<String>> {
        let _ = ticket;
        Box::pin(async { Ok(None) })
    }
}

/// The [`Vendor`] impl of an adapter: its inherent `async fn`s `find`, `reply`, `clean` (and
/// `posted`, if it can look for a reply) boxed the same way for every vendor.
macro_rules! impl_vendor {
    ($t:ty $(, posted = $posted:ident)? $(, rate = $client:ident)? $(, message_id = $mid:ident)?) => {
        impl $crate::edges::helpdesk::Vendor for $t {
            fn find_tickets<'a>(
                &'a self,
                token: &'a str,
                since: std::time::SystemTime,
            ) -> $crate::edges::helpdesk::CallFuture<'a, Vec<$crate::edges::helpdesk::TicketRef>> {
                Box::pin(self.find(token, since))
            }

            fn post_reply<'a>(
                &'a self,
                ticket: &'a $crate::edges::helpdesk::TicketRef,
                body: &'a str,
            ) -> $crate::edges::helpdesk::CallFuture<'a, ()> {
                Box::pin(self.reply(ticket, body))
            }

            $(
                fn reply_posted<'a>(
                    &'a self,
                    ticket: &'a $crate::edges::helpdesk::TicketRef,
                    mark: &'a str,
                ) -> $crate::edges::helpdesk::CallFuture<'a, Option<bool>> {
                    Box::pin(self.$posted(ticket, mark))
                }
            )?

            fn cleanup<'a>(
                &'a self,
                ticket: &'a $crate::edges::helpdesk::TicketRef,
                how: $crate::edges::helpdesk::CleanupMode,
            ) -> $crate::edges::helpdesk::CallFuture<'a, ()> {
                Box::pin(self.clean(ticket, how))
            }

            $(
                fn rate_limit_remaining(&self) -> Option<u64> {
                    self.$client.rate_limit_remaining()
                }
            )?

            $(
                fn says_message_id(&self) -> bool {
                    true
                }

                fn inbound_message_id<'a>(
                    &'a self,
                    ticket: &'a $crate::edges::helpdesk::TicketRef,
                ) -> $crate::edges::helpdesk::CallFuture<'a, Option<String>> {
                    Box::pin(self.$mid(ticket))
                }
            )?
        }
    };
}
pub(crate) use impl_vendor;

/// A helpdesk the prober talks to: one vendor behind the calls the flow makes.
#[derive(Debug, Clone)]
pub struct Helpdesk(Arc<dyn Vendor>);

impl Helpdesk {
    pub fn new(vendor: impl Vendor + 'static) -> Helpdesk {
        Helpdesk(Arc::new(vendor))
    }

    /// The canary's ticket: the earliest created of those carrying `token` (the canary's own,
    /// if the helpdesk split or duplicated it); ties and unknown times go to the first listed.
    pub async fn find_ticket(
        &self,
        token: &str,
        since: SystemTime,
    ) -> Result<Option<TicketRef>, HelpdeskError> {
        Ok(earliest(self.0.find_tickets(token, since).await?))
    }

    /// See [`Vendor::find_tickets`]; earliest first.
    pub async fn find_tickets(
        &self,
        token: &str,
        since: SystemTime,
    ) -> Result<Vec<TicketRef>, HelpdeskError> {
        let mut all = self.0.find_tickets(token, since).await?;
        all.sort_by_key(|t| (t.created_at.is_none(), t.created_at));
        all.dedup_by(|a, b| a.id == b.id);
        Ok(all)
    }

    /// See [`Vendor::post_reply`].
    pub async fn post_reply(&self, ticket: &TicketRef, body: &str) -> Result<(), HelpdeskError> {
        self.0.post_reply(ticket, body).await
    }

    /// See [`Vendor::reply_posted`].
    pub async fn reply_posted(
        &self,
        ticket: &TicketRef,
        mark: &str,
    ) -> Result<Option<bool>, HelpdeskError> {
        self.0.reply_posted(ticket, mark).await
    }

    /// See [`Vendor::rate_limit_remaining`].
    pub fn rate_limit_remaining(&self) -> Option<u64> {
        self.0.rate_limit_remaining()
    }

    /// See [`Vendor::says_message_id`].
    pub fn says_message_id(&self) -> bool {
        self.0.says_message_id()
    }

    /// See [`Vendor::inbound_message_id`].
    pub async fn inbound_message_id(
        &self,
        ticket: &TicketRef,
    ) -> Result<Option<String>, HelpdeskError> {
        self.0.inbound_message_id(ticket).await
    }

    /// See [`Vendor::cleanup`].
    pub async fn cleanup(&self, ticket: &TicketRef, how: CleanupMode) -> Result<(), HelpdeskError> {
        self.0.cleanup(ticket, how).await
    }
}

/// Whether any of `texts` holds `token`, ignoring case (a helpdesk may change the case of a
/// subject). Every adapter matches the token itself: a list or a search is only a candidate.
pub(crate) fn carries<'a>(token: &str, texts: impl IntoIterator<Item = Option<&'a str>>) -> bool {
    let token = token.to_lowercase();
    texts
        .into_iter()
        .flatten()
        .any(|t| t.to_lowercase().contains(&token))
}

/// An RFC 3339 time as vendors send them; `None` if absent or not one.
pub(crate) fn rfc3339(s: Option<&str>) -> Option<SystemTime> {
    chrono::DateTime::parse_from_rfc3339(s?.trim())
        .ok()
        .map(SystemTime::from)
}

/// Whether two Message-IDs name the same mail: angle brackets, surrounding space and case
/// aside (helpdesks store them with or without the brackets; some lower-case them).
pub fn same_message_id(a: &str, b: &str) -> bool {
    let bare = |s: &str| {
        s.trim()
            .trim_start_matches('<')
            .trim_end_matches('>')
            .trim()
            .to_ascii_lowercase()
    };
    let (a, b) = (bare(a), bare(b));
    !a.is_empty() && a == b
}

/// What the helpdesk's Message-ID of the ticket's mail (`seen`) says about the canary's
/// (`sent`): the `result` of `mailcanary_import_message_id_total` and whether it matched
/// (`None`: the helpdesk recorded none).
pub fn message_id_verdict(seen: Option<&str>, sent: &str) -> (&'static str, Option<bool>) {
    match seen.map(|m| same_message_id(m, sent)) {
        Some(true) => ("match", Some(true)),
        Some(false) => ("mismatch", Some(false)),
        None => ("absent", None),
    }
}

/// The Message-ID header of a raw RFC 5322 message, in its angle brackets, if it has one
/// (read by mail-parser, as every arrived message is).
pub(crate) fn header_message_id(raw: &str) -> Option<String> {
    let message = mail_parser::MessageParser::default().parse(raw.as_bytes())?;
    Some(format!("<{}>", message.message_id()?))
}

fn earliest(tickets: Vec<TicketRef>) -> Option<TicketRef> {
    // min_by_key keeps the first of equal keys.
    tickets
        .into_iter()
        .min_by_key(|t| (t.created_at.is_none(), t.created_at))
}

/// What every vendor is built from: where, the secret, timeouts; plus the vendor's own
/// settings (`[probe.helpdesk.<api>]`).
#[derive(Clone)]
pub struct Settings {
    pub base_url: String,
    pub secret: String,
    pub timeout: Duration,
    pub retry: RetryPolicy,
    pub extra_roots_pem: Option<Vec<u8>>,
    pub vendor: VendorSettings,
}

/// The settings of one vendor, as `[probe.helpdesk.<api>]` gave them (defaults when absent).
#[derive(Clone, Debug, PartialEq)]
pub enum VendorSettings {
    SupportBee {
        /// Scan the ticket list when search finds nothing (see `supportbee.rs`).
        list_fallback: bool,
    },
    Rt {
        /// Only tickets of this queue.
        queue: Option<String>,
    },
    HelpScout {
        /// The OAuth2 app's client id (its secret is the probe's `token`).
        client_id: String,
        /// The mailbox the canaries are sent to.
        mailbox_id: u64,
    },
    DjangoHelpdesk {
        /// Only tickets of this queue (its numeric id).
        queue: Option<u64>,
        /// How many of the newest pages of the ticket list to scan (the API has no search).
        scan_pages: u32,
    },
    /// Zammad: nothing of its own (the token's group permissions decide which tickets it
    /// sees).
    Zammad,
    Zendesk {
        /// The agent whose API token it is (Basic `{email}/token:{token}`); `None`: the token
        /// is an OAuth access token (Bearer).
        email: Option<String>,
    },
    Front {
        /// The inbox the canaries arrive in (`inb_…`): its conversations are listed.
        inbox_id: String,
        /// The teammate replies are sent as (`tea_…`), if set.
        author_id: Option<String>,
    },
    /// Freshdesk: nothing of its own to set (no `[probe.helpdesk.freshdesk]` table).
    Freshdesk,
    /// The generic adapter: the whole API described in the config.
    Http(Box<generic::HttpSpec>),
}

/// How a ticket-created webhook for a probe on `api` is authenticated: the vendor's own
/// signature scheme where it signs, else the bearer secret.
pub fn webhook_verifier(api: crate::config::HelpdeskApi) -> webhook::Verifier {
    use crate::config::HelpdeskApi as A;
    match api {
        A::Zendesk => zendesk::verify_webhook,
        A::HelpScout => helpscout::verify_webhook,
        A::SupportBee | A::Rt | A::DjangoHelpdesk | A::Http => webhook::bearer,
        A::Zammad => zammad::verify_webhook,
        A::Front => front::verify_webhook,
        // Freshdesk's automation webhooks carry no signature; the rule sets the header.
        A::Freshdesk => webhook::bearer,
    }
}

/// The registry: the one place that maps a configured `api` to its adapter.
pub fn build(settings: Settings) -> Result<Helpdesk, HelpdeskError> {
    match settings.vendor {
        VendorSettings::SupportBee { list_fallback } => {
            Ok(Helpdesk::new(SupportBee::new(SupportBeeParams {
                base_url: settings.base_url,
                auth_token: settings.secret,
                timeout: settings.timeout,
                retry: settings.retry,
                list_fallback,
                extra_roots_pem: settings.extra_roots_pem,
            })?))
        }
        VendorSettings::Rt { queue } => Ok(Helpdesk::new(rt::Rt::new(rt::RtParams {
            base_url: settings.base_url,
            token: settings.secret,
            queue,
            timeout: settings.timeout,
            retry: settings.retry,
            extra_roots_pem: settings.extra_roots_pem,
        })?)),
        VendorSettings::DjangoHelpdesk { queue, scan_pages } => Ok(Helpdesk::new(
            django_helpdesk::DjangoHelpdesk::new(django_helpdesk::DjangoParams {
                base_url: settings.base_url,
                token: settings.secret,
                queue,
                scan_pages,
                timeout: settings.timeout,
                retry: settings.retry,
                extra_roots_pem: settings.extra_roots_pem,
            })?,
        )),
        VendorSettings::Zammad => Ok(Helpdesk::new(zammad::Zammad::new(zammad::ZammadParams {
            base_url: settings.base_url,
            token: settings.secret,
            timeout: settings.timeout,
            retry: settings.retry,
            extra_roots_pem: settings.extra_roots_pem,
        })?)),
        VendorSettings::Front {
            inbox_id,
            author_id,
        } => Ok(Helpdesk::new(front::Front::new(front::FrontParams {
            base_url: settings.base_url,
            token: settings.secret,
            inbox_id,
            author_id,
            timeout: settings.timeout,
            retry: settings.retry,
            extra_roots_pem: settings.extra_roots_pem,
        })?)),
        VendorSettings::Zendesk { email } => Ok(Helpdesk::new(zendesk::Zendesk::new(
            zendesk::ZendeskParams {
                base_url: settings.base_url,
                token: settings.secret,
                email,
                timeout: settings.timeout,
                retry: settings.retry,
                extra_roots_pem: settings.extra_roots_pem,
            },
        )?)),
        VendorSettings::HelpScout {
            client_id,
            mailbox_id,
        } => Ok(Helpdesk::new(helpscout::HelpScout::new(
            helpscout::HelpScoutParams {
                base_url: settings.base_url,
                client_id,
                client_secret: settings.secret,
                mailbox_id,
                timeout: settings.timeout,
                retry: settings.retry,
                extra_roots_pem: settings.extra_roots_pem,
            },
        )?)),
        VendorSettings::Freshdesk => Ok(Helpdesk::new(freshdesk::Freshdesk::new(
            freshdesk::FreshdeskParams {
                base_url: settings.base_url,
                api_key: settings.secret,
                timeout: settings.timeout,
                retry: settings.retry,
                extra_roots_pem: settings.extra_roots_pem,
            },
        )?)),
        VendorSettings::Http(spec) => Ok(Helpdesk::new(generic::Generic::new(
            generic::GenericParams {
                base_url: settings.base_url,
                secret: settings.secret,
                spec: *spec,
                timeout: settings.timeout,
                retry: settings.retry,
                extra_roots_pem: settings.extra_roots_pem,
            },
        )?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_compare_without_brackets_space_or_case() {
        assert!(same_message_id("<a.b@Host.test>", "a.b@host.test"));
        assert!(same_message_id(" <x@y> ", "<x@y>"));
        assert!(!same_message_id("<x@y>", "<x@z>"));
        assert!(!same_message_id("<>", ""));
    }

    #[test]
    fn a_ticket_made_from_another_mail_is_a_mismatch_and_none_is_absent() {
        let sent = "mc-1-abc@prober.test";
        assert_eq!(
            message_id_verdict(Some("<mc-1-abc@prober.test>"), sent),
            ("match", Some(true))
        );
        assert_eq!(
            message_id_verdict(Some("<fwd-77@mail.example>"), sent),
            ("mismatch", Some(false))
        );
        assert_eq!(message_id_verdict(None, sent), ("absent", None));
    }

    #[test]
    fn the_message_id_header_of_a_raw_mail_folded_or_not() {
        let raw = "From: a@b\r\nMessage-ID:\r\n <m1@prober.test>\r\nSubject: s\r\n\r\nMessage-ID: <body@x>\r\n";
        assert_eq!(header_message_id(raw).as_deref(), Some("<m1@prober.test>"));
        let lf = "message-id: <m2@p>\nSubject: s\n\nbody";
        assert_eq!(header_message_id(lf).as_deref(), Some("<m2@p>"));
        assert_eq!(header_message_id("Subject: s\n\nMessage-ID: <no@x>"), None);
    }
}
