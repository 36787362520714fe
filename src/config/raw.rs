//! The config file as written: serde types that mirror the TOML one to one.
//!
//! Nothing here is trusted yet: durations are parsed but not range-checked, secrets are still
//! `${ENV}` templates or file paths, cross-field rules are not applied. `resolve.rs` turns a
//! [`RawFile`] into a [`super::Config`]. Every struct denies unknown keys, and every value a
//! later check may reject is [`Spanned`] so the error can point at its line.
//!
//! The document is parsed into toml's spanned tree first and each top-level section (`[prober]`,
//! each `[[probe]]`) is deserialized on its own: one broken probe stops only itself, and the
//! other probes of the file are still checked. A single `#[derive(Deserialize)]` over the whole
//! file was the simpler alternative, rejected because serde stops at the first error.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use super::error::{ConfigError, Source};
use super::{Cleanup, HelpdeskApi, OAuth2Mechanism, ProbeKind, ReplyMode, Tls};

/// One config file: an optional `[prober]` table and any number of `[[probe]]` tables.
#[derive(Debug, Default)]
pub struct RawFile {
    pub prober: Option<Spanned<RawProber>>,
    /// Each probe with its index in this file's `[[probe]]` array (for `probe[N]` key paths).
    pub probes: Vec<(usize, Spanned<RawProbe>)>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProber {
    pub listen: Option<Spanned<SocketAddr>>,
    pub state_dir: Option<Spanned<PathBuf>>,
    pub secret: Option<Spanned<String>>,
    pub secret_file: Option<Spanned<PathBuf>>,
    pub hostname: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProbe {
    pub name: Spanned<String>,
    pub kind: Spanned<ProbeKind>,
    pub interval: Option<Spanned<HumanDuration>>,
    pub jitter: Option<Spanned<HumanDuration>>,
    pub max_in_flight: Option<Spanned<u32>>,
    pub lost_after: Option<Spanned<HumanDuration>>,
    pub cleanup: Option<bool>,
    /// A dead man's switch URL (healthchecks.io style) pinged after each on-time canary.
    pub heartbeat_url: Option<Spanned<String>>,
    pub heartbeat_url_file: Option<Spanned<PathBuf>>,
    /// Extra trusted roots (PEM) for the heartbeat endpoint (a self-hosted one).
    pub heartbeat_ca_file: Option<Spanned<PathBuf>>,
    pub deadlines: Option<RawDeadlines>,
    pub smtp: Spanned<RawSmtp>,
    pub helpdesk: Option<Spanned<RawHelpdesk>>,
    /// The one watched mailbox (the original form); or several, as `[[probe.mailbox]]`.
    pub imap: Option<Spanned<RawImap>>,
    pub mailbox: Option<Spanned<Vec<Spanned<RawMailbox>>>>,
    /// A canary delivered into Junk is a success (still counted as junk placement).
    pub junk_is_ok: Option<bool>,
    /// A plaintext hop in the delivered mail's `Received` chain fails delivery (`tls`).
    pub require_tls_hops: Option<bool>,
    /// Methods (`dkim`, `spf`, `dmarc`, `arc`) whose trusted verdict must be `pass`, or
    /// delivery fails (`auth_result`).
    pub require_auth: Option<Spanned<Vec<Spanned<String>>>>,
    /// Methods (`dkim`, `arc`) whose verdict in the prober's own check (`verify_dkim`) must be
    /// `pass`, or delivery fails (`auth_result`).
    pub require_verified: Option<Spanned<Vec<Spanned<String>>>>,
    /// The authserv-ids whose `Authentication-Results` headers are believed (RFC 8601 §5:
    /// anyone on the way can add one).
    pub trusted_authserv_ids: Option<Spanned<Vec<Spanned<String>>>>,
    /// Verify the delivered canary's DKIM (and ARC) signatures here, with mail-auth.
    pub verify_dkim: Option<bool>,
    /// The DNS server for `verify_dkim` (`IP:port`); default: the system's resolver.
    pub dns_resolver: Option<Spanned<String>>,
}

/// One of a probe's mailboxes: `[[probe.mailbox]]` with its `[probe.mailbox.imap]` table
/// (the same keys as `[probe.imap]`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMailbox {
    /// The `mailbox` metric label: `[a-z0-9_-]{1,64}`, unique within the probe.
    pub name: Spanned<String>,
    /// The address this mailbox receives: a mail loop's canary is sent to it, a helpdesk
    /// probe's canary is sent from it (the requester, whom the helpdesk replies to).
    pub address: Spanned<String>,
    pub imap: Spanned<RawImap>,
}

/// `junk = "Spam"` names the Junk folder, `junk = false` watches none, `junk = true` (the
/// default) finds it by its `\Junk` SPECIAL-USE attribute.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawJunk {
    Enabled(bool),
    Named(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDeadlines {
    pub submit: Option<Spanned<RawDeadline>>,
    pub import: Option<Spanned<RawDeadline>>,
    pub reply: Option<Spanned<RawDeadline>>,
    pub delivery: Option<Spanned<RawDeadline>>,
    pub end_to_end: Option<Spanned<HumanDuration>>,
    /// Bounds of every `"auto"` deadline of the probe.
    pub auto_min: Option<Spanned<HumanDuration>>,
    pub auto_max: Option<Spanned<HumanDuration>>,
}

/// A stage deadline: a duration, or `"auto"` (learned from the recent on-time durations).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawDeadline {
    Fixed(HumanDuration),
    Auto,
}

impl<'de> Deserialize<'de> for RawDeadline {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = RawDeadline;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a duration string such as \"30s\", or \"auto\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawDeadline, E> {
                if v.trim() == "auto" {
                    return Ok(RawDeadline::Auto);
                }
                humantime::parse_duration(v)
                    .map(|d| RawDeadline::Fixed(HumanDuration(d)))
                    .map_err(|e| E::custom(format!("invalid duration {v:?} (or \"auto\"): {e}")))
            }
        }
        d.deserialize_str(Visitor)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSmtp {
    pub host: Spanned<String>,
    pub port: Option<Spanned<u16>>,
    pub tls: Option<Tls>,
    pub username: Option<Spanned<String>>,
    pub password: Option<Spanned<String>>,
    pub password_file: Option<Spanned<PathBuf>>,
    pub ca_file: Option<Spanned<PathBuf>>,
    /// Required, except for a helpdesk probe with `[[probe.mailbox]]` (each canary is sent
    /// from its mailbox's address there).
    pub from: Option<Spanned<String>>,
    /// Required, except for a mail loop with `[[probe.mailbox]]` (the mailboxes' addresses
    /// are the recipients there).
    pub to: Option<Spanned<String>>,
    pub timeout: Option<Spanned<HumanDuration>>,
    pub helo_name: Option<Spanned<String>>,
    pub oauth2: Option<Spanned<RawOAuth2>>,
}

