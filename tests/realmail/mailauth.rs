//! DKIM, SPF and DMARC as a real MX checks them, for one test's Postfix + Dovecot (issue 16).
//!
//! Turned on per test with `Setup { mail_auth: true, .. }` (off by default: other tests start
//! none of this and pay nothing for it). Then the instance has:
//!
//! - **A DNS server**: Debian's `unbound` (`local-zone "example.test." static` plus
//!   `local-data`, changed at run time with `unbound-control` over a unix socket), serving
//!   `example.test` on **port 53 of a loopback address of its own** (`127.53.X.Y`, picked free
//!   per test). Port 53 because opendmarc (libresolv) and policyd-spf (pydns) read only
//!   `/etc/resolv.conf`, which cannot name a port; those daemons run in a mount namespace
//!   (`unshare -m`) where a bind-mounted `resolv.conf` names that address, and opendkim
//!   (libunbound) is pointed at it by its own `ResolverConfiguration`. Nothing uses the
//!   system resolver. Every record is served with TTL 0, so no resolver (the prober's
//!   included) keeps an old answer after a change. Records at the start:
//!   - `mc._domainkey.example.test TXT "v=DKIM1; k=rsa; p=<the signer's key>"` ([`SELECTOR`])
//!   - `example.test TXT "v=spf1 ip4:127.0.0.0/8 -all"` ([`SPF_RECORD`])
//!   - `_dmarc.example.test TXT "v=DMARC1; p=reject; adkim=s; aspf=s"` ([`DMARC_RECORD`])
//!   - `out.example.test`, `mx.example.test A 127.0.0.1`, `example.test MX 10 mx.example.test`
//! - **The outbound server** (`out.example.test`): submission (587/465, AUTH as any mailbox)
//!   signs mail whose `From:` is `@example.test` with real `opendkim` (`Mode s`, a 2048-bit
//!   RSA key made per test, `d=example.test; s=mc`, relaxed/relaxed), then relays it over
//!   SMTP with STARTTLS (helo `out.example.test`) to
//! - **The MX** (`mx.example.test`, the instance's port 25): `postfix-policyd-spf-python` (a
//!   policy service at RCPT), `opendkim` in `Mode v` and `opendmarc` as milters, each writing
//!   `Authentication-Results: mx.example.test; ...` ([`AUTHSERV_ID`]; nothing is rejected for
//!   a failing verdict: the verdicts are for the mail's reader), then LMTP with STARTTLS over
//!   TCP to Dovecot (`imap.example.test`, [`STORE_HOST`]).
//!
//! Mail sent straight to port 25 skips the signer (no DKIM signature: `dkim=none`). SPF is
//! checked on the MAIL FROM domain: send with an `@example.test` envelope sender for
//! `spf=pass` (the client is 127.0.0.1).
//!
//! The API (all on [`super::Servers`] or returned by it):
//! - [`Servers::mail_auth`](super::Servers::mail_auth) `-> &MailAuth` (panics without `mail_auth`)
//! - [`MailAuth::resolver`] `-> SocketAddr`: the DNS server, for the prober's DKIM check
//! - [`MailAuth::rotate_dkim_key`]: publish a different key at the selector (signatures
//!   made from now on, and before, fail: `dkim=fail`); [`MailAuth::restore_dkim_key`]
//! - [`MailAuth::remove_spf`] (`spf=none`), [`MailAuth::set_txt`]`(name, text)` /
//!   [`MailAuth::remove`]`(name, rtype)` for any record (e.g.
//!   `set_txt("example.test", "v=spf1 -all")` for `spf=fail`), [`MailAuth::records`] (what
//!   is served), [`query_txt`]`(resolver, name)` (a real DNS query, to see a change took)
//! - [`Servers::set_plaintext_hop`](super::Servers::set_plaintext_hop)`(bool)`: the
//!   out → MX hop without TLS (`with ESMTP`) or back to STARTTLS (`with ESMTPS`); also
//!   `Setup { plaintext_hop: true, .. }` from the start
//! - [`Servers::delivered`](super::Servers::delivered)`(user, message_id, within) -> String`:
//!   the raw stored mail, waited for; [`header_block`], [`header_values`]`(raw, name)`
//!   (unfolded, newest first), [`authentication_results`] to read it
//! - the names: [`AUTHSERV_ID`] `mx.example.test`, [`OUT_HOST`], [`STORE_HOST`],
//!   [`SELECTOR`], [`SPF_RECORD`], [`DMARC_RECORD`]
//!
//! A change takes effect for the next mail: the verifiers look the records up per message.
//!
//! The prober, to go this way: `[probe.smtp]` on `ports.submission` with `tls = "starttls"`,
//! the test CA as `ca_file`, `username`/`password` of a mailbox (`address(u)`,
//! `password(u)`), `from = address(u)`; `common::ProbeSpec` with `SmtpMode::Submission587`
//! writes exactly that (`auth_mx.rs`'s last test). Postfix's Received dates have whole
//! seconds only, so per-hop delays on loopback are mostly 0 s.
//!
//! A delivered mail's header, verbatim as Dovecot stored it (`auth_mx.rs`'s first test prints
//! it with `--nocapture`; newest hop first; each continuation line starts with a tab,
//! shown here as four spaces):
//!
//! ```text
//! Return-Path: <canary@example.test>
//! Delivered-To: inbox@example.test
//! Received: from mx.example.test ([127.0.0.1])
//!     (using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))
//!     by imap.example.test with LMTPS
//!     id kHHfGXtAEGvJTgAAg+zDdQ
//!     (envelope-from <canary@example.test>)
//!     for <inbox@example.test>; Wed, 02 Dec 2026 15:59:55 +0000
//! Authentication-Results: mx.example.test; dmarc=pass (p=reject dis=none) header.from=example.test
//! Authentication-Results: mx.example.test;
//!     dkim=pass (2048-bit key; unprotected) header.d=example.test header.i=@example.test header.a=rsa-sha256 header.s=mc header.b=Bw8oPwyY;
//!     dkim-atps=neutral
//! Authentication-Results: mx.example.test; spf=pass (sender SPF authorized) smtp.mailfrom=example.test (client-ip=127.0.0.1; helo=out.example.test; envelope-from=canary@example.test; receiver=example.test)
//! Received: from out.example.test (localhost [127.0.0.1])
//!     (using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)
//!      key-exchange X25519 server-signature ECDSA (prime256v1) server-digest SHA256)
//!     (No client certificate requested)
//!     by mx.example.test (Postfix) with ESMTPS id 5FA32A14264
//!     for <inbox@example.test>; Wed,  2 Dec 2026 15:59:55 +0000 (UTC)
//! DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.test; s=mc;
//!     t=1796227195; bh=M8DqYT3v/taJt9ZN8ogrTmpmgWTRbWCC84VxvtLg61c=;
//!     h=From:To:Subject:Date:From;
//!     b=Bw8oPwyYjUsk5JCS1Z/TQlP5kYFJ6e28mqhczPCR+/h21tzFRFo6e9OhJKkV+gJFw
//!      ZAt3UBa0D/JJRngA5gUGhT/qBm01BB9ctv5sbw1skdGSMoqFVNSSEVCtm9m6qxXiOY
//!      YAe1aI1Fn8oETXLWi0J+WGpNsvv+HshrpTb8ZOrraIb5xtDos7gl6rbhNsHQOvTYth
//!      hKkPLmhfNErl1fnGhn2cgmo0ZdjvIX18mLvs8F7mH5Ca5PUf2m9B0VxWm+xbkvU8b7
//!      qJxr8BxsSJYQNXyX75juFegh+B36nbcD5ef+tA32Q8Jnsif8j4HPDvQcia0CKhYeBX
//!      UjIbty1Wa763Q==
//! Received: from prober.test (localhost [127.0.0.1])
//!     (using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)
//!      key-exchange X25519 server-signature ECDSA (prime256v1) server-digest SHA256)
//!     (No client certificate requested)
//!     by out.example.test (Postfix) with ESMTPSA id 0C3EBA1425D
//!     for <inbox@example.test>; Wed,  2 Dec 2026 15:59:55 +0000 (UTC)
//! From: canary@example.test
//! To: inbox@example.test
//! Subject: pass
//! Message-ID: <19991.pass@example.test>
//! Content-Transfer-Encoding: 7bit
//! Date: Wed, 02 Dec 2026 15:59:54 +0000
//! ```
//!
//! What the drills change there: a rotated key gives `dkim=fail reason="signature
//! verification failed" (2048-bit key; unprotected) ...` and, SPF still aligned,
//! `dmarc=pass`; no SPF record `spf=none (no SPF record) ...`; both `dmarc=fail (p=reject
//! dis=none)` (`dis=none`: opendmarc rejects nothing here); `v=spf1 -all` `spf=fail (SPF fail
//! - not authorized)`; the plaintext hop's MX line loses its `(using TLS...)` comment and
//! says `with ESMTP`. Dovecot's dates have two-digit days, Postfix's pad with a space.
//! opendkim says `unprotected`: the zone is not DNSSEC-signed.
//!
//! A milter that is down: `milter_default_action` is Postfix's default, `tempfail`, so the
//! MX defers the mail (and retries) rather than storing it unjudged (not drilled here).
//!
//! Distinct sending addresses (network namespaces) are not needed for the SPF drills: all
//! mail leaves from 127.0.0.1 and the drills change the record instead
//! (`set_txt("example.test", "v=spf1 ip4:192.0.2.0/24 -all")`: this sender is not listed).
//!
//! Surprises of the real daemons, each seen here (unless said) and handled where named:
//! - opendmarc ignores mail from its `IgnoreHosts`, 127.0.0.1 by default: the mail got no
//!   `dmarc=` header at all. Its list here holds only a TEST-NET address.
//! - policyd-spf skips `skip_addresses`, 127.0.0.0/8 by default, and then writes
//!   `Authentication-Results: mx.example.test; none (SPF check N/A for local connections -
//!   client-ip=...)`, a result with no `spf=` method (a reader must tolerate it). Same fix.
//!   Its Debian defaults `HELO_reject`/`Mail_From_reject = Fail` would refuse the `-all`
//!   drill's mail (documented; set to False, not tried).
//! - policyd-spf resolves with pydns (`python3-dns`, the first choice of python3-spf's
//!   dependencies), opendmarc with libresolv: both read only `/etc/resolv.conf`, no port;
//!   hence port 53 and the mount namespace.
//! - libunbound (opendkim) answers every `.test` name NXDOMAIN itself, a built-in RFC 6761
//!   local zone: opendkim said `dkim=fail reason="key not found in DNS"` and sent no query.
//!   `local-zone: "test." nodefault` in its `ResolverConfiguration`.
//! - opendkim refuses to start when a directory above its key file is world-writable
//!   (`/tmp`): `RequireSafeKeys no` (the key file itself is 0600).
//! - libmilter (opendkim, opendmarc) acts on SIGTERM only at its next poll: 4 to 5 s to exit;
//!   they get KILL after half a second.
//! - Not surprises, tried: opendkim in `Mode v` verifies loopback mail although
//!   `InternalHosts` defaults to 127.0.0.1 (it has no key to sign with); libunbound queries a
//!   loopback forwarder despite `do-not-query-localhost`; Postfix relays to its own port 25
//!   without a "loops back to myself" even when both listeners use one `myhostname`. The
//!   names `out.` and `mx.example.test` are only for a readable Received chain.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, UdpSocket},
    os::unix::{fs::PermissionsExt, net::UnixStream, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

/// The authserv-id of every `Authentication-Results` the MX writes (RFC 8601 section 2.5).
pub const AUTHSERV_ID: &str = "mx.example.test";
/// The DKIM selector: the key is at `mc._domainkey.example.test`.
pub const SELECTOR: &str = "mc";
/// The SPF record of `example.test` at the start.
pub const SPF_RECORD: &str = "v=spf1 ip4:127.0.0.0/8 -all";
/// The DMARC record `_dmarc.example.test`: strict alignment, so only `example.test` itself
/// aligns.
pub const DMARC_RECORD: &str = "v=DMARC1; p=reject; adkim=s; aspf=s";
/// The outbound (signing) server's name, in its Received line and HELO.
pub const OUT_HOST: &str = "out.example.test";
/// The mail store's (Dovecot's) name, in its LMTP Received line.
pub const STORE_HOST: &str = "imap.example.test";
/// A TEST-NET address: the "ignored"/"skipped" list of opendmarc and policyd-spf, so that
/// loopback clients are checked (see the module's surprises).
const NOT_LOOPBACK: &str = "192.0.2.1";

const READY_WITHIN: Duration = Duration::from_secs(15);

/// The DNS server and the DKIM, DMARC and SPF daemons of one instance. Stopped by
/// [`Servers`](super::Servers) (by process group; a dead test's are swept by their `.pgid`).
pub struct MailAuth {
    dir: PathBuf,
    resolver: SocketAddr,
    /// The two keys' `v=DKIM1` records (the signer's, the rotation's), once [`Self::finish`]
    /// has them.
    keys: std::sync::OnceLock<(String, String)>,
    /// `openssl genrsa` of those keys, running while Postfix and Dovecot start.
    keygen: Mutex<Vec<Child>>,
    daemons: Mutex<Vec<(&'static str, Child)>>,
}

impl MailAuth {
    /// Starts making the keys, and starts unbound, the verifying opendkim and opendmarc
    /// under `dir/auth`; [`Self::finish`] does the rest once Postfix and Dovecot run. Postfix
    /// (and policyd-spf, which it spawns) is started by the caller, inside
    /// [`MailAuth::in_dns_namespace`].
    pub(super) fn start(dir: &Path) -> Result<MailAuth, String> {
        let auth = dir.join("auth");
        fs::create_dir_all(&auth).unwrap();
        fs::set_permissions(&auth, fs::Permissions::from_mode(0o755)).unwrap();
        // Two keys at once (2048-bit RSA takes 0.1 to 1.5 s each): the signer's, and the one
        // a rotation publishes instead.
        let keygen: Vec<Child> = ["sign.key", "rotated.key"]
            .iter()
            .map(|k| {
                Command::new("/usr/bin/openssl")
                    .args(["genrsa", "-out", k, "2048"])
                    .current_dir(&auth)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .process_group(0)
                    .spawn()
                    .expect("openssl genrsa")
            })
            .collect();
        let resolver = free_dns_address()?;
        let m = MailAuth {
            dir: auth.clone(),
            resolver,
            keys: Default::default(),
            keygen: Mutex::new(keygen),
            daemons: Mutex::new(Vec::new()),
        };
        fs::write(
            auth.join("resolv.conf"),
            format!(
                "nameserver {}\noptions timeout:2 attempts:2\n",
                resolver.ip()
            ),
        )
        .unwrap();
        m.write_configs();
        m.spawn(
            "unbound",
            Command::new("/usr/sbin/unbound").args(["-d", "-c", &m.path("unbound.conf")]),
        )?;
        m.spawn(
            "opendkim-verify",
            Command::new("/usr/sbin/opendkim").args(["-f", "-x", &m.path("verify.conf")]),
        )?;
        let mut dmarc = m.in_dns_namespace("/usr/sbin/opendmarc");
        dmarc.args(["-f", "-c", &m.path("opendmarc.conf")]);
        m.spawn("opendmarc", &mut dmarc)?;
        Ok(m)
    }

    /// Waits for the keys, starts the signing opendkim, waits until every daemon answers and
    /// publishes the signer's key.
    pub(super) fn finish(&self) -> Result<(), String> {
        for mut k in std::mem::take(&mut *self.keygen.lock().unwrap()) {
            let status = k.wait().unwrap();
            if !status.success() {
                return Err(format!("openssl genrsa: {status}"));
            }
        }
        let keys = (
            dkim_txt(&self.dir.join("sign.key"))?,
            dkim_txt(&self.dir.join("rotated.key"))?,
        );
        let _ = self.keys.set(keys);
        fs::set_permissions(self.dir.join("sign.key"), fs::Permissions::from_mode(0o600)).unwrap();
        // Surprise: opendkim refuses a key whose path has a directory others can write
        // (`RequireSafeKeys`, on by default), and /tmp is one: the key's own mode (0600) is
        // what keeps it safe here, so the sign config turns the check off.
        self.spawn(
            "opendkim-sign",
            Command::new("/usr/sbin/opendkim").args(["-f", "-x", &self.path("sign.conf")]),
        )?;
        self.wait_ready()?;
        self.restore_dkim_key();
        Ok(())
    }

    /// The DNS server (`127.53.X.Y:53`): give it to the prober as its resolver.
    pub fn resolver(&self) -> SocketAddr {
        self.resolver
    }

    /// Publishes, at `mc._domainkey.example.test`, a key that is not the signer's: every
    /// signature (already made or not) fails to verify from now on (`dkim=fail`).
    pub fn rotate_dkim_key(&self) {
        self.set_txt(&dkim_name(), &self.keys.get().expect("started").1);
    }

    /// Publishes the signer's own key again (as at the start).
    pub fn restore_dkim_key(&self) {
        self.set_txt(&dkim_name(), &self.keys.get().expect("started").0);
    }

    /// Removes `example.test`'s SPF record (the domain keeps its MX): `spf=none`.
    pub fn remove_spf(&self) {
        self.remove("example.test", "TXT");
    }

    /// Replaces every TXT record at `name` (absolute or relative to nothing: `"example.test"`)
    /// with one holding `text` (split into 255-byte strings as DNS needs).
    pub fn set_txt(&self, name: &str, text: &str) {
        self.remove(name, "TXT");
        let strings: Vec<String> = text
            .as_bytes()
            .chunks(250)
            .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
            .collect();
        self.control(&[
            "local_data",
            &format!("{name}. 0 IN TXT {}", strings.join(" ")),
        ]);
    }

    /// Removes the records of one type at `name` (unbound removes a name's records all
    /// together, so the others are added back).
    pub fn remove(&self, name: &str, rtype: &str) {
        let keep: Vec<String> = self
            .records()
            .into_iter()
            .filter(|r| {
                let f: Vec<&str> = r.split_whitespace().collect();
                f.first() == Some(&format!("{name}.").as_str()) && f.get(3) != Some(&rtype)
            })
            .collect();
        self.control(&["local_data_remove", &format!("{name}.")]);
        for r in keep {
            self.control(&["local_data", &r]);
        }
    }

    /// Every record served (`unbound-control list_local_data`, one per line, zone file form).
    pub fn records(&self) -> Vec<String> {
        self.control(&["list_local_data"])
            .lines()
            .filter(|l| l.contains("example.test."))
            .map(str::to_string)
            .collect()
    }

    /// A command that runs `program` in a mount namespace of its own whose `/etc/resolv.conf`
    /// names this DNS server (`unshare -m`, a bind mount; the program keeps the PID).
    pub fn in_dns_namespace(&self, program: &str) -> Command {
        let mut c = Command::new("/usr/bin/unshare");
        c.args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "/bin/sh",
            "-c",
            "mount --bind \"$0\" /etc/resolv.conf && exec \"$@\"",
            &self.path("resolv.conf"),
            program,
        ]);
        c
    }

    /// `unix:PATH` of a milter socket, as Postfix names it.
    pub(super) fn milter(&self, name: &str) -> String {
        format!("unix:{}", self.path(&format!("{name}.sock")))
    }

    /// Stops every daemon: TERM to its process group, KILL after half a second (libmilter,
    /// in opendkim and opendmarc, notices a TERM only at its next poll, up to 5 s later;
    /// nothing of theirs needs saving).
    pub(super) fn stop(&self) {
        let mut daemons = std::mem::take(&mut *self.daemons.lock().unwrap());
        daemons.extend(
            std::mem::take(&mut *self.keygen.lock().unwrap())
                .into_iter()
                .map(|c| ("openssl", c)),
        );
        for (_, child) in &daemons {
            let _ = Command::new("kill")
                .args(["-TERM", "--", &format!("-{}", child.id())])
                .stderr(Stdio::null())
                .status();
        }
        let deadline = Instant::now() + Duration::from_millis(500);
        for (_, child) in &mut daemons {
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .stderr(Stdio::null())
                .status();
            let _ = child.wait();
        }
    }

    pub(super) fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn control(&self, args: &[&str]) -> String {
        let out = Command::new("/usr/sbin/unbound-control")
            .arg("-c")
            .arg(self.path("unbound.conf"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("unbound-control");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && !text.starts_with("error"),
            "unbound-control {args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    }

    /// Starts a daemon in the foreground as the leader of a process group of its own, its
    /// output in `auth/NAME.log`, the group in `auth/NAME.pgid` (for the harness's sweep).
    fn spawn(&self, name: &'static str, cmd: &mut Command) -> Result<(), String> {
        let log = fs::File::create(self.dir.join(format!("{name}.log"))).unwrap();
        let child = cmd
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("{name} does not start: {e}"))?;
        fs::write(
            self.dir.join(format!("{name}.pgid")),
            child.id().to_string(),
        )
        .unwrap();
        self.daemons.lock().unwrap().push((name, child));
        Ok(())
    }

    fn wait_ready(&self) -> Result<(), String> {
        let deadline = Instant::now() + READY_WITHIN;
        let sockets =
            ["dkim-sign", "dkim-verify", "dmarc"].map(|s| self.path(&format!("{s}.sock")));
        loop {
            let mut waiting = Vec::new();
            for (name, child) in self.daemons.lock().unwrap().iter_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!(
                        "{name} exited with {status}: {}",
                        fs::read_to_string(self.dir.join(format!("{name}.log")))
                            .unwrap_or_default()
                    ));
                }
            }
            for s in &sockets {
                if UnixStream::connect(s).is_err() {
                    waiting.push(s.clone());
                }
            }
            let control = Command::new("/usr/sbin/unbound-control")
                .arg("-c")
                .arg(self.path("unbound.conf"))
                .arg("status")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !control {
                waiting.push("unbound".into());
            }
            if waiting.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("not ready within {READY_WITHIN:?}: {waiting:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn write_configs(&self) {
        let d = self.dir.display().to_string();
        let ip = self.resolver.ip();
        let records = [
            format!("'example.test. 0 IN TXT \"{SPF_RECORD}\"'"),
            format!("'_dmarc.example.test. 0 IN TXT \"{DMARC_RECORD}\"'"),
            "'example.test. 0 IN MX 10 mx.example.test.'".to_string(),
            "'mx.example.test. 0 IN A 127.0.0.1'".to_string(),
            "'out.example.test. 0 IN A 127.0.0.1'".to_string(),
        ]
        .map(|r| format!("  local-data: {r}\n"))
        .concat();
        // Authoritative for example.test only; every other name is refused at once rather
        // than looked up on the internet (there is none here).
        let unbound = format!(
            "server:\n  interface: {ip}@53\n  do-ip6: no\n  username: \"\"\n  \
             chroot: \"\"\n  \
             directory: \"{d}\"\n  pidfile: \"{d}/unbound.pid\"\n  use-syslog: no\n  \
             logfile: \"\"\n  verbosity: 1\n  num-threads: 1\n  module-config: \"iterator\"\n  \
             local-zone: \".\" refuse\n  local-zone: \"example.test.\" static\n{records}\
             remote-control:\n  control-enable: yes\n  control-interface: {d}/unbound.ctl\n  \
             control-use-cert: no\n"
        );
        fs::write(self.dir.join("unbound.conf"), unbound).unwrap();
        // libunbound inside opendkim: forward everything to our server. Surprise: `test.`
        // is one of its built-in local zones (RFC 6761), answered NXDOMAIN without a query
        // ("key not found in DNS") until `nodefault`. The records' TTL 0 keeps it from
        // caching a key over a rotation.
        fs::write(
            self.dir.join("libunbound.conf"),
            format!(
                "server:\n  module-config: \"iterator\"\n  do-ip6: no\n  \
                 local-zone: \"test.\" nodefault\n\
                 forward-zone:\n  name: \".\"\n  forward-addr: {ip}@53\n"
            ),
        )
        .unwrap();
        fs::write(self.dir.join("not-loopback"), format!("{NOT_LOOPBACK}\n")).unwrap();
        let common = format!(
            "Syslog no\nBackground no\nUMask 000\nResolverConfiguration {d}/libunbound.conf\n\
             DNSTimeout 5\nSoftwareHeader no\n"
        );
        fs::write(
            self.dir.join("sign.conf"),
            format!(
                "{common}Mode s\nSocket local:{d}/dkim-sign.sock\nPidFile {d}/dkim-sign.pid\n\
                 Domain example.test\nSelector {SELECTOR}\nKeyFile {d}/sign.key\n\
                 Canonicalization relaxed/relaxed\nSignatureAlgorithm rsa-sha256\n\
                 OversignHeaders From\nRequireSafeKeys no\n"
            ),
        )
        .unwrap();
        fs::write(
            self.dir.join("verify.conf"),
            format!(
                "{common}Mode v\nSocket local:{d}/dkim-verify.sock\nPidFile {d}/dkim-verify.pid\n\
                 AuthservID {AUTHSERV_ID}\nAlwaysAddARHeader yes\n"
            ),
        )
        .unwrap();
        // Surprise: IgnoreHosts defaults to 127.0.0.1 (the mail got no dmarc= result).
        fs::write(
            self.dir.join("opendmarc.conf"),
            format!(
                "Syslog false\nBackground false\nUMask 000\nSocket local:{d}/dmarc.sock\n\
                 PidFile {d}/dmarc.pid\nAuthservID {AUTHSERV_ID}\n\
                 TrustedAuthservIDs {AUTHSERV_ID}\nIgnoreHosts {d}/not-loopback\n\
                 SPFSelfValidate false\nFailureReports false\nRequiredHeaders false\n\
                 SoftwareHeader false\n"
            ),
        )
        .unwrap();
        // Surprises: skip_addresses defaults to 127.0.0.0/8 (`none (SPF check N/A for local
        // connections ...)`, no spf= at all), and HELO_reject/Mail_From_reject = Fail would
        // refuse the "-all" drill's mail.
        fs::write(
            self.dir.join("policyd-spf.conf"),
            format!(
                "debugLevel = 1\nTestOnly = 1\nHELO_reject = False\nMail_From_reject = False\n\
                 PermError_reject = False\nTempError_Defer = False\n\
                 skip_addresses = {NOT_LOOPBACK}/32\nHeader_Type = AR\n\
                 Authserv_Id = {AUTHSERV_ID}\nLookup_Time = 5\n"
            ),
        )
        .unwrap();
    }

    /// main.cf lines for the instance (after the template's: the later value wins).
    pub(super) fn main_cf(&self, tls: &str) -> String {
        format!(
            "\n# mail_auth (tests/realmail/mailauth.rs)\nsmtpd_tls_received_header = yes\n\
             lmtp_tls_security_level = encrypt\nlmtp_lhlo_name = {AUTHSERV_ID}\n\
             lmtp_tls_CAfile = {tls}/ca.pem\npolicyd-spf_time_limit = 3600\n\
             smtpd_policy_service_timeout = 30s\n"
        )
    }
}

impl Drop for MailAuth {
    /// Stops whatever is still running (a start that failed half-way, too).
    fn drop(&mut self) {
        self.stop();
    }
}

/// The name the key is published at.
fn dkim_name() -> String {
    format!("{SELECTOR}._domainkey.example.test")
}

/// `v=DKIM1; k=rsa; p=...` of a private key file (its public half, DER in base64).
fn dkim_txt(key: &Path) -> Result<String, String> {
    let out = Command::new("/usr/bin/openssl")
        .args(["rsa", "-pubout", "-outform", "DER", "-in"])
        .arg(key)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("openssl rsa: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "openssl rsa -pubout {}: {}",
            key.display(),
            out.status
        ));
    }
    use base64::Engine;
    Ok(format!(
        "v=DKIM1; k=rsa; p={}",
        base64::engine::general_purpose::STANDARD.encode(out.stdout)
    ))
}

