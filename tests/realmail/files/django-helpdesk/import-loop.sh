#!/usr/bin/env bash
# import-loop.sh VENV PERIOD_SECONDS
# Runs `VENV/bin/python manage.py get_email` every PERIOD seconds forever, as
# cron would. Runs start on a fixed cadence (period measured start to start;
# a run longer than the period is followed at once by the next) and never
# overlap. A failed run does not stop the loop. One line per run on stderr:
#   get_email run N exit RC duration S s
# Each run is capped by DH_IMPORT_TIMEOUT seconds (default 120; exit 124 when
# hit), since imaplib has no timeout of its own. Environment (DH_DIR,
# DH_SMTP_PORT, ...) is passed through to manage.py. Stop with SIGTERM.
set -u

if [ $# -ne 2 ]; then
    echo "usage: $0 VENV PERIOD_SECONDS" >&2
    exit 2
fi
VENV=$1
PERIOD=$2
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$HERE" || exit 1
export DJANGO_SETTINGS_MODULE=${DJANGO_SETTINGS_MODULE:-mcsite.settings}
LIMIT=${DH_IMPORT_TIMEOUT:-120}

child=
trap '[ -n "$child" ] && kill "$child" 2>/dev/null; exit 0' TERM INT HUP

period_ms=$(awk -v p="$PERIOD" 'BEGIN { printf "%d", p * 1000 }')
n=0
while :; do
    n=$((n + 1))
    start=$(date +%s%N)
    timeout "$LIMIT" "$VENV/bin/python" manage.py get_email &
    child=$!
    wait "$child"
    rc=$?
    child=
    end=$(date +%s%N)
    ms=$(( (end - start) / 1000000 ))
    awk -v n="$n" -v rc="$rc" -v ms="$ms" \
        'BEGIN { printf "get_email run %d exit %d duration %.2f s\n", n, rc, ms / 1000 }' >&2
    left=$(( period_ms - ms ))
    if [ "$left" -gt 0 ]; then
        sleep "$(awk -v l="$left" 'BEGIN { printf "%.3f", l / 1000 }')" &
        child=$!
        wait "$child"
        child=
    fi
done
