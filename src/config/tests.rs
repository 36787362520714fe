//! Tests of loading, resolving and checking configs. Environment variables are injected
//! (never `set_var`: tests run in parallel threads), secret files live in temp dirs.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use super::resolve::{self, FileText};
use super::*;
use crate::canary::hops::AuthMethod;

const HELPDESK_EXAMPLE: &str = include_str!("../../probes/helpdesk.example.toml");
const MAIL_LOOP_EXAMPLE: &str = include_str!("../../probes/mail-loop.toml");
const RT_EXAMPLE: &str = include_str!("../../probes/rt.example.toml");
const DJANGO_EXAMPLE: &str = include_str!("../../probes/django-helpdesk.example.toml");
const GENERIC_EXAMPLE: &str = include_str!("../../probes/generic-http.example.toml");
const ZAMMAD_EXAMPLE: &str = include_str!("../../probes/zammad.example.toml");
const ZENDESK_EXAMPLE: &str = include_str!("../../probes/zendesk.example.toml");
const FRONT_EXAMPLE: &str = include_str!("../../probes/front.example.toml");
const HELPSCOUT_EXAMPLE: &str = include_str!("../../probes/helpscout.example.toml");
const FRESHDESK_EXAMPLE: &str = include_str!("../../probes/freshdesk.example.toml");
const SEVERAL_MAILBOXES_EXAMPLE: &str = include_str!("../../probes/several-mailboxes.example.toml");
const M365_EXAMPLE: &str = include_str!("../../probes/microsoft365.example.toml");
const GMAIL_EXAMPLE: &str = include_str!("../../probes/gmail.example.toml");

fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |name| map.get(name).cloned()
}

/// Parses `text` as the file `origin` with the given environment; relative paths from `dir`.
fn parse_env(
    text: &str,
    origin: &str,
    dir: Option<&Path>,
    vars: &[(&str, &str)],
) -> Result<Config, ConfigErrors> {
    let env = env_of(vars);
    resolve::resolve_files(
        &[FileText::new(origin, text, dir.map(Path::to_path_buf))],
        &env,
    )
}

fn parse(text: &str) -> Result<Config, ConfigErrors> {
    parse_env(text, "t.toml", None, &[])
}

fn errors(text: &str) -> Vec<ConfigError> {
    parse(text).expect_err("config should be rejected").0
}

/// A minimal valid mail-loop probe; `extra` is inserted in the `[[probe]]` table.
fn mail_loop(name: &str, extra: &str) -> String {
    format!(
        r#"[[probe]]
name = "{name}"
kind = "mail_loop"
{extra}
[probe.smtp]
host = "127.0.0.1"
from = "a@example.test"
to = "b@example.test"

[probe.imap]
host = "127.0.0.1"
username = "b@example.test"
password = "pw"
"#
    )
}

fn helpdesk(reply: &str) -> String {
    format!(
        r#"[[probe]]
name = "hd"
kind = "helpdesk"

[probe.smtp]
host = "127.0.0.1"
from = "a@example.test"
to = "support@example.test"

[probe.helpdesk]
api = "supportbee"
base_url = "http://127.0.0.1:8088"
token = "t"
reply = "{reply}"

[probe.imap]
host = "127.0.0.1"
username = "a@example.test"
password = "pw"
"#
    )
}

/// The only error, which must be at `line` and name `key`.
fn single_error(text: &str, line: usize, key: &str) -> ConfigError {
    let errs = errors(text);
    assert_eq!(errs.len(), 1, "{}", ConfigErrors(errs.clone()));
    let e = errs.into_iter().next().unwrap();
    assert_eq!(e.position.map(|p| p.line), Some(line), "{e}");
    assert_eq!(e.key.as_deref(), Some(key), "{e}");
    e
}

// --- the shipped files ---

#[test]
fn sandbox_default_parses_and_probes_the_sandbox_defaults() {
    let c = sandbox_default();
    assert_eq!(c.prober.listen, DEFAULT_LISTEN.parse().unwrap());
    assert_eq!(c.probes.len(), 1);
    let p = &c.probes[0];
    assert_eq!(p.name, "sandbox");
    assert_eq!(p.kind, ProbeKind::Helpdesk);
    assert_eq!((p.smtp.host.as_str(), p.smtp.port), ("127.0.0.1", 2525));
    assert_eq!(p.smtp.from, "canary@prober.test");
    assert_eq!(p.smtp.to, "support@helpdesk.test");
    let h = p.helpdesk.as_ref().unwrap();
    assert_eq!(h.base_url.as_str(), "http://127.0.0.1:8088/");
    assert_eq!(h.token.expose(), "sandbox");
    assert_eq!(h.reply, ReplyMode::Post);
    assert_eq!(
        (p.mailboxes[0].imap.host.as_str(), p.mailboxes[0].imap.port),
        ("127.0.0.1", 1143)
    );
    assert_eq!(p.mailboxes[0].imap.username, "canary@prober.test");
    assert_eq!(p.mailboxes[0].imap.password.expose(), "sandbox");
    assert_eq!(
        p.stages(),
        vec![
            StageName::Submit,
            StageName::Import,
            StageName::Reply,
            StageName::Delivery,
            StageName::EndToEnd
        ]
    );
}

/// Points the examples' `/run/secrets/...` files into `dir` and creates them there.
fn with_secret_files(text: &str, dir: &Path) -> String {
    for (rel, content) in [
        ("imap/password", "imap-pw\n"),
        ("smtp/password", "smtp-pw\n"),
        ("rt/token", "1-14-rt-token\n"),
        ("django-helpdesk/token", "0123456789abcdef\n"),
        ("helpdesk/token", "generic-token\n"),
        ("zammad/token", "zammad-token\n"),
        ("zammad/webhook", "zammad-signature-token\n"),
        ("zendesk/api-token", "zendesk-api-token\n"),
        ("zendesk/webhook-signing-secret", "zendesk-signing-secret\n"),
        ("front/token", "front-api-token\n"),
        ("front/webhook", "front-app-secret\n"),
        ("helpscout/app-secret", "helpscout-app-secret\n"),
        ("helpscout/webhook-secret", "helpscout-hook-secret\n"),
        ("freshdesk/api-key", "fd-api-key\n"),
        ("freshdesk/webhook", "fd-hook-secret\n"),
        ("m365/client_secret", "m365-client-secret\n"),
        ("gmail/client_secret", "gmail-client-secret\n"),
        ("gmail/refresh_token", "1//gmail-refresh-token\n"),
    ] {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }
    text.replace("/run/secrets/", &format!("{}/", dir.display()))
}

#[test]
fn helpdesk_example_parses() {
    let dir = tempfile::tempdir().unwrap();
    let text = with_secret_files(HELPDESK_EXAMPLE, dir.path());
    let vars = [
        ("SMTP_PASSWORD", "smtp-env"),
        ("SUPPORTBEE_TOKEN", "sb-token"),
    ];
    let c = parse_env(&text, "helpdesk.example.toml", Some(dir.path()), &vars)
        .unwrap_or_else(|e| panic!("{e}"));
    let p = &c.probes[0];
    assert_eq!(p.kind, ProbeKind::Helpdesk);
    assert_eq!(p.smtp.tls, Tls::StartTls);
    assert_eq!(p.smtp.password.as_ref().unwrap().expose(), "smtp-env");
    assert_eq!(p.helpdesk.as_ref().unwrap().token.expose(), "sb-token");
    assert_eq!(
        p.mailboxes[0].imap.password.expose(),
        "imap-pw",
        "one trailing newline trimmed"
    );
    assert_eq!(
        p.deadlines.get(StageName::EndToEnd),
        Duration::from_secs(300)
    );
}

