"""The ``cdcca`` command line: assets, pretrain, eval, packet tools, the demo, runtimes and the fleet (the benchmarks: cli/bench.py)."""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")     # keep the live display and --json output clean
warnings.filterwarnings("ignore", category=FutureWarning)

import typer
from rich.console import Console
from rich.table import Table

from cdcca import __version__, wire
from cdcca.assets import AssetError, cache_dir
from cdcca.cli.api import device_api, device_serve
from cdcca.cli.bench import bench_app
from cdcca.cli.cloud import cloud_app
from cdcca.cli.common import (
    ConfigOpt,
    DtypeOpt,
    PresetOpt,
    Role,
    RoundSizeOpt,
    RoundsPerDomainOpt,
    ScenarioOpt,
    SetOpt,
    StreamOpt,
    TorchDeviceOpt,
    UpdateDelayOpt,
    VisitsOpt,
    WeightsOpt,
    console,
    fail,
    headline_text,
    one_line_errors,
    open_device,
    run_config,
    summary_line,
    torch_device_or_fail,
    use_pair,
    use_threads,
)
from cdcca.cli.data import data_app
from cdcca.cli.export import device_export
from cdcca.cli.fleet import fleet_app
from cdcca.cli.pretrain import pretrain
from cdcca.cli.weights import weights_app
from cdcca.config import flat_toml, to_toml
from cdcca.data.stream import Domain, heldout_questions, resolve_sequence
from cdcca.trained_pair import active, run_stream
from cdcca.wire import PacketError, write_packet

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Cloud-device collaborative continual adaptation for multimodal LLMs.")
packet_app = typer.Typer(no_args_is_help=True, help="Inspect uplink/update packets.")
app.add_typer(packet_app, name="packet")
app.add_typer(bench_app, name="bench")
app.add_typer(fleet_app, name="fleet")
app.add_typer(data_app, name="data")
app.add_typer(weights_app, name="weights")
app.command()(pretrain)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"cdcca {__version__}")
        raise typer.Exit()


