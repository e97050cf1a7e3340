"""The command line as a user meets it: a version, and one-line errors instead of tracebacks."""

import json

import pytest
from typer.testing import CliRunner

import cdcca
from cdcca.cli.main import app


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


def test_the_teacher_recipes_refuse_the_device_and_a_missing_init_in_one_line(tmp_path):
    for recipe in ("consistency", "targets", "readout"):
        result = CliRunner().invoke(app, ["pretrain", "--role", "device", "--recipe", recipe])
        said = " ".join(result.output.split())
        assert result.exit_code != 0 and f"--recipe {recipe}" in said and "--role cloud" in said
    result = CliRunner().invoke(app, ["pretrain", "--role", "cloud", "--recipe", "targets", "--init",
                                      str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "out")])
    said = " ".join(result.output.split())
    assert result.exit_code != 0 and "does not exist" in said and "Traceback" not in said
    assert not (tmp_path / "out").exists()                          # nothing written


@pytest.mark.parametrize("recipe, flag, value", [
    ("readout", "--steps", "5"), ("readout", "--aug-family", "fog"), ("consistency", "--aug-share", "0.5"),
    ("targets", "--aug-family", "fog"), ("end-to-end", "--split-layer", "20"), ("consistency", "--target-images", "8"),
])
def test_pretrain_refuses_in_one_line_a_flag_the_recipe_does_not_use(tmp_path, recipe, flag, value):
    result = CliRunner().invoke(app, ["pretrain", "--role", "cloud", "--recipe", recipe, flag, value,
                                      "--out", str(tmp_path / "out")])
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and f"{flag} is not used by --recipe {recipe}" in said and "Traceback" not in said
    assert not (tmp_path / "out").exists()


def test_pretrain_help_states_each_recipes_own_defaults():
    """The help the options declare (the console wraps it) against the recipes' configs."""
    import inspect

    from cdcca.cli.pretrain import pretrain
    from cdcca.recipes.consistency import ConsistencyConfig
    from cdcca.recipes.pretrain import PretrainConfig
    from cdcca.recipes.readout import ReadoutConfig

    def sci(x: float) -> str:
        return f"{x:.0e}".replace("e-0", "e-")        # 0.0003 → 3e-4, as the help writes it

    helps = {name: p.default.help for name, p in inspect.signature(pretrain).parameters.items()
             if p.default is not None}                   # --set carries its help in its annotation
    targets = ConsistencyConfig.for_targets("key")
    assert f"end-to-end {sci(PretrainConfig().lr)}, consistency {sci(ConsistencyConfig().lr)}, targets {sci(targets.lr)}, " \
           f"readout {sci(ReadoutConfig().lr)}" in helps["lr"]
    assert f"end-to-end device {PretrainConfig().steps}, cloud {PretrainConfig.for_role('cloud').steps}; " \
           f"consistency {ConsistencyConfig().steps}; targets {targets.steps}" in helps["steps"]
    assert f"readout {ReadoutConfig().aug_share:g}" in helps["aug_share"]


def test_a_cloud_state_remembers_it_was_created_tiny_and_refuses_the_other_kind(tmp_path):
    from cdcca.runtime.cloud import remembered_tiny

    assert remembered_tiny(tmp_path, True) is True
    assert remembered_tiny(tmp_path, None) is True                 # no --tiny needed afterwards
    result = CliRunner().invoke(app, ["cloud", "resync", "--state", str(tmp_path), "--device", "d", "--out",
                                      str(tmp_path / "r.pkt"), "--no-tiny"])
    said = " ".join(result.output.split())                          # the console wraps long lines
    assert result.exit_code == 2 and "created with tiny models" in said and "Traceback" not in said


def test_an_operator_assigns_fleet_groups_without_loading_a_model(tmp_path):
    import json

    def group(*args):
        return CliRunner().invoke(app, ["cloud", "group", "--state", str(tmp_path), *args])

    assert json.loads(group("--device", "cam-1", "--group", "site-a").output) == {"cam-1": "site-a"}
    assert json.loads(group("--device", "cam-2", "--group", "site-a").output) == {"cam-1": "site-a", "cam-2": "site-a"}
    assert json.loads(group("--device", "cam-1", "--leave").output) == {"cam-2": "site-a"}
    assert json.loads(group().output) == {"cam-2": "site-a"}
    for bad in (["--device", "cam-1"], ["--device", "cam-1", "--group", "x", "--leave"]):
        result = group(*bad)
        assert result.exit_code != 0 and "exactly one of --group NAME or --leave" in " ".join(result.output.split())
    result = group("--device", "../cam", "--group", "site-a")
    assert result.exit_code != 0 and "not a plain name" in " ".join(result.output.split()) and "Traceback" not in result.output
    from cdcca.runtime.cloud_db import group_registry
    assert group_registry(tmp_path).members("site-a") == ["cam-2"]            # what the cloud runtime reads


def test_read_out_settings_are_checked_before_anything_is_loaded_or_written(tmp_path):
    init = tmp_path / "cloud.safetensors"
    init.write_bytes(b"not read")
    result = CliRunner().invoke(app, ["pretrain", "--role", "cloud", "--recipe", "readout", "--init", str(init),
                                      "--readout-samples", "0", "--out", str(tmp_path / "out")])
    said = " ".join(result.output.split())
    assert result.exit_code != 0 and "must be positive" in said and "Traceback" not in said
    assert not (tmp_path / "out").exists()


def test_a_continued_stage_is_up_to_date_only_for_the_same_config_and_the_same_start(tmp_path):
    from cdcca.cli.pretrain_stages import up_to_date
    from cdcca.recipes.checkpoint import file_sha256

    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    first.write_bytes(b"one start")
    second.write_bytes(b"another start")
    (tmp_path / "cloud.json").write_text(json.dumps({"digest": "d1", "init_sha256": file_sha256(first)}))
    assert up_to_date("cloud", tmp_path, "d1", False, first)
    assert not up_to_date("cloud", tmp_path, "d1", False, second)      # same config from other weights: retrain
    assert not up_to_date("cloud", tmp_path, "d2", False, first)
    assert not up_to_date("cloud", tmp_path, "d1", True, first)        # --force


def test_a_bad_scenario_or_delay_fails_in_one_line_before_any_model_loads():
    cases = [(["demo", "--scenario", "forever"], "unknown scenario 'forever'"),
             (["demo", "--update-delay", "-1"], "stream.update_delay must be a whole number of rounds ≥ 0"),
             (["bench", "akd", "--variants", "cdcca", "--scenario", "one-round", "--rounds-per-domain", "3"], "one-round"),
             (["bench", "paper", "--methods", "cdcca,magic"], "unknown method(s) magic")]
    for args, message in cases:
        result = CliRunner().invoke(app, args)
        said = " ".join(result.output.split())
        assert result.exit_code == 2 and message in said and "Traceback" not in result.output, args
