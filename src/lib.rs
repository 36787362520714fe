//! mailcanary: a synthetic end-to-end email flow prober.
//!
//! # Layout
//!
//! - [`sandbox`]: a second program inside the crate, an in-process helpdesk with a real mail
//!   pipeline (SMTP in, import queue, SupportBee-shaped API, outbound mailer, IMAP out) and faults.
//!   Nothing in the prober imports it except the wiring of the default `run` in the CLI.

pub mod sandbox;
