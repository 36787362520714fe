//! The sandbox IMAP server's input path (`sandbox::imap`, imap-next): any bytes as one client
//! session. The seeds log in, so the fuzzer starts from the authenticated and selected states.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "sandbox_session.rs"]
mod sandbox_session;

fuzz_target!(|input: &[u8]| {
    let s = sandbox_session::sandbox();
    sandbox_session::session(&s.rt, s.imap, input);
});
