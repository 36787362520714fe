//! Token parsing and scanning of arbitrary text: never a panic, and a parsed token verifies
//! against no key it was not made with.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mailcanary::canary::{Key, Token, find_tokens, token::find_reply_marks};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let key = Key::from_secret("fuzz");
    if let Ok(t) = Token::parse(&text) {
        let _ = (t.id(), t.sent_at_ms(), t.mac(), t.sent_at());
        let _ = t.verify(&key, "drill");
    }
    for t in find_tokens(&text) {
        let _ = Token::parse(t);
    }
    let _ = find_reply_marks(&text);
});
