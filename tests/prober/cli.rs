//! The commands, as a user runs them.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::common::*;

/// Spawns `cmd` and reads the first line it prints, then stops reading its stdout.
fn spawn_first_line(cmd: &mut Command) -> (KillOnDrop, String) {
    let mut child = KillOnDrop(
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut first = String::new();
    BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    (child, first)
}

/// `once` exited 0 and printed an `ok` line for every stage; returns its stdout.
fn assert_once_passed(out: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "once failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for stage in ["submit", "import", "reply", "delivery", "end_to_end"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.contains(stage) && l.contains(" ok ")),
            "no line for {stage}:\n{stdout}"
        );
    }
    stdout
}

/// `mailcanary check` on a file named `name` holding `text`.
fn check_file(name: &str, text: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    bin()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap()
}

#[test]
fn check_reports_every_error_with_file_line_and_key() {
    // Two probes, one error each: every error is reported, not just the first.
    let out = check_file(
        "bad.toml",
        "[[probe]]\nname = \"x\"\nkind = \"mail_loop\"\ninterval = \"soon\"\n\n\
         [[probe]]\nname = \"y\"\nkind = \"mail_loop\"\ncolour = \"blue\"\n",
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml:4"),
        "interval error names line 4: {err}"
    );
    assert!(err.contains("interval"), "{err}");
    assert!(
        err.contains("bad.toml:9"),
        "unknown key names line 9: {err}"
    );
    assert!(err.contains("colour"), "{err}");

    let ok = bin()
        .args(["check", "--config", "probes/sandbox.toml"])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("sandbox"));
}

#[test]
fn check_accepts_but_warns_about_settings_that_blame_a_stage_for_the_prober() {
    let out = check_file(
        "slow.toml",
        "[[probe]]\nname = \"slow\"\nkind = \"mail_loop\"\n\n[probe.deadlines]\n\
         delivery = \"20s\"\n\n[probe.smtp]\nhost = \"127.0.0.1\"\n\
         from = \"a@example.test\"\nto = \"b@example.test\"\n\n[probe.imap]\n\
         host = \"127.0.0.1\"\nusername = \"b@example.test\"\npassword = \"pw\"\n",
    );
    assert_eq!(out.status.code(), Some(0), "a warning is not an error");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning: probe \"slow\": imap.timeout (30s)"),
        "the default IMAP timeout against a 20 s delivery deadline: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_completes_every_stage_and_exits_0() {
    let sb = sandbox().await;
    let (_, out) = run_once(&sb, &[]).await;
    assert_once_passed(&out);
    sb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_exits_1_when_a_stage_fails() {
    let sb = sandbox().await;
    sb.faults().set(
        mailcanary::sandbox::Stage::Inbound,
        mailcanary::sandbox::Fault::Error,
    );
    let (_, out) = run_once(&sb, &[]).await;
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("FAIL tempfail"), "{stdout}");
    sb.shutdown().await;
}

