//! Integration tests of the sandbox helpdesk: real clients (lettre, reqwest, async-imap,
//! Python's imaplib, raw sockets) against a sandbox bound to ephemeral loopback ports.

mod api;
mod cli;
mod common;
mod freshdesk;
mod imap;
mod pipeline;
mod smtp;
