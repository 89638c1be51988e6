#!/usr/bin/env bash
# `make bench`: builds the release binaries, gets the reference tools (a
# throwaway PostgreSQL from Debian packages, sqlite3, numpy + scipy in a
# virtualenv under $TOOLS_CACHE), runs `postcode-bench run` and writes
# BENCHMARKS.md. Reads ../shared/data (override with BENCH_DATA); scratch files
# go to BENCH_WORK (default /tmp/postcode-bench, about 3 GB at 10M rows).
#   BENCH_SIZES=100000,1000000 make bench    # skip the 10M-row runs
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
export PATH="$HOME/.cargo/bin:$PATH"
cache=${TOOLS_CACHE:-$repo/.cache}
work=${BENCH_WORK:-/tmp/postcode-bench}
mkdir -p "$cache" "$work"

cargo build --release --workspace --bins

if ! command -v sqlite3 >/dev/null; then
  echo "installing sqlite3 from Debian packages" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq sqlite3 >&2
fi
venv=$cache/bench-venv
if ! "$venv/bin/python" -c "import numpy, scipy" 2>/dev/null; then
  echo "installing numpy and scipy into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q numpy scipy
fi

pg_dir=$work/pg
port=55600
while ss -ltnH "sport = :$port" | grep -q .; do port=$((port + 1)); done
url=$(.ci/postgres.sh start "$pg_dir" "$port")
trap '.ci/postgres.sh stop "$pg_dir"' EXIT

./target/release/postcode-bench run \
  --data "${BENCH_DATA:-$repo/../shared/data}" \
  --work "$work" \
  --database-url "$url" \
  --python "$venv/bin/python" \
  --sizes "${BENCH_SIZES:-100000,1000000,10000000}" \
  --quotas "${BENCH_QUOTAS:-20,50}" \
  --out BENCHMARKS.md
echo "BENCHMARKS.md written"
