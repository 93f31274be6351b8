"""`bench trees`: the per-round ratios and the report (no servers, no timing)."""

from __future__ import annotations

from bench.loadgen import LoadResult
from bench.trees import key_of, render, summarise


def _r(rps: float, p50: float, errors: int = 0) -> LoadResult:
    return LoadResult(1, 100, errors, 1.0, rps, p50, p50, p50, 0.1)


def test_ratios_are_medians_of_each_rounds_own_ratio() -> None:
    runs = {"before": [_r(100, 4.0), _r(200, 8.0), _r(90, 3.0)],
            "after": [_r(120, 3.0), _r(210, 6.0), _r(99, 3.3)],
            "baseline": [_r(50, 2.0), _r(100, 4.0), _r(45, 3.0)]}
    rows = summarise(runs, key_of(32))
    assert rows["after"]["per_round"] == [120, 210, 99]
    assert rows["after"]["vs_first"] == 1.1  # 1.2, 1.05, 1.1: the median, not 210/200 or 143/130
    assert rows["before"]["vs_first"] == 1.0 and rows["after"]["vs_baseline"] == 2.2
    lone = summarise(runs, key_of(1))
    assert lone["after"]["median"] == 3.3 and lone["after"]["vs_first"] == 0.75  # 0.75, 0.75, 1.1
    text = render({"servers": list(runs), "rounds": 3, "rows": {1: lone, 32: rows}}, "convnet, small64",
                  "python -m bench trees --out x.md", {"cpu": "AMD EPYC", "cores": 2})
    assert "| 32 | after | 120.00 | 2.200 | 1.100 | 120.0, 210.0, 99.0 | 0 |" in text
    assert "| 1 | after | 3.30 | 1.500 | 0.750 | 3.00, 6.00, 3.30 | 0 |" in text  # 1.5, 1.5, 1.1
    assert "x before" in text and "AMD EPYC, 2 cores" in text
