//! `--web.config.file`: TLS and basic auth for the HTTP surface, in the file format of
//! Prometheus's exporter-toolkit (`docs/web-configuration.md` there), so one file serves
//! Prometheus, its exporters and this prober. Read at start and again on SIGHUP: a file that
//! does not load keeps the one in use.
//!
//! What is read: `tls_server_config` (`cert_file`, `key_file`, `client_auth_type`,
//! `client_ca_file`, `min_version`, `max_version`) and `basic_auth_users` (user: bcrypt hash).
//! Anything else is refused with its line, as the rest of the config is, rather than ignored:
//! a setting that silently does nothing is a hole the operator thinks is closed.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::config::{ConfigError, Position};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    tls_server_config: Option<RawTls>,
    basic_auth_users: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    client_auth_type: Option<String>,
    client_ca_file: Option<PathBuf>,
    min_version: Option<String>,
    max_version: Option<String>,
}

/// Successful basic-auth verifications kept, so a scrape does not pay bcrypt (tens of ms by
/// design) every time; cleared when full.
const VERIFIED_MAX: usize = 256;

/// One loaded web config.
pub struct Exposure {
    /// `None`: plain HTTP.
    pub tls: Option<Arc<ServerConfig>>,
    /// user → bcrypt hash; empty: no basic auth.
    users: BTreeMap<String, String>,
    /// SHA-256 of `user:password` pairs bcrypt accepted under this config.
    verified: Mutex<HashSet<[u8; 32]>>,
}

impl Exposure {
    /// Plain HTTP, no auth: the default without `--web.config.file`.
    fn open() -> Exposure {
        Exposure {
            tls: None,
            users: BTreeMap::new(),
            verified: Mutex::new(HashSet::new()),
        }
    }

    pub fn needs_auth(&self) -> bool {
        !self.users.is_empty()
    }

    /// Loads and checks `path`. Errors name the file, the line and the key.
    pub fn load(path: &Path) -> Result<Exposure, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::file(&file, format!("cannot read: {e}")))?;
        let raw: Raw = if text.trim().is_empty() {
            Raw {
                tls_server_config: None,
                basic_auth_users: None,
            }
        } else {
            serde_yaml::from_str(&text).map_err(|e| {
                let position = e.location().map(|l| Position {
                    line: l.line(),
                    column: l.column(),
                });
                // serde_yaml prefixes the message with the key path ("a.b: ...").
                let msg = e.to_string();
                let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
                let (key, message) = match msg.split_once(": ") {
                    Some((k, m)) if !k.contains(' ') => (Some(k.to_string()), m.to_string()),
                    _ => (None, msg),
                };
                ConfigError {
                    file: file.clone(),
                    position,
                    key,
                    message,
                }
            })?
        };
        let err = |key: &str, message: String| ConfigError {
            file: file.clone(),
            position: line_of(&text, key.rsplit('.').next().unwrap_or(key)),
            key: Some(key.to_string()),
            message,
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        let tls = match raw.tls_server_config {
            None => None,
            Some(t) => Some(Arc::new(tls_config(t, dir, &err)?)),
        };
        let users = raw.basic_auth_users.unwrap_or_default();
        for (user, hash) in &users {
            if hash.parse::<bcrypt::HashParts>().is_err() {
                return Err(err(
                    &format!("basic_auth_users.{user}"),
                    "not a bcrypt hash (`$2y$…`, e.g. from `htpasswd -nBC 10 USER`)".into(),
                ));
            }
        }
        Ok(Exposure {
            tls,
            users,
            verified: Mutex::new(HashSet::new()),
        })
    }

    /// Whether an `Authorization` header value lets the request in. Blocking (bcrypt): call it
    /// off the async workers. A user not configured is checked against a configured hash
    /// anyway, so the time taken does not tell which users exist.
    pub fn authorized(&self, authorization: Option<&[u8]>) -> bool {
        let Some((user, password)) = authorization.and_then(basic_credentials) else {
            return false;
        };
        let digest: [u8; 32] = Sha256::new()
            .chain_update(user.as_bytes())
            .chain_update([0u8])
            .chain_update(password.as_bytes())
            .finalize()
            .into();
        if lock(&self.verified).contains(&digest) {
            return true;
        }
        let (hash, known) = match self.users.get(&user) {
            Some(h) => (h, true),
            None => match self.users.values().next() {
                Some(h) => (h, false),
                None => return false,
            },
        };
        let ok = bcrypt::verify(&password, hash).unwrap_or(false) && known;
        if ok {
            let mut v = lock(&self.verified);
            if v.len() >= VERIFIED_MAX {
                v.clear();
            }
            v.insert(digest);
        }
        ok
    }
}

/// The web config in use, swapped whole on reload.
pub struct Surface {
    path: Option<PathBuf>,
    current: RwLock<Arc<Exposure>>,
}

impl Surface {
    /// Loads `path` (or serves plain HTTP without one).
    pub fn new(path: Option<PathBuf>) -> Result<Surface, ConfigError> {
        let current = match &path {
            Some(p) => Exposure::load(p)?,
            None => Exposure::open(),
        };
        Ok(Surface {
            path,
            current: RwLock::new(Arc::new(current)),
        })
    }

    /// Plain HTTP, no auth, nothing to reload.
    pub fn plain() -> Surface {
        Surface {
            path: None,
            current: RwLock::new(Arc::new(Exposure::open())),
        }
    }

