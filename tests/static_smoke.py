#!/usr/bin/env python3
"""Runs the static binary the container ships and checks it works on its own.

Usage: static_smoke.py BINARY

Checks that BINARY is statically linked, that `check` accepts the shipped sandbox probe, and
that `run` (embedded sandbox, default ports) completes a canary within 30 s and exits cleanly
within 5 s of SIGTERM. Python rather than curl: python3 is already a test dependency.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def fail(msg):
    print(f"static smoke: {msg}", file=sys.stderr)
    sys.exit(1)


def main():
    binary = os.path.abspath(sys.argv[1])
    ldd = subprocess.run(["ldd", binary], capture_output=True, text=True)
    if ldd.returncode == 0 and "=>" in ldd.stdout:
        fail(f"{binary} is dynamically linked:\n{ldd.stdout}")
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True)
    check = subprocess.run(
        [binary, "check", "--config", "probes/sandbox.toml"], capture_output=True, text=True
    )
    if check.returncode != 0:
        fail(f"check failed: {check.stderr}")

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with tempfile.TemporaryDirectory() as d:
        log = open(os.path.join(d, "stderr.log"), "w+")
        proc = subprocess.Popen(
            [binary, "--log-format", "json", "run", "--listen", f"127.0.0.1:{port}",
             "--state-dir", os.path.join(d, "state")],
            stdout=subprocess.DEVNULL, stderr=log, cwd=d,
        )
        try:
            deadline = time.monotonic() + 30
            completed = 0.0
            while time.monotonic() < deadline and completed < 1:
                time.sleep(0.5)
                if proc.poll() is not None:
                    break
                try:
                    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
                except OSError:
                    continue
                for line in body.splitlines():
                    if line.startswith('mailcanary_canaries_completed_total{probe="sandbox"}'):
                        completed = float(line.split()[-1])
            if completed < 1:
                log.seek(0)
                fail(f"no completed canary within 30 s (exit {proc.poll()}):\n{log.read()[-3000:]}")
            ready = urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2).status
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=5)
            if code != 0:
                fail(f"exit status {code} after SIGTERM")
            print(f"static smoke: {version.stdout.strip()} static, readyz {ready}, "
                  f"a canary completed, exited {time.monotonic() - t0:.2f} s after SIGTERM")
        finally:
            if proc.poll() is None:
                proc.kill()


if __name__ == "__main__":
    main()
