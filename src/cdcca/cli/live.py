"""``cdcca bench live``: the live fleet under real client traffic (logic in :mod:`cdcca.bench.live`)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import typer

from cdcca.cli.common import ScenarioOpt, console, fail


def bench_live(
    devices: int = typer.Option(2, help="Devices in the live fleet (a SuperNode and an API each)."),
    scenario: ScenarioOpt = "persistent",
    stream: str = typer.Option("default", help="Domains the requests come from: built-in names, NAME:SEVERITY, .jsonl files."),
    requests_per_device: int = typer.Option(640, help="Requests each device's clients send."),
    window: int = typer.Option(80, help="Requests per device in one reporting window (the scenario's round size)."),
    rate: float = typer.Option(1.0, help="Requests per second per device, sent open-loop (not waiting for answers)."),
    concurrency: int = typer.Option(4, help="Requests in flight per device at most."),
    min_uploads: int = typer.Option(64, help="Start a round when the devices' outboxes hold this many samples ..."),
    round_every: float = typer.Option(120.0, help="... or this many seconds after the last round began."),
    preset: str = typer.Option("quick", help="The cloud's AKD and DWC settings (a `cdcca demo` preset)."),
    tiny: bool = typer.Option(False, "--tiny", help="Tiny random models: a plumbing check that needs no weights."),
    seed: int = typer.Option(0, help="Which requests the scenario draws."),
    out: Path = typer.Option(Path("runs/live"), help="Output folder: fleet/ (state and logs), live.json."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only (progress goes to stderr)."),
):
    """The deployed loop measured as clients see it: live fleet, openai-client traffic, rounds on their trigger."""
    from cdcca.bench.live import LiveConfig, run_live
    from cdcca.fleet.deploy import DeployError

    try:
        cfg = LiveConfig(devices, stream, scenario, requests_per_device, window, rate, concurrency, min_uploads,
                         round_every, preset=preset, tiny=tiny, seed=seed)
    except ValueError as exc:
        fail(str(exc))
    signal.signal(signal.SIGTERM, _interrupt)   # `kill` tears the fleet down as Ctrl-C does
    try:
        result = run_live(cfg, out, log=lambda m: console.print(m))
    except DeployError as exc:
        fail(str(exc))
    if not as_json:
        _print_windows(result)
    print(json.dumps(result))


def _interrupt(signum: int, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _print_windows(result: dict) -> None:
    from rich.table import Table

    table = Table(title="cdcca bench live: answers as the clients got them")
    for col in ("window", "domain", "online MC", "source-only MC", "p50 ms", "p99 ms", "update"):
        table.add_column(col)
    for w in result["windows"]:
        table.add_row(str(w["window"]), w["domain"], _pc(w["online_mc"]), _pc(w["source_only_mc"]),
                      str(w["p50_ms"]), str(w["p99_ms"]), "yes" if w["update_applied"] else "")
    console.print(table)
    console.print(f"online {_pc(result['online_mc'])} vs source-only {_pc(result['source_only_online_mc'])}; "
                  f"{result['rounds_completed']} rounds; failed {result['failed_requests']}, "
                  f"lost {result['lost_uploads']}, duplicated {result['duplicated_uploads']}")


def _pc(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"
