//! Building a canary: the email a prober submits, and the agent reply it posts.
//!
//! The canary looks like ordinary mail from a customer, so the pipeline under test treats it as
//! it treats real mail. It carries its token three times (Subject, body, `X-Mailcanary-Token`)
//! because each system on the way keeps a different part: helpdesks keep subject and body and
//! drop unknown headers, a mail loop keeps everything, some rewrite the subject.
//!
//! Deliberately absent: `Auto-Submitted: auto-generated` (RFC 3834) and `Precedence: bulk`.
//! Helpdesks drop or silence such mail (no ticket, no auto-reply), which would make the canary
//! measure a path real customers never take.

use std::time::SystemTime;

use lettre::Message;
use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailbox, SinglePart};

use super::token::Token;

/// Header carrying the token, for mail-loop probes and for searching a mailbox by header.
pub const TOKEN_HEADER: &str = "X-Mailcanary-Token";
/// Header carrying the probe name, for people reading a mailbox; never trusted (the MAC is).
pub const PROBE_HEADER: &str = "X-Mailcanary-Probe";
/// Start of every canary subject.
pub const SUBJECT_TAG: &str = "[mailcanary]";
/// Message-ID domain used when the configured hostname has nothing usable in it.
const FALLBACK_HOST: &str = "mailcanary.invalid";

/// Everything that goes into one canary email.
#[derive(Debug, Clone)]
pub struct CanaryMail {
    pub probe: String,
    pub token: Token,
    pub from: Mailbox,
    pub to: Mailbox,
    pub sent_at: SystemTime,
    /// The right-hand side of the Message-ID: the prober's host name or the sender's domain.
    pub hostname: String,
}

impl CanaryMail {
    /// The canary as lettre sends it.
    pub fn build(&self) -> Message {
        let token = self.token.as_str();
        Message::builder()
            .from(self.from.clone())
            .to(self.to.clone())
            .date(self.sent_at)
            .message_id(Some(format!(
                "<{}>",
                message_id(&self.token, &self.hostname)
            )))
            .subject(subject(&self.probe, &self.token))
            .raw_header(HeaderValue::new(
                HeaderName::new_from_ascii_str(TOKEN_HEADER),
                token.to_owned(),
            ))
            .raw_header(HeaderValue::new(
                HeaderName::new_from_ascii_str(PROBE_HEADER),
                self.probe.clone(),
            ))
            .singlepart(SinglePart::plain(canary_body(&self.token)))
            // The only build errors are a missing From or To and more than one From without a
            // Sender; From and To are single mailboxes set just above.
            .expect("a canary has exactly one From and one To")
    }
}

/// `[mailcanary] <probe> <token>`: the probe name tells a human whose canary it is, the token
/// matches it.
pub fn subject(probe: &str, token: &Token) -> String {
    format!("{SUBJECT_TAG} {probe} {token}")
}

/// The canary's Message-ID without angle brackets: `<token>@<hostname>`.
///
/// Characters that may not appear in a Message-ID's domain are dropped from `hostname`, so a
/// host name from the environment cannot break the header.
pub fn message_id(token: &Token, hostname: &str) -> String {
    let host: String = hostname
        .trim()
        .trim_matches('.')
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
        .collect::<String>()
        .to_ascii_lowercase();
    let host = if host.is_empty() {
        FALLBACK_HOST
    } else {
        &host
    };
    format!("{token}@{host}")
}

/// The canary's text body: what it is, for whoever sees it, and the token on its own line.
pub fn canary_body(token: &Token) -> String {
    // Lines stay under 76 characters so lettre picks 7bit: quoted-printable would let a
    // relay's re-wrapping or a naive IMAP SEARCH BODY split or miss the token.
    format!(
        "This is a synthetic canary sent by mailcanary to measure the mail\n\
         pipeline; it is deleted automatically. No action is needed.\n\
         \n\
         {token}\n"
    )
}

/// The agent reply the prober posts through a helpdesk API; the token on its own line is what
/// recognises the reply when it reaches the mailbox (the helpdesk may change the subject).
pub fn reply_body(token: &Token, mark: &str) -> String {
    custom_reply_body(
        "Automated reply from mailcanary, measuring reply delivery. No action is needed.",
        token,
        mark,
    )
}

