#!/usr/bin/env bash
# Runs every fuzz target for FUZZ_SECONDS (default 30), FUZZ_JOBS (default: the cores) at a
# time, and prints, per target, the executions and coverage of libFuzzer's final
# "#N DONE cov: ..." line. Exits non-zero on a crash (the input is left under
# fuzz/artifacts/TARGET/). Needs the nightly toolchain and cargo-fuzz
# (tests/run.sh installs cargo-fuzz). Corpora grow in $CARGO_TARGET_DIR/corpus, seeded from
# fuzz/seeds and the example configs in probes/ and tests/files.
set -euo pipefail
cd "$(dirname "$0")"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
seconds="${FUZZ_SECONDS:-30}"
targets=(recognise token config webhook sandbox_smtp sandbox_imap route)
cargo +nightly fuzz build --release -s none
jobs="${FUZZ_JOBS:-$(nproc)}"
# One target per core at a time (libFuzzer runs single-threaded): 7 targets of 30 s take 2 min
# on 2 cores instead of 3.5. Each run's figures are printed when it ends.
fuzz_one() {
  local t=$1 corpus="$CARGO_TARGET_DIR/corpus/$1" log="$CARGO_TARGET_DIR/fuzz-$1.log"
  mkdir -p "$corpus" "artifacts/$t"
  case "$t" in
    config) cp ../probes/*.toml ../tests/files/*.toml "$corpus/" ;;
    *) cp seeds/"$t"/* "$corpus/" ;;
  esac
  if cargo +nightly fuzz run --release -s none "$t" "$corpus" -- -max_total_time="$seconds" \
      -max_len=65536 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    local line execs cov ft
    line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1)
    execs=$(sed -E 's/^#([0-9]+).*/\1/' <<<"$line")
    cov=$(sed -E 's/.*cov: ([0-9]+).*/\1/' <<<"$line")
    ft=$(sed -E 's/.*ft: ([0-9]+).*/\1/' <<<"$line")
    echo "fuzz $t: ${seconds}s, execs $execs, cov $cov, ft $ft"
  else
    echo "fuzz $t: CRASH or error; log $log, inputs in fuzz/artifacts/$t:" >&2
    tail -40 "$log" >&2
    return 1
  fi
}
status=0
running=0
for t in "${targets[@]}"; do
  if [ "$running" -ge "$jobs" ]; then
    wait -n || status=1
    running=$((running - 1))
  fi
  fuzz_one "$t" &
  running=$((running + 1))
done
while [ "$running" -gt 0 ]; do
  wait -n || status=1
  running=$((running - 1))
done
exit "$status"
