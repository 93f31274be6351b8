"""Load-time optimisations: batch-norm folding, batch buckets for traced models, request ids, and the
OpenMP wait policy the package sets. Numeric checks only; speed is measured by bench/, not here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from model.checkpoint import load_checkpoint
from service.middleware import RequestIds
from service.optimize import bucket, fold_batchnorm
from service.predictor import Predictor
from tests.conftest import REPO, make_checkpoint
from tests.tooling import require_tool

CONV_BN = {
    "blocks": [
        {"type": "conv", "out": 8, "kernel": 3, "padding": "same"},
        {"type": "bn"},
        {"type": "relu"},
        {"type": "maxpool", "kernel": 2},
        {"type": "conv", "out": 8, "kernel": 3, "padding": "same"},
        {"type": "bn"},
        {"type": "relu"},
    ],
    "head": {"pool": "gap"},
}


def _randomise_bn(model: nn.Module) -> None:
    """Trained-looking statistics, so folding has real work to do (fresh BN is the identity)."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))


@pytest.fixture(scope="module")
def conv_bn_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("bn") / "bn.safetensors", config=CONV_BN, size=16)


def test_fold_batchnorm_removes_every_bn_and_keeps_the_answers(conv_bn_checkpoint: Path) -> None:
    model = load_checkpoint(conv_bn_checkpoint).model
    _randomise_bn(model)
    folded, diff = fold_batchnorm(model, (3, 16, 16))
    assert folded is not model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    assert diff is not None and diff < 1e-5
    x = torch.randn(4, 3, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)


def test_fold_batchnorm_leaves_models_without_a_conv_bn_pair_alone(tiny_checkpoint: Path) -> None:
    after_relu = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)).eval()
    assert fold_batchnorm(after_relu, (3, 8, 8)) == (after_relu, None)
    plain = load_checkpoint(tiny_checkpoint).model  # no batch-norm at all
    assert fold_batchnorm(plain, (3, 32, 32)) == (plain, None)


def test_bucket_is_the_smallest_that_fits() -> None:
    buckets = [1, 2, 4, 8, 12]
    assert [bucket(n, buckets) for n in (1, 2, 3, 5, 8, 9, 12, 40)] == [1, 2, 4, 8, 8, 12, 12, 12]


def test_traced_predictor_pads_to_warmed_buckets_and_matches_eager(conv_bn_checkpoint: Path) -> None:
    cpu = torch.device("cpu")
    eager = Predictor.load(conv_bn_checkpoint, cpu, max_batch_size=8, fold_bn=False)
    traced = Predictor.load(conv_bn_checkpoint, cpu, max_batch_size=8, compile="trace")
    assert traced.folded_bn and not eager.folded_bn
    traced.warmup([1, 2, 4, 8])
    assert traced.buckets == [1, 2, 4, 8]
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=g) for _ in range(11)]
    for n in (1, 3, 5, 11):  # 3 -> 4, 5 -> 8, 11 -> 8 + 4 (larger than any bucket: run in pieces)
        got = traced.forward(images[:n])
        assert got.shape == (n, len(traced.labels))
        torch.testing.assert_close(got, eager.forward(images[:n]), rtol=1e-4, atol=1e-5)


def test_eager_predictor_runs_any_batch_size_without_padding(tiny_checkpoint: Path) -> None:
    p = Predictor.load(tiny_checkpoint, torch.device("cpu"), max_batch_size=4)
    p.warmup([1, 2, 4])
    assert p.buckets == []
    assert p.forward([torch.zeros(p.input_shape, dtype=torch.uint8)] * 3).shape == (3, len(p.labels))


def test_request_ids_are_unique_hex_of_uuid_length() -> None:
    a, b = RequestIds(), RequestIds()
    ids = [a.next() for _ in range(1000)] + [b.next() for _ in range(1000)]
    assert len(set(ids)) == 2000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def _omp_policy(env: dict[str, str]) -> str:
    code = "import service, os; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    return out.stdout.strip()


def test_the_package_sets_a_passive_openmp_wait_policy_unless_the_operator_did() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert _omp_policy(env) == "PASSIVE"
    assert _omp_policy({**env, "OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"


# One real torch.compile (inductor, with its C++ compiler) of the tiny model at one batch shape, in a
# subprocess: bounded by its timeout, and dynamo's global state (caches, recompile limit) stays out
# of the other tests. About 30 s of CPU with a cold inductor cache, 10 s with a warm one.
COMPILE_SCRIPT = """
import json, sys, torch
from pathlib import Path
from torch._dynamo.utils import counters
from service.predictor import Predictor
cpu = torch.device("cpu")
eager = Predictor.load(Path(sys.argv[1]), cpu, max_batch_size=2)
compiled = Predictor.load(Path(sys.argv[1]), cpu, max_batch_size=2, compile="compile")
compiled.warmup([2])  # the one shape: a batch of 1 is padded up to it, never compiled anew
g = torch.Generator().manual_seed(0)
images = [torch.randint(0, 256, compiled.input_shape, dtype=torch.uint8, generator=g) for _ in range(2)]
diff = max(float((compiled.forward(images[:n]) - eager.forward(images[:n])).abs().max()) for n in (1, 2, 1))
print(json.dumps({"type": type(compiled.model).__name__, "buckets": compiled.buckets, "diff": diff,
                  "counters": {k: dict(v) for k, v in counters.items()}}))
"""


@pytest.mark.slow
def test_torch_compile_builds_one_graph_and_answers_like_eager(tiny_checkpoint: Path) -> None:
    require_tool(os.environ.get("CXX", "g++"))  # inductor's CPU code generation compiles C++
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_SCRIPT, str(tiny_checkpoint)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["type"] == "OptimizedModule" and out["buckets"] == [2]
    c = out["counters"]
    assert c["frames"]["ok"] == 1 and c["stats"]["unique_graphs"] == 1, c  # batches of 1 reused it
    assert not c.get("graph_break"), c  # the whole model is one graph
    inductor = c.get("inductor", {})
    # inductor generated (or loaded from its cache) the code for exactly that one graph
    assert inductor.get("fxgraph_cache_miss", 0) + inductor.get("fxgraph_cache_hit", 0) == 1, c
    assert out["diff"] < 1e-5
