//! Shared by `sandbox_smtp` and `sandbox_imap`: the whole sandbox, started once on ephemeral
//! loopback ports, and one client session per input: connect, write the input as it is, close
//! the writing half, read until the server closes (or 5 s). The bytes go through the same
//! accept loop, line reader and protocol state machine a real client's do; a panic on any
//! server task aborts the process (libFuzzer's panic hook), so it is found.

use std::{net::SocketAddr, sync::OnceLock, time::Duration};

use mailcanary::sandbox::{Sandbox, SandboxConfig};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    runtime::Runtime,
};

// Both targets include this module and each reads one of the two addresses.
#[allow(dead_code)]
pub struct Running {
    pub rt: Runtime,
    pub smtp: SocketAddr,
    pub imap: SocketAddr,
}

pub fn sandbox() -> &'static Running {
    static RUNNING: OnceLock<Running> = OnceLock::new();
    RUNNING.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let config = SandboxConfig {
            // Imports and replies at once: the fuzzer's mails go down the whole pipeline.
            import_delay: mailcanary::sandbox::DelayRange::fixed(Duration::ZERO),
            outbound_delay: mailcanary::sandbox::DelayRange::fixed(Duration::ZERO),
            // Keep the ground truth (and memory) small over millions of inputs.
            event_capacity: 100,
            ..SandboxConfig::ephemeral()
        };
        let sandbox = rt.block_on(Sandbox::start(config)).expect("sandbox starts");
        let (smtp, imap) = (sandbox.smtp_addr, sandbox.imap_addr);
        // It serves until the process ends.
        std::mem::forget(sandbox);
        Running { rt, smtp, imap }
    })
}

pub fn session(rt: &Runtime, addr: SocketAddr, input: &[u8]) {
    rt.block_on(async {
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let mut s = TcpStream::connect(addr).await.expect("sandbox listens");
            // The server may close first (a refused command, 421): write errors are answers.
            let _ = s.write_all(input).await;
            let _ = s.shutdown().await;
            let mut sink = [0u8; 8192];
            while let Ok(n) = s.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    });
}
