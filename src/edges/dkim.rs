//! Local DKIM and ARC verification of a delivered canary (mail-auth 0.13, rust-crypto), against
//! DNS from the probe's `dns_resolver` (or the system's resolver).
//!
//! What the receiving server's `Authentication-Results` say is its word; this is the prober's
//! own check of the same signatures, with its own DNS view (a rotated key shows here even if
//! the receiver cached the old one). Bounded: every verification has [`Verifier::timeout`],
//! and one that runs out is `temperror` for each method, as a DNS failure is. Never an error
//! that loses the canary.

use std::{net::SocketAddr, time::Duration};

use mail_auth::{
    AuthenticatedMessage, DkimResult, MessageAuthenticator,
    hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts},
};

use crate::canary::hops::{AuthMethod, AuthResult, Verdict};

/// One probe's verifier: its resolver (hickory, with its own small cache) and time limit.
pub struct Verifier {
    auth: MessageAuthenticator,
    pub timeout: Duration,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// `resolver`: one DNS server (UDP, then TCP) at that address and port; `None`: the
    /// system's (`/etc/resolv.conf`). Must be called inside a tokio runtime.
    pub fn new(resolver: Option<SocketAddr>, timeout: Duration) -> Result<Verifier, String> {
        let auth = match resolver {
            Some(addr) => {
                let mut server = NameServerConfig::udp_and_tcp(addr.ip());
                for c in &mut server.connections {
                    c.port = addr.port();
                }
                let mut opts = ResolverOpts::default();
                opts.timeout = timeout;
                opts.attempts = 1;
                MessageAuthenticator::new(
                    ResolverConfig::from_parts(None, vec![], vec![server]),
                    opts,
                )
            }
            None => MessageAuthenticator::new_system_conf(),
        }
        .map_err(|e| format!("DNS resolver: {e}"))?;
        Ok(Verifier { auth, timeout })
    }

    /// The DKIM verdict (`pass` if any signature passes, else the first signature's; `none`
    /// without one) and the ARC verdict of `raw`. Within [`Verifier::timeout`], or
    /// `temperror` for both.
    pub async fn verify(&self, raw: &[u8]) -> Vec<Verdict> {
        let Some(message) = AuthenticatedMessage::parse(raw) else {
            return vec![
                verdict(AuthMethod::Dkim, AuthResult::Permerror),
                verdict(AuthMethod::Arc, AuthResult::Permerror),
            ];
        };
        let check = async {
            let dkim = self.auth.verify_dkim(&message).await;
            let dkim = combine(dkim.iter().map(|o| o.result()));
            let arc = self.auth.verify_arc(&message).await;
            vec![
                verdict(AuthMethod::Dkim, dkim),
                verdict(AuthMethod::Arc, result_of(arc.result())),
            ]
        };
        match tokio::time::timeout(self.timeout, check).await {
            Ok(v) => v,
            Err(_) => vec![
                verdict(AuthMethod::Dkim, AuthResult::Temperror),
                verdict(AuthMethod::Arc, AuthResult::Temperror),
            ],
        }
    }
}

fn verdict(method: AuthMethod, result: AuthResult) -> Verdict {
    Verdict { method, result }
}

fn combine<'a>(mut results: impl Iterator<Item = &'a DkimResult>) -> AuthResult {
    let Some(first) = results.next() else {
        return AuthResult::None;
    };
    let first = result_of(first);
    if first == AuthResult::Pass || results.any(|r| *r == DkimResult::Pass) {
        AuthResult::Pass
    } else {
        first
    }
}

/// mail-auth's verdict as RFC 8601 words it. mail-auth 0.13.3 answers a body hash that does
/// not match (the body changed after signing: a list footer, a rewriting gateway) with
/// `neutral`; RFC 6376 6.1.3 makes it a PERMFAIL and RFC 8617 5.2 fails the chain, and opendkim
/// says `fail`, so it is `fail` here too.
fn result_of(r: &DkimResult) -> AuthResult {
    use mail_auth::{Error, arc::ArcError, dkim::DkimError};
    match r {
        DkimResult::Neutral(Error::Dkim(DkimError::FailedBodyHashMatch))
        | DkimResult::Neutral(Error::Arc(ArcError::FailedBodyHashMatch)) => AuthResult::Fail,
        DkimResult::Pass => AuthResult::Pass,
        DkimResult::Neutral(_) => AuthResult::Neutral,
        DkimResult::Fail(_) => AuthResult::Fail,
        DkimResult::PermError(_) => AuthResult::Permerror,
        DkimResult::TempError(_) => AuthResult::Temperror,
        DkimResult::None => AuthResult::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIGNED: &str = "DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.test; s=mc;\r\n\
\tt=1796227195; bh=Ck5SoRNWUpSR4X0COv7R5ub2pUTtl6xz4dTFz++ji4M=;\r\n\
\th=From:To:Subject:Date:From;\r\n\
\tb=Bw8oPwyYjUsk5JCS1Z/TQlP5kYFJ6e28mqhczPCR+/h21tzFRFo6e9OhJKkV+gJFw=\r\n\
From: canary@example.test\r\nTo: inbox@example.test\r\nSubject: pass\r\n\
Date: Wed, 02 Dec 2026 15:59:54 +0000\r\n\r\nbody\r\n";

    /// Regression test of a mail-auth 0.13.3 surprise, seen on a canary a list's footer
    /// changed (tests/realmail/arc.rs): its verdict for a body hash that does not match is
    /// `neutral`. The body hash is checked before the key is looked up, so no DNS is needed.
    #[tokio::test]
    async fn a_body_changed_after_signing_is_fail_not_mail_auths_neutral() {
        let v =
            Verifier::new(Some("127.0.0.1:9".parse().unwrap()), Duration::from_secs(5)).unwrap();
        let changed = SIGNED.replace("\r\n\r\nbody\r\n", "\r\n\r\nbody\r\n--\r\nfooter\r\n");
        assert_ne!(changed, SIGNED);
        let got = v.verify(changed.as_bytes()).await;
        assert_eq!(
            got,
            [
                verdict(AuthMethod::Dkim, AuthResult::Fail),
                verdict(AuthMethod::Arc, AuthResult::None)
            ]
        );
    }

    #[tokio::test]
    async fn an_unsigned_mail_is_none_without_asking_dns() {
        // A resolver that does not exist: never asked.
        let v =
            Verifier::new(Some("127.0.0.1:9".parse().unwrap()), Duration::from_secs(5)).unwrap();
        let got = v
            .verify(b"From: a@example.test\r\nSubject: x\r\n\r\nbody\r\n")
            .await;
        assert_eq!(
            got,
            [
                verdict(AuthMethod::Dkim, AuthResult::None),
                verdict(AuthMethod::Arc, AuthResult::None)
            ]
        );
    }

    /// A resolver that never answers (a bound UDP socket nobody reads): the signed mail's
    /// verdict is temperror within the timeout, not a hang and not a lost canary.
    #[tokio::test]
    async fn a_silent_resolver_is_temperror_within_the_timeout() {
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let v = Verifier::new(
            Some(silent.local_addr().unwrap()),
            Duration::from_millis(500),
        )
        .unwrap();
        let started = std::time::Instant::now();
        let got = v.verify(SIGNED.as_bytes()).await;
        assert_eq!(
            got[0],
            verdict(AuthMethod::Dkim, AuthResult::Temperror),
            "{got:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(30), "bounded");
    }
}
