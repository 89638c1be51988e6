#!/usr/bin/env bash
# Runs a command with the services the tests need: a throwaway PostgreSQL
# (Debian packages, installed when absent) and a Kubernetes test control plane
# (etcd + kube-apiserver + garbage collector, built from Go module sources on
# first use and cached under $TOOLS_CACHE, default <repo>/.cache), plus helm.
# Exports TEST_DATABASE_URL, KUBECONFIG, APISERVER_URL and HELM for the command.
#   .ci/with-services.sh COMMAND [ARGS...]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
export PATH="$HOME/.cargo/bin:$PATH"

state=$repo/.cache/test-state
mkdir -p "$state"
pg_dir=$state/pg-$$
cp_dir=$state/controlplane-$$
cleanup() {
  "$repo/.ci/controlplane.sh" stop "$cp_dir" >/dev/null 2>&1 || true
  "$repo/.ci/postgres.sh" stop "$pg_dir" || true
  rm -rf "$cp_dir" "$pg_dir"
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

"$repo/.ci/install-tools.sh"
CONTROLPLANE_APPLY=$repo/crds "$repo/.ci/controlplane.sh" start "$cp_dir"
set -a; . "$cp_dir/env"; set +a
export HELM=${TOOLS_CACHE:-$repo/.cache}/bin/helm
echo "Kubernetes API server for tests: $APISERVER_URL"

"$@"
