"""`python -m bench soak`'s report: growth under load and once idle, each against the 50 MB target
(fixed numbers; the soak itself runs for minutes and is a benchmark, not a test)."""

from __future__ import annotations

from bench import soak


def test_render_judges_both_readings_in_megabytes() -> None:
    res = {"requests": 20000, "errors": 0, "rps": 900.0, "idle_rss_mb": 700.0, "final_rss_mb": 748.5,
           "peak_rss_mb": 760.0, "growth_from_idle_mb": 48.5, "growth_after_warm_mb": 10.0,
           "slope_mb_per_10k": 0.1, "idle_after_rss_mb": 705.0, "growth_once_idle_mb": 5.0,
           "samples": [(0, 700.0), (20000, 748.5)], "concurrencies": [16, 64]}
    row = next(ln for ln in soak.render(res, "convnet", "cmd").splitlines() if ln.startswith("| 20000"))
    # 48.5 MiB is 50.9 MB: over the target under load; 5 MiB once idle is under it
    assert row.endswith("| 48.5 | 10.0 | 0.1 | NO | 705 | 5.0 | yes |"), row
    res["errors"] = 1
    row = next(ln for ln in soak.render(res, "convnet", "cmd").splitlines() if ln.startswith("| 20000"))
    assert row.endswith("| NO |")  # an error fails it either way
