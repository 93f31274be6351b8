#!/usr/bin/env bash
# Set everything up and run the whole test suite: lint, type-check, pytest.
# Tests that need an outside tool (promtool, podman, hadolint) skip with a reason when it is missing;
# with CI set they fail instead (.ci/run installs the tools first).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff"
.venv/bin/ruff check .
echo "== mypy (model, service)"
.venv/bin/mypy
echo "== pytest"
exec .venv/bin/python -m pytest "$@"
