//! Raw form → resolved [`Config`]: defaults, secrets, and every semantic check.
//!
//! Checks never stop at the first failure: each records an error and resolution goes on with
//! a placeholder, so one run of `mailcanary check` lists everything to fix. A probe with any
//! error is dropped from the result, and any error at all makes the whole load fail.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use super::error::{ConfigError, ConfigErrors, Position, Source};
use super::raw::{self, HumanDuration, RawDeadlines, RawFile, RawProbe, RawProber};
use super::secret::{Secret, expand_env, read_secret_file};
use crate::canary::hops::{AuthMethod, RouteRules};
use crate::edges::helpdesk::generic::{self, Template};

use super::{
    Cleanup, Config, Deadlines, HelpdeskApi, HelpdeskConfig, ImapConfig, Junk, MailboxConfig,
    OAuth2Config, OAuth2Mechanism, OAuth2Source, ProbeConfig, ProbeKind, ProberSettings, ReplyMode,
    SmtpConfig, StageName, Tls, VendorConfig, stages_for,
};

type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);
const DEFAULT_MAX_IN_FLIGHT: usize = 10;
const DEFAULT_LOST_AFTER: Duration = Duration::from_secs(24 * 3600);
const DEFAULT_SMTP_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_IMAP_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_IMAP_POLL: Duration = Duration::from_secs(5);
const DEFAULT_HELPDESK_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_HELPDESK_POLL: Duration = Duration::from_secs(5);
const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// One config text, with the directory its relative paths are relative to.
pub(crate) struct FileText<'a> {
    origin: String,
    text: std::borrow::Cow<'a, str>,
    base_dir: Option<PathBuf>,
}

impl<'a> FileText<'a> {
    pub fn new(origin: &str, text: &'a str, base_dir: Option<PathBuf>) -> Self {
        FileText {
            origin: origin.to_owned(),
            text: text.into(),
            base_dir,
        }
    }
}

/// Loads `path` with every check, secrets and files read.
pub(crate) fn load(path: &Path, env: Env<'_>) -> Result<Config, ConfigErrors> {
    load_with(path, env, false)
}

/// Loads `path`; with `syntax_only`, everything but what belongs to the target machine: no
/// secret is read from the environment or a file (only their syntax is checked), no `ca_file`
/// must exist. For linting a config in the repository or CI that holds it.
pub(crate) fn load_with(
    path: &Path,
    env: Env<'_>,
    syntax_only: bool,
) -> Result<Config, ConfigErrors> {
    let shown = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|e| ConfigError::file(&shown, e.to_string()))?;
    let paths = if meta.is_dir() {
        let entries = std::fs::read_dir(path)
            .map_err(|e| ConfigError::file(&shown, format!("cannot read directory: {e}")))?;
        let mut paths = Vec::new();
        for entry in entries {
            let entry = entry
                .map_err(|e| ConfigError::file(&shown, format!("cannot read directory: {e}")))?;
            let p = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            // `is_file` follows symlinks: Kubernetes mounts ConfigMap keys as links into `..data`.
            if !name.starts_with('.') && p.extension().is_some_and(|x| x == "toml") && p.is_file() {
                paths.push(p);
            }
        }
        paths.sort();
        if paths.is_empty() {
            return Err(ConfigError::file(&shown, "no *.toml files in this directory").into());
        }
        paths
    } else {
        vec![path.to_path_buf()]
    };

    let mut files = Vec::new();
    let mut errors = Vec::new();
    for p in paths {
        let origin = p.display().to_string();
        match std::fs::read_to_string(&p) {
            Ok(text) => files.push(FileText {
                origin,
                text: text.into(),
                base_dir: Some(
                    p.parent()
                        .map(Path::to_path_buf)
                        .unwrap_or_else(|| PathBuf::from(".")),
                ),
            }),
            Err(e) => errors.push(ConfigError::file(origin, format!("cannot read: {e}"))),
        }
    }
    match resolve_files_with(&files, env, syntax_only) {
        Ok(config) if errors.is_empty() => Ok(config),
        Ok(_) => Err(ConfigErrors(errors)),
        Err(more) => {
            errors.extend(more);
            Err(ConfigErrors(errors))
        }
    }
}

