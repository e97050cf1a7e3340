"""The ``cdcca`` command line: assets, pretrain, eval, packet tools, benchmarks and the demo."""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")     # keep the live display and --json output clean
warnings.filterwarnings("ignore", category=FutureWarning)

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Cloud-device collaborative continual adaptation for multimodal LLMs.")
packet_app = typer.Typer(no_args_is_help=True, help="Inspect uplink/update packets.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print JSON and a table.")
app.add_typer(packet_app, name="packet")
app.add_typer(bench_app, name="bench")
console = Console(stderr=True)


def _threads(n: int | None) -> None:
    import torch

    torch.set_num_threads(n or max(1, os.cpu_count() or 1))


def fail(message: str) -> None:
    """One-line error and exit 2: the message names the problem and the fix."""
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


@app.command()
def assets(rebuild: bool = typer.Option(False, help="Rebuild the safetensors cache of the LLM from the GGUF file.")):
    """Find the packaged weights and data, build the LLM cache once, and print sizes and load times."""
    from cdcca.assets import AssetError, cache_dir, check_assets

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


@app.command()
def pretrain(
    role: str = typer.Option(..., help="Which model to pretrain: 'device' (clean data) or 'cloud' (corruption-augmented)."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps (default: device 600, cloud 2000)."),
    batch_size: Optional[int] = typer.Option(None, help="Samples per step (default: 32 end-to-end, 64 consistency)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate of the one-cycle schedule (default 1e-3)."),
    aug_share: Optional[float] = typer.Option(None, help="Share of each batch drawn from corrupted copies (cloud default 0.5)."),
    init: Optional[Path] = typer.Option(None, help="Start from these ROLE.safetensors adapters (continued training)."),
    seed: int = typer.Option(0, help="Random seed; a run is deterministic given the seed on one machine."),
    out: Path = typer.Option(None, help="Output folder for ROLE.safetensors + ROLE.json (default: $CDCCA_CACHE/pretrained)."),
    force: bool = typer.Option(False, help="Retrain even if weights with the same config exist."),
    aug_family: Optional[str] = typer.Option(None, help="Cloud augmentation corruptions, comma-separated (default: all)."),
    torch_device: str = typer.Option("cpu", "--torch-device", help="torch device to train on: cpu or cuda."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: all cores)."),
    recipe: str = typer.Option("end-to-end", help="'end-to-end' (bridge + LoRA through the LLM) or 'consistency' "
                               "(cloud only: its bridge learns to map corrupted, partly dropped tokens to its clean "
                               "output, no LLM pass; starts from --init or the shipped cloud)."),
):
    """Train a role's bridge and adapters on easy-VQA train and export fp16 adapters with a recorded config."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from cdcca.assets import AssetError, cache_dir
    from cdcca.model.pair import build_model
    from cdcca.pretrain import PretrainConfig, pretrain as run_pretrain

    if role not in ("device", "cloud"):
        fail(f"--role must be 'device' or 'cloud', got {role!r}")
    if recipe not in ("end-to-end", "consistency"):
        fail(f"--recipe must be 'end-to-end' or 'consistency', got {recipe!r}")
    _threads(threads)
    if recipe == "consistency":
        if role != "cloud":
            fail("--recipe consistency trains the cloud teacher's bridge; use it with --role cloud")
        _pretrain_consistency(steps, batch_size, lr, init, seed, out or cache_dir() / "pretrained", force, torch_device)
        return
    overrides = {"seed": seed, "batch_size": batch_size or 32}
    if steps is not None:
        overrides["steps"] = steps
    if lr is not None:
        overrides["lr"] = lr
    if aug_share is not None:
        overrides["aug_share"] = aug_share
    if init is not None:
        overrides["init"] = str(init)
    if aug_family:
        overrides["aug_family"] = [s.strip() for s in aug_family.split(",")]
    try:
        cfg = PretrainConfig.for_role(role, **overrides)
    except ValueError as exc:
        fail(str(exc))
    out = out or cache_dir() / "pretrained"
    record_path = out / f"{role}.json"
    if record_path.is_file() and not force and json.loads(record_path.read_text()).get("digest") == cfg.digest():
        console.print(f"{role}: up to date at {out} (use --force to retrain)")
        return
    try:
        model = build_model(role)
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn(), console=console) as bar:
            task = bar.add_task(f"pretrain {role}", total=cfg.steps, loss=float("nan"))
            record = run_pretrain(model, cfg, out, device=torch_device,
                                  progress=lambda s, loss: bar.update(task, completed=s, loss=loss), log=console.print)
    except AssetError as exc:
        fail(str(exc))
    print(json.dumps(record, indent=2))


def _pretrain_consistency(steps, batch_size, lr, init, seed, out: Path, force: bool, torch_device: str) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from cdcca.assets import AssetError, write_json
    from cdcca.model.pair import pretrain_record, weights_file
    from cdcca.robust import ConsistencyConfig, train_consistency, training_views

    init = init or weights_file("cloud")
    if not Path(init).is_file():
        fail(f"--init {init} does not exist; pass a cloud.safetensors (e.g. the shipped src/cdcca/weights/cloud.safetensors)")
    overrides = {"seed": seed, "batch_size": batch_size or 64}
    if steps is not None:
        overrides["steps"] = steps
    if lr is not None:
        overrides["lr"] = lr
    cfg = ConsistencyConfig(**overrides)
    record_path = out / "cloud.json"
    if record_path.is_file() and not force and json.loads(record_path.read_text()).get("digest") == cfg.digest():
        console.print(f"cloud: up to date at {out} (use --force to retrain)")
        return
    try:
        clean, views = training_views(cfg)
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn(), console=console) as bar:
            task = bar.add_task("consistency (cloud bridge)", total=cfg.steps, loss=float("nan"))
            record = train_consistency(Path(init), cfg, out, clean, views, device=torch_device,
                                       progress=lambda s, loss: bar.update(task, completed=s, loss=loss), log=console.print)
    except AssetError as exc:
        fail(str(exc))
    previous = json.loads(Path(init).with_suffix(".json").read_text()) if Path(init).with_suffix(".json").is_file() \
        else pretrain_record("cloud")
    record = {**record, "role": "cloud", "stages": previous.get("stages", [previous]) + [{k: v for k, v in record.items()}]}
    write_json(record_path, record)
    print(json.dumps(record, indent=2))


def _eval_domain(model, prompter, data, qids, domain, role, direct) -> dict:
    from cdcca.evaluate import accuracy, test_tokens

    res = accuracy(model, prompter, data, qids, test_tokens(domain), direct=direct)
    return {"model": role, "shift": domain.corruption, "severity": domain.severity, **res}


@app.command("eval")
def eval_cmd(
    model: str = typer.Option("device", help="'device' or 'cloud'."),
    shift: str = typer.Option("clean", help="Corruption name (see `cdcca eval --help`), or 'clean'."),
    severity: int = typer.Option(5, help="Severity 1..5 of --shift."),
    stream: Optional[str] = typer.Option(None, help="Evaluate every domain of a named sequence ('default') or a comma list NAME:SEV,..."),
    n: int = typer.Option(1000, help="Held-out test questions per domain."),
    weights: Optional[Path] = typer.Option(None, help="Folder with ROLE.safetensors (default: the shipped weights)."),
    direct: bool = typer.Option(True, help="Also generate direct answers (DA); --no-direct scores MC only (faster)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
):
    """Held-out accuracy (direct answer and multiple choice, 0–1) of a model, clean or under shift."""
    from cdcca.assets import AssetError, load_tokenizer
    from cdcca.data.easyvqa import load_split
    from cdcca.data.stream import Domain, heldout_questions, resolve_sequence
    from cdcca.model.pair import load_pretrained
    from cdcca.model.prompt import Prompter

    _threads(threads)
    try:
        domains = resolve_sequence(stream) if stream else [Domain.parse(shift if shift == "clean" else f"{shift}:{severity}")]
        net = load_pretrained(model, weights)
        data = load_split("test")
        prompter = Prompter(load_tokenizer(), data.candidates)
    except (ValueError, AssetError) as exc:
        fail(str(exc))
    qids = heldout_questions(data, n)
    t = time.perf_counter()
    rows = [_eval_domain(net, prompter, data, qids, d, model, direct) for d in domains]
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
    from cdcca import wire

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


@bench_app.command("uts")
def bench_uts(
    n: int = typer.Option(400, help="Stream requests over the default shift sequence."),
    repeats: int = typer.Option(5, help="Timing repeats (medians are reported)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
    threads: Optional[int] = typer.Option(1, help="torch CPU threads (default 1: answer and UTS timed alike)."),
):
    """UTS on the default shift stream: scorer AUROC, uplink bytes and ratios, and scoring overhead."""
    from cdcca.assets import AssetError
    from cdcca.bench.uts import run_bench

    if n < 4:
        fail(f"--n must be at least 4 (one request per domain), got {n}")
    _threads(threads)
    try:
        res = run_bench(n, repeats=repeats, log=None if as_json else console.print)
    except AssetError as exc:
        fail(str(exc))
    if not as_json:
        table = Table(title=f"UTS on {', '.join(res['domains'])} ({res['n']} requests, {res['model']})")
        table.add_column("measure")
        table.add_column("value")
        for name, value in res["auroc"].items():
            table.add_row(f"AUROC {name}" + (" (best)" if name == res["best_sample_scorer"] else ""), f"{value:.3f}")
        d = res["default"]
        table.add_row("upload rate (default)", f"{d['upload_rate']:.3f} ({d['uploaded']} samples)")
        table.add_row("bytes / uploaded sample", f"{d['bytes_per_uploaded_sample']:.0f}")
        for key in ("ratio_full_tokens", "ratio_png", "ratio_png_source_file", "ratio_jpeg224"):
            table.add_row(key, f"{res[key]:.4f}")
        t = res["timing"]
        table.add_row("answer ms / request", f"{t['answer_ms_per_request']:.2f}")
        for name, ms in t["uts_ms_per_request_all_uploaded"].items():
            table.add_row(f"UTS ms / request, all uploaded ({name})", f"{ms:.3f} ({t['overhead_by_token_scorer'][name]:.1%})")
        table.add_row("overhead (default, all uploaded)", f"{t['overhead']:.1%}")
        table.add_row("overhead (at upload rate)", f"{t['overhead_at_upload_rate']:.1%}")
        table.add_row("view_consistency scorer overhead", f"{t['view_consistency_overhead']:.1%}")
        console.print(table)
        for note in res["notes"]:
            console.print(f"note: {note}")
    print(json.dumps(res))



@app.command()
def demo(
    preset: str = typer.Option("quick", help="Run size: quick (minutes on 2 cores), paper (longer), tiny (random models, seconds)."),
    out: Path = typer.Option(Path("runs/demo"), help="Output folder: metrics.json, accuracy.png, bytes.png, report.html, state dirs."),
    devices: int = typer.Option(1, help="Number of in-process devices, each with its own slice of the stream and state dir."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: all cores)."),
    oracle: bool = typer.Option(False, help="Also run the oracle (true labels on the same uploads, dense updates) for the "
                                "report's side-by-side table; about as long again as the run, cached per settings."),
):
    """The whole continual loop: stream → answer → UTS uplink → AKD → DWC downlink → apply, with a report."""
    from cdcca.assets import AssetError
    from cdcca.demo import run_demo

    _threads(threads)
    if devices < 1:
        fail(f"--devices must be ≥ 1, got {devices}")
    try:
        metrics = run_demo(preset, out, devices=devices, console=console, oracle=oracle)
    except (AssetError, ValueError) as exc:
        fail(str(exc))
    s = metrics["summary"]
    console.print(f"source-only MC {s['source_only_mc']:.3f} → adapted MC {s['adapted_mc']:.3f}; "
                  f"up {s['bytes_up_total'] / 1024:.1f} KiB, down {s['bytes_down_total'] / 1024:.1f} KiB; "
                  f"{s['wall_s']:.0f} s. Report: {out / 'report.html'}")
    print(json.dumps(s))



@bench_app.command("akd")
def bench_akd(
    variants: Optional[str] = typer.Option(None, help="Comma-separated variants (default: all): source-only, cdcca, cdcca-dense, oracle, pseudo-label, no-gate, no-source-replay, soft-targets, akd-v1, loss:ce|ce+mse|ce+mse+wave|full, keep:R:ood|energy."),
    seeds: str = typer.Option("0", help="Comma-separated seeds; one row per (variant, seed)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a setting of every variant: FIELD=VALUE, e.g. akd.source_replay=0.5, uts.budget=320, dwc.budget_bytes=524288 (repeatable)."),
    save_states: Optional[Path] = typer.Option(None, help="Also save the device's adapter state after each round (for bench dwc)."),
    teacher_study: Optional[str] = typer.Option(None, help="Instead: teacher vs device accuracy on the uploaded samples of this domain (e.g. pixelate:5), per token view."),
    label_study: Optional[str] = typer.Option(None, help="Instead: teacher vs device accuracy on the uploads of every domain of this stream ('default'), per upload budget and teacher-confidence gate (no training)."),
    weights: Optional[Path] = typer.Option(None, help="--label-study: folder with the cloud.safetensors to study (default: shipped)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
):
    """AKD ablations on the default continual stream: final held-out MC over shifted domains, source MC, cloud time."""
    from cdcca.bench import akd

    _threads(threads)
    if label_study:
        try:
            rows = akd.label_study(label_study, weights=str(weights) if weights else None)
        except ValueError as exc:
            fail(str(exc))
        if not as_json:
            table = Table(title="Teacher vs device on the uploads (MC), pooled over the stream's domains")
            for col in ("domain", "budget", "skip top", "labels", "gate", "kept/uploads", "teacher", "device", "lead"):
                table.add_column(col)
            for r in akd.pool_label_study(rows):
                r["domain"] = "all"
                lead = None if r["teacher_mc"] is None else r["teacher_mc"] - r["device_mc"]
                table.add_row(r["domain"], str(r["budget"]), f"{r['skip_top']:.2f}", r["labels"], f"{r['gate']:.2f}", f"{r['kept']}/{r['uploads']}",
                              "-" if r["teacher_mc"] is None else f"{r['teacher_mc']:.3f}",
                              "-" if r["device_mc"] is None else f"{r['device_mc']:.3f}",
                              "-" if lead is None else f"{100 * lead:+.1f}")
            console.print(table)
        print(json.dumps(rows))
        return
    if teacher_study:
        try:
            rows = akd.teacher_study(teacher_study)
        except ValueError as exc:
            fail(str(exc))
        if not as_json:
            for r in rows:
                console.print(r)
        print(json.dumps(rows))
        return
    names = [v.strip() for v in variants.split(",")] if variants else None
    base = {"save_states": str(save_states)} if save_states else None
    try:
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
        rows = akd.run(names, on_result=None if as_json else lambda r: console.print(r), base=base, seeds=seed_list,
                       settings=set_ or [])
    except ValueError as exc:
        fail(str(exc))
    if not as_json:
        def fmt(v):
            return "-" if v is None else f"{v:.3f}"

        table = Table(title="AKD on the default stream (held-out MC)")
        for col in ("variant", "seed", "adapted MC", "source MC", "trained/uploads", "teacher on trained",
                    "device on trained", "down KiB/round", "teacher s", "student s"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["variant"], str(r["seed"]), fmt(r["adapted_mc"]), fmt(r["source_mc"]),
                          f"{r['trained']}/{r['uploads']}", fmt(r["upload_teacher_mc"]), fmt(r["upload_device_mc"]),
                          f"{r['bytes_down_per_round'] / 1024:.0f}", str(r["teacher_s"]), str(r["student_s"]))
        console.print(table)
    print(json.dumps(rows))


@bench_app.command("dwc")
def bench_dwc(
    states: Path = typer.Option(..., help="Folder of per-round AKD adapter states (from `cdcca bench akd --variants loss:full --save-states DIR`)."),
    settings: Optional[str] = typer.Option(None, help="Comma-separated settings (default: all), e.g. int8:128K,nf4:32K,int8:128K:no-ef."),
    n: int = typer.Option(200, help="Held-out questions per domain."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads."),
):
    """Downlink bytes vs accuracy on real AKD deltas, for several budgets and bit widths, with and without error feedback."""
    from cdcca.bench import dwc

    _threads(threads)
    names = [v.strip() for v in settings.split(",")] if settings else None
    try:
        result = dwc.run(states, heldout_n=n, names=names, on_result=None if as_json else lambda r: console.print(r))
    except (FileNotFoundError, KeyError) as exc:
        fail(str(exc))
    if not as_json:
        table = Table(title=f"DWC on {result['rounds']} rounds of AKD deltas (dense fp16 delta {result['dense_fp16_bytes'] / 1e6:.2f} MB)")
        for col in ("setting", "bytes/round", "× dense fp16", "× device model", "held-out MC", "Δ vs dense"):
            table.add_column(col)
        for r in result["results"]:
            table.add_row(r["setting"], str(r["bytes_per_round"]), f"{r['ratio_dense_fp16']:.4f}",
                          f"{r.get('ratio_device_model', float('nan')):.2e}", f"{r['heldout_mc']:.3f}", f"{r['delta_vs_dense']:+.3f}")
        console.print(table)
        console.print(f"throughput: {result['throughput']}")
    print(json.dumps(result))


# -- fleet: the protocol over Flower, a SuperLink and N SuperNodes on this machine (logic in cdcca.fleet.deploy) --
fleet_app = typer.Typer(no_args_is_help=True, help="Run the protocol over Flower: a SuperLink (cloud) and SuperNodes (devices).")
app.add_typer(fleet_app, name="fleet")


@fleet_app.command("up")
def fleet_up(
    devices: int = typer.Option(2, help="SuperNodes (devices) to start on 127.0.0.1, named dev-1..dev-N."),
    state: Path = typer.Option(..., help="State dir: certificates, node keys, logs, cloud and device state."),
    host: str = typer.Option("127.0.0.1", help="Address the SuperLink binds; anything but loopback requires TLS."),
    port: int = typer.Option(9092, help="SuperLink port (Fleet, Control and Runtime APIs share it)."),
    insecure: bool = typer.Option(False, "--insecure", help="No TLS and no node authentication (loopback only)."),
    tiny: bool = typer.Option(False, "--tiny", help="Tiny random models: a transport check that needs no weights."),
):
    """Start a SuperLink and N SuperNodes with TLS and node authentication; prints the fleet as JSON."""
    from cdcca.fleet.deploy import DeployError, up

    try:
        spec = up(state, devices, host=host, port=port, insecure=insecure, tiny=tiny, log=console.print)
    except DeployError as exc:
        fail(str(exc))
    print(json.dumps({"state": spec.state, "superlink": spec.address, "devices": spec.devices,
                      "node_ids": spec.node_ids, "tls": not spec.insecure}))


@fleet_app.command("run")
def fleet_run(
    state: Path = typer.Option(..., help="State dir of a fleet started with `cdcca fleet up`."),
    rounds: int = typer.Option(1, help="Rounds to run; a run continues after the rounds already logged."),
    config: Optional[str] = typer.Option(None, help="More run config, e.g. 'akd-epochs=1 dwc-budget-kb=64' "
                                                    "(keys: src/cdcca/fleet/app/pyproject.toml)."),
    timeout: float = typer.Option(3600, help="Stop the run after this many seconds."),
):
    """Run the fleet app (`flwr run`), stream its log to stderr, print the per-round records as JSON."""
    import shlex
    import tomllib

    from cdcca.fleet.deploy import DeployError, run

    if rounds < 1:
        fail(f"--rounds must be at least 1, got {rounds}")
    try:
        extra = tomllib.loads("\n".join(shlex.split(config or "", posix=False)))
    except tomllib.TOMLDecodeError as exc:
        fail(f"--config must be 'key=value ...' with TOML values (strings in double quotes): {exc}")
    try:
        result = run(state, rounds, config=extra, timeout=timeout, echo=lambda line: print(line, file=sys.stderr))
    except DeployError as exc:
        fail(str(exc))
    if not result.ok:
        fail(f"run {result.run_id} ended {result.status}; log: {result.log_path}")
    print(json.dumps({"run_id": result.run_id, "status": result.status, "rounds": result.rounds}))


@fleet_app.command("down")
def fleet_down(state: Path = typer.Option(..., help="State dir of a fleet started with `cdcca fleet up`.")):
    """Stop the SuperLink and SuperNodes that `cdcca fleet up` started (by process group)."""
    from cdcca.fleet.deploy import down

    stopped = down(state)
    console.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")



device_app = typer.Typer(no_args_is_help=True, help="Device runtime: state dir with adapter versions and a durable outbox.")
cloud_app = typer.Typer(no_args_is_help=True, help="Cloud runtime: inbox, per-device mirrors, AKD → DWC rounds.")
app.add_typer(device_app, name="device")
app.add_typer(cloud_app, name="cloud")
STATE_HELP = "State directory of this runtime."


def _device(state: Path):
    from cdcca.device import DeviceRuntime
    from cdcca.store import StoreError

    try:
        return DeviceRuntime.open(state)
    except (FileNotFoundError, ValueError, StoreError) as exc:
        fail(str(exc))


@device_app.command("init")
def device_init(state: Path = typer.Option(..., help=STATE_HELP), device_id: str = typer.Option(..., "--id", help="Device name."),
                tiny: bool = typer.Option(False, help="Tiny random model (transport checks only)."),
                index: int = typer.Option(0, help="This device's slice of the request stream (0-based)."),
                n_devices: int = typer.Option(1, help="Number of devices sharing the stream.")):
    """Create a device state dir holding the pretrained adapters as version 0."""
    from cdcca.device import DeviceRuntime

    try:
        dev = DeviceRuntime.create(state, device_id, tiny=tiny, stream={"index": index, "n_devices": n_devices})
    except FileExistsError as exc:
        fail(str(exc))
    print(json.dumps(dev.status()))


@device_app.command("status")
def device_status(state: Path = typer.Option(..., help=STATE_HELP)):
    """Version, hash, kept versions, outbox size and bytes sent/received."""
    print(json.dumps(_device(state).status()))


@device_app.command("serve")
def device_serve(state: Path = typer.Option(..., help=STATE_HELP), round: int = typer.Option(..., help="Stream round to answer.")):
    """Answer this device's requests of one round; uncertain samples go to the outbox (UTS)."""
    print(json.dumps(_device(state).serve_round(round)))


@device_app.command("uplink")
def device_uplink(state: Path = typer.Option(..., help=STATE_HELP), out: Path = typer.Option(..., help="Where to write the uplink packet."),
                  max_samples: int = typer.Option(256, help="Most samples in one packet.")):
    """Pack pending outbox samples into an uplink packet (they stay in the outbox until acknowledged)."""
    from cdcca.wire import write_packet

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
    from cdcca.wire import PacketError

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


def _cloud(state: Path, tiny: bool):
    from cdcca.cloud import CloudRuntime

    return CloudRuntime.open(state, tiny=tiny)


@cloud_app.command("receive")
def cloud_receive(packet: Path, state: Path = typer.Option(..., help=STATE_HELP), tiny: bool = typer.Option(False, help="Tiny models."),
                  ack_out: Optional[Path] = typer.Option(None, help="Write the acknowledged sample ids here (JSON).")):
    """Commit an uplink packet to the inbox and print the acknowledged sample ids."""
    from cdcca.wire import PacketError

    try:
        ids = _cloud(state, tiny).receive(packet.read_bytes())
    except PacketError as exc:
        fail(str(exc))
    if ack_out:
        ack_out.write_text(json.dumps(ids))
    print(json.dumps({"acknowledged": len(ids)}))


@cloud_app.command("round")
def cloud_round(state: Path = typer.Option(..., help=STATE_HELP), device_id: str = typer.Option(..., "--device", help="Device name."),
                out: Path = typer.Option(..., help="Where to write the update packet."), tiny: bool = typer.Option(False, help="Tiny models.")):
    """AKD → DWC for one device's new uploads; the update packet is stored before it is written to --out."""
    from cdcca.wire import write_packet

    cloud = _cloud(state, tiny)
    packet = cloud.run_round(device_id)
    if packet is None:
        fail(f"no new uploads from {device_id}: nothing to distil")
    write_packet(out, packet)
    print(json.dumps({"update": str(out), "bytes": len(packet), "metrics": cloud.metrics(device_id)[-1]}))


@cloud_app.command("resync")
def cloud_resync(state: Path = typer.Option(..., help=STATE_HELP), device_id: str = typer.Option(..., "--device", help="Device name."),
                 out: Path = typer.Option(..., help="Where to write the dense resync packet."), tiny: bool = typer.Option(False, help="Tiny models.")):
    """A full dense adapter state for a device that fell out of sync."""
    from cdcca.wire import write_packet

    packet = _cloud(state, tiny).resync(device_id)
    write_packet(out, packet)
    print(json.dumps({"resync": str(out), "bytes": len(packet)}))


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
