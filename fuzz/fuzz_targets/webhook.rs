//! The webhook payload path after authentication: JSON, every string in it, every
//! token-shaped string parsed and checked ([`mailcanary::flow::webhook::payload_tokens`]).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let key = mailcanary::canary::Key::from_secret("fuzz");
    let _ = mailcanary::flow::webhook::payload_tokens(body, &key, "drill");
});
