//! The config loader on arbitrary TOML text: a config or errors, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(cfg) = mailcanary::config::parse_str(text, "fuzz.toml") {
        let _ = cfg.warnings();
    }
});
