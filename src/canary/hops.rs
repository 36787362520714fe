//! What happened on a delivered canary's way: its hops (the `Received` chain) and the
//! authentication verdicts (`Authentication-Results`, RFC 8601) of the receiving server.
//!
//! Pure: [`received`] and [`auth_results`] read a parsed message (mail-parser 0.11), and
//! [`Route::new`] turns them, with the canary's send time and the probe's trusted authserv-ids,
//! into what the canary keeps. [`Route::fault`] says whether the probe's requirements
//! (`require_tls_hops`, `require_auth`, `require_verified`) fail the delivery.
//!
//! Hops are ordered from the first (the bottom-most `Received`, written by the first server
//! that took the mail) to the last (the top-most, usually the mailbox server's LMTP). A hop's
//! delay is its date minus the previous hop's (the first hop's: minus the canary's send time).
//! `Received` dates have one-second resolution and each server's own clock, so a delay is
//! clamped at zero and the amount a hop's date lies *before* the previous one is kept as
//! `skew_ms` (shown, not hidden). The send time is compared at the same one-second
//! resolution, so a hop stamped in the second the canary was sent has no skew.

use mail_parser::{Message, Protocol};
use serde::{Deserialize, Serialize};

/// At most this many hops are kept (from the first): a mail with hundreds of `Received`
/// headers is garbage or a loop, and the record stays small.
pub const MAX_HOPS: usize = 20;
/// At most this many `Authentication-Results` headers are read.
const MAX_AR_HEADERS: usize = 16;

/// One `Received` header, as the server that wrote it said.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hop {
    /// The host the mail came from (its HELO name or address), as the server wrote it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// The server that wrote the header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// The `with` protocol: `ESMTPS`, `ESMTPSA`, `LMTP`, `SMTP`, `local`, …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// The TLS version the header names (`TLSv1.3`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<String>,
    /// The TLS cipher the header names, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cipher: Option<String>,
    /// The header's date (Unix ms, the writing server's clock, one-second resolution).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_ms: Option<u64>,
    /// Time since the previous hop (the first: since the canary was sent), clamped at zero;
    /// absent when this hop's date (or every earlier one's) is missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    /// How far this hop's date lies before the previous hop's: clock skew between the servers
    /// (0 when the clocks agree).
    #[serde(default)]
    pub skew_ms: u64,
    /// The header says the mail crossed this hop without TLS: an SMTP-family protocol without
    /// the `S` (`SMTP`, `ESMTP`, `ESMTPA`) and no TLS version. `LMTP` (a local delivery
    /// protocol, RFC 2033, Postfix to Dovecot over a socket), `local` and unknown protocols
    /// are not called plaintext.
    #[serde(default)]
    pub plaintext: bool,
}

/// A method whose verdict the receiving server reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    Dkim,
    Spf,
    Dmarc,
    Arc,
}

impl AuthMethod {
    pub const ALL: [AuthMethod; 4] = [
        AuthMethod::Dkim,
        AuthMethod::Spf,
        AuthMethod::Dmarc,
        AuthMethod::Arc,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Dkim => "dkim",
            AuthMethod::Spf => "spf",
            AuthMethod::Dmarc => "dmarc",
            AuthMethod::Arc => "arc",
        }
    }

    pub fn parse(s: &str) -> Option<AuthMethod> {
        AuthMethod::ALL
            .into_iter()
            .find(|m| m.as_str().eq_ignore_ascii_case(s))
    }
}

/// A verdict, from RFC 8601's result values; anything else is [`AuthResult::Other`], so the
/// metric's `result` label stays bounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthResult {
    Pass,
    Fail,
    Softfail,
    Neutral,
    None,
    Temperror,
    Permerror,
    Policy,
    Other,
}

impl AuthResult {
    pub const ALL: [AuthResult; 9] = [
        AuthResult::Pass,
        AuthResult::Fail,
        AuthResult::Softfail,
        AuthResult::Neutral,
        AuthResult::None,
        AuthResult::Temperror,
        AuthResult::Permerror,
        AuthResult::Policy,
        AuthResult::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AuthResult::Pass => "pass",
            AuthResult::Fail => "fail",
            AuthResult::Softfail => "softfail",
            AuthResult::Neutral => "neutral",
            AuthResult::None => "none",
            AuthResult::Temperror => "temperror",
            AuthResult::Permerror => "permerror",
            AuthResult::Policy => "policy",
            AuthResult::Other => "other",
        }
    }

    /// RFC 8601's values (and the older `hardfail`, RFC 5451's name for `fail`).
    pub fn parse(s: &str) -> AuthResult {
        match s.to_ascii_lowercase().as_str() {
            "pass" => AuthResult::Pass,
            "fail" | "hardfail" => AuthResult::Fail,
            "softfail" => AuthResult::Softfail,
            "neutral" => AuthResult::Neutral,
            "none" => AuthResult::None,
            "temperror" => AuthResult::Temperror,
            "permerror" => AuthResult::Permerror,
            "policy" => AuthResult::Policy,
            _ => AuthResult::Other,
        }
    }
}

