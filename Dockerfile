# convserve: the model server (default command) and the trainer (`python -m training ...`).
#
#   docker build -t convserve .                                    # CPU image on python:3.11-slim
#   docker build --build-arg VARIANT=cuda -t convserve:cuda .      # GPU image on NVIDIA's CUDA runtime
#   docker run -p 8000:8000 -v "$PWD/runs/default:/models:ro" convserve
#
# The server loads /models/model.safetensors (CONVSERVE_CHECKPOINT); mount a folder there or bake a
# checkpoint in with --build-arg CHECKPOINT=path/inside/context.safetensors. Every setting is a
# CONVSERVE_* environment variable. Offline or behind a firewall: scripts/container-build.sh
# (docs/deployment.md). Build arguments:
#   VARIANT          cpu | cuda
#   TORCH_INDEX_URL  extra pip index for torch, e.g. https://download.pytorch.org/whl/cpu (a CPU-only
#                    torch makes the CPU image about 5 GB smaller) or .../whl/cu130
#   EXTRAS           optional dependency groups of pyproject.toml to add (default: digits,onnx: onnx is
#                    what --runtime auto, the default, may choose on the CPU; ~140 MB)
#   CHECKPOINT       a checkpoint file in the build context to bake in as /models/model.safetensors

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim
# torch 2.14.1's Linux wheels bundle CUDA 13.0 user-space libraries; the base adds the driver glue.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04

# ---- Python on each base ----------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base-cpu

FROM ${CUDA_IMAGE} AS base-cuda
# The CUDA images carry no Python; Ubuntu 24.04's python3 (3.12) meets requires-python >= 3.11.
# DL3008 (pin apt versions): exact Ubuntu versions vanish from the archive; the base tag pins enough.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && ln -sf /usr/bin/python3 /usr/local/bin/python

# ---- dependencies: their own layer, rebuilt only when pyproject.toml changes ---------------------
# This stage is also the runtime's base: copying a multi-gigabyte venv into a fresh stage would cost
# minutes of copying and layer hashing and save nothing, since no compiler or build tool is installed
# here; the build stage below keeps pip's build-time downloads (setuptools) out of the image.
# DL3006 (untagged image): base-${VARIANT} names one of the stages above, not an image.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS deps
LABEL org.opencontainers.image.title="convserve" \
      org.opencontainers.image.description="CNN image classifier: model server and trainer" \
      org.opencontainers.image.licenses="Apache-2.0"
ARG TORCH_INDEX_URL=""
ARG EXTRAS=digits,onnx
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Fixed ids so a mounted /models can be made readable/writable from the host (chown 10001).
RUN groupadd --system --gid 10001 convserve \
 && useradd --system --uid 10001 --gid convserve --create-home --home-dir /home/convserve convserve \
 && mkdir -p /models \
 && chown convserve:convserve /models \
 && python -m venv /opt/venv
COPY pyproject.toml /tmp/pyproject.toml
# Read the dependency list straight from pyproject.toml (one source of truth) without the sources,
# so editing code does not invalidate this multi-gigabyte layer.
RUN python -c "import sys, tomllib; p = tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']; \
extras = [e for e in sys.argv[1].split(',') if e]; \
print('\n'.join(p['dependencies'] + [d for e in extras for d in p['optional-dependencies'][e]]))" \
      "$EXTRAS" > /tmp/requirements.txt \
 && /opt/venv/bin/pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
      -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt /tmp/pyproject.toml

# ---- the project as a wheel, and the optional baked-in checkpoint --------------------------------
FROM deps AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model ./model
COPY training ./training
COPY service ./service
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /out/wheels .
# COPY needs some source, so with no CHECKPOINT a harmless file is copied and dropped.
ARG CHECKPOINT=""
COPY ${CHECKPOINT:-pyproject.toml} /tmp/checkpoint
RUN mkdir -p /out/models \
 && if [ -n "$CHECKPOINT" ]; then cp /tmp/checkpoint /out/models/model.safetensors; fi

# ---- runtime ----------------------------------------------------------------------------------
FROM deps AS runtime
COPY --from=build /out/wheels /tmp/wheels
RUN /opt/venv/bin/pip install --no-deps /tmp/wheels/*.whl \
 && rm -rf /tmp/wheels \
 && /opt/venv/bin/python -c "import model, service, training"
COPY --from=build --chown=convserve:convserve /out/models/ /models/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    CONVSERVE_HOST=0.0.0.0 \
    CONVSERVE_PORT=8000 \
    CONVSERVE_CHECKPOINT=/models/model.safetensors
WORKDIR /home/convserve
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
EXPOSE 8000
# Shell form (stored as CMD-SHELL): podman's Docker API splits exec-form arguments at spaces.
# python:3.11-slim has no curl; urlopen raises on a refused connection or a non-2xx answer.
# DL3025 (JSON notation) is meant for CMD/ENTRYPOINT; hadolint applies it to HEALTHCHECK's CMD too.
# hadolint ignore=DL3025
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CONVSERVE_PORT', '8000'), timeout=4)" || exit 1
CMD ["python", "-m", "service"]
