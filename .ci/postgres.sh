#!/usr/bin/env bash
# Starts (or stops) a throwaway PostgreSQL cluster for the tests, installing the
# server from Debian packages when the machine has none.
#   .ci/postgres.sh start DIR PORT   → prints the URL to connect with
#   .ci/postgres.sh start-tls DIR PORT CERT KEY
#                                    → the same, with ssl=on (CERT/KEY: the
#                                      server's PEM certificate and key) and
#                                      only `hostssl` lines in pg_hba.conf, so
#                                      a plaintext connection is refused
#   .ci/postgres.sh stop DIR
set -euo pipefail
cmd=${1:?start|stop}; dir=${2:?data dir}; port=${3:-55432}

pg_bin() {
  local d
  for d in /usr/lib/postgresql/*/bin; do
    if [[ -x $d/initdb && -x $d/pg_ctl ]]; then echo "$d"; return 0; fi
  done
  return 1
}

run_as_postgres() {
  if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case $cmd in
start|start-tls)
  if ! bin=$(pg_bin); then
    echo "installing PostgreSQL from Debian packages" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 && apt-get install -y -qq postgresql >&2
    bin=$(pg_bin)
  fi
  if [[ $(id -u) -eq 0 ]] && ! id postgres >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
  fi
  rm -rf "$dir"; mkdir -p "$dir"
  [[ $(id -u) -eq 0 ]] && chown postgres "$dir"
  run_as_postgres "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >"$dir/initdb.log" 2>&1 \
    || { cat "$dir/initdb.log" >&2; exit 1; }
  tls_opts=""
  if [[ $cmd == start-tls ]]; then
    cert=${4:?server certificate (PEM)}; key=${5:?server key (PEM)}
    # The server refuses a key others can read; it reads both as postgres.
    install -m 0644 "$cert" "$dir/data/server.crt"
    install -m 0600 "$key" "$dir/data/server.key"
    [[ $(id -u) -eq 0 ]] && chown postgres "$dir/data/server.crt" "$dir/data/server.key"
    printf '%s\n' \
      "local all all trust" \
      "hostssl all all 127.0.0.1/32 trust" \
      "hostssl all all ::1/128 trust" >"$dir/data/pg_hba.conf"
    tls_opts="-c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key"
  fi
  run_as_postgres "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300 -c shared_buffers=256MB $tls_opts" \
    start >&2 || { cat "$dir/server.log" >&2; exit 1; }
  echo "postgres://postgres@127.0.0.1:$port/postgres"
  ;;
stop)
  if bin=$(pg_bin) && [[ -d $dir/data ]]; then
    run_as_postgres "$bin/pg_ctl" -D "$dir/data" -m immediate stop >&2 || true
  fi
  ;;
*) echo "usage: $0 start|start-tls|stop DIR [PORT [CERT KEY]]" >&2; exit 2 ;;
esac
