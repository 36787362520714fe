//! The generic HTTP adapter (`api = "http"`): a helpdesk described entirely in the config.
//!
//! Three request templates (find, reply, cleanup: method, path, query, JSON body) with
//! placeholders, an auth header template, and JSON pointers (RFC 6901) into the find answer:
//! where the list of tickets is, and a ticket's id, subject, body and created time. No vendor
//! code: the suite runs one generic config against the sandbox's SupportBee API and one against
//! real Request Tracker 5.
//!
//! **Placeholders.** `{token}` (the canary's token), `{since}` (RFC 3339, UTC),
//! `{since_epoch}` (Unix seconds), `{since_date}` (`YYYY-MM-DD`, a day early: a date read in
//! the helpdesk's own timezone still holds), `{ticket_id}`, `{body}` (the reply text), and
//! `{secret}` (the API secret, in the auth template only). Which are allowed depends on the
//! template ([`Template`] names them); an unknown one is a config error with file, line and key.
//! In a path, a value is one percent-encoded segment. In a JSON body, a string that is exactly
//! `"{ticket_id:number}"` becomes a JSON number (django-helpdesk wants `"ticket": 7`); any other
//! string gets its placeholders replaced as text, so the JSON stays well formed whatever the
//! value holds.
//!
//! **Not yet.** An empty list, a missing list pointer, or a status listed in `not_found`
//! (default 404) means "not imported yet": keep polling. Any other non-2xx is an `api` error;
//! a 2xx that is not JSON, or whose list is not an array, is an `api` error saying so.
//!
//! The reply is sent once (never retried after it may have been acted on): the adapter cannot
//! look for a reply on the ticket, so after a failed reply the flow posts it again.

use std::{
    collections::BTreeMap,
    fmt,
    time::{Duration, SystemTime},
};

use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::{Method, header::HeaderName};
use serde_json::Value;

use super::{
    CleanupMode, HelpdeskError, TicketRef,
    http::{ApiClient, Auth, ClientParams, RetryPolicy, Safety},
};

/// How far before `since` a ticket's created time still counts (its clock against ours).
const CLOCK_SLACK: Duration = Duration::from_secs(300);

/// Which template a placeholder list is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Template {
    Find,
    Reply,
    Cleanup,
    Auth,
}

impl Template {
    /// The placeholders this template may use.
    pub fn allowed(self) -> &'static [&'static str] {
        match self {
            Template::Find => &["token", "since", "since_epoch", "since_date"],
            Template::Reply => &["token", "ticket_id", "body"],
            Template::Cleanup => &["token", "ticket_id"],
            Template::Auth => &["secret"],
        }
    }
}

/// The placeholders of a template string (`{name}` or `{name:number}`), or what is wrong with
/// it: an unclosed brace, an unknown name, a type other than `number`.
pub fn placeholders(text: &str, template: Template) -> Result<Vec<String>, String> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            return Err(format!("unclosed `{{` in {text:?}"));
        };
        let inner = &after[..close];
        let (name, kind) = match inner.split_once(':') {
            Some((n, k)) => (n, Some(k)),
            None => (inner, None),
        };
        if let Some(k) = kind
            && k != "number"
        {
            return Err(format!(
                "`{{{inner}}}`: the only type is `number` (as in {{ticket_id:number}})"
            ));
        }
        if !template.allowed().contains(&name) {
            return Err(format!(
                "unknown placeholder `{{{name}}}`; this template may use {}",
                template
                    .allowed()
                    .iter()
                    .map(|p| format!("{{{p}}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        found.push(name.to_string());
        rest = &after[close + 1..];
    }
    Ok(found)
}

/// Whether `p` is a JSON pointer (RFC 6901): empty, or `/`-separated tokens where `~` is only
/// `~0` or `~1`.
pub fn check_pointer(p: &str) -> Result<(), String> {
    if p.is_empty() {
        return Ok(());
    }
    if !p.starts_with('/') {
        return Err(format!(
            "{p:?} is not a JSON pointer: it must start with `/` (as in \"/tickets\")"
        ));
    }
    let mut chars = p.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
            return Err(format!(
                "{p:?} is not a JSON pointer: `~` must be `~0` or `~1`"
            ));
        }
    }
    Ok(())
}

/// One request template.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestSpec {
    pub method: Method,
    /// Relative to the base URL, `/`-separated; `{…}` only as whole segments' parts.
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub body: Option<Value>,
}

