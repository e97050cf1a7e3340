"""The pretraining stages behind `cdcca pretrain`: each trains a role's adapters with one recipe, unless its
record is up to date, and writes the weights and their record (a cloud stage chains the stages before it)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from cdcca.assets import SHIPPED_WEIGHTS, AssetError
from cdcca.atomic import write_json
from cdcca.cli.common import console, fail
from cdcca.config import RunConfig, apply, parse_sets
from cdcca.data.features import augmented_cache_path, augmented_features, cached_features, feature_cache_path
from cdcca.data.task import Task, TaskError
from cdcca.model.pair import build_model, pretrain_record, weights_file
from cdcca.model.spec import PairSpec, SpecError, differences, resolve_spec, use_spec
from cdcca.recipes.checkpoint import file_sha256
from cdcca.recipes.consistency import ConsistencyConfig, train_consistency, training_views
from cdcca.recipes.prefix_targets import TargetConfig, targets_for, targets_key
from cdcca.recipes.pretrain import PretrainConfig
from cdcca.recipes.pretrain import pretrain as run_pretrain
from cdcca.recipes.readout import ReadoutConfig, train_readout
from cdcca.trained_pair import ROLES, PairError, open_pair, write_record
from cdcca.uplink.codec import build_token_basis
from cdcca.uplink.tokens import build_token_stats


def end_to_end(role: str, task: Task, steps, batch_size, lr, aug_share, aug_family, init, seed: int, out: Path,
               force: bool, torch_device: str, aug_variants: int | None = None, spec: PairSpec | None = None) -> None:
    """The end-to-end recipe (bridge + LoRA through the LLM) for either role, unless its record is up to date."""
    spec = spec or PairSpec()
    models = {"encoder": spec.encoder, **asdict(spec.role(role))} if spec != PairSpec() else {}   # shipped: none
    overrides = _given({"seed": seed, "batch_size": batch_size or 32, "data": task.split("train").key, "model": models},
                       steps=steps,
                       lr=lr, aug_share=aug_share, init=None if init is None else str(init), aug_variants=aug_variants,
                       aug_family=_names(aug_family))
    try:
        cfg = PretrainConfig.for_role(role, **overrides)
    except ValueError as exc:
        fail(str(exc))
    if up_to_date(role, out, cfg.digest(), force):
        return
    try:
        _cache_features(task.split("train"), cfg, torch_device)
        model = build_model(role)
        with _loss_bar(f"pretrain {role}", cfg.steps) as progress:
            record = run_pretrain(model, cfg, out, task, device=torch_device, progress=progress, log=console.print)
    except AssetError as exc:
        fail(str(exc))
    print(json.dumps(record, indent=2))


def spec_of(out: Path, sets: list[str] | None) -> PairSpec:
    """The pair's models: what ``out`` already records (a new directory: the defaults), with ``--set model.*`` on
    top; built from from now on in this process. Any other --set is refused (pretraining takes its own options)."""
    try:
        settings = parse_sets(sets or [])
        other = sorted(k for k in settings if not k.startswith("model.") or k.split(".")[1] in ("tiny", "weights"))
        if other:
            fail(f"--set {other[0]}: pretrain reads only the models (model.encoder, model.device.*, model.cloud.*); "
                 "its training knobs are its own options")
        base = open_pair(out).spec if (out / "pair.json").is_file() else PairSpec()
        spec = resolve_spec(apply(RunConfig(), settings).model, base)
    except (ValueError, PairError, SpecError) as exc:
        fail(str(exc))
        raise   # unreachable: fail raises
    if spec.encoder != base.encoder and any((out / f"{r}.safetensors").is_file() for r in ROLES):
        fail(f"{out} holds adapters trained on encoder {base.encoder}; both roles of a pair read one encoder — use "
             "another --out for model.encoder=" + spec.encoder)
    use_spec(spec)
    if spec != PairSpec():
        console.print(f"models: {spec.describe()}")
    return spec


def quick_start(role: str, spec: PairSpec, given: dict) -> tuple[Path | None, dict]:
    """Where ``--preset quick`` starts a role: the shipped adapters when the role's model is the shipped one,
    else fresh adapters with the recipe's full step count (the shipped ones would not fit)."""
    changed = [k for k in differences(spec, PairSpec()) if k == "encoder" or k.startswith(role)]
    if not changed:
        return shipped_adapters(role), given
    console.print(f"--preset quick: {', '.join('model.' + k for k in changed)} differ from the shipped pair, so the "
                  f"{role} starts from fresh adapters with the recipe's default steps")
    return None, {k: v for k, v in given.items() if k not in ("init", "steps")}


