//! Helpdesk APIs: find the ticket a canary became, post the agent reply, clean up.
//!
//! One enum, one variant per vendor. Chosen over a trait with boxed futures: the flow holds a
//! `Helpdesk` value built from config, calls plain `async fn`s on it (no allocation, no
//! `dyn`), and adding Zendesk or Freshdesk is one module, one variant and one match arm per
//! method, which the compiler then asks for everywhere.

pub mod supportbee;

use std::time::SystemTime;

use crate::canary::life::Reason;

pub use supportbee::{RetryPolicy, SupportBee, SupportBeeParams};

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
}

/// A helpdesk the prober talks to.
#[derive(Debug)]
pub enum Helpdesk {
    SupportBee(SupportBee),
}

impl Helpdesk {
    /// The ticket whose subject or body carries `token`, created at or after `since` (allowing
    /// for clock skew), if it exists yet. `Ok(None)` means "not yet": keep polling.
    pub async fn find_ticket(
        &self,
        token: &str,
        since: SystemTime,
    ) -> Result<Option<TicketRef>, HelpdeskError> {
        match self {
            Helpdesk::SupportBee(h) => h.find_ticket(token, since).await,
        }
    }

    /// Posts an agent reply with `body` to the ticket.
    pub async fn post_reply(&self, ticket: &TicketRef, body: &str) -> Result<(), HelpdeskError> {
        match self {
            Helpdesk::SupportBee(h) => h.post_reply(ticket, body).await,
        }
    }

    /// Cleans the ticket up. A ticket that is already gone (404) counts as cleaned: cleanup may
    /// run again after a restart.
    pub async fn cleanup(&self, ticket: &TicketRef, how: CleanupMode) -> Result<(), HelpdeskError> {
        match self {
            Helpdesk::SupportBee(h) => h.cleanup(ticket, how).await,
        }
    }
}
