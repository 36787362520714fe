//! Ticket-created webhooks, authenticated the way each vendor signs them.
//!
//! Each vendor module that receives webhooks has a `verify_webhook` of type [`Verifier`]; the
//! registry ([`super::webhook_verifier`]) maps the configured `api` to it, and vendors that do
//! not sign (SupportBee, RT, django-helpdesk, Freshdesk, the generic adapter) use [`bearer`]:
//! `Authorization: Bearer SECRET` or `?secret=SECRET`. This module holds what every scheme
//! shares: constant-time comparison, the replay window, the body cap, and the HMACs.
//!
//! The web layer answers an authentic delivery 2xx whatever it names (vendors disable an
//! endpoint that keeps failing), a refused one 401, and a challenge with its echo.

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};

/// The largest webhook body read; a larger one is refused unread (413).
pub const MAX_BODY: usize = 256 * 1024;

/// A signed timestamp further than this from our clock, either way, is a replay (or a clock
/// far off): refused.
pub const REPLAY_WINDOW: Duration = Duration::from_secs(5 * 60);

/// What a webhook delivery's authentication says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Signed (or carrying the secret) as the vendor does: act on it.
    Authentic,
    /// A subscription handshake: answer 200 with this body, act on nothing (Front).
    Challenge(String),
    /// Not authentic: 401, and why (never the secret or the signature).
    Refused(&'static str),
}

/// The request as the verifier sees it: header lookup (case-insensitive), the query's
/// `secret`, the raw body.
pub struct Delivery<'a> {
    pub headers: &'a axum::http::HeaderMap,
    pub query_secret: Option<&'a str>,
    pub body: &'a [u8],
    pub now: SystemTime,
}

impl Delivery<'_> {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A vendor's webhook authentication.
pub type Verifier = fn(secret: &str, d: &Delivery<'_>) -> Verdict;

/// Equal without an early exit, so the time taken does not reveal how much matched.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `at` is within [`REPLAY_WINDOW`] of `now`.
pub fn fresh(at: SystemTime, now: SystemTime) -> bool {
    let skew = match now.duration_since(at) {
        Ok(d) => d,
        Err(e) => e.duration(),
    };
    skew <= REPLAY_WINDOW
}

/// The bearer secret (vendors that do not sign): `Authorization: Bearer SECRET`, or
/// `?secret=SECRET` for helpdesks that can only set a URL.
pub fn bearer(secret: &str, d: &Delivery<'_>) -> Verdict {
    let given = d
        .header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .or(d.query_secret);
    match given {
        Some(g) if same(g.as_bytes(), secret.as_bytes()) => Verdict::Authentic,
        Some(_) => Verdict::Refused("bad webhook secret"),
        None => Verdict::Refused("missing webhook secret"),
    }
}

/// HMAC-SHA256 of the concatenated `parts`, keyed with `secret`.
pub fn hmac_sha256(secret: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes any key");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().to_vec()
}

/// HMAC-SHA1 of the concatenated `parts`, keyed with `secret`.
pub fn hmac_sha1(secret: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret).expect("HMAC takes any key");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().to_vec()
}

/// Standard base64 with padding.
pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Compares a signature the vendor sent (as text) with the one computed, in constant time.
pub fn signature_matches(given: Option<&str>, expected: &str) -> Verdict {
    match given {
        None => Verdict::Refused("missing webhook signature"),
        Some(g) if same(g.trim().as_bytes(), expected.as_bytes()) => Verdict::Authentic,
        Some(_) => Verdict::Refused("bad webhook signature"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmacs_match_the_rfc_4231_and_2202_vectors() {
        // RFC 4231 test case 2 and RFC 2202 test case 2.
        assert_eq!(
            hex(&hmac_sha256(
                b"Jefe",
                &[b"what do ya want ", b"for nothing?"]
            )),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(
            hex(&hmac_sha1(b"Jefe", &[b"what do ya want for nothing?"])),
            "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79"
        );
        assert_eq!(b64(b"hi"), "aGk=");
    }

    #[test]
    fn the_replay_window_holds_both_ways() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert!(fresh(now - Duration::from_secs(299), now));
        assert!(fresh(now + Duration::from_secs(299), now));
        assert!(!fresh(now - Duration::from_secs(301), now));
        assert!(!fresh(now + Duration::from_secs(301), now));
    }

    #[test]
    fn bearer_takes_the_header_or_the_query() {
        let mut h = axum::http::HeaderMap::new();
        let d = |h: &axum::http::HeaderMap, q| {
            bearer(
                "s3cret",
                &Delivery {
                    headers: h,
                    query_secret: q,
                    body: b"{}",
                    now: SystemTime::now(),
                },
            )
        };
        assert_eq!(d(&h, None), Verdict::Refused("missing webhook secret"));
        assert_eq!(d(&h, Some("s3cret")), Verdict::Authentic);
        h.insert("authorization", "Bearer nope".parse().unwrap());
        assert_eq!(d(&h, None), Verdict::Refused("bad webhook secret"));
        h.insert("authorization", "Bearer s3cret".parse().unwrap());
        assert_eq!(d(&h, None), Verdict::Authentic);
    }
}
