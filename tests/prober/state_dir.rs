//! The state dir under faults, with the real binary: a corrupt ledger file is moved aside and
//! the prober starts fresh (no crash loop), a state dir the process user cannot write is one
//! clear line and a non-zero exit, and a slow-fsync disk does not slow canaries down (the
//! ledger's writes are off the engine lock, group-committed by its writer thread).

use std::{path::Path, process::Stdio, time::Duration};

use crate::common::*;

const COMPLETED: &str = "mailcanary_canaries_completed_total";
const RECOVERED: &str = "mailcanary_ledger_recovered_total";

/// `mailcanary run` of the drill probe of `sb` with `state` as its state dir, stderr into
/// `log`; `wrap` is a command line the binary runs under (strace, setpriv), or empty.
fn spawn_run(
    sb: &mailcanary::sandbox::Sandbox,
    dir: &Path,
    state: &Path,
    wrap: &[&str],
) -> (KillOnDrop, std::net::SocketAddr, std::path::PathBuf) {
    let cfg = dir.join("p.toml");
    std::fs::write(&cfg, config_text(sb, &Knobs::default())).unwrap();
    let log = dir.join("stderr.log");
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let mut cmd = match wrap.split_first() {
        Some((first, rest)) => {
            let mut c = std::process::Command::new(first);
            c.args(rest).arg(env!("CARGO_BIN_EXE_mailcanary"));
            c
        }
        None => bin(),
    };
    cmd.args(["run", "--config"])
        .arg(&cfg)
        .arg("--state-dir")
        .arg(state)
        .args(["--listen", &addr.to_string()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    (KillOnDrop(cmd.spawn().unwrap()), addr, log)
}

/// A ledger file overwritten with text (an operator's mistake, a bad restore) used to make
/// `run` exit with redb's "not a database" error at every start: a crash loop. Now the file is
/// moved aside as `ledger.redb.corrupt-<unix time>`, one error line says so and where, the
/// recovery is counted, and canaries complete in a fresh ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_ledger_is_moved_aside_and_run_starts_fresh() {
    let sb = sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let junk = "not a redb database\n".repeat(500);
    std::fs::write(state.join("ledger.redb"), &junk).unwrap();
    let (prober, addr, log) = spawn_run(&sb, dir.path(), &state, &[]);
    let s = until_up(
        addr,
        Duration::from_secs(30),
        "a canary completed in the fresh ledger",
        |s| v(s, COMPLETED, &[]) >= 1.0,
    )
    .await;
    assert_eq!(s.value(RECOVERED, &[]), Some(1.0));
    drop(prober);
    let aside: Vec<_> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("ledger.redb.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(std::fs::read_to_string(&aside[0]).unwrap(), junk);
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<_> = text.lines().filter(|l| l.contains("corrupt")).collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert!(lines[0].contains("ERROR"), "{text}");
    assert!(lines[0].contains(&aside[0].display().to_string()), "{text}");
    sb.shutdown().await;
}

/// A state dir owned by root (0755) and a prober running as `nobody`: one line on stderr naming
/// the dir and what to do, a non-zero exit, and neither a panic nor a redb message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_dir_the_user_cannot_write_is_one_clear_line() {
    use std::os::unix::fs::PermissionsExt;
    let sb = sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    // nobody must reach the config (written 0644) and the state dir, and write into neither.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (mut prober, _, log) = spawn_run(
        &sb,
        dir.path(),
        &state,
        &[
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
        ],
    );
    let status = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = prober.0.try_wait().unwrap() {
                return st;
            }
            assert!(std::time::Instant::now() < deadline, "still running");
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{text}");
    // The config's own warnings may come first; the error is one line, the last.
    let last = text.trim().lines().last().unwrap_or_default();
    let want = format!(
        "mailcanary: state dir {}: not writable by this process (uid 65534): Permission denied",
        state.display()
    );
    assert!(last.starts_with(&want), "{text}");
    assert!(last.contains("--state-dir"), "{text}");
    assert_eq!(last.matches("Permission denied").count(), 1, "{text}");
    assert!(
        !text.contains("panicked") && !text.contains("redb"),
        "{text}"
    );
    assert_eq!(std::fs::read_dir(&state).unwrap().count(), 0);
    sb.shutdown().await;
}

/// strace and the prober it traces. Killing strace alone detaches it and leaves the prober
/// running (a leaked prober was found running half an hour after this drill), so the traced
/// processes are killed first, on every way out of the test.
struct Traced(KillOnDrop);

impl Drop for Traced {
    fn drop(&mut self) {
        let pid = self.0.0.id();
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten();
        for task in tasks.flatten() {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for child in children.split_whitespace() {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", child])
                    .status();
            }
        }
    }
}

/// A disk whose every fsync takes a second (strace delays each `fdatasync`, the call redb's
/// commit makes on Linux) slows the ledger writer, not the canaries: writes are group-committed
/// by the writer thread, off the engine lock, and only a new canary's first write (before its
/// DATA is sent) is waited for. Canaries keep completing and no stage fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_fsync_disk_does_not_fail_canaries() {
    let sb = sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let trace = dir.path().join("strace.out");
    let trace_arg = trace.to_str().unwrap().to_string();
    let (strace, addr, log) = spawn_run(
        &sb,
        dir.path(),
        &state,
        &[
            "strace",
            "-f",
            "-qq",
            "-o",
            &trace_arg,
            "-e",
            "trace=fdatasync,fsync",
            "-e",
            "inject=fdatasync:delay_enter=1000000",
            "-e",
            "inject=fsync:delay_enter=1000000",
        ],
    );
    let _prober = Traced(strace);
    let start = until_up(addr, Duration::from_secs(60), "the prober up", |_| true).await;
    let before = v(&start, COMPLETED, &[]);
    let t = std::time::Instant::now();
    let s = until(
        addr,
        Duration::from_secs(60),
        "5 canaries completed on the slow disk",
        |s| v(s, COMPLETED, &[]) >= before + 5.0,
    )
    .await;
    eprintln!(
        "slow fsync (1 s): {} canaries completed in {:?}",
        v(&s, COMPLETED, &[]) - before,
        t.elapsed()
    );
    no_failures(&s);
    // The delay was really there: the ledger did sync, through strace.
    let syncs = std::fs::read_to_string(&trace).unwrap_or_default();
    assert!(
        syncs.lines().any(|l| l.contains("fdatasync(")),
        "no fdatasync traced: {syncs}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    sb.shutdown().await;
}
