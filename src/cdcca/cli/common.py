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


def torch_device_or_fail(name: str | None) -> str:
    """The checked ``--torch-device`` (None → cpu), or :func:`fail`'s one line before any model loads."""
    from cdcca.model.placement import check_torch_device

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
    from cdcca.assets import AssetError
    from cdcca.wire import PacketError

    try:
        yield
    except (PacketError, AssetError, ValueError, RuntimeError, OSError, sqlite3.DatabaseError) as exc:
        fail(str(exc))


SCENARIO_HELP = ("How long each domain lasts: persistent (each domain for several rounds; default), recurring (the "
                 "domains come back, --visits times), gradual (one corruption, severity 1 → 5), one-round (each "
                 "domain one round: the old stream, for comparison).")


# the stream options every command that runs a stream takes (demo, bench akd, bench paper), declared once
ScenarioOpt = Annotated[str | None, typer.Option(help=SCENARIO_HELP)]
RoundsPerDomainOpt = Annotated[int | None, typer.Option(help="Rounds each domain lasts (default: the scenario's; persistent 4).")]
RoundSizeOpt = Annotated[int | None, typer.Option(help="Requests per round per device (default: the scenario's; persistent 80).")]
VisitsOpt = Annotated[int | None, typer.Option(help="recurring: how many times the domains come back.")]
UpdateDelayOpt = Annotated[int | None, typer.Option(help="Rounds an update spends in transit (0: live from the next round; 1: one round late).")]


def scenario_overrides(scenario: str, rounds_per_domain: int | None, round_size: int | None, visits: int,
                       update_delay: int) -> dict:
    """The stream settings of a run config, checked now (a bad value fails before any model loads)."""
    from cdcca.data.scenario import Scenario

    Scenario(scenario, rounds_per_domain, round_size, visits)
    if update_delay < 0:
        raise ValueError(f"--update-delay must be ≥ 0 rounds, got {update_delay}")
    return {"scenario": scenario, "rounds_per_domain": rounds_per_domain, "round_size": round_size,
            "visits": visits, "update_delay": update_delay}


def headline_text(summary: dict) -> str:
    """The report's headline sentence as plain text."""
    import html

    from cdcca.bench.report import headline

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
    parts.append(f"held-out MC {pct(s.get('adapted_mc'))} % (never updated {pct(s.get('source_only_mc'))} %)")
    if s.get("source_mc_after") is not None:
        parts.append(f"clean {pct(s.get('source_mc_before'))} → {pct(s['source_mc_after'])} %")
    rounds = max(1, s.get("rounds", 1))
    parts.append(f"{s.get('bytes_up_total', 0) / rounds / 1024:.0f} KiB up, {s.get('bytes_down_total', 0) / rounds / 1024:.0f} KiB down per round")
    return "; ".join(parts)


def open_device(state: Path):
    """The device runtime of a state dir, or a one-line error naming what is wrong with it."""
    from cdcca.runtime.adapter_store import StoreError
    from cdcca.runtime.device import DeviceRuntime

    try:
        return DeviceRuntime.open(state)
    except (FileNotFoundError, ValueError, StoreError) as exc:
        fail(str(exc))
