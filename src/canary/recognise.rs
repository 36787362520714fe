//! Recognising a message that arrived in a watched mailbox (the delivery stage).
//!
//! Two steps, so the cheap one can run on every message and the keyed one only on candidates:
//!
//! 1. [`inspect`] parses the raw bytes and looks for token-shaped strings in the Subject, the
//!    `X-Mailcanary-Token` header and the text body. Nothing else of the message matters: a
//!    Subject like `Re: [mailcanary] …` without a token is ordinary mail, never a match.
//! 2. [`classify`] checks the candidate's tokens against the key and the probe names: authentic
//!    tokens make a canary, anything else token-shaped is a forgery to count and ignore.
//!
//! Threading headers (`In-Reply-To`, `References`) are kept as a signal
//! ([`Candidate::threaded_to`]), not as a way to match: helpdesks often rewrite or drop them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mail_parser::{HeaderValue, MessageParser};

use super::message::{PROBE_HEADER, SUBJECT_TAG, TOKEN_HEADER};
use super::token::{Key, Token, find_tokens};

/// What a raw message is, before any key is involved.
// One per arrived message, matched on at once: boxing the candidate would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inspected {
    /// Not a message: it does not parse or has no header block. The reason is a fixed phrase,
    /// fit for a log line (the metric reason is just `malformed`).
    Malformed(&'static str),
    /// A message without any token-shaped string: not ours, leave it alone.
    Ordinary,
    /// A message with token-shaped strings, to be checked by [`classify`].
    Candidate(Candidate),
}

/// A message that carries at least one token-shaped string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Never empty; deduplicated, in order of Subject, `X-Mailcanary-Token`, body.
    pub tokens: Vec<Token>,
    /// Without angle brackets.
    pub message_id: Option<String>,
    /// Message-IDs without angle brackets.
    pub in_reply_to: Vec<String>,
    /// Message-IDs without angle brackets.
    pub references: Vec<String>,
    /// Decoded.
    pub subject: Option<String>,
    /// The `Date` header: the sender's clock, not the arrival time.
    pub date: Option<SystemTime>,
    /// The probe names the message claims to belong to: `X-Mailcanary-Probe`, and the word
    /// after `[mailcanary]` in the Subject (which survives a helpdesk's `Re:`).
    pub claimed_probes: Vec<String>,
    /// Reply-mark-shaped strings of the text body ([`Key::reply_mark`]): the agent reply the
    /// prober posted carries its canary's; an acknowledgement cannot.
    pub reply_marks: Vec<String>,
    /// The `Received` headers, top-most first, undated by the send time yet
    /// ([`super::hops::Route::new`] orders them and measures the delays).
    pub received: Vec<super::hops::Hop>,
    /// The `Authentication-Results` headers, top-most first, trusted or not (the probe's
    /// `trusted_authserv_ids` decide in [`super::hops::Route::new`]).
    pub auth_results: Vec<super::hops::AuthHeader>,
}

impl Candidate {
    /// Whether `In-Reply-To` or `References` names `canary_message_id` (with or without angle
    /// brackets). The local part is compared exactly, the domain without regard to case.
    pub fn threaded_to(&self, canary_message_id: &str) -> bool {
        let want = strip_brackets(canary_message_id);
        self.in_reply_to
            .iter()
            .chain(&self.references)
            .any(|id| same_message_id(strip_brackets(id), want))
    }
}

/// What a candidate turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Classified {
    /// A token that verifies for `probe` (the first token and probe that do, in order).
    /// `marked`: the message also carries the token's reply mark, so it is the agent reply
    /// the prober posted, not an acknowledgement or another mail quoting the canary.
    Canary {
        probe: String,
        token: Token,
        marked: bool,
    },
    /// Claims to be a canary of one of our probes (or claims no probe at all) but no token
    /// verifies: an old key, or someone imitating canaries. Counted, never touched.
    Forged { token: Token },
    /// A canary of a probe this prober does not run (another prober sharing the mailbox, a
    /// sibling shard): not ours to judge. Counted as unknown, never touched.
    Foreign { token: Token },
}

