#!/usr/bin/env bash
# Build convserve's container image with podman on a machine that cannot pull from Docker Hub
# (behind a firewall, or offline with only a Debian mirror and a local pip index).
#
#   scripts/container-build.sh [build] [--tag convserve:latest] [--variant cpu] [-- PODMAN_BUILD_ARGS]
#   scripts/container-build.sh base      # only prepare the base images (debian + python stand-in)
#   scripts/container-build.sh env       # print the environment podman needs here: eval "$(...)"
#
# What it does, each step skipped when its result is already there (so a second run is fast):
#   1. writes a private containers.conf (runc, raised default ulimits) and points CONTAINERS_CONF at it;
#   2. if python:3.11-slim is not in local storage, makes a Debian base with debootstrap from the
#      apt mirror this machine already uses, and builds a stand-in tagged
#      docker.io/library/python:3.11-slim from it (Debian's python3 3.11 + pip + venv), so the
#      project's Dockerfile builds unchanged;
#   3. builds the Dockerfile with the host's pip configuration and every local folder it names
#      (find-links, file:// indexes, constraints, CA bundle) mounted read-only into the build, so pip
#      inside sees the same wheels as pip outside.
# A real python:3.11-slim (pulled earlier, or loaded with `podman load`) is used when present.
#
# Environment: CONVSERVE_IMAGE_CACHE (default ~/.cache/convserve-containers) holds containers.conf;
# DEBIAN_MIRROR overrides the mirror; PIP (default "python3 -m pip") is the pip whose config is used;
# NO_LOCAL_PIP=1 skips the pip mounts; REBUILD_BASE=1 re-creates the base images.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE_DIR="${CONVSERVE_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/convserve-containers}"
DEBIAN_BASE="localhost/debian-base:bookworm"
PYTHON_BASE="docker.io/library/python:3.11-slim"
SUITE="bookworm"

