"""Load-time optimisations: batch-norm folding, batch buckets for traced models, request ids, and the
OpenMP wait policy the package sets. Numeric checks only; speed is measured by bench/, not here."""

from __future__ import annotations

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
