"""``cdcca bench cost``: the table's keys, on tiny random models (the numbers come from real weights)."""

import json

import torch
from typer.testing import CliRunner

from cdcca.cli.main import app

torch.set_num_threads(2)


def test_the_cost_table_has_every_row_and_key():
    result = CliRunner().invoke(app, ["bench", "cost", "--tiny", "--json", "--uploads", "4,8", "--devices", "1,2",
                                      "--per-device", "4", "--requests", "4", "--batch", "2", "--threads", "2"])
    assert result.exit_code == 0, result.output
    res = json.loads(result.stdout.strip().splitlines()[-1])
    dev, cloud = res["device"], res["cloud"]
    assert set(dev["per_request"]) == set(dev["per_batch"]) - {"batch", "per_request_ms"} == {"p50_ms", "p99_ms"}
    assert dev["peak_rss_mib"] > 0 and dev["params"]["total"] > dev["params"]["adapters"] > 0
    assert cloud["params"]["total"] > dev["params"]["total"] and res["param_ratio_cloud_to_device"] > 1
    assert [r["uploads"] for r in cloud["by_uploads"]] == [4, 8]
    assert [(r["devices"], r["group"]) for r in cloud["by_devices"]] == [(1, None), (1, "all"), (2, None), (2, "all")]
    for row in cloud["by_uploads"] + cloud["by_devices"]:
        assert row["cloud_s"] > 0 and row["bytes_up"] > 0 and row["bytes_down"] > 0, row
    for fit in ("fit_uploads", "fit_devices_each", "fit_devices_group"):
        assert set(cloud[fit]) == {"slope", "constant", "r2"}


def test_a_bad_size_fails_in_one_line():
    result = CliRunner().invoke(app, ["bench", "cost", "--tiny", "--uploads", "0"])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and said.startswith("error:") and "Traceback" not in said
