"""Pretraining recipe: train a role's bridge and adapters on the source domain (a task's train split:
easy-VQA's for the shipped pair, the user's ``train.jsonl`` for theirs).

The device trains on clean images only. The cloud trains with a generic random-corruption
augmentation (``aug_family`` at severities ``aug_severity``) and random token dropping, so its
robustness — and its ability to answer from the half token sets the uplink sends — comes from its
own training, never from the device's tokens. Encoder features are frozen and cached; a run is
resumable from ``{out}/{role}.ckpt.safetensors`` and exports fp16 adapters plus a JSON record.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from cdcca.atomic import write_json
from cdcca.data.augmix import check_family
from cdcca.data.corruptions import CORRUPTIONS
from cdcca.data.easyvqa import VQASet
from cdcca.data.features import augmented_features, cached_features
from cdcca.data.task import Task
from cdcca.metrics import cosine
from cdcca.model.mllm import MLLM, adapter_state, answer_loss, load_adapter_state, trainable_parameters
from cdcca.model.pair import model_prompter
from cdcca.model.prompt import Prompter
from cdcca.recipes.checkpoint import config_digest, file_sha256, load_checkpoint, optimizer_step, save_checkpoint


@dataclass
class PretrainConfig:
    role: str = field(default="device", metadata={"help": (
        "device (clean images) | cloud (also corrupted copies and dropped tokens)")})
    steps: int = field(default=600, metadata={"help": "optimiser steps"})
    batch_size: int = field(default=32, metadata={"help": "samples per step"})
    lr: float = field(default=1e-3, metadata={"help": "one-cycle peak; LoRA and a fresh bridge tolerate a high lr"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clip"})
    seed: int = field(default=0, metadata={"help": "seeds the initialisation, the batches and the augmentations"})
    aug_share: float = field(default=0.0, metadata={"help": "share of each batch drawn from corrupted copies (cloud: 0.5)"})
    aug_family: list[str] = field(default_factory=list, metadata={"help": (
        "corruptions of the cached corrupted copies (the cloud's: all)")})
    aug_severity: tuple[int, int] = field(default=(3, 5), metadata={"help": (
        "severity range of the corrupted copies (inclusive)")})
    aug_variants: int = field(default=4, metadata={"help": "corrupted copies of the train set, cached as features"})
    token_drop_share: float = field(default=0.25, metadata={"help": (
        "share of samples with a random subset of tokens masked out")})
    token_keep: tuple[float, float] = field(default=(0.25, 1.0), metadata={"help": (
        "share of tokens a masked sample keeps (uniform in this range)")})
    checkpoint_every: int = field(default=200, metadata={"help": "steps between resumable checkpoints"})
    init: str | None = field(default=None, metadata={"help": "continue from these fp16 adapters (recorded by SHA-256)"})
    data: str = field(default="train", metadata={"help": "the train split's content key (easy-VQA: 'train')"})
    model: dict = field(default_factory=dict, metadata={"help": (
        "the role's model and the encoder when they are not the shipped pair's (cdcca.model.spec); empty: shipped")})

    def __post_init__(self):
        check_family("PretrainConfig", self.aug_family)
        if not 0 <= self.aug_share <= 1 or (self.aug_share > 0 and not self.aug_family):
            raise ValueError("aug_share must be in [0, 1] and needs a non-empty aug_family")
        self.aug_severity = tuple(self.aug_severity)
        self.token_keep = tuple(self.token_keep)

    @classmethod
    def for_role(cls, role: str, **overrides) -> PretrainConfig:
        base = dict(role=role)
        if role == "cloud":
            base.update(steps=2000, aug_share=0.5, aug_family=sorted(CORRUPTIONS), token_drop_share=0.5)
        base.update(overrides)
        return cls(**base)

    def digest(self) -> str:
        return config_digest(self)


def one_cycle_lr(peak: float, step: int, steps: int, warmup: float) -> float:
    """Linear warm-up over the first ``warmup`` share of ``steps``, then cosine decay to 1 % of ``peak``."""
    warm = max(1, int(warmup * steps))
    if step < warm:
        return peak * (step + 1) / warm
    frac = (step - warm) / max(1, steps - warm)
    return cosine(peak, 0.01 * peak, frac)


def random_keep(batch: int, n_tokens: int, keep_range: tuple[float, float], gen: torch.Generator) -> torch.Tensor:
    """(B, P) bool masks keeping a random share in ``keep_range`` of the tokens (at least one)."""
    ratio = torch.empty(batch).uniform_(*keep_range, generator=gen)
    scores = torch.rand(batch, n_tokens, generator=gen)
    k = (ratio * n_tokens).ceil().clamp(min=1).long()
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return ranks < k[:, None]


def _training_features(cfg: PretrainConfig, data: VQASet, device: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Cached clean train tokens and, when the batch mixes in corrupted copies, those copies' tokens."""

    clean = cached_features(data, device=device)
    variants = [augmented_features(data, cfg.aug_family, cfg.aug_severity, v, cfg.seed, device)
                for v in range(cfg.aug_variants)] if cfg.aug_share > 0 else []
    return clean, variants


