"""``cdcca pretrain``: the end-to-end recipe for either role, and the cloud-only stages that follow it
(consistency, prefix targets, read-out), each recorded as one link of the cloud's hash chain."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import typer

from cdcca.assets import AssetError, cache_dir
from cdcca.atomic import write_json
from cdcca.cli.common import Recipe, Role, console, fail, torch_device_or_fail, use_threads

# the options each recipe reads (besides --role, --init, --seed, --out, --force, --threads); any other is refused
RECIPE_OPTIONS = {
    "end-to-end": ("steps", "batch_size", "lr", "aug_share", "aug_family", "torch_device"),
    "consistency": ("steps", "batch_size", "lr", "torch_device"),
    "targets": ("steps", "batch_size", "lr", "torch_device", "target_images"),
    "readout": ("batch_size", "lr", "aug_share", "readout_samples", "split_layer", "torch_device"),
}


def pretrain(
    role: Role = typer.Option(..., help="Which model to pretrain: device (clean data) or cloud (corruption-augmented)."),
    steps: int | None = typer.Option(None, help="Optimizer steps (default: end-to-end device 600, cloud 2000; "
                                     "consistency 2000; targets 1500; not for readout, which runs 2 epochs)."),
    batch_size: int | None = typer.Option(None, help="Samples per step (default: end-to-end 32, consistency 64, "
                                          "targets 64, readout 32)."),
    lr: float | None = typer.Option(None, help="Peak learning rate after the warm-up (default: end-to-end 1e-3, "
                                    "consistency 3e-4, targets 1e-3, readout 1e-3)."),
    aug_share: float | None = typer.Option(None, help="Share of samples seen through corrupted copies (default: "
                                           "end-to-end device 0, cloud 0.5; readout 0.5; not for consistency or targets)."),
    init: Path | None = typer.Option(None, help="Start from these ROLE.safetensors adapters (continued training)."),
    seed: int = typer.Option(0, help="Random seed; a run is deterministic given the seed on one machine."),
    out: Path = typer.Option(None, help="Output folder for ROLE.safetensors + ROLE.json (default: $CDCCA_CACHE/pretrained)."),
    force: bool = typer.Option(False, help="Retrain even if weights with the same config exist (overwrites ROLE.safetensors and ROLE.json in --out)."),
    aug_family: str | None = typer.Option(None, help="end-to-end: the corruptions of the corrupted copies, "
                                          "comma-separated (default: cloud all, device none)."),
    torch_device: str | None = typer.Option(None, "--torch-device", help="torch device to train on: cpu (the default), "
                                            "cuda, cuda:N or mps (every recipe; checked before anything loads)."),
    threads: int | None = typer.Option(None, help="torch CPU threads (default: all cores)."),
    recipe: Recipe = typer.Option(Recipe.end_to_end, help="end-to-end (bridge + LoRA through the LLM), consistency "
                               "(cloud only: its bridge learns to map corrupted, partly dropped tokens to its clean "
                               "output, no LLM pass; starts from --init or the shipped cloud) or targets (consistency "
                               "towards clean prefixes first optimised through the frozen LLM on train questions) or readout "
                               "(cloud only: the LoRA and norms of the LLM's top layers, from cached lower-layer states)."),
    target_images: int | None = typer.Option(None, help="--recipe targets: train images whose prefix is optimised "
                                             "(default 768)."),
    readout_samples: int | None = typer.Option(None, help="--recipe readout: train questions whose lower-layer states "
                                               "are cached (default 6144)."),
    split_layer: int | None = typer.Option(None, help="--recipe readout: decoder layers below this one stay frozen (default 24)."),
):
    """Train a role's bridge and adapters on easy-VQA train and export fp16 adapters with a recorded config."""

    role, recipe = role.value, recipe.value
    refuse_unused(recipe, steps=steps, batch_size=batch_size, lr=lr, aug_share=aug_share, aug_family=aug_family,
                  torch_device=torch_device, target_images=target_images, readout_samples=readout_samples,
                  split_layer=split_layer)
    torch_device = torch_device_or_fail(torch_device)
    use_threads(threads)
    if recipe in ("consistency", "targets", "readout"):
        if role != "cloud":
            fail(f"--recipe {recipe} trains the cloud teacher; use it with --role cloud")
        if recipe == "readout":
            _pretrain_readout(readout_samples, split_layer, batch_size, lr, aug_share, init, seed,
                              out or cache_dir() / "pretrained", force, torch_device)
            return
        from cdcca.recipes.prefix_targets import TargetConfig  # heavy: imported when the command runs, not for --help

        targets = TargetConfig(**_given({"seed": seed}, images=target_images)) if recipe == "targets" else None
        _pretrain_consistency(steps, batch_size, lr, init, seed, out or cache_dir() / "pretrained", force, torch_device,
                              targets)
        return
    _pretrain_end_to_end(role, steps, batch_size, lr, aug_share, aug_family, init, seed, out or cache_dir() / "pretrained",
                         force, torch_device)


