"""One run config: each knob declared once, presets as files of it, one override grammar everywhere
(TOML, --set, the Flower run config), and a printed config that runs again."""

import tomllib
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict, parse_config_args
from typer.testing import CliRunner

from cdcca.bench import paper
from cdcca.cli.main import app
from cdcca.config import (
    CONFIG_DIR,
    RunConfig,
    apply,
    flat_toml,
    flatten,
    from_flat,
    knobs,
    preset_names,
    resolve,
    to_toml,
)
from cdcca.uplink import UTSConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"      # what a fresh clone shows at its root
APP_TOML = Path(__file__).resolve().parents[1] / "src" / "cdcca" / "fleet" / "app" / "pyproject.toml"


def _sections(cls: type, seen: dict) -> None:
    for f in fields(cls):
        default = f.default_factory() if callable(f.default_factory) else f.default
        if is_dataclass(default):
            seen.setdefault(type(default).__name__, []).append(f.name)
            _sections(type(default), seen)


def test_each_knob_has_one_declaration_and_one_default_for_every_preset_of_every_command():
    """Every section class appears once in the tree, so a knob has one place and one default; every preset
    resolves to the same tree and changes only values (no preset knob is unknown)."""
    seen: dict[str, list[str]] = {}
    _sections(RunConfig, seen)
    # one section class serves both roles of the pair (model.device.*, model.cloud.*): the same knobs per role
    assert {name: where for name, where in seen.items() if len(where) > 1} == {"RoleModelSection": ["device", "cloud"]}
    keys = [key for key, _, _ in knobs(RunConfig())]
    assert len(keys) == len(set(keys)) and "akd.prefix.epochs" in keys and "akd.prefix_epochs" not in keys
    for kind in ("run", "bench-paper"):
        for name in preset_names(kind):
            assert [k for k, _, _ in knobs(resolve(name, kind=kind))] == keys


def test_the_quick_preset_keeps_the_recipe_the_results_were_measured_with():
    """The numbers in docs/RESULTS.md were measured with these settings: a file edit that changes them
    changes what `make demo` measures."""
    quick = resolve("quick")
    assert (quick.uts.selection, quick.uts.budget, quick.akd.prefix.epochs, quick.akd.prefix.lr, quick.dwc.budget_bytes,
            quick.eval.heldout_n, quick.eval.curve_n) == ("budget", 48, 15, 1e-3, 256 * 1024, 200, 100)
    assert resolve("paper").uts.budget == 96 and resolve("tiny").model.tiny
    assert resolve("quick", kind="bench-paper").eval.heldout_n == 1000      # a clean drop of 1 point must show


def test_the_printed_config_round_trips_for_every_preset():
    for kind in ("run", "bench-paper"):
        for name in preset_names(kind):
            cfg = resolve(name, kind=kind)
            assert apply(RunConfig(), tomllib.loads(to_toml(cfg))) == cfg
    cfg = resolve("quick", sets=["fleet.devices=3", "fleet.group=all", "akd.labels.epochs=3", "dwc.energy=0.9",
                                 "stream.round_size=40"])
    assert apply(RunConfig(), tomllib.loads(to_toml(cfg))) == cfg


def test_config_show_prints_a_file_that_runs_again(tmp_path):
    run = CliRunner().invoke
    shown = run(app, ["config", "show", "--preset", "quick", "--set", "uts.budget=32"])
    assert shown.exit_code == 0, shown.output
    (tmp_path / "run.toml").write_text(shown.output)
    again = run(app, ["config", "show", "--config", str(tmp_path / "run.toml")])
    assert again.output.split("\n", 1)[1] == shown.output.split("\n", 1)[1]        # all but the header line
    assert resolve(file=tmp_path / "run.toml").uts.budget == 32


def test_set_the_flower_run_config_and_a_toml_file_reach_the_same_field(tmp_path):
    by_set = resolve(sets=["akd.prefix.epochs=3", "fleet.min_uploads=64", 'data.domains="pixelate:5"'])
    (tmp_path / "c.toml").write_text('[akd.prefix]\nepochs = 3\n[fleet]\nmin_uploads = 64\n[data]\ndomains = "pixelate:5"\n')
    by_file = resolve(file=tmp_path / "c.toml")
    flower = parse_config_args(["akd.prefix.epochs=3 fleet.min_uploads=64 data.domains='pixelate:5'"])
    by_flower = from_flat(flower)
    assert by_set == by_file == by_flower
    assert (by_set.akd.prefix.epochs, by_set.fleet.min_uploads, by_set.data.domains) == (3, 64, "pixelate:5")
    assert from_flat(flatten(by_set)) == by_set


