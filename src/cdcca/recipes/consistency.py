"""Teacher robustness by feature consistency: train the cloud's bridge so that corrupted, partly
dropped visual tokens give the same LLM prefix as the clean, complete tokens of the same image.

FARE (Schlarmann et al., ICML 2024) makes LLaVA robust this way at the vision/LLM interface without
touching the LLM. Here the target is a frozen copy of the cloud's own bridge on the clean tokens, so
no LLM pass is needed: only the small bridge runs, from cached encoder features, ~10× faster per
sample than end-to-end training on 2 cores. The corruptions come from the cloud's own training family
(the nine built-in ones), never from a device's stream; the random token drop teaches the bridge
the half token sets the uplink sends. The LLM, its LoRA and its norms stay as pretrained.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from cdcca.data.augmix import check_family
from cdcca.data.corruptions import CORRUPTIONS
from cdcca.data.easyvqa import VQASet
from cdcca.data.features import augmented_features, cached_features
from cdcca.model.bridge import Bridge, BridgeConfig
from cdcca.recipes.checkpoint import config_digest, file_sha256, load_checkpoint, optimizer_step, save_checkpoint
from cdcca.recipes.pretrain import one_cycle_lr, random_keep


@dataclass
class ConsistencyConfig:
    steps: int = field(default=2000, metadata={"help": "optimiser steps (the shipped cloud: 2000, 18 min on 2 CPU cores)"})
    batch_size: int = field(default=64, metadata={"help": "samples per step"})
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate, cosine to 1 % after a 5 % warm-up"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clip"})
    w_clean: float = field(default=0.5, metadata={"help": "weight of the clean view (keeps clean behaviour where it is)"})
    aug_family: list[str] = field(default_factory=lambda: sorted(CORRUPTIONS), metadata={"help": (
        "corruptions the corrupted views are drawn from (default: all)")})
    aug_severity: tuple[int, int] = field(default=(3, 5), metadata={"help": (
        "severity range of the corrupted views (inclusive)")})
    aug_variants: int = field(default=2, metadata={"help": (
        "cached corrupted copies of the train set (each image its own corruption)")})
    token_drop_share: float = field(default=0.5, metadata={"help": (
        "share of samples whose corrupted view loses a random subset of tokens")})
    token_keep: tuple[float, float] = field(default=(0.25, 1.0), metadata={"help": (
        "share of tokens a dropping view keeps (uniform in this range)")})
    checkpoint_every: int = field(default=100, metadata={"help": "steps between resumable checkpoints"})
    seed: int = field(default=0, metadata={"help": "seeds the views, the batches and the token drops"})
    target_share: float = field(default=0.5, metadata={"help": (
        "with prefix targets: share of each batch drawn from their images")})
    w_frozen: float = field(default=0.3, metadata={"help": (
        "with prefix targets: weight of the other images' frozen-self target")})
    targets: str | None = field(default=None, metadata={"help": (
        "key of the prefix targets trained on (None: the frozen bridge's output)")})

    def __post_init__(self):
        check_family("ConsistencyConfig", self.aug_family)
        if self.steps < 1 or self.batch_size < 1 or self.aug_variants < 1:
            raise ValueError("ConsistencyConfig.steps, batch_size and aug_variants must be ≥ 1")
        self.aug_severity = tuple(self.aug_severity)
        self.token_keep = tuple(self.token_keep)

    @classmethod
    def for_targets(cls, key: str, **overrides) -> ConsistencyConfig:
        """The fit towards prefix targets (key: their ``targets_key``): a faster schedule, the clean view weighted fully."""
        return cls(**{"lr": 1e-3, "w_clean": 1.0, "steps": 1500, **overrides, "targets": key})

    def digest(self) -> str:
        return config_digest(self)


def bridge_state(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``bridge.*`` tensors of a role's adapter file, without the prefix, in fp32."""
    return {k[len("bridge."):]: v.float() for k, v in weights.items() if k.startswith("bridge.")}