def _prepare_training(model: MLLM, cfg: PretrainConfig, out_dir: Path, device: str, log) -> tuple:
    """Load ``cfg.init``, build the optimizer and resume from the checkpoint in ``out_dir`` if one matches ``cfg``.

    Returns (optimizer, trainable parameters, named trainable parameters, checkpoint path, start step).
    """
    if cfg.init:
        load_adapter_state(model, {k: v.float() for k, v in load_file(cfg.init).items()})
    model.to(device).train()
    params = trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    ckpt = out_dir / f"{cfg.role}.ckpt.safetensors"
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    start, saved = load_checkpoint(ckpt, named, opt, cfg.digest())
    if saved:
        load_adapter_state(model, saved)
    if start:
        log(f"resuming {cfg.role} pretraining at step {start}")
    return opt, params, named, ckpt, start


def _draw_batch(cfg: PretrainConfig, data, prompter: Prompter, clean: torch.Tensor, variants: list[torch.Tensor],
                rng: np.random.Generator, gen: torch.Generator) -> tuple:
    """One step's (tokens, keep mask or None, tokenized text): random questions, a share of their images
    swapped for a corrupted copy, a share of the samples with tokens dropped."""
    q = rng.integers(0, len(data), cfg.batch_size)
    img = data.image_ids[q]
    toks = clean[img].clone()
    if variants:
        aug = rng.random(cfg.batch_size) < cfg.aug_share
        which = rng.integers(0, len(variants), cfg.batch_size)
        for i in np.flatnonzero(aug):
            toks[i] = variants[which[i]][img[i]]
    keep = None
    if cfg.token_drop_share > 0:
        keep = random_keep(cfg.batch_size, toks.shape[1], cfg.token_keep, gen)
        keep[torch.rand(cfg.batch_size, generator=gen) >= cfg.token_drop_share] = True
    text = prompter.batch([data.questions[i] for i in q], [data.answers[i] for i in q])
    return toks, keep, text


def _train_step(model: MLLM, opt: torch.optim.Optimizer, params: list, cfg: PretrainConfig, step: int, batch: tuple,
                device: str, autocast) -> float:
    """Set the step's learning rate, run the answer loss on ``batch`` and take one optimizer step; the loss."""
    toks, keep, text = batch
    for g in opt.param_groups:
        g["lr"] = one_cycle_lr(cfg.lr, step, cfg.steps, warmup=0.1)
    with autocast:
        fwd = model(toks.to(device), None if keep is None else keep.to(device),
                    text.input_ids.to(device), text.attention_mask.to(device))
        loss = answer_loss(model, fwd, text.labels.to(device))
    return optimizer_step(loss, opt, params, cfg.grad_clip)


def _export(model: MLLM, cfg: PretrainConfig, out_dir: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """Write the adapters as fp16 ``{role}.safetensors``; the path and the exported tensors."""
    model.to("cpu").eval()
    state = {k: v.half() for k, v in adapter_state(model).items()}
    weights = out_dir / f"{cfg.role}.safetensors"
    save_file(state, str(weights), metadata={"role": cfg.role, "digest": cfg.digest()})
    return weights, state


def _record(cfg: PretrainConfig, device: str, weights: Path, state: dict[str, torch.Tensor], losses: list[float],
            features_s: float, train_s: float, steps_run: int) -> dict:
    """What ``{role}.json`` records: the config and its digest, the weights' hash, the loss and the times."""
    return {
        "role": cfg.role, "config": asdict(cfg), "digest": cfg.digest(), "device": device,
        "sha256": file_sha256(weights),
        "adapter_params": sum(v.numel() for v in state.values()),
        "final_loss": float(np.mean(losses[-50:])) if losses else None,
        "features_s": round(features_s, 1), "train_s": round(train_s, 1),
        "s_per_step": round(train_s / max(1, steps_run), 3),
        "torch": torch.__version__,
        "init_sha256": file_sha256(cfg.init) if cfg.init else None,
    }


def pretrain(model: MLLM, cfg: PretrainConfig, out_dir: Path, task: Task, device: str = "cpu", progress=None,
             log=print) -> dict:
    """Train ``model``'s adapters per ``cfg`` on ``task``'s train split; write ``{role}.safetensors`` (fp16)
    and ``{role}.json``."""

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = task.split("train")
    if cfg.data != data.key:
        raise ValueError(f"the config was made for data {cfg.data!r}, not {data.key!r}")
    prompter = model_prompter(model, task.answers)
    t0 = time.perf_counter()
    clean, variants = _training_features(cfg, data, device)
    features_s = time.perf_counter() - t0
    opt, params, named, ckpt, start = _prepare_training(model, cfg, out_dir, device, log)
    rng = np.random.default_rng(cfg.seed + start)
    t1 = time.perf_counter()
    losses = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu", enabled=False)
    for step in range(start, cfg.steps):
        batch = _draw_batch(cfg, data, prompter, clean, variants, rng, gen)
        losses.append(_train_step(model, opt, params, cfg, step, batch, device, autocast))
        if progress is not None:
            progress(step + 1, losses[-1])
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            save_checkpoint(ckpt, adapter_state(model), named, opt, step + 1, cfg.digest())
    train_s = time.perf_counter() - t1
    weights, state = _export(model, cfg, out_dir)
    record = _record(cfg, device, weights, state, losses, features_s, train_s, cfg.steps - start)
    write_json(weights.with_suffix(".json"), record)
    ckpt.unlink(missing_ok=True)
    return record
