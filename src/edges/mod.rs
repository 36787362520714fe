//! The edges: all network I/O of the prober.
//!
//! | module | talks to | main entry |
//! |---|---|---|
//! | [`smtp`] | the submission server (the helpdesk's MX, or a relay) | [`smtp::Submitter::submit`] |
//! | [`helpdesk`] | a helpdesk's HTTP API (SupportBee so far) | [`helpdesk::Helpdesk`] |
//!
//! Architecture invariant: edges do network I/O only. They know nothing of metrics, the ledger,
//! config files or scheduling: they take plain parameter structs and return results and typed
//! errors. Every error carries a [`Reason`](crate::canary::life::Reason) (the `reason` label) and
//! a human detail for the dashboard that never contains a password, token or other secret; the
//! edge that holds the secret scrubs it, because nothing downstream knows what to scrub.

pub mod dkim;
pub mod helpdesk;
pub mod imap;
pub mod oauth2;
pub mod smtp;

/// How a connection is secured, for SMTP and IMAP alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// Plaintext (a loopback MX, the sandbox; IMAP 143 without STARTTLS).
    None,
    /// Plaintext, then STARTTLS, which the server *must* offer: a server that does not fails
    /// with `tls` (a downgrade is exactly what a probe should notice).
    StartTls,
    /// TLS from the first byte (SMTP submissions on 465, IMAPS on 993).
    Tls,
}

use std::sync::Arc;

use rustls_pki_types::{CertificateDer, pem::PemObject};

/// Adds every PEM certificate of `pem` to `roots`: how many, or why not (none, bad PEM, a
/// certificate rustls cannot use as a root).
fn add_roots(roots: &mut rustls::RootCertStore, pem: &[u8]) -> Result<usize, String> {
    let mut added = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| format!("bad PEM: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("unusable certificate: {e}"))?;
        added += 1;
    }
    if added == 0 {
        return Err("no PEM certificate found".into());
    }
    Ok(added)
}

/// Whether `pem` holds root certificates a client can trust (what a `ca_file` must hold),
/// for the config loader to say so at file, line and key rather than at start.
pub(crate) fn check_roots(pem: &[u8]) -> Result<usize, String> {
    add_roots(&mut rustls::RootCertStore::empty(), pem)
}

/// A rustls client config on the ring provider, trusting webpki-roots plus `extra_roots_pem`
/// (one or more PEM certificates, e.g. a private CA in front of a test MX).
///
/// The provider is passed explicitly rather than read from the process default, so an edge
/// works the same whether or not `main` installed one (tests, library users).
pub(crate) fn rustls_client_config(
    extra_roots_pem: Option<&[u8]>,
) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(pem) = extra_roots_pem {
        add_roots(&mut roots, pem).map_err(|e| format!("extra root certificates: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS configuration: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// Replaces every occurrence of `secret` in `text`. Empty secrets are ignored (replacing ""
/// would interleave the marker between every character).
pub(crate) fn redact(text: &str, secret: &str) -> String {
    if secret.is_empty() {
        text.to_string()
    } else {
        text.replace(secret, "[redacted]")
    }
}

/// Whether `err` or one of its sources is rustls refusing the peer (an untrusted or expired
/// certificate, a name mismatch, a TLS alert): a TLS failure, not a connection that could not
/// be made.
pub(crate) fn is_tls_error(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(e) = next {
        if e.is::<rustls::Error>() {
            return true;
        }
        // An io::Error's `source` skips the error it wraps: look at that one itself.
        next = match e.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    false
}

/// An error and its sources, joined with `": "` (Display of most network errors alone says
/// little, e.g. reqwest's "error sending request").
pub(crate) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        // Some errors repeat their source in their own Display; do not say it twice.
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// hyper-rustls hands reqwest the refused certificate inside an io::Error inside another
    /// (seen on reqwest 0.13.5), and an io::Error's `source` skips what it wraps.
    #[test]
    fn a_rustls_error_is_found_inside_nested_io_errors() {
        let refused = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let once = std::io::Error::new(std::io::ErrorKind::InvalidData, refused.clone());
        assert!(is_tls_error(&once));
        let twice = std::io::Error::other(once);
        assert!(is_tls_error(&twice));
        assert!(is_tls_error(&refused));
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(!is_tls_error(&reset));
        assert!(!is_tls_error(&std::io::Error::other("no route")));
    }

    #[test]
    fn redact_ignores_empty_secrets() {
        assert_eq!(redact("a b", ""), "a b");
        assert_eq!(redact("x=hunter2&y", "hunter2"), "x=[redacted]&y");
    }

    #[test]
    fn extra_roots_must_hold_a_certificate() {
        assert!(rustls_client_config(None).is_ok());
        let err = rustls_client_config(Some(b"not pem")).unwrap_err();
        assert!(err.contains("no PEM certificate"), "{err}");
    }
}
