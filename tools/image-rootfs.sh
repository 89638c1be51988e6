#!/usr/bin/env bash
# The image's root filesystem: the given binaries in /usr/local/bin plus exactly
# the shared libraries `ldd` reports for them (and the dynamic loader), an
# /etc/passwd and /etc/group naming the non-root user 65532, the system CA
# bundle, an empty /tmp (a mount point), nothing else.
# Used by the Dockerfile's runtime stage and by the test cluster's pod agent
# (tools/pod-agent), so what runs in tests is what ships.
#
#   tools/image-rootfs.sh [--dockerfile FILE] OUT BINARY...
#
# Writes OUT/rootfs/. With --dockerfile, also OUT/image.json: the image config
# (Entrypoint, Cmd, Env, User, WorkingDir) read from the last stage of FILE
# (JSON-form ENTRYPOINT/CMD, `ENV K=V`, USER, WORKDIR), as the pod agent takes it.
set -euo pipefail
dockerfile=
if [[ ${1:-} == --dockerfile ]]; then dockerfile=$2; shift 2; fi
out=${1:?usage: image-rootfs.sh [--dockerfile FILE] OUT BINARY...}
shift
[[ $# -gt 0 ]] || { echo "image-rootfs: no binaries given" >&2; exit 2; }

root=$out/rootfs
rm -rf "$root.tmp"
mkdir -p "$root.tmp/usr/local/bin" "$root.tmp/etc" "$root.tmp/tmp"
chmod 1777 "$root.tmp/tmp"

# copy_lib PATH: the file at the same path inside the root (symlinks resolved)
copy_lib() {
  local src=$1 dst=$root.tmp$1
  [[ -e $dst ]] && return 0
  mkdir -p "$(dirname "$dst")"
  cp -L "$src" "$dst"
}

for bin in "$@"; do
  [[ -x $bin ]] || { echo "image-rootfs: $bin is not an executable file" >&2; exit 1; }
  install -m 0755 "$bin" "$root.tmp/usr/local/bin/$(basename "$bin")"
  # `ldd` lines: "libx.so => /path (0x…)", "/lib64/ld-linux-x86-64.so.2 (0x…)",
  # "linux-vdso.so.1 (0x…)" (in the kernel, nothing to copy), or "statically linked".
  while read -r line; do
    case $line in
      *"=> not found"*) echo "image-rootfs: $bin: $line" >&2; exit 1 ;;
      *"=> /"*) p=${line#*=> }; copy_lib "${p%% (*}" ;;
      /*) copy_lib "${line%% (*}" ;;
    esac
  done < <(ldd "$bin" 2>/dev/null || true)
done

# The CA bundle (reqwest's rustls verifier reads the system's roots for HTTPS
# to postcodes.io), as the distroless base image had it.
if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
  mkdir -p "$root.tmp/etc/ssl/certs"
  cp /etc/ssl/certs/ca-certificates.crt "$root.tmp/etc/ssl/certs/"
fi
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$root.tmp/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$root.tmp/etc/group"

rm -rf "$root"
mv "$root.tmp" "$root"

if [[ -z $dockerfile ]]; then
  echo '{"Entrypoint": null, "Cmd": null, "User": "", "WorkingDir": "", "Env": []}' >"$out/image.json"
else
  # The last stage: everything after the last FROM.
  awk '
    function jstr(s) { gsub(/\\/, "\\\\", s); gsub(/"/, "\\\"", s); return "\"" s "\"" }
    /^FROM / { ep = "null"; cmd = "null"; user = ""; wd = ""; nenv = 0; next }
    /^ENTRYPOINT \[/ { ep = substr($0, 12); next }
    /^CMD \[/ { cmd = substr($0, 5); next }
    /^USER / { user = $2; next }
    /^WORKDIR / { wd = $2; next }
    /^ENV [^ =]+=/ { for (i = 2; i <= NF; i++) env[++nenv] = $i; next }
    END {
      printf "{\"Entrypoint\": %s, \"Cmd\": %s, \"User\": %s, \"WorkingDir\": %s, \"Env\": [", ep, cmd, jstr(user), jstr(wd)
      for (i = 1; i <= nenv; i++) printf "%s%s", (i > 1 ? ", " : ""), jstr(env[i])
      print "]}"
    }' "$dockerfile" >"$out/image.json"
fi