#[test]
fn mail_loop_example_parses() {
    let dir = tempfile::tempdir().unwrap();
    let text = with_secret_files(MAIL_LOOP_EXAMPLE, dir.path());
    let c = parse_env(
        &text,
        "mail-loop.toml",
        Some(dir.path()),
        &[("SMTP_PASSWORD", "smtp-env")],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let p = &c.probes[0];
    assert_eq!(p.kind, ProbeKind::MailLoop);
    assert!(p.helpdesk.is_none());
    assert_eq!(p.smtp.port, 587, "submission");
    assert_eq!(p.smtp.tls, Tls::StartTls);
    assert!(p.smtp.password.is_some(), "read from its file");
    assert_eq!(p.mailboxes[0].imap.port, 993);
    assert_eq!(p.mailboxes[0].imap.tls, Tls::Tls);
    assert!(p.mailboxes[0].imap.idle);
    assert_eq!(
        p.stages(),
        vec![StageName::Submit, StageName::Delivery, StageName::EndToEnd]
    );
    assert_eq!(
        p.deadlines.end_to_end,
        Duration::from_secs(150),
        "submit + delivery"
    );
}

#[test]
fn the_probes_directory_loads_as_a_whole_given_its_secrets() {
    // The shipped files together: distinct names, one [prober].
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [
        ("sandbox.toml", SANDBOX_TOML),
        ("helpdesk.example.toml", HELPDESK_EXAMPLE),
        ("mail-loop.toml", MAIL_LOOP_EXAMPLE),
        ("rt.example.toml", RT_EXAMPLE),
        ("django-helpdesk.example.toml", DJANGO_EXAMPLE),
        ("generic-http.example.toml", GENERIC_EXAMPLE),
        ("zammad.example.toml", ZAMMAD_EXAMPLE),
        ("zendesk.example.toml", ZENDESK_EXAMPLE),
        ("front.example.toml", FRONT_EXAMPLE),
        ("helpscout.example.toml", HELPSCOUT_EXAMPLE),
        ("freshdesk.example.toml", FRESHDESK_EXAMPLE),
        ("several-mailboxes.example.toml", SEVERAL_MAILBOXES_EXAMPLE),
        ("microsoft365.example.toml", M365_EXAMPLE),
        ("gmail.example.toml", GMAIL_EXAMPLE),
    ] {
        std::fs::write(dir.path().join(name), with_secret_files(text, dir.path())).unwrap();
    }
    let env = env_of(&[("SMTP_PASSWORD", "x"), ("SUPPORTBEE_TOKEN", "y")]);
    let c = resolve::load(dir.path(), &env).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> = c.probes.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "django-support",
            "freshdesk-support",
            "front-support",
            "any-helpdesk",
            "gmail-loop",
            "supportbee-prod",
            "helpscout-support",
            "mail-loop",
            "m365-loop",
            "rt-support",
            "sandbox",
            "deliverability",
            "zammad-support",
            "zendesk-support"
        ],
        "sorted by file name"
    );
    assert_eq!(
        c.warnings(),
        Vec::<String>::new(),
        "the shipped files warn about nothing"
    );
}

// --- error reporting ---

#[test]
fn unknown_key_reports_its_line_and_key() {
    let text = mail_loop("a", "").replace(
        "to = \"b@example.test\"",
        "to = \"b@example.test\"\nprot = 25",
    );
    let e = single_error(&text, 9, "probe[0].smtp.prot");
    assert!(e.message.contains("unknown field `prot`"), "{e}");
    assert!(
        e.to_string()
            .starts_with("t.toml:9:1: probe[0].smtp.prot: unknown field"),
        "{e}"
    );
}

#[test]
fn unknown_top_level_key_is_an_error() {
    let text = format!("[probes]\nx = 1\n{}", mail_loop("a", ""));
    single_error(&text, 1, "probes");
}

#[test]
fn bad_duration_reports_its_value() {
    let e = single_error(
        &mail_loop("a", "interval = \"10 parsecs\""),
        4,
        "probe[0].interval",
    );
    assert!(e.message.contains("invalid duration"), "{e}");
    assert_eq!(e.position.unwrap().column, 12);
}

#[test]
fn syntax_error_reports_its_line() {
    let text = format!("{}\n[probe.imap\n", mail_loop("a", ""));
    let errs = errors(&text);
    assert_eq!(errs[0].position.unwrap().line, 15, "{}", errs[0]);
}

#[test]
fn missing_field_names_the_field() {
    let text = mail_loop("a", "").replace("host = \"127.0.0.1\"\nfrom", "from");
    let e = single_error(&text, 5, "probe[0].smtp.host");
    assert!(e.message.contains("missing field"), "{e}");
}

#[test]
fn missing_env_var_is_an_error_with_key() {
    let text = mail_loop("a", "").replace("password = \"pw\"", "password = \"x-${NO_SUCH_VAR}\"");
    let e = single_error(&text, 13, "probe[0].imap.password");
    assert!(e.message.contains("NO_SUCH_VAR"), "{e}");
}

#[test]
fn env_vars_expand_whole_or_embedded() {
    let text = mail_loop("a", "").replace(
        "password = \"pw\"",
        "password = \"${A}:${B_2}$${literal}$x\"",
    );
    let c = parse_env(&text, "t.toml", None, &[("A", "one"), ("B_2", "two")]).unwrap();
    assert_eq!(
        c.probes[0].mailboxes[0].imap.password.expose(),
        "one:two${literal}$x"
    );
}

#[test]
fn password_and_password_file_together_is_an_error() {
    let text = mail_loop("a", "").replace(
        "password = \"pw\"",
        "password = \"pw\"\npassword_file = \"/dev/null\"",
    );
    let e = single_error(&text, 14, "probe[0].imap.password_file");
    assert!(e.message.contains("not both"), "{e}");
}

#[test]
fn missing_password_is_an_error() {
    let text = mail_loop("a", "").replace("password = \"pw\"\n", "");
    single_error(&text, 10, "probe[0].imap.password");
}

#[test]
fn smtp_username_without_password_is_an_error() {
    let text = mail_loop("a", "").replace(
        "host = \"127.0.0.1\"\nfrom",
        "host = \"h\"\nusername = \"u\"\nfrom",
    );
    single_error(&text, 7, "probe[0].smtp.password");
}

#[test]
fn secret_file_is_relative_to_the_config_file_and_loses_one_newline() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pw"), "secret\n\n").unwrap();
    let text = mail_loop("a", "").replace("password = \"pw\"", "password_file = \"pw\"");
    std::fs::write(dir.path().join("a.toml"), text).unwrap();
    let c = load(&dir.path().join("a.toml")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.probes[0].mailboxes[0].imap.password.expose(), "secret\n");
}

#[test]
fn unreadable_secret_file_names_file_line_and_key() {
    let text =
        mail_loop("a", "").replace("password = \"pw\"", "password_file = \"/nonexistent/pw\"");
    let e = single_error(&text, 13, "probe[0].imap.password_file");
    assert!(e.message.contains("/nonexistent/pw"), "{e}");
}

#[test]
fn every_error_of_every_probe_is_reported() {
    let text = format!(
        "{}{}",
        mail_loop("Bad Name", "jitter = \"2m\""),
        mail_loop("ok", "")
            .replace("port", "x")
            .replace("to = \"b@example.test\"", "to = \"nobody\"\nport = 0"),
    );
    let errs = errors(&text);
    let keys: Vec<&str> = errs.iter().filter_map(|e| e.key.as_deref()).collect();
    assert_eq!(
        keys,
        [
            "probe[0].name",
            "probe[0].jitter",
            "probe[1].smtp.to",
            "probe[1].smtp.port"
        ],
        "{}",
        ConfigErrors(errs.clone())
    );
}

#[test]
fn a_broken_probe_does_not_hide_the_errors_of_the_next() {
    let text = format!(
        "{}{}",
        mail_loop("a", "bogus = 1"),
        mail_loop("b", "max_in_flight = 0")
    );
    let keys: Vec<String> = errors(&text).into_iter().filter_map(|e| e.key).collect();
    assert_eq!(keys, ["probe[0].bogus", "probe[1].max_in_flight"]);
}

#[test]
fn duration_rules() {
    single_error(
        &mail_loop("a", "interval = \"50ms\""),
        4,
        "probe[0].interval",
    );
    single_error(
        &mail_loop("a", "interval = \"10s\"\njitter = \"10s\""),
        5,
        "probe[0].jitter",
    );
    single_error(
        &mail_loop("a", "[probe.deadlines]\nsubmit = \"0s\""),
        5,
        "probe[0].deadlines.submit",
    );
    let e = single_error(
        &mail_loop("a", "lost_after = \"1m\""),
        4,
        "probe[0].lost_after",
    );
    assert!(e.message.contains("end_to_end"), "{e}");
}