/// One method's result inside an `Authentication-Results` header.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub method: AuthMethod,
    pub result: AuthResult,
}

/// One `Authentication-Results` header: who wrote it and the results of the methods we know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthHeader {
    /// The authserv-id (RFC 8601 §2.2), as written.
    pub authserv_id: String,
    pub verdicts: Vec<Verdict>,
}

/// What a probe requires of a delivered canary's way, and whose verdicts it trusts (from its
/// config: `require_tls_hops`, `require_auth`, `trusted_authserv_ids`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteRules {
    pub require_tls_hops: bool,
    pub require_auth: Vec<AuthMethod>,
    /// Lowercase. Empty: no `Authentication-Results` header is trusted.
    pub trusted_authserv_ids: Vec<String>,
    /// Methods (DKIM, ARC) whose verdict in the prober's own check must be `pass`.
    pub require_verified: Vec<AuthMethod>,
}

impl RouteRules {
    /// The route of a delivered mail (`received` and `ars` as [`super::Candidate`] holds
    /// them) sent at `sent_ms`, with the prober's own verdicts `verified`, and why these rules
    /// fail its delivery, if they do.
    pub fn judge(
        &self,
        received: &[Hop],
        sent_ms: u64,
        ars: &[AuthHeader],
        verified: &[Verdict],
    ) -> (Route, Option<(super::life::Reason, String)>) {
        let mut route = Route::new(received, sent_ms, ars, &self.trusted_authserv_ids);
        route.verified = verified.to_vec();
        let fault = route
            .fault(self.require_tls_hops, &self.require_auth)
            .or_else(|| {
                let failed: Vec<String> = self
                    .require_verified
                    .iter()
                    .map(|m| {
                        let r = route
                            .verified
                            .iter()
                            .find(|v| v.method == *m)
                            .map_or(AuthResult::None, |v| v.result);
                        (m, r)
                    })
                    .filter(|(_, r)| *r != AuthResult::Pass)
                    .map(|(m, r)| format!("{}={}", m.as_str(), r.as_str()))
                    .collect();
                (!failed.is_empty()).then(|| {
                    (
                        super::life::Reason::AuthResult,
                        format!(
                            "required verification (the prober's own) not passed: {}",
                            failed.join(", ")
                        ),
                    )
                })
            });
        (route, fault)
    }
}

/// What a delivered canary keeps of its way.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// From the first hop to the last.
    #[serde(default)]
    pub hops: Vec<Hop>,
    /// One per method reported by a trusted `Authentication-Results` header (combined: `pass`
    /// if any result for the method passed, else the first one given), in [`AuthMethod`] order.
    #[serde(default)]
    pub auth: Vec<Verdict>,
    /// `Authentication-Results` headers ignored because their authserv-id is not trusted.
    #[serde(default)]
    pub untrusted_auth: u32,
    /// The prober's own verification (`verify_dkim`): DKIM and ARC, against its DNS.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verified: Vec<Verdict>,
}

