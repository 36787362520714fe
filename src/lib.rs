//! mailcanary: a synthetic end-to-end email flow prober.
//!
//! # Layout
//!
//! - [`canary`]: the pure core: authenticated tokens, building and recognising canary mail, and
//!   the life of a canary (stages, deadlines, on time / overdue / late / lost). No I/O.
//! - [`config`]: TOML → validated `Config`; every error with file:line:key.
//! - [`daemon`]: config → ledger, metrics, engine, probes, HTTP; shared by `run`, `once` and tests.
//! - `edges`: all network I/O of the prober (SMTP, IMAP, helpdesk APIs); results and typed errors.
//! - `ledger`: in-flight canaries in redb in the state dir, so a restart resumes them.
//! - `metrics`: the Prometheus exposition of the canary's life.
//! - `flow`: the scheduler and one canary's run over the edges.
//! - `web`: `/metrics`, health, status JSON, the dashboard.
//! - [`sandbox`]: a second program inside the crate, an in-process helpdesk with a real mail
//!   pipeline (SMTP in, import queue, SupportBee-shaped API, outbound mailer, IMAP out) and faults.
//!   Nothing in the prober imports it except the wiring of the default `run` in the CLI.

pub mod canary;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod edges;
pub mod flow;
pub mod ledger;
pub mod metrics;
pub mod sandbox;
pub mod web;