#[test]
fn deadline_of_a_stage_the_probe_lacks_is_an_error() {
    single_error(
        &mail_loop("a", "[probe.deadlines]\nimport = \"1m\""),
        5,
        "probe[0].deadlines.import",
    );
    let text = helpdesk("auto").replace(
        "[probe.smtp]",
        "[probe.deadlines]\nreply = \"1m\"\n\n[probe.smtp]",
    );
    single_error(&text, 6, "probe[0].deadlines.reply");
}

#[test]
fn helpdesk_table_is_required_for_helpdesk_and_refused_for_mail_loop() {
    let without: String = helpdesk("post")
        .split("[probe.helpdesk]")
        .next()
        .unwrap()
        .to_owned()
        + "[probe.imap]\nhost = \"h\"\nusername = \"u\"\npassword = \"p\"\n";
    single_error(&without, 3, "probe[0].helpdesk");
    let with = helpdesk("post").replace("kind = \"helpdesk\"", "kind = \"mail_loop\"");
    single_error(&with, 10, "probe[0].helpdesk");
}

#[test]
fn base_url_must_be_http() {
    let text = helpdesk("post").replace("http://127.0.0.1:8088", "ftp://example.test");
    single_error(&text, 12, "probe[0].helpdesk.base_url");
    let text = helpdesk("post").replace("http://127.0.0.1:8088", "not a url");
    single_error(&text, 12, "probe[0].helpdesk.base_url");
}

/// A self-signed CA certificate (P-256, valid for a century; only its form is checked here).
const TEST_CA: &str = include_str!("test-ca.pem");

/// A `ca_file` must hold PEM certificates: a key, or anything else, is an error at its line
/// (it used to pass `check` and stop `run` at start, with no file, line or key).
#[test]
fn a_ca_file_without_a_certificate_is_an_error_at_its_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), TEST_CA).unwrap();
    std::fs::write(
        dir.path().join("key.pem"),
        "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("text.pem"), "not a certificate\n").unwrap();
    let text =
        |file: &str| mail_loop("a", "").replace("from =", &format!("ca_file = \"{file}\"\nfrom ="));
    parse_env(&text("ca.pem"), "p.toml", Some(dir.path()), &[]).unwrap_or_else(|e| panic!("{e}"));
    for bad in ["key.pem", "text.pem"] {
        let errs = parse_env(&text(bad), "p.toml", Some(dir.path()), &[])
            .unwrap_err()
            .0;
        assert_eq!(errs.len(), 1, "{}", ConfigErrors(errs.clone()));
        assert_eq!(errs[0].position.map(|p| p.line), Some(7));
        assert_eq!(errs[0].key.as_deref(), Some("probe[0].smtp.ca_file"));
        assert!(
            errs[0].message.contains("no PEM certificate found"),
            "{}",
            errs[0]
        );
    }
}

#[test]
fn a_heartbeat_ca_file_needs_a_heartbeat_url() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), TEST_CA).unwrap();
    let text = mail_loop("a", "").replace(
        "kind = \"mail_loop\"\n",
        "kind = \"mail_loop\"\nheartbeat_ca_file = \"ca.pem\"\n",
    );
    let errs = parse_env(&text, "p.toml", Some(dir.path()), &[])
        .unwrap_err()
        .0;
    assert_eq!(errs.len(), 1, "{}", ConfigErrors(errs.clone()));
    assert_eq!(errs[0].key.as_deref(), Some("probe[0].heartbeat_ca_file"));
    let text = text.replace(
        "heartbeat_ca_file",
        "heartbeat_url = \"https://hc.corp/ping/x\"\nheartbeat_ca_file",
    );
    let cfg = parse_env(&text, "p.toml", Some(dir.path()), &[]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        cfg.probes[0].heartbeat_ca_file,
        Some(dir.path().join("ca.pem"))
    );
}

#[test]
fn ca_file_must_exist() {
    let text = mail_loop("a", "").replace("from =", "ca_file = \"/nonexistent/ca.pem\"\nfrom =");
    single_error(&text, 7, "probe[0].smtp.ca_file");
}

/// A self-hosted helpdesk or identity provider behind a private CA: `ca_file` on
/// `[probe.helpdesk]` and `[probe.*.oauth2]` is read relative to the config file, must exist,
/// and means nothing beside a token file (no HTTP is made then).
#[test]
fn helpdesk_and_token_endpoint_take_a_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("corp-ca.pem"), TEST_CA).unwrap();
    let parse_in = |text: &str| {
        parse_env(text, "p.toml", Some(dir.path()), &[]).unwrap_or_else(|e| panic!("{e}"))
    };
    let text = helpdesk("post").replace(
        "token = \"t\"\n",
        "token = \"t\"\nca_file = \"corp-ca.pem\"\n",
    );
    let cfg = parse_in(&text);
    let h = cfg.probes[0].helpdesk.as_ref().unwrap();
    assert_eq!(
        h.ca_file.as_deref(),
        Some(dir.path().join("corp-ca.pem").as_path())
    );
    let missing = helpdesk("post").replace(
        "token = \"t\"\n",
        "token = \"t\"\nca_file = \"/nonexistent/ca.pem\"\n",
    );
    single_error(&missing, 14, "probe[0].helpdesk.ca_file");

    let cfg = parse_in(&imap_oauth2(
        "grant = \"client_credentials\"\ntoken_endpoint = \"https://idp.corp/t\"\n\
         client_id = \"c\"\nclient_secret = \"s\"\nca_file = \"corp-ca.pem\"\n",
    ));
    let o = cfg.probes[0].mailboxes[0].imap.oauth2.clone().unwrap();
    assert_eq!(o.ca_file, Some(dir.path().join("corp-ca.pem")));
    single_error(
        &imap_oauth2(
            "grant = \"client_credentials\"\ntoken_endpoint = \"https://idp.corp/t\"\n\
             client_id = \"c\"\nclient_secret = \"s\"\nca_file = \"/nonexistent/ca.pem\"\n",
        ),
        19,
        "probe[0].imap.oauth2.ca_file",
    );
    single_error(
        &imap_oauth2("token_file = \"/t\"\nca_file = \"corp-ca.pem\"\n"),
        16,
        "probe[0].imap.oauth2.ca_file",
    );
}

#[test]
fn stages_and_default_deadlines_follow_kind_and_reply_mode() {
    let post = &parse(&helpdesk("post")).unwrap().probes[0];
    assert_eq!(post.stages().len(), 5);
    assert_eq!(
        post.deadlines.end_to_end,
        Duration::from_secs(30 + 60 + 30 + 60)
    );
    let auto = &parse(&helpdesk("auto")).unwrap().probes[0];
    assert_eq!(
        auto.stages(),
        vec![
            StageName::Submit,
            StageName::Import,
            StageName::Delivery,
            StageName::EndToEnd
        ]
    );
    assert_eq!(auto.deadlines.end_to_end, Duration::from_secs(30 + 60 + 60));
    let ml = &parse(&mail_loop("a", "")).unwrap().probes[0];
    assert_eq!(ml.deadlines.end_to_end, Duration::from_secs(90));
    assert_eq!((ml.smtp.port, ml.mailboxes[0].imap.port), (25, 143));
    assert_eq!(ml.interval, Duration::from_secs(60));
    assert_eq!(ml.lost_after, Duration::from_secs(86400));
    assert_eq!(ml.mailboxes[0].imap.mailbox, "INBOX");
    assert!(ml.cleanup && ml.mailboxes[0].imap.idle);
}

// --- directories ---

#[test]
fn duplicate_probe_name_across_files_names_both_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.toml"), mail_loop("dup", "")).unwrap();
    std::fs::write(dir.path().join("b.toml"), mail_loop("dup", "")).unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not toml [").unwrap();
    let errs = load(dir.path()).unwrap_err();
    assert_eq!(errs.len(), 1, "{errs}");
    let msg = errs.to_string();
    let a = dir.path().join("a.toml").display().to_string();
    let b = dir.path().join("b.toml").display().to_string();
    assert!(
        msg.starts_with(&format!("{b}:2:8: probe[0].name: duplicate")),
        "{msg}"
    );
    assert!(msg.contains(&format!("first defined at {a}:2:8")), "{msg}");
}

