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

# Section 6: imports sharing one API quota, and a slow server (issue 13), from
# the API-citizen tests' benchmark runs (their `BENCH …|` lines).
log=$work/api-citizen.log
TEST_DATABASE_URL=$url cargo test --release -p postcode-operator --test api_citizen -- \
  --include-ignored --test-threads=1 --nocapture bench_ three_imports_share_one_api_quota 2>"$log"
rows() { grep "^BENCH $1|" "$log" | cut -d'|' -f2- | sed 's/^/|/'; }
{
  echo
  echo "## 6. Sharing an API, a slow server"
  echo
  echo "\`postcode-operator local\` against \`postcodes-io-test-server\`, SQLite unless said, default settings otherwise (4 shards each). Reproduce with \`make bench\` or the \`api_citizen\` tests named below."
  echo
  echo "Imports of disjoint 2,000-row slices of the real file started together, one API quota of 20 requests/s (\`--quota-rps 20\`), the server limiting at 20/s (\`bench_imports_sharing_one_quota\`). The floor is requests / quota."
  echo
  echo "| imports | rows each | requests | 429s | busiest second | wall | floor | wall / floor | first / last import done |"
  echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  rows share
  echo
  echo "Three disjoint 20,000-row slices, each asking 20 requests/s, API quota 20, server limiting at 20/s (\`three_imports_share_one_api_quota_on_*\`, in CI): when each import finished."
  echo
  echo "| database | finished (import 1 / 2 / 3) | requests | busiest second | floor | answers by HTTP status |"
  echo "|---|---|---:|---:|---:|---|"
  rows three
  echo
  echo "A slow server: capacity mode at 20 coordinates/s (requests queue; work on requests whose client gave up goes on and counts as wasted), the first 5,000 real rows (\`bench_slow_server_5000_rows\`). The floor is the coordinates the server worked on / 20."
  echo
  echo "| rows | requests | wall | floor | wall / floor | coordinates worked | wasted | rows failed | most requests queued |"
  echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  rows capacity
} >> BENCHMARKS.md

# Section 7: uploads under load (issue 14), on the test cluster's API server
# (.ci/with-services.sh starts it and its own PostgreSQL).
log=$work/upload-load.log
.ci/with-services.sh cargo test --release -p postcode-operator --test upload_load -- \
  --ignored --nocapture bench_uploads_under_load 2>"$log" >&2
{
  echo
  echo "## 7. Uploads under load"
  echo
  echo "Twenty 10 MB uploads and one of 1 GB sent at once over loopback to the upload API, each streamed into PostgreSQL in 1 MiB chunks; every upload is then read back from the database and its SHA-256 and line count checked. Memory is the operator's resident set (VmRSS before, VmHWM at the peak); \`/healthz\` (metrics port) polled every 20 ms throughout (\`bench_uploads_under_load\` in \`operator/tests/upload_load.rs\`)."
  echo
  echo "| uploads | bytes | wall | throughput | RSS before | peak | growth | /healthz p50 | p99 | max | probes |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  rows upload
} >> BENCHMARKS.md
# Section 8: the operator's cost per import in flight (issue 17), on the test
# cluster (the enricher Jobs held suspended: only the operator's polling).
log=$work/operator-cost.log
.ci/with-services.sh cargo test --release -p postcode-operator --test operator_e2e -- \
  --ignored --nocapture bench_operator_cost_per_import_in_flight 2>"$log" >&2
{
  echo
  echo "## 8. Operator cost per import in flight"
  echo
  echo "Imports in \`Enriching\` on the test cluster, their enricher Jobs held suspended by a stand-in queue (as Kueue would), so the only work is the operator looking at each import every 3 s. Per import per minute over a 60 s window: reconciles, requests to the API server (\`postcode_operator_kube_requests_total\`, every verb), database transactions and blocks touched (\`pg_stat_database\` of the test's own database), and the operator's CPU time (\`bench_operator_cost_per_import_in_flight\` in \`operator/tests/operator_e2e.rs\`)."
  echo
  echo "| imports of | in flight | reconciles | API requests | DB transactions | DB blocks | DB blocks / reconcile | operator CPU | operator CPU, % of a core |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
  rows cost
  echo
  echo "What one look at the 1,000,000-row import (its shards planned: about 900,000 lookups) reads for its counts, from \`EXPLAIN (ANALYZE, BUFFERS)\`: the two \`GROUP BY\` statements over its lookups every look ran before, against the two over \`lookup_tallies\` now."
  echo
  echo "| before: blocks, time | now: blocks, time |"
  echo "|---:|---:|"
  rows before
} >> BENCHMARKS.md
echo "BENCHMARKS.md written"
