//! Integration tests of the prober against the sandbox: drills (stall, every fault blamed on
//! its stage), restart, forged mail, secrets, and the CLI. The sandbox runs in the test process
//! on port 0; the prober runs in-process (`Daemon`) or as the real binary where a process
//! boundary is the point (kill -9, logs, SIGHUP reload).

mod blind;
mod chaos;
mod cli;
mod common;
#[path = "../support/connect_proxy.rs"]
mod connect_proxy;
mod dashboard;
mod drain;
mod drills;
mod freshdesk;
mod front;
mod generic;
mod heartbeat;
mod helpscout;
mod imap_sharing;
mod incident;
mod learned;
mod private_ca;
#[path = "../support/probe_config.rs"]
mod probe_config;
mod proxy;
mod recipients;
mod reload;
mod restart;
mod security;
mod shards;
mod state_dir;
#[path = "../support/tls_front.rs"]
mod tls_front;
mod web;
mod webhook;
mod zammad;
mod zendesk;
