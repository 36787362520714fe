//! The one generator of probe config TOML for the tests and the benchmark: typed `[prober]`
//! and `[[probe]]` tables rendered with the `toml` crate. A key left `None` (or an empty
//! table list) is not written, so the product's default applies.
//!
//! Included by `#[path]` from `tests/prober`, `tests/realmail` and `benches/mailcanary`; each
//! suite keeps the knobs it thinks in (`Knobs`, `ProbeSpec`) and turns them into a
//! [`ConfigFile`] here. Durations are humantime strings as the file takes them (`"200ms"`,
//! `"auto"` for a learned deadline); [`dur`] writes a [`Duration`](std::time::Duration) so.

#![allow(dead_code)]

use serde::{Deserialize, Serialize};

/// A whole config file: `[prober]` and the `[[probe]]` tables.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ConfigFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prober: Option<ProberTable>,
    #[serde(rename = "probe", skip_serializing_if = "Vec::is_empty")]
    pub probes: Vec<Probe>,
}

impl ConfigFile {
    /// `[prober]` listening on loopback port 0 with `secret` and `hostname`, no probe yet.
    pub fn new(secret: &str, hostname: &str) -> ConfigFile {
        ConfigFile {
            prober: Some(ProberTable {
                listen: Some("127.0.0.1:0".into()),
                secret: Some(secret.into()),
                hostname: Some(hostname.into()),
                ..ProberTable::default()
            }),
            probes: Vec::new(),
        }
    }

    /// This file with `probe` appended.
    pub fn with(mut self, probe: Probe) -> ConfigFile {
        self.probes.push(probe);
        self
    }

    /// The `[prober]` table (created empty if absent).
    pub fn prober_mut(&mut self) -> &mut ProberTable {
        self.prober.get_or_insert_with(ProberTable::default)
    }

    /// The probe named `name`; panics when there is none.
    pub fn probe_mut(&mut self, name: &str) -> &mut Probe {
        self.probes
            .iter_mut()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no probe {name:?} in the generated config"))
    }

    /// The file as TOML text.
    pub fn render(&self) -> String {
        toml::to_string(self).expect("the generated config serializes")
    }
}

/// `[prober]`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProberTable {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

/// One `[[probe]]`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Probe {
    pub name: String,
    /// `"helpdesk"` or `"mail_loop"`.
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jitter: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lost_after: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cleanup: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_url_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_ca_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub junk_is_ok: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub require_tls_hops: Option<bool>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub require_auth: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub require_verified: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub trusted_authserv_ids: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify_dkim: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns_resolver: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deadlines: Option<Deadlines>,
    pub smtp: Smtp,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub helpdesk: Option<Helpdesk>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub imap: Option<Imap>,
    /// `[[probe.mailbox]]`, each with its `[probe.mailbox.imap]`.
    #[serde(rename = "mailbox", skip_serializing_if = "Vec::is_empty")]
    pub mailboxes: Vec<Mailbox>,
}

impl Probe {
    /// A probe `name` of `kind` sending through `smtp`; every other key unset.
    pub fn new(name: &str, kind: &str, smtp: Smtp) -> Probe {
        Probe {
            name: name.into(),
            kind: kind.into(),
            smtp,
            ..Probe::default()
        }
    }

    /// `[probe.deadlines]` (created empty if absent).
    pub fn deadlines_mut(&mut self) -> &mut Deadlines {
        self.deadlines.get_or_insert_with(Deadlines::default)
    }

    /// `[probe.helpdesk]`; panics on a probe without one.
    pub fn helpdesk_mut(&mut self) -> &mut Helpdesk {
        self.helpdesk
            .as_mut()
            .unwrap_or_else(|| panic!("probe {:?} has no [probe.helpdesk]", self.name))
    }

    /// `[probe.imap]`; panics on a probe without one.
    pub fn imap_mut(&mut self) -> &mut Imap {
        self.imap
            .as_mut()
            .unwrap_or_else(|| panic!("probe {:?} has no [probe.imap]", self.name))
    }

    /// This probe renamed `name` (a second probe like it).
    pub fn renamed(&self, name: &str) -> Probe {
        Probe {
            name: name.into(),
            ..self.clone()
        }
    }
}

/// `[probe.deadlines]`: each a duration or `"auto"`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Deadlines {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub submit: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub import: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivery: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_to_end: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_min: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_max: Option<String>,
}