impl Route {
    /// `received` in header order (top-most first, as [`received`] returns them); `sent_ms`
    /// the canary's send time; only `ars` whose authserv-id is in `trusted` (compared without
    /// regard to case) count.
    pub fn new(received: &[Hop], sent_ms: u64, ars: &[AuthHeader], trusted: &[String]) -> Route {
        let mut hops: Vec<Hop> = received.iter().rev().take(MAX_HOPS).cloned().collect();
        // Dates have one-second resolution: compare the send time at the same.
        let mut previous = Some(sent_ms - sent_ms % 1000);
        for hop in &mut hops {
            hop.delay_ms = None;
            hop.skew_ms = 0;
            if let (Some(at), Some(prev)) = (hop.at_ms, previous) {
                hop.delay_ms = Some(at.saturating_sub(prev));
                hop.skew_ms = prev.saturating_sub(at);
            }
            if hop.at_ms.is_some() {
                previous = hop.at_ms;
            }
        }
        let mut auth: Vec<Verdict> = Vec::new();
        let mut untrusted_auth = 0;
        for ar in ars {
            if !trusted
                .iter()
                .any(|t| t.eq_ignore_ascii_case(&ar.authserv_id))
            {
                untrusted_auth += 1;
                continue;
            }
            for v in &ar.verdicts {
                match auth.iter_mut().find(|a| a.method == v.method) {
                    Some(a) if v.result == AuthResult::Pass => a.result = AuthResult::Pass,
                    Some(_) => {}
                    None => auth.push(v.clone()),
                }
            }
        }
        auth.sort_by_key(|v| v.method);
        Route {
            hops,
            auth,
            untrusted_auth,
            verified: Vec::new(),
        }
    }

    /// Whether every hop whose TLS the headers tell used it (no hop is plaintext).
    pub fn all_tls(&self) -> bool {
        !self.hops.iter().any(|h| h.plaintext)
    }

    /// The verdict for `method` (`none` when no trusted header reports it).
    pub fn verdict(&self, method: AuthMethod) -> AuthResult {
        self.auth
            .iter()
            .find(|v| v.method == method)
            .map_or(AuthResult::None, |v| v.result)
    }

    /// Why the probe's requirements fail this delivery, if they do: a plaintext hop while
    /// `require_tls` ([`super::life::Reason::Tls`]), or a required method not `pass`
    /// ([`super::life::Reason::AuthResult`]). The detail names the hop or method, never an
    /// address.
    pub fn fault(
        &self,
        require_tls: bool,
        require_auth: &[AuthMethod],
    ) -> Option<(super::life::Reason, String)> {
        if require_tls
            && let Some((i, hop)) = self.hops.iter().enumerate().find(|(_, h)| h.plaintext)
        {
            let by = hop.by.as_deref().unwrap_or("?");
            let with = hop.protocol.as_deref().unwrap_or("?");
            return Some((
                super::life::Reason::Tls,
                format!("hop {} (by {by}, with {with}) was not TLS", i + 1),
            ));
        }
        let failed: Vec<String> = require_auth
            .iter()
            .filter(|m| self.verdict(**m) != AuthResult::Pass)
            .map(|m| format!("{}={}", m.as_str(), self.verdict(*m).as_str()))
            .collect();
        if !failed.is_empty() {
            return Some((
                super::life::Reason::AuthResult,
                format!("required authentication not passed: {}", failed.join(", ")),
            ));
        }
        None
    }
}

/// [`received`] and [`auth_results`] of raw bytes (`None`: not parseable as a message).
pub fn read(raw: &[u8]) -> Option<(Vec<Hop>, Vec<AuthHeader>)> {
    let message = mail_parser::MessageParser::default().parse(raw)?;
    Some((received(&message), auth_results(&message, raw)))
}

/// The `Received` headers of `message` in header order (top-most first), each with its date
/// but no delay yet (see [`Route::new`]). Headers mail-parser cannot read as `Received` are
/// kept as hops with nothing known.
pub fn received(message: &Message<'_>) -> Vec<Hop> {
    message
        .headers()
        .iter()
        .filter(|h| matches!(h.name, mail_parser::HeaderName::Received))
        .take(4 * MAX_HOPS)
        .map(|h| match h.value.as_received() {
            Some(r) => hop_of(r),
            None => Hop::default(),
        })
        .collect()
}

fn hop_of(r: &mail_parser::Received<'_>) -> Hop {
    let protocol = r.with.as_ref();
    let tls = r.tls_version.map(|v| v.to_string());
    let secure_protocol = protocol.is_some_and(|p| {
        matches!(
            p,
            Protocol::ESMTPS
                | Protocol::ESMTPSA
                | Protocol::LMTPS
                | Protocol::LMTPSA
                | Protocol::UTF8SMTPS
                | Protocol::UTF8SMTPSA
                | Protocol::UTF8LMTPS
                | Protocol::UTF8LMTPSA
                | Protocol::HTTPS
        )
    });
    let smtp_plain = protocol.is_some_and(|p| {
        matches!(
            p,
            Protocol::SMTP
                | Protocol::ESMTP
                | Protocol::ESMTPA
                | Protocol::UTF8SMTP
                | Protocol::UTF8SMTPA
        )
    });
    let at_ms = r
        .date
        .as_ref()
        .filter(|d| d.is_valid())
        .map(|d| d.to_timestamp())
        .filter(|s| *s > 0)
        .map(|s| (s as u64).saturating_mul(1000));
    Hop {
        from: r
            .from
            .as_ref()
            .or(r.helo.as_ref())
            .map(|h| clip(&h.to_string()))
            .or_else(|| r.from_ip.map(|ip| ip.to_string())),
        by: r.by.as_ref().map(|h| clip(&h.to_string())),
        protocol: protocol.map(|p| p.to_string()),
        plaintext: smtp_plain && tls.is_none() && !secure_protocol,
        tls,
        cipher: r.tls_cipher.as_deref().map(clip),
        at_ms,
        delay_ms: None,
        skew_ms: 0,
    }
}

