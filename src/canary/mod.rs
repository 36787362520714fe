//! The canary itself, pure: no network, no clock of its own, no metrics. The only I/O is
//! [`token::Key::load_or_create`] reading or writing the key file in the state dir.
//!
//! - [`token`]: the authenticated token that names one canary (HMAC over probe, id, send time);
//! - [`message`]: the canary email and the agent reply text, built from a token;
//! - [`hops`]: the delivered mail's `Received` hops and `Authentication-Results` verdicts;
//! - [`recognise`]: from raw bytes in a mailbox to "canary of probe X", "forged" or "not ours".
//!
//! Architecture invariant: this module imports nothing of the prober's edges, ledger, metrics,
//! flow or web; they all import it.

pub mod hops;
pub mod life;
pub mod message;
pub mod recognise;
pub mod token;

pub use message::CanaryMail;
pub use recognise::{Candidate, Classified, Inspected, classify, inspect};
pub use token::{Key, Token, TokenError, find_tokens};
