#!/usr/bin/env bash
# Install the Debian tools that CI's deploy checks need (promtool, podman, runc, debootstrap,
# docker-compose). Idempotent: when every tool is already on PATH it returns at once, without
# touching apt, so .ci/run can call it on every run.
#   scripts/ci-tools.sh            install what is missing
#   scripts/ci-tools.sh --check    only report; exit 1 if something is missing
set -euo pipefail

# tool on PATH -> Debian package that provides it
declare -A PACKAGE_OF=(
  [promtool]=prometheus
  [prometheus]=prometheus
  [podman]=podman
  [runc]=runc
  [debootstrap]=debootstrap
  [docker-compose]=docker-compose
  [chromium]=chromium  # tests/ui (Playwright drives it; chromium-driver is not needed)
)

missing_packages=()
for tool in "${!PACKAGE_OF[@]}"; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    missing_packages+=("${PACKAGE_OF[$tool]}")
  fi
done

if [[ ${#missing_packages[@]} -eq 0 ]]; then
  echo "ci-tools: all present (promtool podman runc debootstrap docker-compose chromium)"
  exit 0
fi

# de-duplicate (prometheus provides two of the tools)
mapfile -t missing_packages < <(printf '%s\n' "${missing_packages[@]}" | sort -u)
if [[ "${1:-}" == "--check" ]]; then
  echo "ci-tools: missing packages: ${missing_packages[*]}" >&2
  exit 1
fi

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
  SUDO="sudo"
fi

echo "ci-tools: installing ${missing_packages[*]}"
export DEBIAN_FRONTEND=noninteractive
# Package lists may be absent on a fresh machine; one update is cheap compared to a failed install.
$SUDO apt-get update -qq
# --no-install-recommends keeps the prometheus package from pulling in its web assets' extras and
# podman from pulling in a full container toolchain we do not use (crun does not work here; runc does).
$SUDO apt-get install -y -qq --no-install-recommends "${missing_packages[@]}" >/dev/null
# Debian's prometheus package starts a system service on install; CI does not want one listening.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
  $SUDO systemctl stop prometheus || true
fi
echo "ci-tools: done"