@app.callback()
def root_options(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """Cloud-device collaborative continual adaptation for multimodal LLMs."""
@app.command()
def assets(rebuild: bool = typer.Option(False, help="Rebuild the safetensors cache of the LLM from the GGUF file.")):
    """Find the packaged weights and data, build the LLM cache once, and print sizes and load times."""
    from cdcca.cli.doctor import check_assets  # heavy: imported when the command runs, not for --help

    try:
        reports = check_assets(rebuild=rebuild)
    except AssetError as exc:
        fail(str(exc))
    table = Table(title=f"cdcca assets (cache: {cache_dir()})")
    for col in ("asset", "size MB", "load s", "detail", "path"):
        table.add_column(col)
    for r in reports:
        table.add_row(r.name, f"{r.size_mb:.1f}", f"{r.load_s:.2f}", r.detail, r.path)
    Console().print(table)


def _eval_domain(model, prompter, data, n, domain, role, direct) -> dict:
    from cdcca.runtime.evaluate import accuracy, domain_tokens  # heavy: imported when the command runs, not for --help

    res = accuracy(model, prompter, data, heldout_questions(data, n, domain=domain), domain_tokens(domain, data), direct=direct)
    return {"model": role, "shift": str(domain) if domain.path else domain.corruption, "severity": domain.severity, **res}


@app.command("eval")
def eval_cmd(
    role: Role = typer.Option(Role.device, "--role", "--model", help="Which model to evaluate (--model is the same option)."),
    shift: str = typer.Option("clean", help="Corruption name (see `cdcca eval --help`), or 'clean'."),
    severity: int = typer.Option(5, help="Severity 1..5 of --shift."),
    stream: str | None = typer.Option(None, help="Evaluate every domain of a named sequence ('default') or a comma list of NAME:SEV and .jsonl files."),
    data_file: Path | None = typer.Option(None, "--data", help="Instead: every row of your own VQA JSONL file (docs/DATA.md)."),
    n: int = typer.Option(1000, help="Held-out test questions per domain (with --data: at most this many rows)."),
    weights: WeightsOpt = None,
    direct: bool = typer.Option(True, help="Also generate direct answers (DA); --no-direct scores MC only (faster)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
    threads: int | None = typer.Option(None, help="torch CPU threads."),
    torch_device: TorchDeviceOpt = None,
):
    """Held-out accuracy (direct answer and multiple choice, 0–1) of a model, clean or under shift."""
    from cdcca.model.pair import (  # heavy: imported when the command runs, not for --help
        load_pretrained,
        model_prompter,
        role_tokenizer,
    )

    torch_device = torch_device_or_fail(torch_device)   # the model moves there; tokens follow it (model/answer.py)
    use_threads(threads)
    use_pair(weights)
    if data_file is not None:
        from cdcca.runtime.evaluate import evaluate_file  # heavy: imported when the command runs, not for --help

        with one_line_errors():
            result = {"model": role.value, **evaluate_file(load_pretrained(role.value).to(torch_device), role_tokenizer(role.value),
                                                           data_file, n, direct)}
        if not as_json:
            da = "-" if result["da"] is None else f"{result['da']:.3f}"
            console.print(f"{role.value} on {data_file}: n={result['n']} DA={da} MC={result['mc']:.3f}")
        print(json.dumps(result))
        return
    try:
        domains = resolve_sequence(stream) if stream else [Domain.parse(shift if shift == "clean" else f"{shift}:{severity}")]
        net = load_pretrained(role.value).to(torch_device)
        data = run_stream(domains)
        prompter = model_prompter(net, active().answers)
    except (ValueError, AssetError, FileNotFoundError) as exc:
        fail(str(exc))
    t = time.perf_counter()
    model = role.value
    rows = [_eval_domain(net, prompter, data, n, d, model, direct) for d in domains]
    wall = time.perf_counter() - t
    if stream:
        shifted = [r for r in rows if r["shift"] != "clean"] or rows
        result = {"model": model, "domains": rows,
                  "da": None if not direct else sum(r["da"] for r in shifted) / len(shifted),
                  "mc": sum(r["mc"] for r in shifted) / len(shifted)}
    else:
        result = rows[0]
    if not as_json:
        table = Table(title=f"{model}: held-out accuracy ({wall:.1f} s)")
        for col in ("shift", "severity", "n", "DA", "MC"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["shift"], str(r["severity"]), str(r["n"]), "-" if r["da"] is None else f"{r['da']:.3f}", f"{r['mc']:.3f}")
        console.print(table)
    print(json.dumps(result))


# -- UTS uplink: `packet inspect` and `bench uts` (thin wrappers; logic in cdcca.wire / cdcca.bench.uts) --
@packet_app.command("inspect")
def packet_inspect(
    file: Path = typer.Argument(..., help="Packet file (uplink, update or resync)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
):
    """Validate a packet and print its kind, metadata and tensor index (no tensors are built)."""
    try:
        size = file.stat().st_size
        if size > wire.DEFAULT_LIMITS.max_bytes:
            raise wire.PacketError(f"packet file {file} is {size} bytes, limit is {wire.DEFAULT_LIMITS.max_bytes}")
        info = wire.describe(file.read_bytes())
    except wire.PacketError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot read packet file {file}: {exc.strerror or exc}")
    if as_json:
        print(json.dumps(info))
        return
    out = Console()
    head = Table(title=f"{file.name}: {info['kind']} packet, {info['total_bytes']} bytes", show_header=False)
    for key in ("kind", "version", "created", "header_bytes", "total_bytes", "body_sha256"):
        head.add_row(key, str(info[key]))
    for key, value in sorted(info["meta"].items()):
        head.add_row(f"meta.{key}", value if len(value) <= 80 else value[:77] + "...")
    out.print(head)
    tensors = Table(title="tensors")
    for col in ("name", "dtype", "shape", "bytes"):
        tensors.add_column(col)
    for t in info["tensors"]:
        tensors.add_row(t["name"], t["dtype"], "×".join(map(str, t["shape"])) or "scalar", str(t["bytes"]))
    out.print(tensors)


@app.command()
def demo(
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved run config as TOML and run nothing."),
    out: Path = typer.Option(Path("runs/demo"), help="Output folder: metrics.json, accuracy.png, bytes.png, report.html, "
                             "config.toml (this run's settings), state dirs."),
    devices: int | None = typer.Option(None, help="In-process devices (fleet.devices), each with its own slice of the "
                                       "stream and state dir."),
    stream: StreamOpt = None,
    scenario: ScenarioOpt = None,
    rounds_per_domain: RoundsPerDomainOpt = None,
    round_size: RoundSizeOpt = None,
    visits: VisitsOpt = None,
    update_delay: UpdateDelayOpt = None,
    group: str | None = typer.Option(None, help="'all' (fleet.group): the devices form one fleet group — the cloud pools "
                                     "their uploads into one shared student and sends each the same update."),
    threads: int | None = typer.Option(None, help="torch CPU threads (default: all cores)."),
    oracle: bool = typer.Option(False, help="Also run the oracle (true labels on the same uploads, dense updates) for the "
                                "report's side-by-side table; about as long again as the run, cached per settings."),
    weights: WeightsOpt = None,
    torch_device: TorchDeviceOpt = None,
    dtype: DtypeOpt = None,
):
    """The whole continual loop: stream → answer → UTS uplink → AKD → DWC downlink → apply, with a report.
    Without --preset or --config it runs the quick preset."""
    from cdcca.bench.demo import run_demo  # heavy: imported when the command runs, not for --help

    preset = preset or (None if config else "quick")
    cfg = run_config(preset, config, set_, devices=devices, stream=stream, scenario=scenario,
                     rounds_per_domain=rounds_per_domain, round_size=round_size, visits=visits,
                     update_delay=update_delay, group=group, torch_device=torch_device, weights=weights, dtype=dtype)
    if print_config:
        print(to_toml(cfg), end="")
        return
    use_threads(threads)
    try:
        if stream:

            run_stream(stream, cfg.model.tiny)     # bad domains, JSONL rows or answers fail before any model loads
        metrics = run_demo(cfg, out, preset=preset or str(config), console=console, oracle=oracle)
    except (AssetError, ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    s = metrics["summary"]
    console.print(headline_text(s))
    print(summary_line(s) + f"; {s['wall_s']:.0f} s; report {out / 'report.html'}; settings {out / 'config.toml'} "
          f"(cdcca demo --config {out / 'config.toml'} runs them again)")


config_app = typer.Typer(no_args_is_help=True, help="The run config: every knob of a run, its presets and overrides.")
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    kind: str = typer.Option("run", help="Which presets --preset names: run (every command's) or bench-paper."),
    flower: bool = typer.Option(False, "--flower", help="The flat form instead (dotted keys; the Flower run config)."),
):
    """Print the resolved run config as TOML that runs again (`--config FILE`), each knob under its help."""

    cfg = run_config(preset, config, set_, kind=kind)
    source = f"--preset {preset}" if preset else f"--config {config}" if config else "the defaults"
    print(flat_toml(cfg) if flower else to_toml(cfg, f"cdcca run config: {source}{''.join(f' --set {x}' for x in set_ or [])}"),
          end="")


device_app = typer.Typer(no_args_is_help=True, help="Device runtime: state dir with adapter versions and a durable outbox.")
app.add_typer(device_app, name="device")
app.add_typer(cloud_app, name="cloud")
STATE_HELP = "State directory of this runtime."


_device = open_device


@device_app.command("init")
def device_init(state: Path = typer.Option(..., help=STATE_HELP), device_id: str = typer.Option(..., "--device", "--id", help="Device name (--id is the same option)."),
                tiny: bool = typer.Option(False, help="Tiny random model (transport checks only)."),
                index: int = typer.Option(0, help="This device's slice of the request stream (0-based)."),
                n_devices: int = typer.Option(1, help="Number of devices sharing the stream."),
                preset: PresetOpt = None, config: ConfigOpt = None, set_: SetOpt = None, weights: WeightsOpt = None):
    """Create a device state dir holding the pretrained adapters as version 0; its UTS settings come from
    the run config (--preset, --config, --set; without any: the role's own defaults)."""
    from cdcca.runtime.device import DeviceRuntime  # heavy: imported when the command runs, not for --help

    uts = run_config(preset, config, set_).uts if preset or config or set_ else None
    use_pair(weights)                    # recorded in the state: serve and export load this pair
    try:
        dev = DeviceRuntime.create(state, device_id, tiny=tiny, uts=uts, stream={"index": index, "n_devices": n_devices})
    except (FileExistsError, ValueError) as exc:
        fail(str(exc))
    print(json.dumps(dev.status()))


@device_app.command("status")
def device_status(state: Path = typer.Option(..., help=STATE_HELP)):
    """Version, hash, kept versions, outbox size and bytes sent/received."""
    print(json.dumps(_device(state).status()))


device_app.command("serve")(device_serve)
device_app.command("api")(device_api)
device_app.command("export")(device_export)


@device_app.command("uplink")
def device_uplink(state: Path = typer.Option(..., help=STATE_HELP), out: Path = typer.Option(..., help="Where to write the uplink packet."),
                  max_samples: int = typer.Option(256, help="Most samples in one packet.")):
    """Pack pending outbox samples into an uplink packet (they stay in the outbox until acknowledged)."""

    packet = _device(state).collect_uplink(max_samples)
    if packet is None:
        fail("the outbox is empty: nothing to upload (run `cdcca device serve` first)")
    write_packet(out, packet)
    print(json.dumps({"packet": str(out), "bytes": len(packet)}))


@device_app.command("ack")
def device_ack(state: Path = typer.Option(..., help=STATE_HELP), ids: Path = typer.Option(..., help="JSON list of acknowledged sample ids (from `cdcca cloud receive`).")):
    """Drop acknowledged samples from the outbox."""
    print(json.dumps({"removed": _device(state).ack_uplink(json.loads(ids.read_text()))}))


@device_app.command("apply")
def device_apply(packet: Path, state: Path = typer.Option(..., help=STATE_HELP)):
    """Verify and apply an update or resync packet atomically."""

    try:
        print(json.dumps(_device(state).apply(packet.read_bytes())))
    except PacketError as exc:
        fail(str(exc))


@device_app.command("rollback")
def device_rollback(state: Path = typer.Option(..., help=STATE_HELP), version: int = typer.Option(..., help="A kept version (see status).")):
    """Make a kept adapter version current again."""
    try:
        print(json.dumps(_device(state).rollback(version)))
    except (KeyError, ValueError, RuntimeError) as exc:
        fail(str(exc))


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