/// The agent reply with an operator's text (`reply_body` in the config). The token and the
/// reply mark ([`crate::canary::Key::reply_mark`]) are always appended, each on its own line:
/// the reply is recognised by the token and told from an acknowledgement by the mark,
/// whatever the text says.
pub fn custom_reply_body(text: &str, token: &Token, mark: &str) -> String {
    format!("{}\n\n{token}\n{mark}\n", text.trim_end())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canary::token::{Key, find_tokens};
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn a_custom_reply_body_keeps_the_token_on_its_own_line() {
        let key = Key::from_secret("k");
        let token = Token::issue(&key, "p", UNIX_EPOCH + Duration::from_secs(1_800_000_000));
        let mark = key.reply_mark(&token);
        let body = custom_reply_body("Thanks, we are on it.\n\n", &token, &mark);
        assert!(body.starts_with("Thanks, we are on it.\n\n"));
        assert!(body.lines().any(|l| l == token.as_str()));
        assert!(body.lines().any(|l| l == mark));
        assert_eq!(
            crate::canary::token::find_reply_marks(&body),
            vec![mark.as_str()]
        );
        assert_eq!(find_tokens(&body), vec![token.as_str()]);
    }

    fn mail(hostname: &str) -> CanaryMail {
        let key = Key::generate();
        let sent_at = UNIX_EPOCH + Duration::from_secs(1_767_225_600);
        CanaryMail {
            probe: "sandbox".into(),
            token: Token::issue(&key, "sandbox", sent_at),
            from: "Canary <canary@prober.test>".parse().unwrap(),
            to: "support@helpdesk.test".parse().unwrap(),
            sent_at,
            hostname: hostname.into(),
        }
    }

    #[test]
    fn built_canary_has_the_headers_of_real_mail() {
        let m = mail("prober.test");
        let raw = String::from_utf8(m.build().formatted()).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        // lettre folds long headers (the subject, with a long probe name); readers unfold.
        let head = head.replace("\r\n ", " ");
        let token = m.token.as_str();
        for want in [
            "From: Canary <canary@prober.test>\r\n".to_owned(),
            "To: support@helpdesk.test\r\n".to_owned(),
            "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n".to_owned(),
            format!("Message-ID: <{token}@prober.test>\r\n"),
            format!("Subject: [mailcanary] sandbox {token}\r\n"),
            format!("X-Mailcanary-Token: {token}\r\n"),
            "X-Mailcanary-Probe: sandbox\r\n".to_owned(),
            "MIME-Version: 1.0\r\n".to_owned(),
            "Content-Type: text/plain; charset=utf-8\r\n".to_owned(),
            "Content-Transfer-Encoding: 7bit\r\n".to_owned(),
        ] {
            assert!(
                format!("{head}\r\n").contains(&want),
                "{want:?} not in\n{head}"
            );
        }
        assert!(!head.to_ascii_lowercase().contains("auto-submitted"));
        assert!(body.contains("synthetic canary sent by mailcanary"));
        assert!(body.lines().any(|l| l.trim_end() == token), "{body}");
    }

    #[test]
    fn message_id_sanitises_the_hostname() {
        let m = mail("");
        let token = m.token.as_str();
        assert_eq!(
            message_id(&m.token, "Prober.Test."),
            format!("{token}@prober.test")
        );
        assert_eq!(message_id(&m.token, " a b>c\r\n"), format!("{token}@abc"));
        assert_eq!(
            message_id(&m.token, "<>"),
            format!("{token}@mailcanary.invalid")
        );
        let raw = String::from_utf8(m.build().formatted()).unwrap();
        assert!(raw.contains(&format!("Message-ID: <{token}@mailcanary.invalid>\r\n")));
    }

    #[test]
    fn reply_body_has_the_token_on_its_own_line() {
        let m = mail("prober.test");
        let body = reply_body(&m.token, "mcreply-aaaaaaaaaaaaaaaa");
        assert!(body.lines().any(|l| l == m.token.as_str()));
        assert!(body.lines().any(|l| l == "mcreply-aaaaaaaaaaaaaaaa"));
        assert_eq!(find_tokens(&body), vec![m.token.as_str()]);
    }

    #[test]
    fn probe_names_outside_ascii_are_encoded_not_broken() {
        let mut m = mail("prober.test");
        m.probe = "hélpdesk ünïcode".into();
        let raw = String::from_utf8(m.build().formatted()).unwrap();
        assert!(raw.is_ascii());
        // The token still stands alone in the subject, outside any encoded word.
        assert_eq!(find_tokens(&raw).len(), 4, "{raw}");
    }
}
