//! Canary recognition of an arbitrary message: `inspect` then `classify`, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mailcanary::canary::{Inspected, Key, classify, inspect};

fuzz_target!(|raw: &[u8]| {
    if let Inspected::Candidate(c) = inspect(raw) {
        let key = Key::from_secret("fuzz");
        let _ = classify(&c, &key, &["drill", "other"]);
    }
});
