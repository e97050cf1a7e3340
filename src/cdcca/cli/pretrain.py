"""``cdcca pretrain``: the end-to-end recipe for either role, and the cloud-only stages that follow it
(consistency, prefix targets, read-out), each recorded as one link of the cloud's hash chain."""

from __future__ import annotations

from pathlib import Path

import typer

from cdcca.assets import cache_dir
from cdcca.cli.common import Recipe, Role, SetOpt, fail, torch_device_or_fail, use_threads

# the options each recipe reads (besides --role, --init, --seed, --out, --force, --threads); any other is refused
RECIPE_OPTIONS = {
    "end-to-end": ("steps", "batch_size", "lr", "aug_share", "aug_family", "aug_variants", "torch_device"),
    "consistency": ("steps", "batch_size", "lr", "aug_family", "torch_device"),
    "targets": ("steps", "batch_size", "lr", "torch_device", "target_images"),
    "readout": ("batch_size", "lr", "aug_share", "readout_samples", "split_layer", "torch_device"),
}


# pretraining presets for the end-to-end recipe: quick continues from the shipped adapters (they already map
# the encoder's tokens into the LLM), so a new task fits both roles on 2 cores in well under an hour
PRESETS = {"quick": {"device": {"steps": 300, "init": "shipped"},
                     "cloud": {"steps": 300, "init": "shipped", "aug_variants": 2}},
           "full": {"device": {}, "cloud": {}}}


def pretrain(
    role: Role = typer.Option(..., help="Which model to pretrain: device (clean data) or cloud (corruption-augmented)."),
    data: Path | None = typer.Option(None, "--data", help="Your task's train.jsonl (docs/DATA.md); default: easy-VQA train."),
    eval_file: Path | None = typer.Option(None, "--eval", help="Your task's test.jsonl: the pair's test images "
                                          "(streams, held-out and clean figures); needed with --data."),
    preset: str = typer.Option("full", help="end-to-end: quick (from the shipped adapters, device 300 / cloud 300 steps, "
                               "2 corrupted copies: ~40 min for both roles on 2 cores with 5,000 images) or full (the "
                               "recipe's defaults, from scratch)."),
    aug_variants: int | None = typer.Option(None, help="end-to-end: corrupted copies of the train images cached as "
                                            "features (default 4; quick 2)."),
    steps: int | None = typer.Option(None, help="Optimizer steps (default: end-to-end device 600, cloud 2000; "
                                     "consistency 2000; targets 1500; not for readout, which runs 2 epochs)."),
    batch_size: int | None = typer.Option(None, help="Samples per step (default: end-to-end 32, consistency 64, "
                                          "targets 64, readout 32)."),
    lr: float | None = typer.Option(None, help="Peak learning rate after the warm-up (default: end-to-end 1e-3, "
                                    "consistency 3e-4, targets 1e-3, readout 1e-3)."),
    aug_share: float | None = typer.Option(None, help="Share of samples seen through corrupted copies (default: "
                                           "end-to-end device 0, cloud 0.5; readout 0.5; not for consistency or targets)."),
    init: Path | None = typer.Option(None, help="Start from these ROLE.safetensors adapters (continued training; "
                                     "--preset quick: the shipped ones)."),
    seed: int = typer.Option(0, help="Random seed; a run is deterministic given the seed on one machine."),
    out: Path = typer.Option(None, help="The weights directory: ROLE.safetensors + ROLE.json, and once both roles are "
                             "there the pair's record, token statistics and uplink basis (default: $CDCCA_CACHE/pretrained)."),
    force: bool = typer.Option(False, help="Retrain even if weights with the same config exist (overwrites ROLE.safetensors and ROLE.json in --out)."),
    aug_family: str | None = typer.Option(None, help="end-to-end and consistency: the corruptions of the corrupted "
                                          "copies, comma-separated: the nine families and the compositions augmix, spectral_noise "
                                          "(default: cloud the nine, device none)."),
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
    sets: SetOpt = None,
):
    """Train a role's bridge and adapters on your task (--data/--eval; default easy-VQA) into a weights directory;
    once both roles are there, fit the pair's token statistics and uplink basis and write its record."""

    role, recipe = role.value, recipe.value
    refuse_unused(recipe, steps=steps, batch_size=batch_size, lr=lr, aug_share=aug_share, aug_family=aug_family,
                  aug_variants=aug_variants, torch_device=torch_device, target_images=target_images,
                  readout_samples=readout_samples, split_layer=split_layer)
    if preset not in PRESETS:
        fail(f"--preset {preset!r} is not a pretraining preset; choose from {', '.join(PRESETS)}")
    if preset != "full" and recipe != "end-to-end":
        fail(f"--preset {preset} sets the end-to-end recipe's steps; --recipe {recipe} takes its own options")
    torch_device = torch_device_or_fail(torch_device)
    use_threads(threads)
    from cdcca.cli import pretrain_stages as stages  # torch: imported when the command runs, not for --help

    task = stages.task_of(data, eval_file)
    out = (out or cache_dir() / "pretrained").resolve()
    stages.check_out(out, task, force)
    spec = stages.spec_of(out, sets)         # the models: --set model.* over what --out already records
    if recipe in ("consistency", "targets", "readout"):
        if role != "cloud":
            fail(f"--recipe {recipe} trains the cloud teacher; use it with --role cloud")
        if recipe == "readout":
            stages.readout(task, readout_samples, split_layer, batch_size, lr, aug_share, init, seed, out, force,
                           torch_device)
        else:
            stages.consistency(task, steps, batch_size, lr, init, seed, out, force, torch_device,
                               target_images if recipe == "targets" else None, targets=recipe == "targets",
                               aug_family=aug_family)
    else:
        given = PRESETS[preset][role]
        if given.get("init") == "shipped" and init is None:
            init, given = stages.quick_start(role, spec, given)
        stages.end_to_end(role, task, steps or given.get("steps"), batch_size, lr, aug_share, aug_family, init, seed,
                          out, force, torch_device, aug_variants or given.get("aug_variants"), spec)
    stages.finish_pair(out, task, spec)


def refuse_unused(recipe: str, **options) -> None:
    """Fail in one line on an option the recipe does not read (rather than ignore it silently)."""
    unused = [name for name, value in options.items() if value is not None and name not in RECIPE_OPTIONS[recipe]]
    if unused:
        flags = ", ".join("--" + name.replace("_", "-") for name in unused)
        reads = ", ".join("--" + name.replace("_", "-") for name in RECIPE_OPTIONS[recipe])
        fail(f"{flags} {'is' if len(unused) == 1 else 'are'} not used by --recipe {recipe} (it reads {reads})")
