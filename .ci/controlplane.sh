#!/usr/bin/env bash
# A throwaway Kubernetes cluster for tests: etcd + kube-apiserver +
# kube-controller-manager (the real Job, TTL-after-finished, ServiceAccount,
# ServiceAccount-token, root-CA publisher, ResourceQuota, garbage collector and
# namespace controllers) + the pod agent (tools/pod-agent: one Node whose Pods
# run with runc), all on 127.0.0.1 with free ports, all state in DIR.
# There is no kube-scheduler: the pod agent binds Pods to its Node itself
# (the Binding subresource, as the scheduler does) -- one Node, nothing to choose
# between, and one long Go build less (see tools/pod-agent/README.md).
#
# Usage:
#   .ci/controlplane.sh start DIR   start, wait for /readyz (and the Node), write DIR/kubeconfig and DIR/env
#   .ci/controlplane.sh stop DIR    stop everything started in DIR (pid files in DIR)
#   .ci/controlplane.sh status DIR  exit 0 if the processes of DIR are alive and /readyz is ok
#   .ci/controlplane.sh selftest [DIR]  start, check namespaces, ownerReference GC, a CRD with
#                                   CEL validation and helm, then stop (DIR default: a temp dir)
#
# DIR/env holds KEY=value lines (source it with `set -a; . DIR/env; set +a`):
#   KUBECONFIG, APISERVER_URL, ETCD_URL, ADMIN_TOKEN, CONTROLPLANE_DIR, AUDIT_LOG,
#   and with the pod agent POD_AGENT_STATE_DIR, POD_AGENT_NODE, RUNC_ROOT
# DIR/kubeconfig authenticates as user "admin" (group system:masters) with an
# embedded client certificate; ADMIN_TOKEN is a bearer token for the same user.
# The API server writes an audit log (DIR/audit.log, JSON lines, level Metadata:
# who made each write) for tests that check which identity made a call.
# Logs: DIR/etcd.log, DIR/kube-apiserver.log, DIR/kube-controller-manager.log, DIR/pod-agent.log.
#
# Environment:
#   TOOLS_BIN            where the binaries are (default $TOOLS_CACHE/bin, i.e. <repo>/.cache/bin);
#                        build them with .ci/install-tools.sh
#   KCM=0                do not start kube-controller-manager
#   KCM_CONTROLLERS      controllers for kube-controller-manager (default: the list above)
#   POD_AGENT            the pod-agent binary (cargo build -p pod-agent); unset: no Node, no Pod runs
#   POD_AGENT_IMAGES     space-separated NAME=DIR images for the agent (tools/image-rootfs.sh makes DIR)
#   POD_AGENT_MEMORY     allocatable memory of the Node (default 16Gi)
#   CONTROLPLANE_APPLY   file or dir applied with kubectl before the controller manager starts
#                        (e.g. CRDs, so the garbage collector watches their kinds from the start;
#                        kinds added later are picked up by its 30 s discovery resync)
#   CONTROLPLANE_TIMEOUT seconds to wait for readiness (default 120)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${TOOLS_BIN:-${TOOLS_CACHE:-$REPO/.cache}/bin}
TIMEOUT=${CONTROLPLANE_TIMEOUT:-120}
COMPONENTS=(pod-agent kube-controller-manager kube-apiserver etcd) # stop order
DEFAULT_KCM_CONTROLLERS=job,ttl-after-finished,serviceaccount,serviceaccount-token,root-ca-cert-publisher,resourcequota,garbagecollector,namespace

