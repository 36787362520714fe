//! mailcanary: a synthetic end-to-end email flow prober.
//!
//! # Layout
//!
//! - [`canary`]: the pure core: authenticated tokens, building and recognising canary mail, and
//!   the life of a canary (stages, deadlines, on time / overdue / late / lost). No I/O.
//! - [`config`]: TOML → validated `Config`; every error with file:line:key.
//! - [`sandbox`]: a second program inside the crate, an in-process helpdesk with a real mail
//!   pipeline (SMTP in, import queue, SupportBee-shaped API, outbound mailer, IMAP out) and faults.
//!   Nothing in the prober imports it except the wiring of the default `run` in the CLI.

pub mod canary;
pub mod config;
pub mod sandbox;
