"""``cdcca fleet up / run / down``: a Flower fleet on this machine, with one device API per device."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from cdcca.cli.common import ConfigOpt, PresetOpt, SetOpt, WeightsOpt, console, fail, run_config, use_pair

fleet_app = typer.Typer(no_args_is_help=True, help="Run the protocol over Flower: a SuperLink (cloud), SuperNodes "
                                                   "(devices) and each device's API.")


def _deploy():
    """:mod:`cdcca.fleet.deploy`, imported when a fleet command runs: it loads Flower, which `cdcca --help` need not."""
    from cdcca.fleet import deploy  # heavy: imported when the command runs, not for --help

    return deploy


STATE_OPT = typer.Option(..., help="State dir of a fleet started with `cdcca fleet up`.")


@fleet_app.command("up")
def fleet_up(
    devices: int = typer.Option(2, help="Devices to start on 127.0.0.1, named dev-1..dev-N: a SuperNode and an API each."),
    state: Path = typer.Option(..., help="State dir: certificates, node keys, logs, cloud and device state."),
    host: str = typer.Option("127.0.0.1", help="Address the SuperLink binds; anything but loopback requires TLS."),
    port: int = typer.Option(9092, help="SuperLink port (Fleet, Control and Runtime APIs share it)."),
    api_port: int = typer.Option(8001, help="dev-i's API listens on 127.0.0.1:(api-port + i - 1); 0: any free ports."),
    apis: bool = typer.Option(True, "--apis/--no-apis", help="Start each device's OpenAI-compatible API."),
    insecure: bool = typer.Option(False, "--insecure", help="No TLS and no node authentication (loopback only)."),
    tiny: bool = typer.Option(False, "--tiny", help="Tiny random models: a transport check that needs no weights."),
    weights: WeightsOpt = None,
):
    """Start a SuperLink, N SuperNodes with TLS and node authentication, and N device APIs; prints the fleet as JSON."""

    use_pair(weights)                  # the devices' states record it; their processes inherit it
    try:
        spec = _deploy().up(state, devices, host=host, port=port, insecure=insecure, tiny=tiny, apis=apis, api_port=api_port,
                  log=console.print)
    except _deploy().DeployError as exc:
        fail(str(exc))
    print(json.dumps({"state": spec.state, "superlink": spec.address, "devices": spec.devices,
                      "node_ids": spec.node_ids, "tls": not spec.insecure,
                      "apis": {n: f"http://127.0.0.1:{p}/v1" for n, p in spec.apis.items()}}))


@fleet_app.command("run")
def fleet_run(
    state: Path = STATE_OPT,
    rounds: int | None = typer.Option(None, help="Rounds to run (fleet.rounds; 0: until `cdcca fleet stop`); a run "
                                                "continues after the rounds already logged."),
    round_every: float | None = typer.Option(None, help="Start a round at most this many seconds after the last one "
                                                       "began, when any upload is queued (fleet.round_every_s)."),
    min_uploads: int | None = typer.Option(None, help="Start a round as soon as the devices' outboxes hold this many "
                                                     "samples (fleet.min_uploads). Without either trigger rounds follow each other."),
    traffic: str | None = typer.Option(None, help="api: the devices' APIs fill their outboxes; stream: each device "
                                                 "replays its simulated request stream before every uplink (fleet.traffic)."),
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    weights: WeightsOpt = None,
    timeout: float = typer.Option(3600, help="Stop the run after this many seconds."),
):
    """Run the fleet app (`flwr run`) with the run config, stream its log to stderr, print the per-round records as JSON."""

    tiny = (state / "fleet.json").is_file() and _deploy().FleetSpec.load(state).tiny
    flags = {"fleet.rounds": rounds, "fleet.round_every_s": round_every, "fleet.min_uploads": min_uploads,
             "fleet.traffic": traffic}
    cfg = run_config(preset, config, set_, tiny=tiny, overrides=flags, weights=weights)
    try:
        result = _deploy().run(state, cfg, timeout=timeout, echo=lambda line: print(line, file=sys.stderr))
    except (_deploy().DeployError, ValueError) as exc:
        fail(str(exc))
    if not result.ok:
        fail(f"run {result.run_id} ended {result.status}; log: {result.log_path}")
    print(json.dumps({"run_id": result.run_id, "status": result.status, "rounds": result.rounds}))


@fleet_app.command("stop")
def fleet_stop(state: Path = STATE_OPT):
    """Ask a running `cdcca fleet run` to end after its current round (the fleet stays up)."""

    try:
        console.print(f"asked the cloud to stop after its current round ({_deploy().request_stop(state)})")
    except _deploy().DeployError as exc:
        fail(str(exc))


@fleet_app.command("down")
def fleet_down(state: Path = STATE_OPT):
    """Stop everything `cdcca fleet up` started: device APIs, SuperNodes, the SuperLink (by process group)."""

    stopped = _deploy().down(state)
    console.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
