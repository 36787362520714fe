#!/usr/bin/env python3
"""Builds the runtime image the shipped Dockerfile describes and runs it with podman.

Usage: container_smoke.py BINARY

No registry can be reached where the tests run, so the Dockerfile's build stage (FROM rust)
cannot run. Its last stage can: this script takes deploy/Dockerfile from its final `FROM
scratch` on, feeds it BINARY (the static musl build tests/run.sh has just made) in place of
the build stage's output, and builds that image. Then, as a user would run it:

- read-only root, as the image's uid 65532, the state dir on a volume, the config and the
  secrets mounted read-only as files (the HMAC secret, the helpdesk token and the mailbox
  password are referenced with *_file keys);
- against `mailcanary sandbox` (BINARY again, outside the container) on free loopback ports;
- checks /healthz and /readyz, a canary completed end to end, that every log line is JSON,
  and that `podman stop` (SIGTERM) ends it with exit code 0 within 5 s;
- prints the image size.

podman settings are the ones FACTS.md measured to work here: runc (crun fails with this
machine's cgroups), cgroupfs, host network, raised rlimits.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
UID = 65532


def fail(msg):
    print(f"container smoke: {msg}", file=sys.stderr)
    sys.exit(1)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def podman(*args, check=True):
    r = subprocess.run(PODMAN + list(args), capture_output=True, text=True)
    if check and r.returncode != 0:
        fail(f"podman {' '.join(args)}: {r.stderr.strip()}")
    return r


def runtime_stage(dockerfile):
    """The Dockerfile from its last `FROM scratch` on, fed from the context's out/."""
    text = open(dockerfile).read()
    start = text.rfind("\nFROM scratch")
    if start < 0:
        fail(f"{dockerfile} has no FROM scratch stage")
    stage = text[start + 1:]
    if "COPY --from=build /out/ /" not in stage:
        fail("the runtime stage no longer copies /out/ from the build stage; update this script")
    return stage.replace("COPY --from=build /out/ /", "COPY out/ /")


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read().decode()
    except OSError as e:
        return None, str(e)


def completed(metrics):
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("mailcanary_canaries_completed_total{"):
            total += float(line.split()[-1])
    return total


