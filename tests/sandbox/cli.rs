//! `mailcanary sandbox` from the command line, at its default addresses.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// Kills the child if the test panics, so no orphan keeps the default ports.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn sandbox_command_serves_at_default_ports_and_exits_on_sigterm() {
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_mailcanary"))
            .args(["sandbox", "--fault", "import=delay:1s"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn mailcanary sandbox"),
    );
    let stdout = child.0.stdout.take().unwrap();
    let lines: Vec<String> = BufReader::new(stdout)
        .lines()
        .take(5)
        .map(|l| l.unwrap())
        .collect();
    assert_eq!(lines[0], "smtp 127.0.0.1:2525");
    assert_eq!(lines[1], "imap 127.0.0.1:1143");
    assert_eq!(lines[2], "api http://127.0.0.1:8088");
    assert_eq!(lines[3], "support support@helpdesk.test");
    assert!(lines[4].contains("import=delay:1s"), "{}", lines[4]);
    assert!(!lines.join("\n").contains("sandbox\n"), "no token printed");

    // The three listeners answer.
    for port in [2525u16, 1143, 8088] {
        std::net::TcpStream::connect(("127.0.0.1", port)).expect("listening");
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (status, body) = rt.block_on(crate::common::get_json("http://127.0.0.1:8088/health"));
    assert_eq!(status, 200, "{body}");

    let t0 = Instant::now();
    Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "did not exit within 5 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn bad_fault_flag_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_mailcanary"))
        .args(["sandbox", "--fault", "import=explode"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown fault"), "{err}");
}

/// What `sandbox` prints about acknowledgements with these flags (its sixth line), read
/// before it is stopped.
fn dialect_line(flags: &[&str]) -> String {
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_mailcanary"))
            .args([
                "sandbox",
                "--smtp-listen",
                "127.0.0.1:0",
                "--imap-listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ])
            .args(flags)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mailcanary sandbox"),
    );
    let stdout = child.0.stdout.take().unwrap();
    BufReader::new(stdout)
        .lines()
        .nth(5)
        .expect("a sixth line")
        .unwrap()
}

#[test]
fn a_dialect_acknowledges_new_tickets_as_its_vendor_does_out_of_the_box() {
    // Vendors that acknowledge a new ticket by default (a trigger, a scrip, a notification).
    for api in ["zendesk", "freshdesk", "zammad", "rt", "django-helpdesk"] {
        assert_eq!(
            dialect_line(&["--api", api]),
            format!("dialect {api} auto-ack on")
        );
    }
    // And those that do not until someone sets it up.
    for api in ["supportbee", "front", "helpscout"] {
        assert_eq!(
            dialect_line(&["--api", api]),
            format!("dialect {api} auto-ack off")
        );
    }
    // The flag decides where it is given: bare is on, `=off` turns a vendor's default off.
    assert_eq!(
        dialect_line(&["--api", "front", "--auto-ack"]),
        "dialect front auto-ack on"
    );
    assert_eq!(
        dialect_line(&["--api", "zendesk", "--auto-ack=off"]),
        "dialect zendesk auto-ack off"
    );
}
