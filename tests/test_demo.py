"""The embedded fleet and the demo's outputs, on tiny models (the real run is `make demo`)."""

import json

import pytest

from cdcca.bench.demo import run_demo

pytestmark = pytest.mark.integration


def test_tiny_demo_writes_metrics_plots_and_report(tmp_path):
    metrics = run_demo("tiny", tmp_path, devices=2)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["summary"]["rounds"] == metrics["summary"]["rounds"] == 4
    row = saved["rounds"][0]
    for key in ("round", "device", "domain", "online_mc", "heldout_mc", "source_mc", "uploads", "bytes_up", "bytes_down"):
        assert key in row
    assert {r["device"] for r in saved["rounds"]} == {"dev-0", "dev-1"}
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in saved["rounds"])
    for name in ("domains.png", "online.png", "bytes.png", "report.html"):
        assert (tmp_path / name).stat().st_size > 0
    assert "data:image/png;base64," in (tmp_path / "report.html").read_text()


def test_a_grouped_tiny_demo_trains_one_student_per_round_and_says_where_the_time_went(tmp_path):
    metrics = run_demo("tiny", tmp_path, devices=3, group="all")
    s = metrics["summary"]
    assert s["group"] == "all" and s["settings"]["fleet group"] == "all devices share one student"
    rounds = metrics["rounds"]
    assert len(rounds) == 3 * 4 and all(r["bytes_down"] > 0 for r in rounds)
    trainers = [r for r in rounds if r["cloud_s"] >= max(x["cloud_s"] for x in rounds if x["round"] == r["round"])]
    assert {r["device"] for r in trainers} == {"dev-0"}       # the first member of the round runs the group's training
    timing = s["timing"]
    assert timing["cloud_s"] == pytest.approx(s["cloud_s_total"], abs=0.2) and timing["rounds_s"] >= timing["cloud_s"]
    assert "cloud AKD → DWC" in (tmp_path / "report.html").read_text()
