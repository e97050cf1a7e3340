"""The run report reads like a results page: a headline with the numbers, a side-by-side table, rounded values."""

import json
import re

from cdcca.bench.report import headline, write_report

DOMAINS = ["pixelate:5", "gaussian_blur:5"]


def metrics():
    rounds = []
    for r, dom in enumerate(DOMAINS):
        rounds.append({"round": r, "device": "dev-0", "domain": dom, "online_mc": 0.7 + 0.01 * r, "step": 0, "visit": 0,
                       "source_only_online_mc": 0.69 + 0.06 * r,
                       "heldout": {d: 0.8 + 0.02 * r for d in DOMAINS}, "heldout_mc": 0.8 + 0.02 * r,
                       "source_mc": 0.995, "uploads": 64, "bytes_up": 2_000_000, "bytes_down": 300_000,
                       "cloud_s": 30.25, "wall_s": 60.0})
    summary = {"source_only_mc": 0.7687499999999999, "adapted_mc": 0.8225, "source_mc_before": 1.0, "source_mc_after": 0.995,
               "source_only": {"pixelate:5": 0.705, "gaussian_blur:5": 0.8325, "clean": 1.0},
               "adapted": {"pixelate:5": 0.80, "gaussian_blur:5": 0.845, "clean": 0.995},
               "teacher": {"pixelate:5": 0.85, "gaussian_blur:5": 0.86, "clean": 0.92},
               "online_mc": 0.845, "source_only_online_mc": 0.772, "recovery": [0.75, 0.86, 0.9],
               "source_only_recovery": [0.77, 0.77, 0.78],
               "bytes_up_total": 4_000_000, "bytes_down_total": 600_000, "rounds": 2, "stream": ",".join(DOMAINS), "domains": DOMAINS,
               "settings": {"preset": "quick", "downlink (DWC)": "int8, budget 256 KiB"}, "wall_s": 123.4}
    return {"rounds": rounds, "summary": summary}


def test_headline_leads_with_what_users_got_then_held_out_then_cost():
    text = headline(metrics()["summary"])
    assert text.startswith("Users got 84.5 % right answers instead of 77.2 % (+7.3 points)")
    assert "-2.0 / +9.0 / +12.0 points" in text and "by round 2 of a domain" in text
    assert "76.9 %" in text and "82.2 %" in text and "+5.4 points" in text and "pixelate:5 → gaussian_blur:5" in text
    assert "100.0 % → 99.5 %" in text and "1953 KiB up" in text and "293 KiB down" in text


def test_report_is_self_contained_with_rounded_numbers(tmp_path):
    write_report(tmp_path, metrics())
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "http" not in page.replace("http-equiv", "")
    assert "0.7687499999999999" not in page                    # no raw floats on the page
    for heading in ("side by side", "Per-domain accuracy over rounds", "Online accuracy", "Recovery after a shift",
                    "Settings", "Every round"):
        assert heading in page
    assert re.search(r"cloud teacher.*oracle|cloud teacher", page)
    assert "mean of shifted" in page and "76.9 %" in page      # mean of source-only over the shifted domains
    assert json.loads((tmp_path / "metrics.json").read_text())["summary"]["adapted_mc"] == 0.8225


def test_tiny_run_without_accuracy_says_so(tmp_path):
    m = metrics()
    m["summary"].update(source_only_mc=float("nan"), adapted_mc=float("nan"), source_only={}, adapted={}, teacher={})
    write_report(tmp_path, m)
    assert "not measured" in (tmp_path / "report.html").read_text()