/// Resolves a set of files into one config: per-file checks, then the cross-file ones (one
/// `[prober]`, unique probe names).
pub(crate) fn resolve_files(files: &[FileText<'_>], env: Env<'_>) -> Result<Config, ConfigErrors> {
    resolve_files_with(files, env, false)
}

pub(crate) fn resolve_files_with(
    files: &[FileText<'_>],
    env: Env<'_>,
    syntax_only: bool,
) -> Result<Config, ConfigErrors> {
    let mut errors = Vec::new();
    let mut prober: Option<(ProberSettings, String, Position)> = None;
    let mut probes = Vec::new();
    let mut names: HashMap<String, (String, Position)> = HashMap::new();
    // Every watched mailbox so far (by connection), its settings and who watches it.
    let mut watched: HashMap<String, (ImapConfig, String)> = HashMap::new();

    for file in files {
        let src = Source {
            origin: &file.origin,
            text: &file.text,
        };
        let (raw, parse_errors): (RawFile, _) = raw::parse(src);
        let mut cx = Ctx {
            src,
            base_dir: file.base_dir.as_deref(),
            env,
            syntax_only,
            errors: parse_errors,
        };
        if let Some(p) = &raw.prober {
            let here = src.position(p.span().start);
            if let Some((_, first_file, first_pos)) = &prober {
                cx.err(
                    p.span(),
                    "prober",
                    format!(
                        "[prober] is already set in {first_file}:{first_pos}; \
                         at most one file may set it"
                    ),
                );
            } else {
                let settings = cx.prober(p.get_ref());
                prober = Some((settings, file.origin.clone(), here));
            }
        }
        for (index, p) in &raw.probes {
            let before = cx.errors.len();
            let name = p.get_ref().name.get_ref();
            let name_pos = src.position(p.get_ref().name.span().start);
            if let Some((first_file, first_pos)) = names.get(name) {
                cx.err(
                    p.get_ref().name.span(),
                    format!("probe[{index}].name"),
                    format!(
                        "duplicate probe name `{name}`, first defined at {first_file}:{first_pos}"
                    ),
                );
            } else {
                names.insert(name.clone(), (file.origin.clone(), name_pos));
            }
            let probe = cx.probe(*index, p);
            if cx.errors.len() == before {
                cx.shared_mailboxes(*index, p.get_ref(), &probe, &mut watched);
            }
            if cx.errors.len() == before {
                probes.push(probe);
            }
        }
        // Checks run section by section; report in the order of the file.
        cx.errors
            .sort_by_key(|e| e.position.map(|p| (p.line, p.column)));
        errors.extend(cx.errors);
    }

    if errors.is_empty() && probes.is_empty() {
        let origin = match files {
            [one] => one.origin.clone(),
            _ => files
                .first()
                .and_then(|f| f.base_dir.as_ref())
                .map(|d| d.display().to_string())
                .unwrap_or_default(),
        };
        errors.push(ConfigError::file(origin, "no [[probe]] is defined"));
    }
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    Ok(Config {
        prober: prober.map(|(p, _, _)| p).unwrap_or_default(),
        probes,
        shard: None,
    })
}

struct Ctx<'a> {
    src: Source<'a>,
    base_dir: Option<&'a Path>,
    env: Env<'a>,
    /// Check only what the file itself says (see [`load_with`]).
    syntax_only: bool,
    errors: Vec<ConfigError>,
}

fn key(prefix: &str, field: &str) -> String {
    format!("{prefix}.{field}")
}

impl Ctx<'_> {
    fn err(
        &mut self,
        span: std::ops::Range<usize>,
        key: impl Into<String>,
        msg: impl Into<String>,
    ) {
        self.errors.push(self.src.error(span, key, msg));
    }

    fn path(&self, p: &Path) -> PathBuf {
        match self.base_dir {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p.to_path_buf(),
        }
    }

    fn prober(&mut self, raw: &RawProber) -> ProberSettings {
        let mut out = ProberSettings::default();
        if let Some(listen) = &raw.listen {
            out.listen = *listen.get_ref();
        }
        out.state_dir = raw.state_dir.as_ref().map(|d| self.path(d.get_ref()));
        out.secret = self
            .secret(
                "prober",
                "secret",
                raw.secret.as_ref(),
                raw.secret_file.as_ref(),
            )
            .ok()
            .flatten();
        if let Some(h) = &raw.hostname {
            self.hostname(h, "prober.hostname");
            out.hostname = Some(h.get_ref().clone());
        }
        out
    }

    /// A secret given as `FIELD` (with `${ENV}` expansion) or `FIELD_file`. `Ok(None)` when
    /// neither is set; `Err` when an error was recorded.
    fn secret(
        &mut self,
        prefix: &str,
        field: &str,
        value: Option<&Spanned<String>>,
        file: Option<&Spanned<PathBuf>>,
    ) -> Result<Option<Secret>, ()> {
        let file_field = format!("{field}_file");
        let (resolved, span, k) = match (value, file) {
            (Some(_), Some(f)) => {
                self.err(
                    f.span(),
                    key(prefix, &file_field),
                    format!("set either `{field}` or `{file_field}`, not both"),
                );
                return Err(());
            }
            (None, None) => return Ok(None),
            // Syntax only: `${VAR}` must still be well formed, but any variable is "set".
            (Some(v), None) if self.syntax_only => (
                expand_env(v.get_ref(), &|_| Some("(set where deployed)".to_owned())),
                v.span(),
                key(prefix, field),
            ),
            (Some(v), None) => (
                expand_env(v.get_ref(), self.env),
                v.span(),
                key(prefix, field),
            ),
            (None, Some(f)) if self.syntax_only => (
                Ok("(read where deployed)".to_owned()),
                f.span(),
                key(prefix, &file_field),
            ),
            (None, Some(f)) => (
                read_secret_file(&self.path(f.get_ref())),
                f.span(),
                key(prefix, &file_field),
            ),
        };
        match resolved {
            Ok(s) if s.is_empty() => {
                self.err(span, k, "the secret is empty");
                Err(())
            }
            Ok(s) => Ok(Some(Secret::new(s))),
            Err(msg) => {
                self.err(span, k, msg);
                Err(())
            }
        }
    }

    /// A secret that must be given.
    fn required_secret(
        &mut self,
        section_span: std::ops::Range<usize>,
        prefix: &str,
        field: &str,
        value: Option<&Spanned<String>>,
        file: Option<&Spanned<PathBuf>>,
    ) -> Secret {
        match self.secret(prefix, field, value, file) {
            Ok(Some(s)) => s,
            Ok(None) => {
                self.err(
                    section_span,
                    key(prefix, field),
                    format!("missing: set `{field}` or `{field}_file`"),
                );
                Secret::new("")
            }
            Err(()) => Secret::new(""),
        }
    }

    fn duration(
        &mut self,
        value: Option<&Spanned<HumanDuration>>,
        k: impl Into<String>,
        default: Duration,
    ) -> Duration {
        let Some(v) = value else { return default };
        let d = v.get_ref().0;
        if d.is_zero() {
            self.err(v.span(), k, "must be greater than 0");
        }
        d
    }

    fn port(&mut self, value: Option<&Spanned<u16>>, k: String, default: u16) -> u16 {
        match value {
            Some(p) if *p.get_ref() == 0 => {
                self.err(p.span(), k, "must not be 0");
                0
            }
            Some(p) => *p.get_ref(),
            None => default,
        }
    }

    fn host(&mut self, value: &Spanned<String>, k: String) -> String {
        let h = value.get_ref();
        if h.is_empty() || h.chars().any(char::is_whitespace) {
            self.err(value.span(), k, "must be a host name or IP address");
        }
        h.clone()
    }

    fn hostname(&mut self, value: &Spanned<String>, k: &str) {
        let h = value.get_ref();
        if h.is_empty()
            || !h
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
        {
            self.err(
                value.span(),
                k,
                "must be a DNS name such as prober.example.com",
            );
        }
    }

    fn address(&mut self, value: &Spanned<String>, k: String) -> String {
        let a = value.get_ref();
        let ok = a.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty() && !domain.is_empty() && !domain.contains('@')
        }) && !a.chars().any(|c| c.is_whitespace() || c == '<' || c == '>');
        if !ok {
            self.err(
                value.span(),
                k,
                format!("`{a}` is not an email address (expected local@domain, no display name)"),
            );
        }
        a.clone()
    }

    fn ca_file(&mut self, value: Option<&Spanned<PathBuf>>, k: String) -> Option<PathBuf> {
        let v = value?;
        let p = self.path(v.get_ref());
        if self.syntax_only {
            return Some(p);
        }
        match std::fs::metadata(&p) {
            Ok(m) if m.is_file() => match std::fs::read(&p) {
                Ok(pem) => {
                    if let Err(e) = crate::edges::check_roots(&pem) {
                        self.err(v.span(), k, format!("{}: {e}", p.display()));
                    }
                }
                Err(e) => self.err(v.span(), k, format!("cannot read {}: {e}", p.display())),
            },
            Ok(_) => self.err(v.span(), k, format!("{} is not a file", p.display())),
            Err(e) => self.err(v.span(), k, format!("cannot read {}: {e}", p.display())),
        }
        Some(p)
    }

    fn probe(&mut self, index: usize, sp: &Spanned<RawProbe>) -> ProbeConfig {
        let raw = sp.get_ref();
        let pre = format!("probe[{index}]");
        let name = raw.name.get_ref().clone();
        if !valid_name(&name) {
            self.err(
                raw.name.span(),
                key(&pre, "name"),
                format!("`{name}` is not a valid probe name: use 1 to 64 of a-z, 0-9, `_`, `-`"),
            );
        }
        let kind = *raw.kind.get_ref();

        let interval = self.duration(
            raw.interval.as_ref(),
            key(&pre, "interval"),
            DEFAULT_INTERVAL,
        );
        if let Some(v) = &raw.interval
            && !interval.is_zero()
            && interval < MIN_INTERVAL
        {
            self.err(v.span(), key(&pre, "interval"), "must be at least 100ms");
        }
        let jitter = raw
            .jitter
            .as_ref()
            .map_or(Duration::ZERO, |j| j.get_ref().0);
        if let Some(j) = &raw.jitter
            && jitter >= interval
        {
            self.err(
                j.span(),
                key(&pre, "jitter"),
                format!(
                    "must be less than interval ({})",
                    humantime::format_duration(interval)
                ),
            );
        }
        let max_in_flight = match &raw.max_in_flight {
            Some(m) if *m.get_ref() == 0 => {
                self.err(m.span(), key(&pre, "max_in_flight"), "must be at least 1");
                1
            }
            Some(m) => *m.get_ref() as usize,
            None => DEFAULT_MAX_IN_FLIGHT,
        };

        let helpdesk = match (kind, &raw.helpdesk) {
            (ProbeKind::Helpdesk, Some(h)) => Some(self.helpdesk(&key(&pre, "helpdesk"), h)),
            (ProbeKind::Helpdesk, None) => {
                self.err(
                    raw.kind.span(),
                    key(&pre, "helpdesk"),
                    "a [probe.helpdesk] table is required for kind = \"helpdesk\"",
                );
                None
            }
            (ProbeKind::MailLoop, Some(h)) => {
                self.err(
                    h.span(),
                    key(&pre, "helpdesk"),
                    "not allowed for kind = \"mail_loop\" (remove it, or set kind = \"helpdesk\")",
                );
                None
            }
            (ProbeKind::MailLoop, None) => None,
        };
        let stages = stages_for(kind, helpdesk.as_ref().map(|h| h.reply));
        let deadlines = self.deadlines(&pre, raw.deadlines.as_ref(), &stages, kind);

        let lost_after = self.duration(
            raw.lost_after.as_ref(),
            key(&pre, "lost_after"),
            DEFAULT_LOST_AFTER,
        );
        if let Some(stage) = stages
            .iter()
            .copied()
            .filter(|&s| deadlines.get(s) >= lost_after)
            .max_by_key(|&s| deadlines.get(s))
        {
            let span = raw
                .lost_after
                .as_ref()
                .map_or_else(|| raw.name.span(), |l| l.span());
            self.err(
                span,
                key(&pre, "lost_after"),
                format!(
                    "must be greater than every deadline, but the {stage} deadline is {} and \
                     lost_after is {}",
                    humantime::format_duration(deadlines.get(stage)),
                    humantime::format_duration(lost_after),
                ),
            );
        }

        ProbeConfig {
            name,
            kind,
            interval,
            jitter,
            max_in_flight,
            lost_after,
            cleanup: raw.cleanup.unwrap_or(true),
            heartbeat_url: self.heartbeat_url(&pre, raw),
            heartbeat_ca_file: self.heartbeat_ca_file(&pre, raw),
            deadlines,
            smtp: self.smtp(&key(&pre, "smtp"), &raw.smtp, kind, raw.mailbox.is_some()),
            helpdesk,
            mailboxes: self.mailboxes(&pre, sp),
            junk_is_ok: raw.junk_is_ok.unwrap_or(false),
            route_rules: self.route_rules(&pre, raw),
            verify_dkim: self.verify_dkim(&pre, raw),
        }
    }

    /// `verify_dkim`, `dns_resolver`.
    fn verify_dkim(&mut self, pre: &str, raw: &RawProbe) -> Option<Option<std::net::SocketAddr>> {
        let resolver = raw.dns_resolver.as_ref().and_then(|r| {
            match r.get_ref().trim().parse::<std::net::SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    self.err(
                        r.span(),
                        key(pre, "dns_resolver"),
                        "must be an IP address and port, e.g. \"127.0.0.1:53\"",
                    );
                    None
                }
            }
        });
        if !raw.verify_dkim.unwrap_or(false) {
            if let Some(r) = &raw.dns_resolver {
                self.err(
                    r.span(),
                    key(pre, "dns_resolver"),
                    "only used with verify_dkim = true",
                );
            }
            return None;
        }
        Some(resolver)
    }

    /// `require_tls_hops`, `require_auth`, `trusted_authserv_ids`, `require_verified`.
    fn route_rules(&mut self, pre: &str, raw: &RawProbe) -> RouteRules {
        let mut rules = RouteRules {
            require_tls_hops: raw.require_tls_hops.unwrap_or(false),
            ..RouteRules::default()
        };
        for id in raw.trusted_authserv_ids.iter().flat_map(|l| l.get_ref()) {
            let v = id.get_ref().trim();
            if v.is_empty() || v.contains(|c: char| c.is_whitespace() || c == ';' || c == '=') {
                self.err(
                    id.span(),
                    key(pre, "trusted_authserv_ids"),
                    "an authserv-id is one word (the receiving server's name as its \
                     Authentication-Results header starts, e.g. \"mx.example.com\")",
                );
            } else if !rules.trusted_authserv_ids.contains(&v.to_ascii_lowercase()) {
                rules.trusted_authserv_ids.push(v.to_ascii_lowercase());
            }
        }
        for m in raw.require_auth.iter().flat_map(|l| l.get_ref()) {
            match AuthMethod::parse(m.get_ref().trim()) {
                Some(method) if !rules.require_auth.contains(&method) => {
                    rules.require_auth.push(method)
                }
                Some(_) => {}
                None => self.err(
                    m.span(),
                    key(pre, "require_auth"),
                    format!(
                        "unknown method {:?}: one of \"dkim\", \"spf\", \"dmarc\", \"arc\"",
                        m.get_ref()
                    ),
                ),
            }
        }
        if let Some(list) = &raw.require_auth
            && !list.get_ref().is_empty()
            && rules.trusted_authserv_ids.is_empty()
        {
            self.err(
                list.span(),
                key(pre, "require_auth"),
                "needs trusted_authserv_ids: without a trusted authserv-id no \
                 Authentication-Results header is believed, and every verdict is none",
            );
        }
        for m in raw.require_verified.iter().flat_map(|l| l.get_ref()) {
            match AuthMethod::parse(m.get_ref().trim()) {
                Some(method @ (AuthMethod::Dkim | AuthMethod::Arc)) => {
                    if !rules.require_verified.contains(&method) {
                        rules.require_verified.push(method);
                    }
                }
                _ => self.err(
                    m.span(),
                    key(pre, "require_verified"),
                    format!(
                        "{:?}: the prober's own check verifies \"dkim\" and \"arc\" only \
                         (SPF and DMARC are the receiving server's: require_auth)",
                        m.get_ref()
                    ),
                ),
            }
        }
        if let Some(list) = &raw.require_verified
            && !list.get_ref().is_empty()
            && !raw.verify_dkim.unwrap_or(false)
        {
            self.err(
                list.span(),
                key(pre, "require_verified"),
                "needs verify_dkim = true: without the prober's own check there is no verdict",
            );
        }
        rules
    }

    /// `[probe.imap]` (one mailbox, [`MailboxConfig::DEFAULT_NAME`]) or `[[probe.mailbox]]`.
    fn mailboxes(&mut self, pre: &str, sp: &Spanned<RawProbe>) -> Vec<MailboxConfig> {
        let raw = sp.get_ref();
        let list = match (&raw.imap, &raw.mailbox) {
            (Some(imap), None) => {
                return vec![MailboxConfig {
                    name: MailboxConfig::DEFAULT_NAME.to_string(),
                    address: None,
                    imap: self.imap(&key(pre, "imap"), imap),
                }];
            }
            (None, None) => {
                self.err(
                    sp.span(),
                    key(pre, "imap"),
                    "missing: a [probe.imap] table, or one [[probe.mailbox]] per watched mailbox",
                );
                return Vec::new();
            }
            (Some(_), Some(list)) => {
                self.err(
                    list.span(),
                    key(pre, "mailbox"),
                    "[probe.imap] and [[probe.mailbox]] both say which mailbox to watch: \
                     keep one (several mailboxes: only [[probe.mailbox]])",
                );
                list
            }
            (None, Some(list)) => list,
        };
        if list.get_ref().is_empty() {
            self.err(
                list.span(),
                key(pre, "mailbox"),
                "at least one [[probe.mailbox]] is needed",
            );
        }
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut out = Vec::new();
        for (n, m) in list.get_ref().iter().enumerate() {
            let pre = format!("{pre}.mailbox[{n}]");
            let m = m.get_ref();
            let name = m.name.get_ref().clone();
            if !valid_name(&name) {
                self.err(
                    m.name.span(),
                    key(&pre, "name"),
                    format!(
                        "`{name}` is not a valid mailbox name (the `mailbox` label): use 1 to 64 \
                         of a-z, 0-9, `_`, `-`"
                    ),
                );
            } else if let Some(first) = names.insert(name.clone(), n) {
                self.err(
                    m.name.span(),
                    key(&pre, "name"),
                    format!("duplicate mailbox name `{name}`, first used by mailbox[{first}]"),
                );
            }
            out.push(MailboxConfig {
                name,
                address: Some(self.address(&m.address, key(&pre, "address"))),
                imap: self.imap(&key(&pre, "imap"), &m.imap),
            });
        }
        out
    }

    /// Mailboxes of this (valid) probe that another probe watches too: one mailbox is one
    /// connection, so their settings must be the same (else one probe's would silently win).
    fn shared_mailboxes(
        &mut self,
        index: usize,
        raw: &RawProbe,
        probe: &ProbeConfig,
        seen: &mut HashMap<String, (ImapConfig, String)>,
    ) {
        let spans: Vec<(String, std::ops::Range<usize>)> = match (&raw.imap, &raw.mailbox) {
            (Some(i), None) => vec![(format!("probe[{index}].imap"), i.span())],
            (_, Some(list)) => list
                .get_ref()
                .iter()
                .enumerate()
                .map(|(n, m)| {
                    (
                        format!("probe[{index}].mailbox[{n}].imap"),
                        m.get_ref().imap.span(),
                    )
                })
                .collect(),
            (None, None) => Vec::new(),
        };
        for (m, (k, span)) in probe.mailboxes.iter().zip(spans) {
            let who = format!("probe `{}` mailbox `{}`", probe.name, m.name);
            match seen.get(&m.imap.watch_key()) {
                Some((other, first)) if *other != m.imap => self.err(
                    span,
                    k,
                    format!(
                        "the same mailbox as {first}, with other settings: a mailbox is watched \
                         by one connection, so give both the same settings"
                    ),
                ),
                Some(_) => {}
                None => {
                    seen.insert(m.imap.watch_key(), (m.imap.clone(), who));
                }
            }
        }
    }

    fn deadlines(
        &mut self,
        pre: &str,
        raw: Option<&RawDeadlines>,
        stages: &[StageName],
        kind: ProbeKind,
    ) -> Deadlines {
        let empty = RawDeadlines::default();
        let raw = raw.unwrap_or(&empty);
        let pre = key(pre, "deadlines");
        let fields = [
            (StageName::Submit, &raw.submit, Deadlines::DEFAULT_SUBMIT),
            (StageName::Import, &raw.import, Deadlines::DEFAULT_IMPORT),
            (StageName::Reply, &raw.reply, Deadlines::DEFAULT_REPLY),
            (
                StageName::Delivery,
                &raw.delivery,
                Deadlines::DEFAULT_DELIVERY,
            ),
        ];
        let auto_min = self.duration(
            raw.auto_min.as_ref(),
            key(&pre, "auto_min"),
            Deadlines::DEFAULT_AUTO_MIN,
        );
        let auto_max = self.duration(
            raw.auto_max.as_ref(),
            key(&pre, "auto_max"),
            Deadlines::DEFAULT_AUTO_MAX,
        );
        if auto_min > auto_max
            && let Some(v) = raw.auto_min.as_ref().or(raw.auto_max.as_ref())
        {
            self.err(
                v.span(),
                key(&pre, "auto_min"),
                format!(
                    "auto_min ({}) is above auto_max ({})",
                    humantime::format_duration(auto_min),
                    humantime::format_duration(auto_max)
                ),
            );
        }
        let mut values = [Duration::ZERO; 4];
        let mut auto = Vec::new();
        for (i, (stage, value, default)) in fields.into_iter().enumerate() {
            values[i] = match value.as_ref().map(|v| (v.span(), *v.get_ref())) {
                None => default,
                Some((_, raw::RawDeadline::Auto)) => {
                    auto.push(stage);
                    auto_max
                }
                Some((span, raw::RawDeadline::Fixed(h))) => self.duration(
                    Some(&Spanned::new(span, h)),
                    key(&pre, stage.as_str()),
                    default,
                ),
            };
            if let Some(v) = value
                && !stages.contains(&stage)
            {
                let used: Vec<&str> = stages.iter().map(|s| s.as_str()).collect();
                let why = match kind {
                    ProbeKind::MailLoop => "kind = \"mail_loop\"".to_owned(),
                    ProbeKind::Helpdesk => "helpdesk.reply = \"auto\"".to_owned(),
                };
                self.err(
                    v.span(),
                    key(&pre, stage.as_str()),
                    format!(
                        "this probe has no {stage} stage ({why} has {}): remove this deadline",
                        used.join(", ")
                    ),
                );
            }
        }
        let [submit, import, reply, delivery] = values;
        let mut out = Deadlines {
            submit,
            import,
            reply,
            delivery,
            end_to_end: Duration::ZERO,
            auto,
            auto_min,
            auto_max,
            end_to_end_is_sum: raw.end_to_end.is_none(),
        };
        let sum = stages
            .iter()
            .filter(|&&s| s != StageName::EndToEnd)
            .map(|&s| out.get(s))
            .sum();
        out.end_to_end = self.duration(raw.end_to_end.as_ref(), key(&pre, "end_to_end"), sum);
        out
    }

    fn smtp(
        &mut self,
        pre: &str,
        sp: &Spanned<raw::RawSmtp>,
        kind: ProbeKind,
        several: bool,
    ) -> SmtpConfig {
        let raw = sp.get_ref();
        // With `[[probe.mailbox]]` the mailboxes' addresses are a mail loop's recipients and
        // a helpdesk probe's requesters.
        let envelope = |cx: &mut Self, value: Option<&Spanned<String>>, field, needed| {
            let k = key(pre, field);
            match (value, needed) {
                (Some(v), true) => cx.address(v, k),
                (None, true) => {
                    cx.err(sp.span(), k, format!("missing field `{field}`"));
                    String::new()
                }
                (Some(v), false) => {
                    let role = match kind {
                        ProbeKind::MailLoop => "recipient",
                        ProbeKind::Helpdesk => "sender (the requester the helpdesk replies to)",
                    };
                    cx.err(
                        v.span(),
                        k,
                        format!(
                            "not used with [[probe.mailbox]]: each mailbox's `address` is the \
                             canary's {role}; remove it"
                        ),
                    );
                    String::new()
                }
                (None, false) => String::new(),
            }
        };
        let from = envelope(
            self,
            raw.from.as_ref(),
            "from",
            !(several && kind == ProbeKind::Helpdesk),
        );
        let to = envelope(
            self,
            raw.to.as_ref(),
            "to",
            !(several && kind == ProbeKind::MailLoop),
        );
        let tls = raw.tls.unwrap_or(Tls::None);
        let default_port = match tls {
            Tls::None => 25,
            Tls::StartTls => 587,
            Tls::Tls => 465,
        };
        // With `oauth2` a password is an error of its own (below), not a file to read.
        let password = if raw.oauth2.is_some() {
            None
        } else {
            self.secret(
                pre,
                "password",
                raw.password.as_ref(),
                raw.password_file.as_ref(),
            )
            .unwrap_or(None)
        };
        let oauth2 = raw.oauth2.as_ref().map(|o| self.oauth2(pre, o));
        if raw.oauth2.is_some() {
            self.no_password_with_oauth2(pre, raw.password.as_ref(), raw.password_file.as_ref());
            if raw.username.is_none() {
                self.err(
                    sp.span(),
                    key(pre, "username"),
                    "OAuth2 needs a `username` (the mailbox the token is for)",
                );
            }
        }
        match (&raw.username, &password) {
            _ if raw.oauth2.is_some() => {}
            (Some(u), None) if raw.password.is_none() && raw.password_file.is_none() => {
                self.err(
                    u.span(),
                    key(pre, "password"),
                    "a username needs `password` or `password_file`",
                );
            }
            (None, Some(_)) => {
                let span = raw
                    .password
                    .as_ref()
                    .map(|p| p.span())
                    .or_else(|| raw.password_file.as_ref().map(|p| p.span()))
                    .unwrap_or_else(|| sp.span());
                self.err(span, key(pre, "username"), "a password needs a `username`");
            }
            _ => {}
        }
        if let Some(h) = &raw.helo_name {
            self.hostname(h, &key(pre, "helo_name"));
        }
        SmtpConfig {
            host: self.host(&raw.host, key(pre, "host")),
            port: self.port(raw.port.as_ref(), key(pre, "port"), default_port),
            tls,
            username: raw.username.as_ref().map(|u| u.get_ref().clone()),
            password,
            ca_file: self.ca_file(raw.ca_file.as_ref(), key(pre, "ca_file")),
            from,
            to,
            timeout: self.duration(
                raw.timeout.as_ref(),
                key(pre, "timeout"),
                DEFAULT_SMTP_TIMEOUT,
            ),
            helo_name: raw.helo_name.as_ref().map(|h| h.get_ref().clone()),
            oauth2,
        }
    }

    /// `password` / `password_file` beside an `oauth2` section is an error: which would log in?
    fn no_password_with_oauth2(
        &mut self,
        pre: &str,
        password: Option<&Spanned<String>>,
        password_file: Option<&Spanned<PathBuf>>,
    ) {
        let given = password
            .map(|p| (p.span(), "password"))
            .or_else(|| password_file.map(|p| (p.span(), "password_file")));
        if let Some((span, field)) = given {
            self.err(
                span,
                key(pre, field),
                "set either a password or an `oauth2` section, not both",
            );
        }
    }

    /// `[PRE.oauth2]`: the mechanism and the token source.
    fn oauth2(&mut self, pre: &str, sp: &Spanned<raw::RawOAuth2>) -> OAuth2Config {
        let pre = key(pre, "oauth2");
        let pre = pre.as_str();
        let raw = sp.get_ref();
        let mechanism = raw.mechanism.unwrap_or(OAuth2Mechanism::XOAuth2);
        let endpoint_keys: [(&str, Option<std::ops::Range<usize>>); 8] = [
            (
                "token_endpoint",
                raw.token_endpoint.as_ref().map(|v| v.span()),
            ),
            ("client_id", raw.client_id.as_ref().map(|v| v.span())),
            (
                "client_secret",
                raw.client_secret.as_ref().map(|v| v.span()),
            ),
            (
                "client_secret_file",
                raw.client_secret_file.as_ref().map(|v| v.span()),
            ),
            (
                "refresh_token",
                raw.refresh_token.as_ref().map(|v| v.span()),
            ),
            (
                "refresh_token_file",
                raw.refresh_token_file.as_ref().map(|v| v.span()),
            ),
            ("scope", raw.scope.as_ref().map(|v| v.span())),
            ("ca_file", raw.ca_file.as_ref().map(|v| v.span())),
        ];
        if let Some(path) = &raw.token_file {
            if let Some(g) = &raw.grant {
                self.err(g.span(), key(pre, "grant"), "not used with `token_file`");
            }
            for (field, span) in endpoint_keys {
                if let Some(span) = span {
                    self.err(span, key(pre, field), "not used with `token_file`");
                }
            }
            return OAuth2Config {
                mechanism,
                source: OAuth2Source::TokenFile(self.path(path.get_ref())),
                ca_file: None,
            };
        }
        let grant = match &raw.grant {
            None => {
                self.err(
                    sp.span(),
                    key(pre, "grant"),
                    "missing: set `token_file`, or `grant` = \"client_credentials\" or \"refresh_token\"",
                );
                return OAuth2Config {
                    mechanism,
                    source: OAuth2Source::TokenFile(PathBuf::new()),
                    ca_file: None,
                };
            }
            Some(g) => g,
        };
        let refresh = match grant.get_ref().as_str() {
            "client_credentials" => false,
            "refresh_token" => true,
            other => {
                self.err(
                    grant.span(),
                    key(pre, "grant"),
                    format!("{other:?}: must be \"client_credentials\" or \"refresh_token\""),
                );
                false
            }
        };
        let token_endpoint = match &raw.token_endpoint {
            None => {
                self.err(
                    sp.span(),
                    key(pre, "token_endpoint"),
                    "missing field `token_endpoint`",
                );
                String::new()
            }
            Some(u) => match reqwest::Url::parse(u.get_ref()) {
                Ok(url)
                    if (url.scheme() == "http" || url.scheme() == "https") && url.has_host() =>
                {
                    u.get_ref().clone()
                }
                _ => {
                    self.err(
                        u.span(),
                        key(pre, "token_endpoint"),
                        "must be an http:// or https:// URL with a host",
                    );
                    String::new()
                }
            },
        };
        let client_id = match &raw.client_id {
            Some(c) if !c.get_ref().is_empty() => c.get_ref().clone(),
            Some(c) => {
                self.err(c.span(), key(pre, "client_id"), "must not be empty");
                String::new()
            }
            None => {
                self.err(
                    sp.span(),
                    key(pre, "client_id"),
                    "missing field `client_id`",
                );
                String::new()
            }
        };
        let client_secret = self.required_secret(
            sp.span(),
            pre,
            "client_secret",
            raw.client_secret.as_ref(),
            raw.client_secret_file.as_ref(),
        );
        let scope = raw.scope.as_ref().map(|s| s.get_ref().clone());
        let source = if refresh {
            let refresh_token = self.required_secret(
                sp.span(),
                pre,
                "refresh_token",
                raw.refresh_token.as_ref(),
                raw.refresh_token_file.as_ref(),
            );
            OAuth2Source::RefreshToken {
                token_endpoint,
                client_id,
                client_secret,
                refresh_token,
                scope,
            }
        } else {
            for (field, value) in [
                (
                    "refresh_token",
                    raw.refresh_token.as_ref().map(|v| v.span()),
                ),
                (
                    "refresh_token_file",
                    raw.refresh_token_file.as_ref().map(|v| v.span()),
                ),
            ] {
                if let Some(span) = value {
                    self.err(
                        span,
                        key(pre, field),
                        "only used with grant = \"refresh_token\"",
                    );
                }
            }
            OAuth2Source::ClientCredentials {
                token_endpoint,
                client_id,
                client_secret,
                scope,
            }
        };
        let ca_file = self.ca_file(raw.ca_file.as_ref(), key(pre, "ca_file"));
        OAuth2Config {
            mechanism,
            source,
            ca_file,
        }
    }

    fn helpdesk(&mut self, pre: &str, sp: &Spanned<raw::RawHelpdesk>) -> HelpdeskConfig {
        let raw = sp.get_ref();
        let base_url = match reqwest::Url::parse(raw.base_url.get_ref()) {
            Ok(u) if (u.scheme() == "http" || u.scheme() == "https") && u.has_host() => u,
            Ok(_) => {
                self.err(
                    raw.base_url.span(),
                    key(pre, "base_url"),
                    "must be an http:// or https:// URL with a host",
                );
                placeholder_url()
            }
            Err(e) => {
                self.err(
                    raw.base_url.span(),
                    key(pre, "base_url"),
                    format!("invalid URL: {e}"),
                );
                placeholder_url()
            }
        };
        HelpdeskConfig {
            api: raw.api,
            base_url,
            token: self.required_secret(
                sp.span(),
                pre,
                "token",
                raw.token.as_ref(),
                raw.token_file.as_ref(),
            ),
            webhook_secret: self
                .secret(
                    pre,
                    "webhook_secret",
                    raw.webhook_secret.as_ref(),
                    raw.webhook_secret_file.as_ref(),
                )
                .unwrap_or(None),
            poll_interval: self.duration(
                raw.poll_interval.as_ref(),
                key(pre, "poll_interval"),
                DEFAULT_HELPDESK_POLL,
            ),
            reply: raw.reply.unwrap_or(ReplyMode::Post),
            reply_body: raw.reply_body.clone(),
            cleanup: raw.cleanup.unwrap_or(Cleanup::Archive),
            timeout: self.duration(
                raw.timeout.as_ref(),
                key(pre, "timeout"),
                DEFAULT_HELPDESK_TIMEOUT,
            ),
            ca_file: self.ca_file(raw.ca_file.as_ref(), key(pre, "ca_file")),
            vendor: self.vendor(pre, raw),
        }
    }

    /// The `[probe.helpdesk.<api>]` table of the configured vendor; a table of another vendor
    /// is an error (a leftover of a changed `api`, or a typo in it).
    fn vendor(&mut self, pre: &str, raw: &raw::RawHelpdesk) -> VendorConfig {
        let tables = [
            (
                HelpdeskApi::SupportBee,
                raw.supportbee.as_ref().map(|t| t.span()),
            ),
            (HelpdeskApi::Rt, raw.rt.as_ref().map(|t| t.span())),
            (
                HelpdeskApi::DjangoHelpdesk,
                raw.django_helpdesk.as_ref().map(|t| t.span()),
            ),
            (HelpdeskApi::Zendesk, raw.zendesk.as_ref().map(|t| t.span())),
            (HelpdeskApi::Front, raw.front.as_ref().map(|t| t.span())),
            (HelpdeskApi::Http, raw.http.as_ref().map(|t| t.span())),
            (
                HelpdeskApi::HelpScout,
                raw.helpscout.as_ref().map(|t| t.span()),
            ),
        ];
        for (api, span) in tables {
            if let Some(span) = span
                && api != raw.api
            {
                self.err(
                    span,
                    key(pre, api.as_str()),
                    format!(
                        "settings of `{}`, but api = \"{}\"",
                        api.as_str(),
                        raw.api.as_str()
                    ),
                );
            }
        }
        match raw.api {
            HelpdeskApi::SupportBee => VendorConfig::SupportBee {
                list_fallback: raw
                    .supportbee
                    .as_ref()
                    .and_then(|t| t.get_ref().list_fallback)
                    .unwrap_or(true),
            },
            HelpdeskApi::Rt => VendorConfig::Rt {
                queue: raw
                    .rt
                    .as_ref()
                    .and_then(|t| t.get_ref().queue.as_ref())
                    .map(|q| q.get_ref().clone()),
            },
            HelpdeskApi::DjangoHelpdesk => {
                let t = raw.django_helpdesk.as_ref().map(|t| t.get_ref());
                let scan_pages = t.and_then(|t| t.scan_pages.as_ref());
                if let Some(n) = scan_pages
                    && *n.get_ref() == 0
                {
                    self.err(
                        n.span(),
                        key(pre, "django-helpdesk.scan_pages"),
                        "must be at least 1".to_string(),
                    );
                }
                VendorConfig::DjangoHelpdesk {
                    queue: t.and_then(|t| t.queue.as_ref()).map(|q| *q.get_ref()),
                    scan_pages: scan_pages.map_or(4, |n| *n.get_ref()),
                }
            }
            HelpdeskApi::Zammad => VendorConfig::Zammad,
            HelpdeskApi::Zendesk => {
                let email = raw
                    .zendesk
                    .as_ref()
                    .and_then(|t| t.get_ref().email.as_ref());
                if let Some(e) = email {
                    let text = e.get_ref();
                    if !text.contains('@') || text.contains(':') || text.trim() != text {
                        self.err(
                            e.span(),
                            key(pre, "zendesk.email"),
                            "must be the agent's email address (with `@`, without `:` or spaces)"
                                .to_string(),
                        );
                    }
                }
                VendorConfig::Zendesk {
                    email: email.map(|e| e.get_ref().clone()),
                }
            }
            HelpdeskApi::Front => self.front(pre, raw),
            HelpdeskApi::HelpScout => {
                let Some(t) = &raw.helpscout else {
                    self.err(
                        raw.base_url.span(),
                        key(pre, "helpscout"),
                        "api = \"helpscout\" needs a [probe.helpdesk.helpscout] table with \
                         client_id and mailbox_id",
                    );
                    return VendorConfig::HelpScout {
                        client_id: String::new(),
                        mailbox_id: 0,
                    };
                };
                let (span, t) = (t.span(), t.get_ref());
                let client_id = match &t.client_id {
                    Some(c) if !c.get_ref().trim().is_empty() => c.get_ref().trim().to_string(),
                    Some(c) => {
                        self.err(
                            c.span(),
                            key(pre, "helpscout.client_id"),
                            "must not be empty",
                        );
                        String::new()
                    }
                    None => {
                        self.err(
                            span.clone(),
                            key(pre, "helpscout.client_id"),
                            "missing: the OAuth2 app's client id (its secret is `token`)",
                        );
                        String::new()
                    }
                };
                let mailbox_id = match &t.mailbox_id {
                    Some(m) if *m.get_ref() > 0 => *m.get_ref(),
                    Some(m) => {
                        self.err(
                            m.span(),
                            key(pre, "helpscout.mailbox_id"),
                            "must be a mailbox id (at least 1)",
                        );
                        0
                    }
                    None => {
                        self.err(
                            span,
                            key(pre, "helpscout.mailbox_id"),
                            "missing: the id of the mailbox the canaries are sent to",
                        );
                        0
                    }
                };
                VendorConfig::HelpScout {
                    client_id,
                    mailbox_id,
                }
            }
            HelpdeskApi::Freshdesk => VendorConfig::Freshdesk,
            HelpdeskApi::Http => match &raw.http {
                Some(t) => VendorConfig::Http(Box::new(self.http_spec(pre, raw, t))),
                None => {
                    self.err(
                        raw.base_url.span(),
                        key(pre, "http"),
                        "api = \"http\" needs a [probe.helpdesk.http] table describing the API",
                    );
                    VendorConfig::Http(Box::new(http_placeholder()))
                }
            },
        }
    }

    /// `[probe.helpdesk.front]`: `inbox_id` is required (the inbox's conversations are what
    /// is listed); ids are Front's, `inb_…` and `tea_…`.
    fn front(&mut self, pre: &str, raw: &raw::RawHelpdesk) -> VendorConfig {
        let t = raw.front.as_ref().map(|t| t.get_ref());
        let inbox_id = self.front_id(pre, t.and_then(|t| t.inbox_id.as_ref()), "inbox_id", "inb_");
        let author_id = self.front_id(
            pre,
            t.and_then(|t| t.author_id.as_ref()),
            "author_id",
            "tea_",
        );
        let inbox_id = inbox_id.unwrap_or_else(|| {
            let span = raw
                .front
                .as_ref()
                .map_or_else(|| raw.base_url.span(), |t| t.span());
            self.err(
                span,
                key(pre, "front.inbox_id"),
                "api = \"front\" needs [probe.helpdesk.front] inbox_id, the inbox the canaries \
                 arrive in (inb_…)"
                    .to_string(),
            );
            String::new()
        });
        VendorConfig::Front {
            inbox_id,
            author_id,
        }
    }

    /// A Front id setting (`inb_…`, `tea_…`): its prefix, then letters, digits and `_`.
    fn front_id(
        &mut self,
        pre: &str,
        value: Option<&Spanned<String>>,
        name: &str,
        prefix: &str,
    ) -> Option<String> {
        let v = value?;
        let s = v.get_ref().trim();
        if !s.starts_with(prefix)
            || s.len() == prefix.len()
            || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            self.err(
                v.span(),
                key(pre, &format!("front.{name}")),
                format!("must be a Front id such as \"{prefix}abc123\""),
            );
        }
        Some(s.to_string())
    }

    /// `[probe.helpdesk.http]`: every template's placeholders and every pointer checked, each
    /// error with its key.
    fn http_spec(
        &mut self,
        pre: &str,
        helpdesk: &raw::RawHelpdesk,
        sp: &Spanned<raw::RawHttp>,
    ) -> generic::HttpSpec {
        let t = sp.get_ref();
        let pre = format!("{pre}.http");
        let auth = match (&t.auth_header, &t.auth_value, &t.auth_query) {
            (Some(name), Some(value), None) => {
                if reqwest::header::HeaderName::from_bytes(name.get_ref().as_bytes()).is_err() {
                    self.err(
                        name.span(),
                        key(&pre, "auth_header"),
                        "not an HTTP header name",
                    );
                }
                let v = value.get_ref();
                match generic::placeholders(v, Template::Auth) {
                    Err(e) => self.err(value.span(), key(&pre, "auth_value"), e),
                    Ok(p) if p.len() != 1 || !v.ends_with("{secret}") => self.err(
                        value.span(),
                        key(&pre, "auth_value"),
                        "must end in {secret}, once (as in \"Bearer {secret}\")",
                    ),
                    Ok(_) => {}
                }
                generic::AuthSpec::Header {
                    name: name.get_ref().clone(),
                    value: v.clone(),
                }
            }
            (None, None, Some(q)) => generic::AuthSpec::Query {
                name: q.get_ref().clone(),
            },
            _ => {
                self.err(
                    sp.span(),
                    key(&pre, "auth_header"),
                    "say how the secret is sent: auth_header with auth_value, or auth_query",
                );
                generic::AuthSpec::Query {
                    name: String::new(),
                }
            }
        };
        let find = match &t.find {
            Some(f) => {
                let fk = format!("{pre}.find");
                let r = f.get_ref();
                let request = self.http_request(
                    &fk,
                    Template::Find,
                    r.method.as_ref(),
                    &r.path,
                    &r.query,
                    r.body.as_ref(),
                );
                let mut pointer = |p: &Spanned<String>, name: &str| {
                    if let Err(e) = generic::check_pointer(p.get_ref()) {
                        self.err(p.span(), key(&fk, name), e);
                    }
                    p.get_ref().clone()
                };
                let tickets = pointer(&r.tickets, "tickets");
                let id = pointer(&r.id, "id");
                let subject = r.subject.as_ref().map(|p| pointer(p, "subject"));
                let content = r.content.as_ref().map(|p| pointer(p, "content"));
                let created = r.created.as_ref().map(|p| pointer(p, "created"));
                if subject.is_none() && content.is_none() {
                    self.err(
                        f.span(),
                        key(&fk, "subject"),
                        "name where the token can be found: subject, content or both",
                    );
                }
                generic::FindSpec {
                    request,
                    tickets,
                    id,
                    subject,
                    body: content,
                    created,
                    not_found: r
                        .not_found
                        .as_ref()
                        .map_or_else(|| vec![404], |n| n.get_ref().clone()),
                }
            }
            None => {
                self.err(
                    sp.span(),
                    key(&pre, "find"),
                    "[probe.helpdesk.http.find] is required: how to find a canary's ticket",
                );
                http_placeholder().find
            }
        };
        let mut request = |r: &Option<Spanned<raw::RawHttpRequest>>, name: &str, tpl| {
            r.as_ref().map(|r| {
                let raw = r.get_ref();
                self.http_request(
                    &format!("{pre}.{name}"),
                    tpl,
                    raw.method.as_ref(),
                    &raw.path,
                    &raw.query,
                    raw.body.as_ref(),
                )
            })
        };
        let reply = request(&t.reply, "reply", Template::Reply);
        let cleanup = request(&t.cleanup, "cleanup", Template::Cleanup);
        if reply.is_none() && helpdesk.reply.unwrap_or(ReplyMode::Post) == ReplyMode::Post {
            self.err(
                sp.span(),
                key(&pre, "reply"),
                "reply = \"post\" (the default) needs [probe.helpdesk.http.reply]: how to post the agent reply",
            );
        }
        generic::HttpSpec {
            auth,
            find,
            reply,
            cleanup,
        }
    }

    fn http_request(
        &mut self,
        pre: &str,
        template: Template,
        method: Option<&Spanned<String>>,
        path: &Spanned<String>,
        query: &std::collections::BTreeMap<String, Spanned<String>>,
        body: Option<&Spanned<toml::Value>>,
    ) -> generic::RequestSpec {
        let method = match method {
            None => reqwest::Method::GET,
            Some(m) => match m.get_ref().to_ascii_uppercase().as_str() {
                "GET" => reqwest::Method::GET,
                "POST" => reqwest::Method::POST,
                "PUT" => reqwest::Method::PUT,
                "PATCH" => reqwest::Method::PATCH,
                "DELETE" => reqwest::Method::DELETE,
                _ => {
                    self.err(
                        m.span(),
                        key(pre, "method"),
                        "must be GET, POST, PUT, PATCH or DELETE",
                    );
                    reqwest::Method::GET
                }
            },
        };
        if let Err(e) = generic::placeholders(path.get_ref(), template) {
            self.err(path.span(), key(pre, "path"), e);
        }
        for (k, v) in query {
            if let Err(e) = generic::placeholders(v.get_ref(), template) {
                self.err(v.span(), key(pre, &format!("query.{k}")), e);
            }
        }
        let body = body.and_then(|b| match serde_json::to_value(b.get_ref()) {
            Ok(v) => {
                let mut problems = Vec::new();
                check_json_strings(&v, template, &mut problems);
                for e in problems {
                    self.err(b.span(), key(pre, "body"), e);
                }
                Some(v)
            }
            Err(e) => {
                self.err(b.span(), key(pre, "body"), format!("cannot be JSON: {e}"));
                None
            }
        });
        generic::RequestSpec {
            method,
            path: path.get_ref().clone(),
            query: query
                .iter()
                .map(|(k, v)| (k.clone(), v.get_ref().clone()))
                .collect(),
            body,
        }
    }

    /// `heartbeat_ca_file`: only beside a heartbeat URL (alone it would trust nothing).
    fn heartbeat_ca_file(&mut self, pre: &str, raw: &RawProbe) -> Option<PathBuf> {
        let v = raw.heartbeat_ca_file.as_ref()?;
        if raw.heartbeat_url.is_none() && raw.heartbeat_url_file.is_none() {
            self.err(
                v.span(),
                key(pre, "heartbeat_ca_file"),
                "only used with `heartbeat_url` or `heartbeat_url_file`",
            );
        }
        self.ca_file(Some(v), key(pre, "heartbeat_ca_file"))
    }

    /// `heartbeat_url` (or `_file`): an http(s) URL with a host. Its text is a secret (a
    /// healthchecks.io check is pinged by whoever knows its URL): errors never quote it.
    fn heartbeat_url(&mut self, pre: &str, raw: &RawProbe) -> Option<Secret> {
        let url = self
            .secret(
                pre,
                "heartbeat_url",
                raw.heartbeat_url.as_ref(),
                raw.heartbeat_url_file.as_ref(),
            )
            .ok()
            .flatten()?;
        if self.syntax_only {
            return Some(url);
        }
        let span = raw
            .heartbeat_url
            .as_ref()
            .map(|v| v.span())
            .or_else(|| raw.heartbeat_url_file.as_ref().map(|f| f.span()))
            .unwrap_or_default();
        match reqwest::Url::parse(url.expose()) {
            Ok(u) if (u.scheme() == "http" || u.scheme() == "https") && u.has_host() => Some(url),
            _ => {
                self.err(
                    span,
                    key(pre, "heartbeat_url"),
                    "must be an http:// or https:// URL with a host",
                );
                None
            }
        }
    }

    fn imap(&mut self, pre: &str, sp: &Spanned<raw::RawImap>) -> ImapConfig {
        let raw = sp.get_ref();
        let tls = raw.tls.unwrap_or(Tls::None);
        let default_port = match tls {
            Tls::None | Tls::StartTls => 143,
            Tls::Tls => 993,
        };
        if raw.username.get_ref().is_empty() {
            self.err(
                raw.username.span(),
                key(pre, "username"),
                "must not be empty",
            );
        }
        let mailbox = match &raw.mailbox {
            Some(m) if m.get_ref().is_empty() => {
                self.err(m.span(), key(pre, "mailbox"), "must not be empty");
                String::new()
            }
            Some(m) => m.get_ref().clone(),
            None => "INBOX".to_owned(),
        };
        let junk = match raw.junk.as_ref().map(|j| (j.span(), j.get_ref())) {
            None | Some((_, raw::RawJunk::Enabled(true))) => Junk::SpecialUse,
            Some((_, raw::RawJunk::Enabled(false))) => Junk::Off,
            Some((span, raw::RawJunk::Named(n))) => {
                if n.is_empty() || n.eq_ignore_ascii_case(&mailbox) {
                    self.err(
                        span,
                        key(pre, "junk"),
                        "must name a folder other than `mailbox` (or be true / false)",
                    );
                }
                Junk::Named(n.clone())
            }
        };
        let oauth2 = raw.oauth2.as_ref().map(|o| self.oauth2(pre, o));
        let password = if oauth2.is_some() {
            self.no_password_with_oauth2(pre, raw.password.as_ref(), raw.password_file.as_ref());
            Secret::new("")
        } else {
            self.required_secret(
                sp.span(),
                pre,
                "password",
                raw.password.as_ref(),
                raw.password_file.as_ref(),
            )
        };
        ImapConfig {
            host: self.host(&raw.host, key(pre, "host")),
            port: self.port(raw.port.as_ref(), key(pre, "port"), default_port),
            tls,
            username: raw.username.get_ref().clone(),
            password,
            oauth2,
            mailbox,
            ca_file: self.ca_file(raw.ca_file.as_ref(), key(pre, "ca_file")),
            idle: raw.idle.unwrap_or(true),
            poll_interval: self.duration(
                raw.poll_interval.as_ref(),
                key(pre, "poll_interval"),
                DEFAULT_IMAP_POLL,
            ),
            timeout: self.duration(
                raw.timeout.as_ref(),
                key(pre, "timeout"),
                DEFAULT_IMAP_TIMEOUT,
            ),
            junk,
        }
    }
}

fn placeholder_url() -> reqwest::Url {
    reqwest::Url::parse("http://invalid.invalid/").expect("valid placeholder URL")
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Every string in a JSON body template, checked for placeholders.
fn check_json_strings(v: &serde_json::Value, template: Template, out: &mut Vec<String>) {
    match v {
        serde_json::Value::String(s) => {
            if let Err(e) = generic::placeholders(s, template) {
                out.push(e);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| check_json_strings(v, template, out)),
        serde_json::Value::Object(o) => o
            .values()
            .for_each(|v| check_json_strings(v, template, out)),
        _ => {}
    }
}

/// What a broken `[probe.helpdesk.http]` resolves to while its errors are collected.
fn http_placeholder() -> generic::HttpSpec {
    generic::HttpSpec {
        auth: generic::AuthSpec::Query {
            name: String::new(),
        },
        find: generic::FindSpec {
            request: generic::RequestSpec {
                method: reqwest::Method::GET,
                path: String::new(),
                query: Default::default(),
                body: None,
            },
            tickets: String::new(),
            id: String::new(),
            subject: None,
            body: None,
            created: None,
            not_found: vec![404],
        },
        reply: None,
        cleanup: None,
    }
}
