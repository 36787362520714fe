//! The sandbox MX's input path (`sandbox::smtp`): any bytes as one SMTP client session.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "sandbox_session.rs"]
mod sandbox_session;

fuzz_target!(|input: &[u8]| {
    let s = sandbox_session::sandbox();
    sandbox_session::session(&s.rt, s.smtp, input);
});
