//! The HTTP server: plain or TLS (`exposure.rs`), with the limits that let it face a pod
//! network. A client gets [`HEADER_TIMEOUT`] to send a request's headers (also the wait for
//! the next request on a kept-alive connection) and [`HANDSHAKE_TIMEOUT`] for TLS; a request
//! gets [`REQUEST_TIMEOUT`], body included; at most [`MAX_CONNECTIONS`] connections are
//! open, and one past that is closed at once. A slow client (slowloris) is dropped when its
//! timer runs out instead of holding a connection forever.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::exposure::Surface;

pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
pub const MAX_CONNECTIONS: usize = 512;
/// Every route's request body (the webhook route has its own, larger cap).
pub const MAX_BODY: usize = 64 * 1024;

/// Paths served without basic auth: the kubelet's probes (which cannot be given a password
/// without putting it in the pod spec) and the webhooks (which the vendor signs; most vendors
/// cannot send basic auth). TLS, when configured, applies to them too.
fn open_path(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz") || path.starts_with("/webhooks/")
}

/// The router with the web config's basic auth and the per-request timeout around it.
pub fn guarded(app: Router, surface: Arc<Surface>) -> Router {
    app.layer(axum::middleware::from_fn_with_state(surface, guard))
}

async fn guard(State(surface): State<Arc<Surface>>, req: Request, next: Next) -> Response {
    let exposure = surface.current();
    if exposure.needs_auth() && !open_path(req.uri().path()) {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes().to_vec());
        let ok = tokio::task::spawn_blocking(move || exposure.authorized(given.as_deref()))
            .await
            .unwrap_or(false);
        if !ok {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Basic realm=\"mailcanary\"")],
                "Unauthorized\n",
            )
                .into_response();
        }
    }
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(r) => r,
        Err(_) => (StatusCode::REQUEST_TIMEOUT, "request timed out\n").into_response(),
    }
}

/// Accepts connections until `shutdown`, each served on its own task.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    surface: Arc<Surface>,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let full_logged = Arc::new(AtomicBool::new(false));
    let conns = tokio_util::task::TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if !full_logged.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    max = MAX_CONNECTIONS,
                    %peer,
                    "HTTP connection limit reached; closing new connections until one ends (logged once)"
                );
            }
            drop(stream);
            continue;
        };
        full_logged.store(false, Ordering::Relaxed);
        let (app, tls, sd) = (app.clone(), surface.current().tls.clone(), shutdown.clone());
        conns.spawn(async move {
            let _slot = slot;
            let _ = stream.set_nodelay(true);
            match tls {
                None => connection(TokioIo::new(stream), app, sd).await,
                Some(config) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(config);
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => connection(TokioIo::new(s), app, sd).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    conns.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), conns.wait()).await;
}

async fn connection<I>(io: TokioIo<I>, app: Router, shutdown: CancellationToken)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(io, TowerToHyperService::new(app));
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
        }
    }
}
