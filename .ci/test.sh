#!/usr/bin/env bash
# The whole test suite: starts what the tests need (PostgreSQL; later the
# Kubernetes control plane), builds every binary, runs every test.
# Called by `make test` and by .ci/run.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
export PATH="$HOME/.cargo/bin:$PATH"

state=$repo/.cache/test-state
mkdir -p "$state"
pg_dir=$state/pg
cp_dir=$state/controlplane
cleanup() {
  "$repo/.ci/controlplane.sh" stop "$cp_dir" >/dev/null 2>&1 || true
  "$repo/.ci/postgres.sh" stop "$pg_dir" || true
}
trap cleanup EXIT

free_port() {
  local p
  for p in $(seq "$1" $(($1 + 200))); do
    if ! ss -ltnH "sport = :$p" | grep -q .; then echo "$p"; return 0; fi
  done
  return 1
}
port=$(free_port "${TEST_PG_PORT:-55432}")
TEST_DATABASE_URL=$("$repo/.ci/postgres.sh" start "$pg_dir" "$port")
export TEST_DATABASE_URL
echo "PostgreSQL for tests: $TEST_DATABASE_URL"

# The Kubernetes test control plane (etcd, kube-apiserver, the garbage
# collector) and helm, built from Go module sources on first use and cached.
"$repo/.ci/install-tools.sh"
rm -rf "$cp_dir"
CONTROLPLANE_APPLY=$repo/crds "$repo/.ci/controlplane.sh" start "$cp_dir"
set -a; . "$cp_dir/env"; set +a
export HELM=${TOOLS_CACHE:-$repo/.cache}/bin/helm
echo "Kubernetes API server for tests: $APISERVER_URL"

cargo build --release --workspace --bins
cargo test --release --workspace -- --test-threads="${TEST_THREADS:-2}"