/// A loopback address whose port 53 is free (UDP and TCP), `127.53.X.Y`, from this process's
/// PID and then the next ones, never one this process handed out before.
///
/// Two harnesses of one test process (cargo test runs tests as threads) could probe the same
/// free address at once and both start unbound on it: unbound's default `so-reuseport: yes`
/// lets both bind (checked by hand), and queries would go to either, so one test's rotated
/// DKIM key could answer the other's checks. Addresses are now reserved in the process. (Across
/// processes, as nextest runs the tests, the PID-derived starting points differ.)
fn free_dns_address() -> Result<SocketAddr, String> {
    static GIVEN: Mutex<Vec<SocketAddr>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap();
    let start = std::process::id().wrapping_mul(7919);
    for i in 0..200u32 {
        let n = start.wrapping_add(i) % 65_000 + 256;
        let ip = Ipv4Addr::new(127, 53, (n >> 8) as u8, n as u8);
        let addr = SocketAddr::V4(SocketAddrV4::new(ip, 53));
        if given.contains(&addr) {
            continue;
        }
        if UdpSocket::bind(addr).is_ok() && TcpListener::bind(addr).is_ok() {
            given.push(addr);
            return Ok(addr);
        }
    }
    Err("no free 127.53.X.Y:53".into())
}

