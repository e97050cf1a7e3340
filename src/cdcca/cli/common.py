"""What every ``cdcca`` command shares: the stderr console, one-line failures, the thread setting."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cdcca.assets import AssetError
from cdcca.config import resolve
from cdcca.model.spec import SpecError
from cdcca.trained_pair import PairError, serve, use
from cdcca.wire import PacketError

console = Console(stderr=True)


class Role(StrEnum):
    """Which model of the pair a command is about (shown as a choice in --help)."""

    device = "device"
    cloud = "cloud"


class Recipe(StrEnum):
    end_to_end = "end-to-end"
    consistency = "consistency"
    targets = "targets"
    readout = "readout"


def use_threads(n: int | None) -> None:
    import torch

    torch.set_num_threads(n or max(1, os.cpu_count() or 1))


TORCH_DEVICE_HELP = ("torch device the cloud's models compute on: cpu (the default), cuda, cuda:N or mps; the "
                     "name is checked before anything loads.")
TorchDeviceOpt = Annotated[str | None, typer.Option("--torch-device", help=TORCH_DEVICE_HELP)]
DtypeOpt = Annotated[str | None, typer.Option("--dtype", help="What the cloud's LLM computes in (model.cloud.dtype): "
                                              "fp32 (default) or bf16 (an accelerator; its bridge stays fp32).")]


def torch_device_or_fail(name: str | None) -> str:
    """The checked ``--torch-device`` (None → cpu), or :func:`fail`'s one line before any model loads."""
    from cdcca.model.placement import check_torch_device  # heavy: imported when the command runs, not for --help

    try:
        return check_torch_device(name)
    except ValueError as exc:
        fail(str(exc))
        raise   # unreachable: fail raises


def fail(message: str) -> None:
    """One-line error and exit 2: the message names the problem and the fix."""
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn the errors a user can cause (bad packets, damaged or mismatched state dirs, missing
    assets or files) into :func:`fail`'s one line instead of a traceback."""

    try:
        yield
    except (PacketError, AssetError, ValueError, RuntimeError, OSError, sqlite3.DatabaseError) as exc:
        fail(str(exc))


SCENARIO_HELP = ("How long each domain lasts (stream.scenario): persistent (each domain for several rounds; default), "
                 "recurring (the domains come back, --visits times), gradual (one corruption, severity 1 → 5), "
                 "one-round (each domain one round: the old stream, for comparison).")

# the run config every command that runs something takes, declared once: a preset or a file, --set on top
PresetOpt = Annotated[str | None, typer.Option(help="A named run config, configs/NAME.toml (`cdcca config show --preset NAME` prints it).")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="A run config file instead of a preset (a preset's file, or the config.toml a run wrote).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override one knob of the run config: SECTION.KEY=VALUE, e.g. uts.budget=32, akd.prefix.epochs=10 (repeatable; `cdcca config show` lists them).")]
# shortcuts for the most used knobs of the stream, each the same as a --set
ScenarioOpt = Annotated[str | None, typer.Option(help=SCENARIO_HELP)]
RoundsPerDomainOpt = Annotated[int | None, typer.Option(help="Rounds each domain lasts (stream.rounds_per_domain; default: the scenario's, persistent 4).")]
RoundSizeOpt = Annotated[int | None, typer.Option(help="Requests per round per device (stream.round_size; default: the scenario's, persistent 80).")]
VisitsOpt = Annotated[int | None, typer.Option(help="recurring: how many times the domains come back (stream.visits).")]
UpdateDelayOpt = Annotated[int | None, typer.Option(help="Rounds an update spends in transit (stream.update_delay; 0: live from the next round).")]
WeightsOpt = Annotated[str | None, typer.Option(help="A trained pair's directory (model.weights; cdcca pretrain --data … --out DIR writes one; default: the shipped easy-VQA pair).")]
StreamOpt = Annotated[str | None, typer.Option(help="Domains (data.domains): 'default', 'unseen', or a comma list of NAME:SEV and your own .jsonl files.")]