#[test]
fn directory_files_load_in_name_order_and_ignore_other_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("b.toml"), mail_loop("second", "")).unwrap();
    std::fs::write(dir.path().join("a.toml"), mail_loop("first", "")).unwrap();
    std::fs::write(dir.path().join("README"), "x").unwrap();
    std::fs::write(dir.path().join(".hidden.toml"), "broken [").unwrap();
    let c = load(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> = c.probes.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["first", "second"]);
}

#[test]
fn empty_directory_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("x.yaml"), "").unwrap();
    let errs = load(dir.path()).unwrap_err();
    assert!(errs.to_string().contains("no *.toml files"), "{errs}");
}

#[test]
fn prober_table_in_two_files_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let prober = "[prober]\nlisten = \"0.0.0.0:9725\"\n";
    std::fs::write(
        dir.path().join("a.toml"),
        format!("{prober}{}", mail_loop("a", "")),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("b.toml"),
        format!("{prober}{}", mail_loop("b", "")),
    )
    .unwrap();
    let errs = load(dir.path()).unwrap_err();
    assert_eq!(errs.len(), 1, "{errs}");
    assert_eq!(errs.0[0].key.as_deref(), Some("prober"));
    assert!(errs.to_string().contains("a.toml:1:1"), "{errs}");
}

#[test]
fn a_config_without_probes_is_an_error() {
    let errs = parse("[prober]\n").unwrap_err();
    assert!(errs.to_string().contains("no [[probe]]"), "{errs}");
}

#[test]
fn prober_settings_resolve() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[prober]\nlisten = \"0.0.0.0:9999\"\nstate_dir = \"state\"\nsecret = \"${{S}}\"\nhostname = \"p.example.com\"\n{}",
        mail_loop("a", "")
    );
    let c = parse_env(&text, "t.toml", Some(dir.path()), &[("S", "k")]).unwrap();
    assert_eq!(c.prober.listen.port(), 9999);
    assert_eq!(
        c.prober.state_dir.as_deref(),
        Some(dir.path().join("state").as_path())
    );
    assert_eq!(c.prober.secret.as_ref().unwrap().expose(), "k");
    assert_eq!(c.prober.hostname.as_deref(), Some("p.example.com"));
    let c = parse(&mail_loop("a", "")).unwrap();
    assert_eq!(c.prober, ProberSettings::default());
}

// --- secrets, shards, positions ---

#[test]
fn secret_debug_and_display_hide_the_value() {
    let s = Secret::new("hunter2");
    assert_eq!(format!("{s:?}"), "***");
    assert_eq!(format!("{s}"), "***");
    let c = sandbox_default();
    let dump = format!("{c:?}");
    assert!(
        dump.contains("password: ***") && dump.contains("token: ***"),
        "{dump}"
    );
    assert!(
        !dump.contains("password: \"") && !dump.contains("token: \""),
        "{dump}"
    );
}

#[test]
fn shard_index_is_fnv1a_and_stable() {
    // FNV-1a 64 of "a" is 0xaf63dc4c8601ec8c.
    for n in [1u32, 2, 3, 7, 1000] {
        assert_eq!(
            u64::from(shard_index("a", n)),
            0xaf63_dc4c_8601_ec8c_u64 % u64::from(n)
        );
    }
    assert_eq!(shard_index("sandbox", 5), shard_index("sandbox", 5));
}

#[test]
fn shards_partition_the_probes() {
    let text: String = (0..40).map(|i| mail_loop(&format!("p{i}"), "")).collect();
    let c = parse(&text).unwrap();
    for n in 1..=5 {
        let mut seen: Vec<String> = Vec::new();
        for k in 0..n {
            let shard = c.shard(k, n);
            assert_eq!(shard.prober, c.prober);
            seen.extend(shard.probes.into_iter().map(|p| p.name));
        }
        seen.sort();
        let mut all: Vec<String> = c.probes.iter().map(|p| p.name.clone()).collect();
        all.sort();
        assert_eq!(seen, all, "n = {n}");
    }
    assert!(!c.shard(0, 2).probes.is_empty() && !c.shard(1, 2).probes.is_empty());
}

#[test]
fn positions_count_characters_not_bytes() {
    let src = error::Source {
        origin: "x",
        text: "a = 1\n# ünïcode\nbé = 2\n",
    };
    assert_eq!(src.position(0), Position { line: 1, column: 1 });
    let offset = src.text.find("= 2").unwrap();
    assert_eq!(src.position(offset), Position { line: 3, column: 4 });
}

#[test]
fn error_display_omits_missing_parts() {
    let e = ConfigError::file("conf.d", "no *.toml files in this directory");
    assert_eq!(e.to_string(), "conf.d: no *.toml files in this directory");
}

#[test]
fn warnings_name_the_probe_and_keys_that_would_blame_a_stage_for_our_own_blindness() {
    let quiet = parse(&mail_loop("quiet", "")).unwrap();
    assert_eq!(
        quiet.warnings(),
        Vec::<String>::new(),
        "the defaults are fine"
    );

    let text = mail_loop("loud", "[probe.deadlines]\ndelivery = \"40s\"\n").replace(
        "password = \"pw\"",
        "password = \"pw\"\ntimeout = \"30s\"\nidle = false\npoll_interval = \"1m\"",
    );
    let w = parse(&text).unwrap().warnings();
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(
        w[0].contains("\"loud\"")
            && w[0].contains("imap.timeout (30s)")
            && w[0].contains("under 20s"),
        "{}",
        w[0]
    );
    assert!(
        w[1].contains("imap.poll_interval (1m)") && w[1].contains("idle is off"),
        "{}",
        w[1]
    );
}

#[test]
fn vendor_settings_live_in_their_own_table_and_are_checked_there() {
    let plain = parse(&helpdesk("post")).unwrap();
    assert_eq!(
        plain.probes[0].helpdesk.as_ref().unwrap().vendor,
        VendorConfig::SupportBee {
            list_fallback: true
        }
    );
    let text = helpdesk("post").replace(
        "\n[probe.imap]",
        "\n[probe.helpdesk.supportbee]\nlist_fallback = false\n\n[probe.imap]",
    );
    let cfg = parse(&text).unwrap();
    assert_eq!(
        cfg.probes[0].helpdesk.as_ref().unwrap().vendor,
        VendorConfig::SupportBee {
            list_fallback: false
        }
    );
    // A key the vendor does not have: file, line and the key under the vendor's table.
    let bad = text.replace(
        "list_fallback = false",
        "list_fallback = false\nsearch = true",
    );
    let e = single_error(&bad, 18, "probe[0].helpdesk.supportbee.search");
    assert!(e.message.contains("unknown field `search`"), "{e}");
}

/// `helpdesk("post")` with `api = "http"` and these `[probe.helpdesk.http]` tables.
fn generic(tables: &str) -> String {
    helpdesk("post")
        .replace("api = \"supportbee\"", "api = \"http\"")
        .replace("\n[probe.imap]", &format!("\n{tables}\n[probe.imap]"))
}

const GENERIC_OK: &str = r#"[probe.helpdesk.http]
auth_header = "Authorization"
auth_value = "Bearer {secret}"

[probe.helpdesk.http.find]
path = "search"
query = { q = "{token}", after = "{since_epoch}" }
tickets = "/items"
id = "/id"
subject = "/subject"

[probe.helpdesk.http.reply]
method = "post"
path = "tickets/{ticket_id}/replies"
body = { id = "{ticket_id:number}", text = "{body}", tags = ["canary {token}"] }
"#;

#[test]
fn the_shipped_zammad_example_resolves_to_its_adapter_with_a_signed_webhook() {
    let dir = tempfile::tempdir().unwrap();
    let c = parse_env(
        &with_secret_files(ZAMMAD_EXAMPLE, dir.path()),
        "zammad.example.toml",
        Some(dir.path()),
        &[],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.warnings(), Vec::<String>::new());
    let h = c.probes[0].helpdesk.as_ref().unwrap();
    assert_eq!(h.api, HelpdeskApi::Zammad);
    assert_eq!(h.vendor, VendorConfig::Zammad);
    assert_eq!(h.token.expose(), "zammad-token");
    assert_eq!(
        h.webhook_secret.as_ref().map(|s| s.expose()),
        Some("zammad-signature-token")
    );
    // Zammad has no settings of its own: a table for it is an unknown key.
    let text = ZAMMAD_EXAMPLE.replace(
        "\n[probe.imap]",
        "\n[probe.helpdesk.zammad]\ngroup = \"Users\"\n\n[probe.imap]",
    );
    let err = parse_env(
        &with_secret_files(&text, dir.path()),
        "zammad.example.toml",
        Some(dir.path()),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("zammad"), "{err}");
}