/// Parses `raw` and looks for tokens in the places a canary or its reply carries them.
///
/// Never panics, whatever the bytes: a panic inside the parser is caught and the message is
/// `Malformed`. mail-parser 0.11.9 has one the fuzzer found at once: a `multipart/report` whose
/// nested parts end early trips its `debug_assert!` "Invalid part ID, could not find
/// multipart" (debug builds only; a release build parses on). Anyone can mail the watched
/// mailbox, so no third-party parser's panic may end the dispatcher that calls this.
pub fn inspect(raw: &[u8]) -> Inspected {
    std::panic::catch_unwind(|| inspect_unguarded(raw))
        .unwrap_or(Inspected::Malformed("the message parser panicked on it"))
}

fn inspect_unguarded(raw: &[u8]) -> Inspected {
    let Some(message) = MessageParser::default().parse(raw) else {
        return Inspected::Malformed("not parseable as a message");
    };
    // mail-parser reads almost anything as "a message with a body"; a header block worth the
    // name has at least one field that it knows (From, Date, Subject, Received, …). RFC 5322
    // requires From and Date, but a lenient check keeps odd-but-real mail recognisable.
    if !message.headers().iter().any(|h| !h.name.is_other()) {
        return Inspected::Malformed("no header block");
    }

    let subject = message.subject().map(str::to_owned);
    let mut tokens: Vec<Token> = Vec::new();
    let mut add = |text: &str| {
        for found in find_tokens(text) {
            if tokens.iter().all(|t| t.as_str() != found)
                && let Ok(token) = Token::parse(found)
            {
                tokens.push(token);
            }
        }
    };
    if let Some(subject) = &subject {
        add(subject);
    }
    for value in message.header_values(TOKEN_HEADER) {
        for text in header_texts(value) {
            add(text);
        }
    }
    let mut reply_marks: Vec<String> = Vec::new();
    for i in 0..message.text_body_count() {
        if let Some(body) = message.body_text(i) {
            add(&body);
            for mark in super::token::find_reply_marks(&body) {
                if !reply_marks.iter().any(|m| m == mark) {
                    reply_marks.push(mark.to_string());
                }
            }
        }
    }
    if tokens.is_empty() {
        return Inspected::Ordinary;
    }

    let ids = |name| {
        message
            .header_values(name)
            .flat_map(header_texts)
            .map(|id| strip_brackets(id).to_owned())
            .filter(|id| !id.is_empty())
            .collect::<Vec<_>>()
    };
    let mut claimed_probes: Vec<String> = Vec::new();
    let mut claim = |name: &str| {
        let name = name.trim();
        if !name.is_empty() && !claimed_probes.iter().any(|c| c == name) {
            claimed_probes.push(name.to_owned());
        }
    };
    for value in message.header_values(PROBE_HEADER) {
        for text in header_texts(value) {
            claim(text);
        }
    }
    if let Some(rest) = subject
        .as_deref()
        .and_then(|s| s.split_once(SUBJECT_TAG))
        .map(|(_, rest)| rest)
        && let Some(name) = rest.split_whitespace().next()
    {
        claim(name);
    }
    Inspected::Candidate(Candidate {
        tokens,
        claimed_probes,
        message_id: message.message_id().map(|id| strip_brackets(id).to_owned()),
        in_reply_to: ids("In-Reply-To"),
        references: ids("References"),
        subject,
        date: message.date().map(|d| unix_seconds(d.to_timestamp())),
        reply_marks,
        received: super::hops::received(&message),
        auth_results: super::hops::auth_results(&message, raw),
    })
}

/// Which probe, if any, the candidate's tokens belong to.
///
/// Tries every token against every probe; the first (token, probe) pair that verifies wins.
pub fn classify(candidate: &Candidate, key: &Key, probes: &[&str]) -> Classified {
    for token in &candidate.tokens {
        if let Some(probe) = probes.iter().find(|p| token.verify(key, p)) {
            let mark = key.reply_mark(token);
            return Classified::Canary {
                probe: (*probe).to_owned(),
                token: token.clone(),
                marked: candidate.reply_marks.contains(&mark),
            };
        }
    }
    let token = candidate.tokens[0].clone();
    // Forged only if it claims to be ours (or claims nothing we can read): a canary that names
    // a probe we do not run is another prober's, and counting it as forged would page someone
    // for a neighbour's legitimate mail.
    let claims_ours = candidate.claimed_probes.is_empty()
        || candidate
            .claimed_probes
            .iter()
            .any(|c| probes.contains(&c.as_str()));
    if claims_ours {
        Classified::Forged { token }
    } else {
        Classified::Foreign { token }
    }
}