def task_of(data: Path | None, eval_file: Path | None) -> Task:
    """The task ``--data``/``--eval`` name (both or neither: neither is the built-in easy-VQA), checked whole."""
    if (data is None) != (eval_file is None):
        fail("--data and --eval go together: your task's train.jsonl and test.jsonl (docs/DATA.md)")
    if data is None:
        console.print("pretraining on easy-VQA (the shipped pair's task); --data train.jsonl --eval test.jsonl for yours")
        return Task()
    try:
        task = Task.from_files(data, eval_file)
        task.check()
    except (TaskError, ValueError) as exc:
        fail(str(exc))
    return task


def check_out(out: Path, task: Task, force: bool) -> None:
    """Refuse to mix tasks in one weights directory (its adapters would answer another task's questions)."""
    try:
        recorded = open_pair(out).record["task"] if (out / "pair.json").is_file() else None
    except PairError:
        recorded = None
    if recorded is not None and recorded.get("digest") != task.record()["digest"] and not force:
        fail(f"{out} holds a pair trained on {recorded['name']} ({recorded.get('train') or 'easy-VQA'}); "
             "use another --out, or --force to replace it")


def shipped_adapters(role: str) -> Path:
    """The shipped role's adapters: where ``--preset quick`` starts (they already map encoder tokens into the LLM)."""
    return SHIPPED_WEIGHTS / f"{role}.safetensors"


def finish_pair(out: Path, task: Task, spec: PairSpec | None = None) -> None:
    """Write the pair's record; once both roles are trained, fit its token statistics (the task's clean train
    tokens) and its uplink basis (those images and both bridges), so the directory serves on its own."""
    stages = {r: json.loads((out / f"{r}.json").read_text()) for r in ROLES if (out / f"{r}.json").is_file()}
    write_record(out, task, {r: rec.get("stages", [rec]) for r, rec in stages.items()}, spec=spec)
    pair = open_pair(out)
    if all((out / f"{r}.safetensors").is_file() for r in ROLES):
        with console.status("fitting the pair's token statistics and uplink basis on its train images …"):
            build_token_stats(out / "token_stats.safetensors", task.split("train"))
            build_token_basis(out / "token_basis.safetensors", pair)
        write_record(out, task, {r: rec.get("stages", [rec]) for r, rec in stages.items()}, spec=spec)
        console.print(f"pair ready: {out} (cdcca weights inspect {out}; then --weights {out})")
    else:
        console.print(f"{out}: {', '.join(pair.missing())} still to come (pretrain the other role with the same --out)")