#[test]
fn the_shipped_zendesk_example_resolves_to_its_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let c = parse_env(
        &with_secret_files(ZENDESK_EXAMPLE, dir.path()),
        "zendesk.example.toml",
        Some(dir.path()),
        &[],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let h = c.probes[0].helpdesk.as_ref().unwrap();
    assert_eq!(h.api, HelpdeskApi::Zendesk);
    assert_eq!(
        h.vendor,
        VendorConfig::Zendesk {
            email: Some("canary-agent@example.com".into())
        }
    );
    assert!(h.webhook_secret.is_some());
    // An email that is not one is an error with its key.
    let bad = ZENDESK_EXAMPLE.replace("canary-agent@example.com", "agent:x");
    let e = parse_env(
        &with_secret_files(&bad, dir.path()),
        "zendesk.example.toml",
        Some(dir.path()),
        &[],
    )
    .unwrap_err();
    assert!(
        e.iter()
            .any(|e| e.key.as_deref() == Some("probe[0].helpdesk.zendesk.email")),
        "{e}"
    );
}

#[test]
fn the_shipped_django_and_generic_examples_resolve_to_their_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let c = parse_env(
        &with_secret_files(DJANGO_EXAMPLE, dir.path()),
        "django-helpdesk.example.toml",
        Some(dir.path()),
        &[],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        c.probes[0].helpdesk.as_ref().unwrap().vendor,
        VendorConfig::DjangoHelpdesk {
            queue: Some(1),
            scan_pages: 4
        }
    );
    let c = parse_env(
        &with_secret_files(GENERIC_EXAMPLE, dir.path()),
        "generic-http.example.toml",
        Some(dir.path()),
        &[],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let VendorConfig::Http(spec) = &c.probes[0].helpdesk.as_ref().unwrap().vendor else {
        panic!("the generic adapter");
    };
    assert_eq!(spec.find.tickets, "/results");
    assert_eq!(spec.find.created.as_deref(), Some("/followup_set/0/date"));
    assert_eq!(spec.reply.as_ref().unwrap().method, reqwest::Method::POST);
    assert_eq!(
        spec.cleanup.as_ref().unwrap().method,
        reqwest::Method::PATCH
    );
}

#[test]
fn the_shipped_freshdesk_example_resolves_to_its_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let text = with_secret_files(FRESHDESK_EXAMPLE, dir.path());
    let c = parse_env(&text, "freshdesk.example.toml", Some(dir.path()), &[])
        .unwrap_or_else(|e| panic!("{e}"));
    let h = c.probes[0].helpdesk.as_ref().unwrap();
    assert_eq!(h.api, HelpdeskApi::Freshdesk);
    assert_eq!(h.vendor, VendorConfig::Freshdesk);
    assert_eq!(h.token.expose(), "fd-api-key");
    assert_eq!(
        h.webhook_secret.as_ref().unwrap().expose(),
        "fd-hook-secret"
    );
    assert_eq!(h.cleanup, Cleanup::Archive);
    // Freshdesk has no table of its own: one is an unknown key, with its line.
    let bad = text.replace(
        "\n[probe.imap]",
        "\n[probe.helpdesk.freshdesk]\nqueue = 1\n\n[probe.imap]",
    );
    let e = parse_env(&bad, "freshdesk.example.toml", Some(dir.path()), &[]).unwrap_err();
    assert!(e.to_string().contains("freshdesk"), "{e}");
}

#[test]
fn generic_http_is_checked_strictly_with_file_line_and_key() {
    let ok = parse(&generic(GENERIC_OK)).unwrap_or_else(|e| panic!("{e}"));
    let VendorConfig::Http(spec) = &ok.probes[0].helpdesk.as_ref().unwrap().vendor else {
        panic!("the generic adapter");
    };
    assert_eq!(
        spec.find.not_found,
        vec![404],
        "404 is 'not yet' by default"
    );
    assert!(spec.cleanup.is_none());

    // An unknown placeholder, in a path, a query value, a body string, the auth value; a bad
    // pointer; a bad method.
    let cases = [
        (
            "path = \"search\"",
            "path = \"search/{ticket_id}\"",
            21,
            "find.path",
        ),
        ("q = \"{token}\"", "q = \"{tokn}\"", 22, "find.query.q"),
        ("text = \"{body}\"", "text = \"{since}\"", 30, "reply.body"),
        ("Bearer {secret}", "Bearer {token}", 18, "auth_value"),
        (
            "tickets = \"/items\"",
            "tickets = \"items\"",
            23,
            "find.tickets",
        ),
        ("id = \"/id\"", "id = \"/i~d\"", 24, "find.id"),
        ("method = \"post\"", "method = \"SEND\"", 28, "reply.method"),
    ];
    for (from, to, line, key) in cases {
        let text = generic(&GENERIC_OK.replace(from, to));
        single_error(&text, line, &format!("probe[0].helpdesk.http.{key}"));
    }
    let e = single_error(
        &generic(&GENERIC_OK.replace("q = \"{token}\"", "q = \"{tokn}\"")),
        22,
        "probe[0].helpdesk.http.find.query.q",
    );
    assert!(e.message.contains("unknown placeholder `{tokn}`"), "{e}");
    assert!(
        e.message.contains("{token}, {since}"),
        "names what may be used: {e}"
    );

    // What is missing is named too.
    let no_reply = GENERIC_OK
        .split("[probe.helpdesk.http.reply]")
        .next()
        .unwrap();
    let e = single_error(&generic(no_reply), 16, "probe[0].helpdesk.http.reply");
    assert!(e.message.contains("reply = \"post\""), "{e}");
    let errs = errors(&helpdesk("post").replace("api = \"supportbee\"", "api = \"http\""));
    assert!(
        errs.iter()
            .any(|e| e.key.as_deref() == Some("probe[0].helpdesk.http")),
        "{}",
        ConfigErrors(errs.clone())
    );
    // Another vendor's table under api = "http" is refused, as for every vendor.
    let text = generic(GENERIC_OK).replace(
        "\n[probe.imap]",
        "\n[probe.helpdesk.rt]\nqueue = \"General\"\n\n[probe.imap]",
    );
    let errs = errors(&text);
    assert!(
        errs.iter()
            .any(|e| e.key.as_deref() == Some("probe[0].helpdesk.rt")),
        "{}",
        ConfigErrors(errs.clone())
    );
}

#[test]
fn a_stage_deadline_can_be_auto_within_bounds() {
    let text = helpdesk("post").replace(
        "[probe.smtp]",
        "[probe.deadlines]\nimport = \"auto\"\nauto_min = \"20s\"\nauto_max = \"5m\"\n\n[probe.smtp]",
    );
    let c = parse(&text).unwrap_or_else(|e| panic!("{e}"));
    let d = &c.probes[0].deadlines;
    assert_eq!(d.auto, vec![StageName::Import]);
    assert_eq!(d.import, Duration::from_secs(300), "auto_max until learned");
    assert_eq!(
        (d.auto_min, d.auto_max),
        (Duration::from_secs(20), Duration::from_secs(300))
    );
    assert!(d.end_to_end_is_sum);
    let e = single_error(
        &text.replace("\"auto\"", "\"autoo\""),
        6,
        "probe[0].deadlines.import",
    );
    assert!(e.message.contains("or \"auto\""), "{e}");
    let e = single_error(
        &text.replace("auto_min = \"20s\"", "auto_min = \"10m\""),
        7,
        "probe[0].deadlines.auto_min",
    );
    assert!(e.message.contains("above auto_max"), "{e}");
}

/// `helpdesk("post")` with `api = "front"` and these tables before `[probe.imap]`.
fn front(tables: &str) -> String {
    helpdesk("post")
        .replace("api = \"supportbee\"", "api = \"front\"")
        .replace("\n[probe.imap]", &format!("\n{tables}\n[probe.imap]"))
}