/// Where a ticket's fields are in the find answer.
#[derive(Clone, Debug, PartialEq)]
pub struct FindSpec {
    pub request: RequestSpec,
    /// The array of tickets ("" = the answer itself).
    pub tickets: String,
    pub id: String,
    pub subject: Option<String>,
    pub body: Option<String>,
    pub created: Option<String>,
    /// Statuses that mean "no ticket yet".
    pub not_found: Vec<u16>,
}

/// How the secret is attached.
#[derive(Clone, Debug, PartialEq)]
pub enum AuthSpec {
    /// `name: value` with `{secret}` in the value.
    Header { name: String, value: String },
    /// `?name=SECRET` on every request.
    Query { name: String },
}

/// The whole generic description, as the config resolved it.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpSpec {
    pub auth: AuthSpec,
    pub find: FindSpec,
    pub reply: Option<RequestSpec>,
    pub cleanup: Option<RequestSpec>,
}

/// Where and how to reach the helpdesk.
#[derive(Clone)]
pub struct GenericParams {
    pub base_url: String,
    pub secret: String,
    pub spec: HttpSpec,
    pub timeout: Duration,
    pub retry: RetryPolicy,
    pub extra_roots_pem: Option<Vec<u8>>,
}

pub struct Generic {
    api: ApiClient,
    spec: HttpSpec,
}

impl fmt::Debug for Generic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Generic")
            .field("api", &self.api)
            .field("find", &self.spec.find.request.path)
            .finish_non_exhaustive()
    }
}

/// The values placeholders take in one call.
#[derive(Default)]
struct Values<'a> {
    token: &'a str,
    ticket_id: &'a str,
    body: &'a str,
    since: Option<SystemTime>,
}

