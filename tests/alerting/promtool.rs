//! `promtool check rules`, `promtool test rules` and `promtool check config` on the shipped
//! files, exactly as an operator (or CI) would run them.

use std::process::Command;

use crate::{deploy_file, require_tool};

fn promtool(args: &[&str]) {
    require_tool("promtool");
    let out = Command::new("promtool")
        .args(args)
        .current_dir(deploy_file(""))
        .output()
        .expect("running promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool {} failed ({}):\n{text}",
        args.join(" "),
        out.status
    );
    assert!(text.contains("SUCCESS"), "promtool said:\n{text}");
    println!("promtool {}:\n{text}", args.join(" "));
}

#[test]
fn alerts_pass_promtool_check_rules() {
    promtool(&["check", "rules", "alerts.yml"]);
}

#[test]
fn alerts_pass_their_promtool_unit_tests() {
    promtool(&["test", "rules", "alerts_test.yml"]);
}

#[test]
fn prometheus_config_passes_promtool_check_config() {
    // Also checks the rule files it names (alerts.yml, relative to the config).
    promtool(&["check", "config", "prometheus.yml"]);
}

/// Every rule has a `for:`, a `severity` of page or ticket, a summary and a description, and
/// the unit tests name every alert.
#[test]
fn every_rule_has_for_severity_summary_description_and_a_unit_test() {
    let rules = std::fs::read_to_string(deploy_file("alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(deploy_file("alerts_test.yml")).unwrap();
    let mut blocks: Vec<(String, String)> = Vec::new();
    for line in rules.lines() {
        if let Some(name) = line.trim_start().strip_prefix("- alert:") {
            blocks.push((name.trim().to_string(), String::new()));
        } else if let Some((_, body)) = blocks.last_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    assert!(blocks.len() >= 6, "alerts found: {blocks:?}");
    for (name, body) in &blocks {
        let has = |key: &str| body.lines().any(|l| l.trim_start().starts_with(key));
        assert!(has("for:"), "{name} has no `for:`");
        // The watchdog pages nobody: its receiver is the dead man's switch.
        assert!(
            has("severity: page")
                || has("severity: ticket")
                || (name == "MailcanaryWatchdog" && has("severity: none")),
            "{name} has no severity page/ticket"
        );
        assert!(has("summary:"), "{name} has no summary");
        assert!(has("description:"), "{name} has no description");
        assert!(
            tests.contains(&format!("alertname: {name}")),
            "alerts_test.yml never tests {name}"
        );
        let fires = tests
            .split("alertname: ")
            .skip(1)
            .any(|t| t.starts_with(&format!("{name}\n")) && t.contains("exp_labels"));
        assert!(fires, "alerts_test.yml never shows {name} firing");
        // The watchdog is the one rule that never stops firing.
        assert!(
            name == "MailcanaryWatchdog"
                || tests.contains(&format!("alertname: {name}, exp_alerts: []")),
            "alerts_test.yml never shows {name} not firing"
        );
    }
}