log() { printf '[controlplane %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

# pid_alive DIR NAME: the pid in DIR/NAME.pid is alive and still our process
pid_alive() {
  local f=$1/$2.pid pid
  [[ -f $f ]] || return 1
  pid=$(cat "$f")
  [[ -n $pid && -r /proc/$pid/cmdline ]] || return 1
  # guard against pid reuse: our processes carry DIR in their arguments
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$1/" || return 1
}

# term_and_wait DIR NAME...: TERM the live ones together, wait up to 10 s, KILL the rest
term_and_wait() {
  local dir=$1 c pid i alive pids=() names=()
  shift
  for c in "$@"; do
    if pid_alive "$dir" "$c"; then
      pid=$(cat "$dir/$c.pid")
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid"); names+=("$c")
    fi
    rm -f "$dir/$c.pid"
  done
  for ((i = 0; i < 100; i++)); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for i in "${!pids[@]}"; do
    if kill -0 "${pids[i]}" 2>/dev/null; then
      log "${names[i]} (${pids[i]}) did not exit on TERM, killing"
      kill -KILL "${pids[i]}" 2>/dev/null || true
    fi
    log "stopped ${names[i]} (${pids[i]})"
  done
}

cmd_stop() {
  local dir=$1
  [[ -d $dir ]] || { log "nothing to stop: $dir does not exist"; return 0; }
  dir=$(cd "$dir" && pwd)
  # the pod agent first (it stops its containers while the API server is up),
  # then the clients of etcd (the apiserver hangs on shutdown without etcd)
  term_and_wait "$dir" pod-agent
  term_and_wait "$dir" kube-controller-manager kube-apiserver
  term_and_wait "$dir" etcd
}

# free_port: a TCP port on 127.0.0.1 nobody listens on and not yet handed out
USED_PORTS=" "
free_port() {
  local p i
  for ((i = 0; i < 200; i++)); do
    p=$((20000 + RANDOM % 30000))
    [[ $USED_PORTS == *" $p "* ]] && continue
    if ss -Htan "( sport = :$p )" 2>/dev/null | grep -q .; then continue; fi
    USED_PORTS+="$p "
    echo "$p"
    return 0
  done
  die "no free port found"
}

gen_certs() {
  local d=$1/pki
  mkdir -p "$d"
  (
    cd "$d"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 \
      -subj "/CN=controlplane-test-ca" \
      -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
    # sign NAME SUBJECT EXTENSIONS
    sign() {
      openssl req -new -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
      printf '%b' "$3" >"$1.ext"
      openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
        -out "$1.crt" -extfile "$1.ext" 2>/dev/null
      rm -f "$1.csr" "$1.ext"
    }
    sign apiserver "/CN=kube-apiserver" \
      "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost,IP:10.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc\n"
    sign admin "/O=system:masters/CN=admin" \
      "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n"
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    chmod 600 ./*.key
  )
}

write_kubeconfig() {
  local dir=$1 url=$2 b64="base64 -w0"
  cat >"$dir/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: controlplane
  cluster:
    server: $url
    certificate-authority-data: $($b64 "$dir/pki/ca.crt")
users:
- name: admin
  user:
    client-certificate-data: $($b64 "$dir/pki/admin.crt")
    client-key-data: $($b64 "$dir/pki/admin.key")
contexts:
- name: controlplane
  context:
    cluster: controlplane
    user: admin
    namespace: default
current-context: controlplane
preferences: {}
EOF
  chmod 600 "$dir/kubeconfig"
}

# wait_for WHAT CMD...: retry CMD until it succeeds or TIMEOUT passes
wait_for() {
  local what=$1 deadline=$((SECONDS + TIMEOUT))
  shift
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then return 1; fi
    for c in "${STARTED[@]}"; do
      pid_alive "$DIR" "$c" || { log "$c exited while waiting for $what"; return 1; }
    done
    sleep 0.25
  done
}

fail_start() {
  log "ERROR: $*"
  for c in "${STARTED[@]}"; do
    log "---- last lines of $DIR/$c.log ----"
    tail -n 30 "$DIR/$c.log" >&2 || true
  done
  cmd_stop "$DIR"
  exit 1
}

# launch NAME ARGS...: start BIN/NAME in the background, logging to DIR/NAME.log
STARTED=()
node_ready() {
  kubectl --kubeconfig "$1" get node pod-agent \
    -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null | grep -qx True
}

launch() {
  launch_bin "$1" "$BIN/$1" "${@:2}"
}

# launch_bin NAME PATH ARGS...
launch_bin() {
  local name=$1 path=$2
  shift 2
  "$path" "$@" </dev/null >"$DIR/$name.log" 2>&1 &
  local pid=$! exe i
  echo "$pid" >"$DIR/$name.pid"
  STARTED+=("$name")
  # Until it execs, the child is a copy of this shell, whose command line
  # pid_alive does not recognise: a check in that window (seen on a loaded CI
  # machine) took a starting component for an exited one. Wait for the exec,
  # or for the child to go.
  exe=$(readlink -f "$path")
  for ((i = 0; i < 400; i++)); do
    [[ $(readlink "/proc/$pid/exe" 2>/dev/null) == "$exe" ]] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.025
  done
  log "started $name (pid $pid)"
}

cmd_start() {
  DIR=$1
  mkdir -p "$DIR"
  DIR=$(cd "$DIR" && pwd)
  for c in "${COMPONENTS[@]}"; do
    pid_alive "$DIR" "$c" && die "$c already running for $DIR (run: $0 stop $DIR)"
  done
  local want=(etcd kube-apiserver)
  [[ ${KCM:-1} == 0 ]] || want+=(kube-controller-manager)
  for b in "${want[@]}"; do
    [[ -x $BIN/$b ]] || die "$BIN/$b missing: run .ci/install-tools.sh first"
  done
  command -v openssl >/dev/null || die "openssl is required"

  local t0=$SECONDS
  rm -rf "$DIR/etcd-data" "$DIR/pki" "$DIR/kubeconfig" "$DIR/env"
  gen_certs "$DIR"
  local token
  token=$(openssl rand -hex 24)
  printf '%s,admin,admin,"system:masters"\n' "$token" >"$DIR/pki/tokens.csv"
  chmod 600 "$DIR/pki/tokens.csv"

  local etcd_port etcd_peer api_port
  etcd_port=$(free_port)
  etcd_peer=$(free_port)
  api_port=$(free_port)
  local etcd_url=http://127.0.0.1:$etcd_port api_url=https://127.0.0.1:$api_port

  launch etcd \
    --name=controlplane \
    --data-dir="$DIR/etcd-data" \
    --listen-client-urls="$etcd_url" \
    --advertise-client-urls="$etcd_url" \
    --listen-peer-urls="http://127.0.0.1:$etcd_peer" \
    --initial-advertise-peer-urls="http://127.0.0.1:$etcd_peer" \
    --initial-cluster="controlplane=http://127.0.0.1:$etcd_peer" \
    --unsafe-no-fsync=true \
    --log-level=warn
  wait_for etcd curl -fsS "$etcd_url/health" || fail_start "etcd not healthy (exited, or not within ${TIMEOUT}s)"

  local p=$DIR/pki
  # Who made each write, without bodies; reads, leases and events are noise.
  cat >"$DIR/audit-policy.yaml" <<'EOF'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: None
  verbs: [get, list, watch]
- level: None
  resources: [{group: coordination.k8s.io, resources: [leases]}, {group: "", resources: [events]}, {group: events.k8s.io, resources: [events]}]
- level: Metadata
EOF
  launch kube-apiserver \
    --etcd-servers="$etcd_url" \
    --bind-address=127.0.0.1 \
    --advertise-address=127.0.0.1 \
    --secure-port="$api_port" \
    --tls-cert-file="$p/apiserver.crt" \
    --tls-private-key-file="$p/apiserver.key" \
    --client-ca-file="$p/ca.crt" \
    --token-auth-file="$p/tokens.csv" \
    --service-account-issuer=https://kubernetes.default.svc \
    --service-account-key-file="$p/sa.pub" \
    --service-account-signing-key-file="$p/sa.key" \
    --service-cluster-ip-range=10.0.0.0/24 \
    --authorization-mode=RBAC \
    --allow-privileged=true \
    --enable-admission-plugins=NamespaceLifecycle,LimitRanger,ServiceAccount,PodSecurity,ResourceQuota \
    --audit-policy-file="$DIR/audit-policy.yaml" \
    --audit-log-path="$DIR/audit.log" \
    --audit-log-format=json \
    --audit-log-maxsize=0 \
    --enable-priority-and-fairness=false \
    --profiling=false \
    --v=1
  write_kubeconfig "$DIR" "$api_url"
  wait_for "kube-apiserver /readyz" curl -fsS --cacert "$p/ca.crt" \
    --cert "$p/admin.crt" --key "$p/admin.key" "$api_url/readyz" ||
    fail_start "kube-apiserver not ready (exited, or not within ${TIMEOUT}s)"

  if [[ -n ${CONTROLPLANE_APPLY:-} ]]; then
    log "applying $CONTROLPLANE_APPLY"
    kubectl --kubeconfig "$DIR/kubeconfig" apply --server-side -f "$CONTROLPLANE_APPLY" >&2 ||
      fail_start "kubectl apply -f $CONTROLPLANE_APPLY failed"
    if kubectl --kubeconfig "$DIR/kubeconfig" get crd -o name 2>/dev/null | grep -q .; then
      kubectl --kubeconfig "$DIR/kubeconfig" wait --for=condition=Established crd --all \
        --timeout="${TIMEOUT}s" >&2 || fail_start "CRDs not established"
    fi
  fi

  if [[ ${KCM:-1} != 0 ]]; then
    launch kube-controller-manager \
      --kubeconfig="$DIR/kubeconfig" \
      --controllers="${KCM_CONTROLLERS:-$DEFAULT_KCM_CONTROLLERS}" \
      --service-account-private-key-file="$p/sa.key" \
      --root-ca-file="$p/ca.crt" \
      --leader-elect=false \
      --secure-port=0 \
      --kube-api-qps=200 \
      --kube-api-burst=400 \
      --concurrent-gc-syncs=5 \
      --v=1
    # No health port (secure-port=0): wait for the log line saying the
    # controllers run (for the GC: its informers for every kind have synced).
    local started='Controller starting'
    [[ ${KCM_CONTROLLERS:-$DEFAULT_KCM_CONTROLLERS} != *garbage* ]] ||
      started='Garbage collector: all resource monitors have synced'
    wait_for "kube-controller-manager" grep -qF "$started" "$DIR/kube-controller-manager.log" ||
      fail_start "kube-controller-manager did not log '$started'"
  fi

  local agent_env=""
  if [[ -n ${POD_AGENT:-} ]]; then
    [[ -x $POD_AGENT ]] || fail_start "POD_AGENT=$POD_AGENT is not an executable"
    local images=() i
    for i in ${POD_AGENT_IMAGES:-}; do images+=(--image "$i"); done
    mkdir -p "$DIR/pod-agent"
    launch_bin pod-agent "$POD_AGENT" \
      --kubeconfig="$DIR/kubeconfig" \
      --state-dir="$DIR/pod-agent" \
      --node-name=pod-agent \
      --memory="${POD_AGENT_MEMORY:-16Gi}" \
      "${images[@]}"
    wait_for "the pod agent's Node" node_ready "$DIR/kubeconfig" ||
      fail_start "the pod agent's Node did not become Ready"
    agent_env="POD_AGENT_STATE_DIR=$(printf '%q' "$DIR/pod-agent")
POD_AGENT_NODE=pod-agent
RUNC_ROOT=$(printf '%q' "$DIR/pod-agent/runc")"
  fi

  cat >"$DIR/env" <<EOF
KUBECONFIG=$(printf '%q' "$DIR/kubeconfig")
AUDIT_LOG=$(printf '%q' "$DIR/audit.log")
$agent_env
APISERVER_URL=$api_url
ETCD_URL=$etcd_url
ADMIN_TOKEN=$token
CONTROLPLANE_DIR=$(printf '%q' "$DIR")
EOF
  log "ready in $((SECONDS - t0))s: $api_url (KUBECONFIG=$DIR/kubeconfig)"
}

cmd_status() {
  local dir
  dir=$(cd "$1" && pwd) || return 1
  local ok=0
  for c in "${COMPONENTS[@]}"; do
    if pid_alive "$dir" "$c"; then echo "$c: running (pid $(cat "$dir/$c.pid"))"
    elif [[ $c == kube-controller-manager || $c == pod-agent ]]; then echo "$c: not running"
    else echo "$c: not running"; ok=1; fi
  done
  [[ -f $dir/kubeconfig ]] || return 1
  if KUBECONFIG=$dir/kubeconfig kubectl get --raw /readyz >/dev/null 2>&1 ||
    curl -fsS --cacert "$dir/pki/ca.crt" --cert "$dir/pki/admin.crt" --key "$dir/pki/admin.key" \
      "$(sed -n 's/^APISERVER_URL=//p' "$dir/env")/readyz" >/dev/null 2>&1; then
    echo "readyz: ok"
  else
    echo "readyz: failing"; ok=1
  fi
  return $ok
}

cmd_selftest() {
  local dir=${1:-} k t0=$SECONDS
  [[ -n $dir ]] || dir=$(mktemp -d /tmp/controlplane-selftest.XXXXXX)
  cmd_start "$dir"
  trap 'cmd_stop "$DIR"' EXIT
  k=(kubectl --kubeconfig "$DIR/kubeconfig")
  local ns=selftest-$RANDOM
  log "selftest: namespaces"
  "${k[@]}" get ns >&2
  "${k[@]}" create ns "$ns" >/dev/null

  if [[ ${KCM:-1} != 0 ]]; then
    log "selftest: ownerReference cascade (garbage collector)"
    "${k[@]}" -n "$ns" create configmap owner --from-literal=a=1 >/dev/null
    local uid
    uid=$("${k[@]}" -n "$ns" get configmap owner -o jsonpath='{.metadata.uid}')
    "${k[@]}" -n "$ns" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: ConfigMap
metadata:
  name: dependent
  ownerReferences:
  - {apiVersion: v1, kind: ConfigMap, name: owner, uid: "$uid"}
data: {b: "2"}
EOF
    "${k[@]}" -n "$ns" delete configmap owner >/dev/null
    "${k[@]}" -n "$ns" wait --for=delete configmap/dependent --timeout=60s >&2 ||
      die "selftest: dependent ConfigMap not garbage-collected"
  fi

  log "selftest: CRD with CEL validation"
  "${k[@]}" apply -f - >/dev/null <<'EOF'
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: selftests.controlplane.test}
spec:
  group: controlplane.test
  names: {kind: SelfTest, plural: selftests, singular: selftest, listKind: SelfTestList}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            x-kubernetes-validations:
            - {rule: "self.min <= self.max", message: "min must be <= max"}
            properties:
              min: {type: integer}
              max: {type: integer}
EOF
  "${k[@]}" wait --for=condition=Established crd/selftests.controlplane.test --timeout=60s >/dev/null
  printf 'apiVersion: controlplane.test/v1\nkind: SelfTest\nmetadata: {name: ok}\nspec: {min: 1, max: 2}\n' |
    "${k[@]}" -n "$ns" apply -f - >/dev/null || die "selftest: valid object rejected"
  local out
  if out=$(printf 'apiVersion: controlplane.test/v1\nkind: SelfTest\nmetadata: {name: bad}\nspec: {min: 3, max: 2}\n' |
    "${k[@]}" -n "$ns" apply -f - 2>&1); then
    die "selftest: CEL rule did not reject an invalid object"
  fi
  [[ $out == *"min must be <= max"* ]] || die "selftest: unexpected error: $out"

  if [[ -x $BIN/helm ]]; then
    log "selftest: helm"
    KUBECONFIG=$DIR/kubeconfig "$BIN/helm" version >&2
    KUBECONFIG=$DIR/kubeconfig "$BIN/helm" list -A >&2
  fi
  if [[ ${KCM:-1} != 0 ]]; then
    log "selftest: namespace deletion (namespace controller)"
    "${k[@]}" delete ns "$ns" --timeout=60s >/dev/null || die "selftest: namespace not deleted"
  fi
  log "selftest: OK in $((SECONDS - t0))s"
}

case ${1:-} in
  start | stop | status) [[ $# -eq 2 ]] || usage ;;
  selftest) [[ $# -le 2 ]] || usage ;;
  *) usage ;;
esac
case $1 in
  start) cmd_start "$2" ;;
  stop) cmd_stop "$2" ;;
  status) cmd_status "$2" ;;
  selftest) cmd_selftest "${2:-}" ;;
esac
