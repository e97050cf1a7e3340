"""The command line as a user meets it: a version, and one-line errors instead of tracebacks."""

from typer.testing import CliRunner

import cdcca
from cdcca.cli import app


def test_version_prints_the_package_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"cdcca {cdcca.__version__}"


def test_bench_akd_rejects_an_unknown_setting_before_any_heavy_work():
    result = CliRunner().invoke(app, ["bench", "akd", "--variants", "cdcca", "--set", "akd.nope=1"])
    assert result.exit_code != 0
    assert "akd.nope" in result.output and "Traceback" not in result.output


def test_bench_dwc_names_an_unknown_setting_before_loading_anything(tmp_path):
    result = CliRunner().invoke(app, ["bench", "dwc", "--states", str(tmp_path), "--settings", "int9:1K"])
    assert result.exit_code != 0 and "int9:1K" in result.output and "int8:256K" in result.output
