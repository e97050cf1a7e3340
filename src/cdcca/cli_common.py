"""What every ``cdcca`` command shares: the stderr console, one-line failures, the thread setting."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum

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
