//! Request Tracker 5 on loopback, beside a private Postfix + Dovecot pair, with its real mail
//! gateway and mailer: a canary mailed to `support@helpdesk.test` goes through Postfix to
//! `rt-mailgate` (a pipe transport), which posts it to RT's web server; RT's AutoReply and the
//! agent's correspondence leave through Postfix's `sendmail` into the canary's Dovecot
//! mailbox. SQLite, RT's default bcrypt cost, Starlet with two workers.
//!
//! Every test starts its own RT (own site config, database, Mason cache, port) and stops it by
//! process group on drop. `tests/run.sh` installs Debian's `request-tracker5`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::Duration,
};

use crate::{
    harness::Servers,
    process::{free_port, spawn_group, stop_group, tail, wait_http},
};

/// The domain RT takes mail for (Postfix relays it to the RT pipe transport).
pub const HELPDESK_DOMAIN: &str = "helpdesk.test";
pub const SUPPORT: &str = "support@helpdesk.test";
const LIB: &str = "/usr/share/request-tracker5/lib";
const SERVER: &str = "/usr/share/request-tracker5/libexec/rt-server";
const MAILGATE: &str = "/usr/bin/rt-mailgate-5";

pub struct Rt {
    pub url: String,
    pub token: String,
    dir: PathBuf,
    server: Child,
}

impl Rt {
    /// Sets RT up (database, rights, an auth token for root), starts its web server, and routes
    /// `helpdesk.test` mail of `servers`' Postfix to RT's mail gateway.
    pub fn start(servers: &Servers) -> Rt {
        for p in [LIB, SERVER, MAILGATE, "/usr/sbin/rt-setup-database-5"] {
            assert!(
                Path::new(p).exists(),
                "{p} is missing: tests/run.sh installs Debian's request-tracker5"
            );
        }
        let dir = servers.dir.join("rt");
        for d in ["var", "mason", "session", "site.d"] {
            fs::create_dir_all(dir.join(d)).unwrap();
        }
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let etc = servers.postfix_etc();
        fs::write(
            dir.join("RT_SiteConfig.pm"),
            format!(
                r#"Set($rtname, '{HELPDESK_DOMAIN}');
Set($Organization, '{HELPDESK_DOMAIN}');
Set($WebDomain, '127.0.0.1');
Set($WebPort, {port});
Set($WebBaseURL, '{url}');
Set($WebPath, '');
Set($DatabaseType, 'SQLite');
Set($DatabaseName, '{dir}/rt.db');
Set($MasonDataDir, '{dir}/mason');
Set($MasonSessionDir, '{dir}/session');
Set($VarPath, '{dir}/var');
Set($LogToSTDERR, 'warning');
Set($LogToSyslog, undef);
Set($CorrespondAddress, '{SUPPORT}');
Set($CommentAddress, 'support-comment@{HELPDESK_DOMAIN}');
Set($MailCommand, 'sendmailpipe');
Set($SendmailPath, '/usr/sbin/sendmail');
Set($SendmailArguments, '-oi -C {etc}');
1;
"#,
                dir = dir.display(),
                etc = etc.display(),
            ),
        )
        .unwrap();
        let log = dir.join("setup.log");
        rt_command(&dir, "/usr/sbin/rt-setup-database-5")
            .args(["--action", "init"])
            .run(&log);
        fs::write(dir.join("setup.pl"), SETUP_PL).unwrap();
        let out = rt_command(&dir, "perl")
            .arg(dir.join("setup.pl"))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let token = stdout
            .lines()
            .find_map(|l| l.strip_prefix("TOKEN "))
            .unwrap_or_else(|| {
                panic!(
                    "RT setup failed: {stdout}{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
            .to_string();

        let server = spawn_group(
            rt_command(&dir, SERVER)
                .args(["--server", "Starlet", "--host", "127.0.0.1"])
                .args(["--port", &port.to_string(), "--max-workers", "2"]),
            &dir.join("server.log"),
            &dir.join("server.pgid"),
            "rt-server",
        );
        let rt = Rt {
            url,
            token,
            dir,
            server,
        };
        rt.wait_ready();

        // Mail for helpdesk.test: relayed to a pipe transport running RT's mail gateway.
        let transport = servers.dir.join("postfix/transport");
        fs::write(&transport, format!("{HELPDESK_DOMAIN} rt:\n")).unwrap();
        let master = format!(
            "rt/unix=rt unix - n n - - pipe flags=Rq user=nobody argv={MAILGATE} --queue General \
             --action correspond --url {}/",
            rt.url
        );
        let out = Command::new("/usr/sbin/postconf")
            .arg("-c")
            .arg(&etc)
            .arg("-M")
            .arg(&master)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        servers.postconf_reload(&[
            &format!("relay_domains = {HELPDESK_DOMAIN}"),
            &format!("transport_maps = texthash:{}", transport.display()),
        ]);
        rt
    }

    fn wait_ready(&self) {
        wait_http(
            &self.url,
            "/",
            Duration::from_secs(60),
            &self.dir.join("server.log"),
        );
    }
}

impl Drop for Rt {
    fn drop(&mut self) {
        stop_group(&mut self.server);
        if std::thread::panicking() {
            eprintln!(
                "rt: server log tail:\n{}",
                tail(&self.dir.join("server.log"), 30)
            );
        }
    }
}

/// A command with RT pointed at this instance's config only.
fn rt_command(dir: &Path, program: &str) -> Command {
    let mut c = Command::new(program);
    c.env("RT_SITE_CONFIG", dir.join("RT_SiteConfig.pm"))
        .env("RT_SITE_CONFIG_DIR", dir.join("site.d"))
        .current_dir(dir);
    c
}

trait RunLogged {
    fn run(&mut self, log: &Path);
}

impl RunLogged for Command {
    fn run(&mut self, log: &Path) {
        let out = self.output().unwrap();
        fs::write(log, [&out.stdout[..], &out.stderr[..]].concat()).unwrap();
        assert!(
            out.status.success(),
            "{self:?}: {}",
            fs::read_to_string(log).unwrap_or_default()
        );
    }
}

/// RT's initial data grants Everyone nothing: mail from an unknown sender would be refused.
/// Grants what a customer needs on the General queue, and makes an auth token for root.
const SETUP_PL: &str = r#"
use strict; use warnings;
use lib '/usr/share/request-tracker5/lib';
use RT; RT::LoadConfig(); RT::Init();
my $q = RT::Queue->new(RT->SystemUser); $q->Load('General') or die "no General queue";
my $everyone = RT::Group->new(RT->SystemUser); $everyone->LoadSystemInternalGroup('Everyone');
for my $r (qw(CreateTicket ReplyToTicket SeeQueue ShowTicket)) {
    my ($ok, $m) = $everyone->PrincipalObj->GrantRight(Right => $r, Object => $q);
    die "grant $r: $m" unless $ok;
}
my $root = RT::User->new(RT->SystemUser); $root->Load('root') or die "no root";
my $t = RT::AuthToken->new(RT->SystemUser);
my ($id, $msg, $string) = $t->Create(Owner => $root->Id, Description => 'mailcanary');
die "token: $msg" unless $id;
print "TOKEN $string\n";
"#;
