"""A run's config between TOML and dataclasses: a preset or a file in, a re-runnable file out.

``resolve_run_config(preset="quick")`` and ``resolve_run_config(config="configs/quick.toml")`` give the same
:class:`~cdcca.fleet.local.FleetConfig`; :func:`cdcca.presets.config_toml` writes it back as TOML, each knob
under its help text, so the settings a run prints are a file ``cdcca demo --config`` runs again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cdcca.fleet.local import FleetConfig
from cdcca.presets import apply_config, config_toml, load_preset, read_config

__all__ = ["apply_config", "config_toml", "fleet_config", "resolve_run_config"]


def fleet_config(settings: dict[str, Any]) -> FleetConfig:
    """The embedded fleet's run config of a preset's or a file's settings (unnamed knobs keep their defaults)."""
    return apply_config(FleetConfig(), settings)


def resolve_run_config(preset: str | None = None, config: str | Path | None = None,
                       overrides: dict[str, Any] | None = None) -> tuple[FleetConfig, str]:
    """The run config of ``--preset`` or ``--config`` (not both) with command-line ``overrides`` on top,
    and the name a report gives it (the preset's, or the file's path)."""
    if preset is not None and config is not None:
        raise ValueError("give --preset NAME or --config FILE, not both")
    settings = read_config(config) if config is not None else load_preset(preset or "quick")
    cfg = fleet_config(settings)
    if overrides:
        cfg = apply_config(cfg, overrides)
    return cfg, str(config) if config is not None else (preset or "quick")