/// `[probe.smtp]`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Smtp {
    pub host: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// `"none"`, `"starttls"` or `"tls"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub helo_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oauth2: Option<OAuth2>,
}

/// `[probe.smtp.oauth2]`, `[probe.imap.oauth2]`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuth2 {
    /// `"xoauth2"` or `"oauthbearer"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mechanism: Option<String>,
    /// `"client_credentials"` or `"refresh_token"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_endpoint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_token_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
}

/// `[probe.helpdesk]`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Helpdesk {
    /// `"supportbee"`, `"rt"`, `"zendesk"`, `"http"`, …
    pub api: String,
    pub base_url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub poll_interval: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_secret: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_secret_file: Option<String>,
    /// `"post"` or `"auto"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_body: Option<String>,
    /// `"archive"`, `"trash"`, `"delete"` or `"none"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cleanup: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// The vendor tables, `[probe.helpdesk.<vendor>]` (and their subtables), by vendor name.
    #[serde(flatten)]
    pub vendor: toml::Table,
}

impl Helpdesk {
    /// Adds the vendor tables written in `text` as they appear in a config file, under
    /// their `[probe.helpdesk.<vendor>]` headers (a shipped example's, for one).
    pub fn add_tables(&mut self, text: &str) {
        let mut doc: toml::Table =
            toml::from_str(text).unwrap_or_else(|e| panic!("vendor tables: {e}\n{text}"));
        let tables = doc
            .remove("probe")
            .and_then(|p| p.as_table()?.get("helpdesk")?.as_table().cloned())
            .unwrap_or_else(|| panic!("no [probe.helpdesk.<vendor>] table in:\n{text}"));
        assert!(doc.is_empty(), "vendor tables only, not {doc:?}");
        self.vendor.extend(tables);
    }

    /// Sets `key = value` in `[probe.helpdesk.<vendor>]`.
    pub fn set_vendor(&mut self, vendor: &str, key: &str, value: impl Into<toml::Value>) {
        self.vendor
            .entry(vendor)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .unwrap_or_else(|| panic!("probe.helpdesk.{vendor} is not a table"))
            .insert(key.into(), value.into());
    }
}

/// `[probe.imap]`, or a `[probe.mailbox.imap]`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Imap {
    pub host: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<String>,
    pub username: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<String>,
    /// The folder watched (default `INBOX`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mailbox: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub poll_interval: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// `true`, `false` or a folder name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub junk: Option<toml::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oauth2: Option<OAuth2>,
}

/// One `[[probe.mailbox]]`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Mailbox {
    pub name: String,
    pub address: String,
    pub imap: Imap,
}

/// A helpdesk probe `name` of the in-process sandbox (its SupportBee dialect at `api_url`,
/// SMTP and IMAP at `smtp`, `imap` without TLS), sending from and watching `mailbox`, with
/// what the prober tests and the benchmark share: 50 in flight, lost after 1 h, cleanup
/// (`trash`), replies posted, 5 s timeouts, the sandbox's `sandbox` token and password.
/// Interval, jitter, deadlines and polling are the caller's.
pub fn sandbox_probe(
    name: &str,
    smtp: std::net::SocketAddr,
    imap: std::net::SocketAddr,
    api_url: &str,
    mailbox: &str,
) -> Probe {
    let smtp = Smtp {
        host: "127.0.0.1".into(),
        port: Some(smtp.port()),
        tls: some("none"),
        from: some(mailbox),
        to: some("support@helpdesk.test"),
        timeout: some("5s"),
        ..Smtp::default()
    };
    Probe {
        max_in_flight: Some(50),
        lost_after: some("1h"),
        cleanup: Some(true),
        helpdesk: Some(Helpdesk {
            api: "supportbee".into(),
            base_url: api_url.into(),
            token: some("sandbox"),
            reply: some("post"),
            cleanup: some("trash"),
            timeout: some("5s"),
            ..Helpdesk::default()
        }),
        imap: Some(Imap {
            host: "127.0.0.1".into(),
            port: Some(imap.port()),
            tls: some("none"),
            username: mailbox.into(),
            password: some("sandbox"),
            timeout: some("5s"),
            ..Imap::default()
        }),
        ..Probe::new(name, "helpdesk", smtp)
    }
}

/// `d` as the config writes durations (`"1m 30s"`, `"250ms"`).
pub fn dur(d: std::time::Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// `Some(s.to_string())`, for the many optional string keys.
pub fn some(s: impl ToString) -> Option<String> {
    Some(s.to_string())
}
