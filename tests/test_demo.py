"""The embedded fleet and the demo's outputs, on tiny models (the real run is `make demo`)."""

import json

import pytest

from cdcca.demo import run_demo

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
