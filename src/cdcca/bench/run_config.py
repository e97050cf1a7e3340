"""A run's config between TOML and dataclasses: a preset or a file in, a re-runnable file out.

``resolve_run_config(preset="quick")`` and ``resolve_run_config(config="configs/quick.toml")`` give the same
:class:`~cdcca.fleet.local.FleetConfig`; :func:`config_toml` writes any config dataclass back as TOML, each
knob under its help text, so the settings a run prints are a file ``cdcca demo --config`` runs again.
A table (``[uts]``, ``[akd.prefix]``) changes only the knobs it names, on top of that field's default.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from cdcca.fleet.local import FleetConfig
from cdcca.presets import load_preset, read_config


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


def fleet_config(settings: dict[str, Any]) -> FleetConfig:
    """The embedded fleet's run config of a preset's or a file's settings (unnamed knobs keep their defaults)."""
    return check_device_uts(apply_config(FleetConfig(), settings))


def check_device_uts(cfg: FleetConfig) -> FleetConfig:
    """Refuse now what a device runtime would refuse on its first request: the two-view scorer needs the
    device model inside the UTS plan, which the runtime does not pass (``cdcca bench uts`` measures it)."""
    if cfg.uts.sample_scorer == "view_consistency":
        raise ValueError("uts.sample_scorer 'view_consistency' does not run on a device runtime yet (only in "
                         "`cdcca bench uts`); choose mc_disagreement, mc_entropy, confidence, entropy or margin")
    return cfg


def resolve_run_config(preset: str | None = None, config: str | Path | None = None,
                       overrides: dict[str, Any] | None = None) -> tuple[FleetConfig, str]:
    """The run config of ``--preset`` or ``--config`` (not both) with command-line ``overrides`` on top,
    and the name a report gives it (the preset's, or the file's path)."""
    if preset is not None and config is not None:
        raise ValueError("give --preset NAME or --config FILE, not both")
    settings = read_config(config) if config is not None else load_preset(preset or "quick")
    cfg = fleet_config(settings)
    if overrides:
        cfg = check_device_uts(apply_config(cfg, overrides))
    return cfg, str(config) if config is not None else (preset or "quick")


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
