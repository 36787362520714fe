//! Every metric alerts.yml names — in its expressions and in the queries of its annotation
//! templates — is one a live prober exports, and every label value it matches exactly
//! (`stage="end_to_end"`, `reason="deadline"`) is one the prober uses. Catches a renamed
//! metric or a typo that `promtool check rules` cannot: an expression over a metric that does
//! not exist parses, evaluates to nothing, and never fires.

use std::collections::BTreeSet;

use mailcanary::metrics::testing::Samples;

use crate::common::*;
use crate::deploy_file;

/// A `mailcanary_*` name in the text, with the label matchers written right after it.
#[derive(Debug, PartialEq)]
struct Reference {
    name: String,
    matchers: Vec<Matcher>,
}

#[derive(Debug, PartialEq)]
struct Matcher {
    label: String,
    op: String,
    /// `None` when the value is not a plain quoted string (a template placeholder).
    value: Option<String>,
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Every `mailcanary_[a-z0-9_]+` word of `text` (not part of a longer identifier or of a
/// recording rule's `a:b` name), with its `{...}` matchers when they follow.
fn references(text: &str) -> Vec<Reference> {
    // In a YAML single-quoted scalar `''` is one `'` (PromQL's other string quote).
    let text = text.replace("''", "'");
    let mut out = Vec::new();
    let mut rest = text.as_str();
    let mut prev: Option<char> = None;
    while let Some(at) = rest.find("mailcanary_") {
        let before = rest[..at].chars().next_back().or(prev);
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let after = &tail[end..];
        if before.is_some_and(is_ident) || after.starts_with(':') {
            prev = name.chars().next_back();
            rest = &tail[end..];
            continue;
        }
        let matchers = after
            .strip_prefix('{')
            .map(parse_matchers)
            .unwrap_or_default();
        out.push(Reference {
            name: name.to_string(),
            matchers,
        });
        prev = name.chars().next_back();
        rest = after;
    }
    out
}

/// Reads `label op "value", ...}` (values in double or single quotes) up to the closing brace.
fn parse_matchers(s: &str) -> Vec<Matcher> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace() || *c == ',').is_some() {}
        let mut label = String::new();
        while let Some(c) = chars.next_if(|c| c.is_ascii_alphanumeric() || *c == '_') {
            label.push(c);
        }
        if label.is_empty() {
            return out; // `}` or something that is not a matcher list
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut op = String::new();
        while let Some(c) = chars.next_if(|c| matches!(c, '=' | '!' | '~')) {
            op.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let value = match chars.peek() {
            Some(&q) if q == '"' || q == '\'' => {
                chars.next();
                let mut v = String::new();
                for c in chars.by_ref() {
                    if c == q {
                        break;
                    }
                    v.push(c);
                }
                // A value built by a template is not a literal label value.
                (!v.contains("{{")).then_some(v)
            }
            _ => {
                // Unquoted: a template placeholder such as %q. Skip to the next separator.
                while chars.next_if(|c| *c != ',' && *c != '}').is_some() {}
                None
            }
        };
        out.push(Matcher { label, op, value });
    }
}

#[test]
fn the_reference_reader_reads_names_and_matchers() {
    let text = r#"
        expr: |
          increase(mailcanary_stage_failures_total{reason="deadline", stage!="end_to_end"}[10m]) > 0
          and on (probe) mailcanary_probe_success == 0
        summary: '{{ with printf "x(mailcanary_stage_x{probe=%q, stage!=''end_to_end''})" $labels.probe | query }}'
        desc: mailcanary_probe_success{probe="{{ $labels.probe }}"} MailcanaryStageStalled
          mailcanary:recorded_rate notmailcanary_x job:mailcanary_y
    "#;
    let refs = references(text);
    let names: Vec<&str> = refs.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "mailcanary_stage_failures_total",
            "mailcanary_probe_success",
            "mailcanary_stage_x",
            "mailcanary_probe_success"
        ]
    );
    let m = |label: &str, op: &str, value: Option<&str>| Matcher {
        label: label.into(),
        op: op.into(),
        value: value.map(String::from),
    };
    assert_eq!(
        refs[0].matchers,
        [
            m("reason", "=", Some("deadline")),
            m("stage", "!=", Some("end_to_end"))
        ]
    );
    assert_eq!(refs[1].matchers, []);
    assert_eq!(
        refs[2].matchers,
        [m("probe", "=", None), m("stage", "!=", Some("end_to_end"))]
    );
    assert_eq!(refs[3].matchers, [m("probe", "=", None)]);
}

/// Checks `refs` against a scrape; returns the problems.
fn problems(refs: &[Reference], s: &Samples) -> Vec<String> {
    let mut out = Vec::new();
    for r in refs {
        let exported =
            s.types.iter().any(|(f, _)| *f == r.name) || s.samples.iter().any(|x| x.name == r.name);
        if !exported {
            out.push(format!("{} is not exported by the prober", r.name));
            continue;
        }
        // A histogram's `_bucket`/`_sum`/`_count` samples carry the family's labels.
        let samples: Vec<_> = s.samples.iter().filter(|x| x.name == r.name).collect();
        let samples = if samples.is_empty() {
            s.family(&r.name)
        } else {
            samples
        };
        for m in &r.matchers {
            if !samples.iter().any(|x| x.label(&m.label).is_some()) {
                out.push(format!("{} has no label {:?}", r.name, m.label));
                continue;
            }
            if m.op == "="
                && let Some(v) = &m.value
                && !samples
                    .iter()
                    .any(|x| x.label(&m.label) == Some(v.as_str()))
            {
                out.push(format!("{} never has {}={v:?}", r.name, m.label));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_rules_name_is_exported() {
    let rules = std::fs::read_to_string(deploy_file("alerts.yml")).unwrap();
    let refs = references(&rules);

    // Every rule's `expr:` names at least one metric; the reference list covers them.
    let exprs: Vec<&str> = rules
        .split("expr:")
        .skip(1)
        .map(|e| e.split("for:").next().unwrap_or(e))
        .collect();
    assert!(exprs.len() >= 6, "found {} expr blocks", exprs.len());
    for e in &exprs {
        // The watchdog's `vector(1)` names none on purpose: it must fire whatever is scraped.
        assert!(
            e.contains("mailcanary_")
                || e.contains("up{job=\"mailcanary\"}")
                || e.trim() == "vector(1)",
            "an expr names no metric: {e}"
        );
    }

    let sb = sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(&config(&sb, &Knobs::default()), dir.path()).await;
    let s = scrape(d.addr).await;

    // The scrape check must be able to fail: a misspelt metric and label value are caught.
    let bad = references(
        r#"mailcanary_stage_failure_total mailcanary_stage_failures_total{reason="deadlines"}
        mailcanary_probe_success{stage="import"} mailcanary_stage_duration_seconds_bucket{le="+Inf"}"#,
    );
    assert_eq!(
        problems(&bad, &s),
        [
            "mailcanary_stage_failure_total is not exported by the prober",
            "mailcanary_stage_failures_total never has reason=\"deadlines\"",
            "mailcanary_probe_success has no label \"stage\"",
        ]
    );

    let found = problems(&refs, &s);
    let names: BTreeSet<&str> = refs.iter().map(|r| r.name.as_str()).collect();
    println!("alerts.yml names {} metrics: {names:?}", names.len());
    d.stop().await;
    sb.shutdown().await;
    assert!(
        found.is_empty(),
        "alerts.yml names what the prober does not export:\n{}",
        found.join("\n")
    );
    assert!(names.len() >= 5, "too few metrics found: {names:?}");
}
