"""Run configs as data: the presets are the TOML files in configs/, and a run's printed config runs again."""

import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cdcca.bench import paper
from cdcca.bench.run_config import config_toml, fleet_config, resolve_run_config
from cdcca.cli.main import app
from cdcca.data.scenario import STREAM_BUDGET
from cdcca.presets import CONFIG_DIR, load_preset, preset_names

CONFIGS = Path(__file__).resolve().parents[1] / "configs"      # what a fresh clone shows at its root


def test_a_preset_file_resolves_to_exactly_the_presets_run_config():
    for name in ("quick", "paper", "tiny"):
        by_file, _ = resolve_run_config(config=CONFIGS / f"{name}.toml")
        by_name, label = resolve_run_config(preset=name)
        assert by_file == by_name and label == name


def test_the_files_keep_the_presets_that_were_written_in_code():
    """The in-code table (fleet/local.py's FLEET_PRESETS, until it reads these files) and the files agree."""
    from cdcca.fleet.local import FLEET_PRESETS, preset_config

    assert set(preset_names()) == set(FLEET_PRESETS)
    for name in FLEET_PRESETS:
        assert fleet_config(load_preset(name)) == preset_config(name)
    assert load_preset("quick")["uts"]["budget"] == STREAM_BUDGET
    assert {p["budget"] for p in paper.PRESETS.values()} == {STREAM_BUDGET}


def test_the_printed_config_of_a_run_is_a_config_that_runs_again():
    cfg, _ = resolve_run_config(preset="quick", overrides={
        "devices": 3, "group": "all", "akd": {"labels": {"epochs": 3, "betas": [0.8, 0.9]}}, "dwc": {"energy": 0.9}})
    assert (cfg.akd.labels.epochs, cfg.akd.prefix.epochs, cfg.uts.budget) == (3, 15, STREAM_BUDGET)
    assert fleet_config(tomllib.loads(config_toml(cfg))) == cfg
    for name in preset_names():
        cfg = fleet_config(load_preset(name))
        assert fleet_config(tomllib.loads(config_toml(cfg))) == cfg


def test_demo_takes_a_config_file_and_prints_the_resolved_settings_without_running():
    run = CliRunner().invoke
    by_file = run(app, ["demo", "--config", str(CONFIGS / "quick.toml"), "--print-config"])
    by_name = run(app, ["demo", "--preset", "quick", "--print-config"])
    assert by_file.exit_code == 0 and by_file.output == by_name.output
    assert 'scenario = "recurring"' in run(app, ["demo", "--scenario", "recurring", "--print-config"]).output
    both = run(app, ["demo", "--preset", "quick", "--config", str(CONFIGS / "quick.toml"), "--print-config"])
    assert both.exit_code != 0 and "not both" in both.output


def test_an_unknown_setting_is_named(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[akd.prefix]\nepoch = 3\n")
    with pytest.raises(ValueError, match=r"'akd\.prefix\.epoch'"):
        resolve_run_config(config=bad)


def test_the_paper_benchmark_takes_its_preset_from_a_file(tmp_path):
    assert paper.paper_preset(str(CONFIGS / "bench-paper" / "full.toml")) == paper.PRESETS["full"]
    assert paper.plan(str(CONFIGS / "bench-paper" / "quick.toml"), [0, 1]).table3 == paper.plan("quick", [0, 1]).table3
    (tmp_path / "odd.toml").write_text("budget = 48\n")
    with pytest.raises(ValueError, match="must set exactly"):
        paper.paper_preset(str(tmp_path / "odd.toml"))


def test_the_preset_files_ship_inside_the_package():
    import cdcca

    assert CONFIG_DIR.parent == Path(cdcca.__file__).parent and (CONFIG_DIR / "quick.toml").is_file()
    assert CONFIGS.resolve() == CONFIG_DIR.resolve()


def test_a_run_config_with_a_scorer_the_device_runtime_cannot_run_is_refused_before_anything_loads(tmp_path):
    config = tmp_path / "view.toml"
    config.write_text('[uts]\nsample_scorer = "view_consistency"\n')
    with pytest.raises(ValueError, match="view_consistency") as err:
        resolve_run_config(config=config)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="view_consistency"):
        resolve_run_config(preset="tiny", overrides={"uts": {"sample_scorer": "view_consistency"}})
