//! A TLS front for a plain-HTTP server on loopback: it terminates TLS with a given certificate
//! and key and copies the bytes to `upstream`, so a test can put a self-hosted helpdesk or an
//! identity provider behind a private CA without either knowing TLS.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::{net::TcpListener, task::JoinHandle};

pub struct TlsFront {
    pub addr: SocketAddr,
    handshakes: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl TlsFront {
    /// Listens on a free loopback port with `cert` (PEM chain) and `key` (PEM).
    pub async fn start(upstream: SocketAddr, cert: &Path, key: &Path) -> TlsFront {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .expect("certificate file")
            .collect::<Result<_, _>>()
            .expect("certificate PEM");
        let key = PrivateKeyDer::from_pem_file(key).expect("key PEM");
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server certificate and key");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (handshakes, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (h, r) = (handshakes.clone(), refused.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, h, r) = (acceptor.clone(), h.clone(), r.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(stream).await else {
                        r.fetch_add(1, Ordering::Relaxed);
                        return;
                    };
                    h.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut plain) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                    }
                });
            }
        });
        TlsFront {
            addr,
            handshakes,
            refused,
            task,
        }
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    /// TLS handshakes completed, and refused by the client (or failed).
    pub fn handshakes(&self) -> (u64, u64) {
        (
            self.handshakes.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
        )
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}
