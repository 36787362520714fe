//! What ships in `deploy/` is tested, not just written: the Alertmanager config with amtool,
//! every PromQL expression of the Grafana dashboard with promtool and against the metrics a live
//! prober exports, and the Kubernetes manifests' structure (the embedded config included).
//! (The Prometheus rules have their own binary, `tests/alerting`; the static musl binary is
//! built and run by `tests/run.sh`.)

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use mailcanary::{
    daemon::{Daemon, Options},
    metrics::testing::parse_exposition,
    sandbox::{DelayRange, Sandbox, SandboxConfig},
};
use serde_json::Value;

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// The tool exited 0; else fails with everything it printed.
fn assert_succeeded(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tool(name: &str) -> Command {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{name} is missing: tests/run.sh installs it (Debian packages)"
    );
    Command::new(name)
}

#[test]
fn alertmanager_config_passes_amtool() {
    let out = tool("amtool")
        .arg("check-config")
        .arg(repo("deploy/alertmanager/alertmanager.yml"))
        .output()
        .unwrap();
    assert_succeeded(&out);
}

/// Which receiver Alertmanager picks for an alert with `labels` (`amtool config routes test`).
fn receiver_for(labels: &[&str]) -> String {
    let out = tool("amtool")
        .arg("config")
        .arg("routes")
        .arg("test")
        .arg(format!(
            "--config.file={}",
            repo("deploy/alertmanager/alertmanager.yml").display()
        ))
        .args(labels)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn the_watchdog_goes_to_the_dead_mans_switch_and_nothing_else_does() {
    assert_eq!(
        receiver_for(&["alertname=MailcanaryWatchdog", "severity=none"]),
        "deadmansswitch"
    );
    assert_eq!(
        receiver_for(&["alertname=MailcanaryStageStalled", "severity=page"]),
        "pagerduty-oncall"
    );
    assert_eq!(
        receiver_for(&["alertname=MailcanaryLedgerFailing", "severity=ticket"]),
        "ops-tickets"
    );
}

/// Every `expr` of the Grafana dashboard, with Grafana's variables replaced by what Grafana
/// would substitute.
fn grafana_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(repo("deploy/grafana/mailcanary.json")).unwrap();
    let dash: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        for t in panel["targets"].as_array().expect("targets") {
            let e = t["expr"].as_str().expect("expr");
            out.push(e.replace("$__rate_interval", "1m").replace("$probe", ".*"));
        }
    }
    assert!(out.len() >= 8, "the dashboard lost its panels");
    out
}

#[test]
fn every_grafana_expression_parses() {
    // promtool parses PromQL when it checks rules: one recording rule per expression.
    let dir = tempfile::tempdir().unwrap();
    let mut rules = String::from("groups:\n  - name: grafana\n    rules:\n");
    for (i, e) in grafana_exprs().iter().enumerate() {
        rules.push_str(&format!(
            "      - record: grafana:panel_{i}\n        expr: {}\n",
            serde_json::to_string(e).unwrap()
        ));
    }
    let path = dir.path().join("grafana_rules.yml");
    std::fs::write(&path, rules).unwrap();
    let out = tool("promtool")
        .arg("check")
        .arg("rules")
        .arg(&path)
        .output()
        .unwrap();
    assert_succeeded(&out);
}

/// `mailcanary_*` names used by an expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("mailcanary_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        names.insert(expr[start..end].to_string());
        i = end;
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grafana_names_only_metrics_the_prober_exports() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut cfg = SandboxConfig::ephemeral();
    cfg.import_delay = DelayRange::fixed(Duration::from_millis(20));
    let sb = Sandbox::start(cfg).await.unwrap();
    let toml = mailcanary::config::SANDBOX_TOML
        .replace("port = 2525", &format!("port = {}", sb.smtp_addr.port()))
        .replace("port = 1143", &format!("port = {}", sb.imap_addr.port()))
        .replace("http://127.0.0.1:8088", &sb.api_url());
    let config = mailcanary::config::parse_str(&toml, "sandbox.toml").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        &config,
        Options {
            state_dir: dir.path().to_path_buf(),
            listen: ([127, 0, 0, 1], 0).into(),
            schedule: false,
        },
    )
    .await
    .unwrap();
    let text = reqwest::get(format!("http://{}/metrics", d.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let samples = parse_exposition(&text);
    for e in grafana_exprs() {
        for name in metric_names(&e) {
            assert!(
                !samples.family(samples.family_of(&name)).is_empty(),
                "{name} (in `{e}`) is not exported by the prober"
            );
        }
    }
    d.stop().await;
    sb.shutdown().await;
}

fn docs(path: &str) -> Vec<serde_yaml::Value> {
    let text = std::fs::read_to_string(repo(path)).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("valid YAML"))
        .collect()
}

fn find<'a>(docs: &'a [serde_yaml::Value], kind: &str) -> &'a serde_yaml::Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind))
        .unwrap_or_else(|| panic!("no {kind}"))
}

/// A YAML sequence's strings.
fn strings(v: &serde_yaml::Value) -> Vec<&str> {
    v.as_sequence()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect()
}

