#!/usr/bin/env bash
# Fuzzes the HTTP API from its own OpenAPI document with schemathesis (config:
# schemathesis.toml; every check, seed 1, bounded examples) against a fresh server on
# 127.0.0.1 with no worker (runs it starts stay queued). The report (JUnit) and the
# server's log go to target/schemathesis/. Exits non-zero on any failure.
# Usage: scripts/schemathesis.sh [stoa binary, default target/debug/stoa]
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/debug/stoa}
venv=target/schemathesis-venv
if [ ! -x "$venv/bin/st" ]; then
  echo "schemathesis.sh: installing schemathesis 4.32.5 into $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check schemathesis==4.32.5
fi
out=target/schemathesis
rm -rf "$out"; mkdir -p "$out"
data=$(mktemp -d /tmp/stoa-schemathesis.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
STOA_FUZZ_KEY=lk_$(python3 -c 'import secrets; print(secrets.token_hex(20))')
export STOA_FUZZ_KEY
STOA_ADMIN_KEY=$STOA_FUZZ_KEY "$bin" server --listen "127.0.0.1:$port" --data-dir "$data/data" --no-worker \
  >"$out/server.log" 2>&1 &
server=$!
stop() { kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -rf "$data"; }
trap stop EXIT
url=http://127.0.0.1:$port
for _ in $(seq 100); do curl -fs "$url/api/v2/external/openapi.json" >/dev/null 2>&1 && break; sleep 0.1; done
echo "schemathesis.sh: fuzzing $url from its OpenAPI document" >&2
"$venv/bin/st" --config-file schemathesis.toml run "$url/api/v2/external/openapi.json" --no-color \
  >"$out/schemathesis.txt" 2>&1 && rc=0 || rc=$?
tail -n 30 "$out/schemathesis.txt" >&2
if grep -q "panicked" "$out/server.log"; then
  echo "schemathesis.sh: the server panicked (see $out/server.log)" >&2
  rc=1
fi
exit "$rc"