/// The README's run command on a fresh machine: within 30 s, completed canaries and
/// observations for all five stages, and an exposition promtool finds nothing wrong with.
#[test]
fn default_ports_run_without_config_probes_the_embedded_sandbox() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, first) = spawn_first_line(bin().arg("run").current_dir(dir.path()));
    assert!(first.contains("127.0.0.1:9725"), "{first}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let t0 = Instant::now();
    let text = loop {
        let text = rt.block_on(get_text("http://127.0.0.1:9725/metrics"));
        let s = mailcanary::metrics::testing::parse_exposition(&text);
        let all_stages = ["submit", "import", "reply", "delivery", "end_to_end"]
            .iter()
            .all(|st| {
                s.value(
                    "mailcanary_stage_duration_seconds_count",
                    &[("probe", "sandbox"), ("stage", st)],
                )
                .unwrap_or(0.0)
                    >= 1.0
            });
        let completed = s
            .value(
                "mailcanary_canaries_completed_total",
                &[("probe", "sandbox")],
            )
            .unwrap_or(0.0);
        if completed >= 1.0 && all_stages {
            break text;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no completed canary within 30 s"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    println!("first completed canary visible after {:?}", t0.elapsed());
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed by tests/run.sh");
    std::io::Write::write_all(promtool.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The state dir defaulted to ./.mailcanary with the ledger and the generated secret.
    assert!(dir.path().join(".mailcanary/ledger.redb").exists());
    assert!(dir.path().join(".mailcanary/secret").exists());

    // SIGTERM: stop sending, persist, exit within 5 s.
    let t0 = Instant::now();
    child.signal("TERM");
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "no exit within 5 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("exited {:?} after SIGTERM", t0.elapsed());
}

/// The README's manual check: `mailcanary sandbox` in one terminal, `mailcanary once --config
/// probes/sandbox.toml` in another; every stage printed, exit 0.
#[test]
fn default_ports_once_with_the_shipped_sandbox_probe_against_the_sandbox_command() {
    // The sandbox prints its addresses once it listens. Stop reading after the first line on
    // purpose: a closed stdout must not kill it (regression: println! panicked on EPIPE).
    let (mut sandbox, first) = spawn_first_line(bin().arg("sandbox"));
    assert!(first.starts_with("smtp 127.0.0.1:2525"), "{first}");
    std::thread::sleep(Duration::from_millis(100));
    assert!(sandbox.0.try_wait().unwrap().is_none(), "the sandbox died");
    let out = bin()
        .args(["once", "--config", "probes/sandbox.toml"])
        .output()
        .unwrap();
    let stdout = assert_once_passed(&out);
    print!("{stdout}");
    // The sandbox stamps a realistic trace: two hops over TLS, its receiver's verdicts.
    assert!(
        stdout.contains("hop 1") && stdout.contains("with ESMTPS TLSv1.3"),
        "{stdout}"
    );
    assert!(
        stdout.contains("hop 2") && stdout.contains("with LMTP"),
        "{stdout}"
    );
    assert!(
        stdout.contains("tls all hops  auth dkim=pass spf=pass dmarc=pass arc=none"),
        "{stdout}"
    );
}

/// The shipped examples name secret files and variables that exist only where they are
/// deployed: `check --syntax-only` lints them anyway, and still catches what is wrong in the
/// files themselves.
#[test]
fn check_syntax_only_lints_every_shipped_example_without_its_secrets() {
    let full = bin()
        .args(["check", "--config", "probes"])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(
        full.status.code(),
        Some(2),
        "the full check needs the secrets"
    );
    let lint = bin()
        .args(["check", "--syntax-only", "--config", "probes"])
        .env_clear()
        .output()
        .unwrap();
    assert!(
        lint.status.success(),
        "{}",
        String::from_utf8_lossy(&lint.stderr)
    );
    let out = String::from_utf8_lossy(&lint.stdout);
    for name in [
        "sandbox",
        "mail-loop",
        "supportbee-prod",
        "rt-support",
        "zammad-support",
        "m365-loop",
        "gmail-loop",
    ] {
        assert!(out.contains(name), "{out}");
    }
    // What the file says is still checked: an unknown key, a malformed `${`.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    let text = std::fs::read_to_string("probes/mail-loop.toml")
        .unwrap()
        .replacen("[probe.smtp]", "[probe.smtp]\ncolour = \"blue\"", 1);
    std::fs::write(&bad, text).unwrap();
    let out = bin()
        .args(["check", "--syntax-only", "--config"])
        .arg(&bad)
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:") && err.contains("colour"), "{err}");
}

/// The Microsoft 365 and Gmail examples pass the full `check` once the secret files their
/// comments ask for are there (here in a temporary dir instead of /run/secrets), and `check`
/// prints none of them.
#[test]
fn the_oauth2_examples_pass_the_full_check_once_their_secrets_are_given() {
    for (example, files) in [
        ("microsoft365", &["m365/client_secret"][..]),
        ("gmail", &["gmail/client_secret", "gmail/refresh_token"][..]),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let secrets = dir.path().join("secrets");
        for (i, f) in files.iter().enumerate() {
            let path = secrets.join(f);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, format!("example-secret-{i}-never-printed\n")).unwrap();
        }
        let text = std::fs::read_to_string(format!("probes/{example}.example.toml"))
            .unwrap()
            .replace("/run/secrets/", &format!("{}/", secrets.display()));
        let config = dir.path().join(format!("{example}.toml"));
        std::fs::write(&config, text).unwrap();
        let out = bin()
            .args(["check", "--config"])
            .arg(&config)
            .env_clear()
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "{example}: {stdout}{stderr}");
        assert!(
            !stdout.contains("never-printed") && !stderr.contains("never-printed"),
            "{example} printed a secret: {stdout}{stderr}"
        );
    }
}