log() { printf '[container-build %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- 1. podman configuration -------------------------------------------------------------------
setup_podman_env() {
  command -v podman >/dev/null || die "podman is not installed (scripts/ci-tools.sh installs it)"
  mkdir -p "$CACHE_DIR"
  if [[ -z "${CONTAINERS_CONF:-}" ]]; then
    # crun fails on this kernel's cgroup setup and the default nofile limit is too low for pip and
    # torch; raising ulimits for the process itself is not permitted, so set them per container.
    cat >"$CACHE_DIR/containers.conf" <<'CONF'
[containers]
default_ulimits = ["nofile=10000:10000", "nproc=4096:4096"]

[engine]
runtime = "runc"
CONF
    export CONTAINERS_CONF="$CACHE_DIR/containers.conf"
  fi
}

# --- 2. base images ----------------------------------------------------------------------------
debian_mirror() {
  if [[ -n "${DEBIAN_MIRROR:-}" ]]; then echo "$DEBIAN_MIRROR"; return; fi
  local uri=""
  if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
    uri="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)"
  fi
  if [[ -z "$uri" && -f /etc/apt/sources.list ]]; then
    uri="$(awk '$1 == "deb" && $0 !~ /security/ {print $2; exit}' /etc/apt/sources.list)"
  fi
  echo "${uri:-http://deb.debian.org/debian}"
}

make_debian_base() {
  if [[ "${REBUILD_BASE:-0}" != 1 ]] && podman image exists "$DEBIAN_BASE"; then
    log "debian base $DEBIAN_BASE: cached"
    return
  fi
  command -v debootstrap >/dev/null || die "debootstrap is not installed (scripts/ci-tools.sh)"
  local mirror rootfs start=$SECONDS
  mirror="$(debian_mirror)"
  rootfs="$(mktemp -d /var/tmp/convserve-rootfs.XXXXXX)"
  log "debootstrap $SUITE from $mirror (about 30 s)"
  debootstrap --variant=minbase "$SUITE" "$rootfs" "$mirror" >"$CACHE_DIR/debootstrap.log" 2>&1 \
    || { rm -rf "$rootfs"; die "debootstrap failed; see $CACHE_DIR/debootstrap.log"; }
  tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$DEBIAN_BASE" >/dev/null 2>>"$CACHE_DIR/debootstrap.log"
  rm -rf "$rootfs"
  log "debian base $DEBIAN_BASE: imported in $((SECONDS - start)) s"
}

make_python_base() {
  if [[ "${REBUILD_BASE:-0}" != 1 ]] && podman image exists "$PYTHON_BASE"; then
    log "python base $PYTHON_BASE: present"
    return
  fi
  make_debian_base
  local ctx start=$SECONDS
  ctx="$(mktemp -d)"
  # pip inside the image verifies TLS against this bundle; the host's may carry a proxy's CA.
  cp /etc/ssl/certs/ca-certificates.crt "$ctx/ca-certificates.crt"
  # Mirrors what python:3.11-slim offers: python/python3/pip on PATH, venv, CA certificates, and
  # no PEP 668 marker (the official image has none either).
  cat >"$ctx/Containerfile" <<EOF
FROM $DEBIAN_BASE
RUN apt-get update \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \\
      python3 python3-pip python3-venv ca-certificates \\
 && rm -rf /var/lib/apt/lists/* /usr/lib/python3.11/EXTERNALLY-MANAGED \\
 && ln -sf /usr/bin/python3 /usr/local/bin/python \\
 && ln -sf /usr/bin/python3 /usr/local/bin/python3 \\
 && ln -sf /usr/bin/pip3 /usr/local/bin/pip
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ENV LANG=C.UTF-8
CMD ["python3"]
EOF
  log "building the stand-in $PYTHON_BASE from $DEBIAN_BASE"
  podman build --network host --format docker -t "$PYTHON_BASE" -f "$ctx/Containerfile" "$ctx" \
    >"$CACHE_DIR/python-base.log" 2>&1 \
    || { rm -rf "$ctx"; die "stand-in build failed; see $CACHE_DIR/python-base.log"; }
  rm -rf "$ctx"
  log "python base $PYTHON_BASE: built in $((SECONDS - start)) s"
}

# --- 3. pip configuration for the build ---------------------------------------------------------
# Writes a merged pip.conf (environment > config files, as pip itself ranks them) to $1 and prints
# one podman "-v PATH:PATH:ro" pair per local file or folder that the configuration names.
pip_mounts() {
  local conf="$1" pip_cmd="${PIP:-python3 -m pip}"
  # shellcheck disable=SC2086  # PIP may be a command with arguments
  $pip_cmd config list 2>/dev/null | python3 -c '
import os, re, shlex, sys
settings = {}          # (section, key) -> value
ranked = []
for line in sys.stdin:
    m = re.match(r"^(:env:|[\w-]+)\.([\w-]+)=(.*)$", line.strip())
    if not m:
        continue
    scope, key, value = m.groups()
    value = shlex.split(value)[0] if value else ""
    section = "global" if scope == ":env:" else scope
    # environment variables outrank the files; among files the later line wins
    rank = 1 if scope == ":env:" else 0
    ranked.append((rank, section, key, value))
for rank, section, key, value in sorted(ranked, key=lambda r: r[0]):
    settings[(section, key)] = value
conf_path = sys.argv[1]
with open(conf_path, "w") as f:
    for section in sorted({s for s, _ in settings}):
        f.write(f"[{section}]\n")
        for (s, key), value in sorted(settings.items()):
            if s == section:
                f.write(f"{key} = {value}\n")
paths = set()
for value in settings.values():
    for word in value.split():
        is_index = word.startswith("file://")
        word = os.path.realpath(word.removeprefix("file://")) if word.startswith(("/", "file:")) else ""
        # a local PEP 503 index (DIR/simple/...) links to its files as ../../files: mount DIR
        if is_index and os.path.basename(word) == "simple":
            word = os.path.dirname(word)
        if word and os.path.exists(word):
            paths.add(word)
for p in sorted(paths):
    print(f"{p}:{p}:ro")
' "$conf"
}

# --- commands ----------------------------------------------------------------------------------
cmd_build() {
  local tag="convserve:latest" variant="cpu" dockerfile="$REPO_ROOT/Dockerfile"
  local extra=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --tag) tag="$2"; shift 2 ;;
      --variant) variant="$2"; shift 2 ;;
      --file) dockerfile="$2"; shift 2 ;;
      --) shift; extra=("$@"); break ;;
      *) die "unknown option $1 (see the header of $0)" ;;
    esac
  done
  local start=$SECONDS
  make_python_base
  local mounts=() conf
  conf="$CACHE_DIR/pip.conf"
  if [[ "${NO_LOCAL_PIP:-0}" != 1 ]]; then
    local path
    while IFS= read -r path; do
      mounts+=(-v "$path")
    done < <(pip_mounts "$conf")
    mounts+=(-v "$conf:/etc/pip.conf:ro")
    log "pip inside the build uses $conf and $((${#mounts[@]} / 2)) read-only mounts"
  fi
  log "podman build -t $tag (variant $variant)"
  local build_start=$SECONDS
  # Elapsed seconds on each step line show where a slow build spends its time.
  podman build --network host --format docker --build-arg "VARIANT=$variant" \
    "${mounts[@]}" -t "$tag" -f "$dockerfile" "${extra[@]}" "$REPO_ROOT" 2>&1 \
    | while IFS= read -r line; do
        case "$line" in
          *" STEP "*|*" COMMIT "*) printf '[+%4d s] %s\n' $((SECONDS - build_start)) "$line" ;;
          *) printf '%s\n' "$line" ;;
        esac
      done
  log "image $tag built in $((SECONDS - build_start)) s (total $((SECONDS - start)) s)"
  # Earlier builds of this Dockerfile leave untagged images behind (a 6 GB dependency layer each
  # time pyproject.toml changes); remove those, and only those.
  podman image prune -f --filter label=org.opencontainers.image.title=convserve >/dev/null || true
}

main() {
  local cmd="build"
  if [[ $# -gt 0 && "$1" != -* ]]; then cmd="$1"; shift; fi
  setup_podman_env
  case "$cmd" in
    build) cmd_build "$@" ;;
    base) make_python_base ;;
    env) echo "export CONTAINERS_CONF=$(printf '%q' "$CONTAINERS_CONF")" ;;
    *) die "unknown command $cmd: build, base or env" ;;
  esac
}

main "$@"