def test_the_flower_app_declares_the_flat_form_of_the_defaults():
    """The app's [tool.flwr.app.config] is written from RunConfig (`cdcca config show --flower`), not a second list."""
    declared = flatten_dict(tomllib.loads(APP_TOML.read_text())["tool"]["flwr"]["app"]["config"])
    assert declared == flatten(RunConfig())
    assert tomllib.loads(flat_toml(RunConfig())) == tomllib.loads(flat_toml(from_flat(declared)))
    shown = CliRunner().invoke(app, ["config", "show", "--flower"])
    assert flatten_dict(tomllib.loads(shown.output)) == declared


@pytest.mark.parametrize("item, message", [
    ("uts.budgt=3", "unknown setting 'uts.budgt'"),
    ("uts.budget=abc", "'uts.budget' must be an integer"),
    ("uts.budget", "write SECTION.KEY=VALUE"),
    ("akd.prefix=3", "'akd.prefix' is a section"),
    ("uts.skip_top=1.5", "skip_top"),
    ("stream.scenario=weekly", "unknown scenario"),
    ("akd.prefix_epochs=3", "unknown setting 'akd.prefix_epochs'"),      # the flat aliases are gone
])
def test_a_bad_override_is_refused_in_one_line_naming_it(item, message):
    with pytest.raises(ValueError, match=message) as err:
        resolve("quick", sets=[item])
    assert "\n" not in str(err.value)
    shown = CliRunner().invoke(app, ["config", "show", "--set", item])
    assert shown.exit_code == 2 and "error" in shown.output


def test_an_unset_knob_is_written_as_a_comment_and_as_empty_in_the_flat_form():
    cfg = resolve(sets=["stream.round_size=40"])
    assert "round_size = 40" in to_toml(cfg) and "# rounds_per_domain = (unset)" in to_toml(cfg)
    assert flatten(cfg)["stream.rounds_per_domain"] == "" and resolve(sets=["stream.round_size="]).stream.round_size is None


def test_demo_takes_a_config_file_and_prints_the_resolved_settings_without_running():
    run = CliRunner().invoke
    by_file = run(app, ["demo", "--config", str(CONFIGS / "quick.toml"), "--print-config"])
    by_name = run(app, ["demo", "--preset", "quick", "--print-config"])
    assert by_file.exit_code == 0 and by_file.output == by_name.output
    assert 'scenario = "recurring"' in run(app, ["demo", "--scenario", "recurring", "--print-config"]).output
    assert "budget = 7" in run(app, ["demo", "--set", "uts.budget=7", "--print-config"]).output
    both = run(app, ["demo", "--preset", "quick", "--config", str(CONFIGS / "quick.toml"), "--print-config"])
    assert both.exit_code != 0 and "not both" in both.output


def test_the_paper_benchmark_takes_its_preset_from_a_file():
    by_file = resolve(file=CONFIGS / "bench-paper" / "quick.toml")
    assert by_file == resolve("quick", kind="bench-paper")
    assert paper.plan("f", by_file, [0, 1]).table3 == paper.plan("quick", resolve("quick", kind="bench-paper"), [0, 1]).table3
    assert len(paper.plan("quick", by_file, [0, 1]).table3["CE + MSE"]) == 1        # ablation_seeds = 1


def test_the_preset_files_ship_inside_the_package():
    import cdcca

    assert CONFIG_DIR.parent == Path(cdcca.__file__).parent and (CONFIG_DIR / "quick.toml").is_file()
    assert CONFIGS.resolve() == CONFIG_DIR.resolve()


def test_the_uts_defaults_are_the_runs():
    assert (UTSConfig().selection, UTSConfig().budget) == (RunConfig().uts.selection, RunConfig().uts.budget) == ("budget", 48)


def test_a_run_config_with_the_two_view_scorer_resolves_and_a_bad_scorer_is_refused_in_one_line(tmp_path):
    """The device runtime serves the two-view scorer (it passes its model), so a run may choose it; an
    unknown scorer is refused before anything loads."""
    config = tmp_path / "view.toml"
    config.write_text('[uts]\nsample_scorer = "view_consistency"\n')
    assert resolve(file=config).uts.sample_scorer == "view_consistency"
    config.write_text('[uts]\nsample_scorer = "vibes"\n')
    with pytest.raises(ValueError, match="vibes") as err:
        resolve(file=config)
    assert "\n" not in str(err.value)