impl Values<'_> {
    fn get(&self, name: &str) -> String {
        let since = self.since.map(DateTime::<Utc>::from);
        match name {
            "token" => self.token.to_string(),
            "ticket_id" => self.ticket_id.to_string(),
            "body" => self.body.to_string(),
            "since" => since
                .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
                .unwrap_or_default(),
            "since_epoch" => since.map(|t| t.timestamp().to_string()).unwrap_or_default(),
            "since_date" => since
                .map(|t| {
                    (t - chrono::Duration::days(1))
                        .format("%Y-%m-%d")
                        .to_string()
                })
                .unwrap_or_default(),
            _ => String::new(),
        }
    }

    /// `text` with every `{name}` replaced (the config checked the names).
    fn fill(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let Some(close) = after.find('}') else {
                out.push_str(&rest[open..]);
                return out;
            };
            let name = after[..close].split(':').next().unwrap_or_default();
            out.push_str(&self.get(name));
            rest = &after[close + 1..];
        }
        out.push_str(rest);
        out
    }

    /// A JSON body with its strings filled; `"{x:number}"` as a whole becomes a number.
    fn fill_json(&self, v: &Value) -> Value {
        match v {
            Value::String(s) => {
                if let Some(name) = s.strip_prefix('{').and_then(|s| s.strip_suffix(":number}")) {
                    let text = self.get(name);
                    return text
                        .parse::<u64>()
                        .map(Value::from)
                        .or_else(|_| text.parse::<f64>().map(Value::from))
                        .unwrap_or(Value::String(text));
                }
                Value::String(self.fill(s))
            }
            Value::Array(a) => Value::Array(a.iter().map(|v| self.fill_json(v)).collect()),
            Value::Object(o) => Value::Object(
                o.iter()
                    .map(|(k, v)| (k.clone(), self.fill_json(v)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }
}

/// A created time as helpdesks give it: RFC 3339, `YYYY-MM-DD HH:MM:SS` (UTC), or Unix
/// seconds (or milliseconds, if the number is that large) as a number or a string.
fn parse_time(v: &Value) -> Option<SystemTime> {
    let epoch = |n: f64| {
        let secs = if n > 1e11 { n / 1000.0 } else { n };
        (secs >= 0.0).then(|| SystemTime::UNIX_EPOCH + Duration::from_secs_f64(secs))
    };
    match v {
        Value::Number(n) => epoch(n.as_f64()?),
        Value::String(s) => {
            super::rt::parse_created(s).or_else(|| s.parse::<f64>().ok().and_then(epoch))
        }
        _ => None,
    }
}

/// A field as text: strings as they are, numbers as digits; nothing else.
fn text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

impl Generic {
    pub fn new(params: GenericParams) -> Result<Generic, HelpdeskError> {
        let auth = match &params.spec.auth {
            AuthSpec::Query { name } => Auth::Query { name: name.clone() },
            AuthSpec::Header { name, value } => {
                let header =
                    HeaderName::from_bytes(name.as_bytes()).map_err(|_| HelpdeskError {
                        reason: crate::canary::life::Reason::Api,
                        detail: format!("{name:?} is not an HTTP header name"),
                        attempts: 0,
                        maybe_applied: false,
                    })?;
                // The template around the secret: `Token {secret}` → prefix `Token `. A
                // template with text after the secret is not supported (the config says so).
                let prefix = value.split("{secret}").next().unwrap_or_default();
                Auth::Header {
                    name: header,
                    prefix: prefix.to_string(),
                }
            }
        };
        Ok(Generic {
            api: ApiClient::new(ClientParams {
                base_url: params.base_url,
                secret: params.secret,
                auth,
                timeout: params.timeout,
                retry: params.retry,
                extra_roots_pem: params.extra_roots_pem,
                rate_limit_headers: &[],
            })?,
            spec: params.spec,
        })
    }

    async fn send(
        &self,
        spec: &RequestSpec,
        values: &Values<'_>,
        safety: Safety,
    ) -> Result<(String, super::http::Answer), HelpdeskError> {
        let segments: Vec<String> = spec
            .path
            .trim_start_matches('/')
            .split('/')
            .map(|s| values.fill(s))
            .collect();
        let query: Vec<(String, String)> = spec
            .query
            .iter()
            .map(|(k, v)| (k.clone(), values.fill(v)))
            .collect();
        let what = format!("{} {}", spec.method, spec.path);
        let answer = self
            .api
            .call(
                spec.method.clone(),
                &segments.iter().map(String::as_str).collect::<Vec<_>>(),
                &query
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect::<Vec<_>>(),
                spec.body.as_ref().map(|b| values.fill_json(b)),
                safety,
            )
            .await?;
        Ok((what, answer))
    }

    async fn find(&self, token: &str, since: SystemTime) -> Result<Vec<TicketRef>, HelpdeskError> {
        let f = &self.spec.find;
        let values = Values {
            token,
            since: Some(since),
            ..Default::default()
        };
        let (what, answer) = self.send(&f.request, &values, Safety::Idempotent).await?;
        if f.not_found.contains(&answer.status.as_u16()) {
            return Ok(Vec::new());
        }
        let doc: Value = self.api.json(&what, &answer)?;
        let list = match doc.pointer(&f.tickets) {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::Array(a)) => a,
            Some(other) => {
                let kind = match other {
                    Value::Object(_) => "an object",
                    Value::String(_) => "a string",
                    Value::Number(_) => "a number",
                    _ => "not an array",
                };
                return Err(self.api.content_error(
                    &what,
                    &format!("tickets pointer {:?} is {kind}, not an array", f.tickets),
                ));
            }
        };
        let token_lc = token.to_lowercase();
        let earliest = since.checked_sub(CLOCK_SLACK).unwrap_or(since);
        let mut found = Vec::new();
        for t in list {
            let Some(id) = text(t.pointer(&f.id)) else {
                return Err(self.api.content_error(
                    &what,
                    &format!("a ticket without a text or number at id pointer {:?}", f.id),
                ));
            };
            let carries = [&f.subject, &f.body].iter().any(|p| {
                p.as_deref()
                    .and_then(|p| text(t.pointer(p)))
                    .is_some_and(|s| s.to_lowercase().contains(&token_lc))
            });
            if !carries {
                continue;
            }
            let created_at = f
                .created
                .as_deref()
                .and_then(|p| t.pointer(p))
                .and_then(parse_time);
            if created_at.is_some_and(|c| c < earliest) {
                continue;
            }
            found.push(TicketRef { id, created_at });
        }
        Ok(found)
    }

    async fn reply(&self, ticket: &TicketRef, body: &str) -> Result<(), HelpdeskError> {
        let Some(spec) = &self.spec.reply else {
            return Err(self.api.content_error(
                "reply",
                "reply = \"post\" needs a [probe.helpdesk.http.reply] request",
            ));
        };
        let values = Values {
            ticket_id: &ticket.id,
            body,
            ..Default::default()
        };
        let (what, answer) = self.send(spec, &values, Safety::Once).await?;
        self.api.success(&what, &answer)
    }

    async fn clean(&self, ticket: &TicketRef, how: CleanupMode) -> Result<(), HelpdeskError> {
        let (Some(spec), false) = (&self.spec.cleanup, how == CleanupMode::None) else {
            return Ok(());
        };
        let values = Values {
            ticket_id: &ticket.id,
            ..Default::default()
        };
        let (what, answer) = self.send(spec, &values, Safety::Idempotent).await?;
        self.api.success_or_gone(&what, &answer)
    }
}

super::impl_vendor!(Generic);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn placeholders_are_checked_per_template() {
        assert_eq!(
            placeholders("tickets/{ticket_id}/", Template::Reply).unwrap(),
            vec!["ticket_id"]
        );
        assert!(placeholders("Subject LIKE '{token}'", Template::Find).is_ok());
        let e = placeholders("{ticket}", Template::Cleanup).unwrap_err();
        assert!(e.contains("unknown placeholder `{ticket}`"), "{e}");
        assert!(e.contains("{ticket_id}"), "{e}");
        assert!(placeholders("{body}", Template::Find).is_err());
        assert!(
            placeholders("{token", Template::Find)
                .unwrap_err()
                .contains("unclosed")
        );
        assert!(placeholders("{ticket_id:int}", Template::Reply).is_err());
        assert!(placeholders("{ticket_id:number}", Template::Reply).is_ok());
    }

    #[test]
    fn pointers_follow_rfc_6901() {
        assert!(check_pointer("").is_ok());
        assert!(check_pointer("/items/0/id").is_ok());
        assert!(check_pointer("/a~1b/~0c").is_ok());
        assert!(check_pointer("items").is_err());
        assert!(check_pointer("/a~2").is_err());
    }

    #[test]
    fn values_fill_text_and_json_without_breaking_it() {
        let since = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_633_600); // 2025-12-02T00:00:00Z
        let v = Values {
            token: "mc-1",
            ticket_id: "42",
            body: "say \"hi\"\n",
            since: Some(since),
        };
        assert_eq!(v.fill("t/{ticket_id}/x"), "t/42/x");
        assert_eq!(v.fill("{since}"), "2025-12-02T00:00:00Z");
        assert_eq!(v.fill("{since_epoch}"), "1764633600");
        assert_eq!(v.fill("{since_date}"), "2025-12-01");
        let body = v.fill_json(&json!({
            "ticket": "{ticket_id:number}",
            "comment": "{body}",
            "nested": [{"id": "#{ticket_id}"}],
            "public": true
        }));
        assert_eq!(
            body,
            json!({"ticket": 42, "comment": "say \"hi\"\n", "nested": [{"id": "#42"}], "public": true})
        );
        // A non-numeric id stays text.
        let v = Values {
            ticket_id: "abc",
            ..Default::default()
        };
        assert_eq!(v.fill_json(&json!("{ticket_id:number}")), json!("abc"));
    }

    #[test]
    fn created_times_in_the_forms_helpdesks_use() {
        let want = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_633_600);
        for v in [
            json!("2025-12-02T00:00:00Z"),
            json!("2025-12-02T01:00:00+01:00"),
            json!("2025-12-02 00:00:00"),
            json!(1_764_633_600),
            json!(1_764_633_600_000u64),
            json!("1764633600"),
        ] {
            assert_eq!(parse_time(&v), Some(want), "{v}");
        }
        assert_eq!(parse_time(&json!("yesterday")), None);
        assert_eq!(parse_time(&json!(null)), None);
    }
}
