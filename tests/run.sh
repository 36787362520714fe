#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine: installs what the tests need (Debian
# packages) when missing, then runs the quality gates and every test. `.ci/run` calls this.
#
#   tests/run.sh              # everything
#   tests/run.sh --no-lint    # skip fmt/clippy (quick local loop)
#   tests/run.sh --no-static  # skip building and running the static musl binary and its image
#   tests/run.sh --no-bench   # skip the quick benchmark run (cargo bench --bench mailcanary)
#   tests/run.sh --no-fuzz    # skip the fuzz targets (fuzz/run.sh: nightly, FUZZ_SECONDS each)
#   tests/run.sh --install-only  # install what the tests need, run nothing
set -euo pipefail
cd "$(dirname "$0")/.."

lint=1
static=1
bench=1
fuzz=1
install_only=0
for a in "$@"; do
  case "$a" in
    --no-lint) lint=0 ;;
    --no-static) static=0 ;;
    --no-bench) bench=0 ;;
    --fuzz) fuzz=1 ;;
    --no-fuzz) fuzz=0 ;;
    --install-only) install_only=1 ;;
    *) echo "usage: tests/run.sh [--no-lint] [--no-static] [--no-bench] [--no-fuzz] [--install-only]" >&2; exit 2 ;;
  esac
done

# Each step says how far into the run it starts (bash's SECONDS), so a slow step shows.
step() { echo "==> [${SECONDS}s] $*"; }

need_pkgs=()
command -v promtool >/dev/null 2>&1 || need_pkgs+=(prometheus)
command -v python3 >/dev/null 2>&1 || need_pkgs+=(python3)
# Real Postfix and Dovecot for tests/realmail (started by the tests on loopback, never as
# system services; no systemd runs here).
[ -x /usr/sbin/postfix ] || need_pkgs+=(postfix)
[ -x /usr/lib/dovecot/imap ] || need_pkgs+=(dovecot-imapd)
[ -x /usr/lib/dovecot/lmtp ] || need_pkgs+=(dovecot-lmtpd)
# Sieve files a marked canary into Junk (tests/realmail/placement.rs).
[ -e /usr/lib/dovecot/modules/lib90_sieve_plugin.so ] || need_pkgs+=(dovecot-sieve)
command -v openssl >/dev/null 2>&1 || need_pkgs+=(openssl)
# DKIM, SPF and DMARC as a real MX checks them (tests/realmail/mailauth.rs, Setup::mail_auth):
# unbound serves the test zone, opendkim signs and verifies, opendmarc, policyd-spf; all
# started by the tests, never as services (about 25-35 s more the first time).
[ -x /usr/sbin/unbound ] || need_pkgs+=(unbound)
[ -x /usr/sbin/opendkim ] || need_pkgs+=(opendkim)
[ -x /usr/sbin/opendmarc ] || need_pkgs+=(opendmarc)
[ -x /usr/bin/policyd-spf ] || need_pkgs+=(postfix-policyd-spf-python)
# Headless Chromium for the dashboard test, amtool for the Alertmanager config, musl-gcc for
# the static binary the container ships (ring's C parts).
command -v chromium >/dev/null 2>&1 || need_pkgs+=(chromium)
command -v amtool >/dev/null 2>&1 || need_pkgs+=(prometheus-alertmanager)
command -v musl-gcc >/dev/null 2>&1 || need_pkgs+=(musl-tools)
# podman (with runc: crun fails on this machine's cgroups) builds and runs the runtime image
# of deploy/Dockerfile from that static binary (tests/container_smoke.py).
if [ "$static" -eq 1 ]; then
  command -v podman >/dev/null 2>&1 || need_pkgs+=(podman)
  command -v runc >/dev/null 2>&1 || need_pkgs+=(runc)
