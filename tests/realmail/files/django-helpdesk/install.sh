#!/usr/bin/env bash
# install.sh VENV_DIR
# Idempotently creates a Python venv with the pinned django-helpdesk stack.
# Fast path (exit 0 at once): VENV_DIR/bin/python imports helpdesk,
# rest_framework and waitress, and the venv was installed from this very
# requirements.txt (sha256 stamp). Otherwise (re)creates the venv and installs.
# Concurrent callers are serialised with flock on VENV_DIR.lock.
# PYTHON (default python3) chooses the interpreter that creates the venv.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 VENV_DIR" >&2
    exit 2
fi
VENV=$1
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REQ="$HERE/requirements.txt"
PY=${PYTHON:-python3}
START=$(date +%s%N)

elapsed() {
    local now
    now=$(date +%s%N)
    awk -v d=$(( (now - START) / 1000000 )) 'BEGIN { printf "%.1f", d / 1000 }'
}

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9

want=$(sha256sum "$REQ" | cut -d' ' -f1)
stamp="$VENV/.mailcanary-requirements.sha256"
if [ -x "$VENV/bin/python" ] \
    && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] \
    && "$VENV/bin/python" -c 'import helpdesk, rest_framework, waitress' 2>/dev/null; then
    echo "django-helpdesk venv $VENV already installed ($(elapsed) s)"
    exit 0
fi

if ! "$PY" -c 'import ensurepip, venv' 2>/dev/null; then
    echo "install.sh: $PY lacks ensurepip/venv; installing python3-venv" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq python3-venv >&2
fi

# --clear: a half-built venv from an interrupted run is thrown away.
"$PY" -m venv --clear "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    --no-input -r "$REQ"
"$VENV/bin/python" -c 'import helpdesk, rest_framework, waitress'
echo "$want" >"$stamp"
echo "django-helpdesk venv $VENV installed in $(elapsed) s"