def consistency_loss(bridge: Bridge, target: torch.Tensor, corrupted: torch.Tensor, keep: torch.Tensor,
                     clean: torch.Tensor, w_clean: float, weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """MSE of the bridge's prefix on the corrupted (partly dropped) view and on the clean view to ``target``;
    ``weight`` (B,) weighs the samples (None: all 1, a plain MSE)."""
    def mse(pred: torch.Tensor) -> torch.Tensor:
        per_sample = ((pred - target) ** 2).flatten(1).mean(1)
        return per_sample.mean() if weight is None else (weight * per_sample).mean()

    terms = {"corrupted": mse(bridge(corrupted, keep))}
    if w_clean:
        terms["clean"] = w_clean * mse(bridge(clean))
    return terms


def _prepare_bridge(weights: dict[str, torch.Tensor], cfg: ConsistencyConfig, clean: torch.Tensor, out_dir: Path,
                    device: str, log) -> tuple:
    """The bridge to train (resumed from the checkpoint in ``out_dir`` if one matches ``cfg``), its frozen
    clean-view target copy and the optimizer.

    Returns (bridge, frozen copy, optimizer, named parameters, checkpoint path, start step).
    """
    state = bridge_state(weights)
    torch.manual_seed(cfg.seed)
    bridge = Bridge(BridgeConfig.of_state(state))      # whatever LLM width and query count the role has
    bridge.load_state_dict(state)
    bridge.to(device)
    frozen = copy.deepcopy(bridge).eval().requires_grad_(False)
    opt = torch.optim.AdamW(bridge.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    ckpt = out_dir / "cloud.consistency.ckpt.safetensors"
    named = list(bridge.named_parameters())
    start, saved = load_checkpoint(ckpt, named, opt, cfg.digest())
    if saved:
        bridge.load_state_dict(saved)
    if start:
        log(f"resuming consistency training at step {start}")
    return bridge, frozen, opt, named, ckpt, start


def _draw_views(cfg: ConsistencyConfig, step: int, clean: torch.Tensor, variants: list[torch.Tensor],
                device: str, target_images: np.ndarray | None = None) -> tuple:
    """One step's (corrupted, clean, keep, image ids) batch; also seeds the bridge's dropout for the step.

    With ``target_images``, ``cfg.target_share`` of the batch is drawn from those images."""

    # randomness per (seed, step): a resumed run draws exactly what an uninterrupted one would
    rng = np.random.default_rng([cfg.seed, step])
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    torch.manual_seed(cfg.seed * 1_000_003 + step)            # the bridge's dropout
    img = rng.integers(0, len(clean), cfg.batch_size)
    if target_images is not None:
        n_target = round(cfg.target_share * cfg.batch_size)
        img[:n_target] = rng.choice(target_images, n_target)
    which = rng.integers(0, len(variants), cfg.batch_size)
    corrupted = torch.stack([variants[w][i] for w, i in zip(which, img)]).float().to(device)
    clean_b = clean[img].float().to(device)
    keep = random_keep(cfg.batch_size, clean.shape[1], cfg.token_keep, gen)
    keep[torch.rand(cfg.batch_size, generator=gen) >= cfg.token_drop_share] = True
    return corrupted, clean_b, keep.to(device), img


def _targets_of(frozen_target: torch.Tensor, img: np.ndarray, slot: np.ndarray, targets: torch.Tensor,
                w_frozen: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's target — its image's optimised prefix where there is one, else the frozen bridge's — and weight."""
    has = torch.as_tensor(slot[img] >= 0)
    target = frozen_target.clone()
    target[has] = targets[slot[img][slot[img] >= 0]].to(target)
    return target, torch.where(has, 1.0, w_frozen).to(target)


def _export_bridge(bridge: Bridge, weights: dict[str, torch.Tensor], cfg: ConsistencyConfig, out_dir: Path) -> Path:
    """Write ``init``'s adapters with the trained bridge as fp16 ``cloud.safetensors``; its path."""
    bridge.to("cpu").eval()
    state = {k: v.half() for k, v in weights.items()}
    state.update({f"bridge.{k}": v.detach().half() for k, v in bridge.state_dict().items()})
    path = out_dir / "cloud.safetensors"
    save_file(state, str(path), metadata={"role": "cloud", "digest": cfg.digest()})
    return path


def train_consistency(init: Path, cfg: ConsistencyConfig, out_dir: Path, clean: torch.Tensor,
                      variants: list[torch.Tensor], progress=None, log=print, device: str = "cpu",
                      targets: tuple[np.ndarray, torch.Tensor] | None = None) -> dict:
    """Train the bridge of the adapters in ``init`` (a cloud.safetensors); write the result to ``out_dir``.

    ``clean`` and each of ``variants`` are (N, 49, C) fp16 tokens of the same N train images.
    ``targets`` — (image ids, prefixes) from :mod:`cdcca.recipes.prefix_targets` — replaces the frozen bridge's
    clean output as the target of those images (the others keep it, weighted ``cfg.w_frozen``).
    Resumable from ``out_dir/cloud.consistency.ckpt.safetensors``; returns the record it writes.
    """

    out_dir.mkdir(parents=True, exist_ok=True)
    weights = load_file(str(init))
    bridge, frozen, opt, named, ckpt, start = _prepare_bridge(weights, cfg, clean, out_dir, device, log)
    bridge.train()
    losses: list[float] = []
    slot = np.full(len(clean), -1)
    if targets is not None:
        slot[targets[0]] = np.arange(len(targets[0]))
    t0 = time.perf_counter()
    for step in range(start, cfg.steps):
        corrupted, clean_b, keep, img = _draw_views(cfg, step, clean, variants, device,
                                                    None if targets is None else targets[0])
        with torch.no_grad():
            target, weight = frozen(clean_b), None
        if targets is not None:
            target, weight = _targets_of(target, img, slot, targets[1], cfg.w_frozen)
        for g in opt.param_groups:
            g["lr"] = one_cycle_lr(cfg.lr, step, cfg.steps, warmup=0.05)
        terms = consistency_loss(bridge, target, corrupted, keep, clean_b, cfg.w_clean, weight)
        losses.append(optimizer_step(sum(terms.values()), opt, bridge.parameters(), cfg.grad_clip))
        if progress is not None:
            progress(step + 1, losses[-1])
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            save_checkpoint(ckpt, bridge.state_dict(), named, opt, step + 1, cfg.digest())
    train_s = time.perf_counter() - t0
    path = _export_bridge(bridge, weights, cfg, out_dir)
    ckpt.unlink(missing_ok=True)
    return {
        "recipe": "consistency", "config": asdict(cfg), "digest": cfg.digest(),
        "init_sha256": file_sha256(init),
        "sha256": file_sha256(path),
        "first_loss": float(np.mean(losses[:20])) if losses else None,
        "final_loss": float(np.mean(losses[-50:])) if losses else None,
        "train_s": round(train_s, 1), "s_per_step": round(train_s / max(1, cfg.steps - start), 3),
        "torch": torch.__version__,
    }


def training_views(cfg: ConsistencyConfig, data: VQASet, device: str = "cpu") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Clean tokens of a task's train images and ``cfg.aug_variants`` corrupted copies (the pretraining feature caches)."""

    return cached_features(data, device=device), [augmented_features(data, cfg.aug_family, cfg.aug_severity, v, cfg.seed,
                                                                     device) for v in range(cfg.aug_variants)]