/// The mailcanary container: liveness on /healthz, readiness on /readyz, port 9725, not root.
fn probed_and_unprivileged(mc: &serde_yaml::Value) {
    assert_eq!(
        mc["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    assert_eq!(
        mc["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    assert_eq!(mc["ports"][0]["containerPort"].as_u64(), Some(9725));
    assert!(
        mc["securityContext"]["runAsUser"]
            .as_u64()
            .is_some_and(|u| u != 0)
    );
}

/// The ConfigMap's config is valid for `mailcanary check`, with the secrets it names
/// provided as files (as the Secret's mount would).
fn config_map_checks(manifests: &[serde_yaml::Value]) {
    let cm = find(manifests, "ConfigMap");
    let secret = find(manifests, "Secret");
    let dir = tempfile::tempdir().unwrap();
    for (k, v) in secret["stringData"].as_mapping().unwrap() {
        std::fs::write(dir.path().join(k.as_str().unwrap()), v.as_str().unwrap()).unwrap();
    }
    for (name, text) in cm["data"].as_mapping().unwrap() {
        let text = text
            .as_str()
            .unwrap()
            .replace("/run/secrets/mailcanary", dir.path().to_str().unwrap());
        let path = dir.path().join(name.as_str().unwrap());
        std::fs::write(&path, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_mailcanary"))
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn kubernetes_sidecar_is_complete_and_its_config_checks() {
    let manifests = docs("deploy/kubernetes/sidecar.yaml");
    for d in &manifests {
        assert!(d["apiVersion"].as_str().is_some() && d["kind"].as_str().is_some());
        assert!(d["metadata"]["name"].as_str().is_some());
    }
    let deploy = find(&manifests, "Deployment");
    let pod = &deploy["spec"]["template"];
    let containers = pod["spec"]["containers"].as_sequence().unwrap();
    assert!(
        containers.len() >= 2,
        "mailcanary runs beside an app container"
    );
    let mc = containers
        .iter()
        .find(|c| c["name"].as_str() == Some("mailcanary"))
        .expect("the mailcanary container");
    probed_and_unprivileged(mc);
    for k in ["requests", "limits"] {
        assert!(
            mc["resources"][k]["memory"].as_str().is_some(),
            "resources.{k}"
        );
        assert!(
            mc["resources"][k]["cpu"].as_str().is_some(),
            "resources.{k}"
        );
    }
    let args = strings(&mc["args"]);
    assert!(args.windows(2).any(|w| w == ["--listen", "0.0.0.0:9725"]));
    let mounts: Vec<&str> = mc["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    for p in [
        "/etc/mailcanary",
        "/run/secrets/mailcanary",
        "/var/lib/mailcanary",
    ] {
        assert!(mounts.contains(&p), "mount {p}");
    }
    assert_eq!(
        pod["metadata"]["annotations"]["prometheus.io/port"].as_str(),
        Some("9725")
    );

    config_map_checks(&manifests);
    let sm = docs("deploy/kubernetes/servicemonitor.yaml");
    assert_eq!(
        find(&sm, "ServiceMonitor")["spec"]["endpoints"][0]["path"].as_str(),
        Some("/metrics")
    );
}

#[test]
fn kubernetes_statefulset_shards_by_pod_ordinal_with_a_ledger_each() {
    let manifests = docs("deploy/kubernetes/statefulset.yaml");
    let sts = find(&manifests, "StatefulSet");
    let replicas = sts["spec"]["replicas"].as_u64().expect("replicas");
    assert!(replicas > 1);
    assert_eq!(
        sts["spec"]["podManagementPolicy"].as_str(),
        Some("Parallel")
    );
    let mc = &sts["spec"]["template"]["spec"]["containers"][0];
    let args = strings(&mc["args"]);
    // K from the pod's hostname, N the replicas.
    let shard = format!("auto/{replicas}");
    assert!(
        args.windows(2).any(|w| w == ["--shard", shard.as_str()]),
        "{args:?}"
    );
    // A ledger per replica: a claim template mounted at the state dir, not a shared claim.
    let claim = &sts["spec"]["volumeClaimTemplates"][0];
    let name = claim["metadata"]["name"].as_str().unwrap();
    let state = mc["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"].as_str() == Some("/var/lib/mailcanary"))
        .expect("the state dir is mounted");
    assert_eq!(state["name"].as_str(), Some(name));
    assert_eq!(
        claim["spec"]["accessModes"][0].as_str(),
        Some("ReadWriteOnce")
    );
    // Stable pod names (the ordinal) come with the headless Service the set names.
    let svc = find(&manifests, "Service");
    assert_eq!(svc["spec"]["clusterIP"].as_str(), Some("None"));
    assert_eq!(
        sts["spec"]["serviceName"].as_str(),
        svc["metadata"]["name"].as_str()
    );
    probed_and_unprivileged(mc);
    config_map_checks(&manifests);
    // Its config has a probe for more than one shard (replicas with nothing to do would
    // prove little), by the binary's own hash of the probe names.
    let cm = find(&manifests, "ConfigMap");
    let text = cm["data"]["fleet.toml"].as_str().unwrap();
    let shards: BTreeSet<u32> = text
        .lines()
        .filter_map(|l| l.strip_prefix("name = \""))
        .map(|name| mailcanary::config::shard_index(name.trim_end_matches('"'), replicas as u32))
        .collect();
    let busy = shards.len();
    assert!(busy >= 2, "only {busy} shard(s) of {replicas} get a probe");
}

#[test]
fn dockerfile_builds_static_and_runs_unprivileged() {
    let text = std::fs::read_to_string(repo("deploy/Dockerfile")).unwrap();
    assert!(text.matches("FROM ").count() >= 2, "multi-stage");
    assert!(
        text.contains("x86_64-unknown-linux-musl"),
        "static musl build"
    );
    assert!(text.contains("FROM scratch"), "minimal base");
    assert!(text.contains("USER 65532"), "non-root");
    assert!(text.contains("0.0.0.0:9725") && text.contains("VOLUME"));
}
