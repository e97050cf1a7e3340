"""What every ``cdcca`` command shares: the stderr console, one-line failures, the thread setting."""

from __future__ import annotations

import os

import typer
from rich.console import Console

console = Console(stderr=True)


def use_threads(n: int | None) -> None:
    import torch

    torch.set_num_threads(n or max(1, os.cpu_count() or 1))


def fail(message: str) -> None:
    """One-line error and exit 2: the message names the problem and the fix."""
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)
