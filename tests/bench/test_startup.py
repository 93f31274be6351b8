"""`python -m bench startup`: cold start and idle RSS of the service against the baseline.

No timing assertions (a shared 2-core machine): the end-to-end run must produce a well-formed table
with both servers; the ratio arithmetic is checked on fixed numbers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench import startup

REPO = Path(__file__).resolve().parents[2]


def _run(rnd: int, server: str, cold: float, rss: float) -> dict[str, float | int | str]:
    return {"round": rnd, "server": server, "cold_start_s": cold, "idle_rss_mb": rss, "settled_s": cold + 1}


def test_ratios_are_per_round_medians() -> None:
    # round 0: service 2x the baseline; round 1: 1x; round 2: 1.2x. The median of ratios is 1.2,
    # while the ratio of the medians (12 / 10) would not see which runs were paired.
    runs = [_run(0, "baseline", 5, 100), _run(0, "service", 10, 110),
            _run(1, "baseline", 20, 100), _run(1, "service", 20, 120),
            _run(2, "baseline", 10, 100), _run(2, "service", 12, 105)]
    s = startup.summarise(runs)
    assert s["baseline"]["cold_start_x"] == 1.0
    assert s["service"]["cold_start_x"] == 1.2
    assert s["service"]["cold_start_s"] == 12
    assert s["service"]["idle_rss_x"] == 1.1
    rows = startup.table({"convnet": {"runs": runs, "summary": s}})
    assert rows[-2].startswith("| convnet | service | 3 | 12.0 | 1.20 | 13.0 | 110 | 1.10 | yes |")
    # round 0 alone: a first start, which exports and times the runtime candidate
    first = "| convnet | service, first start (round 0) | 1 | 10.0 | 2.00 | 11.0 | 110 | 1.10 | NO |"
    assert rows[-1] == first


def test_the_prepared_round_is_its_own_row_and_not_in_the_medians() -> None:
    runs = [_run(0, "baseline", 5, 100), _run(0, "service", 10, 110),
            _run(1, "baseline", 10, 100), _run(1, "service", 12, 105),
            _run(2, "baseline", 10, 100), {**_run(2, "service", 30, 200), "prepare_s": 4.5}]
    s = startup.summarise(runs, prepared=2)
    assert s["service"]["cold_start_x"] == 1.6  # rounds 0 and 1: (2.0 + 1.2) / 2
    assert s["service"]["prepared_cold_start_x"] == 3.0 and s["service"]["prepared_prepare_s"] == 4.5
    assert s["baseline"]["cold_start_s"] == 7.5  # its prepared-round start is out of the median too
    rows = startup.table({"convnet": {"runs": runs, "summary": s}})
    assert rows[-3].startswith("| convnet | service | 2 |")
    assert rows[-1] == ("| convnet | service, after `prepare` (4.5 s) | 1 | 30.0 | 3.00 | 31.0 | 200 | 2.00 "
                        "| NO |")


def test_scenario_section_flags_a_missed_target() -> None:
    results = {"scenarios": {"resnet18-640": {"servers": {
        "service": {"cold_start_s": 16.0, "idle_rss_mb": 900.0},
        "baseline": {"cold_start_s": 10.0, "idle_rss_mb": 850.0}}}}}
    row = startup.scenario_section(results)[-1]
    assert row.startswith("| resnet18-640 | 16.0 | 10.0 | 1.60 |") and row.endswith("| NO |")


def test_startup_command_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "startup.md"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "startup", "--archs", "convnet", "--rounds", "1", "--out", str(out),
         "--workdir", str(tmp_path / "work")],
        cwd=REPO, capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = out.read_text()
    assert "| convnet | service | 1 |" in text and "| convnet | service, after `prepare` (" in text
    data = json.loads(out.with_suffix(".json").read_text())["startup"]["convnet"]
    assert {r["server"] for r in data["runs"]} == {"service", "baseline"}
    for r in data["runs"]:
        assert r["cold_start_s"] > 0 and r["idle_rss_mb"] > 0 and r["settled_s"] >= r["cold_start_s"]
    (prepared,) = [r for r in data["runs"] if "prepare_s" in r]
    assert prepared["round"] == 1 and prepared["server"] == "service" and prepared["prepare_s"] > 0
