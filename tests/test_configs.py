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


def test_the_quick_preset_keeps_the_recipe_the_results_were_measured_with():
    """The numbers in docs/RESULTS.md were measured with these settings: a file edit that changes them
    changes what `make demo` measures."""
    from cdcca.fleet.local import preset_config

    quick = preset_config("quick")
    assert (quick.uts.budget, quick.akd.prefix.epochs, quick.akd.prefix.lr, quick.dwc.budget_bytes) == \
        (STREAM_BUDGET, 15, 1e-3, 256 * 1024)
    assert preset_config("paper").uts.budget == 2 * STREAM_BUDGET and preset_config("tiny").tiny
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


def test_a_run_config_with_the_two_view_scorer_resolves_and_a_bad_scorer_is_refused_in_one_line(tmp_path):
    """The device runtime serves the two-view scorer (it passes its model), so a run may choose it; an
    unknown scorer is refused before anything loads."""
    config = tmp_path / "view.toml"
    config.write_text('[uts]\nsample_scorer = "view_consistency"\n')
    assert resolve_run_config(config=config)[0].uts.sample_scorer == "view_consistency"
    config.write_text('[uts]\nsample_scorer = "vibes"\n')
    with pytest.raises(ValueError, match="vibes") as err:
        resolve_run_config(config=config)
    assert "\n" not in str(err.value)

