//! A small OAuth2 identity provider served by the test on loopback, standing in for Microsoft
//! Entra ID / Google: a token endpoint (`client_credentials` and `refresh_token` grants, RFC
//! 6749) issuing short-lived opaque bearer tokens, and an RFC 7662 introspection endpoint that
//! Dovecot's `oauth2` passdb asks (`introspection_mode = post`) whether a token is active and
//! whose it is.
//!
//! The two endpoints listen on separate ports, so the token endpoint can be taken down
//! ([`Idp::set_down`]: its listener is closed, connections are refused) while Dovecot can still
//! check the tokens already issued. [`Idp::revoke_tokens`] makes every token issued so far
//! inactive; [`Idp::revoke_grant`] makes the token endpoint refuse a client or refresh token.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::post};
use serde_json::json;
use tokio::{net::TcpListener, task::JoinHandle};

#[derive(Default)]
struct Inner {
    /// client_id -> (client_secret, the mailbox its app-only tokens are for).
    clients: HashMap<String, (String, String)>,
    /// refresh_token -> (client_id, mailbox).
    refresh_tokens: HashMap<String, (String, String)>,
    /// access token -> (mailbox, expiry).
    tokens: HashMap<String, (String, Instant)>,
    revoked_grants: HashSet<String>,
    lifetime: Duration,
    seq: u64,
    /// Tokens granted, and introspections answered (active or not).
    granted: u64,
    introspected: u64,
    /// Every access token ever issued (tokens are removed from `tokens` when revoked).
    issued: Vec<String>,
}

#[derive(Clone)]
pub struct Idp {
    inner: Arc<Mutex<Inner>>,
    token_addr: SocketAddr,
    introspection_addr: SocketAddr,
    token_task: Arc<Mutex<Option<JoinHandle<()>>>>,
    _introspection_task: Arc<JoinHandle<()>>,
}

/// `a=b&c=d` (form-urlencoded) as pairs.
fn form(body: &str) -> HashMap<String, String> {
    let url = reqwest::Url::parse(&format!("http://form.invalid/?{body}")).unwrap();
    url.query_pairs().into_owned().collect()
}

fn refuse(error: &str) -> axum::response::Response {
    (StatusCode::BAD_REQUEST, Json(json!({ "error": error }))).into_response()
}

/// Every answer closes its connection: a pooled keep-alive connection would otherwise outlive
/// [`Idp::set_down`] (axum serves each connection on a task of its own).
async fn token(State(inner): State<Arc<Mutex<Inner>>>, body: String) -> axum::response::Response {
    let mut answer = grant(&inner, &body);
    answer.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    answer
}

fn grant(inner: &Mutex<Inner>, body: &str) -> axum::response::Response {
    let f = form(body);
    let get = |k: &str| f.get(k).cloned().unwrap_or_default();
    let mut i = inner.lock().unwrap();
    let client_id = get("client_id");
    let Some((secret, app_user)) = i.clients.get(&client_id).cloned() else {
        return refuse("invalid_client");
    };
    if secret != get("client_secret") || i.revoked_grants.contains(&client_id) {
        return refuse("invalid_client");
    }
    let user = match get("grant_type").as_str() {
        "client_credentials" => app_user,
        "refresh_token" => {
            let rt = get("refresh_token");
            match i.refresh_tokens.get(&rt) {
                Some((c, user)) if *c == client_id && !i.revoked_grants.contains(&rt) => {
                    user.clone()
                }
                _ => return refuse("invalid_grant"),
            }
        }
        _ => return refuse("unsupported_grant_type"),
    };
    i.seq += 1;
    i.granted += 1;
    let access = format!("at-{}-{:x}", i.seq, rand_part());
    let lifetime = i.lifetime;
    i.issued.push(access.clone());
    i.tokens
        .insert(access.clone(), (user, Instant::now() + lifetime));
    Json(json!({
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": lifetime.as_secs(),
    }))
    .into_response()
}

fn rand_part() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish()
}

async fn introspect(
    State(inner): State<Arc<Mutex<Inner>>>,
    body: String,
) -> Json<serde_json::Value> {
    let f = form(&body);
    let mut i = inner.lock().unwrap();
    i.introspected += 1;
    match f.get("token").and_then(|t| i.tokens.get(t)) {
        Some((user, expiry)) if Instant::now() < *expiry => {
            Json(json!({ "active": true, "username": user }))
        }
        _ => Json(json!({ "active": false })),
    }
}

