"""Named run configs as TOML files: the one place the presets are written down.

The files live in the package (``src/cdcca/configs/``, shipped as package data; ``configs/`` at the repository
root points there), one per preset, each knob with a comment on what it trades:

    configs/quick.toml, paper.toml, tiny.toml      `cdcca demo --preset NAME` (an embedded fleet's run config)
    configs/bench-paper/quick.toml, full.toml     `cdcca bench paper --preset NAME`

This module reads them into plain dicts (no torch, no dataclass): the command line, the benchmarks and the
Flower apps each turn a dict into their own config (:func:`cdcca.bench.run_config.fleet_config` for the demo).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).parent / "configs"
KINDS = {"run": CONFIG_DIR, "bench-paper": CONFIG_DIR / "bench-paper"}


def preset_names(kind: str = "run") -> list[str]:
    """The presets of one kind (``run``: the demo's; ``bench-paper``: the paper benchmark's), sorted."""
    return sorted(p.stem for p in _folder(kind).glob("*.toml"))


def load_preset(name: str, kind: str = "run") -> dict[str, Any]:
    """The settings of preset ``name`` as a dict (tables as nested dicts), e.g. ``load_preset("quick")``."""
    path = _folder(kind) / f"{name}.toml"
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(preset_names(kind))}")
    return read_config(path)


def read_config(path: str | Path) -> dict[str, Any]:
    """A TOML config file as a dict; a missing or malformed file is a one-line ValueError naming it."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise ValueError(f"no config file at {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a valid TOML config: {e}") from None


def _folder(kind: str) -> Path:
    if kind not in KINDS:
        raise ValueError(f"unknown kind of preset {kind!r}; choose from {', '.join(KINDS)}")
    return KINDS[kind]
