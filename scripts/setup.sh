#!/usr/bin/env bash
# Create .venv and install convserve into it (editable, with the dev tools). Fast when nothing changed:
# a stamp of pyproject.toml's hash skips pip on the second run.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -m venv .venv 2>/dev/null; then
    # Debian ships venv separately; install it when we are allowed to.
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
      rm -rf .venv && "$PY" -m venv .venv
    else
      echo "error: '$PY -m venv' failed; install python3-venv (sudo apt-get install python3-venv)" >&2
      exit 1
    fi
  fi
fi

stamp=.venv/.convserve-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "Installing convserve and its dependencies into .venv (torch is large: about a minute)..."
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[dev]"
  echo "$want" > "$stamp"
fi
# Bytecode for the project's own packages, as an installed wheel has it: an editable install has
# none, and with PYTHONDONTWRITEBYTECODE set Python would compile every module at every start
# (a few hundred ms of the service's cold start). Only changed files are recompiled.
.venv/bin/python -m compileall -q model service training bench >/dev/null
