"""``cdcca bench live``: the live fleet under real client traffic (logic in :mod:`cdcca.bench.live`)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import typer

from cdcca.cli.common import ConfigOpt, PresetOpt, ScenarioOpt, SetOpt, StreamOpt, WeightsOpt, console, fail, run_config


def bench_live(
    preset: PresetOpt = "live",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    weights: WeightsOpt = None,
    devices: int | None = typer.Option(None, help="Devices in the live fleet, a SuperNode and an API each (fleet.devices)."),
    scenario: ScenarioOpt = None,
    stream: StreamOpt = None,
    requests_per_device: int | None = typer.Option(None, help="Requests each device's clients send (traffic.requests_per_device)."),
    rate: float | None = typer.Option(None, help="Requests per second per device, open loop (traffic.rate)."),
    min_uploads: int | None = typer.Option(None, help="Start a round when the outboxes hold this many samples (fleet.min_uploads) ..."),
    round_every: float | None = typer.Option(None, help="... or this many seconds after the last round began (fleet.round_every_s)."),
    seed: int | None = typer.Option(None, help="Which requests the scenario draws."),
    out: Path = typer.Option(Path("runs/live"), help="Output folder: fleet/ (state and logs), live.json."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only (progress goes to stderr)."),
):
    """The deployed loop measured as clients see it: live fleet, openai-client traffic, rounds on their trigger.
    A window is the scenario's round size (stream.round_size) of requests per device."""
    from cdcca.bench.live import run_live  # heavy: imported when the command runs, not for --help
    from cdcca.fleet.deploy import DeployError  # Flower: loaded when the command runs, not for `cdcca --help`

    flags = {"traffic.requests_per_device": requests_per_device, "traffic.rate": rate, "fleet.min_uploads": min_uploads,
             "fleet.round_every_s": round_every}
    cfg = run_config(None if config else preset, config, set_, overrides=flags,
                     devices=devices, scenario=scenario, stream=stream, seed=seed, weights=weights)
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
    for domain, d in (result.get("domains") or {}).items():
        half = d["requests_to_half"]
        console.print(f"{domain}: first window {100 * d['first_window_gain']:+.1f} points over the never-updated device; "
                      + ("no gain to reach half of" if half is None else f"half the gain after {half:.0f} requests")
                      + f"; the first update after {d.get('requests_to_first_update', float('nan')):.0f}")


def _pc(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"