#[test]
fn front_needs_an_inbox_id_and_checks_its_ids_with_file_line_and_key() {
    let ok = parse(&front(
        "[probe.helpdesk.front]\ninbox_id = \"inb_x1\"\nauthor_id = \"tea_9\"\n",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        ok.probes[0].helpdesk.as_ref().unwrap().vendor,
        VendorConfig::Front {
            inbox_id: "inb_x1".into(),
            author_id: Some("tea_9".into())
        }
    );
    // Without the table: at base_url, named by the key that is missing.
    let e = single_error(&front(""), 12, "probe[0].helpdesk.front.inbox_id");
    assert!(
        e.message.contains("needs [probe.helpdesk.front] inbox_id"),
        "{e}"
    );
    // Not a Front inbox id: at its line.
    let e = single_error(
        &front("[probe.helpdesk.front]\ninbox_id = \"support\"\n"),
        17,
        "probe[0].helpdesk.front.inbox_id",
    );
    assert!(e.message.contains("inb_abc123"), "{e}");
    let e = single_error(
        &front("[probe.helpdesk.front]\ninbox_id = \"inb_1\"\nauthor_id = \"inb_1\"\n"),
        18,
        "probe[0].helpdesk.front.author_id",
    );
    assert!(e.message.contains("tea_abc123"), "{e}");
    // A key Front does not have.
    let e = single_error(
        &front("[probe.helpdesk.front]\ninbox_id = \"inb_1\"\nqueue = 1\n"),
        18,
        "probe[0].helpdesk.front.queue",
    );
    assert!(e.message.contains("unknown field `queue`"), "{e}");
}

#[test]
fn the_shipped_front_example_resolves_to_its_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let c = parse_env(
        &with_secret_files(FRONT_EXAMPLE, dir.path()),
        "front.example.toml",
        Some(dir.path()),
        &[],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let h = c.probes[0].helpdesk.as_ref().unwrap();
    assert_eq!(
        h.vendor,
        VendorConfig::Front {
            inbox_id: "inb_abc123".into(),
            author_id: None
        }
    );
    assert_eq!(h.api, HelpdeskApi::Front);
    assert_eq!(h.token.expose(), "front-api-token");
    assert!(h.webhook_secret.is_some());
}

/// `helpdesk("post")` with `api = "helpscout"` and `table` before `[probe.imap]`.
fn helpscout(table: &str) -> String {
    helpdesk("post")
        .replace("api = \"supportbee\"", "api = \"helpscout\"")
        .replace("\n[probe.imap]", &format!("\n{table}\n[probe.imap]"))
}

#[test]
fn helpscout_needs_its_client_id_and_mailbox_each_reported_with_its_key() {
    let ok = helpscout("[probe.helpdesk.helpscout]\nclient_id = \"app-1\"\nmailbox_id = 42\n");
    assert_eq!(
        parse(&ok).unwrap().probes[0]
            .helpdesk
            .as_ref()
            .unwrap()
            .vendor,
        VendorConfig::HelpScout {
            client_id: "app-1".into(),
            mailbox_id: 42
        }
    );
    let errs = errors(&helpscout(""));
    assert_eq!(errs.len(), 1, "{}", ConfigErrors(errs.clone()));
    assert_eq!(errs[0].key.as_deref(), Some("probe[0].helpdesk.helpscout"));
    assert!(errs[0].position.is_some());

    let no_id = helpscout("[probe.helpdesk.helpscout]\nmailbox_id = 42\n");
    let e = errors(&no_id);
    assert_eq!(e.len(), 1, "{}", ConfigErrors(e.clone()));
    assert_eq!(
        e[0].key.as_deref(),
        Some("probe[0].helpdesk.helpscout.client_id")
    );
    assert!(e[0].position.is_some(), "{}", e[0]);

    let zero = helpscout("[probe.helpdesk.helpscout]\nclient_id = \"a\"\nmailbox_id = 0\n");
    let line = zero.lines().position(|l| l == "mailbox_id = 0").unwrap() + 1;
    let e = single_error(&zero, line, "probe[0].helpdesk.helpscout.mailbox_id");
    assert!(e.message.contains("at least 1"), "{e}");

    let typo = helpscout("[probe.helpdesk.helpscout]\nclient_id = \"a\"\nmailbox = 1\n");
    let line = typo.lines().position(|l| l == "mailbox = 1").unwrap() + 1;
    let e = single_error(&typo, line, "probe[0].helpdesk.helpscout.mailbox");
    assert!(e.message.contains("unknown field `mailbox`"), "{e}");
}

#[test]
fn the_shipped_helpscout_example_resolves_to_its_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let c = parse_env(
        &with_secret_files(HELPSCOUT_EXAMPLE, dir.path()),
        "helpscout.example.toml",
        Some(dir.path()),
        &[],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let h = c.probes[0].helpdesk.as_ref().unwrap();
    assert_eq!(h.api, HelpdeskApi::HelpScout);
    assert_eq!(
        h.vendor,
        VendorConfig::HelpScout {
            client_id: "your-app-id".into(),
            mailbox_id: 123456
        }
    );
    assert!(h.webhook_secret.is_some());
    // Help Scout's deliveries are checked by their signature, not a bearer secret.
    use crate::edges::helpdesk::webhook::{self, Delivery, Verdict};
    let body = b"{}";
    let mut headers = axum::http::HeaderMap::new();
    let sig = webhook::b64(&webhook::hmac_sha1(b"k", &[body]));
    headers.insert("x-helpscout-signature", sig.parse().unwrap());
    let d = Delivery {
        headers: &headers,
        query_secret: None,
        body,
        now: std::time::SystemTime::now(),
    };
    assert_eq!(
        crate::edges::helpdesk::webhook_verifier(h.api)("k", &d),
        Verdict::Authentic
    );
}

// --- several mailboxes per probe, Junk ---

/// A mail loop to three mailboxes; `extra` goes into the second mailbox's imap table.
fn three_mailboxes(kind: &str, smtp: &str, extra: &str) -> String {
    let mut t = format!(
        "[[probe]]\nname = \"multi\"\nkind = \"{kind}\"\n\n[probe.smtp]\nhost = \"127.0.0.1\"\n{smtp}\n"
    );
    if kind == "helpdesk" {
        t += "\n[probe.helpdesk]\napi = \"supportbee\"\nbase_url = \"http://127.0.0.1:8088\"\ntoken = \"t\"\n";
    }
    for (i, name) in ["gmail", "m365", "own"].iter().enumerate() {
        t += &format!(
            "\n[[probe.mailbox]]\nname = \"{name}\"\naddress = \"{name}@example.test\"\n[probe.mailbox.imap]\nhost = \"127.0.0.1\"\nusername = \"{name}@example.test\"\npassword = \"pw\"\n{}",
            if i == 1 { extra } else { "" }
        );
    }
    t
}

#[test]
fn several_mailboxes_resolve_in_order_with_their_addresses() {
    let c = parse(&three_mailboxes(
        "mail_loop",
        "from = \"a@example.test\"",
        "junk = \"Spam\"\n",
    ))
    .unwrap();
    let p = &c.probes[0];
    let names: Vec<&str> = p.mailboxes.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["gmail", "m365", "own"]);
    assert_eq!(p.mailboxes[1].address.as_deref(), Some("m365@example.test"));
    assert_eq!(p.mailboxes[1].imap.username, "m365@example.test");
    assert_eq!(p.mailboxes[1].imap.junk, Junk::Named("Spam".into()));
    assert_eq!(p.mailboxes[0].imap.junk, Junk::SpecialUse);
    assert!(!p.junk_is_ok);
}

#[test]
fn the_one_imap_table_is_the_default_mailbox() {
    let c = parse(&mail_loop("a", "junk_is_ok = true")).unwrap();
    let p = &c.probes[0];
    assert_eq!(p.mailboxes.len(), 1);
    assert_eq!(p.mailboxes[0].name, MailboxConfig::DEFAULT_NAME);
    assert_eq!(p.mailboxes[0].address, None);
    assert!(p.junk_is_ok);
    let off = mail_loop("a", "").replace("password = \"pw\"", "password = \"pw\"\njunk = false");
    assert_eq!(
        parse(&off).unwrap().probes[0].mailboxes[0].imap.junk,
        Junk::Off
    );
}