def _pretrain_end_to_end(role: str, steps, batch_size, lr, aug_share, aug_family, init, seed: int, out: Path, force: bool,
                         torch_device: str) -> None:
    """The end-to-end recipe (bridge + LoRA through the LLM) for either role, unless its record is up to date."""
    from cdcca.model.pair import build_model  # heavy: imported when the command runs, not for --help
    from cdcca.recipes.pretrain import PretrainConfig  # heavy: imported when the command runs, not for --help
    from cdcca.recipes.pretrain import pretrain as run_pretrain  # heavy: imported when the command runs, not for --help

    overrides = _given({"seed": seed, "batch_size": batch_size or 32}, steps=steps, lr=lr, aug_share=aug_share,
                       init=None if init is None else str(init),
                       aug_family=[s.strip() for s in aug_family.split(",")] if aug_family else None)
    try:
        cfg = PretrainConfig.for_role(role, **overrides)
    except ValueError as exc:
        fail(str(exc))
    if _up_to_date(role, out, cfg.digest(), force):
        return
    try:
        model = build_model(role)
        with _loss_bar(f"pretrain {role}", cfg.steps) as progress:
            record = run_pretrain(model, cfg, out, device=torch_device, progress=progress, log=console.print)
    except AssetError as exc:
        fail(str(exc))
    print(json.dumps(record, indent=2))


def refuse_unused(recipe: str, **options) -> None:
    """Fail in one line on an option the recipe does not read (rather than ignore it silently)."""
    unused = [name for name, value in options.items() if value is not None and name not in RECIPE_OPTIONS[recipe]]
    if unused:
        flags = ", ".join("--" + name.replace("_", "-") for name in unused)
        reads = ", ".join("--" + name.replace("_", "-") for name in RECIPE_OPTIONS[recipe])
        fail(f"{flags} {'is' if len(unused) == 1 else 'are'} not used by --recipe {recipe} (it reads {reads})")


def _given(base: dict, **options) -> dict:
    """``base`` plus the options the user gave (None keeps the recipe's default)."""
    return {**base, **{k: v for k, v in options.items() if v is not None}}


def _up_to_date(role: str, out: Path, digest: str, force: bool, init: Path | None = None) -> bool:
    """Whether ``out/{role}.json`` already records this exact config — and, for a stage that continues
    from ``init``, that same start (then say so and skip the run)."""
    from cdcca.recipes.checkpoint import file_sha256  # here, not at the top: it imports torch (`cdcca --help` stays fast)

    record_path = out / f"{role}.json"
    if not record_path.is_file() or force:
        return False
    record = json.loads(record_path.read_text())
    if record.get("digest") != digest or (init is not None and record.get("init_sha256") != file_sha256(init)):
        return False
    console.print(f"{role}: up to date at {out} (use --force to retrain)")
    return True


