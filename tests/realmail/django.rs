//! django-helpdesk 2.6.1 (PyPI) on loopback, beside a private Postfix + Dovecot pair, with its
//! real email import: a canary mailed to `support@example.test` lands in that Dovecot mailbox;
//! django-helpdesk's `get_email` job, run every [`IMPORT_PERIOD`] by a loop as cron would,
//! reads it over IMAP and makes the ticket; its acknowledgement and the agent's public
//! follow-up leave through a Postfix listener of their own (so a drill can take away only the
//! helpdesk's outgoing mail) into the canary's Dovecot mailbox. SQLite, waitress.
//!
//! Every test starts its own instance (own directory, database, port) and stops its processes
//! by process group on drop. The venv comes from `tests/realmail/files/django-helpdesk/
//! install.sh` (which `tests/run.sh` runs; run again here, it returns at once).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use crate::{
    harness::{Servers, address, password},
    process::{free_port, get_json_authorized, spawn_group, stop_group, tail, wait_http},
};

/// The support mailbox the import job reads.
pub const SUPPORT_USER: &str = "support";
/// How often the import job runs (each run takes about a second: Django's start-up).
pub const IMPORT_PERIOD: &str = "2";

const FILES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/realmail/files/django-helpdesk"
);

/// The venv `tests/run.sh` installs (`MAILCANARY_DJANGO_VENV` to put it elsewhere).
pub fn venv() -> PathBuf {
    std::env::var_os("MAILCANARY_DJANGO_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/mailcanary/django-helpdesk-venv"))
}

pub struct Django {
    pub url: String,
    pub token: String,
    pub queue: u64,
    dir: PathBuf,
    env: Vec<(String, String)>,
    server: Option<Child>,
    import: Option<Child>,
    /// Postfix's listener for the helpdesk's outgoing mail: `PORT/inet` in master.cf.
    outgoing_port: u16,
    servers: std::sync::Arc<Servers>,
}