#[test]
fn a_mail_loop_with_mailboxes_takes_no_smtp_to() {
    let text = three_mailboxes(
        "mail_loop",
        "from = \"a@example.test\"\nto = \"b@example.test\"",
        "",
    );
    let e = single_error(&text, 8, "probe[0].smtp.to");
    assert!(e.message.contains("each mailbox's `address`"), "{e}");
}

#[test]
fn a_helpdesk_probe_with_mailboxes_sends_from_each_and_needs_smtp_to() {
    let c = parse(&three_mailboxes(
        "helpdesk",
        "to = \"support@example.test\"",
        "",
    ))
    .unwrap();
    assert_eq!(c.probes[0].mailboxes.len(), 3);
    let text = three_mailboxes(
        "helpdesk",
        "from = \"a@example.test\"\nto = \"support@example.test\"",
        "",
    );
    let e = single_error(&text, 7, "probe[0].smtp.from");
    assert!(e.message.contains("requester"), "{e}");
    let e = single_error(&three_mailboxes("helpdesk", "", ""), 5, "probe[0].smtp.to");
    assert!(e.message.contains("missing field `to`"), "{e}");
}

#[test]
fn mailbox_names_are_labels_unique_within_the_probe() {
    let text = three_mailboxes("mail_loop", "from = \"a@example.test\"", "")
        .replace("name = \"own\"", "name = \"gmail\"");
    let e = single_error(&text, 26, "probe[0].mailbox[2].name");
    assert!(e.message.contains("duplicate mailbox name `gmail`"), "{e}");
    let text = three_mailboxes("mail_loop", "from = \"a@example.test\"", "")
        .replace("name = \"m365\"", "name = \"Microsoft 365\"");
    let e = single_error(&text, 18, "probe[0].mailbox[1].name");
    assert!(e.message.contains("not a valid mailbox name"), "{e}");
}

#[test]
fn a_mailbox_key_error_names_file_line_and_key() {
    let text = three_mailboxes("mail_loop", "from = \"a@example.test\"", "idle = \"yes\"\n");
    let e = single_error(&text, 24, "probe[0].mailbox[1].imap.idle");
    assert!(e.to_string().starts_with("t.toml:24:"), "{e}");
    let text = three_mailboxes("mail_loop", "from = \"a@example.test\"", "").replace(
        "address = \"own@example.test\"",
        "address = \"Own <own@example.test>\"",
    );
    single_error(&text, 27, "probe[0].mailbox[2].address");
}

#[test]
fn imap_and_mailbox_tables_are_one_or_the_other() {
    let both = format!(
        "{}\n[[probe.mailbox]]\nname = \"x\"\naddress = \"x@example.test\"\n[probe.mailbox.imap]\nhost = \"h\"\nusername = \"u\"\npassword = \"p\"\n",
        mail_loop("a", "")
    );
    let errs = errors(&both);
    assert!(
        errs.iter()
            .any(|e| e.key.as_deref() == Some("probe[0].mailbox") && e.message.contains("keep one")),
        "{}",
        ConfigErrors(errs.clone())
    );
    let neither = mail_loop("a", "")
        .split("[probe.imap]")
        .next()
        .unwrap()
        .to_string();
    let e = single_error(&neither, 1, "probe[0].imap");
    assert!(e.message.contains("[[probe.mailbox]]"), "{e}");
}

#[test]
fn a_junk_folder_cannot_be_the_watched_folder() {
    let text = three_mailboxes(
        "mail_loop",
        "from = \"a@example.test\"",
        "junk = \"inbox\"\n",
    );
    single_error(&text, 24, "probe[0].mailbox[1].imap.junk");
}

#[test]
fn a_watcher_shared_by_two_probes_with_other_settings_is_refused() {
    // Regression: one connection per mailbox used the first probe's settings and silently
    // ignored the second's.
    let second = mail_loop("b", "").replace("password = \"pw\"", "password = \"other\"");
    let text = format!("{}\n{second}", mail_loop("a", ""));
    let e = single_error(&text, 24, "probe[1].imap");
    assert!(e.message.contains("probe `a` mailbox `default`"), "{e}");
    // The same settings share one watcher, as before.
    assert!(parse(&format!("{}\n{}", mail_loop("a", ""), mail_loop("b", ""))).is_ok());
}

#[test]
fn several_mailboxes_example_parses() {
    let dir = tempfile::tempdir().unwrap();
    let text = with_secret_files(SEVERAL_MAILBOXES_EXAMPLE, dir.path());
    let c = parse_env(
        &text,
        "several-mailboxes.example.toml",
        Some(dir.path()),
        &[],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let p = &c.probes[0];
    let names: Vec<&str> = p.mailboxes.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["gmail", "m365", "own"]);
    assert_eq!(p.mailboxes[2].imap.junk, Junk::Named("Spam".into()));
    assert_eq!(p.mailboxes[0].imap.junk, Junk::SpecialUse);
    assert_eq!(p.smtp.to, "", "the mailboxes are the recipients");
}

// --- OAuth2 ---

/// [`mail_loop`] with `[probe.imap.oauth2]` of `body` in place of the IMAP password.
fn imap_oauth2(body: &str) -> String {
    mail_loop("a", "").replace(
        "password = \"pw\"\n",
        &format!("\n[probe.imap.oauth2]\n{body}"),
    )
}

#[test]
fn oauth2_sources_parse() {
    let cfg = parse(&imap_oauth2("token_file = \"/run/token\"\n")).unwrap();
    let imap = &cfg.probes[0].mailboxes[0].imap;
    assert_eq!(
        imap.oauth2,
        Some(OAuth2Config {
            mechanism: OAuth2Mechanism::XOAuth2,
            source: OAuth2Source::TokenFile("/run/token".into()),
            ca_file: None,
        })
    );
    assert_eq!(imap.password.expose(), "");

    let cfg = parse(&imap_oauth2(
        "mechanism = \"oauthbearer\"\ngrant = \"client_credentials\"\n\
         token_endpoint = \"https://login.example/t\"\nclient_id = \"app\"\n\
         client_secret = \"s3cret\"\nscope = \"https://outlook.office365.com/.default\"\n",
    ))
    .unwrap();
    let o = cfg.probes[0].mailboxes[0].imap.oauth2.clone().unwrap();
    assert_eq!(o.mechanism, OAuth2Mechanism::OAuthBearer);
    match o.source {
        OAuth2Source::ClientCredentials {
            token_endpoint,
            client_id,
            client_secret,
            scope,
        } => {
            assert_eq!(token_endpoint, "https://login.example/t");
            assert_eq!(client_id, "app");
            assert_eq!(client_secret.expose(), "s3cret");
            assert_eq!(
                scope.as_deref(),
                Some("https://outlook.office365.com/.default")
            );
        }
        other => panic!("{other:?}"),
    }
    // Debug of the whole config never shows the secret.
    assert!(!format!("{cfg:?}").contains("s3cret"));

    let cfg = parse(&imap_oauth2(
        "grant = \"refresh_token\"\ntoken_endpoint = \"https://oauth2.example/token\"\n\
         client_id = \"c\"\nclient_secret = \"cs\"\nrefresh_token = \"rt-1\"\n",
    ))
    .unwrap();
    assert!(matches!(
        cfg.probes[0].mailboxes[0].imap.oauth2.as_ref().unwrap().source,
        OAuth2Source::RefreshToken { ref refresh_token, .. } if refresh_token.expose() == "rt-1"
    ));
}

#[test]
fn oauth2_and_a_password_together_is_an_error() {
    let text = mail_loop("a", "").replace(
        "password = \"pw\"\n",
        "password = \"pw\"\n\n[probe.imap.oauth2]\ntoken_file = \"/run/token\"\n",
    );
    let e = single_error(&text, 13, "probe[0].imap.password");
    assert!(e.message.contains("not both"), "{e}");

    let text = mail_loop("a", "").replace(
        "to = \"b@example.test\"\n",
        "to = \"b@example.test\"\nusername = \"a@example.test\"\npassword_file = \"/dev/null\"\n\
         [probe.smtp.oauth2]\ntoken_file = \"/run/token\"\n",
    );
    let e = single_error(&text, 10, "probe[0].smtp.password_file");
    assert!(e.message.contains("not both"), "{e}");
}