/// Host names and ciphers from a header are the sender's text: kept short.
fn clip(s: &str) -> String {
    let s = s.trim();
    match s.char_indices().nth(80) {
        Some((i, _)) => s[..i].to_string(),
        None => s.to_string(),
    }
}

/// The `Authentication-Results` headers of `message` (`raw`, the bytes it was parsed from),
/// top-most first. Each keeps only the results of [`AuthMethod`]s; a header that does not
/// parse is skipped.
pub fn auth_results(message: &Message<'_>, raw: &[u8]) -> Vec<AuthHeader> {
    message
        .headers()
        .iter()
        .filter(|h| {
            h.name
                .as_str()
                .eq_ignore_ascii_case("Authentication-Results")
        })
        .take(MAX_AR_HEADERS)
        .filter_map(|h| raw.get(h.offset_start as usize..h.offset_end as usize))
        .filter_map(|bytes| parse_auth_results(&String::from_utf8_lossy(bytes)))
        .collect()
}

/// Parses the value of one `Authentication-Results` header (RFC 8601 §2.2):
/// `authserv-id [version] ; method[/version]=result [reason=…] [ptype.prop=…] ; …` or
/// `authserv-id; none`. Comments are dropped; quoted strings are kept whole.
pub fn parse_auth_results(value: &str) -> Option<AuthHeader> {
    let text = strip_comments(value);
    let mut parts = split_unquoted(&text, ';').into_iter();
    let authserv_id = parts.next()?.split_whitespace().next()?.to_string();
    if authserv_id.contains('=') || authserv_id.len() > 255 {
        return None;
    }
    let mut verdicts = Vec::new();
    for part in parts {
        let Some(first) = part.split_whitespace().next() else {
            continue;
        };
        let Some((method, result)) = first.split_once('=') else {
            continue;
        };
        let method = method.split('/').next().unwrap_or(method).trim();
        let Some(method) = AuthMethod::parse(method) else {
            continue;
        };
        verdicts.push(Verdict {
            method,
            result: AuthResult::parse(result.trim()),
        });
    }
    Some(AuthHeader {
        authserv_id,
        verdicts,
    })
}

