"""Resumable training checkpoints: trainable tensors plus AdamW moments in one safetensors file.

A checkpoint names the digest of the config that wrote it; a run with another config starts over
instead of resuming from someone else's state. Written to a temp file and renamed, so an
interrupted write never leaves a torn checkpoint. The digests and file hashes that training records
carry (a stage's config, the weights it started from and wrote) are defined here once too.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from cdcca.atomic import write_safetensors

NamedParams = list[tuple[str, torch.nn.Parameter]]


def config_digest(cfg, **extra) -> str:
    """16 hex digits of SHA-256 over a dataclass config (plus ``extra`` fields), keys sorted."""
    return hashlib.sha256(json.dumps({**extra, **asdict(cfg)}, sort_keys=True).encode()).hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes: what a training record names its input and output weights by."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_checkpoint(path: Path, weights: dict[str, torch.Tensor], params: NamedParams,
                    opt: torch.optim.Optimizer, step: int, digest: str) -> None:
    """``weights`` (what to restore) and the optimizer moments of ``params``, at ``step``."""
    tensors = {f"weights/{k}": v.detach().cpu().clone() for k, v in weights.items()}
    for name, p in params:
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                tensors[f"opt/{key}/{name}"] = st[key].detach().cpu().clone()
    write_safetensors(path, tensors, metadata={"step": str(step), "digest": digest})


def load_checkpoint(path: Path, params: NamedParams, opt: torch.optim.Optimizer,
                    digest: str) -> tuple[int, dict[str, torch.Tensor]]:
    """(step, weights) of a checkpoint written with the same config digest, optimizer moments restored;
    (0, {}) when there is none or it belongs to another config."""
    if not path.is_file():
        return 0, {}
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("digest") != digest:
        return 0, {}
    tensors = load_file(str(path))
    weights = {k[len("weights/"):]: v for k, v in tensors.items() if k.startswith("weights/")}
    if not weights:             # written by an older layout: start over rather than resume without weights
        return 0, {}
    step = int(meta["step"])
    for name, p in params:
        avg, sq = tensors.get(f"opt/exp_avg/{name}"), tensors.get(f"opt/exp_avg_sq/{name}")
        if avg is not None and sq is not None:
            opt.state[p] = {"step": torch.tensor(float(step)), "exp_avg": avg.to(p.device), "exp_avg_sq": sq.to(p.device)}
    return step, weights


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer, params, grad_clip: float) -> float:
    """Backward, clip, step; returns the loss as a float."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    return loss.item()
