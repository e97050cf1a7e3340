"""The embedded fleet and the demo's outputs, on tiny models (the real run is `make demo`)."""

import json

import pytest

from cdcca.bench.demo import run_demo
from cdcca.config import resolve

pytestmark = pytest.mark.integration


def test_tiny_demo_writes_metrics_plots_and_report(tmp_path):
    metrics = run_demo(resolve("tiny", sets=["fleet.devices=2"]), tmp_path, "tiny")
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
    metrics = run_demo(resolve("tiny", sets=["fleet.devices=3", "fleet.group=all"]), tmp_path, "tiny")
    s = metrics["summary"]
    assert s["group"] == "all" and s["settings"]["fleet group"] == "all devices share one student"
    rounds = metrics["rounds"]
    assert len(rounds) == 3 * 4 and all(r["bytes_down"] > 0 for r in rounds)
    trainers = [r for r in rounds if r["cloud_s"] >= max(x["cloud_s"] for x in rounds if x["round"] == r["round"])]
    assert {r["device"] for r in trainers} == {"dev-0"}       # the first member of the round runs the group's training
    timing = s["timing"]
    assert timing["cloud_s"] == pytest.approx(s["cloud_s_total"], abs=0.2) and timing["rounds_s"] >= timing["cloud_s"]
    assert "cloud AKD → DWC" in (tmp_path / "report.html").read_text()


@pytest.mark.parametrize("devices", [1, 2])
def test_the_live_table_fits_80_columns_with_whole_headers_and_file_stems(devices):
    from rich.console import Console

    from cdcca.bench.demo import _table

    rows = [{"round": r, "device": f"dev-{d}", "domain": "/data/users/night-shift.jsonl" if r else "gaussian_blur:5",
             "online_mc": 0.8125, "source_only_online_mc": 0.75, "heldout_mc": 0.8 if r else None, "source_mc": 1.0,
             "bytes_up": 1_483_000, "bytes_down": 259_000, "wall_s": 123.0} for r in range(12) for d in range(devices)]
    console = Console(width=80, record=True)
    console.print(_table(rows, "cdcca demo"))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text
    assert "night-shift " in text and "/data/users" not in text
    for header in ("online", "src-only", "heldout", "clean", "KiB up", "KiB dn"):
        assert header in text


def test_a_teacher_behind_the_device_is_named_before_the_stream_starts():
    from rich.console import Console

    from cdcca.bench.demo import warn_weak_teacher
    from cdcca.data.stream import Domain

    domains = [Domain("pixelate", 5), Domain("jpeg", 5)]
    device = {"pixelate:5": 0.80, "jpeg:5": 0.74, "clean:0": 1.0}
    for teacher, warned in [({"pixelate:5": 0.70, "jpeg:5": 0.77}, True), ({"pixelate:5": 0.92, "jpeg:5": 0.90}, False)]:
        console = Console(record=True, width=200)
        warn_weak_teacher(teacher, device, domains, console)
        text = console.export_text()
        assert ("3.5 points behind the device" in text) == warned, text