impl Django {
    /// Sets django-helpdesk up (database, staff agent, token, a queue importing from
    /// `support@example.test`), starts its web server and its import loop.
    pub fn start(servers: &std::sync::Arc<Servers>) -> Django {
        let venv = venv();
        let out = Command::new(format!("{FILES}/install.sh"))
            .arg(&venv)
            .output()
            .expect("install.sh runs");
        assert!(
            out.status.success(),
            "django-helpdesk venv: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let dir = servers.dir.join("django");
        fs::create_dir_all(&dir).unwrap();
        let outgoing_port = free_port();
        let mut d = Django {
            url: String::new(),
            token: String::new(),
            queue: 0,
            dir: dir.clone(),
            env: vec![
                ("DH_DIR".into(), dir.display().to_string()),
                ("DH_SMTP_HOST".into(), "127.0.0.1".into()),
                ("DH_SMTP_PORT".into(), outgoing_port.to_string()),
                ("DH_FROM".into(), address(SUPPORT_USER)),
                ("DH_IMAP_HOST".into(), "127.0.0.1".into()),
                ("DH_IMAP_PORT".into(), servers.ports.imap.to_string()),
                ("DH_IMAP_USER".into(), address(SUPPORT_USER)),
                ("DH_IMAP_PASSWORD".into(), password(SUPPORT_USER)),
                ("DJANGO_SETTINGS_MODULE".into(), "mcsite.settings".into()),
                ("PYTHONDONTWRITEBYTECODE".into(), "1".into()),
                ("DH_IMPORT_TIMEOUT".into(), "60".into()),
            ],
            server: None,
            import: None,
            outgoing_port,
            servers: servers.clone(),
        };
        d.restore_outgoing();

        let out = d
            .command(&venv.join("bin/python"))
            .arg("bootstrap.py")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = |p: &str| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(p))
                .map(str::to_string)
        };
        let (Some(token), Some(queue)) = (line("TOKEN "), line("QUEUE ")) else {
            panic!(
                "django-helpdesk bootstrap failed: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        d.token = token;
        d.queue = queue.split(' ').next().unwrap().parse().unwrap();

        let port = free_port();
        d.url = format!("http://127.0.0.1:{port}");
        let server = spawn_group(
            d.command(&venv.join("bin/waitress-serve"))
                .arg(format!("--listen=127.0.0.1:{port}"))
                .arg("--threads=4")
                .arg("mcsite.wsgi:application"),
            &dir.join("server.log"),
            &dir.join("server.pgid"),
            "waitress",
        );
        d.server = Some(server);
        d.wait_ready();
        d.start_import();
        d
    }

    fn command(&self, program: &Path) -> Command {
        let mut c = Command::new(program);
        c.current_dir(FILES)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    fn wait_ready(&self) {
        wait_http(
            &self.url,
            "/api/",
            Duration::from_secs(60),
            &self.dir.join("server.log"),
        );
    }

    /// Starts the import job's loop (`get_email` every [`IMPORT_PERIOD`] s).
    pub fn start_import(&mut self) {
        assert!(self.import.is_none(), "the import loop runs already");
        let child = spawn_group(
            self.command(Path::new(&format!("{FILES}/import-loop.sh")))
                .arg(venv())
                .arg(IMPORT_PERIOD),
            &self.dir.join("import.log"),
            &self.dir.join("import.pgid"),
            "the import loop",
        );
        self.import = Some(child);
    }

    /// Stops the import job: the seed's broken background job. The web app and API go on.
    pub fn stop_import(&mut self) {
        if let Some(mut child) = self.import.take() {
            stop_group(&mut child);
            let _ = fs::remove_file(self.dir.join("import.pgid"));
        }
    }

    /// Takes the helpdesk's outgoing mail away: its Postfix listener is removed, so every
    /// mail it sends is refused at connect.
    pub fn break_outgoing(&self) {
        self.master(&["-MX", &format!("{}/inet", self.outgoing_port)]);
    }

    /// Gives the helpdesk its outgoing mail back (also how `start` sets it up).
    pub fn restore_outgoing(&self) {
        self.master(&[
            "-M",
            &format!(
                "{p}/inet={p} inet n - n - - smtpd -o smtpd_tls_security_level=none",
                p = self.outgoing_port
            ),
        ]);
    }

    fn master(&self, args: &[&str]) {
        let out = Command::new("/usr/sbin/postconf")
            .arg("-c")
            .arg(self.servers.postfix_etc())
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "postconf {args:?}: {out:?}");
        self.servers.postfix_reload();
        // postfix reload returns before master has (un)bound the port.
        let deadline = Instant::now() + Duration::from_secs(10);
        let want_open = args[0] == "-M";
        while Instant::now() < deadline {
            let open = std::net::TcpStream::connect(("127.0.0.1", self.outgoing_port)).is_ok();
            if open == want_open {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "Postfix's listener on {} did not follow {args:?}",
            self.outgoing_port
        );
    }

    /// One ticket as the API shows it.
    pub async fn ticket(&self, http: &reqwest::Client, id: &str) -> serde_json::Value {
        let url = format!("{}/api/tickets/{id}/", self.url);
        get_json_authorized(http, &url, &format!("Token {}", self.token)).await
    }

    /// Every ticket (any status), as the API lists them.
    pub async fn tickets(&self, http: &reqwest::Client) -> Vec<serde_json::Value> {
        let mut all = Vec::new();
        let mut url = Some(format!("{}/api/tickets/?page_size=100", self.url));
        while let Some(u) = url {
            let page = get_json_authorized(http, &u, &format!("Token {}", self.token)).await;
            all.extend(page["results"].as_array().cloned().unwrap_or_default());
            url = page["next"].as_str().map(str::to_string);
        }
        all
    }
}

impl Drop for Django {
    fn drop(&mut self) {
        self.stop_import();
        if let Some(mut server) = self.server.take() {
            stop_group(&mut server);
        }
        if std::thread::panicking() {
            for log in ["server.log", "import.log"] {
                eprintln!(
                    "django-helpdesk: {log} tail:\n{}",
                    tail(&self.dir.join(log), 30)
                );
            }
        }
    }
}
