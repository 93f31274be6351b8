"""Learning-rate schedules and the evaluation arithmetic, against hand-computed values."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from training.engine import EvalResult, evaluate
from training.schedule import LRSchedule


def _sched(kind: str, **kw: float) -> LRSchedule:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    return LRSchedule(opt, kind, peak_lr=1.0, steps_per_epoch=10, epochs=4, **kw)  # type: ignore[arg-type]


def test_warmup_then_cosine_to_zero() -> None:
    s = _sched("cosine", warmup_epochs=1)
    assert s.lr == pytest.approx(0.1)  # warm-up starts at a tenth
    for _ in range(10):
        s.step()
    assert s.lr == pytest.approx(1.0)  # peak at the end of warm-up
    for _ in range(15):
        s.step()
    assert s.lr == pytest.approx(0.5)  # half-way through the cosine
    assert s.optimizer.param_groups[0]["lr"] == pytest.approx(0.5)
    for _ in range(15):
        s.step()
    assert s.lr == pytest.approx(0.0, abs=1e-12)


def test_step_and_plateau() -> None:
    s = _sched("step", step_size=2, gamma=0.1)
    for _ in range(20):
        s.step()
    assert s.lr == pytest.approx(0.1)
    p = _sched("plateau", plateau_patience=1, gamma=0.5)
    for metric in (0.5, 0.6, 0.6, 0.6):  # two epochs without improvement > patience 1
        p.epoch_end(metric)
    assert p.lr == pytest.approx(0.5)
    restored = _sched("plateau")
    restored.load_state_dict(p.state_dict())
    assert restored.lr == p.lr and restored.best == 0.6


def test_eval_result_per_class_metrics() -> None:
    # true 0: 3 right, 1 called 1; true 1: 2 right; true 2: 1 called 0
    r = EvalResult(torch.tensor([[3, 1, 0], [0, 2, 0], [1, 0, 0]]), loss_sum=7.0, top5_correct=7)
    assert r.count == 7 and r.accuracy == pytest.approx(5 / 7) and r.loss == pytest.approx(1.0)
    rows = r.per_class()
    assert rows[0] == pytest.approx({"precision": 0.75, "recall": 0.75, "f1": 0.75, "support": 4})
    assert rows[1]["precision"] == pytest.approx(2 / 3) and rows[1]["recall"] == 1.0
    assert rows[2] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_evaluate_counts_top1_top5_and_confusion() -> None:
    logits = torch.tensor([[9.0, 1, 0, 0, 0, 0, 0], [0, 9.0, 8, 0, 0, 0, 0], [5.0, 4, 3, 2, 1, 0, -1]])
    targets = torch.tensor([0, 2, 6])

    class Fixed(nn.Module):
        def forward(self, i: torch.Tensor) -> torch.Tensor:
            return logits[i.long().view(-1)]

    loader = DataLoader(TensorDataset(torch.arange(3).float().view(3, 1), targets), batch_size=2)
    r = evaluate(Fixed(), loader, torch.device("cpu"), num_classes=7)
    assert r.accuracy == pytest.approx(1 / 3)
    assert r.top5 == pytest.approx(2 / 3)  # sample 3's class ranks last of seven
    assert r.confusion[2, 1] == 1 and r.confusion[6, 0] == 1 and r.confusion.sum() == 3
    expected = nn.functional.cross_entropy(logits, targets, reduction="sum").item()
    assert r.loss_sum == pytest.approx(expected)


def test_gradient_clipping_bounds_the_step() -> None:
    from training.engine import train_one_epoch

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    opt = torch.optim.SGD(model.parameters(), lr=1.0)  # plain SGD: the step is exactly lr * gradient
    loader = DataLoader(TensorDataset(torch.randn(8, 4) * 100, torch.randint(0, 3, (8,))), batch_size=8)
    sched = LRSchedule(opt, "constant", 1.0, steps_per_epoch=1, epochs=1)
    cpu = torch.device("cpu")
    stats = train_one_epoch(model, loader, nn.CrossEntropyLoss(), opt, sched, cpu, grad_clip=0.01)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert stats.count == 8
    assert (after - before).norm().item() == pytest.approx(0.01, rel=1e-4)