/// `value` without RFC 5322 comments (nested parentheses), quoted strings untouched.
fn strip_comments(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let (mut depth, mut quoted, mut escaped) = (0u32, false, false);
    for c in value.chars() {
        if escaped {
            escaped = false;
            if depth == 0 {
                out.push(c);
            }
            continue;
        }
        match c {
            '\\' => {
                escaped = true;
                if depth == 0 {
                    out.push(c);
                }
            }
            '"' if depth == 0 => {
                quoted = !quoted;
                out.push(c);
            }
            '(' if !quoted => {
                depth += 1;
                out.push(' ');
            }
            ')' if !quoted && depth > 0 => depth -= 1,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

fn split_unquoted(text: &str, sep: char) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in text.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                out.push(&text[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    out.push(&text[start..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use mail_parser::MessageParser;

    fn route_of(raw: &str, sent_ms: u64, trusted: &[&str]) -> Route {
        let m = MessageParser::default().parse(raw.as_bytes()).unwrap();
        let trusted: Vec<String> = trusted.iter().map(|s| s.to_string()).collect();
        Route::new(
            &received(&m),
            sent_ms,
            &auth_results(&m, raw.as_bytes()),
            &trusted,
        )
    }

    /// 2026-12-02 15:00:00 UTC.
    const T0: u64 = 1_796_223_600_000;

    #[test]
    fn ar_header_parses_methods_results_and_drops_comments() {
        let ar = parse_auth_results(
            " mx.example.test (Postfix; comment; with ; inside) 1;\r\n\tdkim=pass (2048-bit key; unprotected) header.d=example.test header.i=@example.test header.b=\"abc;def\";\r\n\tspf=softfail (domain of x designates nothing) smtp.mailfrom=a@b; dmarc=FAIL (p=none dis=none) header.from=example.test; x-foo=pass; arc=none",
        )
        .unwrap();
        assert_eq!(ar.authserv_id, "mx.example.test");
        let got: Vec<(AuthMethod, AuthResult)> =
            ar.verdicts.iter().map(|v| (v.method, v.result)).collect();
        assert_eq!(
            got,
            vec![
                (AuthMethod::Dkim, AuthResult::Pass),
                (AuthMethod::Spf, AuthResult::Softfail),
                (AuthMethod::Dmarc, AuthResult::Fail),
                (AuthMethod::Arc, AuthResult::None),
            ]
        );
        let none = parse_auth_results("mx.example.test; none").unwrap();
        assert!(none.verdicts.is_empty());
        assert_eq!(
            parse_auth_results("mx; dkim=weird").unwrap().verdicts[0].result,
            AuthResult::Other
        );
        assert!(parse_auth_results("").is_none());
        assert!(parse_auth_results("   ;dkim=pass").is_none());
        assert!(parse_auth_results("dkim=pass").is_none());
    }

    #[test]
    fn only_trusted_authserv_ids_count_and_a_pass_among_several_signatures_wins() {
        let raw = "Authentication-Results: evil.example; dkim=pass; spf=pass; dmarc=pass\r\n\
Authentication-Results: MX.example.test; dkim=fail header.d=other.test; dkim=pass header.d=example.test; spf=fail\r\n\
Authentication-Results: mx.example.test; dmarc=pass\r\n\
From: a@example.test\r\nSubject: x\r\n\r\nbody\r\n";
        let r = route_of(raw, T0, &["mx.example.test"]);
        assert_eq!(r.untrusted_auth, 1);
        assert_eq!(r.verdict(AuthMethod::Dkim), AuthResult::Pass);
        assert_eq!(r.verdict(AuthMethod::Spf), AuthResult::Fail);
        assert_eq!(r.verdict(AuthMethod::Dmarc), AuthResult::Pass);
        assert_eq!(r.verdict(AuthMethod::Arc), AuthResult::None);
        // Nothing trusted: every verdict is none, the attacker's header ignored.
        let r = route_of(raw, T0, &[]);
        assert_eq!(r.untrusted_auth, 3);
        assert!(r.auth.is_empty());
        assert_eq!(
            r.fault(false, &[AuthMethod::Dkim]).map(|(r, _)| r),
            Some(super::super::life::Reason::AuthResult)
        );
    }

    /// The chain of a canary submitted on 587 (STARTTLS) to Postfix 3.7 and delivered over
    /// LMTP to Dovecot 2.3.19, as the realmail harness stores it.
    const POSTFIX_DOVECOT: &str = "Return-Path: <canary@example.test>\r\n\
Delivered-To: box@example.test\r\n\
Received: from mx.example.test\r\n\
\tby host.example.test with LMTP\r\n\
\tid 8G7hN8kLL2lVDgAAk4ZQSg\r\n\
\t(envelope-from <canary@example.test>)\r\n\
\tfor <box@example.test>; Wed, 02 Dec 2026 15:00:03 +0000\r\n\
Received: from [127.0.0.1] (localhost [127.0.0.1])\r\n\
\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)\r\n\
\t key-exchange X25519 server-signature RSA-PSS (2048 bits) server-digest SHA256)\r\n\
\t(No client certificate requested)\r\n\
\tby mx.example.test (Postfix) with ESMTPSA id 4dLx2W1B3Kz9sQ\r\n\
\tfor <box@example.test>; Wed,  2 Dec 2026 15:00:01 +0000 (UTC)\r\n\
From: canary@example.test\r\nTo: box@example.test\r\nSubject: x\r\n\r\nbody\r\n";

    #[test]
    fn a_postfix_dovecot_chain_is_two_hops_first_to_last() {
        let r = route_of(POSTFIX_DOVECOT, T0 + 400, &[]);
        assert_eq!(r.hops.len(), 2);
        let first = &r.hops[0];
        assert_eq!(first.by.as_deref(), Some("mx.example.test"));
        assert_eq!(first.protocol.as_deref(), Some("ESMTPSA"));
        assert_eq!(first.tls.as_deref(), Some("TLSv1.3"));
        assert_eq!(first.cipher.as_deref(), Some("TLS_AES_256_GCM_SHA384"));
        assert_eq!(first.delay_ms, Some(1000), "from the send second");
        assert!(!first.plaintext);
        let last = &r.hops[1];
        assert_eq!(last.protocol.as_deref(), Some("LMTP"));
        assert_eq!(last.delay_ms, Some(2000));
        assert_eq!(last.skew_ms, 0);
        assert!(
            !last.plaintext,
            "LMTP to the mailbox server is local delivery"
        );
        assert!(r.all_tls());
        assert_eq!(r.fault(true, &[]), None);
    }

    /// Verbatim from Postfix 3.7.11 and Dovecot 2.3.19 in the realmail harness, Postfix at its
    /// default `smtpd_tls_received_header = no`: no TLS version is written, and the `S` of
    /// `ESMTPSA` (RFC 3848) is all that says the hop was TLS.
    #[test]
    fn postfix_without_smtpd_tls_received_header_says_tls_only_by_the_s_of_esmtpsa() {
        let raw = "Received: from mail.example.test\r\n\
\tby vm with LMTP\r\n\
\tid ILDcJd5EEGtIUwAAg+zDdQ\r\n\
\t(envelope-from <tlsbox@example.test>)\r\n\
\tfor <tlsbox@example.test>; Wed, 02 Dec 2026 16:18:38 +0000\r\n\
Received: from prober.test (localhost [127.0.0.1])\r\n\
\tby mail.example.test (Postfix) with ESMTPSA id 89F4DA14346\r\n\
\tfor <tlsbox@example.test>; Wed,  2 Dec 2026 16:18:38 +0000 (UTC)\r\n\
From: tlsbox@example.test\r\nSubject: x\r\n\r\nbody\r\n";
        let r = route_of(raw, 1_796_228_318_401, &[]);
        let got: Vec<String> = r
            .hops
            .iter()
            .map(|h| {
                format!(
                    "from {:?} by {:?} with {:?} delay {:?} plaintext {}",
                    h.from, h.by, h.protocol, h.delay_ms, h.plaintext
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                "from Some(\"prober.test\") by Some(\"mail.example.test\") with Some(\"ESMTPSA\") delay Some(0) plaintext false",
                "from Some(\"mail.example.test\") by Some(\"vm\") with Some(\"LMTP\") delay Some(0) plaintext false",
            ]
        );
        assert!(r.hops.iter().all(|h| h.tls.is_none() && h.skew_ms == 0));
        assert!(r.all_tls());
    }

    /// Verbatim (but for the DKIM-Signature) from the realmail mail-auth path: Postfix with
    /// opendkim signing, the MX with policyd-spf, opendkim and opendmarc (three
    /// `Authentication-Results` headers, `dkim-atps` among them), LMTPS to Dovecot.
    #[test]
    fn the_checking_mx_chain_is_three_tls_hops_and_its_verdicts_pass() {
        let raw = "Return-Path: <canary@example.test>\r\n\
Delivered-To: inbox@example.test\r\n\
Received: from mx.example.test ([127.0.0.1])\r\n\
\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))\r\n\
\tby imap.example.test with LMTPS\r\n\
\tid kHHfGXtAEGvJTgAAg+zDdQ\r\n\
\t(envelope-from <canary@example.test>)\r\n\
\tfor <inbox@example.test>; Wed, 02 Dec 2026 15:59:55 +0000\r\n\
Authentication-Results: mx.example.test; dmarc=pass (p=reject dis=none) header.from=example.test\r\n\
Authentication-Results: mx.example.test;\r\n\
\tdkim=pass (2048-bit key; unprotected) header.d=example.test header.i=@example.test header.a=rsa-sha256 header.s=mc header.b=Bw8oPwyY;\r\n\
\tdkim-atps=neutral\r\n\
Authentication-Results: mx.example.test; spf=pass (sender SPF authorized) smtp.mailfrom=example.test (client-ip=127.0.0.1; helo=out.example.test; envelope-from=canary@example.test; receiver=example.test)\r\n\
Received: from out.example.test (localhost [127.0.0.1])\r\n\
\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)\r\n\
\t key-exchange X25519 server-signature ECDSA (prime256v1) server-digest SHA256)\r\n\
\t(No client certificate requested)\r\n\
\tby mx.example.test (Postfix) with ESMTPS id 5FA32A14264\r\n\
\tfor <inbox@example.test>; Wed,  2 Dec 2026 15:59:55 +0000 (UTC)\r\n\
Received: from prober.test (localhost [127.0.0.1])\r\n\
\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)\r\n\
\t key-exchange X25519 server-signature ECDSA (prime256v1) server-digest SHA256)\r\n\
\t(No client certificate requested)\r\n\
\tby out.example.test (Postfix) with ESMTPSA id 0C3EBA1425D\r\n\
\tfor <inbox@example.test>; Wed,  2 Dec 2026 15:59:55 +0000 (UTC)\r\n\
From: canary@example.test\r\nTo: inbox@example.test\r\nSubject: pass\r\n\
Date: Wed, 02 Dec 2026 15:59:54 +0000\r\n\r\nbody\r\n";
        let r = route_of(raw, 1_796_227_194_700, &["mx.example.test"]);
        let by: Vec<(&str, &str)> = r
            .hops
            .iter()
            .map(|h| (h.by.as_deref().unwrap(), h.protocol.as_deref().unwrap()))
            .collect();
        assert_eq!(
            by,
            [
                ("out.example.test", "ESMTPSA"),
                ("mx.example.test", "ESMTPS"),
                ("imap.example.test", "LMTPS")
            ]
        );
        assert!(r.hops.iter().all(|h| h.tls.as_deref() == Some("TLSv1.3")));
        assert_eq!(r.hops[0].delay_ms, Some(1000));
        assert_eq!(r.untrusted_auth, 0);
        for m in [AuthMethod::Dkim, AuthMethod::Spf, AuthMethod::Dmarc] {
            assert_eq!(r.verdict(m), AuthResult::Pass, "{m:?}");
        }
        assert_eq!(r.verdict(AuthMethod::Arc), AuthResult::None);
        assert_eq!(
            r.fault(
                true,
                &[AuthMethod::Dkim, AuthMethod::Spf, AuthMethod::Dmarc]
            ),
            None
        );
        // The drills' texts.
        let drill = |ar: &str| parse_auth_results(ar).unwrap().verdicts[0].result;
        assert_eq!(
            drill(
                "mx.example.test; dkim=fail reason=\"signature verification failed\" (2048-bit key; unprotected) header.d=example.test"
            ),
            AuthResult::Fail
        );
        assert_eq!(
            drill("mx.example.test; spf=none (no SPF record) smtp.mailfrom=example.test"),
            AuthResult::None
        );
        assert_eq!(
            drill(
                "mx.example.test; spf=fail (SPF fail - not authorized) smtp.mailfrom=example.test"
            ),
            AuthResult::Fail
        );
    }

    #[test]
    fn a_plaintext_smtp_hop_is_plaintext_and_fails_require_tls() {
        let raw = "Received: from relay.example.test (relay [127.0.0.2])\r\n\
\tby mx.example.test (Postfix) with ESMTP id AAA\r\n\
\tfor <box@example.test>; Wed, 02 Dec 2026 15:00:02 +0000\r\n\
Received: from [127.0.0.1] by relay.example.test (Postfix) with ESMTPS id BBB; Wed, 02 Dec 2026 15:00:01 +0000\r\n\
From: a@example.test\r\nSubject: x\r\n\r\nbody\r\n";
        let r = route_of(raw, T0, &[]);
        assert!(!r.hops[0].plaintext);
        assert!(r.hops[1].plaintext);
        assert!(!r.all_tls());
        let (reason, detail) = r.fault(true, &[]).unwrap();
        assert_eq!(reason, super::super::life::Reason::Tls);
        assert!(detail.contains("hop 2"), "{detail}");
        assert_eq!(r.fault(false, &[]), None);
    }

    #[test]
    fn clock_skew_is_shown_and_the_delay_clamped_at_zero() {
        // The second hop's clock is 5 s behind the first's.
        let raw = "Received: by b.example.test with ESMTPS; Wed, 02 Dec 2026 14:59:57 +0000\r\n\
Received: by a.example.test with ESMTPS; Wed, 02 Dec 2026 15:00:02 +0000\r\n\
From: a@example.test\r\nSubject: x\r\n\r\nbody\r\n";
        let r = route_of(raw, T0 + 999, &[]);
        assert_eq!(r.hops[0].delay_ms, Some(2000));
        assert_eq!(r.hops[1].delay_ms, Some(0));
        assert_eq!(r.hops[1].skew_ms, 5000);
        // A first hop dated before the send second is skew too.
        let r = route_of(raw, T0 + 10_000, &[]);
        assert_eq!(r.hops[0].delay_ms, Some(0));
        assert_eq!(r.hops[0].skew_ms, 8000);
    }

    #[test]
    fn missing_dates_and_garbage_leave_holes_not_panics() {
        let raw = "Received: by c.example.test with ESMTPS; Wed, 02 Dec 2026 15:00:04 +0000\r\n\
Received: this is not a received header at all ;;; ((\r\n\
Received: by a.example.test with ESMTPS\r\n\
Received: \r\n\
From: a@example.test\r\nSubject: x\r\n\r\nbody\r\n";
        let r = route_of(raw, T0, &[]);
        assert_eq!(r.hops.len(), 4);
        assert_eq!(r.hops[0].delay_ms, None);
        assert_eq!(r.hops[1].delay_ms, None);
        assert_eq!(r.hops[1].by.as_deref(), Some("a.example.test"));
        assert_eq!(r.hops[2].delay_ms, None);
        // Measured from the send time, the last date known.
        assert_eq!(r.hops[3].delay_ms, Some(4000));
        assert!(r.all_tls());
    }

    #[test]
    fn a_flood_of_received_headers_is_capped() {
        let mut raw = String::new();
        for _ in 0..500 {
            raw.push_str(
                "Received: by x.example.test with SMTP; Wed, 02 Dec 2026 15:00:04 +0000\r\n",
            );
        }
        raw.push_str("From: a@example.test\r\n\r\nbody\r\n");
        let r = route_of(&raw, T0, &[]);
        assert_eq!(r.hops.len(), MAX_HOPS);
    }

    /// What `fuzz/fuzz_targets/route.rs` does, on its seed (so the target's calls stay true
    /// without a nightly build).
    #[test]
    fn the_fuzz_targets_seed_reads_and_judges() {
        let raw = include_bytes!("../../fuzz/seeds/route/postfix_dovecot.eml");
        let (hops, ars) = read(raw).unwrap();
        let rules = RouteRules {
            require_tls_hops: true,
            require_auth: AuthMethod::ALL.to_vec(),
            trusted_authserv_ids: vec!["mx.example.test".into()],
            require_verified: Vec::new(),
        };
        let (route, fault) = rules.judge(&hops, T0, &ars, &[]);
        assert_eq!(route.hops.len(), 2);
        assert_eq!(route.hops[0].tls.as_deref(), Some("TLSv1.3"));
        assert_eq!(route.verdict(AuthMethod::Dkim), AuthResult::Pass);
        assert_eq!(route.verdict(AuthMethod::Spf), AuthResult::Softfail);
        let (reason, detail) = fault.unwrap();
        assert_eq!(reason, super::super::life::Reason::AuthResult);
        assert_eq!(
            detail,
            "required authentication not passed: spf=softfail, dmarc=fail, arc=none"
        );
        assert!(parse_auth_results(&String::from_utf8_lossy(raw)).is_some());
    }

    /// `require_verified` judges the prober's own verdicts, after the receiver's rules: a
    /// missing verdict is `none`, anything but `pass` fails with `auth_result`.
    #[test]
    fn required_verification_fails_on_anything_but_pass() {
        let rules = RouteRules {
            require_verified: vec![AuthMethod::Dkim, AuthMethod::Arc],
            ..RouteRules::default()
        };
        let v = |method, result| Verdict { method, result };
        let pass = [
            v(AuthMethod::Dkim, AuthResult::Pass),
            v(AuthMethod::Arc, AuthResult::Pass),
        ];
        let (route, fault) = rules.judge(&[], T0, &[], &pass);
        assert_eq!(fault, None);
        assert_eq!(route.verified, pass);
        let (_, fault) = rules.judge(&[], T0, &[], &[v(AuthMethod::Dkim, AuthResult::Fail)]);
        let (reason, detail) = fault.unwrap();
        assert_eq!(reason, super::super::life::Reason::AuthResult);
        assert_eq!(
            detail,
            "required verification (the prober's own) not passed: dkim=fail, arc=none"
        );
    }

    #[test]
    fn results_outside_rfc8601_are_other() {
        assert_eq!(AuthResult::parse("PASS"), AuthResult::Pass);
        assert_eq!(AuthResult::parse("hardfail"), AuthResult::Fail);
        assert_eq!(AuthResult::parse("x"), AuthResult::Other);
        assert_eq!(AuthResult::parse(""), AuthResult::Other);
    }
}
