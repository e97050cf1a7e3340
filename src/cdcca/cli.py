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
    seed: int = typer.Option(0, help="Random seed; a run is deterministic given the seed on one machine."),
    out: Path = typer.Option(None, help="Output folder for ROLE.safetensors + ROLE.json (default: $CDCCA_CACHE/pretrained)."),
    force: bool = typer.Option(False, help="Retrain even if weights with the same config exist."),
    aug_family: Optional[str] = typer.Option(None, help="Cloud augmentation corruptions, comma-separated (default: all)."),
    torch_device: str = typer.Option("cpu", "--torch-device", help="torch device to train on: cpu or cuda."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: all cores)."),
):
    """Train a role's bridge and adapters on easy-VQA train and export fp16 adapters with a recorded config."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from cdcca.assets import AssetError, cache_dir
    from cdcca.model.pair import build_model
    from cdcca.pretrain import PretrainConfig, pretrain as run_pretrain

    if role not in ("device", "cloud"):
        fail(f"--role must be 'device' or 'cloud', got {role!r}")
    _threads(threads)
    overrides = {"seed": seed}
    if steps is not None:
        overrides["steps"] = steps
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


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
