#!/usr/bin/env bash
# Runs a command with the services the tests need: a throwaway PostgreSQL
# (Debian packages, installed when absent) and a Kubernetes test cluster
# (etcd + kube-apiserver + kube-controller-manager, built from Go module
# sources on first use and cached under $TOOLS_CACHE, default <repo>/.cache,
# plus the pod agent, tools/pod-agent, which runs the Pods with Debian's runc,
# installed when absent), plus helm.
# Builds the workspace first: the pod agent is part of it, and its images are
# made from the release binaries (tools/image-rootfs.sh):
#   postcode-operator  the product image (as the Dockerfile makes it)
#   testbox            sh, sleep, cat, … from this machine, for the harness tests
# Exports TEST_DATABASE_URL, KUBECONFIG, APISERVER_URL, HELM, AUDIT_LOG,
# POD_AGENT_STATE_DIR and RUNC_ROOT for the command.
#   .ci/with-services.sh COMMAND [ARGS...]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
export PATH="$HOME/.cargo/bin:$PATH"

state=$repo/.cache/test-state
mkdir -p "$state"
pg_dir=$state/pg-$$
cp_dir=$state/controlplane-$$
img_dir=$state/images-$$
cleanup() {
  "$repo/.ci/controlplane.sh" stop "$cp_dir" >/dev/null 2>&1 || true
  "$repo/.ci/postgres.sh" stop "$pg_dir" || true
  rm -rf "$cp_dir" "$pg_dir" "$img_dir"
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

# runc for the pods; headless Chromium and its WebDriver for the web page's test.
missing=()
command -v runc >/dev/null 2>&1 || missing+=(runc)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if ((${#missing[@]})); then
  echo "installing ${missing[*]} from Debian packages" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2 && apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

cargo build --release --workspace --bins
rel=$repo/target/release
tools/image-rootfs.sh --dockerfile Dockerfile "$img_dir/postcode-operator" \
  "$rel/postcode-operator" "$rel/reader-job" "$rel/enricher-job"
box=()
for b in sh sleep cat id env true false tail head ls echo mkdir stat; do box+=("$(type -P "$b")"); done
tools/image-rootfs.sh "$img_dir/testbox" "${box[@]}"

"$repo/.ci/install-tools.sh"
CONTROLPLANE_APPLY=$repo/crds POD_AGENT=$rel/pod-agent \
  POD_AGENT_IMAGES="postcode-operator=$img_dir/postcode-operator testbox=$img_dir/testbox" \
  "$repo/.ci/controlplane.sh" start "$cp_dir"
set -a; . "$cp_dir/env"; set +a
export HELM=${TOOLS_CACHE:-$repo/.cache}/bin/helm
echo "Kubernetes API server for tests: $APISERVER_URL (pods: $POD_AGENT_STATE_DIR)"

"$@"
