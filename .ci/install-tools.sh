#!/usr/bin/env bash
# Builds the test control plane (etcd, kube-apiserver, kube-controller-manager)
# and helm from Go module sources pinned in tools/controlplane/*/go.{mod,sum}.
#
# Usage: .ci/install-tools.sh [etcd|kube-apiserver|kube-controller-manager|helm ...]
#        (no arguments: all four)
#
# Binaries land in $TOOLS_CACHE/bin (default: <repo>/.cache/bin). Go's module
# and build caches live in $TOOLS_CACHE/go, so a re-run only re-links when the
# pins change and is a no-op otherwise: each binary has a stamp file holding a
# hash of its module files, ldflags and Go version.
#
# Environment:
#   TOOLS_CACHE  cache root (default <repo>/.cache). Point it at a stable path
#                outside the checkout (e.g. /var/cache/postcode-operator) to
#                share builds between clones on the same machine.
#   GO           go binary (default: `go` on PATH, else /usr/local/go/bin/go)
#   NICE         niceness for the builds (default 10)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${TOOLS_CACHE:-$REPO/.cache}
BIN=$CACHE/bin
SRC=$REPO/tools/controlplane
NICE=${NICE:-10}

if [[ -z "${GO:-}" ]]; then
  if command -v go >/dev/null 2>&1; then GO=$(command -v go)
  elif [[ -x /usr/local/go/bin/go ]]; then GO=/usr/local/go/bin/go
  else echo "install-tools: no Go toolchain found (set GO=...)" >&2; exit 1
  fi
fi

export GOPATH=$CACHE/go
export GOMODCACHE=$CACHE/go/mod
export GOCACHE=$CACHE/go/build
export GOFLAGS="-trimpath -buildvcs=false -mod=readonly"
export CGO_ENABLED=0
export GOTOOLCHAIN=${GOTOOLCHAIN:-local}
mkdir -p "$BIN" "$GOMODCACHE" "$GOCACHE"
# one install at a time per cache (parallel CI steps, two shells)
exec 9>"$CACHE/.install-tools.lock"
flock 9

# Versions come from the pins in tools/controlplane/*/go.mod.
modver() { (cd "$SRC/$1" && "$GO" list -m -f '{{.Version}}' "$2"); }

log() { printf '[install-tools %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# stamp_of TOOL MODDIR LDFLAGS -> a hash of everything that defines the build
stamp_of() {
  local tool=$1 moddir=$2 ldflags=$3
  {
    echo "$tool"; echo "$ldflags"; echo "$GOFLAGS $CGO_ENABLED"
    "$GO" env GOVERSION GOOS GOARCH
    cat "$moddir"/go.mod "$moddir"/go.sum
    cat "$moddir"/*.go 2>/dev/null || true
  } | sha256sum | cut -d' ' -f1
}

# build TOOL MODDIR PACKAGE LDFLAGS
build() {
  local tool=$1 moddir=$2 pkg=$3 ldflags=$4
  local stamp_file=$BIN/.$tool.stamp want
  want=$(stamp_of "$tool" "$moddir" "$ldflags")
  if [[ -x $BIN/$tool && -f $stamp_file && $(cat "$stamp_file") == "$want" ]]; then
    log "$tool: up to date"
    return 0
  fi
  log "$tool: building $pkg (this can take a while on a cold cache)"
  local t0=$SECONDS
  rm -f "$stamp_file"
  (cd "$moddir" && nice -n "$NICE" "$GO" build -ldflags="$ldflags" -o "$BIN/$tool.tmp" "$pkg")
  mv -f "$BIN/$tool.tmp" "$BIN/$tool"
  echo "$want" >"$stamp_file"
  log "$tool: built in $((SECONDS - t0))s"
}

kube_ldflags() {
  local KUBE_VERSION v major minor
  KUBE_VERSION=$(modver kube k8s.io/kubernetes)
  v=${KUBE_VERSION#v}
  major=${v%%.*}; minor=${v#*.}; minor=${minor%%.*}
  local f="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    f+=" -X $p.gitVersion=$KUBE_VERSION -X $p.gitMajor=$major -X $p.gitMinor=$minor"
    f+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  echo "$f"
}

helm_ldflags() {
  # Same as helm's Makefile: the k8s version helm assumes comes from client-go.
  local cg major minor HELM_VERSION
  HELM_VERSION=$(modver helm helm.sh/helm/v3)
  cg=$(modver helm k8s.io/client-go)
  cg=${cg#v}; major=$(( ${cg%%.*} + 1 )); minor=${cg#*.}; minor=${minor%%.*}
  local f="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  f+=" -X helm.sh/helm/v3/internal/version.metadata= -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  for p in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    f+=" -X $p.k8sVersionMajor=$major -X $p.k8sVersionMinor=$minor"
  done
  echo "$f"
}

tools=("$@")
[[ ${#tools[@]} -gt 0 ]] || tools=(etcd kube-apiserver kube-controller-manager helm)

T0=$SECONDS
log "go: $("$GO" version); cache: $CACHE"
for t in "${tools[@]}"; do
  case $t in
    etcd) build etcd "$SRC/etcd" . "-s -w" ;;
    kube-apiserver|kube-controller-manager)
      build "$t" "$SRC/kube" "k8s.io/kubernetes/cmd/$t" "$(kube_ldflags)" ;;
    helm) build helm "$SRC/helm" helm.sh/helm/v3/cmd/helm "$(helm_ldflags)" ;;
    *) echo "install-tools: unknown tool '$t'" >&2; exit 2 ;;
  esac
done
log "done in $((SECONDS - T0))s; binaries in $BIN"
