"""Named run configs as TOML files: the one place the presets are written down.

The files live in the package (``src/cdcca/configs/``, shipped as package data; ``configs/`` at the repository
root points there), one per preset, each knob with a comment on what it trades:

    configs/quick.toml, paper.toml, tiny.toml      `cdcca demo --preset NAME` (an embedded fleet's run config)
    configs/bench-paper/quick.toml, full.toml     `cdcca bench paper --preset NAME`

This module reads them into plain dicts (no torch) and moves settings between dicts, config dataclasses and
TOML: ``apply_config(FleetConfig(), load_preset("quick"))`` is the demo's quick run config, and
:func:`config_toml` writes any config dataclass back as a file that reads in again. A table (``[uts]``,
``[akd.prefix]``) changes only the knobs it names, on top of that field's default.
"""

from __future__ import annotations

import json
import textwrap
import tomllib
from dataclasses import fields, is_dataclass, replace
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


def apply_config(base: Any, settings: dict[str, Any], where: str = "") -> Any:
    """``base`` (a config dataclass) with ``settings`` applied; nested dicts go into nested dataclasses.
    An unknown key is a ValueError naming it, e.g. ``unknown setting 'akd.prefix.epoch'``."""
    names = {f.name for f in fields(base)}
    changes = {}
    for key, value in settings.items():
        if key not in names:
            raise ValueError(f"unknown setting {where + key!r}; {type(base).__name__} has {', '.join(sorted(names))}")
        current = getattr(base, key)
        if is_dataclass(current) and isinstance(value, dict):
            value = apply_config(current, value, f"{where}{key}.")
        elif isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        changes[key] = value
    return replace(base, **changes)


def config_toml(cfg: Any, header: str = "") -> str:
    """``cfg`` as TOML: plain knobs first, each after its help text as a comment, then one table per nested
    config. A knob set to None is written as a comment: leaving it out gives it its default."""
    lines = [f"# {line}" for line in header.splitlines()]
    _table(cfg, "", lines)
    return "\n".join(lines).strip() + "\n"


def _table(obj: Any, prefix: str, lines: list[str]) -> None:
    nested = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            nested.append((f.name, value))
            continue
        lines.extend(textwrap.wrap(f.metadata.get("help", ""), 108, initial_indent="# ", subsequent_indent="# "))
        lines.append(f"# {f.name} = (unset)" if value is None else f"{f.name} = {_toml_value(value)}")
    for name, value in nested:
        lines.extend(["", f"[{prefix}{name}]"])
        _table(value, f"{prefix}{name}.", lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as TOML")


def _folder(kind: str) -> Path:
    if kind not in KINDS:
        raise ValueError(f"unknown kind of preset {kind!r}; choose from {', '.join(KINDS)}")
    return KINDS[kind]