/// `[probe.smtp.oauth2]`, `[probe.imap.oauth2]`: log in with an OAuth2 bearer token.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOAuth2 {
    pub mechanism: Option<OAuth2Mechanism>,
    /// `client_credentials` or `refresh_token`; absent with `token_file`.
    pub grant: Option<Spanned<String>>,
    pub token_file: Option<Spanned<PathBuf>>,
    pub token_endpoint: Option<Spanned<String>>,
    pub client_id: Option<Spanned<String>>,
    pub client_secret: Option<Spanned<String>>,
    pub client_secret_file: Option<Spanned<PathBuf>>,
    pub refresh_token: Option<Spanned<String>>,
    pub refresh_token_file: Option<Spanned<PathBuf>>,
    pub scope: Option<Spanned<String>>,
    /// Extra trusted roots (PEM) for the token endpoint.
    pub ca_file: Option<Spanned<PathBuf>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHelpdesk {
    pub api: HelpdeskApi,
    pub base_url: Spanned<String>,
    pub token: Option<Spanned<String>>,
    pub token_file: Option<Spanned<PathBuf>>,
    pub webhook_secret: Option<Spanned<String>>,
    pub webhook_secret_file: Option<Spanned<PathBuf>>,
    pub poll_interval: Option<Spanned<HumanDuration>>,
    pub reply: Option<ReplyMode>,
    pub reply_body: Option<String>,
    pub cleanup: Option<Cleanup>,
    pub timeout: Option<Spanned<HumanDuration>>,
    /// Extra trusted roots (PEM) for the helpdesk's API (a self-hosted one behind a private CA).
    pub ca_file: Option<Spanned<PathBuf>>,
    /// `[probe.helpdesk.supportbee]`: settings only SupportBee has. One such table per vendor;
    /// a table for a vendor other than `api` is an error.
    pub supportbee: Option<Spanned<RawSupportBee>>,
    /// `[probe.helpdesk.rt]`.
    pub rt: Option<Spanned<RawRt>>,
    /// `[probe.helpdesk.django-helpdesk]`.
    #[serde(rename = "django-helpdesk")]
    pub django_helpdesk: Option<Spanned<RawDjangoHelpdesk>>,
    /// `[probe.helpdesk.zendesk]`.
    pub zendesk: Option<Spanned<RawZendesk>>,
    /// `[probe.helpdesk.front]`.
    pub front: Option<Spanned<RawFront>>,
    /// `[probe.helpdesk.http]`: the generic adapter's whole description.
    pub http: Option<Spanned<RawHttp>>,
    /// `[probe.helpdesk.helpscout]`.
    pub helpscout: Option<Spanned<RawHelpScout>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHelpScout {
    /// The OAuth2 app's id ("App ID" under My Apps); the probe's `token` is its secret.
    pub client_id: Option<Spanned<String>>,
    pub mailbox_id: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttp {
    /// A header that carries the secret (`Authorization`), with `auth_value`.
    pub auth_header: Option<Spanned<String>>,
    /// The header's value, `{secret}` where the secret goes (`Token {secret}`).
    pub auth_value: Option<Spanned<String>>,
    /// Or a query parameter that carries the secret.
    pub auth_query: Option<Spanned<String>>,
    pub find: Option<Spanned<RawHttpFind>>,
    pub reply: Option<Spanned<RawHttpRequest>>,
    pub cleanup: Option<Spanned<RawHttpRequest>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttpRequest {
    pub method: Option<Spanned<String>>,
    pub path: Spanned<String>,
    #[serde(default)]
    pub query: std::collections::BTreeMap<String, Spanned<String>>,
    pub body: Option<Spanned<toml::Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttpFind {
    pub method: Option<Spanned<String>>,
    pub path: Spanned<String>,
    #[serde(default)]
    pub query: std::collections::BTreeMap<String, Spanned<String>>,
    pub body: Option<Spanned<toml::Value>>,
    /// JSON pointer to the array of tickets in the answer ("" = the answer is the array).
    pub tickets: Spanned<String>,
    pub id: Spanned<String>,
    pub subject: Option<Spanned<String>>,
    pub content: Option<Spanned<String>>,
    pub created: Option<Spanned<String>>,
    /// Statuses that mean "no ticket yet" (default 404).
    pub not_found: Option<Spanned<Vec<u16>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDjangoHelpdesk {
    pub queue: Option<Spanned<u64>>,
    pub scan_pages: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawZendesk {
    /// The agent whose API token `token` is (Basic `{email}/token:{token}`).
    pub email: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFront {
    pub inbox_id: Option<Spanned<String>>,
    pub author_id: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRt {
    pub queue: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSupportBee {
    pub list_fallback: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawImap {
    pub host: Spanned<String>,
    pub port: Option<Spanned<u16>>,
    pub tls: Option<Tls>,
    pub username: Spanned<String>,
    pub password: Option<Spanned<String>>,
    pub password_file: Option<Spanned<PathBuf>>,
    pub mailbox: Option<Spanned<String>>,
    pub ca_file: Option<Spanned<PathBuf>>,
    pub idle: Option<bool>,
    pub poll_interval: Option<Spanned<HumanDuration>>,
    pub timeout: Option<Spanned<HumanDuration>>,
    pub junk: Option<Spanned<RawJunk>>,
    pub oauth2: Option<Spanned<RawOAuth2>>,
}

/// A humantime duration string (`"30s"`, `"1m 30s"`, `"24h"`). Range checks come later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a duration string such as \"30s\", \"5m\" or \"1h 30m\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<HumanDuration, E> {
                humantime::parse_duration(v)
                    .map(HumanDuration)
                    .map_err(|e| E::custom(format!("invalid duration {v:?}: {e}")))
            }
        }
        d.deserialize_str(Visitor)
    }
}

/// Parses one file into its sections and the errors found. Syntax errors stop the file (no
/// section is returned); a section that fails to deserialize is left out and the others are
/// returned, so their semantic checks still run.
pub(crate) fn parse(src: Source<'_>) -> (RawFile, Vec<ConfigError>) {
    let (root, syntax) = DeTable::parse_recoverable(src.text);
    if !syntax.is_empty() {
        let errors = syntax
            .iter()
            .map(|e| toml_error(src, root.get_ref(), e))
            .collect();
        return (RawFile::default(), errors);
    }
    let mut errors = Vec::new();
    let mut file = RawFile::default();
    for (key, value) in root.get_ref().iter() {
        match key.get_ref().as_ref() {
            "prober" => match section::<RawProber>(value) {
                Ok(p) => file.prober = Some(p),
                Err(e) => errors.push(toml_error(src, root.get_ref(), &e)),
            },
            "probe" => match value.get_ref() {
                DeValue::Array(items) => {
                    for (i, item) in items.iter().enumerate() {
                        match section::<RawProbe>(item) {
                            Ok(p) => file.probes.push((i, p)),
                            Err(e) => errors.push(toml_error(src, root.get_ref(), &e)),
                        }
                    }
                }
                _ => errors.push(src.error(
                    key.span(),
                    "probe",
                    "must be an array of tables: write [[probe]], not [probe]",
                )),
            },
            other => errors.push(src.error(
                key.span(),
                other,
                "unknown key, expected `prober` or `probe`",
            )),
        }
    }
    (file, errors)
}

fn section<'de, T: Deserialize<'de>>(
    value: &Spanned<DeValue<'de>>,
) -> Result<Spanned<T>, toml::de::Error> {
    Spanned::<T>::deserialize(ValueDeserializer::from(value.clone()))
}

/// Turns a toml error into ours: its span gives the position, and the deepest key of the
/// document whose key or value covers that span gives the key path.
fn toml_error(src: Source<'_>, root: &DeTable<'_>, e: &toml::de::Error) -> ConfigError {
    let message = e.message().trim().to_owned();
    let Some(span) = e.span() else {
        return ConfigError::file(src.origin, message);
    };
    let mut key = key_path_at(root, span.start).unwrap_or_default();
    // serde says which field is missing only in prose; the span is its table's.
    if let Some(field) = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next())
    {
        key = if key.is_empty() {
            field.to_owned()
        } else {
            format!("{key}.{field}")
        };
    }
    src.error(span, key, message)
}

/// The dotted path (`probe[1].smtp.port`) of the innermost entry whose key or value contains
/// `offset`. Children are searched before their parent: a table's own span may cover only
/// its header, so no subtree is pruned by span.
pub(crate) fn key_path_at(root: &DeTable<'_>, offset: usize) -> Option<String> {
    fn in_table(table: &DeTable<'_>, prefix: &str, offset: usize) -> Option<String> {
        for (k, v) in table.iter() {
            let path = if prefix.is_empty() {
                k.get_ref().to_string()
            } else {
                format!("{prefix}.{}", k.get_ref())
            };
            if let Some(found) = in_value(v, &path, offset) {
                return Some(found);
            }
            if k.span().contains(&offset) {
                return Some(path);
            }
        }
        None
    }
    fn in_value(v: &Spanned<DeValue<'_>>, path: &str, offset: usize) -> Option<String> {
        match v.get_ref() {
            DeValue::Table(t) => {
                if let Some(found) = in_table(t, path, offset) {
                    return Some(found);
                }
            }
            DeValue::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    if let Some(found) = in_value(item, &format!("{path}[{i}]"), offset) {
                        return Some(found);
                    }
                }
            }
            _ => {}
        }
        v.span().contains(&offset).then(|| path.to_owned())
    }
    in_table(root, "", offset)
}
