#!/usr/bin/env bash
# scripts/gpu-check.sh OUTDIR: the CUDA path end to end on a machine with an NVIDIA GPU, in at most
# 8 minutes: CUDA tests, service tests unpinned, fp32/fp16/bf16 vs CPU, AMP + channels_last training
# with a resume, serving with --device auto under traffic and a reload, the bench resnet18 scenario
# at reduced scale. Logs and summary.md land in OUTDIR (docs/gpu.md). Without a GPU it exits at once
# with status 3 and says why.
set -uo pipefail
OUT="${1:?usage: scripts/gpu-check.sh OUTDIR}"
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu-check: no NVIDIA GPU on this machine (nvidia-smi is missing or lists no device); nothing was run" >&2
  exit 3
fi
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
# The venv with the project's pinned torch (the same scripts/setup.sh every machine uses).
if ! .venv/bin/python -c 'import torch, service' >/dev/null 2>&1; then
  scripts/setup.sh > "$OUT/setup.log" 2>&1 || { echo "gpu-check: scripts/setup.sh failed; see $OUT/setup.log" >&2; exit 1; }
fi
export PYTHONPATH="$PWD"
exec timeout --signal=TERM --kill-after=10 480 .venv/bin/python scripts/gpu_check.py "$OUT"
