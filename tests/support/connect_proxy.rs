//! An HTTP CONNECT proxy on loopback (RFC 9110 9.3.6), as a company's egress proxy: it
//! tunnels `CONNECT host:port` to the target, optionally only with `Proxy-Authorization: Basic`
//! of one user and password (else 407), and records every target it tunnelled to.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use base64::Engine as _;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

#[derive(Default)]
struct Seen {
    tunnels: Vec<String>,
    refused: u64,
}

pub struct ConnectProxy {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    task: JoinHandle<()>,
}

impl ConnectProxy {
    /// `login`: the user and password it requires, if any.
    pub async fn start(login: Option<(&str, &str)>) -> ConnectProxy {
        let want = login.map(|(u, p)| {
            format!(
                "basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        });
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let s = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (want, s) = (want.clone(), s.clone());
                tokio::spawn(async move {
                    let _ = tunnel(stream, want, s).await;
                });
            }
        });
        ConnectProxy { addr, seen, task }
    }

    /// Every `host:port` tunnelled to, in order.
    pub fn tunnels(&self) -> Vec<String> {
        self.seen.lock().unwrap().tunnels.clone()
    }

    /// CONNECTs answered 407.
    pub fn refused(&self) -> u64 {
        self.seen.lock().unwrap().refused
    }
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn tunnel(
    stream: TcpStream,
    want: Option<String>,
    seen: Arc<Mutex<Seen>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let mut parts = line.split_whitespace();
    let (Some("CONNECT"), Some(target)) = (parts.next(), parts.next()) else {
        reader
            .get_mut()
            .write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
            .await?;
        return Ok(());
    };
    let target = target.to_string();
    let mut authorization = None;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).await? == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.trim().eq_ignore_ascii_case("proxy-authorization")
        {
            // Keep the credentials' case: only the scheme is case-insensitive.
            let v = value.trim();
            authorization = Some(match v.split_once(' ') {
                Some((scheme, rest)) => format!("{} {rest}", scheme.to_ascii_lowercase()),
                None => v.to_string(),
            });
        }
    }
    if want.is_some() && authorization != want {
        seen.lock().unwrap().refused += 1;
        reader
            .get_mut()
            .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"egress\"\r\nContent-Length: 0\r\n\r\n")
            .await?;
        return Ok(());
    }
    let mut upstream = TcpStream::connect(&target).await?;
    seen.lock().unwrap().tunnels.push(target);
    reader
        .get_mut()
        .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        .await?;
    let mut client = reader.into_inner();
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}
