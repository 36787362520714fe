//! Process plumbing shared by the helpdesks the suite runs (`rt.rs`, `django.rs`): free ports,
//! waiting for a web server, stopping a process group, log tails.

use std::{
    fs,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Child, Command},
    time::{Duration, Instant},
};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until `url` (`http://HOST:PORT`) answers any HTTP status to `GET path`; panics with
/// the server's log after `within`.
pub fn wait_http(url: &str, path: &str, within: Duration, log: &Path) {
    let deadline = Instant::now() + within;
    let addr = url.trim_start_matches("http://");
    let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    loop {
        if let Ok(mut s) = TcpStream::connect(addr) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = s.write_all(request.as_bytes());
            let mut buf = [0u8; 12];
            if s.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.") {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{url} did not answer within {within:?}: {}",
            fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Starts `cmd` as the leader of a process group of its own (its workers are stopped with
/// it, by [`stop_group`]), stdin closed, stdout and stderr appended to `log`, and records the
/// group in `pgid` for the harness's sweep of a test process that died without cleaning up.
pub fn spawn_group(cmd: &mut Command, log: &Path, pgid: &Path, what: &str) -> Child {
    use std::os::unix::process::CommandExt;
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("{what} does not start: {e}"));
    fs::write(pgid, child.id().to_string()).unwrap();
    child
}

/// Stops a child that leads its own process group: TERM to the group, KILL after 3 s.
pub fn stop_group(child: &mut Child) {
    let group = format!("-{}", child.id());
    let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
    let _ = child.wait();
}

/// The last `n` lines of a log.
pub fn tail(p: &Path, n: usize) -> String {
    let text = fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `GET url` with an `Authorization` header, as JSON (`Null` if the body is not JSON).
pub async fn get_json_authorized(
    http: &reqwest::Client,
    url: &str,
    authorization: &str,
) -> serde_json::Value {
    http.get(url)
        .header("Authorization", authorization)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap_or_default()
}
