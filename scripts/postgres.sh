#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the tests: `postgres.sh start DIR` initialises one
# in DIR (owned by the postgres user, trust auth on 127.0.0.1 only, fsync off), starts
# it on a free port and prints its URL (database `postgres`, user `postgres`);
# `postgres.sh stop DIR` stops it; `postgres.sh resume DIR` starts it again on the same
# port (a restart, for tests). Nothing outside DIR is touched.
set -euo pipefail
cmd=${1:?usage: postgres.sh start|resume|stop DIR}
dir=${2:?usage: postgres.sh start|resume|stop DIR}
bin=${STOA_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
  echo "postgres.sh: no PostgreSQL server binaries (initdb) under /usr/lib/postgresql; install postgresql" >&2
  exit 1
fi
as_pg() {
  if [ "$(id -u)" = 0 ]; then su postgres -s /bin/bash -c "$1"; else bash -c "$1"; fi
}
case "$cmd" in
start)
  mkdir -p "$dir"
  [ "$(id -u)" = 0 ] && chown postgres "$dir"
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  as_pg "$bin/initdb -D '$dir/data' -A trust -U postgres >'$dir/initdb.log' 2>&1"
  as_pg "$bin/pg_ctl -D '$dir/data' -l '$dir/log' -o \"-p $port -k '$dir' -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=400\" -w start >/dev/null"
  echo "$port" >"$dir/port"
  echo "postgres://postgres@127.0.0.1:$port/postgres"
  ;;
resume)
  port=$(cat "$dir/port")
  as_pg "$bin/pg_ctl -D '$dir/data' -l '$dir/log' -o \"-p $port -k '$dir' -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=400\" -w start >/dev/null"
  echo "postgres://postgres@127.0.0.1:$port/postgres"
  ;;
stop)
  [ -d "$dir/data" ] && as_pg "$bin/pg_ctl -D '$dir/data' -m fast -w stop >/dev/null" || true
  ;;
*)
  echo "postgres.sh: unknown command $cmd (start|resume|stop)" >&2
  exit 2
  ;;
esac