SHORTCUTS = {"stream": "data.domains", "scenario": "stream.scenario", "rounds_per_domain": "stream.rounds_per_domain",
             "round_size": "stream.round_size", "visits": "stream.visits", "update_delay": "stream.update_delay",
             "devices": "fleet.devices", "group": "fleet.group", "seed": "seed", "torch_device": "torch_device",
             "weights": "model.weights", "dtype": "model.cloud.dtype"}


def run_config(preset: str | None, config: Path | None, sets: list[str] | None, kind: str = "run", tiny: bool = False,
               overrides: dict | None = None, **shortcuts):
    """The command's :class:`~cdcca.config.RunConfig`: ``--preset`` or ``--config``, its own options (the
    shortcuts' and ``overrides``' dotted keys, those given), then ``--set``; ``tiny`` models start from the
    tiny preset when no other is named (their devices score tokens without the real encoder's statistics).
    A bad name or value is :func:`fail`'s one line before anything loads."""
    if shortcuts.get("torch_device") is not None:
        shortcuts["torch_device"] = torch_device_or_fail(shortcuts["torch_device"])
    if tiny and not preset and config is None:
        preset = "tiny"
    given = {**{SHORTCUTS[k]: v for k, v in shortcuts.items()}, **(overrides or {}), **({"model.tiny": True} if tiny else {})}
    try:
        cfg = resolve(preset, config, sets or [], given, kind=kind)
        serve(cfg.model)
    except (ValueError, PairError, SpecError) as exc:
        fail(str(exc))
        raise   # unreachable: fail raises
    return cfg


def use_pair(weights: str | Path | None) -> None:
    """Serve the pair in ``weights`` in this process and the ones it starts; a bad directory is one line."""
    try:
        use(weights)
    except PairError as exc:
        fail(str(exc))


def headline_text(summary: dict) -> str:
    """The report's headline sentence as plain text."""
    import html

    from cdcca.bench.report import headline  # heavy: imported when the command runs, not for --help

    return html.unescape(headline(summary))


def summary_line(s: dict) -> str:
    """The run's figures rounded, on one line: online, held-out, clean, bytes."""
    def pct(v) -> str:
        return "-" if v is None or v != v else f"{100 * v:.1f}"

    parts = []
    if s.get("online_mc") is not None:
        parts.append(f"online MC {pct(s['online_mc'])} % (never updated {pct(s.get('source_only_online_mc'))} %)")
        if s.get("recovery"):
            gains = [a - b for a, b in zip(s["recovery"], s.get("source_only_recovery") or [])]
            parts.append("recovery " + " / ".join(f"{100 * g:+.1f}" for g in gains))
        first, base = s.get("after_shift") or {}, s.get("source_only_after_shift") or {}
        if first.get("first_80") is not None and base.get("first_80") is not None:
            half = first.get("requests_to_half")
            parts.append(f"first 80 after a shift {pct(first['first_80'])} % (never updated {pct(base['first_80'])} %)"
                         + ("" if half is None else f", half the gain after {half:.0f} requests"))
    parts.append(f"held-out MC {pct(s.get('adapted_mc'))} % (never updated {pct(s.get('source_only_mc'))} %)")
    if s.get("source_mc_after") is not None:
        parts.append(f"clean {pct(s.get('source_mc_before'))} → {pct(s['source_mc_after'])} %")
    rounds = max(1, s.get("rounds", 1))
    parts.append(f"{s.get('bytes_up_total', 0) / rounds / 1024:.0f} KiB up, {s.get('bytes_down_total', 0) / rounds / 1024:.0f} KiB down per round")
    return "; ".join(parts)


def open_device(state: Path):
    """The device runtime of a state dir, or a one-line error naming what is wrong with it."""
    from cdcca.runtime.adapter_store import StoreError  # heavy: imported when the command runs, not for --help
    from cdcca.runtime.device import DeviceRuntime  # heavy: imported when the command runs, not for --help

    try:
        return DeviceRuntime.open(state)
    except (FileNotFoundError, ValueError, StoreError, PairError) as exc:
        fail(str(exc))