    pub fn current(&self) -> Arc<Exposure> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Reads the file again (SIGHUP). A file that does not load leaves the one in use and
    /// says why; new connections get the new TLS settings, open ones keep theirs.
    pub fn reload(&self) -> Result<(), ConfigError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let new = Exposure::load(path)?;
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(new);
        Ok(())
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `Basic base64(user:password)` → (user, password).
fn basic_credentials(value: &[u8]) -> Option<(String, String)> {
    use base64::Engine;
    let value = std::str::from_utf8(value).ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// The first line where `key:` starts a YAML mapping entry, for errors found after parsing.
fn line_of(text: &str, key: &str) -> Option<Position> {
    text.lines().enumerate().find_map(|(i, l)| {
        let t = l.trim_start();
        t.strip_prefix(key)
            .is_some_and(|rest| rest.trim_start().starts_with(':'))
            .then(|| Position {
                line: i + 1,
                column: l.len() - t.len() + 1,
            })
    })
}

fn tls_config(
    t: RawTls,
    dir: &Path,
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<ServerConfig, ConfigError> {
    let k = |name: &str| format!("tls_server_config.{name}");
    let resolve = |p: PathBuf| if p.is_absolute() { p } else { dir.join(p) };
    let cert_file = t
        .cert_file
        .map(resolve)
        .ok_or_else(|| err(&k("cert_file"), "required with tls_server_config".into()))?;
    let key_file = t
        .key_file
        .map(resolve)
        .ok_or_else(|| err(&k("key_file"), "required with tls_server_config".into()))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_file)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| err(&k("cert_file"), format!("{}: {e}", cert_file.display())))?;
    if certs.is_empty() {
        return Err(err(
            &k("cert_file"),
            format!("{}: no PEM certificate in it", cert_file.display()),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&key_file)
        .map_err(|e| err(&k("key_file"), format!("{}: {e}", key_file.display())))?;
    let version = |name: &str, v: &Option<String>| -> Result<Option<u8>, ConfigError> {
        match v.as_deref() {
            None => Ok(None),
            Some("TLS12") => Ok(Some(12)),
            Some("TLS13") => Ok(Some(13)),
            Some(other @ ("TLS10" | "TLS11")) => Err(err(
                &k(name),
                format!("{other} is not offered (rustls speaks TLS12 and TLS13)"),
            )),
            Some(other) => Err(err(
                &k(name),
                format!("unknown version `{other}`, expected TLS12 or TLS13"),
            )),
        }
    };
    let min = version("min_version", &t.min_version)?.unwrap_or(12);
    let max = version("max_version", &t.max_version)?.unwrap_or(13);
    if min > max {
        return Err(err(&k("min_version"), "above max_version".into()));
    }
    let versions: Vec<&'static rustls::SupportedProtocolVersion> =
        [(12, &rustls::version::TLS12), (13, &rustls::version::TLS13)]
            .into_iter()
            .filter(|(v, _)| (min..=max).contains(v))
            .map(|(_, p)| p)
            .collect();
    let auth = t.client_auth_type.as_deref().unwrap_or("NoClientCert");
    let roots = |required: bool| -> Result<Arc<rustls::RootCertStore>, ConfigError> {
        let Some(ca) = t.client_ca_file.clone().map(resolve) else {
            return Err(err(
                &k("client_auth_type"),
                format!("{auth} needs client_ca_file"),
            ));
        };
        let mut store = rustls::RootCertStore::empty();
        let cas = CertificateDer::pem_file_iter(&ca)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| err(&k("client_ca_file"), format!("{}: {e}", ca.display())))?;
        for c in cas {
            store
                .add(c)
                .map_err(|e| err(&k("client_ca_file"), format!("{}: {e}", ca.display())))?;
        }
        if store.is_empty() && required {
            return Err(err(
                &k("client_ca_file"),
                format!("{}: no PEM certificate in it", ca.display()),
            ));
        }
        Ok(Arc::new(store))
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| err(&k("min_version"), e.to_string()))?;
    let verifier = match auth {
        "NoClientCert" => {
            if t.client_ca_file.is_some() {
                return Err(err(
                    &k("client_ca_file"),
                    "set, but client_auth_type is NoClientCert: no client certificate would be checked".into(),
                ));
            }
            None
        }
        "RequireAndVerifyClientCert" => Some(
            WebPkiClientVerifier::builder_with_provider(roots(true)?, provider.clone()).build(),
        ),
        "VerifyClientCertIfGiven" => Some(
            WebPkiClientVerifier::builder_with_provider(roots(true)?, provider.clone())
                .allow_unauthenticated()
                .build(),
        ),
        other @ ("RequestClientCert" | "RequireAnyClientCert") => {
            return Err(err(
                &k("client_auth_type"),
                format!(
                    "{other} accepts a certificate without checking it; use RequireAndVerifyClientCert or VerifyClientCertIfGiven with client_ca_file"
                ),
            ));
        }
        other => {
            return Err(err(
                &k("client_auth_type"),
                format!(
                    "unknown `{other}`, expected NoClientCert, VerifyClientCertIfGiven or RequireAndVerifyClientCert"
                ),
            ));
        }
    };
    let builder = match verifier {
        None => builder.with_no_client_auth(),
        Some(v) => builder
            .with_client_cert_verifier(v.map_err(|e| err(&k("client_ca_file"), e.to_string()))?),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| err(&k("key_file"), format!("does not fit cert_file: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
