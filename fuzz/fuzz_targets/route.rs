//! A delivered mail's way from arbitrary bytes: the `Received` chain into hops, the
//! `Authentication-Results` headers (and one header value on its own), judged by every rule;
//! never a panic, the hops capped.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mailcanary::canary::hops::{AuthMethod, MAX_HOPS, RouteRules, parse_auth_results, read};

fuzz_target!(|raw: &[u8]| {
    let _ = parse_auth_results(&String::from_utf8_lossy(raw));
    let Some((hops, ars)) = read(raw) else {
        return;
    };
    let rules = RouteRules {
        require_tls_hops: true,
        require_auth: AuthMethod::ALL.to_vec(),
        trusted_authserv_ids: vec!["mx.example.test".into()],
        require_verified: vec![AuthMethod::Dkim, AuthMethod::Arc],
    };
    let sent = raw.len() as u64 * 1_000_003;
    let (route, _) = rules.judge(&hops, sent, &ars, &[]);
    assert!(route.hops.len() <= MAX_HOPS);
});