def _cache_features(data, cfg: PretrainConfig, torch_device: str) -> None:
    """Encode the train images once, clean and (when the recipe mixes them in) each corrupted copy, with a
    progress bar each; a cache already on disk is not read here (the recipe reads it, once)."""
    jobs = [] if feature_cache_path(data, "clean", 0, 0).is_file() else \
        [("train images", lambda progress: cached_features(data, device=torch_device, progress=progress))]
    if cfg.aug_share > 0:
        jobs += [(f"corrupted copy {v + 1}/{cfg.aug_variants}",
                  lambda progress, v=v: augmented_features(data, cfg.aug_family, cfg.aug_severity, v, cfg.seed,
                                                           torch_device, progress))
                 for v in range(cfg.aug_variants)
                 if not augmented_cache_path(data, cfg.aug_family, cfg.aug_severity, v, cfg.seed).is_file()]
    for label, encode in jobs:
        with Progress(TextColumn(f"[bold]encoding {label}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeRemainingColumn(), console=console) as bar:
            job = bar.add_task("encode", total=len(data.images))
            encode(lambda n, job=job, bar=bar: bar.update(job, completed=n))


def _names(text: str | None) -> list[str] | None:
    """A comma-separated option as a list (None: not given)."""
    return [s.strip() for s in text.split(",")] if text else None


def _given(base: dict, **options) -> dict:
    """``base`` plus the options the user gave (None keeps the recipe's default)."""
    return {**base, **{k: v for k, v in options.items() if v is not None}}


def up_to_date(role: str, out: Path, digest: str, force: bool, init: Path | None = None) -> bool:
    """Whether ``out/{role}.json`` already records this exact config — and, for a stage that continues
    from ``init``, that same start (then say so and skip the run)."""
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
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task(description, total=total, loss=float("nan"))
        yield lambda s, loss: bar.update(task, completed=s, loss=loss)


def consistency(task: Task, steps, batch_size, lr, init, seed, out: Path, force: bool, torch_device: str,
                target_images: int | None = None, targets: bool = False, aug_family: str | None = None) -> None:
    """The cloud bridge's consistency recipe; ``targets``: towards clean prefixes first optimised through the LLM."""
    targets_cfg = TargetConfig(**_given({"seed": seed}, images=target_images)) if targets else None
    init = _cloud_init(init)
    given = _given({"seed": seed, "batch_size": batch_size or 64}, steps=steps, lr=lr,
                   aug_family=_names(aug_family))
    cfg = ConsistencyConfig(**given) if targets_cfg is None else \
        ConsistencyConfig.for_targets(targets_key(init, targets_cfg), **given)
    if up_to_date("cloud", out, cfg.digest(), force, init):
        return
    try:
        clean, views = training_views(cfg, task.split("train"))
        targets = None
        if targets_cfg is not None:
            with _loss_bar("prefix targets (images)", targets_cfg.images) as progress:
                targets = targets_for(init, targets_cfg, out, task, clean, progress, device=torch_device)
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
    init = Path(init or weights_file("cloud"))
    if not init.is_file():
        fail(f"--init {init} does not exist; pass a cloud.safetensors (e.g. the shipped src/cdcca/weights/cloud.safetensors)")
    return init


def _write_stage(record: dict, init: Path, out: Path) -> None:
    """``out/cloud.json``: this stage's record, with the stages of ``init``'s record before it (a hash chain)."""
    previous = json.loads(init.with_suffix(".json").read_text()) if init.with_suffix(".json").is_file() \
        else pretrain_record("cloud")
    record = {**record, "role": "cloud", "stages": previous.get("stages", [previous]) + [dict(record)]}
    write_json(out / "cloud.json", record)
    print(json.dumps(record, indent=2))


def readout(task: Task, samples: int | None, split_layer: int | None, batch_size, lr, aug_share, init, seed: int,
            out: Path, force: bool, torch_device: str = "cpu") -> None:
    """The cloud's read-out recipe: its top decoder layers learn to read its bridge's prefix."""
    init = _cloud_init(init)
    try:
        cfg = ReadoutConfig(**_given({"seed": seed}, samples=samples, split_layer=split_layer,
                                     batch_size=batch_size, lr=lr, aug_share=aug_share))
    except ValueError as exc:
        fail(str(exc))
    if up_to_date("cloud", out, cfg.digest(), force, init):
        return
    try:
        clean, views = training_views(ConsistencyConfig(), task.split("train"))   # the cached corrupted copies
        with _loss_bar("read-out (cloud top layers)", cfg.epochs * cfg.batches) as progress:
            record = train_readout(init, cfg, out, task, clean, views, progress, device=torch_device)
    except (AssetError, ValueError) as exc:
        fail(str(exc))
    _write_stage(record, init, out)