fi
# The never-blind drills (tests/prober/blind.rs): libfaketime steps the wall clock under the
# real binary; mkfs.ext4/e2fsck make and repair the loop-mounted state dir that goes read-only.
[ -f /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ] || need_pkgs+=(libfaketime)
command -v mkfs.ext4 >/dev/null 2>&1 || need_pkgs+=(e2fsprogs)
# The state-dir drills (tests/prober/state_dir.rs): strace delays the ledger's fsyncs, setpriv
# runs the binary as nobody.
command -v strace >/dev/null 2>&1 || need_pkgs+=(strace)
command -v setpriv >/dev/null 2>&1 || need_pkgs+=(util-linux)
command -v losetup >/dev/null 2>&1 || need_pkgs+=(mount)
# Request Tracker 5 for tests/realmail/helpdesks.rs (SQLite, Starlet; started by the test on
# loopback). dbconfig-no-thanks first, so the package does not set up a database of its own.
rt_pkgs=()
[ -x /usr/sbin/rt-setup-database-5 ] || rt_pkgs+=(request-tracker5 rt5-db-sqlite)
perl -MStarlet -e1 >/dev/null 2>&1 || rt_pkgs+=(starlet)
# The benchmark's peer: check_email_delivery (Nagios mail-loop check) and the Perl modules it
# loads for IMAPS; its recommends are a long list of other plugins' needs, so they are named.
if [ "$bench" -eq 1 ]; then
  [ -x /usr/lib/nagios/plugins/check_email_delivery ] || need_pkgs+=(monitoring-plugins-contrib)
  [ -f /usr/share/perl5/Mail/IMAPClient.pm ] || need_pkgs+=(libmail-imapclient-perl)
  [ -f /usr/share/perl5/IO/Socket/SSL.pm ] || need_pkgs+=(libio-socket-ssl-perl)
fi
if [ ${#need_pkgs[@]} -gt 0 ]; then
  step "installing ${need_pkgs[*]} (Debian packages)"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  # Postfix asks its setup questions through debconf: answer them up front.
  printf '%s\n' \
    'postfix postfix/main_mailer_type select Internet Site' \
    'postfix postfix/mailname string mail.example.test' | $sudo_cmd debconf-set-selections
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi
if [ ${#rt_pkgs[@]} -gt 0 ]; then
  step "installing ${rt_pkgs[*]} (Debian packages, about 90 s)"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  echo 'request-tracker5 request-tracker5/rtname string helpdesk.test' | $sudo_cmd debconf-set-selections
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends dbconfig-no-thanks >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${rt_pkgs[@]}" >/dev/null
fi
# django-helpdesk for tests/realmail/helpdesks.rs: a venv from PyPI with pinned versions
# (about 20 s the first time; at once when it is there).
step "django-helpdesk venv"
tests/realmail/files/django-helpdesk/install.sh "${MAILCANARY_DJANGO_VENV:-/var/cache/mailcanary/django-helpdesk-venv}"
# Debian's prometheus package ships promtool but must not run a server here.
if pgrep -x prometheus >/dev/null 2>&1 && [ -n "${CI:-}" ]; then
  pkill -x prometheus || true
fi

if [ "$install_only" -eq 1 ]; then
  step "installed"
  exit 0
fi

if [ "$lint" -eq 1 ]; then
  step "cargo fmt --check"
  cargo fmt --all -- --check
  step "cargo clippy --all-targets -- -D warnings"
  cargo clippy --all-targets --quiet -- -D warnings
fi

step "tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --no-fail-fast
  # nextest does not run doctests.
  cargo test --doc --quiet
else
  cargo test --no-fail-fast
fi

if [ "$bench" -eq 1 ]; then
  # The benchmark harness in quick mode (about 3 min), so it cannot rot: it exits non-zero when
  # a figure cannot be measured. Its figures are not the README's (those come from --full on
  # the release build); here it is built in the test profile the suite just built, which saves
  # CI a whole optimised build of the dependencies.
  step "benchmark, quick mode (cargo bench --profile dev --bench mailcanary -- --quick)"
  cargo bench --locked --quiet --profile dev --bench mailcanary -- --quick --out target/bench/quick
fi

if [ "$fuzz" -eq 1 ]; then
  # Every fuzz target for FUZZ_SECONDS (30 s), one per core at a time, on nightly, in its own
  # target dir so that the fuzz build never invalidates the stable one; a crash fails the run.
  step "fuzz targets (fuzz/run.sh, ${FUZZ_SECONDS:-30}s each)"
  rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
  cargo +nightly fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked --quiet
  CARGO_TARGET_DIR="$PWD/target/fuzz" fuzz/run.sh
fi

if [ "$static" -eq 1 ]; then
  # No Docker engine runs here, so the container's one program is proven directly: the same
  # static musl build deploy/Dockerfile makes, then run on the embedded sandbox until it has
  # completed a canary, then stopped with SIGTERM.
  step "static musl binary (what deploy/Dockerfile ships)"
  target=x86_64-unknown-linux-musl
  rustup target list --installed 2>/dev/null | grep -qx "$target" || rustup target add "$target"
  cargo build --release --locked --quiet --target "$target"
  # Where cargo put it: CARGO_TARGET_DIR, when the caller set one, moves every build.
  static_bin="${CARGO_TARGET_DIR:-target}/$target/release/mailcanary"
  tests/static_smoke.py "$static_bin"
  step "container image (deploy/Dockerfile's runtime stage, podman, read-only, uid 65532)"
  tests/container_smoke.py "$static_bin"
fi

step "all green"
