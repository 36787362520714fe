//! The daemon's wiring: config → ledger, metrics, engine, probes, HTTP. Shared by the `run` and
//! `once` commands and by in-process tests, so all three run the same code.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{
    canary::Key,
    config::Config,
    flow::{Engine, Prober},
    ledger::Ledger,
    metrics::Metrics,
    web,
};

pub struct Options {
    pub state_dir: PathBuf,
    pub listen: SocketAddr,
    /// Start the schedulers (false for `once`, which sends by hand).
    pub schedule: bool,
}

/// A running prober.
pub struct Daemon {
    /// Where the HTTP server listens (the real port when asked for port 0).
    pub addr: SocketAddr,
    pub engine: Arc<Engine>,
    pub prober: Prober,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
    server: JoinHandle<()>,
}

/// The HMAC key: from the config's secret, else generated once into the state dir.
pub fn key_for(config: &Config, state_dir: &Path) -> anyhow::Result<Key> {
    match &config.prober.secret {
        Some(s) => Ok(Key::from_secret(s.expose())),
        None => Key::load_or_create(state_dir)
            .with_context(|| format!("creating the secret in {}", state_dir.display())),
    }
}

impl Daemon {
    /// Serves plain HTTP without auth.
    pub async fn start(config: &Config, opts: Options) -> anyhow::Result<Daemon> {
        Self::start_with(config, opts, Arc::new(web::exposure::Surface::plain())).await
    }

    /// Serves with the web config `surface` holds (TLS, basic auth; `--web.config.file`).
    pub async fn start_with(
        config: &Config,
        opts: Options,
        surface: Arc<web::exposure::Surface>,
    ) -> anyhow::Result<Daemon> {
        // First, so that a state dir this user cannot write is one clear line.
        crate::ledger::check_writable(&opts.state_dir)?;
        let key = key_for(config, &opts.state_dir)?;
        let ledger = Ledger::open(&opts.state_dir).context("opening the ledger")?;
        let metrics = Arc::new(Metrics::new(
            env!("CARGO_PKG_VERSION"),
            option_env!("MAILCANARY_REVISION").unwrap_or("unknown"),
        ));
        metrics.set_config_reload(true);
        let shard = config.shard.unwrap_or(crate::config::ShardOf {
            k: 0,
            n: 1,
            configured: config.probes.len(),
        });
        metrics.set_shard(shard.k, shard.n, shard.configured, config.probes.len());
        let engine = Engine::new(ledger, metrics);
        if config.prober.secret.is_none() {
            // A generated key lives in the state dir: if the dir vanishes under the running
            // prober, the ledger is made again and so must the key be.
            let (key, dir) = (key.clone(), opts.state_dir.clone());
            engine.on_ledger_reopen(move || match key.save_if_missing(&dir) {
                Ok(true) => tracing::warn!(state_dir = %dir.display(), "the key file was gone; written again"),
                Ok(false) => {}
                Err(e) => tracing::error!(state_dir = %dir.display(), error = %e, "cannot write the key file again; a restart would take the canaries in flight for forgeries"),
            });
        }
        let prober = Prober::new(config, engine.clone(), key)?;
        let ready = Arc::new(AtomicBool::new(false));
        let listener = tokio::net::TcpListener::bind(opts.listen)
            .await
            .with_context(|| format!("binding {}", opts.listen))?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let app = web::serve::guarded(
            web::router(web::WebState {
                engine: engine.clone(),
                ready: ready.clone(),
                probes: prober.probes.clone(),
            }),
            surface.clone(),
        );
        let server = tokio::spawn(web::serve::serve(listener, app, surface, shutdown.clone()));
        let tasks = prober.start(opts.schedule, shutdown.clone())?;
        ready.store(true, Ordering::Relaxed);
        Ok(Daemon {
            addr,
            engine,
            prober,
            shutdown,
            tasks,
            server,
        })
    }

    /// Sends one canary per probe now.
    pub fn send_once(&mut self) {
        crate::flow::send_once(
            &self.engine,
            &self.prober.probes,
            &mut self.tasks,
            &self.shutdown,
        );
    }

    /// Stops sending and serving. Every change is already in the ledger; waiting is bounded.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(4), async {
            while self.tasks.join_next().await.is_some() {}
            let _ = (&mut self.server).await;
        })
        .await;
        // What the ledger writer still holds is written before the process goes.
        let engine = self.engine.clone();
        let _ = tokio::task::spawn_blocking(move || engine.flush(Duration::from_secs(2))).await;
    }
}