@contextmanager
def _loss_bar(description: str, total: int) -> Iterator[Callable[[int, float], None]]:
    """A progress bar with the running loss; yields the ``progress(step, loss)`` callback the trainers take."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task(description, total=total, loss=float("nan"))
        yield lambda s, loss: bar.update(task, completed=s, loss=loss)


def _pretrain_consistency(steps, batch_size, lr, init, seed, out: Path, force: bool, torch_device: str,
                          targets_cfg=None) -> None:
    from cdcca.recipes.consistency import (  # heavy: imported when the command runs, not for --help
        ConsistencyConfig,
        train_consistency,
        training_views,
    )
    from cdcca.recipes.prefix_targets import targets_for, targets_key  # heavy: imported when the command runs, not for --help

    init = _cloud_init(init)
    given = _given({"seed": seed, "batch_size": batch_size or 64}, steps=steps, lr=lr)
    cfg = ConsistencyConfig(**given) if targets_cfg is None else \
        ConsistencyConfig.for_targets(targets_key(init, targets_cfg), **given)
    if _up_to_date("cloud", out, cfg.digest(), force, init):
        return
    try:
        clean, views = training_views(cfg)
        targets = None
        if targets_cfg is not None:
            with _loss_bar("prefix targets (images)", targets_cfg.images) as progress:
                targets = targets_for(init, targets_cfg, out, clean, progress, device=torch_device)
        with _loss_bar("consistency (cloud bridge)", cfg.steps) as progress:
            record = train_consistency(init, cfg, out, clean, views, device=torch_device, progress=progress,
                                       log=console.print, targets=None if targets is None else targets[:2])
    except AssetError as exc:
        fail(str(exc))
    if targets is not None:
        record["recipe"] = "targets"
        record["targets"] = {"config": asdict(targets_cfg), "key": cfg.targets, **targets[2]}
    _write_stage(record, init, out)


def _cloud_init(init: Path | None) -> Path:
    """The cloud adapters a cloud-only recipe starts from: ``--init`` or the shipped ones."""
    from cdcca.model.pair import weights_file  # heavy: imported when the command runs, not for --help

    init = Path(init or weights_file("cloud"))
    if not init.is_file():
        fail(f"--init {init} does not exist; pass a cloud.safetensors (e.g. the shipped src/cdcca/weights/cloud.safetensors)")
    return init


def _write_stage(record: dict, init: Path, out: Path) -> None:
    """``out/cloud.json``: this stage's record, with the stages of ``init``'s record before it (a hash chain)."""
    from cdcca.model.pair import pretrain_record  # heavy: imported when the command runs, not for --help

    previous = json.loads(init.with_suffix(".json").read_text()) if init.with_suffix(".json").is_file() \
        else pretrain_record("cloud")
    record = {**record, "role": "cloud", "stages": previous.get("stages", [previous]) + [dict(record)]}
    write_json(out / "cloud.json", record)
    print(json.dumps(record, indent=2))


def _pretrain_readout(samples: int | None, split_layer: int | None, batch_size, lr, aug_share, init, seed: int, out: Path,
                      force: bool, torch_device: str = "cpu") -> None:
    from cdcca.recipes.consistency import (  # heavy: imported when the command runs, not for --help
        ConsistencyConfig,
        training_views,
    )
    from cdcca.recipes.readout import ReadoutConfig, train_readout  # heavy: imported when the command runs, not for --help

    init = _cloud_init(init)
    try:
        cfg = ReadoutConfig(**_given({"seed": seed}, samples=samples, split_layer=split_layer,
                                     batch_size=batch_size, lr=lr, aug_share=aug_share))
    except ValueError as exc:
        fail(str(exc))
    if _up_to_date("cloud", out, cfg.digest(), force, init):
        return
    try:
        clean, views = training_views(ConsistencyConfig())      # the cached corrupted copies; --seed picks the samples
        with _loss_bar("read-out (cloud top layers)", cfg.epochs * cfg.batches) as progress:
            record = train_readout(init, cfg, out, clean, views, progress, device=torch_device)
    except (AssetError, ValueError) as exc:
        fail(str(exc))
    _write_stage(record, init, out)
