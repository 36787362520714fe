//! The shipped Prometheus files, tested: `deploy/prometheus/alerts.yml` passes `promtool check
//! rules` and its unit tests (`alerts_test.yml`), `prometheus.yml` passes `promtool check
//! config`, every metric the rules name is one the prober really exports, and — the
//! end-to-end proof — a real Prometheus scraping a live prober fires the import-stall alert
//! when the sandbox's import stalls, and resolves it when the stall clears.
//!
//! Needs Debian's `prometheus` package (`prometheus` and `promtool` on PATH); `tests/run.sh`
//! installs it.

// The prober tests' helpers: a fast sandbox, a probe config pointing at it (written by the
// shared config builder), a scraper. Not every helper is used here.
#[allow(dead_code, unused_imports)]
#[path = "../prober/common.rs"]
mod common;
#[path = "../support/probe_config.rs"]
mod probe_config;

mod e2e;
mod exprs;
mod promtool;

use std::path::{Path, PathBuf};

/// `deploy/prometheus/<name>` in the source tree.
pub fn deploy_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/prometheus")
        .join(name)
}

/// Panics with how to get the tool when `bin` is not on PATH.
pub fn require_tool(bin: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(bin).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{bin}` is not on PATH: install Debian's `prometheus` package \
         (`sudo apt-get install prometheus`; tests/run.sh does it when missing)"
    );
}