async fn serve(listener: TcpListener, app: Router) {
    axum::serve(listener, app).await.unwrap();
}

impl Idp {
    /// Starts both endpoints on free loopback ports; tokens live `lifetime`.
    pub async fn start(lifetime: Duration) -> Idp {
        let inner = Arc::new(Mutex::new(Inner {
            lifetime,
            ..Inner::default()
        }));
        let token_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let introspection_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let token_addr = token_listener.local_addr().unwrap();
        let introspection_addr = introspection_listener.local_addr().unwrap();
        let introspection_app = Router::new()
            .route("/introspect", post(introspect))
            .with_state(inner.clone());
        let introspection_task = tokio::spawn(serve(introspection_listener, introspection_app));
        let idp = Idp {
            inner,
            token_addr,
            introspection_addr,
            token_task: Arc::new(Mutex::new(None)),
            _introspection_task: Arc::new(introspection_task),
        };
        idp.serve_tokens(token_listener);
        idp
    }

    fn serve_tokens(&self, listener: TcpListener) {
        let app = Router::new()
            .route("/token", post(token))
            .with_state(self.inner.clone());
        *self.token_task.lock().unwrap() = Some(tokio::spawn(serve(listener, app)));
    }

    /// Where the token endpoint listens (plain HTTP).
    pub fn token_addr(&self) -> SocketAddr {
        self.token_addr
    }

    pub fn token_url(&self) -> String {
        format!("http://{}/token", self.token_addr)
    }

    pub fn introspection_url(&self) -> String {
        format!("http://{}/introspect", self.introspection_addr)
    }

    /// An app registration whose `client_credentials` tokens are for `user` (app-only access,
    /// as Microsoft 365 grants it to one mailbox).
    pub fn client(&self, id: &str, secret: &str, user: &str) {
        self.inner
            .lock()
            .unwrap()
            .clients
            .insert(id.into(), (secret.into(), user.into()));
    }

    /// A refresh token of client `id` for `user` (what Gmail's consent screen hands out).
    pub fn refresh_token(&self, token: &str, id: &str, user: &str) {
        self.inner
            .lock()
            .unwrap()
            .refresh_tokens
            .insert(token.into(), (id.into(), user.into()));
    }

    /// A token for `user` issued out of band (what a token file holds), valid `life`.
    pub fn issue(&self, user: &str, life: Duration) -> String {
        let mut i = self.inner.lock().unwrap();
        i.seq += 1;
        let t = format!("file-{}-{:x}", i.seq, rand_part());
        i.issued.push(t.clone());
        i.tokens
            .insert(t.clone(), (user.into(), Instant::now() + life));
        t
    }

    /// Every access token issued so far becomes inactive (the grant stays usable).
    pub fn revoke_tokens(&self) {
        self.inner.lock().unwrap().tokens.clear();
    }

    /// The token endpoint refuses this client id or refresh token from now on.
    pub fn revoke_grant(&self, client_or_refresh_token: &str) {
        self.inner
            .lock()
            .unwrap()
            .revoked_grants
            .insert(client_or_refresh_token.into());
    }

    /// Takes the token endpoint down (its port refuses connections) or brings it back on the
    /// same port. Introspection keeps answering.
    pub async fn set_down(&self, down: bool) {
        if down {
            let task = self.token_task.lock().unwrap().take();
            if let Some(t) = task {
                t.abort();
                let _ = t.await;
            }
        } else {
            let listener = TcpListener::bind(self.token_addr).await.unwrap();
            self.serve_tokens(listener);
        }
    }

    /// Tokens granted by the token endpoint so far.
    pub fn granted(&self) -> u64 {
        self.inner.lock().unwrap().granted
    }

    /// Every access token issued so far, revoked ones included.
    pub fn issued(&self) -> Vec<String> {
        self.inner.lock().unwrap().issued.clone()
    }

    /// Introspections Dovecot made so far.
    pub fn introspected(&self) -> u64 {
        self.inner.lock().unwrap().introspected
    }
}