/// The texts in a parsed header: one for unstructured headers, several for id lists.
fn header_texts<'a>(value: &'a HeaderValue<'_>) -> Vec<&'a str> {
    match value {
        HeaderValue::Text(text) => vec![text.as_ref()],
        HeaderValue::TextList(list) => list.iter().map(|t| t.as_ref()).collect(),
        _ => Vec::new(),
    }
}

fn strip_brackets(id: &str) -> &str {
    let id = id.trim();
    id.strip_prefix('<')
        .and_then(|id| id.strip_suffix('>'))
        .unwrap_or(id)
}

fn same_message_id(a: &str, b: &str) -> bool {
    match (a.rsplit_once('@'), b.rsplit_once('@')) {
        (Some((a_local, a_domain)), Some((b_local, b_domain))) => {
            a_local == b_local && a_domain.eq_ignore_ascii_case(b_domain)
        }
        _ => a == b,
    }
}

fn unix_seconds(seconds: i64) -> SystemTime {
    let magnitude = Duration::from_secs(seconds.unsigned_abs());
    if seconds >= 0 {
        UNIX_EPOCH.checked_add(magnitude).unwrap_or(UNIX_EPOCH)
    } else {
        UNIX_EPOCH.checked_sub(magnitude).unwrap_or(UNIX_EPOCH)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canary::message::{self, CanaryMail};

    fn candidate_of(raw: &str) -> Candidate {
        match inspect(raw.as_bytes()) {
            Inspected::Candidate(c) => c,
            other => panic!("not a candidate: {other:?}"),
        }
    }

    /// Found by the fuzzer (`fuzz/run.sh`, target `recognise`) in its first 30 s: a bounce
    /// (`multipart/report`) whose nested `message/rfc822` parts end early. mail-parser 0.11.9
    /// panics on it in a debug build (its `debug_assert!` "Invalid part ID, could not find
    /// multipart"); whatever the build, `inspect` answers and the message is not a canary.
    #[test]
    fn a_bounce_whose_parts_mail_parser_loses_is_no_panic() {
        let raw = include_bytes!("testdata/mail_parser_lost_multipart.eml");
        match inspect(raw) {
            Inspected::Malformed(_) | Inspected::Ordinary => {}
            Inspected::Candidate(c) => {
                let key = Key::from_secret("fuzz");
                assert!(
                    !matches!(classify(&c, &key, &["drill"]), Classified::Canary { .. }),
                    "{c:?}"
                );
            }
        }
    }

    #[test]
    fn another_probers_canary_is_foreign_not_forged() {
        let theirs = Key::from_secret("their secret");
        let ours = Key::from_secret("our secret");
        let t = Token::issue(
            &theirs,
            "their-probe",
            UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        );
        // A helpdesk reply to their canary: the subject still names their probe.
        let raw =
            format!("From: a@b.test\r\nSubject: Re: [mailcanary] their-probe {t}\r\n\r\n{t}\r\n");
        let c = candidate_of(&raw);
        assert_eq!(c.claimed_probes, vec!["their-probe"]);
        assert!(matches!(
            classify(&c, &ours, &["ours"]),
            Classified::Foreign { .. }
        ));
        // The same bytes claiming one of our probes are a forgery.
        let raw = raw.replace("their-probe", "ours");
        assert!(matches!(
            classify(&candidate_of(&raw), &ours, &["ours"]),
            Classified::Forged { .. }
        ));
        // No readable claim at all (token only in the body): cannot be attributed, so forged.
        let raw = format!("From: a@b.test\r\nSubject: hello\r\n\r\n{t}\r\n");
        let c = candidate_of(&raw);
        assert!(c.claimed_probes.is_empty());
        assert!(matches!(
            classify(&c, &ours, &["ours"]),
            Classified::Forged { .. }
        ));
    }

    #[test]
    fn the_probe_header_is_a_claim_too() {
        let key = Key::from_secret("k");
        let t = Token::issue(
            &Key::from_secret("other"),
            "x",
            UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        );
        let raw = format!(
            "From: a@b.test\r\nX-Mailcanary-Probe: sibling\r\nSubject: no tag\r\n\r\n{t}\r\n"
        );
        let c = candidate_of(&raw);
        assert_eq!(c.claimed_probes, vec!["sibling"]);
        assert!(matches!(
            classify(&c, &key, &["ours"]),
            Classified::Foreign { .. }
        ));
    }

    const PROBES: &[&str] = &["mail-loop", "sandbox"];

    fn canary(key: &Key, probe: &str) -> CanaryMail {
        let sent_at = UNIX_EPOCH + Duration::from_secs(1_767_225_600);
        CanaryMail {
            probe: probe.into(),
            token: Token::issue(key, probe, sent_at),
            from: "Canary <canary@prober.test>".parse().unwrap(),
            to: "support@helpdesk.test".parse().unwrap(),
            sent_at,
            hostname: "prober.test".into(),
        }
    }

    fn candidate(raw: &[u8]) -> Candidate {
        match inspect(raw) {
            Inspected::Candidate(c) => c,
            other => panic!("not a candidate: {other:?}"),
        }
    }

    /// A reply as the sandbox's and SupportBee's outbound mailer sends it.
    fn helpdesk_reply(subject: &str, in_reply_to: &str, body: &str) -> Vec<u8> {
        format!(
            "Return-Path: <support@helpdesk.test>\r\n\
             Received: from mx.helpdesk.test by imap.prober.test; Thu, 1 Jan 2026 00:00:03 +0000\r\n\
             From: Support <support@helpdesk.test>\r\n\
             To: canary@prober.test\r\n\
             Subject: {subject}\r\n\
             Date: Thu, 01 Jan 2026 00:00:02 +0000\r\n\
             Message-ID: <reply-17@helpdesk.test>\r\n\
             In-Reply-To: <{in_reply_to}>\r\n\
             References: <older@helpdesk.test>\r\n \
              <{in_reply_to}>\r\n\
             MIME-Version: 1.0\r\n\
             Content-Type: text/plain; charset=utf-8\r\n\
             Content-Transfer-Encoding: quoted-printable\r\n\
             \r\n\
             {body}"
        )
        .into_bytes()
    }

    #[test]
    fn built_canary_is_found_in_subject_header_and_body() {
        let key = Key::generate();
        let mail = canary(&key, "mail-loop");
        let raw = mail.build().formatted();
        let c = candidate(&raw);
        assert_eq!(c.tokens, vec![mail.token.clone()]);
        let id = message::message_id(&mail.token, &mail.hostname);
        assert_eq!(c.message_id.as_deref(), Some(id.as_str()));
        assert_eq!(c.subject, Some(message::subject("mail-loop", &mail.token)));
        assert_eq!(c.date, Some(mail.sent_at));
        assert!(c.in_reply_to.is_empty() && c.references.is_empty());
        assert_eq!(
            classify(&c, &key, PROBES),
            Classified::Canary {
                probe: "mail-loop".into(),
                token: mail.token.clone(),
                marked: false,
            }
        );

        // Each of the three places is enough on its own.
        let text = String::from_utf8(raw).unwrap().replace("\r\n ", " ");
        let token = mail.token.as_str();
        let hide = |text: &str, prefix: &str| {
            text.lines()
                .map(|l| {
                    let hit = if prefix.is_empty() {
                        l == token
                    } else {
                        l.starts_with(prefix)
                    };
                    if hit {
                        l.replace(token, "gone")
                    } else {
                        l.to_owned()
                    }
                })
                .collect::<Vec<_>>()
                .join("\r\n")
        };
        for keep in ["Subject:", "X-Mailcanary-Token:", ""] {
            let mut stripped = text.clone();
            for place in ["Subject:", "X-Mailcanary-Token:", ""] {
                if place != keep {
                    stripped = hide(&stripped, place);
                }
            }
            let c = candidate(stripped.as_bytes());
            assert_eq!(c.tokens, vec![mail.token.clone()], "only {keep:?} kept");
        }
    }

    #[test]
    fn helpdesk_reply_classifies_as_canary_and_is_threaded() {
        let key = Key::generate();
        let mail = canary(&key, "sandbox");
        let canary_id = message::message_id(&mail.token, &mail.hostname);
        let raw = helpdesk_reply(
            &format!("Re: {}", message::subject("sandbox", &mail.token)),
            // Some relays upper-case the domain; the local part (the token) stays as it was.
            &format!("{}@PROBER.TEST", mail.token),
            &format!(
                "{}\r\n\r\n> On Thu, 1 Jan 2026 canary@prober.test wrote:\r\n> {}\r\n",
                message::reply_body(&mail.token, &key.reply_mark(&mail.token))
                    .replace('\n', "\r\n"),
                mail.token
            ),
        );
        let c = candidate(&raw);
        assert_eq!(c.tokens, vec![mail.token.clone()]);
        assert_eq!(c.message_id.as_deref(), Some("reply-17@helpdesk.test"));
        assert!(c.threaded_to(&canary_id));
        assert!(c.threaded_to(&format!("<{canary_id}>")));
        assert!(!c.threaded_to("someone-else@prober.test"));
        assert_eq!(c.references.len(), 2, "{:?}", c.references);
        assert_eq!(
            classify(&c, &key, PROBES),
            Classified::Canary {
                probe: "sandbox".into(),
                token: mail.token.clone(),
                marked: true,
            }
        );
    }

    /// RT's AutoReply and django-helpdesk's "(Opened)" mail carry the canary's token and thread
    /// to it, before any agent replies: without the reply mark they are acknowledgements.
    #[test]
    fn an_acknowledgement_quoting_the_canary_is_not_marked_as_the_reply() {
        let key = Key::generate();
        let mail = canary(&key, "sandbox");
        let other = canary(&key, "sandbox");
        let ack = helpdesk_reply(
            &format!(
                "[helpdesk.test #17] AutoReply: {}",
                message::subject("sandbox", &mail.token)
            ),
            "support@helpdesk.test",
            &format!(
                "Greetings, we received your request.\r\n\r\n> {}\r\n",
                mail.token
            ),
        );
        let c = candidate(&ack);
        assert!(c.reply_marks.is_empty());
        assert!(matches!(
            classify(&c, &key, PROBES),
            Classified::Canary { marked: false, .. }
        ));
        // Another canary's mark (a reply quoting the wrong ticket) does not count either.
        let quoting = helpdesk_reply(
            "Re: hello",
            "support@helpdesk.test",
            &format!("{}\r\n{}\r\n", mail.token, key.reply_mark(&other.token)),
        );
        assert!(matches!(
            classify(&candidate(&quoting), &key, PROBES),
            Classified::Canary { marked: false, .. }
        ));
        // Nor does a mark made with another key.
        let foreign = Key::generate().reply_mark(&mail.token);
        let faked = helpdesk_reply(
            "Re: hello",
            "support@helpdesk.test",
            &format!("{}\r\n{foreign}\r\n", mail.token),
        );
        assert!(matches!(
            classify(&candidate(&faked), &key, PROBES),
            Classified::Canary { marked: false, .. }
        ));
    }

    #[test]
    fn reply_with_rewritten_subject_matches_by_body_and_unthreaded_is_still_a_match() {
        let key = Key::generate();
        let mail = canary(&key, "sandbox");
        let raw = helpdesk_reply(
            "RE: [Ticket #17] YOUR REQUEST",
            "unrelated@helpdesk.test",
            &message::reply_body(&mail.token, &key.reply_mark(&mail.token)),
        );
        let c = candidate(&raw);
        assert!(!c.threaded_to(&message::message_id(&mail.token, &mail.hostname)));
        assert!(matches!(
            classify(&c, &key, PROBES),
            Classified::Canary { .. }
        ));
    }

    #[test]
    fn subject_alone_without_a_token_is_ordinary() {
        let key = Key::generate();
        let mail = canary(&key, "sandbox");
        let canary_id = message::message_id(&mail.token, &mail.hostname);
        // Threaded to the canary, canary-like subject, but no token in subject or body.
        let raw = helpdesk_reply("Re: [mailcanary] sandbox", &canary_id, "Thanks!\r\n");
        assert_eq!(inspect(&raw), Inspected::Ordinary);
    }

    #[test]
    fn forged_tokens_and_foreign_canaries() {
        let key = Key::generate();
        // Issued under another key: a forgery as far as this prober can tell.
        let other = canary(&Key::generate(), "sandbox");
        let c = candidate(&other.build().formatted());
        assert_eq!(
            classify(&c, &key, PROBES),
            Classified::Forged {
                token: other.token.clone()
            }
        );
        // Our key, but a probe this prober does not run (retired, or a sibling shard's):
        // foreign, not forged.
        let foreign = canary(&key, "retired-probe");
        let c = candidate(&foreign.build().formatted());
        assert!(matches!(
            classify(&c, &key, PROBES),
            Classified::Foreign { .. }
        ));
        assert!(matches!(
            classify(&c, &key, &[]),
            Classified::Foreign { .. }
        ));
        // A forged token first and a real one later: the real one wins.
        let real = canary(&key, "sandbox");
        let raw = helpdesk_reply(
            &format!("Re: {}", other.token),
            "x@y",
            &format!("{}\r\n", real.token),
        );
        let c = candidate(&raw);
        assert_eq!(c.tokens, vec![other.token.clone(), real.token.clone()]);
        assert_eq!(
            classify(&c, &key, PROBES),
            Classified::Canary {
                probe: "sandbox".into(),
                token: real.token.clone(),
                marked: false,
            }
        );
    }

    #[test]
    fn ordinary_mail_is_ordinary() {
        let raw = b"From: Alice <alice@example.test>\r\n\
            To: canary@prober.test\r\n\
            Subject: Lunch? mc-not-a-token\r\n\
            Date: Thu, 01 Jan 2026 12:00:00 +0000\r\n\
            Message-ID: <lunch@example.test>\r\n\
            \r\n\
            See you at noon (mc-k3v7q2ab9x is not a token either).\r\n";
        assert_eq!(inspect(raw), Inspected::Ordinary);
    }

    #[test]
    fn garbage_and_empty_input_are_malformed_without_panic() {
        assert!(matches!(inspect(b""), Inspected::Malformed(_)));
        assert!(matches!(inspect(b"\r\n\r\n"), Inspected::Malformed(_)));
        assert!(matches!(
            inspect(b"just some words without any header\r\n"),
            Inspected::Malformed(_)
        ));
        // A fixed xorshift stream keeps the test deterministic (and free of a seeded-RNG feature).
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        };
        for len in [1usize, 2, 7, 64, 1000, 10_000] {
            for _ in 0..50 {
                let raw: Vec<u8> = (0..len).map(|_| next()).collect();
                assert!(matches!(inspect(&raw), Inspected::Malformed(_)), "{raw:?}");
            }
        }
    }

    #[test]
    fn hostile_structure_does_not_panic() {
        let key = Key::generate();
        let token = canary(&key, "sandbox").token;
        let cases: Vec<Vec<u8>> = vec![
            b"From:\r\n\r\n".to_vec(),
            b"Subject: =?utf-8?b?!!!?=\r\nDate: yesterday\r\n\r\n".to_vec(),
            format!("Subject: {token}\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n")
                .into_bytes(),
            format!("X-Mailcanary-Token: {token}\r\nDate: Thu, 01 Jan 1900 00:00:00 +0000\r\n\r\n")
                .into_bytes(),
            [
                b"Subject: ".as_slice(),
                &[0xff, 0xfe, 0x00],
                b"\r\n\r\n\xc3",
            ]
            .concat(),
        ];
        for raw in cases {
            let _ = inspect(&raw);
        }
        let c = candidate(
            format!("X-Mailcanary-Token: {token}\r\nDate: Mon, 01 Jan 1900 00:00:00 +0000\r\n\r\n")
                .as_bytes(),
        );
        assert!(c.date.is_some_and(|d| d < UNIX_EPOCH));
    }
}