#[test]
fn smtp_oauth2_needs_a_username() {
    let text = mail_loop("a", "").replace(
        "to = \"b@example.test\"\n",
        "to = \"b@example.test\"\n[probe.smtp.oauth2]\ntoken_file = \"/run/token\"\n",
    );
    single_error(&text, 5, "probe[0].smtp.username");
}

#[test]
fn oauth2_grant_rules() {
    // Neither a token file nor a grant.
    single_error(
        &imap_oauth2("mechanism = \"xoauth2\"\n"),
        14,
        "probe[0].imap.oauth2.grant",
    );
    // An unknown grant, an unknown mechanism.
    single_error(
        &imap_oauth2(
            "grant = \"password\"\ntoken_endpoint = \"https://x/t\"\nclient_id = \"c\"\n\
             client_secret = \"s\"\n",
        ),
        15,
        "probe[0].imap.oauth2.grant",
    );
    let errs = errors(&imap_oauth2("mechanism = \"plain\"\ntoken_file = \"/t\"\n"));
    assert!(
        errs.iter().any(|e| e.position.map(|p| p.line) == Some(15)),
        "{}",
        ConfigErrors(errs.clone())
    );
    // Endpoint keys beside a token file.
    single_error(
        &imap_oauth2("token_file = \"/t\"\nclient_id = \"c\"\n"),
        16,
        "probe[0].imap.oauth2.client_id",
    );
    // A client secret is required; a refresh token only with the refresh_token grant.
    single_error(
        &imap_oauth2(
            "grant = \"client_credentials\"\ntoken_endpoint = \"https://x/t\"\nclient_id = \"c\"\n",
        ),
        14,
        "probe[0].imap.oauth2.client_secret",
    );
    single_error(
        &imap_oauth2(
            "grant = \"client_credentials\"\ntoken_endpoint = \"https://x/t\"\nclient_id = \"c\"\n\
             client_secret = \"s\"\nrefresh_token = \"r\"\n",
        ),
        19,
        "probe[0].imap.oauth2.refresh_token",
    );
    single_error(
        &imap_oauth2(
            "grant = \"refresh_token\"\ntoken_endpoint = \"ftp://x/t\"\nclient_id = \"c\"\n\
             client_secret = \"s\"\nrefresh_token = \"r\"\n",
        ),
        16,
        "probe[0].imap.oauth2.token_endpoint",
    );
}

#[test]
fn a_mailbox_imap_takes_oauth2() {
    let text = r#"[[probe]]
name = "m"
kind = "mail_loop"

[probe.smtp]
host = "127.0.0.1"
from = "a@example.test"

[[probe.mailbox]]
name = "m365"
address = "b@example.test"

[probe.mailbox.imap]
host = "127.0.0.1"
username = "b@example.test"

[probe.mailbox.imap.oauth2]
token_file = "/run/token"
"#;
    let cfg = parse(text).unwrap_or_else(|e| panic!("{e}"));
    assert!(cfg.probes[0].mailboxes[0].imap.oauth2.is_some());
}

#[test]
fn oauth2_examples_parse_with_their_grants() {
    let dir = tempfile::tempdir().unwrap();
    let m365 = parse_env(
        &with_secret_files(M365_EXAMPLE, dir.path()),
        "m.toml",
        None,
        &[],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let p = &m365.probes[0];
    for o in [
        p.smtp.oauth2.as_ref().unwrap(),
        p.mailboxes[0].imap.oauth2.as_ref().unwrap(),
    ] {
        match &o.source {
            OAuth2Source::ClientCredentials {
                client_secret,
                scope,
                ..
            } => {
                assert_eq!(client_secret.expose(), "m365-client-secret");
                assert_eq!(
                    scope.as_deref(),
                    Some("https://outlook.office365.com/.default")
                );
            }
            other => panic!("{other:?}"),
        }
    }
    let gmail = parse_env(
        &with_secret_files(GMAIL_EXAMPLE, dir.path()),
        "g.toml",
        None,
        &[],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    match &gmail.probes[0].mailboxes[0]
        .imap
        .oauth2
        .as_ref()
        .unwrap()
        .source
    {
        OAuth2Source::RefreshToken { refresh_token, .. } => {
            assert_eq!(refresh_token.expose(), "1//gmail-refresh-token")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn route_requirements_and_trusted_authserv_ids_resolve() {
    let c = parse(&mail_loop(
        "a",
        "require_tls_hops = true\nrequire_auth = [\"dkim\", \"DMARC\", \"dkim\"]\ntrusted_authserv_ids = [\"MX.example.test\", \"mx.example.test\", \"other.test\"]",
    ))
    .unwrap();
    let r = &c.probes[0].route_rules;
    assert!(r.require_tls_hops);
    assert_eq!(r.require_auth, [AuthMethod::Dkim, AuthMethod::Dmarc]);
    assert_eq!(r.trusted_authserv_ids, ["mx.example.test", "other.test"]);
    // Off by default: nothing required, nothing trusted.
    let r = &parse(&mail_loop("a", "")).unwrap().probes[0].route_rules;
    assert_eq!(r, &crate::canary::hops::RouteRules::default());
}

#[test]
fn require_verified_takes_dkim_and_arc_and_needs_verify_dkim() {
    let c = parse(&mail_loop(
        "a",
        "verify_dkim = true\nrequire_verified = [\"arc\", \"DKIM\", \"arc\"]",
    ))
    .unwrap();
    assert_eq!(
        c.probes[0].route_rules.require_verified,
        [AuthMethod::Arc, AuthMethod::Dkim]
    );
    let errs = errors(&mail_loop("a", "require_verified = [\"dkim\", \"spf\"]"));
    assert_eq!(errs.len(), 2, "{}", ConfigErrors(errs.clone()));
    for text in [
        "\"spf\": the prober's own check verifies",
        "needs verify_dkim = true",
    ] {
        assert!(
            errs.iter()
                .any(|e| e.key.as_deref() == Some("probe[0].require_verified")
                    && e.position.map(|p| p.line) == Some(4)
                    && e.message.contains(text)),
            "{text}: {}",
            ConfigErrors(errs.clone())
        );
    }
}

#[test]
fn route_requirement_errors_name_file_line_and_key() {
    let errs = errors(&mail_loop(
        "a",
        "require_auth = [\"dkim\", \"bimi\"]\ntrusted_authserv_ids = [\"mx example\"]",
    ));
    assert_eq!(errs.len(), 3, "{errs:?}");
    let want = [
        ("probe[0].require_auth", 4, "unknown method \"bimi\""),
        ("probe[0].trusted_authserv_ids", 5, "one word"),
        ("probe[0].require_auth", 4, "needs trusted_authserv_ids"),
    ];
    for (key, line, text) in want {
        assert!(
            errs.iter().any(|e| e.file == "t.toml"
                && e.key.as_deref() == Some(key)
                && e.position.map(|p| p.line) == Some(line)
                && e.message.contains(text)),
            "{key} {line} {text}: {}",
            ConfigErrors(errs.clone())
        );
    }
    // A typo of the key itself is refused too.
    let errs = errors(&mail_loop("a", "require_tls_hop = true"));
    assert!(
        errs[0].to_string().contains("require_tls_hop"),
        "{}",
        errs[0]
    );
}

#[test]
fn verify_dkim_takes_a_resolver_address_and_refuses_one_without_it() {
    let c = parse(&mail_loop(
        "a",
        "verify_dkim = true\ndns_resolver = \"127.0.0.1:5353\"",
    ))
    .unwrap();
    assert_eq!(
        c.probes[0].verify_dkim,
        Some(Some("127.0.0.1:5353".parse().unwrap()))
    );
    let c = parse(&mail_loop("a", "verify_dkim = true")).unwrap();
    assert_eq!(c.probes[0].verify_dkim, Some(None), "the system's resolver");
    assert_eq!(
        parse(&mail_loop("a", "")).unwrap().probes[0].verify_dkim,
        None
    );
    let e = single_error(
        &mail_loop("a", "verify_dkim = true\ndns_resolver = \"localhost\""),
        5,
        "probe[0].dns_resolver",
    );
    assert!(e.message.contains("IP address and port"), "{e}");
    let e = single_error(
        &mail_loop("a", "dns_resolver = \"127.0.0.1:53\""),
        4,
        "probe[0].dns_resolver",
    );
    assert!(e.message.contains("verify_dkim"), "{e}");
}
