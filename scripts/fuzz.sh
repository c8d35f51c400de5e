#!/usr/bin/env bash
# Runs each cargo-fuzz target (fuzz/fuzz_targets: the compose parser and
# interpolation, the start request validators, the Last-Event-ID parser) for SECONDS
# seconds (default 60); exits non-zero on the first crash, whose input cargo-fuzz keeps
# in fuzz/artifacts/. Needs a nightly toolchain; installs cargo-fuzz when missing.
# Usage: scripts/fuzz.sh [SECONDS] [TARGET…]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "fuzz.sh: installing cargo-fuzz 0.13.2" >&2
  cargo install --locked -q cargo-fuzz --version 0.13.2
fi
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(compose_plan compose_interpolate start_requests last_event_id)
echo "fuzz.sh: building the targets (nightly)" >&2
cargo +nightly fuzz build -s none 2>&1 | tail -n 3 >&2
for t in "${targets[@]}"; do
  echo "fuzz.sh: $t for ${secs}s" >&2
  mkdir -p "fuzz/corpus/$t"
  log=fuzz/$t.log
  rc=0
  cargo +nightly fuzz run -s none "$t" "fuzz/corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 >"$log" 2>&1 || rc=$?
  grep -E "^(Done [0-9]+ runs|==[0-9]+==|thread '|SUMMARY|artifact_prefix)" "$log" >&2 || true
  if [ "$rc" -ne 0 ]; then
    tail -n 40 "$log" >&2
    echo "fuzz.sh: $t crashed (its input is in fuzz/artifacts/$t)" >&2
    exit 1
  fi
done
echo "fuzz.sh: no crash in ${#targets[@]} targets, ${secs}s each" >&2