/// The header of a raw mail: everything before the first empty line.
pub fn header_block(raw: &str) -> &str {
    let end = raw
        .find("\r\n\r\n")
        .or_else(|| raw.find("\n\n"))
        .unwrap_or(raw.len());
    &raw[..end]
}

/// The values of every header field `name` (case-insensitive), unfolded (continuation lines
/// joined with one space), in order from the top (the newest first).
pub fn header_values(raw: &str, name: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    for line in header_block(raw).lines() {
        let line = line.trim_end_matches('\r');
        if line.starts_with([' ', '\t']) {
            if let Some(c) = current.as_mut() {
                c.push(' ');
                c.push_str(line.trim());
            }
            continue;
        }
        out.extend(current.take());
        if let Some((field, value)) = line.split_once(':')
            && field.eq_ignore_ascii_case(name)
        {
            current = Some(value.trim().to_string());
        }
    }
    out.extend(current);
    out
}

/// The `Authentication-Results` values of a raw mail, unfolded, newest first.
pub fn authentication_results(raw: &str) -> Vec<String> {
    header_values(raw, "Authentication-Results")
}

/// The TXT strings at `name` as `resolver` answers over UDP (a plain DNS query, what any
/// program asking the server would see), each record's strings joined; empty for none.
pub fn query_txt(resolver: SocketAddr, name: &str) -> Vec<String> {
    let mut q = vec![0x4d, 0x43, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 16, 0, 1]);
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    socket.send_to(&q, resolver).unwrap();
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .expect("an answer from the DNS server");
    let a = &buf[..n];
    let answers = u16::from_be_bytes([a[6], a[7]]);
    // Skip the header and the question (as sent), then read each answer's TXT strings.
    let mut i = q.len();
    let mut out = Vec::new();
    for _ in 0..answers {
        // The name: a pointer (2 bytes) or labels.
        while a[i] != 0 && a[i] & 0xc0 != 0xc0 {
            i += 1 + a[i] as usize;
        }
        i += if a[i] == 0 { 1 } else { 2 };
        let rtype = u16::from_be_bytes([a[i], a[i + 1]]);
        let len = u16::from_be_bytes([a[i + 8], a[i + 9]]) as usize;
        let mut data = &a[i + 10..i + 10 + len];
        i += 10 + len;
        if rtype != 16 {
            continue;
        }
        let mut text = String::new();
        while let Some((&l, rest)) = data.split_first() {
            text.push_str(&String::from_utf8_lossy(&rest[..l as usize]));
            data = &rest[l as usize..];
        }
        out.push(text);
    }
    out
}

#[test]
fn header_values_are_unfolded_newest_first_and_stop_at_the_body() {
    let raw = "Authentication-Results: mx.example.test; dmarc=pass\r\n\
               Authentication-Results: mx.example.test;\r\n\
               \tdkim=pass header.d=example.test;\r\n\
               \tdkim-atps=neutral\r\n\
               Received: from a\r\n\
               authentication-results: other.test; spf=fail\r\n\
               \r\n\
               Authentication-Results: in the body\r\n";
    assert_eq!(
        authentication_results(raw),
        vec![
            "mx.example.test; dmarc=pass",
            "mx.example.test; dkim=pass header.d=example.test; dkim-atps=neutral",
            "other.test; spf=fail",
        ]
    );
    assert_eq!(header_values(raw, "received"), vec!["from a"]);
}