def main():
    binary = os.path.abspath(sys.argv[1])
    if shutil.which("podman") is None:
        fail("podman is not installed (tests/run.sh installs podman and runc)")
    tag = f"localhost/mailcanary-smoke:{os.getpid()}"
    with tempfile.TemporaryDirectory() as d:
        # The build context: the binary and the directories the build stage would make.
        ctx = os.path.join(d, "ctx")
        out = os.path.join(ctx, "out")
        os.makedirs(os.path.join(out, "etc", "mailcanary"))
        os.makedirs(os.path.join(out, "var", "lib", "mailcanary"))
        shutil.copy(binary, os.path.join(out, "mailcanary"))
        shutil.copy("probes/sandbox.toml", os.path.join(out, "etc", "mailcanary"))
        with open(os.path.join(ctx, "Containerfile"), "w") as f:
            f.write(runtime_stage("deploy/Dockerfile"))
        t0 = time.monotonic()
        podman("build", "-q", "-t", tag, "-f", os.path.join(ctx, "Containerfile"), ctx)
        built_s = time.monotonic() - t0
        size = int(podman("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())
        user = podman("image", "inspect", "--format", "{{.Config.User}}", tag).stdout.strip()
        if user != f"{UID}:{UID}":
            fail(f"the image runs as {user!r}, not {UID}:{UID}")

        # The helpdesk it probes: the sandbox, outside the container.
        smtp, imap, api, web = free_port(), free_port(), free_port(), free_port()
        sandbox = subprocess.Popen(
            [binary, "sandbox", "--smtp-listen", f"127.0.0.1:{smtp}",
             "--imap-listen", f"127.0.0.1:{imap}", "--http-listen", f"127.0.0.1:{api}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        name = f"mailcanary-smoke-{os.getpid()}"
        try:
            # Config and secrets as files, the state dir a volume the image's user owns.
            conf, secrets, state = (os.path.join(d, n) for n in ("conf", "secrets", "state"))
            for p in (conf, secrets, state):
                os.makedirs(p)
            os.chown(state, UID, UID)
            for k, v in {"hmac": "container-smoke-hmac-secret", "token": "sandbox",
                         "imap": "sandbox"}.items():
                path = os.path.join(secrets, k)
                with open(path, "w") as f:
                    f.write(v + "\n")
                os.chmod(path, 0o444)
            shipped = open("probes/sandbox.toml").read()
            probe = shipped[shipped.index("[[probe]]"):]
            probe = re.sub(r'(?m)^token = .*$', 'token_file = "/run/secrets/mailcanary/token"', probe)
            probe = re.sub(r'(?m)^password = .*$', 'password_file = "/run/secrets/mailcanary/imap"', probe)
            probe = probe.replace("127.0.0.1:8088", f"127.0.0.1:{api}")
            probe = re.sub(r'(?m)^port = 2525$', f"port = {smtp}", probe)
            probe = re.sub(r'(?m)^port = 1143$', f"port = {imap}", probe)
            if "token_file" not in probe or "password_file" not in probe:
                fail("probes/sandbox.toml changed shape; update this script")
            with open(os.path.join(conf, "probe.toml"), "w") as f:
                f.write('[prober]\nsecret_file = "/run/secrets/mailcanary/hmac"\n\n' + probe)
            os.chmod(os.path.join(conf, "probe.toml"), 0o444)

            podman("run", "-d", "--name", name, "--network", "host", "--read-only",
                   "-v", f"{state}:/var/lib/mailcanary",
                   "-v", f"{conf}:/etc/mailcanary:ro",
                   "-v", f"{secrets}:/run/secrets/mailcanary:ro",
                   "--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096",
                   tag, "run", "--config", "/etc/mailcanary", "--listen", f"127.0.0.1:{web}",
                   "--state-dir", "/var/lib/mailcanary")
            base = f"http://127.0.0.1:{web}"
            deadline = time.monotonic() + 60
            done = 0.0
            while time.monotonic() < deadline and done < 1:
                time.sleep(0.5)
                status, body = get(f"{base}/metrics")
                if status == 200:
                    done = completed(body)
            logged = podman("logs", name)
            # The program's log goes to stderr (JSON, as the image's entrypoint asks); stdout
            # carries only the plain one-line "listening" notice of the CLI.
            logs = logged.stderr
            if done < 1:
                fail(f"no canary completed within 60 s; logs:\n{logs[-3000:]}{logged.stdout}")
            health, _ = get(f"{base}/healthz")
            ready, _ = get(f"{base}/readyz")
            if (health, ready) != (200, 200):
                fail(f"/healthz {health}, /readyz {ready}")
            lines = [l for l in logs.splitlines() if l.strip()]
            for l in lines:
                try:
                    json.loads(l)
                except ValueError:
                    fail(f"a log line is not JSON: {l!r}")
            if not lines:
                fail("no log lines")
            owner = os.stat(os.path.join(state, "ledger.redb")).st_uid
            if owner != UID:
                fail(f"the ledger is owned by uid {owner}, not {UID}")
            t0 = time.monotonic()
            podman("stop", "-t", "5", name)
            stop_s = time.monotonic() - t0
            code = podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
            if code != "0" or stop_s >= 5:
                fail(f"exit code {code} {stop_s:.2f} s after SIGTERM")
            print(f"container smoke: image {size / 1e6:.1f} MB (built in {built_s:.1f} s), "
                  f"uid {UID}, read-only root, a canary completed, {len(lines)} JSON log lines, "
                  f"healthz/readyz 200, exit 0 {stop_s:.2f} s after SIGTERM")
        finally:
            podman("rm", "-f", name, check=False)
            podman("rmi", "-f", tag, check=False)
            sandbox.terminate()
            sandbox.wait(timeout=10)


if __name__ == "__main__":
    main()
