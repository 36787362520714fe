//! The prober against real Postfix 3.7 and Dovecot 2.3 on loopback (issue 4).
//!
//! Every test starts its own private Postfix + Dovecot pair on free loopback ports (see
//! `harness.rs` for why and how) and an in-process prober (`mailcanary::daemon::Daemon`) with a
//! generated mail-loop config. The servers come from Debian packages that `tests/run.sh`
//! installs; the tests fail, not skip, when they are missing. They need root (Postfix).

mod arc;
mod auth_drills;
mod auth_mx;
mod common;
mod django;
mod failures;
mod harness;
mod helpdesks;
mod idp;
mod mailbox;
mod modes;
mod oauth2;
mod outages;
mod placement;
#[path = "../support/probe_config.rs"]
mod probe_config;
mod process;
mod route;
mod rt;
#[path = "../support/tls_front.rs"]
mod tls_front;
